"""Projection arithmetic: a model's per-token costs (ModelFacts) onto a device profile. Pure numbers, no I/O.

decode ms/token = sum over weight formats of bytes / (bandwidth x efficiency[format]) + nodes x dispatch
                  + weight matrices x their fixed kernel cost (per format, calibrated hosts only)
prefill ms      = max(FLOPs / (peak x prefill efficiency), weight bytes / decode bandwidth) + the same fixed terms
energy mJ       = sustained W x ms  (a power model; DRAM bytes x pJ/byte is reported beside it as a floor)
memory fit      = weights + KV at the context + runtime overhead  vs  the app memory limit

Each compute unit is projected with its own figures: the CPU from the device's [efficiency], [compute],
[power] and [runtime] tables (onnxruntime's CPU provider), the Neural Engine, GPU and Hexagon NPU from
their [ane], [gpu] and [htp] tables: bandwidth efficiency per weight format, a prefill rate, a fixed
cost per call instead of a per-node one (their programs run as one compiled graph), their power and
runtime memory. A static program (fixed shapes) streams its whole cache every call and prefills in
fixed chunks (`ModelFacts.kv_slots`, `prefill_chunk`).

Decoding is memory bound (every weight is read once per token), prefill compute bound; the per-node
dispatch term is what an interpreter like onnxruntime adds on top of the roofline for graphs of
thousands of small nodes. A calibrated profile (`edgepack devices calibrate`) replaces the scalar
efficiency by a measured effective bandwidth per format as a function of the working set, so that a
model that fits in a large last-level cache is not projected at DRAM speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgepack.errors import UsageError
from edgepack.profiles.devices import ACCELERATOR_UNITS, Device
from edgepack.profiles.model_facts import ModelFacts

FORMATS = ("fp32", "fp16", "int8", "int4")
UNIT_FORMATS = ("fp16", "int8", "int4")


@dataclass(frozen=True)
class DeviceModel:
    """The figures projection needs, lifted out of a Device (or written by hand in tests)."""

    id: str
    bandwidth_gb_s: float
    decode_efficiency: dict  # format -> fraction of bandwidth_gb_s
    prefill_efficiency: float = 0.3
    cpu_fp32_gflops: float | None = None
    cpu_int8_gops: float | None = None
    dispatch_us_per_node: float = 0.0
    sustained_w: float | None = None
    idle_w: float | None = None
    dram_pj_per_byte: float | None = None
    app_memory_limit_mb: float | None = None
    overhead_mb: float = 0.0
    # format -> ([working set MB...], [effective GB/s...]) measured by calibration
    bandwidth_curves: dict | None = None
    # format -> fixed microseconds per weight matrix per call (calibration); 0 where not measured
    weight_overhead_us: dict | None = None
    unit: str = "cpu"
    unit_gops: float | None = None  # an accelerator's prefill peak (ops/s at the program's precision)
    call_overhead_ms: float = 0.0  # an accelerator's fixed cost per call (launch, synchronisation)

    @classmethod
    def for_unit(cls, device: Device, unit: str) -> DeviceModel:
        """The figures of one compute unit of `device`; UsageError when the device has none for it."""
        if unit == "cpu":
            return cls.from_device(device)
        if unit not in ACCELERATOR_UNITS:
            raise UsageError(f"unknown compute unit {unit!r} (cpu, {', '.join(ACCELERATOR_UNITS)})")
        table = unit  # an accelerator's figures are in the table of its name
        if not device.has_unit(unit):
            raise UsageError(f"device {device.id} has no [{table}] figures: nothing to project a {unit} program onto")
        eff = {}
        for fmt in UNIT_FORMATS:
            value = device.value(table, f"decode_bandwidth_{fmt}")
            if value is not None:
                eff[fmt] = float(value)
        if "fp16" in eff:
            eff["fp32"] = eff["fp16"]
        missing = [k for k in ("decode_bandwidth_fp16", "power_w") if device.value(table, k) is None]
        if missing:
            raise UsageError(f"device {device.id} [{table}] lacks {', '.join(missing)}")
        return cls(
            id=device.id,
            bandwidth_gb_s=float(device.value("memory", "bandwidth_gb_s")),
            decode_efficiency=eff,
            prefill_efficiency=float(device.value(table, "prefill_compute", 0.3)),
            sustained_w=device.value(table, "power_w"),
            idle_w=device.value("power", "idle_w"),
            dram_pj_per_byte=device.value("memory", "dram_pj_per_byte"),
            app_memory_limit_mb=device.value("memory", "app_memory_limit_mb"),
            overhead_mb=float(device.value(table, "overhead_mb", device.value("runtime", "overhead_mb", 0.0))),
            unit=unit,
            unit_gops=device.value(table, "peak_gops"),
            call_overhead_ms=float(device.value(table, "call_overhead_ms", 0.0)),
        )

    @classmethod
    def from_device(cls, device: Device) -> DeviceModel:
        eff = {}
        for fmt in FORMATS:
            value = device.value("efficiency", f"decode_bandwidth_{fmt}")
            if value is not None:
                eff[fmt] = float(value)
        overhead = {}
        for fmt in FORMATS:
            value = device.value("calibration", f"gemv_{fmt}_weight_us")
            if isinstance(value, (int, float)):
                overhead[fmt] = float(value)
        curves = {}
        for fmt in FORMATS:
            sizes = device.value("calibration", f"gemv_{fmt}_working_set_mb")
            rates = device.value("calibration", f"gemv_{fmt}_gb_s")
            if isinstance(sizes, list) and isinstance(rates, list) and len(sizes) == len(rates) and sizes:
                curves[fmt] = (list(map(float, sizes)), list(map(float, rates)))
        return cls(
            id=device.id,
            bandwidth_gb_s=float(device.value("memory", "bandwidth_gb_s")),
            decode_efficiency=eff,
            prefill_efficiency=float(device.value("efficiency", "prefill_compute", 0.3)),
            cpu_fp32_gflops=device.value("compute", "cpu_fp32_gflops"),
            cpu_int8_gops=device.value("compute", "cpu_int8_gops"),
            dispatch_us_per_node=float(device.value("runtime", "dispatch_us_per_node", 0.0)),
            sustained_w=device.value("power", "sustained_w"),
            idle_w=device.value("power", "idle_w"),
            dram_pj_per_byte=device.value("memory", "dram_pj_per_byte"),
            app_memory_limit_mb=device.value("memory", "app_memory_limit_mb"),
            overhead_mb=float(device.value("runtime", "overhead_mb", 0.0)),
            bandwidth_curves=curves or None,
            weight_overhead_us=overhead or None,
        )


def _efficiency_format(fmt: str) -> str:
    # bf16/fp64/"other" tensors are rare and small; they stream like fp32
    return fmt if fmt in FORMATS else "fp32"


def interpolate_log(sizes: list[float], values: list[float], x: float) -> float:
    """Piecewise-linear in log(size), clamped at both ends (sizes ascending)."""
    pairs = sorted(zip(sizes, values))
    if x <= pairs[0][0]:
        return pairs[0][1]
    if x >= pairs[-1][0]:
        return pairs[-1][1]
    for (x0, y0), (x1, y1) in zip(pairs, pairs[1:]):
        if x0 <= x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return pairs[-1][1]


def effective_bandwidth(device: DeviceModel, fmt: str, working_set_bytes: float) -> tuple[float, float, str]:
    """(effective GB/s, efficiency vs bandwidth_gb_s, how it was obtained) for weights of `fmt`."""
    fmt = _efficiency_format(fmt)
    curves = device.bandwidth_curves or {}
    curve = curves.get(fmt) or (curves.get("fp32") if fmt == "fp16" else None)
    if curve is not None:
        rate = interpolate_log(curve[0], curve[1], working_set_bytes / 1e6)
        return rate, rate / device.bandwidth_gb_s, f"calibrated {fmt} GEMV curve at {working_set_bytes / 1e6:.0f} MB working set"
    eff = device.decode_efficiency.get(fmt, device.decode_efficiency.get("fp32", 1.0))
    return device.bandwidth_gb_s * eff, eff, f"bandwidth x decode_bandwidth_{fmt if fmt in device.decode_efficiency else 'fp32'}"


def project_decode(facts: ModelFacts, device: DeviceModel, position: int) -> dict:
    """Projected ms for the token decoded at `position` (the KV cache then holds `position` entries)."""
    kv_bytes = facts.kv_read_bytes(position)
    working_set = facts.weight_bytes_per_token + kv_bytes
    terms = []
    memory_ms = 0.0
    formats = dict(facts.bytes_per_token_by_format)
    formats["kv"] = kv_bytes
    for fmt, nbytes in formats.items():
        if nbytes <= 0:
            continue
        # the KV cache is stored in the graph's float type: fp32 on the CPU, fp16 (or 16-bit) on accelerators
        kv_format = "fp32" if device.unit == "cpu" else "fp16"
        rate, eff, how = effective_bandwidth(device, kv_format if fmt == "kv" else fmt, working_set)
        ms = nbytes / (rate * 1e9) * 1e3
        memory_ms += ms
        terms.append({"format": fmt, "bytes": int(nbytes), "effective_gb_s": round(rate, 3), "efficiency": round(eff, 4), "ms": round(ms, 4), "basis": how})
    dispatch_ms = facts.nodes * device.dispatch_us_per_node / 1e3
    weights_ms = weight_overhead_ms(facts, device)
    total = memory_ms + dispatch_ms + weights_ms + device.call_overhead_ms
    return {
        "ms": total,
        "unit": device.unit,
        "call_overhead_ms": device.call_overhead_ms,
        "position": position,
        "bytes": int(facts.decode_bytes(position)),
        "memory_ms": memory_ms,
        "dispatch_ms": dispatch_ms,
        "dispatch_us_per_node": device.dispatch_us_per_node,
        "nodes": facts.nodes,
        "weight_overhead_ms": weights_ms,
        "terms": terms,
    }


def weight_overhead_ms(facts: ModelFacts, device: DeviceModel) -> float:
    """Fixed cost of the weight matrices' kernels per call (calibrated per format; fp16 like fp32)."""
    overhead = device.weight_overhead_us or {}
    total_us = 0.0
    for fmt, count in (facts.weights_by_format or {}).items():
        fmt = _efficiency_format(fmt)
        total_us += count * overhead.get(fmt, overhead.get("fp32", 0.0) if fmt == "fp16" else 0.0)
    return total_us / 1e3


def prefill_peak(facts: ModelFacts, device: DeviceModel) -> tuple[float | None, str]:
    """GFLOP/s peak for the prompt's GEMMs: int8 compute for weight-quantized models (MatMulNBits runs int8 at
    accuracy_level 4), fp32 otherwise."""
    if device.unit != "cpu":
        return (float(device.unit_gops), "peak_gops") if device.unit_gops else (None, "none")
    quantized = sum(v for k, v in facts.bytes_per_token_by_format.items() if k in ("int8", "int4"))
    if quantized > facts.weight_bytes_per_token / 2 and device.cpu_int8_gops:
        return float(device.cpu_int8_gops), "cpu_int8_gops"
    if device.cpu_fp32_gflops:
        return float(device.cpu_fp32_gflops), "cpu_fp32_gflops"
    return None, "none"


def project_prefill(facts: ModelFacts, device: DeviceModel, prompt_len: int) -> dict:
    # A static program prefills in fixed chunks (the last one padded): each call computes a whole chunk
    # and reads every weight and its whole cache again.
    calls = math.ceil(prompt_len / facts.prefill_chunk) if facts.prefill_chunk else 1
    if facts.prefill_chunk and facts.kv_slots is not None:
        chunk = facts.prefill_chunk
        flops = calls * (facts.linear_flops_per_token * chunk + facts.attention_flops_per_position * facts.kv_slots * chunk)
    else:
        flops = facts.prefill_flops(prompt_len)
    peak, peak_key = prefill_peak(facts, device)
    compute_ms = flops / (peak * 1e9 * device.prefill_efficiency) * 1e3 if peak else 0.0
    # the prompt reads every weight at least once per call, at decode speed
    memory_ms = calls * project_decode(facts, device, 0)["memory_ms"]
    dispatch_ms = calls * (facts.nodes * device.dispatch_us_per_node / 1e3 + weight_overhead_ms(facts, device) + device.call_overhead_ms)
    ms = max(compute_ms, memory_ms) + dispatch_ms
    return {
        "ms": ms,
        "calls": calls,
        "prompt_len": prompt_len,
        "flops": int(flops),
        "peak_gflops": peak,
        "peak_key": peak_key,
        "prefill_efficiency": device.prefill_efficiency,
        "compute_ms": compute_ms,
        "memory_ms": memory_ms,
        "dispatch_ms": dispatch_ms,
        "bound": "compute" if compute_ms >= memory_ms else "memory",
        "tokens_per_s": prompt_len / (ms / 1e3) if ms > 0 else None,
    }


def project_energy(ms: float, nbytes: int, device: DeviceModel) -> dict:
    """mJ for one step of `ms` that reads `nbytes`: sustained power x time, and the DRAM-traffic floor."""
    power_mj = device.sustained_w * ms if device.sustained_w is not None else None  # W x ms = mJ
    dram_mj = nbytes * device.dram_pj_per_byte * 1e-9 if device.dram_pj_per_byte is not None else None  # pJ -> mJ
    return {
        "mj": power_mj,
        "dram_floor_mj": dram_mj,
        "basis": f"sustained {device.sustained_w} W x projected time; DRAM floor {device.dram_pj_per_byte} pJ/byte x bytes",
    }


def memory_fit(facts: ModelFacts, device: DeviceModel, context: int) -> dict:
    weights_mb = facts.initializer_bytes / 1e6
    kv_mb = facts.kv_bytes(context) / 1e6
    total = weights_mb + kv_mb + device.overhead_mb
    limit = device.app_memory_limit_mb
    return {
        "context": context,
        "weights_mb": round(weights_mb, 3),
        "kv_mb": round(kv_mb, 3),
        "overhead_mb": device.overhead_mb,
        "total_mb": round(total, 3),
        "limit_mb": limit,
        "fits": None if limit is None else total <= limit,
        "headroom_mb": None if limit is None else round(limit - total, 3),
    }
