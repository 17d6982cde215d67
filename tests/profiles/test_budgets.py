"""Budgets: parsing, verdicts, JUnit structure, and `edgepack check` exit codes on a synthetic profile."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from edgepack.errors import UsageError
from edgepack.profiles.budgets import BUDGET_KEYS, Budget, evaluate, parse_budgets
from edgepack.report.junit import junit_xml


def synthetic_profile() -> dict:
    """The shape `edgepack profile` writes (docs/profile-json.md), with round numbers."""
    return {
        "schema_version": 1,
        "kind": "edgepack.profile",
        "model": {"dir": "/m", "scheme": "int4", "facts": {"file_bytes": 150_000_000}},
        "quality": {"kind": "measured", "source": "/m/quantize.json", "kl_mean": 0.04, "top1_agreement": 0.91},
        "host": {
            "kind": "measured", "peak_rss_mb": 800.0, "model_size_mb": 150.0,
            "conditions": {"host": {"cpu": "Test CPU"}, "runtime": "onnxruntime 1.32.0", "threads": 2, "runs": 3},
            "by_prompt_len": [
                {"prompt_len": 128, "gen_len": 64, "ttft_ms": {"p50": 100.0}, "decode_ms_per_token": {"p50": 20.0},
                 "tokens_per_s": 50.0, "energy": {"kind": "estimated", "decode_mj_per_token": 150.0, "basis": "model"}},
                {"prompt_len": 512, "gen_len": 64, "ttft_ms": {"p50": 400.0}, "decode_ms_per_token": {"p50": 25.0},
                 "tokens_per_s": 40.0, "energy": {"kind": "estimated", "decode_mj_per_token": 180.0, "basis": "model"}},
            ],
        },
        "projections": {
            "pixel-8": {
                "kind": "projected", "device": {"id": "pixel-8"}, "bandwidth_gb_s": 68.3, "efficiency": {"decode_bandwidth_int4": 0.4},
                "by_prompt_len": [
                    {"prompt_len": 128, "gen_len": 64, "ttft_ms": 60.0, "decode_ms_per_token": 10.0, "tokens_per_s": 100.0,
                     "energy": {"kind": "projected", "decode_mj_per_token": 50.0, "basis": "5 W x time"}},
                    {"prompt_len": 512, "gen_len": 64, "ttft_ms": 240.0, "decode_ms_per_token": 12.5, "tokens_per_s": 80.0,
                     "energy": {"kind": "projected", "decode_mj_per_token": 62.5, "basis": "5 W x time"}},
                ],
                "memory_fit": {"context": 8192, "total_mb": 700.0, "limit_mb": 4096, "overhead_mb": 150, "fits": True},
            }
        },
    }


PASSING = """
[pixel-8]
max_ttft_ms = 300
max_decode_ms_per_token = 30
min_tokens_per_s = 20
max_peak_memory_mb = 1500
max_model_size_mb = 200
max_energy_mj_per_token = 100
max_kl = 0.05
min_top1 = 0.9

[host]
max_decode_ms_per_token = 30
max_peak_memory_mb = 1000
"""


def _verdicts(text: str):
    import tomllib

    return evaluate(synthetic_profile(), parse_budgets(tomllib.loads(text)))


def test_all_keys_parse_and_pass():
    verdicts = _verdicts(PASSING)
    assert len(verdicts) == 10
    assert all(v.passed for v in verdicts), [v.message for v in verdicts if not v.passed]
    assert {v.budget for v in verdicts} == set(BUDGET_KEYS)


def test_worst_prompt_length_decides_and_margin_is_relative():
    verdicts = {(v.device, v.budget): v for v in _verdicts(PASSING)}
    ttft = verdicts[("pixel-8", "max_ttft_ms")]
    assert ttft.value == 240.0 and ttft.kind == "projected" and "prompt 512" in ttft.detail
    assert ttft.margin == pytest.approx((300 - 240) / 300)
    tps = verdicts[("pixel-8", "min_tokens_per_s")]
    assert tps.value == 80.0 and tps.margin == pytest.approx((80 - 20) / 20)
    host = verdicts[("host", "max_decode_ms_per_token")]
    assert host.value == 25.0 and host.kind == "measured"
    assert verdicts[("pixel-8", "max_energy_mj_per_token")].kind == "projected"
    assert verdicts[("pixel-8", "max_peak_memory_mb")].value == 700.0
    assert verdicts[("pixel-8", "max_kl")].kind == "measured"


def test_failures_and_missing_figures_fail():
    profile = synthetic_profile()
    del profile["host"]["by_prompt_len"][1]["energy"]
    del profile["host"]["by_prompt_len"][0]["energy"]
    verdicts = evaluate(profile, parse_budgets({"pixel-8": {"max_decode_ms_per_token": 11, "min_top1": 0.95, "max_ttft_ms": 300},
                                                "host": {"max_energy_mj_per_token": 100}}))
    failed = {(v.device, v.budget): v for v in verdicts if not v.passed}
    assert set(failed) == {("pixel-8", "max_decode_ms_per_token"), ("pixel-8", "min_top1"), ("host", "max_energy_mj_per_token")}
    assert failed[("pixel-8", "max_decode_ms_per_token")].margin == pytest.approx((11 - 12.5) / 11)
    missing = failed[("host", "max_energy_mj_per_token")]
    assert missing.value is None and missing.kind == "missing"


@pytest.mark.parametrize("device", ["iphone-15-pro", "pixle-8"])
def test_budget_for_a_device_the_profile_lacks_is_a_usage_error(device):
    """A typo or an unprofiled device: neither a pass nor a budget the model broke."""
    with pytest.raises(UsageError) as info:
        evaluate(synthetic_profile(), parse_budgets({"pixel-8": {"max_ttft_ms": 300}, device: {"max_ttft_ms": 100}}))
    message = str(info.value)
    assert f"budgets for {device}:" in message and "(its devices: host, pixel-8)" in message and f"--device {device}" in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_budgets_are_refused(value):
    with pytest.raises(UsageError, match=r"budget `pixel-8\.max_ttft_ms` must be a finite number"):
        parse_budgets({"pixel-8": {"max_ttft_ms": value}})


def test_quality_budget_without_quantize_json_fails():
    profile = synthetic_profile()
    profile["quality"] = None
    (verdict,) = evaluate(profile, [Budget("pixel-8", "max_kl", 0.1)])
    assert not verdict.passed and verdict.kind == "missing"


@pytest.mark.parametrize("data, words", [
    ({"pixel-8": {"max_latency": 3}}, "pixel-8.max_latency"),
    ({"pixel-8": {"max_ttft_ms": "fast"}}, "pixel-8.max_ttft_ms"),
    ({"pixel-8": {"max_ttft_ms": True}}, "pixel-8.max_ttft_ms"),
    ({"pixel-8": {"min_top1": 3}}, "pixel-8.min_top1"),
    ({"pixel-8": 3}, "pixel-8"),
])
def test_bad_budgets_are_usage_errors_naming_the_key(data, words):
    with pytest.raises(UsageError, match=words.replace(".", r"\.")):
        parse_budgets(data)


def test_recipe_budget_section():
    budgets = parse_budgets({"model": "x", "budgets": {"pixel-8": {"max_ttft_ms": 5}}})
    assert budgets == [Budget("pixel-8", "max_ttft_ms", 5.0)]


def test_junit_has_one_case_per_budget_and_one_failure_per_failed_budget():
    verdicts = _verdicts(PASSING.replace("max_decode_ms_per_token = 30\nmin", "max_decode_ms_per_token = 5\nmin").replace("max_kl = 0.05", "max_kl = 0.01"))
    root = ET.fromstring(junit_xml({"edgepack.check": verdicts}))
    cases = root.findall(".//testcase")
    assert len(cases) == len(verdicts) == 10
    failures = root.findall(".//testcase/failure")
    assert len(failures) == 2
    assert root.find("testsuite").get("failures") == "2" and root.find("testsuite").get("tests") == "10"
    failed_names = {(c.get("classname"), c.get("name")) for c in cases if c.find("failure") is not None}
    assert failed_names == {("edgepack.check.pixel-8", "max_decode_ms_per_token"), ("edgepack.check.pixel-8", "max_kl")}


def _files(tmp_path, budgets: str):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(synthetic_profile()))
    path = tmp_path / "budgets.toml"
    path.write_text(budgets)
    return profile, path


def test_check_exits_0_when_every_budget_passes(cli, tmp_path):
    profile, budgets = _files(tmp_path, PASSING)
    result = cli("check", profile, "--budgets", budgets, "--junit", tmp_path / "out.xml", "-o", tmp_path / "verdicts.json")
    assert result.exit_code == 0, result.stderr
    assert "PASS" in result.stdout and "FAIL" not in result.stdout
    report = json.loads((tmp_path / "verdicts.json").read_text())
    assert report["passed"] is True and report["counts"] == {"total": 10, "passed": 10, "failed": 0}
    assert ET.parse(tmp_path / "out.xml").getroot().find("testsuite").get("failures") == "0"


def test_check_exits_1_and_still_writes_outputs_when_a_budget_fails(cli, tmp_path):
    profile, budgets = _files(tmp_path, "[pixel-8]\nmax_decode_ms_per_token = 5\nmax_ttft_ms = 1000\n")
    result = cli("check", profile, "--budgets", budgets, "--junit", tmp_path / "out.xml", "-o", tmp_path / "verdicts.json")
    assert result.exit_code == 1
    assert len(result.stderr_lines) == 1 and "max_decode_ms_per_token" in result.stderr
    root = ET.parse(tmp_path / "out.xml").getroot()
    assert len(root.findall(".//testcase")) == 2 and len(root.findall(".//failure")) == 1
    assert json.loads((tmp_path / "verdicts.json").read_text())["counts"]["failed"] == 1


def test_check_unknown_key_exits_2_naming_it(cli, tmp_path):
    profile, budgets = _files(tmp_path, "[pixel-8]\nmax_decode_ms = 5\n")
    result = cli("check", profile, "--budgets", budgets)
    assert result.exit_code == 2
    assert len(result.stderr_lines) == 1 and "max_decode_ms" in result.stderr


def test_check_wrong_type_exits_2(cli, tmp_path):
    profile, budgets = _files(tmp_path, '[pixel-8]\nmax_ttft_ms = "100 ms"\n')
    result = cli("check", profile, "--budgets", budgets)
    assert result.exit_code == 2 and "pixel-8.max_ttft_ms" in result.stderr


def test_check_bad_profile_exits_3(cli, tmp_path):
    budgets = tmp_path / "b.toml"
    budgets.write_text(PASSING)
    assert cli("check", tmp_path / "missing.json", "--budgets", budgets).exit_code == 3
    (tmp_path / "bad.json").write_text("{}")
    assert cli("check", tmp_path / "bad.json", "--budgets", budgets).exit_code == 3


def test_check_budget_for_a_device_the_profile_lacks_exits_2(cli, tmp_path):
    profile, budgets = _files(tmp_path, "[pixel-8]\nmax_ttft_ms = 300\n\n[pixle-8]\nmax_ttft_ms = 300\n")
    result = cli("check", profile, "--budgets", budgets, "--junit", tmp_path / "out.xml", "-o", tmp_path / "verdicts.json")
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr_lines) == 1 and result.stderr.startswith("error: budgets for pixle-8:")
    assert "host, pixel-8" in result.stderr
    assert not (tmp_path / "out.xml").exists() and not (tmp_path / "verdicts.json").exists()


@pytest.mark.parametrize("text", ["nan", "inf", "+inf", "-inf"])
def test_check_non_finite_budget_exits_2_naming_it(cli, tmp_path, text):
    profile, budgets = _files(tmp_path, f"[pixel-8]\nmax_ttft_ms = 300\nmax_decode_ms_per_token = {text}\n")
    result = cli("check", profile, "--budgets", budgets)
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr_lines) == 1
    assert f"budget `pixel-8.max_decode_ms_per_token` must be a finite number, got {float(text)}" in result.stderr


@pytest.mark.parametrize("table, key", [("budgets.pixel-8", "max_ttft_ms"), ("evaluation", "max_kl")])
def test_recipe_refuses_non_finite_limits(tmp_path, table, key):
    from edgepack.recipe import load_recipe

    path = tmp_path / "edgepack.toml"
    path.write_text(f'[model]\nsource = "x"\n\n[{table}]\n{key} = nan\n')
    with pytest.raises(UsageError, match=f"{key}.*finite"):
        load_recipe(path)
