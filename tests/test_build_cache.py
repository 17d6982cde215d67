"""The build's stage cache: every entry carries a manifest of its files, checked on reuse; a corrupted,
incomplete or pre-manifest entry is rebuilt and the build says so; temporary entries of killed builds
are removed by the next build."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.build import StageCache
from tests.conftest import read_json

WEIGHTS = bytes(range(256)) * 512


def _produce(calls: list):
    def produce(out: Path) -> None:
        calls.append(out)
        out.mkdir()
        (out / "model.onnx").write_bytes(b"graph")
        (out / "model.onnx.data").write_bytes(WEIGHTS)

    return produce


def _flip_one_byte(path: Path, at: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01  # same size: only the hash can tell
    path.write_bytes(bytes(data))


def test_an_untouched_entry_is_reused_and_its_manifest_lists_every_file(tmp_path):
    cache, calls = StageCache(tmp_path), []
    path, reused, rebuilt = cache.run("target", "k1", _produce(calls))
    assert (reused, rebuilt, len(calls)) == (False, None, 1)
    manifest = json.loads((cache.entry("target", "k1") / ".complete").read_text())
    assert set(manifest["files"]) == {"out/model.onnx", "out/model.onnx.data"}
    assert manifest["files"]["out/model.onnx.data"]["bytes"] == len(WEIGHTS)
    path2, reused, rebuilt = cache.run("target", "k1", _produce(calls))
    assert (path2, reused, rebuilt, len(calls)) == (path, True, None, 1)


def test_a_flipped_byte_in_a_cached_file_is_rebuilt_and_reported(tmp_path):
    cache, calls = StageCache(tmp_path), []
    path, _, _ = cache.run("target", "k1", _produce(calls))
    _flip_one_byte(path / "model.onnx.data")
    path, reused, rebuilt = cache.run("target", "k1", _produce(calls))
    assert not reused and len(calls) == 2
    assert rebuilt == "cache entry corrupted (changed: out/model.onnx.data); rebuilt"
    assert (path / "model.onnx.data").read_bytes() == WEIGHTS
    assert not list(tmp_path.glob("target/k1.*-*"))  # no temporary or replaced entry left behind
    assert cache.run("target", "k1", _produce(calls))[1:] == (True, None)


@pytest.mark.parametrize("damage, expected", [
    (lambda out: (out / "model.onnx.data").unlink(), "cache entry corrupted (missing: out/model.onnx.data)"),
    (lambda out: (out / "stray.bin").write_bytes(b"x"), "cache entry corrupted (extra: out/stray.bin)"),
    (lambda out: (out / "model.onnx.data").write_bytes(WEIGHTS[:-1]), "cache entry corrupted (changed: out/model.onnx.data)"),
    (lambda out: ((out / "model.onnx").unlink(), (out / "model.onnx").symlink_to(out / "model.onnx.data")),
     "cache entry corrupted (changed: out/model.onnx)"),
    (lambda out: (out.parent / ".complete").unlink(), "cache entry incomplete (no manifest)"),
    # An entry written before entries had manifests: its marker holds only a date.
    (lambda out: (out.parent / ".complete").write_text("2026-01-01T00:00:00\n"), "cache entry has no file manifest (written by an older edgepack)"),
], ids=["missing", "extra", "truncated", "symlink", "no-marker", "old-marker"])
def test_a_damaged_or_unverifiable_entry_is_rebuilt(tmp_path, damage, expected):
    cache, calls = StageCache(tmp_path), []
    path, _, _ = cache.run("convert", "k2", _produce(calls))
    damage(path)
    path, reused, rebuilt = cache.run("convert", "k2", _produce(calls))
    assert (reused, rebuilt, len(calls)) == (False, f"{expected}; rebuilt", 2)
    assert sorted(p.name for p in path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert (path / "model.onnx.data").read_bytes() == WEIGHTS


def test_temporary_entries_of_killed_builds_are_removed_but_not_those_of_a_running_build(tmp_path):
    cache = StageCache(tmp_path)
    fresh = tmp_path / "target" / "aaaa.tmp-4242"  # a build killed a minute ago
    fresh.mkdir(parents=True)
    (fresh / "out").mkdir()
    (fresh / "out" / "model.onnx.data").write_bytes(WEIGHTS)
    replaced = tmp_path / "quantize" / "bbbb.old-4243"  # killed while swapping in a rebuilt entry
    replaced.mkdir(parents=True)
    running = tmp_path / "target" / "cccc.tmp-4244"
    running.mkdir()
    # A live build holds the entry lock while it writes its temporary folder.
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; h = open(sys.argv[1], 'a'); "
                               "fcntl.flock(h, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(tmp_path / "target" / "cccc.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        removed = cache.remove_stale()
    finally:
        holder.kill()
        holder.wait()
    assert sorted(removed) == sorted([fresh, replaced])
    assert not fresh.exists() and not replaced.exists() and running.is_dir()
    assert cache.remove_stale() == [running]  # its build is gone now


def test_build_rebuilds_a_corrupted_entry_instead_of_shipping_it(tmp_path, tiny_model_factory, monkeypatch, cli):
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEPACK_CACHE", str(cache))
    recipe, out = tmp_path / "edgepack.toml", tmp_path / "bundle"
    recipe.write_text(f'[model]\nsource = "{tiny_model_factory("llama")}"\n\n[targets.ort-mobile]\n')
    assert cli("build", recipe, "-o", out).exit_code == 0
    shipped = read_json(out / "manifest.json")["files"]["targets/ort-mobile/fp32/model.ort"]
    entries = list((cache / "build" / "target").glob("*/out/model.ort"))
    assert len(entries) == 1
    _flip_one_byte(entries[0])
    from edgepack.sources import file_sha256

    corrupted = file_sha256(entries[0])
    assert corrupted != shipped["sha256"]
    stale = entries[0].parents[1].with_name(entries[0].parents[1].name + ".tmp-999999")  # as kill -9 leaves it
    (stale / "out").mkdir(parents=True)

    result = cli("build", recipe, "-o", out)
    assert result.exit_code == 0, result.stderr
    log = " ".join(result.stderr.split())  # the console wraps long lines
    assert "ort-mobile/fp32 cache entry corrupted (changed: out/model.ort); rebuilt in" in log
    assert f"removed target/{stale.name}, left by a build that was killed" in log
    assert not stale.exists()
    manifest = read_json(out / "manifest.json")
    # model.ort is not byte-reproducible (see manifest.json's not_reproducible): the rebuilt file is
    # checked against the rebuilt cache entry, and it must not be the corrupted one.
    assert manifest["files"]["targets/ort-mobile/fp32/model.ort"]["sha256"] not in (corrupted, None)
    assert manifest["files"]["targets/ort-mobile/fp32/model.ort"]["sha256"] == file_sha256(entries[0])
    target_stage = next(s for s in manifest["stages"] if s["stage"] == "target")
    assert target_stage["reused"] is False and target_stage["rebuilt"].startswith("cache entry corrupted")
    assert cli("verify", out).exit_code == 0
    again = cli("build", recipe, "-o", out)
    assert again.exit_code == 0 and "2/2 stages reused" in again.stdout


# ------------------------------------------------------------------------------------ stage cache keys
# Each stage's key covers its payload, the versions of the packages it declares and the source of the
# modules it uses (its entry modules and the edgepack modules they import), computed here over a copy of
# the package so that its files can be edited.


def _package_copy(tmp_path) -> Path:
    from edgepack.build import PACKAGE_ROOT

    copy = tmp_path / "edgepack"
    shutil.copytree(PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _declarations() -> dict:
    from edgepack.build import CONVERT, PROFILE, QUANTIZE, target_declaration
    from edgepack.targets import TARGETS

    declarations = {"convert": CONVERT, "quantize": QUANTIZE, "profile": PROFILE}
    declarations.update({f"target {name}": target_declaration(name, module, {}) for name, module in TARGETS.items()})
    return declarations


def _keys(root: Path, versions: dict) -> dict[str, str]:
    from edgepack.build import compute_key, module_sources

    payload = {"source": "0123", "options": {}}
    return {name: compute_key(declaration, payload, versions[name], module_sources(declaration.modules, root))
            for name, declaration in _declarations().items()}


def _versions() -> dict[str, dict]:
    from edgepack.build import stage_versions

    return {name: stage_versions(declaration) for name, declaration in _declarations().items()}


def _edit_a_comment(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("# "))
    lines[at] = lines[at].rstrip("\n") + " (reworded)\n"
    path.write_text("".join(lines))


def test_a_comment_edited_in_the_qnn_target_changes_the_qnn_key_only(tmp_path):
    from edgepack.build import PACKAGE_ROOT

    copy, versions = _package_copy(tmp_path), _versions()
    before = _keys(copy, versions)
    assert before == _keys(PACKAGE_ROOT, versions)  # the copy hashes as the installed package does
    assert len(set(before.values())) == len(before)
    _edit_a_comment(copy / "targets" / "qnn.py")
    after = _keys(copy, versions)
    assert {name for name in before if before[name] != after[name]} == {"target qnn"}
    # A module the QNN target shares with the other stages re-runs each stage that imports it.
    _edit_a_comment(copy / "core" / "windows.py")
    shared = _keys(copy, versions)
    # (the text windows and the vocabulary check: read by every stage that tokenizes text, ort-mobile excepted)
    assert {name for name in after if after[name] != shared[name]} == {"convert", "quantize", "profile", "target ort", "target coreml",
                                                                        "target qnn", "target executorch"}
    # So do the package's data files that a stage reads (the bundled calibration and evaluation texts).
    data = next((copy / "quantize" / "data").glob("*.txt"))
    data.write_text(data.read_text() + "\n")
    edited = _keys(copy, versions)
    assert edited["quantize"] != shared["quantize"] and edited["convert"] == shared["convert"]


def test_a_changed_coremltools_version_changes_the_core_ml_key_only(tmp_path, monkeypatch):
    from importlib import metadata

    root = _package_copy(tmp_path)
    before = _keys(root, _versions())
    installed = metadata.version

    def upgraded(name):
        return "99.0" if name == "coremltools" else installed(name)

    monkeypatch.setattr(metadata, "version", upgraded)
    after = _keys(root, _versions())
    # (executorch's Core ML delegate converts with coremltools too)
    assert {name for name in before if before[name] != after[name]} == {"target coreml", "target executorch"}


def test_every_package_a_stage_imports_is_declared():
    # The modules a stage uses (found the way the key finds them) import only packages the stage declares
    # (click and rich only draw the console). An import name is taken as its distribution's name.
    import ast
    from importlib import metadata

    from edgepack.build import PACKAGE_ROOT, module_sources

    top_level: dict[str, set] = {}  # module file -> the top-level names it imports

    def imports(path: str, source: bytes) -> set:
        if path not in top_level:
            top_level[path] = set()
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Import):
                    top_level[path].update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    top_level[path].add(node.module.split(".")[0])
        return top_level[path]

    for name, declaration in _declarations().items():
        imported = set()
        for path, source in module_sources(declaration.modules, PACKAGE_ROOT).items():
            if path.endswith(".py"):
                imported |= imports(path, source)
        needed = set()
        for module in imported - set(sys.stdlib_module_names) - {"click", "rich", "edgepack"}:
            try:
                metadata.version(module.replace("_", "-"))
            except metadata.PackageNotFoundError:
                continue  # not a distribution's name (a module inside one, such as onnxruntime's flatbuffers)
            needed.add(module.replace("_", "-"))
        assert needed and needed <= set(declaration.packages), (name, sorted(needed - set(declaration.packages)))


def test_the_ort_key_follows_the_builder_environment_only_when_the_builder_may_run():
    from edgepack.build import target_declaration

    assert "genai-builder:onnxruntime-genai" in target_declaration("ort", "edgepack.targets.ort", {"graph": "auto"}).packages
    assert "genai-builder:onnxruntime-genai" not in target_declaration("ort", "edgepack.targets.ort", {"graph": "optimum"}).packages
    assert "qnn-sdk" in target_declaration("qnn", "edgepack.targets.qnn", {}).packages


def test_a_build_over_an_edited_package_reuses_every_stage_the_edit_does_not_touch(tmp_path, tiny_model_factory, exported_tiny_factory,
                                                                                     monkeypatch, cli):
    # The real build, its key computed over a copy of the package: a comment edited in the QNN target
    # leaves the convert and ort-mobile entries valid; one edited in the ort-mobile target rebuilds that
    # target only.
    import edgepack.build
    from edgepack.build import CONVERT, convert_payload, stage_key

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    source = str(tiny_model_factory("llama"))
    recipe, out = tmp_path / "edgepack.toml", tmp_path / "bundle"
    recipe.write_text(f'[model]\nsource = "{source}"\n\n[targets.ort-mobile]\n')
    copy = _package_copy(tmp_path)
    monkeypatch.setattr(edgepack.build, "PACKAGE_ROOT", copy)
    # The session's export, in the cache where the build finds it.
    key = stage_key(CONVERT, convert_payload({"source": source}), root=copy)
    StageCache(tmp_path / "cache" / "build").run("convert", key, lambda o: shutil.copytree(exported_tiny_factory("llama"), o))
    assert cli("build", recipe, "-o", out).exit_code == 0
    _edit_a_comment(copy / "targets" / "qnn.py")
    result = cli("build", recipe, "-o", out)
    assert result.exit_code == 0 and "2/2 stages reused" in result.stdout, result.stdout
    _edit_a_comment(copy / "targets" / "ort_mobile.py")
    result = cli("build", recipe, "-o", out)
    assert result.exit_code == 0, result.stderr
    stages = {s["stage"]: s["reused"] for s in read_json(out / "manifest.json")["stages"]}
    assert stages == {"convert": True, "target": False}
