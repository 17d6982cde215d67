"""Output folders: what edgepack may replace, leftovers of killed runs, concurrent replacement, OS errors."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgepack.errors import BadInputError, OutputError, classify
from edgepack.outputs import declare_output, edgepack_kind, reset_declared_outputs

ROOT = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def _fresh_declarations():
    reset_declared_outputs()
    yield
    reset_declared_outputs()


def _webapp(folder: Path) -> Path:
    """A user's folder that happens to hold a manifest.json (a web app manifest)."""
    (folder / "src").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"name": "app"}))
    (folder / "src" / "app.js").write_text("code\n")
    return folder


def _recipe(tmp_path, tiny_model_factory) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(f'[model]\nsource = "{tiny_model_factory("llama")}"\n')
    return path


def test_build_never_deletes_a_folder_that_merely_holds_a_manifest_json(tmp_path, tiny_model_factory, cli, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    out = _webapp(tmp_path / "m" / "webapp")
    result = cli("build", _recipe(tmp_path, tiny_model_factory), "-o", out)
    assert result.exit_code == 2, result.stderr
    assert result.stderr_lines[-1].startswith("error: ") and "--force" in result.stderr_lines[-1]
    assert (out / "src" / "app.js").read_text() == "code\n"
    assert json.loads((out / "manifest.json").read_text()) == {"name": "app"}
    assert not (tmp_path / "cache" / "build").exists(), "refused before any stage ran"


def test_build_replaces_its_own_bundle_but_not_one_with_the_users_files_in_it(tmp_path, tiny_model_factory, cli, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    recipe, out = _recipe(tmp_path, tiny_model_factory), tmp_path / "bundle"
    assert cli("build", recipe, "-o", out, "--only", "convert").exit_code == 0
    assert edgepack_kind(out) == "edgepack.manifest"
    assert cli("build", recipe, "-o", out, "--only", "convert").exit_code == 0  # its own bundle: replaced
    (out / "NOTES.md").write_text("my release notes\n")  # now the folder holds something the manifest does not list
    assert edgepack_kind(out) is None
    result = cli("build", recipe, "-o", out, "--only", "convert")
    assert result.exit_code == 2 and "not an edgepack bundle" in result.stderr_lines[-1], result.stderr
    assert (out / "NOTES.md").read_text() == "my release notes\n"
    result = cli("build", recipe, "-o", out, "--only", "convert", "--force")  # --force names it: replaced
    assert result.exit_code == 0, result.stderr
    assert not (out / "NOTES.md").exists() and cli("verify", out).exit_code == 0


def test_edgepack_kind_needs_edgepacks_own_report(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    assert edgepack_kind(folder) is None
    (folder / "convert.json").write_text(json.dumps({"kind": "someone.else"}))
    assert edgepack_kind(folder) is None
    (folder / "convert.json").write_text("{broken")
    assert edgepack_kind(folder) is None
    (folder / "convert.json").write_text(json.dumps({"kind": "edgepack.convert"}))
    assert edgepack_kind(folder) == "edgepack.convert"
    (folder / "manifest.json").write_text(json.dumps({"kind": "edgepack.manifest", "files": {}}))
    assert edgepack_kind(folder) is None  # a manifest that does not list convert.json: not a bundle


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_dead_processes_are_removed_and_a_live_ones_staging_is_kept(tmp_path, exported_tiny_factory, cli):
    out = tmp_path / "q"
    dead = _dead_pid()
    for name in (f".q.tmp-{dead}", f".q.old-{dead}"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "model.onnx").write_bytes(b"half")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".q.tmp-{sleeper.pid}"
        live.mkdir()
        (tmp_path / f".other.tmp-{dead}").mkdir()  # another OUT's leftover: not this run's business
        result = cli("quantize", exported_tiny_factory("llama"), "-o", out, "--no-eval")
        assert result.exit_code == 0, result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".other.tmp-" + str(dead), live.name, "q"])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_kill_9_leftovers_are_cleaned_by_the_next_run(tmp_path, tiny_model_factory, cli):
    out = tmp_path / "export"
    process = subprocess.Popen([sys.executable, "-m", "edgepack", "convert", str(tiny_model_factory("llama")), "-o", str(out), "--no-verify"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / f".export.tmp-{process.pid}"
    deadline = time.time() + 120
    while time.time() < deadline and not (staging.is_dir() and any(staging.iterdir())):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert staging.is_dir(), "the kill came while the export was being staged"
    result = cli("convert", tiny_model_factory("llama"), "-o", out, "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


REPLACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from edgepack.outputs import prepare_output, replace_dir, staging_dir
    out, start, rounds, tag = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    while time.time() < start:
        pass
    for i in range(rounds):
        prepare_output(out, True)
        with staging_dir(out) as tmp:
            (tmp / "who").write_text(f"{tag} {i}")
            (tmp / "payload").write_bytes(b"x" * 4096)
            replace_dir(tmp, out)
""")


def test_two_processes_replacing_the_same_out_at_once_both_succeed(tmp_path):
    out = tmp_path / "bundle"
    start = time.time() + 2.0  # both start spinning, then go at the same instant
    processes = [subprocess.Popen([sys.executable, "-c", REPLACER, str(out), str(start), "150", tag], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in processes]
    assert all(code == 0 for code, _ in results), results
    assert sorted(p.name for p in out.iterdir()) == ["payload", "who"]
    assert (out / "who").read_text() in ("a 149", "b 149")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"], "no staging or trash folder left"


# ----------------------------------------------------------------------------- OS errors -> exit codes


def _raised(action) -> BaseException:
    try:
        action()
    except BaseException as exc:  # noqa: BLE001 - the real exception is what we classify
        return exc
    raise AssertionError("the operation did not fail")


def test_a_full_device_is_an_output_error_naming_the_declared_output(tmp_path):
    out = declare_output(tmp_path / "out")

    def write_full():
        with open("/dev/full", "w") as handle:  # ENOSPC on every write, no path in the exception
            handle.write("x" * 100000)

    exc = _raised(write_full)
    assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    mapped = classify(exc)
    assert isinstance(mapped, OutputError) and mapped.exit_code == 2
    assert str(out) in mapped.message and "No space left on device" in mapped.message


def test_os_errors_name_the_path_and_tell_outputs_from_inputs(tmp_path):
    (tmp_path / "afile").write_text("x")
    out = declare_output(tmp_path / "afile" / "out")
    mapped = classify(_raised(lambda: os.mkdir(tmp_path / "afile" / ".out.tmp-1")))  # ENOTDIR while staging
    assert isinstance(mapped, OutputError) and mapped.exit_code == 2 and str(out) in mapped.message

    mapped = classify(_raised(lambda: open(tmp_path / "nope.txt").read()))  # reading an input that is not there
    assert isinstance(mapped, BadInputError) and mapped.exit_code == 3 and "nope.txt" in mapped.message
    mapped = classify(_raised(lambda: open(tmp_path).read()))  # a folder where a file was expected
    assert mapped.exit_code == 3 and "is a folder" in mapped.message
    mapped = classify(_raised(lambda: os.mkdir("/proc/edgepack-probe")))  # /proc takes no new entries
    assert mapped is not None and mapped.exit_code in (2, 3) and "/proc/edgepack-probe" in mapped.message


def test_a_bug_stays_a_bug():
    assert classify(_raised(lambda: b"\xff".decode())) is None
    assert classify(_raised(lambda: {}["missing"])) is None
    assert classify(_raised(lambda: None.attribute)) is None


def test_onnx_parse_errors_are_bad_input(tmp_path):
    import onnx

    path = tmp_path / "model.onnx"
    path.write_bytes(b"\xff\xfe" * 50)
    mapped = classify(_raised(lambda: onnx.load(str(path))))
    assert isinstance(mapped, BadInputError) and mapped.exit_code == 3

    import onnxruntime as ort

    mapped = classify(_raised(lambda: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])))
    assert isinstance(mapped, BadInputError) and str(path) in mapped.message


def test_a_missing_file_of_edgepack_itself_is_a_bug_not_bad_input():
    import edgepack

    own = Path(edgepack.__file__).parent / "profiles" / "devices" / "no-such-device.toml"
    assert classify(_raised(lambda: own.read_text())) is None
