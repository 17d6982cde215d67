"""Neural Engine readiness report, read from the saved ML Program (no Mac needed).

Each rule carries the public source it comes from. The report states what the program contains and
which rules it breaks; placement itself is decided by Core ML on the device (MLComputePlan on macOS).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

RULES = {
    "fp16-compute": {
        "rule": "The Neural Engine computes in fp16: float ops on fp32 tensors run on CPU/GPU",
        "source": "Apple ML Research, 'Deploying Transformers on the Apple Neural Engine' (2022); apple/ml-ane-transformers",
    },
    "static-shapes": {
        "rule": "The Neural Engine compiles static shapes: range-flexible inputs (ct.RangeDim) make Core ML place the model on GPU/CPU; use fixed or enumerated shapes",
        "source": "coremltools docs 'Flexible Input Shapes'; apple/coremltools#2600 (stateful LLM with flexible inputs falls back to CPU)",
    },
    "state-alignment-32": {
        "rule": "Stateful models fail on the Neural Engine when a state's last dimension is not a multiple of 32",
        "source": "apple/coremltools#2631 (coremltools 9.0, macOS 15, M4)",
    },
    "stateful-ane": {
        "rule": "Stateful (ct.StateType) models have been reported to run on CPU/GPU but not the Neural Engine with all compute units",
        "source": "apple/coremltools#2553, Anemll/Anemll#27",
    },
    "axis-limit": {
        "rule": "A tensor axis above 16384 (A13-A15) or 65536 (A16 and later) cannot be placed on the Neural Engine (e.g. a large vocabulary in the lm_head)",
        "source": "sbryngelson/ANEForge#240 and #57; maderix/ANE#26 (lm_head chunked for the 65536 limit)",
    },
    "integer-compute": {
        "rule": "Integer and bool tensors (index and shape arithmetic) are computed on the CPU",
        "source": "Apple ML Research, 'Deploying Transformers on the Apple Neural Engine' (fp16-only engine)",
    },
}
ANE_AXIS_LIMIT_OLD = 16384
ANE_AXIS_LIMIT_NEW = 65536
# ops that only move data or read constants; they do not count as compute placed on an engine
_FREE_OPS = {"const", "shape", "read_state", "coreml_update_state"}


def report(function, *, size_bytes: int, flexible_inputs: list[str]) -> dict:
    """The ANE readiness section of target.json for a loaded MIL function (see mil_reference.load_program)."""
    ops = [op for op in function.operations]
    counts = Counter(op.op_type for op in ops if op.op_type != "const")
    scan = _scan_outputs(ops)
    dynamic, fp32, integer, big_axes = scan.dynamic, scan.fp32, scan.integer, scan.big_axes
    states = _states(function)
    findings = _findings(states, flexible_inputs, scan)
    verdicts = _verdicts(findings)
    compute_ops = sum(n for t, n in counts.items() if t not in _FREE_OPS and not t.startswith("constexpr_"))
    return {
        "method": "static inspection of the saved ML Program's MIL (milproto -> pymil); placement is decided on device",
        "op_counts": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "compute_ops": compute_ops,
        "dynamic_shape_ops": {"count": len(dynamic), "examples": dynamic[:5]},
        "flexible_inputs": flexible_inputs,
        "non_fp16_tensors": {"fp32": len(fp32), "integer_or_bool": len(integer), "examples": (fp32 + integer)[:5]},
        "states": states,
        "large_axes": big_axes[:5],
        "size_bytes": size_bytes,
        "findings": findings,
        "verdicts": verdicts,
        "rules": RULES,
    }


@dataclass
class _OutputScan:
    """Compute ops' output tensors that the Neural Engine rules look at."""

    dynamic: list[str] = field(default_factory=list)  # ops with a symbolic output shape
    fp32: list[str] = field(default_factory=list)  # "type:name" of compute ops producing fp32
    integer: list[str] = field(default_factory=list)  # ... producing int/bool
    big_axes: list[dict] = field(default_factory=list)  # outputs with an axis above ANE_AXIS_LIMIT_OLD


def _scan_outputs(ops) -> _OutputScan:
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.types.symbolic import any_symbolic

    scan = _OutputScan()
    for op in ops:
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            continue
        for var in op.outputs:
            if not types.is_tensor(var.sym_type):
                continue
            shape = var.sym_type.get_shape()
            dtype = var.sym_type.get_primitive()
            if any_symbolic(shape):
                scan.dynamic.append(op.name)
            if dtype == types.fp32 and op.op_type not in _FREE_OPS:
                scan.fp32.append(f"{op.op_type}:{op.name}")
            if (types.is_int(dtype) or dtype == types.bool) and op.op_type not in _FREE_OPS:
                scan.integer.append(f"{op.op_type}:{op.name}")
            concrete = [int(d) for d in shape if not any_symbolic(d)]
            if concrete and max(concrete) > ANE_AXIS_LIMIT_OLD:
                scan.big_axes.append({"op": f"{op.op_type}:{op.name}", "shape": [str(d) for d in shape]})
    return scan


def _states(function) -> list[dict]:
    from coremltools.converters.mil.mil import types

    states = []
    for name, var in function.inputs.items():
        if types.is_state(var.sym_type):
            wrapped = var.sym_type.wrapped_type()
            shape = [int(d) for d in wrapped.get_shape()]
            states.append({
                "name": name, "shape": shape, "dtype": types.builtin_to_string(wrapped.get_primitive()),
                "last_dim": shape[-1], "last_dim_multiple_of_32": shape[-1] % 32 == 0,
            })
    return states


def _findings(states: list[dict], flexible_inputs: list[str], scan: _OutputScan) -> list[dict]:
    """One finding per broken rule, with its severity (blocking, fallback or warning) and what broke it."""
    findings = []

    def finding(rule, severity, detail):
        findings.append({"id": rule, "severity": severity, "detail": detail, **RULES[rule]})

    fp32, integer, big_axes = scan.fp32, scan.integer, scan.big_axes
    misaligned = [s for s in states if not s["last_dim_multiple_of_32"]]
    if misaligned:
        finding("state-alignment-32", "blocking",
                "; ".join(f"state {s['name']} {s['shape']}: last dimension {s['last_dim']} is not a multiple of 32" for s in misaligned))
    if flexible_inputs:
        finding("static-shapes", "blocking", f"flexible inputs: {', '.join(flexible_inputs)}; {len(scan.dynamic)} ops have dynamic output shapes")
    if states:
        finding("stateful-ane", "warning", f"{len(states)} states")
    if fp32:
        finding("fp16-compute", "fallback", f"{len(fp32)} ops produce fp32 tensors, e.g. {', '.join(fp32[:3])}")
    if integer:
        finding("integer-compute", "fallback", f"{len(integer)} ops compute on int/bool tensors, e.g. {', '.join(integer[:3])}")
    over_new = [b for b in big_axes if any(d.isdigit() and int(d) > ANE_AXIS_LIMIT_NEW for d in b["shape"])]
    if over_new:
        finding("axis-limit", "blocking", f"{len(over_new)} ops have an axis above {ANE_AXIS_LIMIT_NEW}, e.g. {over_new[0]['op']} {over_new[0]['shape']}")
    elif big_axes:
        finding("axis-limit", "fallback", f"{len(big_axes)} ops have an axis above {ANE_AXIS_LIMIT_OLD} (A13-A15), e.g. {big_axes[0]['op']} {big_axes[0]['shape']}")
    return findings


def _verdicts(findings: list[dict]) -> dict:
    """What each compute-units setting can expect, from the findings."""
    blocking = [f for f in findings if f["severity"] == "blocking"]
    fallback = [f for f in findings if f["severity"] in ("fallback", "warning")]
    if blocking:
        ane = "unlikely: " + "; ".join(f["id"] for f in blocking)
    elif fallback:
        ane = "partial: some ops likely fall back to CPU/GPU (" + ", ".join(f["id"] for f in fallback) + ")"
    else:
        ane = "ready: no rule broken"
    return {
        "cpu_only": "runs (every op is a Core ML op; fp16 program)",
        "cpu_and_gpu": "runs (the GPU takes fp16, flexible shapes and states)",
        "cpu_and_ne": f"Neural Engine {ane}",
        "all": f"Neural Engine {ane}; the rest on GPU/CPU",
    }
