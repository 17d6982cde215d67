"""`edgepack build` on a tiny recipe: bundle, manifest, reports, cache reuse, gate exit codes, kill -9 safety."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CliResult, read_json, run_cli

# A short evaluation and profile, for recipes of tiny models
QUICK_EVALUATION = """\
[evaluation]
tokens = 64

[profile]
prompt_len = [16]
gen_len = 8
runs = 2
"""

RECIPE = """\
devices = ["pixel-8", "iphone-15-pro"]

[model]
source = "{source}"

[[quantize]]
scheme = "int8-weight"

[[quantize]]
scheme = "int4"
algorithm = "rtn"

[targets.ort]
max_context = 128
graph = "optimum"

[targets.ort-mobile]

[budgets.pixel-8]
max_decode_ms_per_token = {decode_budget}
max_kl = 0.05

""" + QUICK_EVALUATION


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@dataclass
class ColdBuild:
    recipe: Path
    out: Path
    cache: Path
    junit: Path
    result: CliResult


@pytest.fixture(scope="module")
def cold_build(tmp_path_factory, tiny_model_factory) -> ColdBuild:
    """RECIPE built once on a cold cache (`--jobs 2`, `--junit`), for the tests that read its bundle or reuse its
    cache. Shared: copy the bundle or the cache before writing to them."""
    root = tmp_path_factory.mktemp("cold-build")
    path, out, cache = recipe(root, tiny_model_factory), root / "bundle", root / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEPACK_CACHE", str(cache))
        result = run_cli("build", path, "-o", out, "--junit", root / "junit-copy.xml", "--jobs", "2")
    return ColdBuild(path, out, cache, root / "junit-copy.xml", result)


def seed_cache(cold_build: ColdBuild, cache: Path, stages: tuple[str, ...]) -> None:
    """Copy `cold_build`'s entries of these stages into `cache`, for a test about what comes after them."""
    for stage in stages:
        shutil.copytree(cold_build.cache / "build" / stage, cache / "build" / stage)


def validate_report(report: dict) -> None:
    """report.json against its published JSON Schema (docs/report.schema.json)."""
    import jsonschema

    schema = json.loads((Path(__file__).parents[1] / "docs" / "report.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(report)


def recipe(tmp_path, tiny_model_factory, decode_budget=1000):
    path = tmp_path / "edgepack.toml"
    path.write_text(RECIPE.format(source=tiny_model_factory("llama"), decode_budget=decode_budget))
    return path


def test_build_writes_a_verified_bundle_and_reuses_the_cache(cold_build, tmp_path, monkeypatch, cli):
    path, out, result = cold_build.recipe, cold_build.out, cold_build.result
    assert result.exit_code == 0, result.stderr
    for name in ("manifest.json", "report.json", "report.html", "junit.xml", "recipe.toml",
                 "targets/ort/int8-weight/model.onnx", "targets/ort/int4/model.onnx",
                 "targets/ort-mobile/int4/model.ort", "quality/int4.json", "profiles/int4.json"):
        assert (out / name).is_file(), name
    assert cli("verify", out).exit_code == 0
    report = read_json(out / "report.json")
    validate_report(report)
    assert report["passed"] is True and report["failures"] == []
    rows = report["summary"]
    assert {(r["scheme"], r["target"], r["device"]) for r in rows} >= {("int4", "ort", "pixel-8"), ("int8-weight", "ort-mobile", "host")}
    pixel = next(r for r in rows if r["scheme"] == "int4" and r["target"] == "ort" and r["device"] == "pixel-8")
    assert pixel["figure_kind"] == "projected" and pixel["decode_ms_per_token"] > 0 and pixel["verdict"] == "pass"
    assert pixel["kl_mean"] == read_json(out / "quality" / "int4.json")["quality"]["kl_mean"]
    manifest = read_json(out / "manifest.json")
    assert not any(s["reused"] for s in manifest["stages"])
    junit = ET.parse(cold_build.junit).getroot()
    # 2 schemes x 2 bundles measured (ort, ort-mobile) x 2 pixel-8 budgets
    assert int(junit.find("testsuite[@name='edgepack.budgets']").get("tests")) == 8
    check_profiles_are_the_bundles_own(out, report)

    # Again over (a copy of) that bundle, with its cache: every stage is reused and the bundle replaced.
    out = tmp_path / "bundle"
    shutil.copytree(cold_build.out, out)
    monkeypatch.setenv("EDGEPACK_CACHE", str(cold_build.cache))
    again = cli("build", path, "-o", out)
    assert again.exit_code == 0, again.stderr
    stages = read_json(out / "manifest.json")["stages"]
    assert stages and all(s["reused"] for s in stages)
    assert f"{len(stages)}/{len(stages)} stages reused" in again.stdout
    assert cli("verify", out).exit_code == 0


def check_profiles_are_the_bundles_own(out: Path, report: dict) -> None:
    from edgepack.profiles.measure import peak_rss_mb

    profiles = {name: read_json(out / "profiles" / f"{name}.json") for name in ("int4", "int4.ort-mobile")}
    for profile in profiles.values():
        # Measured in a fresh process (the build ran in this one): peak RSS is that process's, below this one's.
        assert profile["host"]["pid"] != os.getpid()
        assert 0 < profile["host"]["peak_rss_mb"] < peak_rss_mb()
    # The ort-mobile bundle is measured and projected from its own .ort, not from the ort bundle.
    mobile = profiles["int4.ort-mobile"]
    assert Path(mobile["model"]["dir"]).name == "out" and (Path(mobile["model"]["dir"]) / "model.ort").is_file()
    assert mobile["model"]["facts"]["file_bytes"] == (out / "targets/ort-mobile/int4/model.ort").stat().st_size
    assert mobile["model"]["facts"] != profiles["int4"]["model"]["facts"]
    for target, name in (("ort", "int4"), ("ort-mobile", "int4.ort-mobile")):
        host = next(r for r in report["summary"] if (r["scheme"], r["target"], r["device"]) == ("int4", target, "host"))
        assert host["decode_ms_per_token"] == profiles[name]["host"]["by_prompt_len"][0]["decode_ms_per_token"]["p50"]
        assert host["peak_memory_mb"] == profiles[name]["host"]["peak_rss_mb"]
        pixel = next(r for r in report["summary"] if (r["scheme"], r["target"], r["device"]) == ("int4", target, "pixel-8"))
        assert pixel["decode_ms_per_token"] == profiles[name]["projections"]["pixel-8"]["by_prompt_len"][0]["decode_ms_per_token"]


def test_failing_budget_exits_1_with_junit_failures(cold_build, tmp_path, tiny_model_factory, monkeypatch, cli):
    # The budget is checked after the cached stages: with `cold_build`'s cache only the check and bundle run again.
    monkeypatch.setenv("EDGEPACK_CACHE", str(cold_build.cache))
    path, out = recipe(tmp_path, tiny_model_factory, decode_budget=0.000001), tmp_path / "bundle"
    result = cli("build", path, "-o", out)
    assert result.exit_code == 1
    assert "max_decode_ms_per_token" in result.stderr_lines[-1]
    report = read_json(out / "report.json")
    validate_report(report)
    assert report["passed"] is False
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite[@name='edgepack.budgets']")
    failures = suite.findall("testcase/failure")
    assert len(failures) == int(suite.get("failures")) == 4  # the decode budget, for each scheme's ort and ort-mobile
    # The report, junit.xml and the error line come from the same gate values: one message each.
    junit = ET.parse(out / "junit.xml").getroot()
    messages = [failure.get("message") for failure in junit.iter("failure")]
    assert messages == report["failures"] and all(m.startswith("budget, ") for m in messages)
    assert messages[0] in result.stderr_lines[-1]
    targets = junit.find("testsuite[@name='edgepack.targets']")
    assert int(targets.get("tests")) > 0 and targets.get("failures") == "0"  # one case per check in each target.json
    assert cli("verify", out).exit_code == 0  # a failing verdict is still a complete bundle


def test_a_target_failing_in_a_worker_process_is_one_line_and_leaves_no_bundle(cold_build, tmp_path, tiny_model_factory, cache, cli):
    # --jobs 2 builds targets in worker processes; the worker's error must reach the user as the same
    # one-line message and exit code as without workers. (The export is `cold_build`'s: the same [model].)
    seed_cache(cold_build, cache, ("convert",))
    path, out = tmp_path / "edgepack.toml", tmp_path / "bundle"
    path.write_text(f'[model]\nsource = "{tiny_model_factory("llama")}"\n\n[targets.qnn]\nmax_context = 32\n\n'
                    '[targets.ort]\nmax_context = 32\ngraph = "optimum"\n')
    for jobs in ("2", "1"):
        result = cli("build", path, "-o", out, "--jobs", jobs)
        assert result.exit_code == 2, result.stderr
        assert "needs the SoC to compile for" in result.stderr_lines[-1] and "Traceback" not in result.stderr
        assert not out.exists()


def test_kill_9_leaves_no_bundle_and_the_rerun_completes(cold_build, tmp_path, tiny_model_factory, cache):
    path, out = recipe(tmp_path, tiny_model_factory), tmp_path / "bundle"
    seed_cache(cold_build, cache, ("convert", "quantize"))  # `cold_build`'s: the build starts on its targets
    env = {**os.environ, "EDGEPACK_CACHE": str(cache)}
    process = subprocess.Popen([sys.executable, "-m", "edgepack", "build", str(path), "-o", str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((cache / "build").glob("*/*.tmp-*")):
        time.sleep(0.1)  # kill in the middle of a stage: while a target or profile entry is being written
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists() or subprocess.run([sys.executable, "-m", "edgepack", "verify", str(out)], env=env).returncode != 0
    leftovers = [p for p in (cache / "build").rglob("*.tmp-*")]
    for p in leftovers:  # a killed stage leaves only its temporary folder, never a half entry
        assert not (p / ".complete").exists()
    rerun = subprocess.run([sys.executable, "-m", "edgepack", "build", str(path), "-o", str(out)], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert subprocess.run([sys.executable, "-m", "edgepack", "verify", str(out)], env=env).returncode == 0
    # The rerun removes what the killed build left in the cache.
    assert not [p for p in (cache / "build").glob("*/*") if ".tmp-" in p.name or ".old-" in p.name]
    # Each stage's temporary entry is reported once; staging folders inside it go with it.
    top = [p for p in leftovers if p.parent.parent == cache / "build"]
    assert all(f"removed {p.relative_to(cache / 'build')}" in " ".join(rerun.stderr.split()) for p in top), (top, rerun.stderr)


def test_report_html_renders_in_chromium(cold_build, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)")
    out = cold_build.out
    assert cold_build.result.exit_code == 0, cold_build.result.stderr
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # self-contained
    assert html.count("data:image/png;base64,") >= 3  # size/quality, latency per device, decode vs context
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,1600", f"--screenshot={shot}",
                    (out / "report.html").as_uri()], check=True, capture_output=True, timeout=120)
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1280, 1600)
    histogram = image.histogram()
    dark = sum(histogram[:128])
    assert dark > 0.01 * image.size[0] * image.size[1], "the screenshot is blank"


def test_targets_with_their_own_compression_get_a_summary_row():
    # coreml and qnn convert the fp32 weights themselves: their row shows their own precision and the
    # quality of their parity check, and says that no latency figure exists for them here.
    from edgepack.report.summary import _own_compression_row, scheme_label, target_label

    qnn = {"total_bytes": 380_000_000, "passed": True,
           "facts": {"precision": "w8a16", "device": "galaxy-s24"},
           "checks": {"all_nodes_on_htp": {"passed": True},
                      "parity_vs_fp32": {"top1_agreement": 0.917, "kl_mean": 0.012, "passed": True}}}
    row = _own_compression_row("qnn", "fp32", qnn)
    assert (row["precision"], row["device"], row["top1_agreement"], row["kl_mean"]) == ("w8a16", "galaxy-s24", 0.917, 0.012)
    assert row["size_mb"] == 380.0 and row["figure_kind"] == "missing" and row["decode_ms_per_token"] is None
    assert row["budgets"] == 0 and row["verdict"] == "pass"
    assert scheme_label(row) == "fp32 -> w8a16"

    coreml = {"total_bytes": 95_000_000, "passed": False,
              "facts": {"compute_precision": "fp16", "compression": {"name": "int4-block"}},
              "checks": {"parity": {"top1_agreement": 0.5, "kl_mean": 0.3, "passed": False}}}
    row = _own_compression_row("coreml", "fp32", coreml)
    assert row["precision"] == "int4-block" and row["verdict"] == "fail" and row["device"] is None and row["ane"] is None
    coreml["facts"]["ane"] = {"neural_engine": "partial"}
    assert target_label(_own_compression_row("coreml", "fp32", coreml)) == "coreml (ANE partial)"
    assert scheme_label({"scheme": "gguf", "precision": "gguf"}) == "gguf"


def test_two_cold_builds_give_the_same_bytes_except_what_the_manifest_names(cold_build, tmp_path, tiny_model_factory, monkeypatch, cli):
    # Issue #8 point 5: a rebuild from a cold cache reproduces the model files byte for byte, or the
    # manifest says which file does not and why.
    path = tmp_path / "edgepack.toml"
    path.write_text(RECIPE.format(source=tiny_model_factory("llama"), decode_budget=1000)
                    + '\n[targets.coreml]\nmax_context = 32\ncompute_units = "cpu_and_ne"\nprefill_chunk = 8\n'
                    + '\n[targets.qnn]\nsoc_model = 57\nhtp_arch = 75\nmax_context = 32\nprefill_len = 8\n'
                    + '\n[budgets.iphone-15-pro]\nmax_decode_ms_per_token = 1000\n\n[budgets.galaxy-s24]\nmax_decode_ms_per_token = 0.001\n')
    # The first build's RECIPE stages are `cold_build`'s, each made on a cold cache (this build adds its coreml and
    # qnn entries to that cache, which no other test reads); the second build makes every stage from nothing.
    manifests = []
    for run, cache in ((1, cold_build.cache), (2, tmp_path / "cache2")):
        monkeypatch.setenv("EDGEPACK_CACHE", str(cache))
        result = cli("build", path, "-o", tmp_path / f"bundle{run}", "--jobs", "2")
        assert result.exit_code == 1, result.stderr  # the galaxy-s24 budget is broken on purpose (below)
        manifests.append(read_json(tmp_path / f"bundle{run}" / "manifest.json"))
    # The Neural Engine package's report verdict is in its summary row, the table and report.html.
    report = read_json(tmp_path / "bundle2" / "report.json")
    validate_report(report)
    coreml = next(row for row in report["summary"] if row["target"] == "coreml")
    assert coreml["ane"] == "ready" and all(row.get("ane") is None for row in report["summary"] if row["target"] != "coreml")
    assert "coreml (ANE ready)" in result.stdout and "coreml (ANE ready)" in (tmp_path / "bundle2" / "report.html").read_text()
    # Core ML and QNN are projected onto the devices whose unit runs them, and checked against their budgets.
    own = {(row["target"], row["device"]): row for row in report["summary"] if row["target"] in ("coreml", "qnn")}
    assert set(own) == {("coreml", "iphone-15-pro"), ("qnn", "galaxy-s24")}
    for row in own.values():
        assert row["figure_kind"] == "projected" and row["decode_ms_per_token"] > 0 and row["energy_mj_per_token"] > 0
        assert row["ttft_ms"] > 0 and row["peak_memory_mb"] > 0 and row["budgets"] == 1
    assert own[("coreml", "iphone-15-pro")]["verdict"] == "pass" and own[("qnn", "galaxy-s24")]["verdict"] == "fail"
    profiles = {p.name: read_json(p) for p in (tmp_path / "bundle2" / "profiles").glob("*.json")}
    assert profiles["fp32.coreml.json"]["projections"]["iphone-15-pro"]["unit"] == "ane"
    assert profiles["fp32.qnn.json"]["projections"]["galaxy-s24"]["unit"] == "htp"
    assert "pixel-8" in profiles["fp32.coreml.json"]["not_projected"]
    assert any("fp32.qnn" in line and "galaxy-s24.max_decode_ms_per_token" in line for line in report["failures"])
    first, second = manifests
    declared = {entry["path"]: entry["reason"] for entry in first["not_reproducible"]}
    assert declared == {entry["path"]: entry["reason"] for entry in second["not_reproducible"]}
    assert all(reason for reason in declared.values())
    differing = {name for name, record in first["files"].items() if record["sha256"] != second["files"][name]["sha256"]}
    assert differing <= set(declared), sorted(differing - set(declared))
    models = [name for name in first["files"] if name.endswith((".onnx", ".bin", ".mlmodel", ".ort", ".data"))]
    assert any(name.startswith("targets/qnn/") and name.endswith(".bin") for name in models)
    reproduced = [name for name in models if name not in declared]
    assert reproduced and all(first["files"][n]["sha256"] == second["files"][n]["sha256"] for n in reproduced)
    # Only the ORT-format file (address-ordered table) and the dated Core ML spec may differ among model files.
    assert {name.rsplit("/", 1)[-1] for name in models if name in declared} <= {"model.ort", "model.mlmodel"}


def test_parallel_targets_wait_while_their_memory_is_held():
    import threading

    from edgepack.build import MemoryAdmission

    waits, order = [], []
    admission = MemoryAdmission(budget=10, need=6, on_wait=waits.append)
    first_in, release_first = threading.Event(), threading.Event()

    def first():
        with admission.reserve("qnn/fp32"):
            order.append("first starts")
            first_in.set()
            release_first.wait(10)
            order.append("first ends")

    def second():
        first_in.wait(10)
        with admission.reserve("coreml/fp32"):
            order.append("second starts")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    deadline = time.time() + 10
    while not waits and time.time() < deadline:
        time.sleep(0.01)
    assert order == ["first starts"]  # 6 + 6 > 10: the second waits
    release_first.set()
    for thread in threads:
        thread.join(10)
    assert order == ["first starts", "first ends", "second starts"]
    assert waits == ["coreml/fp32 waits for memory: it may need 0.0 GB and the targets running hold 0.0 GB of the 0.0 GB available"]
    assert admission.reserved == 0


def test_a_target_larger_than_the_budget_runs_alone_and_an_unknown_budget_admits_all():
    from edgepack.build import MemoryAdmission

    alone = MemoryAdmission(budget=4, need=6)
    with alone.reserve("qnn/fp32"):
        assert alone.reserved == 6
    unknown = MemoryAdmission(budget=None, need=6)
    with unknown.reserve("a"), unknown.reserve("b"):
        assert unknown.reserved == 12


def test_available_memory_and_weight_bytes(tmp_path):
    from edgepack.build import available_memory, model_weight_bytes

    assert available_memory() > 0
    (tmp_path / "model.onnx").write_bytes(b"x" * 10)
    (tmp_path / "model.onnx.data").write_bytes(b"x" * 100)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 1000)
    assert model_weight_bytes(tmp_path) == 110


def test_a_build_on_too_little_memory_for_two_targets_builds_them_one_at_a_time(cold_build, tmp_path, cache, cli):
    seed_cache(cold_build, cache, ("convert", "quantize"))
    out = tmp_path / "bundle"
    result = cli("build", cold_build.recipe, "-o", out, "--jobs", "2", "--max-memory-gb", "0.000001", "--only", "target")
    assert result.exit_code == 0, result.stderr
    assert "waits for memory" in result.stderr
    log = [line for line in result.stderr_lines if line.startswith("target ")]
    assert len(log) == 4 and all("built in" in line for line in log), log
