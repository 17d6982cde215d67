"""`edgepack --help` must start fast: the CLI module may not import the heavy libraries."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["torch", "transformers", "onnxruntime", "optimum", "onnx"])
def test_cli_import_is_light(module):
    code = f"import edgepack.cli, sys; assert {module!r} not in sys.modules, 'imported {module}'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_lists_commands_and_exit_codes():
    result = subprocess.run([sys.executable, "-m", "edgepack", "--help"], capture_output=True, text=True, check=True)
    for word in ("convert", "run", "Exit codes", "smollm2-135m"):
        assert word in result.stdout
