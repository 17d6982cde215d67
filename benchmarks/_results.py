"""Result files of the benchmark scripts: `benchmarks/results/<name>.json`.

Every file carries what is needed to judge its figures (after llama.cpp's llama-bench rows): the commit
and whether the tree had local changes, the package versions, the host (CPU model, cores, memory), the
thread count, the conditions of the run (lengths, repeats, load average) and the figures themselves as
table rows. docs/benchmarks.md is generated from these files (`python benchmarks/gen_docs.py`); a
figure appears there only if a script measured it and wrote it here.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
# Measure this checkout's edgepack (the commit recorded below), not another installed copy.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SCHEMA = "edgepack.benchmark/1"

# The packages whose versions decide the figures (absent ones are recorded as null).
PACKAGES = ("edgepack", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxruntime-genai",
            "onnxruntime-qnn", "coremltools", "numpy", "gguf")


def commit() -> dict:
    """HEAD of the checkout the script runs from, and whether tracked files differ from it."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": head, "dirty": bool(status) if status is not None else None}


# Taken when the script starts: the code that runs is the code of this commit.
START_COMMIT = commit()


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    return found


def host() -> dict:
    """The host's CPU, cores, RAM and OS, as `edgepack devices calibrate` records them."""
    from edgepack.profiles.calibrate import host_description

    described = host_description()
    ram_mb = described["ram_mb"]
    return {"cpu": described["cpu"], "cores": described["cores"], "machine": described["machine"], "system": described["system"],
            "ram_mb": round(ram_mb) if ram_mb is not None else None}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write(name: str, *, title: str, threads: int | None, conditions: dict, rows: list[dict], notes: str = "") -> Path:
    """Write benchmarks/results/<name>.json and return its path. `rows` are the measured table rows."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "schema": SCHEMA,
        "benchmark": name,
        "title": title,
        "command": " ".join(["python", *sys.argv]),
        "recorded_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": START_COMMIT,
        "versions": versions(),
        "host": host(),
        "threads": threads,
        "conditions": conditions,
        "rows": rows,
        "notes": notes,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return path
