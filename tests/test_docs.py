"""The generated docs match what generates them, and the README and docs hold no development history."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def _load(relative: str):
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _first_difference(current: str, expected: str) -> str:
    for number, (have, want) in enumerate(zip(current.splitlines(), expected.splitlines()), 1):
        if have != want:
            return f"first difference at line {number}:\n  file:      {have!r}\n  generated: {want!r}"
    return f"the file has {len(current.splitlines())} lines, the generator {len(expected.splitlines())}"


def test_cli_reference_is_current():
    # In a fresh process, as `python scripts/gen_cli_docs.py` runs: click caches each command's help option with
    # the option names of the first context that asks for it, so commands other tests ran would render differently.
    code = "import sys; sys.path[:0] = ['.', 'scripts']; import gen_cli_docs; sys.stdout.write(gen_cli_docs.render())"
    rendered = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    expected = rendered.stdout
    current = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    if current != expected:
        pytest.fail("docs/cli.md is stale: regenerate it with `python scripts/gen_cli_docs.py` "
                    f"({_first_difference(current, expected)})", pytrace=False)


def test_cli_reference_covers_every_command_and_target():
    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    for path in ("edgepack convert", "edgepack quantize", "edgepack run", "edgepack build", "edgepack init", "edgepack verify",
                 "edgepack profile", "edgepack check", "edgepack devices list", "edgepack devices show",
                 "edgepack devices calibrate", "edgepack target ort", "edgepack target ort-mobile",
                 "edgepack target coreml", "edgepack target qnn"):
        assert f"\n## {path}\n" in text, path
        assert f"Usage: {path} " in text, path


def test_benchmarks_page_is_current_and_results_are_complete():
    generator = _load("benchmarks/gen_docs.py")
    current = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    expected = generator.render()
    if current != expected:
        pytest.fail("docs/benchmarks.md is stale: regenerate it with `python benchmarks/gen_docs.py` "
                    f"({_first_difference(current, expected)})", pytrace=False)
    for path in sorted((REPO / "benchmarks" / "results").glob("*.json")):
        record = json.loads(path.read_text())
        assert record["schema"] == "edgepack.benchmark/1", path.name
        assert record["benchmark"] == path.stem
        for key in ("commit", "versions", "host", "threads", "conditions", "rows", "recorded_utc", "command"):
            assert key in record, f"{path.name}: no {key}"
        assert record["commit"]["sha"] and record["host"]["cpu"] and record["host"]["cores"], path.name
        assert record["rows"], f"{path.name}: no figures"


def test_readme_keeps_the_ci_command_and_its_links_resolve():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    # .ci/run runs exactly the README's test command.
    command = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert command.startswith("bash scripts/setup.sh") and "python -m pytest" in command
    assert f"```bash\n{command}\n```" in readme
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (REPO / target).exists(), f"README links to a missing file: {target}"
    assert len(readme.splitlines()) <= 300


def test_no_development_history_in_readme_docs_or_code():
    pattern = re.compile(r"(first|second|third|fourth|fifth|sixth|seventh|eighth|earlier|previous) (session|run)|issue #[0-9]",
                         re.IGNORECASE)
    files = [REPO / "README.md", *sorted((REPO / "docs").rglob("*")), *sorted((REPO / "edgepack").rglob("*"))]
    hits = []
    for path in files:
        if not path.is_file() or path.suffix not in {".md", ".py", ".toml", ".json", ".txt"}:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not hits, "history or dated runs in docs or code (state the reason instead):\n" + "\n".join(hits)
