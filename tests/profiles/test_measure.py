"""`edgepack profile` on a tiny exported Llama, end to end through the CLI, then `edgepack check` on its output."""

from __future__ import annotations

import json

import pytest

from edgepack.profiles.measure import exact_prompt, percentile


def test_percentile_matches_numpy_linear():
    import numpy as np

    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    for q in (0, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_exact_prompt_lengths_without_a_tokenizer():
    for n in (1, 7, 300):
        ids = exact_prompt(None, n, vocab_size=512)
        assert len(ids) == n and all(10 <= i < 512 for i in ids)


@pytest.fixture(scope="module")
def profiled(exported_tiny_factory, tmp_path_factory):
    from tests.conftest import run_cli

    folder = exported_tiny_factory("llama")
    out = tmp_path_factory.mktemp("profile") / "profile.json"
    result = run_cli(
        "profile", folder, "-o", out, "--prompt-len", "8,24", "--gen-len", "4", "--runs", "2", "--warmup", "1",
        "--threads", "1", "--device", "pixel-8", "--device", "iphone-15-pro", "--device", "raspberry-pi-5",
    )
    return folder, out, result


def test_profile_writes_measured_and_projected_figures(profiled):
    folder, out, result = profiled
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["kind"] == "edgepack.profile" and report["schema_version"] == 1
    host = report["host"]
    assert host["kind"] == "measured" and host["load_seconds"] > 0 and host["peak_rss_mb"] > 0
    conditions = host["conditions"]
    assert conditions["threads"] == 1 and conditions["prompt_lens"] == [8, 24] and conditions["runs"] == 2
    assert conditions["runtime"].startswith("onnxruntime") and conditions["provider"] == "CPUExecutionProvider"
    assert [e["prompt_len"] for e in host["by_prompt_len"]] == [8, 24]
    for entry in host["by_prompt_len"]:
        assert entry["ttft_ms"]["p50"] > 0 and entry["decode_ms_per_token"]["p95"] >= entry["decode_ms_per_token"]["p50"]
        assert entry["decode_ms_per_token"]["n"] == 2 * 3  # runs x (gen_len - 1)
        assert entry["tokens_per_s"] > 0 and entry["prefill_tokens_per_s"] > 0
        assert entry["energy"]["kind"] in ("measured", "estimated") and entry["energy"]["basis"]
        assert entry["energy"]["prefill_mj_per_token"] > 0 and entry["energy"]["decode_mj_per_token"] > 0
    assert {m["meter"] for m in host["energy_meters"]} >= {"rapl", "powermetrics", "jetson-ina3221", "android-rails"}
    assert set(report["projections"]) == {"pixel-8", "iphone-15-pro", "raspberry-pi-5"}
    for projection in report["projections"].values():
        assert projection["kind"] == "projected" and projection["efficiency"]["decode_bandwidth_fp32"] > 0
        assert projection["memory_fit"]["fits"] is True
        for entry in projection["by_prompt_len"]:
            assert entry["decode_ms_per_token"] > 0 and entry["ttft_ms"] > 0
            assert entry["energy"]["kind"] == "projected" and entry["energy"]["decode_mj_per_token"] > 0
    assert report["model"]["facts"]["kv_bytes_per_position"] == 512
    assert report["quality"] is None  # a convert output has no quantize.json
    assert "measured" in result.stdout and "projected" in result.stdout


def test_check_on_a_real_profile(profiled, cli, tmp_path):
    _folder, out, _result = profiled
    generous = tmp_path / "ok.toml"
    generous.write_text("[host]\nmax_decode_ms_per_token = 1e6\nmax_model_size_mb = 1000\n[pixel-8]\nmax_peak_memory_mb = 4000\nmin_tokens_per_s = 0.001\n")
    assert cli("check", out, "--budgets", generous).exit_code == 0
    strict = tmp_path / "strict.toml"
    strict.write_text("[pixel-8]\nmax_decode_ms_per_token = 1e-9\nmax_energy_mj_per_token = 1e6\n")
    junit = tmp_path / "j.xml"
    result = cli("check", out, "--budgets", strict, "--junit", junit)
    assert result.exit_code == 1
    import xml.etree.ElementTree as ET

    root = ET.parse(junit).getroot()
    assert len(root.findall(".//testcase")) == 2 and len(root.findall(".//failure")) == 1


def test_profile_usage_errors(exported_tiny_factory, cli, tmp_path):
    folder = exported_tiny_factory("llama")
    result = cli("profile", folder, "-o", tmp_path / "p.json", "--device", "nokia-3310")
    assert result.exit_code == 2 and "nokia-3310" in result.stderr
    result = cli("profile", folder, "-o", tmp_path / "p.json", "--prompt-len", "abc")
    assert result.exit_code == 2 and "--prompt-len" in result.stderr
    result = cli("profile", folder, "-o", tmp_path / "p.json", "--prompt-len", "1000")  # > 256 context of the tiny model
    assert result.exit_code == 2 and "context" in result.stderr
    assert cli("profile", tmp_path / "nothing", "-o", tmp_path / "p.json").exit_code == 3


def test_calibrate_then_project_onto_this_host(exported_tiny_factory, cli, tmp_path):
    devices = tmp_path / "devices"
    devices.mkdir()
    host = devices / "host.toml"
    result = cli("devices", "calibrate", "-o", host, "--quick", "--threads", "1")
    assert result.exit_code == 0, result.stderr
    assert "triad" in result.stdout
    shown = cli("devices", "show", "host", "--devices-dir", devices)
    assert shown.exit_code == 0 and "calibration.gemv_int4_gb_s" in shown.stdout
    assert cli("devices", "calibrate", "-o", host, "--quick").exit_code == 2  # exists, no --force
    out = tmp_path / "p.json"
    result = cli("profile", exported_tiny_factory("llama"), "-o", out, "--prompt-len", "8", "--gen-len", "3", "--runs", "1",
                 "--warmup", "0", "--threads", "1", "--devices-dir", devices, "--device", "host")
    assert result.exit_code == 0, result.stderr
    projection = json.loads(out.read_text())["projections"]["host"]
    assert projection["calibrated_curves"] == ["fp32", "int4", "int8"]
    assert "calibrated" in projection["by_prompt_len"][0]["decode_detail"]["terms"][0]["basis"]
