"""One model's projection onto one device's compute unit, in the shape profile.json's `projections` hold.

Shared by `edgepack profile` (facts from the ONNX graph, the CPU), `edgepack estimate` (facts from a
configuration, any unit) and the build (Core ML and QNN artifacts on the units that run them).
Stdlib only at import: `edgepack estimate` must start fast.
"""

from __future__ import annotations

from edgepack.profiles.devices import Device
from edgepack.profiles.model_facts import ModelFacts

# device table -> the compute units whose projection reads it
_UNIT_TABLES = {"cpu": ("memory", "compute", "power", "efficiency", "runtime"), "ane": ("memory", "ane"),
                "gpu": ("memory", "gpu"), "htp": ("memory", "htp")}


def project_device(facts: ModelFacts, device: Device, prompt_lens, gen_len: int, context: int, unit: str = "cpu",
                   kind: str = "projected") -> dict:
    """Decode, prefill, energy and memory fit of `facts` on `device`'s `unit`, for each prompt length."""
    from edgepack.profiles.roofline import DeviceModel, memory_fit, project_decode, project_energy, project_prefill

    model = DeviceModel.for_unit(device, unit)
    by_len = []
    for prompt_len in prompt_lens:
        prefill = project_prefill(facts, model, prompt_len)
        position = prompt_len + gen_len // 2  # mean position of the decoded tokens
        decode = project_decode(facts, model, position)
        prefill_energy = project_energy(prefill["ms"], facts.decode_bytes(0), model)
        decode_energy = project_energy(decode["ms"], decode["bytes"], model)
        by_len.append({
            "prompt_len": prompt_len,
            "gen_len": gen_len,
            "ttft_ms": prefill["ms"],
            "prefill_tokens_per_s": prefill["tokens_per_s"],
            "decode_ms_per_token": decode["ms"],
            "tokens_per_s": 1e3 / decode["ms"] if decode["ms"] > 0 else None,
            "energy": {
                "kind": kind,
                "prefill_mj_per_token": None if prefill_energy["mj"] is None else prefill_energy["mj"] / prompt_len,
                "decode_mj_per_token": decode_energy["mj"],
                "decode_dram_floor_mj_per_token": decode_energy["dram_floor_mj"],
                "basis": decode_energy["basis"],
            },
            "prefill_detail": prefill,
            "decode_detail": decode,
        })
    efficiency = {f"decode_bandwidth_{k}": v for k, v in model.decode_efficiency.items()}
    efficiency["prefill_compute"] = model.prefill_efficiency
    return {
        "kind": kind,
        "unit": unit,
        "device": {"id": device.id, "name": device.name, "file": str(device.path), "class": device.device_class},
        "bandwidth_gb_s": model.bandwidth_gb_s,
        "efficiency": efficiency,
        "calibrated_curves": sorted(model.bandwidth_curves) if model.bandwidth_curves else [],
        "dispatch_us_per_node": model.dispatch_us_per_node,
        "call_overhead_ms": model.call_overhead_ms,
        "figures_verified": verified_summary(device, unit),
        "by_prompt_len": by_len,
        "memory_fit": memory_fit(facts, model, context),
    }


def verified_summary(device: Device, unit: str = "cpu") -> dict:
    """{table.key: verified} of the figures the unit's projection reads."""
    tables = _UNIT_TABLES.get(unit, _UNIT_TABLES["cpu"])
    return {f"{table}.{key}": fig.verified for table, figs in device.tables.items() for key, fig in figs.items() if table in tables}
