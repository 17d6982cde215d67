"""The README's first run on the demo model: `edgepack init && edgepack build edgepack.toml -o build/release` passes.

The whole starter recipe: export, two schemes with their quality reports, ort and ort-mobile bundles, four
profiles. Its export, schemes and bundles are the session's `demo_targets` (the same recipe built `--only
target`, whose stages the demo export, quantize and ort tests read): this build reuses them from
$EDGEPACK_CACHE by their keys, checks their gates again and measures the profiles. The recipe is the starter
as written: its gates are what this test is about.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_json
from tests.test_quiet import foreign_lines

pytestmark = pytest.mark.demo
REPO = Path(__file__).parents[1]


def test_init_then_build_the_starter_recipe_passes(tmp_path, demo_stages, demo_targets):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("EDGEPACK_DEBUG", None)

    def edgepack(*args):
        return subprocess.run([sys.executable, "-m", "edgepack", *map(str, args)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=3600)

    recipe, out = tmp_path / "edgepack.toml", tmp_path / "build" / "release"
    assert edgepack("init", recipe).returncode == 0
    result = edgepack("build", recipe, "-o", out)
    assert result.returncode == 0, result.stderr
    report = read_json(out / "report.json")
    assert report["passed"] is True and report["failures"] == []
    for scheme in ("int8-weight", "gguf"):
        size = read_json(out / "targets" / "ort-mobile" / scheme / "target.json")["checks"]["size_vs_onnx"]
        assert size["passed"] and size["max_ratio"] == 1.05
        assert size["ratio"] > 1.05  # the growth of folding, which the default gate does not charge to the .ort
    # The stages before the profiles came from the session's builds, intact: the same keys from other processes
    # and recipe files, and no test wrote into the shared entries.
    stages = read_json(out / "manifest.json")["stages"]
    assert [s["name"] for s in stages if s["stage"] != "profile" and not s["reused"]] == []
    assert set(demo_targets.paths) <= {s["name"] for s in stages} and not any("rebuilt" in s for s in stages)
    # The terminal shows edgepack's lines only, here and where the export, quantization and targets ran.
    assert foreign_lines(result) == [] and foreign_lines(demo_stages.build) == [] and foreign_lines(demo_targets.build) == []
