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
        "rule": "Stateful (ct.StateType) models have been reported to run on CPU/GPU but not the Neural Engine; the reports that run "
                "on it keep states rank 4 and update them at constant indices (as the fixed-shape program does)",
        "source": "apple/coremltools#2553 and Anemll/Anemll#27 (failure, and the rank-4 form that runs); FluidInference/FluidAudio#679 "
                  "(MLState multifunction on the ANE); apple/coreai-torch#6 (updates at runtime indices crash ANECompiler)",
    },
    "palettized-state": {
        "rule": "A stateful package with 4-bit palettized weights built by coremltools 9.0 was reported to crash on the Neural Engine after "
                "100-200 sequential predictions (the same source built by coremltools 8.3 did not)",
        "source": "apple/coremltools#2716 (open)",
    },
    "rank-4": {
        "rule": "The Neural Engine compiler rejects tensors of rank above 4: a graph with rank-5 tensors (e.g. a (layers, batch, heads, "
                "context, head_dim) KV state, or grouped-query attention by repeat_interleave) fails ANECCompile; rank-4 rewrites place fully",
        "source": "FluidInference/FluidAudio#679 (rank-5 graphs fail ANECCompile; rank-4 rewrites plan 100% ANE)",
    },
    "weight-file-size": {
        "rule": "A package whose weight file is above 1 GiB does not run on the Neural Engine of iOS (above 2 GiB: of macOS either); "
                "split the model into packages of consecutive layers",
        "source": "Anemll/Anemll#28 (1 GB iOS 18, 2 GB macOS; --chunk splits the model); apple/coremltools#2593 "
                  "('ane: Weight file size ... exceeds the maximum (2147483648 bytes)')",
    },
    "axis-limit": {
        "rule": "A tensor axis above 16384 (A13-A15) or 65536 (A16 and later) cannot be placed on the Neural Engine (e.g. a large vocabulary in the lm_head)",
        "source": "sbryngelson/ANEForge#240 and #57; maderix/ANE#26 (lm_head chunked for the 65536 limit)",
    },
    "integer-compute": {
        "rule": "Integer and bool tensors (index and shape arithmetic) are computed on the CPU",
        "source": "Apple ML Research, 'Deploying Transformers on the Apple Neural Engine' (fp16-only engine)",
    },
    "quantized-weights": {
        "rule": "Ops whose weights are int4/int8 with scales (constexpr_blockwise_shift_scale) have been measured placed on the CPU by "
                "MLComputePlan (M4, macOS 15, iOS 18 and iOS 26 targets); palettized weights (constexpr_lut_to_dense) are what "
                "Neural Engine LLM pipelines ship",
        "source": "kasper0406/stablehlo-coreml#110 (MLComputePlan: int4/int8 constexpr weights supported=[CPU]); Anemll README (LUT palettization on the ANE)",
    },
}
# The weight file iOS loads on the Neural Engine (macOS: 2 GiB); a larger model is split into packages.
ANE_WEIGHT_FILE_LIMIT = 1 << 30
ANE_WEIGHT_FILE_LIMIT_MAC = 2 << 30
ANE_AXIS_LIMIT_OLD = 16384
ANE_AXIS_LIMIT_NEW = 65536
# ops that only move data or read constants; they do not count as compute placed on an engine
_FREE_OPS = {"const", "shape", "read_state", "coreml_update_state"}


def report(functions: dict, *, size_bytes: int, flexible_inputs: list[str], weight_files: dict | None = None) -> dict:
    """The ANE readiness section of target.json for the loaded MIL functions of a package (name -> function, see
    mil_reference.load_functions): the rules are judged over all of them; `functions` has each one's own counts."""
    counts: Counter = Counter()
    scan = _OutputScan()
    per_function = {}
    for name, function in functions.items():
        ops = list(function.operations)
        own_counts = Counter(op.op_type for op in ops if op.op_type != "const")
        own = _scan_outputs(ops, prefix=f"{name}/" if len(functions) > 1 else "")
        per_function[name] = {"inputs": _input_shapes(function), "outputs": [var.name for var in function.outputs], "compute_ops": _compute_ops(own_counts),
                              "dynamic_shape_ops": len(own.dynamic), "non_fp16_tensors": len(own.fp32) + len(own.integer)}
        counts += own_counts
        for key in ("dynamic", "fp32", "integer", "big_axes", "rank5", "quantized", "palettized"):
            getattr(scan, key).extend(getattr(own, key))
    dynamic, fp32, integer, big_axes = scan.dynamic, scan.fp32, scan.integer, scan.big_axes
    states = _states(next(iter(functions.values())))
    findings = _findings(states, flexible_inputs, scan)
    too_large = {name: size for name, size in (weight_files or {}).items() if size > ANE_WEIGHT_FILE_LIMIT}
    if too_large:
        macos = "; macOS too" if max(too_large.values()) > ANE_WEIGHT_FILE_LIMIT_MAC else "; macOS takes up to 2 GiB"
        findings.insert(0, {"id": "weight-file-size", "severity": "blocking",
                            "detail": ", ".join(f"{name}: {size / 2**30:.2f} GiB of weights" for name, size in too_large.items())
                            + f" (iOS limit 1 GiB{macos}); build with more --model-parts", "ops": sorted(too_large), **RULES["weight-file-size"]})
    verdicts = _verdicts(findings)
    return {
        "method": "static inspection of the saved ML Program's MIL (milproto -> pymil); placement is decided on device",
        "functions": per_function,
        "op_counts": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "compute_ops": _compute_ops(counts),
        "dynamic_shape_ops": {"count": len(dynamic), "examples": dynamic[:5]},
        "flexible_inputs": flexible_inputs,
        "non_fp16_tensors": {"fp32": len(fp32), "integer_or_bool": len(integer), "examples": (fp32 + integer)[:5]},
        "states": states,
        "large_axes": big_axes[:5],
        "size_bytes": size_bytes,
        "weight_files": weight_files or {},
        "findings": findings,
        "neural_engine": _short_verdict(findings),
        "verdicts": verdicts,
        "rules": RULES,
    }


def _compute_ops(counts: Counter) -> int:
    return sum(n for t, n in counts.items() if t not in _FREE_OPS and not t.startswith("constexpr_"))


def _input_shapes(function) -> dict:
    from coremltools.converters.mil.mil import types

    shapes = {}
    for name, var in function.inputs.items():
        sym = var.sym_type.wrapped_type() if types.is_state(var.sym_type) else var.sym_type
        if types.is_tensor(sym):
            kind = "state " if types.is_state(var.sym_type) else ""
            shapes[name] = f"{kind}{types.builtin_to_string(sym.get_primitive())} ({', '.join(str(d) for d in sym.get_shape())})"
    return shapes


@dataclass
class _OutputScan:
    """Compute ops' output tensors that the Neural Engine rules look at."""

    dynamic: list[str] = field(default_factory=list)  # ops with a symbolic output shape
    rank5: list[str] = field(default_factory=list)  # ops with an output (or a state) of rank above 4
    quantized: list[str] = field(default_factory=list)  # weights stored as integers with scales (constexpr_blockwise_shift_scale)
    palettized: list[str] = field(default_factory=list)  # weights stored as lookup-table indices (constexpr_lut_to_dense)
    fp32: list[str] = field(default_factory=list)  # "type:name" of compute ops producing fp32
    integer: list[str] = field(default_factory=list)  # ... producing int/bool
    big_axes: list[dict] = field(default_factory=list)  # outputs with an axis above ANE_AXIS_LIMIT_OLD


def _scan_outputs(ops, prefix: str = "") -> _OutputScan:
    """`prefix`: the function's name in a multifunction package, so that op names say where they are."""
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.types.symbolic import any_symbolic

    scan = _OutputScan()
    for op in ops:
        if op.op_type == "constexpr_blockwise_shift_scale":
            scan.quantized.append(f"{prefix}{op.outputs[0].name}")
        if op.op_type == "constexpr_lut_to_dense":
            scan.palettized.append(f"{prefix}{op.outputs[0].name}")
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            continue
        for var in op.outputs:
            if not types.is_tensor(var.sym_type):
                continue
            shape = var.sym_type.get_shape()
            dtype = var.sym_type.get_primitive()
            if any_symbolic(shape):
                scan.dynamic.append(f"{prefix}{op.name}")
            if len(shape) > 4 and op.op_type != "read_state":  # states are judged as states
                scan.rank5.append(f"{prefix}{op.op_type}:{op.name}")
            if dtype == types.fp32 and op.op_type not in _FREE_OPS:
                scan.fp32.append(f"{prefix}{op.op_type}:{op.name}")
            if (types.is_int(dtype) or dtype == types.bool) and op.op_type not in _FREE_OPS:
                scan.integer.append(f"{prefix}{op.op_type}:{op.name}")
            concrete = [int(d) for d in shape if not any_symbolic(d)]
            if concrete and max(concrete) > ANE_AXIS_LIMIT_OLD:
                scan.big_axes.append({"op": f"{prefix}{op.op_type}:{op.name}", "shape": [str(d) for d in shape]})
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

    def finding(rule, severity, detail, ops=None):
        findings.append({"id": rule, "severity": severity, "detail": detail, **({"ops": ops} if ops is not None else {}), **RULES[rule]})

    fp32, integer, big_axes = scan.fp32, scan.integer, scan.big_axes
    misaligned = [s for s in states if not s["last_dim_multiple_of_32"]]
    if misaligned:
        finding("state-alignment-32", "blocking",
                "; ".join(f"state {s['name']} {s['shape']}: last dimension {s['last_dim']} is not a multiple of 32" for s in misaligned))
    high_rank = [f"state {s['name']}" for s in states if len(s["shape"]) > 4] + scan.rank5
    if high_rank:
        finding("rank-4", "blocking", f"{len(high_rank)} tensors of rank 5, e.g. {', '.join(high_rank[:3])}", high_rank)
    if flexible_inputs:
        finding("static-shapes", "blocking", f"flexible inputs: {', '.join(flexible_inputs)}; {len(scan.dynamic)} ops have dynamic output shapes")
    if states:
        rank4 = all(len(s["shape"]) <= 4 for s in states)
        finding("stateful-ane", "warning", f"{len(states)} states" + (", rank 4, updated at constant indices" if rank4 and not flexible_inputs else ""))
    if states and scan.palettized:
        finding("palettized-state", "warning", f"{len(scan.palettized)} palettized weights in a stateful program", scan.palettized)
    if fp32:
        finding("fp16-compute", "fallback", f"{len(fp32)} ops produce fp32 tensors, e.g. {', '.join(fp32[:3])}", fp32)
    if integer:
        finding("integer-compute", "fallback", f"{len(integer)} ops compute on int/bool tensors, e.g. {', '.join(integer[:3])}", integer)
    if scan.quantized:
        finding("quantized-weights", "fallback", f"{len(scan.quantized)} weights are integers with scales, e.g. {', '.join(scan.quantized[:3])}; "
                "the ops reading them may run on the CPU (palettize4 stores lookup tables instead)", scan.quantized)
    over_new = [b for b in big_axes if any(d.isdigit() and int(d) > ANE_AXIS_LIMIT_NEW for d in b["shape"])]
    if over_new:
        finding("axis-limit", "blocking", f"{len(over_new)} ops have an axis above {ANE_AXIS_LIMIT_NEW}, e.g. {over_new[0]['op']} {over_new[0]['shape']}",
                [b["op"] for b in over_new])
    elif big_axes:  # A16 and later (every iPhone 15 Pro / M-series) take these: a warning for the older engines
        finding("axis-limit", "warning", f"{len(big_axes)} ops have an axis above {ANE_AXIS_LIMIT_OLD} (A13-A15), e.g. {big_axes[0]['op']} {big_axes[0]['shape']}",
                [b["op"] for b in big_axes])
    return findings


def _short_verdict(findings: list[dict]) -> str:
    """ready | partial | unlikely: what the build summary shows for the Neural Engine."""
    severities = {f["severity"] for f in findings}
    return "unlikely" if "blocking" in severities else "partial" if "fallback" in severities else "ready"


def _verdicts(findings: list[dict]) -> dict:
    """What each compute-units setting can expect, from the findings."""
    blocking = [f for f in findings if f["severity"] == "blocking"]
    fallback = [f for f in findings if f["severity"] == "fallback"]
    warnings = [f["id"] for f in findings if f["severity"] == "warning"]
    if blocking:
        ane = "unlikely: " + "; ".join(f["id"] for f in blocking)
    elif fallback:
        ane = "partial: some ops likely fall back to CPU/GPU (" + ", ".join([f["id"] for f in fallback] + warnings) + ")"
    else:
        ane = "ready: no blocking or fallback rule broken" + (f" (warnings: {', '.join(warnings)})" if warnings else "")
    return {
        "cpu_only": "runs (every op is a Core ML op; fp16 program)",
        "cpu_and_gpu": "runs (the GPU takes fp16, flexible shapes and states)",
        "cpu_and_ne": f"Neural Engine {ane}",
        "all": f"Neural Engine {ane}; the rest on GPU/CPU",
    }
