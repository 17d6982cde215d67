"""The ssh runner against a real OpenSSH server on localhost, a second user standing in for the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import read_json, run_cli
from tests.runners.sshd import DEVICE_USER, make_server, unavailable
from tests.test_build import QUICK_EVALUATION

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")
REPO = Path(__file__).resolve().parents[2]
PROFILE = ("--prompt-len", "16", "--gen-len", "8", "--runs", "3", "--threads", "1")


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    server = make_server(tmp_path_factory.mktemp("sshd"))
    server.start()
    previous = os.environ.get("EDGEPACK_SSH_CONFIG")
    os.environ["EDGEPACK_SSH_CONFIG"] = str(server.config)
    yield server
    server.kill()
    if previous is None:
        os.environ.pop("EDGEPACK_SSH_CONFIG", None)
    else:
        os.environ["EDGEPACK_SSH_CONFIG"] = previous


@pytest.fixture(scope="module")
def prepared(device):
    result = run_cli("devices", "prepare", device.url)
    assert result.exit_code == 0, result.stderr
    again = run_cli("devices", "prepare", device.url)
    assert "already prepared" in again.stdout
    return device


@pytest.fixture(scope="module")
def bundle(exported_tiny_factory, tmp_path_factory):
    """A tiny llama quantized to int8-weight: quantize.json names its fp32 source, the parity reference."""
    from edgepack.quantize import QuantizeConfig, quantize_model

    out = tmp_path_factory.mktemp("bundle") / "int8"
    quantize_model(exported_tiny_factory("llama"), out, QuantizeConfig(scheme="int8-weight", evaluate=False))
    return out


def test_a_device_without_the_runtime_is_exit_4_naming_what_is_missing(device, bundle, monkeypatch, tmp_path):
    # pins no venv was made for: the runner falls back to the device's python3, which has no numpy/onnxruntime
    import edgepack.runners.base as base

    monkeypatch.setattr(base, "package_pins", lambda: {"numpy": "0.0-not-installed"})
    result = run_cli("profile", bundle, "-o", tmp_path / "p.json", "--on", device.url, *PROFILE)
    assert result.exit_code == 4, result.stderr
    assert result.stderr_lines == [result.stderr_lines[0]]
    assert device.url in result.stderr and "missing on the device" in result.stderr and "devices prepare" in result.stderr


def test_profile_on_the_device_matches_a_local_profile_and_copies_once(prepared, bundle, tmp_path):
    from edgepack.runners.ssh import SshRunner

    runner = SshRunner(prepared.url)
    runner.remove(f"{runner.root()}/bundles")  # the copy is made by the first run below
    local = run_cli("profile", bundle, "-o", tmp_path / "here.json", "--device", "pixel-8", *PROFILE)
    assert local.exit_code == 0, local.stderr
    runs = []
    for index in range(2):
        result = run_cli("profile", bundle, "-o", tmp_path / f"on{index}.json", "--on", f"box={prepared.url}", "--device", "pixel-8", *PROFILE)
        assert result.exit_code == 0, result.stderr
        runs.append(read_json(tmp_path / f"on{index}.json"))
    first, second = (run["measured_on"]["box"] for run in runs)
    assert first["bundle_copied"] is True and second["bundle_copied"] is False
    assert runs[0]["host"] is None and "pixel-8" in runs[0]["projections"]
    device = first["device"]
    assert device["url"] == prepared.url and device["name"] == "box" and device["cores"] == os.cpu_count()
    assert device["runtimes"]["onnxruntime"] == __import__("onnxruntime").__version__
    here = read_json(tmp_path / "here.json")["host"]
    # the same machine: the device's figures are this host's, within the noise of a shared 2-core host
    for key in ("decode_ms_per_token", "ttft_ms"):
        ratio = first["by_prompt_len"][0][key]["p50"] / here["by_prompt_len"][0][key]["p50"]
        assert 0.33 < ratio < 3, (key, ratio)
    assert first["kind"] == "measured" and first["by_prompt_len"][0]["energy"]["kind"] in ("measured", "estimated")
    # parity as the device computed it: against the fp32 export quantize.json names, equal to parity here
    parity = first["parity"]
    assert parity["reference"] == read_json(bundle / "quantize.json")["source_dir"]
    assert parity["device"] == parity["here"] and parity["device_vs_here_max_abs_logit_diff"] == 0.0
    assert 0 < parity["device"]["top1_agreement"] <= 1 and parity["device"]["positions"] == 128
    # and `check` gates the measurement, quality included
    budgets = tmp_path / "budgets.toml"
    budgets.write_text("[box]\nmax_decode_ms_per_token = 10000\nmin_top1 = 0.5\nmax_peak_memory_mb = 100000\n")
    verdicts = tmp_path / "verdicts.json"
    checked = run_cli("check", tmp_path / "on1.json", "--budgets", budgets, "-o", verdicts)
    assert checked.exit_code == 0, checked.stderr
    assert {v["kind"] for v in read_json(verdicts)["verdicts"]} == {"measured"}


def test_calibrate_on_the_device_writes_a_device_file_measured_there(prepared, tmp_path):
    from edgepack.profiles.devices import load_device_file

    out = tmp_path / "box.toml"
    result = run_cli("devices", "calibrate", "-o", out, "--id", "box", "--threads", "1", "--quick", "--on", prepared.url)
    assert result.exit_code == 0, result.stderr
    device = load_device_file(out)
    assert device.id == "box" and device.value("memory", "bandwidth_gb_s") > 0
    assert f"--on {prepared.url}" in out.read_text()
    assert device.figure("efficiency", "decode_bandwidth_fp32").verified  # measured, and says so


def test_killing_sshd_mid_run_is_exit_4_in_one_line(prepared, bundle, tmp_path):
    env = {**os.environ, "EDGEPACK_SSH_CONFIG": str(prepared.config), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "edgepack", "profile", str(bundle), "-o", str(tmp_path / "p.json"), "--on", prepared.url,
               "--prompt-len", "16", "--gen-len", "200", "--runs", "200", "--threads", "1", "--device-timeout", "120"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for the measuring program to run on the device
            probe = subprocess.run(["pgrep", "-u", DEVICE_USER, "-f", "edgepack-probe"], capture_output=True)
            if probe.returncode == 0:
                break
            assert process.poll() is None, process.communicate()
            time.sleep(0.2)
        else:
            pytest.fail("the measurement never started on the device")
        killed = time.monotonic()
        prepared.kill()
        _, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        if process.poll() is None:
            process.kill()
        subprocess.run(["pkill", "-u", DEVICE_USER, "-f", "edgepack-probe"], check=False)
        prepared.start()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 4, stderr
    assert len(lines) == 1 and lines[0].startswith("error: device ssh://") and "lost" in lines[0]
    assert elapsed < 30
    assert not (tmp_path / "p.json").exists()


def test_addresses_that_are_not_devices_are_refused(tmp_path, bundle):
    bad = run_cli("profile", bundle, "-o", tmp_path / "p.json", "--on", "ftp://box")
    assert bad.exit_code == 2 and "ssh://" in bad.stderr
    password = run_cli("profile", bundle, "-o", tmp_path / "p.json", "--on", "ssh://me:secret@box")
    assert password.exit_code == 2 and "passwords are not taken" in password.stderr
    from tests.runners.sshd import free_port

    closed = run_cli("profile", bundle, "-o", tmp_path / "p.json", "--on", f"ssh://127.0.0.1:{free_port()}", *PROFILE)
    assert closed.exit_code == 4 and closed.stderr.startswith("error: device ssh://127.0.0.1:")


RECIPE = """\
[devices.box]
on = "{url}"
like = "x86-laptop"

[devices.pixel-8]

[model]
source = "{source}"

[[quantize]]
scheme = "int8-weight"

[budgets.box]
max_decode_ms_per_token = 10000
min_top1 = 0.5

[budgets.pixel-8]
max_decode_ms_per_token = 10000

""" + QUICK_EVALUATION


@pytest.mark.slow
def test_a_recipe_device_with_on_is_measured_there_in_the_build(prepared, tiny_model_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "edgepack.toml"
    recipe.write_text(RECIPE.format(url=prepared.url, source=tiny_model_factory("llama")))
    result = run_cli("build", recipe, "-o", tmp_path / "bundle")
    assert result.exit_code == 0, result.stderr
    report = read_json(tmp_path / "bundle" / "report.json")
    from tests.test_build import validate_report

    validate_report(report)
    rows = {(row["scheme"], row["device"]): row for row in report["summary"]}
    assert rows[("int8-weight", "box")]["figure_kind"] == "measured" and rows[("int8-weight", "box")]["verdict"] == "pass"
    assert rows[("int8-weight", "box")]["budgets"] == 2
    [compared] = report["measured_vs_projected"]
    assert compared["device"] == "box" and compared["projected_as"] == "x86-laptop" and compared["decode_ms_per_token_ratio"] > 0
    assert "Measured on the device vs projected" in (tmp_path / "bundle" / "report.html").read_text()
    profile = read_json(tmp_path / "bundle" / "profiles" / "int8-weight.json")
    assert profile["host"] is not None and profile["measured_on"]["box"]["parity"]["reference"].endswith("out")
    assert json.dumps(profile).count(prepared.url) >= 1
