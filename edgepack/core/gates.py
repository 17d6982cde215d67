"""One value for every gate edgepack applies: parity, quality, target checks and device budgets.

A gate compares one figure with one limit in one direction. Reports, the build summary, the exit code
and JUnit are all written from these values, never parsed back from text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

# direction -> (comparison that passes, sign shown when it fails)
DIRECTIONS = {
    "max": (lambda figure, limit: figure <= limit, ">"),  # figure at most limit
    "min": (lambda figure, limit: figure >= limit, "<"),  # figure at least limit
}


@dataclass(frozen=True)
class GateResult:
    """The outcome of one gate.

    `passed` is None when the gate could not be evaluated (nothing to compare: the stage was skipped);
    a gate whose figure is missing while a limit is set fails, with `message` saying why.
    """

    name: str  # what is gated, e.g. "top1_agreement", "max_decode_ms_per_token"
    figure: float | None
    limit: float | None
    direction: str  # "max" | "min" (see DIRECTIONS)
    passed: bool | None
    subject: str = ""  # what the figure belongs to, e.g. "int4", "coreml/fp32", "pixel-8"
    stage: str = ""  # convert | quantize | target | check
    message: str = ""  # one line for people: figure, limit, and what broke
    unit: str = ""
    conditions: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.passed is False

    def describe(self) -> str:
        """Figure, limit and conditions on one line (the JUnit system-out of the gate)."""
        unit = f" {self.unit}" if self.unit else ""
        figure = "none" if self.figure is None else f"{self.figure:.6g}"
        limit = "none" if self.limit is None else f"{self.limit:g}"
        text = f"value {figure}{unit}, limit ({self.direction}) {limit}"
        return text + "".join(f"; {key} {value}" for key, value in self.conditions.items())

    def reframed(self, subject: str, message: str) -> GateResult:
        """The same plain gate seen from a larger run (a build): another subject and message."""
        return GateResult(**{**{f.name: getattr(self, f.name) for f in fields(GateResult)}, "subject": subject, "message": message})

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> GateResult:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


def evaluate_gate(name: str, figure: float | None, limit: float | None, direction: str, *, subject: str = "",
                  stage: str = "", unit: str = "", option: str = "", conditions: dict | None = None) -> GateResult:
    """Compare `figure` with `limit`: passes when within it; no limit means nothing to check (passed None)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"gate direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")
    shown = option or name
    where = f"{subject}: " if subject else ""
    if limit is None:
        return GateResult(name, figure, None, direction, None, subject, stage, f"{where}{name} not gated", unit, conditions or {})
    if figure is None:
        return GateResult(name, None, limit, direction, False, subject, stage,
                          f"{where}{name} is not measured for this model ({shown} {limit:g})", unit, conditions or {})
    ok, sign = DIRECTIONS[direction]
    passed = bool(ok(figure, limit))  # a nan figure (a model that overflowed) fails in either direction
    relation = "within" if passed else sign
    message = f"{where}{name} {figure:.4g}{(' ' + unit) if unit else ''} {relation} {shown} {limit:g}"
    return GateResult(name, figure, limit, direction, passed, subject, stage, message, unit, conditions or {})


def boolean_gate(name: str, ok: bool | None, *, subject: str = "", stage: str = "", message: str = "",
                 conditions: dict | None = None) -> GateResult:
    """A yes/no check as a gate: figure 1 (holds) or 0 (broken) against limit 1, direction "min".

    `ok` None means the check did not run (passed None). `message` is the text shown when it fails;
    the passing text says the check holds.
    """
    figure = None if ok is None else float(bool(ok))
    where = f"{subject}: " if subject else ""
    if ok is None:
        text = f"{where}{name} not checked"
    else:
        text = message if not ok and message else f"{where}{name} {'holds' if ok else 'failed'}"
    return GateResult(name, figure, 1.0, "min", None if ok is None else bool(ok), subject, stage, text, "", conditions or {})


def check_gates(checks: dict, subject: str, stage: str = "target") -> list[GateResult]:
    """A target.json `checks` object ({name: {"passed": bool | None, ...}}) as one boolean gate per check."""
    return [boolean_gate(name, check.get("passed"), subject=subject, stage=stage,
                         message=f"target {subject}: check {name} failed")
            for name, check in checks.items() if isinstance(check, dict)]


def failed(gates) -> list[GateResult]:
    return [gate for gate in gates if gate.passed is False]


def failure_messages(gates) -> list[str]:
    """The messages of the failed gates, once each, in order (several gates may fail for one reason)."""
    return list(dict.fromkeys(gate.message for gate in failed(gates)))
