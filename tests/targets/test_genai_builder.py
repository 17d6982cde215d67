"""onnxruntime-genai's builder subprocess: a disk that cannot take its output is an output error, not the model's."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from edgepack.targets.genai_builder import builder_python

needs_builder = pytest.mark.skipif(builder_python() is None, reason="onnxruntime-genai builder env not set up (scripts/setup.sh)")


def _assert_blames_the_disk(result, out, *fragments):
    assert result.exit_code == 2, result.stderr
    (line,) = result.stderr_lines
    assert line.startswith(f"error: cannot write {out.parent}/"), line
    assert "onnxruntime-genai's builder wrote the graph there" in line
    for fragment in fragments:
        assert fragment in line, line
    assert "failed on" not in line  # the old message blamed the model
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "no staging folder may be left"


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KB tmpfs: room for the builder's small files, not for the tiny llama's 0.6 MB of weights."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@needs_builder
def test_full_disk_under_the_builder_is_an_output_error(exported_tiny_factory, small_disk, cli):
    out = small_disk / "ort"
    result = cli("target", "ort", exported_tiny_factory("llama"), "-o", out, "--graph", "builder")
    _assert_blames_the_disk(result, out, "No space left on device (ENOSPC, errno 28)")


@needs_builder
def test_file_size_limit_under_the_builder_is_an_output_error(exported_tiny_factory, tmp_path, cli, monkeypatch):
    """The same rule through a limit any user can set: `ulimit -f` makes the builder's writes fail with EFBIG."""
    wrapper = tmp_path / "python-with-ulimit"
    wrapper.write_text(f"#!/bin/bash\ntrap '' XFSZ\nulimit -f 100\nexec {builder_python()} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("EDGEPACK_GENAI_BUILDER_PYTHON", str(wrapper))
    out = tmp_path / "ort"
    result = cli("target", "ort", exported_tiny_factory("llama"), "-o", out, "--graph", "builder")
    _assert_blames_the_disk(result, out, "File too large (EFBIG, errno 27)")


@needs_builder
def test_a_model_the_builder_cannot_read_is_still_the_model(exported_tiny_factory, tiny_model_factory, tmp_path, cli):
    """An OSError about the input (weights missing) must not be mistaken for a disk problem."""
    hf = tmp_path / "hf"
    shutil.copytree(tiny_model_factory("llama"), hf)
    (hf / "model.safetensors").unlink()
    from edgepack.errors import UnsupportedModelError
    from edgepack.targets.genai_builder import run_builder

    with pytest.raises(UnsupportedModelError, match="builder failed on"):
        run_builder(hf, tmp_path / "built")
