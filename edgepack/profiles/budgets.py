"""`edgepack check`: a profile.json against budgets, one verdict per device x budget.

Budgets are a TOML file with one table per device id (`[pixel-8]`, or `[host]` for the figures measured
on this host), or a recipe whose `[budgets.<device>]` tables hold them. Units are in the keys
(docs/budgets.md). A key with an unknown name or a value of the wrong type is a usage error naming it.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.core.gates import GateResult, evaluate_gate
from edgepack.errors import BadInputError, UsageError

HOST = "host"
PROFILE_KIND, ESTIMATE_KIND = "edgepack.profile", "edgepack.estimate"
QUALITY_KEYS = ("max_kl", "min_top1")
# key -> (direction, figure, unit, description). "max": value <= limit passes; "min": value >= limit passes.
BUDGET_KEYS: dict[str, tuple[str, str, str]] = {
    "max_ttft_ms": ("max", "ms", "time to first token at the longest profiled prompt"),
    "max_decode_ms_per_token": ("max", "ms/token", "decode time per token (host: p50; devices: projected at the mean position)"),
    "min_tokens_per_s": ("min", "tokens/s", "decode tokens per second"),
    "max_peak_memory_mb": ("max", "MB", "host: peak RSS; devices: weights + KV at the context + runtime overhead"),
    "max_model_size_mb": ("max", "MB", "model files on disk"),
    "max_energy_mj_per_token": ("max", "mJ/token", "decode energy per token"),
    "max_kl": ("max", "nats", "mean KL(fp32 || quantized) from quantize.json"),
    "min_top1": ("min", "fraction", "top-1 agreement with fp32 from quantize.json"),
}


@dataclass(frozen=True)
class Budget:
    device: str
    key: str
    limit: float


class Verdict(GateResult):
    """One device x budget gate: subject is the device, name the budget key.

    The kind of figure (measured | projected | estimated | missing), the margin (fraction of the limit
    left, positive, or exceeded, negative) and the figure's conditions as text are in `conditions`.
    A budget without a figure fails (passed False), never passes None.
    """

    @property
    def device(self) -> str:
        return self.subject

    @property
    def budget(self) -> str:
        return self.name

    @property
    def value(self) -> float | None:
        return self.figure

    @property
    def kind(self) -> str:
        return self.conditions["kind"]

    @property
    def margin(self) -> float | None:
        return self.conditions["margin"]

    @property
    def detail(self) -> str:
        return self.conditions["detail"]

    def describe(self) -> str:
        return f"{self.kind}: value {self.value} {self.unit}, limit {self.limit:g}; {self.detail}"

    def to_json(self) -> dict:
        return {
            "device": self.device, "budget": self.budget, "limit": self.limit, "value": self.value, "unit": self.unit,
            "kind": self.kind, "passed": self.passed, "margin": self.margin, "conditions": self.detail,
        }


def verdict(budget: Budget, value: float | None, kind: str, detail: str) -> Verdict:
    direction, unit, _ = BUDGET_KEYS[budget.key]
    gate = evaluate_gate(budget.key, value, budget.limit, direction, subject=budget.device, stage="check", unit=unit)
    # A budget without a figure fails (evaluate_gate): a release gate must not go green on missing data.
    margin = None
    if gate.figure is not None and budget.limit:
        margin = (budget.limit - value if direction == "max" else value - budget.limit) / budget.limit
    if gate.figure is None:
        message = f"{budget.device}.{budget.key}: no figure in the profile ({detail})"
    else:
        sign = "<=" if direction == "max" else ">="
        message = f"{budget.device}.{budget.key}: {value:.4g} {unit} ({kind}) must be {sign} {budget.limit:g}"
    return Verdict(gate.name, gate.figure, gate.limit, direction, bool(gate.passed), budget.device, "check", message, unit,
                   {"kind": kind, "margin": margin, "detail": detail})


def build_gates(profile_name: str, verdicts: list[Verdict]) -> list[GateResult]:
    """A build's budget gates for one measured bundle: subject `<profile>/<device>`, messages naming the profile."""
    return [v.reframed(f"{profile_name}/{v.device}", f"budget, {profile_name}: {v.message}") for v in verdicts]


@dataclass(frozen=True)
class CheckConfig:
    junit: Path | None = None
    out: Path | None = None  # JSON verdicts


@dataclass
class CheckResult:
    verdicts: list[Verdict] = field(default_factory=list)
    failures: list[Verdict] = field(default_factory=list)
    report: dict = field(default_factory=dict)


def parse_budgets(data: dict, where: str = "budgets") -> list[Budget]:
    """Budget tables -> Budget list; UsageError naming the bad key."""
    if "budgets" in data and isinstance(data["budgets"], dict):
        data = data["budgets"]  # a recipe: [budgets.<device>]
        where = f"{where}: budgets"
    budgets = []
    for device, table in data.items():
        if not isinstance(table, dict):
            raise UsageError(f"{where}: `{device}` must be a table of budgets ([{device}] then key = value)")
        for key, value in table.items():
            if key not in BUDGET_KEYS:
                raise UsageError(f"{where}: unknown budget key `{device}.{key}`; known keys: {', '.join(BUDGET_KEYS)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"{where}: budget `{device}.{key}` must be a number, got {type(value).__name__} {value!r}")
            if not math.isfinite(value):  # TOML has nan and inf: a nan limit fails everything, inf passes anything
                raise UsageError(f"{where}: budget `{device}.{key}` must be a finite number, got {value}")
            if key in ("min_top1",) and not 0 <= value <= 1:
                raise UsageError(f"{where}: budget `{device}.{key}` is a fraction between 0 and 1, got {value}")
            if value < 0:
                raise UsageError(f"{where}: budget `{device}.{key}` must not be negative, got {value}")
            budgets.append(Budget(device, key, float(value)))
    return budgets


def load_budgets(path: Path | str) -> list[Budget]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise UsageError(f"budgets file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"budgets file {path} is a folder; pass a TOML file") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from exc
    return parse_budgets(data, str(path))


def load_profile(path: Path | str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"profile {path} does not exist (write one with `edgepack profile DIR -o {path}`)")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(report, dict) or report.get("kind") not in (PROFILE_KIND, ESTIMATE_KIND):
        raise BadInputError(f"{path} is not an edgepack profile or estimate (kind is neither {PROFILE_KIND} nor {ESTIMATE_KIND})")
    problem = _profile_shape_problem(report)
    if problem:
        raise BadInputError(f"{path} is not a valid edgepack profile: {problem} (schema: docs/profile-json.md)")
    return report


def _profile_shape_problem(report: dict) -> str | None:
    """The first structural problem of the sections `figure_for` reads, or None (types only, not values)."""
    number = (int, float)

    def section(where: str, value, keys: dict) -> str | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            return f"`{where}` must be an object"
        for key, check in keys.items():
            problem = check(f"{where}.{key}", value.get(key))
            if problem:
                return problem
        return None

    def figure(where, value):  # a number, or {p50, ...}
        if value is None or (isinstance(value, number) and not isinstance(value, bool)):
            return None
        if isinstance(value, dict):
            return figure(f"{where}.p50", value.get("p50")) if not isinstance(value.get("p50"), dict) else f"`{where}.p50` must be a number"
        return f"`{where}` must be a number"

    def obj(**keys):
        return lambda where, value: section(where, value, keys)

    def any_obj(where, value):
        return None if value is None or isinstance(value, dict) else f"`{where}` must be an object"

    def entries(where, value):
        if value is None:
            return None
        if not isinstance(value, list):
            return f"`{where}` must be a list"
        for index, entry in enumerate(value):
            problem = section(f"{where}[{index}]", entry, {
                "ttft_ms": figure, "decode_ms_per_token": figure, "tokens_per_s": figure,
                "energy": obj(decode_mj_per_token=figure)})
            if problem:
                return problem
            if entry is None:
                return f"`{where}[{index}]` must be an object"
            for key in ("prompt_len", "gen_len"):  # every figure's conditions name them
                if isinstance(entry.get(key), bool) or not isinstance(entry.get(key), int):
                    return f"`{where}[{index}].{key}` must be an integer"
        return None

    def numbers(where, value):
        if value is None:
            return None
        if not isinstance(value, dict) or not all(isinstance(v, number) for v in value.values()):
            return f"`{where}` must map names to numbers"
        return None

    measured = obj(by_prompt_len=entries, conditions=obj(host=any_obj), model_size_mb=figure, peak_rss_mb=figure)
    for name, entry in (report.get("measured_on") or {}).items() if isinstance(report.get("measured_on"), dict) else ():
        problem = measured(f"measured_on.{name}", entry)
        if problem or not isinstance(entry, dict):
            return problem or f"`measured_on.{name}` must be an object"
    problem = section("profile", report, {
        "host": measured,
        "quality": obj(kl_mean=figure, top1_agreement=figure),
        "model": obj(facts=obj(file_bytes=figure)),
    })
    if problem:
        return problem
    projections = report.get("projections")
    if projections is None:
        return None
    if not isinstance(projections, dict):
        return "`projections` must be an object (device id -> projection)"
    for device, projection in projections.items():
        problem = section(f"projections.{device}", projection, {
            "by_prompt_len": entries, "memory_fit": obj(total_mb=figure), "efficiency": numbers, "device": any_obj})
        if problem or projection is None:
            return problem or f"`projections.{device}` must be an object"
    return None


def _worst(entries: list[dict], pick, worst=max):
    """(value, entry) of the worst figure over prompt lengths: a budget must hold for every profiled length."""
    candidates = [(pick(e), e) for e in entries if pick(e) is not None]
    if not candidates:
        return None
    return worst(candidates, key=lambda c: c[0])


def figure_for(profile: dict, device: str, key: str) -> tuple[float | None, str, str]:
    """(value, kind, conditions) of one budgeted figure for `device` in the profile."""
    host = profile.get("host") or {}
    measured_on = profile.get("measured_on") or {}
    if device == HOST:
        section, kind = host, "measured"
    elif device in measured_on:  # measured on the device itself (`--on`): the measurement decides, not the projection
        section, kind = measured_on[device], "measured"
        if key in QUALITY_KEYS:
            found = (section.get("parity") or {}).get("device") or {}
            value = found.get("kl_mean" if key == "max_kl" else "top1_agreement")
            return (None if value is None else float(value)), "measured", \
                f"the logits {device} computed, against {(section.get('parity') or {}).get('reference')}"
    else:
        section = (profile.get("projections") or {}).get(device)
        if section is None:
            return None, "missing", f"device {device} is not in the profile; profile with --device {device}"
        kind = section.get("kind") or "projected"
    entries = section.get("by_prompt_len") or []
    conds = _conditions(profile, device)

    if key == "max_model_size_mb":
        size = host.get("model_size_mb")
        if size is None:
            size = (profile.get("model", {}).get("facts", {}).get("file_bytes") or 0) / 1e6 or None
        if profile.get("kind") == ESTIMATE_KIND:
            return size, "estimated", "weights as the target stores them (no files: an estimate)"
        return size, "measured", "model files on disk"
    if key in ("max_kl", "min_top1"):
        quality = profile.get("quality") or {}
        value = quality.get("kl_mean" if key == "max_kl" else "top1_agreement")
        if value is None:
            return None, "missing", "no quality figures: profile a folder written by `edgepack quantize` (without --no-eval)"
        return float(value), quality.get("kind", "measured"), f"from {quality.get('source', 'quantize.json')}"
    p50 = ", p50" if kind == "measured" else ""
    if key == "max_ttft_ms":
        found = _worst(entries, lambda e: _scalar(e.get("ttft_ms")))
        return _with(found, kind, lambda e: f"{conds}, prompt {e['prompt_len']} tokens{p50}")
    if key == "max_decode_ms_per_token":
        found = _worst(entries, lambda e: _scalar(e.get("decode_ms_per_token")))
        return _with(found, kind, lambda e: f"{conds}, prompt {e['prompt_len']} + {e['gen_len']} generated{p50}")
    if key == "min_tokens_per_s":
        found = _worst(entries, lambda e: e.get("tokens_per_s"), worst=min)
        return _with(found, kind, lambda e: f"{conds}, prompt {e['prompt_len']} + {e['gen_len']} generated")
    if key == "max_energy_mj_per_token":
        found = _worst(entries, lambda e: (e.get("energy") or {}).get("decode_mj_per_token"))
        if found is None:
            return None, "missing", "no energy figure"
        energy = found[1]["energy"]
        return found[0], energy.get("kind", kind), f"decode, prompt {found[1]['prompt_len']}; {energy.get('basis', '')}"
    if key == "max_peak_memory_mb":
        if kind == "measured":
            return section.get("peak_rss_mb"), "measured", f"{conds}, process peak RSS"
        fit = section.get("memory_fit") or {}
        return fit.get("total_mb"), kind, f"weights + KV at {fit.get('context')} tokens + {fit.get('overhead_mb')} MB runtime overhead"
    raise UsageError(f"unknown budget key {key}")  # parse_budgets already refused it


def _scalar(value):
    if isinstance(value, dict):
        return value.get("p50")
    return value


def _with(found, kind, describe):
    if found is None:
        return None, "missing", "no figure"
    return float(found[0]), kind, describe(found[1])


def _conditions(profile: dict, device: str) -> str:
    measured_on = profile.get("measured_on") or {}
    if device == HOST or device in measured_on:
        section = (profile.get("host") or {}) if device == HOST else measured_on[device]
        c = section.get("conditions") or {}
        cpu = (c.get("host") or {}).get("cpu", "this host") if device == HOST else (section.get("device") or {}).get("cpu", device)
        where = "" if device == HOST else f"on {device} ({(section.get('device') or {}).get('url')}), "
        return f"{where}{cpu}, {c.get('runtime', 'onnxruntime')}, threads {c.get('threads') or 'default'}, {c.get('runs')} runs"
    p = (profile.get("projections") or {}).get(device) or {}
    eff = ", ".join(f"{k} {v:g}" for k, v in (p.get("efficiency") or {}).items())
    return f"{p.get('device', {}).get('id', device)} at {p.get('bandwidth_gb_s')} GB/s; efficiency {eff}"


def evaluate(profile: dict, budgets: list[Budget]) -> list[Verdict]:
    """One verdict per budget. A budget for a device the profile has no figures for is a usage error.

    Such a budget is a typo or a profile made for other devices: a failed verdict would report a
    budget broken by the model when the gate was never measured, and skipping it would let the typo pass.
    """
    profiled = [HOST] + list(profile.get("measured_on") or {}) + list(profile.get("projections") or {})
    unknown = list(dict.fromkeys(b.device for b in budgets if b.device not in profiled))
    if unknown:
        raise UsageError(
            f"budgets for {', '.join(unknown)}: the profile has no figures for {'it' if len(unknown) == 1 else 'them'} "
            f"(its devices: {', '.join(profiled)}); fix the device id or profile with "
            + " ".join(f"--device {d}" for d in unknown)
        )
    return [verdict(budget, *figure_for(profile, budget.device, budget.key)) for budget in budgets]


def split_budgets(profile: dict, budgets: list[Budget]) -> tuple[list[Budget], list[dict]]:
    """(budgets to check, skipped ones with why). An estimate has no host measurement and no quality figures:
    those budgets are skipped and listed, so one budgets file serves the estimate and the build."""
    if profile.get("kind") != ESTIMATE_KIND:
        return budgets, []
    checked, skipped = [], []
    for budget in budgets:
        if budget.device == HOST:
            skipped.append({"device": budget.device, "budget": budget.key, "reason": "an estimate measures nothing on this host"})
        elif budget.key in QUALITY_KEYS:
            skipped.append({"device": budget.device, "budget": budget.key,
                            "reason": "an estimate has no quality figures: `edgepack quantize` or the build measures them"})
        else:
            checked.append(budget)
    return checked, skipped


def check_profile(profile_path: Path | str, budgets_path: Path | str, config: CheckConfig = CheckConfig()) -> CheckResult:
    """Evaluate every budget; write JSON verdicts and JUnit XML when asked. Raising on failure is the CLI's job."""
    from edgepack.outputs import check_output_file, write_output_file

    for path in (config.out, config.junit):
        if path is not None:
            check_output_file(path)
    budgets = load_budgets(budgets_path)  # usage errors first: they do not depend on the profile
    profile = load_profile(profile_path)
    budgets, skipped = split_budgets(profile, budgets)
    verdicts = evaluate(profile, budgets)
    failures = [v for v in verdicts if not v.passed]
    report = {
        "schema_version": 1,
        "kind": "edgepack.check",
        "profile": str(Path(profile_path)),
        "budgets": str(Path(budgets_path)),
        "model": (profile.get("model") or {}).get("dir"),
        "passed": not failures,
        "counts": {"total": len(verdicts), "passed": len(verdicts) - len(failures), "failed": len(failures)},
        "verdicts": [v.to_json() for v in verdicts],
        "skipped": skipped,
    }
    from edgepack.report.junit import junit_xml

    for path, text in ((config.out, json.dumps(report, indent=2) + "\n"), (config.junit, junit_xml({"edgepack.check": verdicts}))):
        if path is None:
            continue
        write_output_file(path, text)
    return CheckResult(verdicts=verdicts, failures=failures, report=report)
