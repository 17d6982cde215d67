"""What reaches the user's terminal is edgepack's own output; the libraries' log lines go to a log file unless --debug.

The commands run in a subprocess (`python -m edgepack`) so that output written by native code straight to
file descriptors 1 and 2 (onnxruntime's C++ logger, the QNN backend libraries) is captured too.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
# stderr lines edgepack writes itself: one-line errors and the build's stage log.
OWN_STDERR = re.compile(r"^(error: .+|(convert|quantize|target|profile|check) +\S+ +(reused from cache|built in [0-9.]+ s))$")
# stdout: rich tables (title line, box drawing) and the build's closing line.
OWN_STDOUT = re.compile(r"^(edgepack \S+ .*|[\u2500-\u257f].*|\d+/\d+ stages reused from the cache; .+)$")


def run_edgepack(tmp_path: Path, *args, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           # An empty matplotlib cache: matplotlib logs the font cache it builds (INFO, shown once a library
           # has set the root logger to INFO).
           "MPLCONFIGDIR": str(tmp_path / "matplotlib")}
    env.pop("EDGEPACK_DEBUG", None)
    command = [sys.executable, "-m", "edgepack", *(["--debug"] if debug else []), *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def foreign_lines(result: subprocess.CompletedProcess) -> list[str]:
    """Lines on stdout or stderr that edgepack did not write."""
    stderr = [line for line in result.stderr.splitlines() if line.strip() and not OWN_STDERR.match(line.rstrip())]
    stdout = [line for line in result.stdout.splitlines() if line.strip() and not OWN_STDOUT.match(line.strip())]
    return stderr + stdout


def logs(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in sorted((tmp_path / "cache" / "logs").glob("*.log")))


def test_build_prints_only_its_own_lines(tmp_path, tiny_model_factory):
    # int8-static: onnxruntime's quantizer warns through the root logger ("WARNING:root:..."); int4 imports
    # onnxruntime's MatMulNBits quantizer, which calls logging.basicConfig(level=INFO) on import, so the
    # report's matplotlib then logs its font cache at INFO on stderr.
    recipe = tmp_path / "edgepack.toml"
    recipe.write_text(f'[model]\nsource = "{tiny_model_factory("llama")}"\n\n[[quantize]]\nscheme = "int8-static"\n\n'
                      '[[quantize]]\nscheme = "int4"\nalgorithm = "rtn"\n\n[evaluation]\ntokens = 32\n')
    result = run_edgepack(tmp_path, "build", recipe, "-o", tmp_path / "bundle")
    assert result.returncode == 0, result.stderr
    assert foreign_lines(result) == []
    assert "quantize int8-static" in result.stderr  # edgepack's own lines are still there
    assert "Please consider" in logs(tmp_path)  # the quantizer's warnings went to the log


def test_debug_shows_the_libraries_output(tmp_path, exported_tiny_factory):
    export = exported_tiny_factory("llama")
    # int8-dynamic: onnxruntime's quantizer warns through the root logger ("WARNING:root:...").
    quiet = run_edgepack(tmp_path, "quantize", export, "-o", tmp_path / "a", "--scheme", "int8-dynamic")
    loud = run_edgepack(tmp_path, "quantize", export, "-o", tmp_path / "b", "--scheme", "int8-dynamic", debug=True)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert foreign_lines(quiet) == []
    assert any(line.startswith("WARNING:root:") for line in foreign_lines(loud))


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_qnn") is None, reason="onnxruntime-qnn is not installed")
def test_qnn_native_prints_go_to_the_log(tmp_path, exported_tiny_factory):
    # The HTP backend library prints "# LIBNATIVE: ..." with C stdio when it loads: fd-level output.
    result = run_edgepack(tmp_path, "target", "qnn", exported_tiny_factory("llama"), "-o", tmp_path / "qnn",
                          "--device", "galaxy-s24", "--max-context", "32", "--prefill-len", "8", "--calibration-samples", "2",
                          "--rescue", "0", "--eval-windows", "1", "--decode-steps", "0", "--no-prefix")
    assert result.returncode in (0, 1), result.stderr
    assert foreign_lines(result) == []
    assert "LIBNATIVE" in logs(tmp_path)


def test_a_failure_names_the_log_when_libraries_wrote_to_it(tmp_path, monkeypatch):
    from edgepack._quiet import third_party_output
    from edgepack.errors import BadInputError, GateFailedError

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BadInputError) as failure, third_party_output("test"):
        os.write(2, b"[E:onnxruntime:, native.cc:1] something native\n")
        raise BadInputError("cannot load model.onnx")
    log = next((tmp_path / "cache" / "logs").glob("*-test.log"))
    assert failure.value.message == f"cannot load model.onnx (libraries' output: {log})"
    assert "something native" in log.read_text()
    # A gate failure explains itself; an empty log is removed.
    with pytest.raises(GateFailedError) as gate, third_party_output("gate"):
        raise GateFailedError("top-1 0.4 < 0.5")
    assert gate.value.message == "top-1 0.4 < 0.5"
    assert not list((tmp_path / "cache" / "logs").glob("*-gate.log"))
