"""What every target produces: a folder of files plus `target.json` with facts and checks.

A target's build is a sequence of named steps, each returning a small typed result; its pass/fail
decisions are `GateResult`s computed in one place per target (`<target>_gates` / `checks` functions).
Each entry of `checks` holds the figures people and tools read, and its `passed` field is the verdict
of the gates named after it (`<check>.<figure>`); the failed gates' messages are the exit-1 message.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.core.gates import GateResult, boolean_gate, evaluate_gate

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
    gates: list[GateResult] = field(default_factory=list)  # the decisions behind `checks`

    @property
    def passed(self) -> bool:
        return all(check.get("passed", True) is not False for check in self.checks.values())

    def failed_gates(self) -> list[GateResult]:
        return [gate for gate in self.gates if gate.passed is False]

    def failure_message(self, prefix: str) -> str | None:
        """One line for the exit-1 error: the failed gates' messages (None when every check passed)."""
        failed = [name for name, check in self.checks.items() if check.get("passed") is False]
        if not failed:
            return None
        reasons = [gate.message for gate in self.failed_gates()]
        # A check decided without a gate (a third-party target's) is still named.
        reasons += [name for name in failed if not any(gate_check(gate) == name for gate in self.failed_gates())]
        return f"{prefix}: {'; '.join(reasons)}; see {self.out / TARGET_REPORT}"

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
            "gates": [gate.to_json() for gate in self.gates],
            "versions": self.versions,
            "seconds": self.seconds,
        }


def gate_check(gate: GateResult) -> str:
    """The `checks` entry a gate decides (gate names are `<check>.<figure>`)."""
    return gate.name.split(".", 1)[0]


def figure_gate(target: str, check: str, figure_name: str, figure, limit, direction: str, *, option: str = "",
                unit: str = "", conditions: dict | None = None) -> GateResult:
    """A figure of check `check` against a limit (no limit: not gated)."""
    return evaluate_gate(f"{check}.{figure_name}", figure, limit, direction, subject=target, stage="target",
                         option=option, unit=unit, conditions=conditions)


def flag_gate(target: str, check: str, name: str, passed: bool | None, message: str) -> GateResult:
    """A yes/no finding of check `check` as a gate (see `boolean_gate`); `message` says what a failure means."""
    return boolean_gate(f"{check}.{name}", passed, subject=target, stage="target", message=f"{target}: {check}: {message}")


FINDINGS = {  # what a failed yes/no check means, for checks that carry no error text of their own
    "tokenizer_files": "the shipped tokenizer files do not tokenize as the source's tokenizer does",
    "tokenizer_genai": "onnxruntime-genai's tokenizer reads the shipped files differently from Hugging Face's",
    "onnxruntime_genai": "onnxruntime-genai's prompt ids or greedy tokens differ from edgepack's runtime",
    "shared_kv_buffer": "decoding into one shared KV buffer gives other tokens than copying the cache",
}


def check_gate(target: str, check: str, entry: dict) -> GateResult:
    """The gate of a check whose verdict a shared helper decided (tokenizer checks, load and generation checks)."""
    reason = entry.get("error") or entry.get("skipped") or FINDINGS.get(check, "failed")
    return flag_gate(target, check, "passed", entry.get("passed"), str(reason))


def verdict(gates: list[GateResult], check: str) -> bool | None:
    """A check's `passed`: False if one of its gates failed, None if none was evaluated, else True."""
    decided = [gate.passed for gate in gates if gate_check(gate) == check and gate.passed is not None]
    if not decided:
        return None
    return all(decided)


@contextmanager
def timed(seconds: dict, key: str, digits: int | None = 3, add: bool = False):
    """Record the wall time of a step under `seconds[key]` (rounded to `digits`, or raw when None); `add`: a step
    that runs several times accumulates."""
    t0 = time.perf_counter()
    yield
    elapsed = time.perf_counter() - t0 + (seconds.get(key, 0.0) if add else 0.0)
    seconds[key] = elapsed if digits is None else round(elapsed, digits)


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
