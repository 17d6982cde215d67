"""What every target produces: a folder of files plus `target.json` with facts and checks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

TARGET_REPORT = "target.json"
REPORT_SCHEMA_VERSION = 1


@dataclass
class TargetArtifact:
    out: Path
    target: str  # registry name, e.g. "ort"
    files: dict[str, int] = field(default_factory=dict)  # relative path -> bytes
    facts: dict = field(default_factory=dict)  # format, ops, memory figures, ...
    checks: dict = field(default_factory=dict)  # name -> {"passed": bool, ...figures}
    source: dict = field(default_factory=dict)  # the export/quantized folder it came from
    versions: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(check.get("passed", True) is not False for check in self.checks.values())

    def to_json(self) -> dict:
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "kind": "edgepack.target",
            "target": self.target,
            "files": self.files,
            "total_bytes": sum(self.files.values()),
            "source": self.source,
            "facts": self.facts,
            "checks": self.checks,
            "passed": self.passed,
            "versions": self.versions,
            "seconds": self.seconds,
        }


def list_files(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative path -> size), target.json excluded."""
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != TARGET_REPORT
    }


def write_target_json(folder: Path, artifact: TargetArtifact) -> None:
    artifact.files = list_files(folder)
    (folder / TARGET_REPORT).write_text(json.dumps(artifact.to_json(), indent=2) + "\n")
