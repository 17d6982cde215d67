"""Projections of the artifacts no runtime here executes at device speed: a Core ML package on an Apple
device's Neural Engine (or GPU), a QNN bundle on a Snapdragon's Hexagon NPU, an ExecuTorch program on the
compute unit its delegate runs on (XNNPACK: the CPU).

Their programs are not ONNX graphs onnxruntime runs on this host, so their per-token costs come from the
model's shapes and the target's own storage (`costs.py`), scaled to the weight bytes the artifact
really holds (target.json), and their cache as the program keeps it (fixed slots, all read per call).
The result has profile.json's shape with no `host` section: the build checks it against the budgets of
the devices it is projected onto, and its quality is the target's own parity check against fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgepack.profiles.devices import Device

PROJECTED_TARGETS = ("coreml", "qnn", "executorch")


def eligible(data: dict, layout, device: Device) -> str | None:
    """Why `device` cannot run the artifact (None: it can)."""
    if data["target"] == "coreml":
        if not device.coreml:
            return "not an Apple device (no [coreml] table)"
        return None if device.has_unit(layout.unit) else f"no [{layout.unit}] figures"
    facts = data.get("facts") or {}
    if data["target"] == "executorch":
        if layout.unit == "ane" and not device.coreml:
            return "not an Apple device (no [coreml] table)"
        return None if device.has_unit(layout.unit) else f"no [{layout.unit}] figures"
    if not device.has_unit("htp"):
        return "no Hexagon NPU figures ([htp])"
    arch = device.value("qnn", "htp_arch")
    if facts.get("htp_arch") is not None and arch is not None and int(arch) != int(facts["htp_arch"]):
        return f"the context binary is compiled for htp_arch {facts['htp_arch']}, the device has v{int(arch)}"
    return None


def _weight_bytes(data: dict) -> int | None:
    """The weight bytes the artifact holds: Core ML's packages, QNN's context binary."""
    facts = data.get("facts") or {}
    packages = (facts.get("program") or {}).get("packages")
    if packages:
        return sum(int(p.get("weight_bytes") or 0) for p in packages) or None
    if data["target"] == "qnn" and facts.get("context_binary_bytes"):
        return int(facts["context_binary_bytes"])
    if data["target"] == "executorch" and facts.get("program_bytes"):
        return int(facts["program_bytes"])
    return None


def artifact_facts(bundle: Path, data: dict):
    """(ModelFacts, layout, architecture, context) of a built coreml/qnn bundle."""
    from dataclasses import replace

    from edgepack.profiles.architecture import from_config
    from edgepack.profiles.costs import facts_for, layout_from_target_json

    layout = layout_from_target_json(data)
    config = json.loads((bundle / "config.json").read_text())
    arch = from_config(config, str(bundle / "config.json"))
    facts_json = data.get("facts") or {}
    context = facts_json.get("max_context") or (facts_json.get("config") or {}).get("max_context") or min(arch.max_positions or 2048, 2048)
    facts = facts_for(arch, layout, int(context))
    held = _weight_bytes(data)
    if held:  # the artifact's real bytes, split over formats as its layout stores them
        scale = held / facts.initializer_bytes
        facts = replace(facts, initializer_bytes=held, weight_bytes_per_token=int(facts.weight_bytes_per_token * scale),
                        bytes_per_token_by_format={k: int(v * scale) for k, v in facts.bytes_per_token_by_format.items()})
    return replace(facts, onnx_path="", file_bytes=int(data.get("total_bytes") or facts.file_bytes)), layout, arch, int(context)


def project_artifact(bundle: Path | str, devices: list[Device], prompt_lens, gen_len: int) -> dict:
    """A profile (no host section) of the coreml/qnn bundle in `bundle` on those of `devices` that run it."""
    from edgepack.profiles.projection import project_device

    bundle = Path(bundle)
    data = json.loads((bundle / "target.json").read_text())
    facts, layout, arch, context = artifact_facts(bundle, data)
    projections, skipped = {}, {}
    for device in devices:
        reason = eligible(data, layout, device)
        if reason:
            skipped[device.id] = reason
            continue
        projections[device.id] = project_device(facts, device, prompt_lens, gen_len, min(context, arch.max_positions or context),
                                                unit=layout.unit)
    checks = data.get("checks") or {}
    # The check against fp32: executorch names it `quality` (its `parity` is against the same weights).
    named = [("quality", checks["quality"])] if "top1_agreement" in (checks.get("quality") or {}) else list(checks.items())
    parity = next((dict(check, name=name) for name, check in named if isinstance(check, dict) and "top1_agreement" in check), None)
    return {
        "schema_version": 1,
        "kind": "edgepack.profile",
        "model": {
            "dir": str(bundle.resolve()),
            "architecture": arch.to_json(),
            "scheme": f"{data['target']} {layout.scheme}",
            "target": data["target"],
            "unit": layout.unit,
            "layout": layout.to_json(),
            "facts": facts.to_json(),
        },
        "quality": None if parity is None else {
            "kind": "measured", "source": f"{bundle / 'target.json'} checks.{parity['name']} (the target's own parity check against fp32)",
            "kl_mean": parity.get("kl_mean"), "top1_agreement": parity.get("top1_agreement"), "evaluated": True,
        },
        "host": None,
        "projections": projections,
        "not_projected": skipped,
    }
