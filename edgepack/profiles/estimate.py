"""`edgepack estimate`: a model's per-token costs and device projections from its configuration alone.

No weights, no build, no torch or onnxruntime: the shapes come from config.json or a GGUF header
(`architecture.py`), the bytes from how the chosen target stores the chosen scheme (`costs.py`), the
times, energy and memory fit from the device database (`roofline.py`). The JSON it writes has
profile.json's `projections` (kind `estimated`), so `edgepack check` gates it with the same budgets.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from edgepack.errors import UsageError
from edgepack.options import option
from edgepack.profiles.costs import TARGETS, UNITS

ESTIMATE_SCHEMA_VERSION = 1
DEFAULT_DEVICES = ("galaxy-s24", "iphone-15-pro", "raspberry-pi-5")
DEFAULT_CONTEXT = 2048


@dataclass(frozen=True)
class EstimateConfig:
    scheme: str = option("int4", metavar="S", help="Scheme as the target stores it: ort/ort-mobile fp32, fp16, int8-weight, int8-dynamic, "
                         "int8-static, int4, gguf; coreml fp16, int8, int4-block, palettize4; qnn w8a16, w4a16, w8a8, fp16. "
                         "int4/int8/fp32 map onto each target's own.")
    target: str = option("ort", choices=TARGETS, help="The artifact to cost: its weight format, cache layout and compute unit.")
    unit: str | None = option(None, choices=UNITS, help="Compute unit (default: the target's own: ort cpu, coreml ane, qnn htp; "
                              "coreml also gpu or cpu).")
    devices: tuple[str, ...] = option((), cli="--device", metavar="ID",
                                      help=f"Device id (repeatable; default: {', '.join(DEFAULT_DEVICES)}). `all` for every device with the unit.")
    devices_dirs: tuple[str, ...] = option((), cli="--devices-dir", metavar="DIR", help="Extra folder of device TOML files (repeatable).")
    context: int | None = option(None, min=2, unit="tokens", help=f"Context for the memory fit, and the cache slots of static programs "
                                 f"(coreml on the ANE, qnn) (default: {DEFAULT_CONTEXT}, capped at the model's positions).")
    prompt_len: int = option(128, min=1, unit="tokens", help="Prompt length for TTFT.")
    gen_len: int = option(64, min=2, unit="tokens", help="Generated tokens; decode is projected at the mean position.")
    prefill_chunk: int | None = option(None, min=1, unit="tokens", help="Static programs: tokens per prefill call (default: coreml 64, qnn 32).")

    def __post_init__(self):
        if self.devices and "all" in self.devices and len(self.devices) > 1:
            raise UsageError("--device all takes no other --device")


@dataclass
class EstimateResult:
    report: dict


def estimate_model(model: Path | str, config: EstimateConfig = EstimateConfig()) -> EstimateResult:
    """Cost MODEL (a folder, config.json or .gguf) as `config.target` stores `config.scheme` and project it."""
    from edgepack.profiles.architecture import read_architecture
    from edgepack.profiles.costs import facts_for, target_layout
    from edgepack.profiles.devices import get_device, load_devices
    from edgepack.profiles.projection import project_device

    layout = target_layout(config.target, config.scheme, config.unit, prefill_chunk=config.prefill_chunk)
    arch = read_architecture(model)
    if config.scheme == "gguf" and not arch.gguf_tensors:
        raise UsageError("--scheme gguf costs a GGUF's own blocks: pass the .gguf file as MODEL")
    context = config.context or min(arch.max_positions or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
    if arch.max_positions and context > arch.max_positions:
        raise UsageError(f"--context {context} exceeds the model's {arch.max_positions} positions")
    if config.prompt_len + config.gen_len > context:
        raise UsageError(f"--prompt-len {config.prompt_len} + --gen-len {config.gen_len} exceeds the context {context}")
    facts = facts_for(arch, layout, context)
    known = load_devices(list(config.devices_dirs))
    if config.devices == ("all",):
        chosen = [d for d in known.values() if d.has_unit(layout.unit)]
    else:
        chosen = [get_device(d, known) for d in (config.devices or DEFAULT_DEVICES)]
    projections = {d.id: project_device(facts, d, (config.prompt_len,), config.gen_len, context, unit=layout.unit, kind="estimated")
                   for d in chosen}
    report = {
        "schema_version": ESTIMATE_SCHEMA_VERSION,
        "kind": "edgepack.estimate",
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {
            "dir": str(model),
            "architecture": arch.to_json(),
            "scheme": layout.scheme,
            "target": layout.target,
            "unit": layout.unit,
            "layout": layout.to_json(),
            "facts": facts.to_json(),
        },
        "estimate": {
            "params": arch.params,
            "weight_bytes": facts.initializer_bytes,
            "weight_bytes_per_token": facts.weight_bytes_per_token,
            "kv_bytes_per_position": facts.kv_bytes_per_position,
            "context": context,
            "kv_bytes_at_context": facts.kv_bytes(context),
            "prompt_len": config.prompt_len,
            "gen_len": config.gen_len,
        },
        "projections": projections,
    }
    return EstimateResult(report)
