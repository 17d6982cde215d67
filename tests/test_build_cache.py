"""The build's stage cache: every entry carries a manifest of its files, checked on reuse; a corrupted,
incomplete or pre-manifest entry is rebuilt and the build says so; temporary entries of killed builds
are removed by the next build."""

from __future__ import annotations

import json
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
