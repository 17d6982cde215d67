"""What one decoded token costs a model built for a target, from its architecture alone.

The same `ModelFacts` the ONNX graph gives (`model_facts.py`), derived instead from the shapes of a
configuration and the way each target stores weights and keys/values, so that `edgepack estimate`
projects a model that was never built, and a build projects the Core ML and QNN artifacts (whose
programs are not ONNX graphs) onto the compute units that run them.

How each target stores a decoder (bits per weight count block scales, zero points and offsets):

* ort, ort-mobile (CPU; the cache is fp32 and grows with the position):
  fp32 / fp16: 32 / 16 bits; int8-weight: 8-bit codes in two 4-bit planes with an fp16 scale each per 32
  (9 bits), embedding and lm_head int8 with an fp16 scale per 32; int4 (default): 4-bit with an fp16 scale
  and an fp32 block minimum per 32 (5.5 bits), embedding and lm_head as int8-weight's (a tied table once);
  int8-dynamic / int8-static: 8 bits per channel; gguf: the GGUF's own tensors, byte for byte.
* coreml, fixed program (Neural Engine): fp16 / int8 / int4-block / palettize4 at 16 / 8 / 5 / 4 bits, the
  embedding as the matrices or int8; an fp16 state of max_context slots (head_dim padded to 32) that every
  call reads whole. The flexible program (GPU, CPU) stores the same weights; its cache grows with the position.
* qnn (Hexagon NPU): w8a16 / w4a16 / w8a8 / fp16 at 8 / 4 / 8 / 16 bits per channel, embedding 8 bits per
  tensor (fp16: 16); a 16-bit (a8: 8-bit) cache of max_context slots that every call reads whole.

The ort rows are those `edgepack quantize` writes (the test compares them with real quantized graphs);
the nodes onnxruntime runs per call, which the CPU projection charges a dispatch cost for, follow the
optimum export: a fixed part plus a count per layer (the test compares them too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgepack.errors import UsageError
from edgepack.profiles.architecture import Architecture
from edgepack.profiles.model_facts import ModelFacts

TARGETS = ("ort", "ort-mobile", "coreml", "qnn")
UNITS = ("cpu", "gpu", "ane", "htp")
UNIT_NAMES = {"cpu": "CPU", "gpu": "GPU", "ane": "Neural Engine", "htp": "Hexagon NPU (HTP)"}
# target -> schemes `estimate` takes, then generic names it maps onto each target's own
TARGET_SCHEMES = {
    "ort": ("fp32", "fp16", "int8-weight", "int8-dynamic", "int8-static", "int4", "gguf"),
    "coreml": ("fp16", "int8", "int4-block", "palettize4"),
    "qnn": ("w8a16", "w4a16", "w8a8", "fp16"),
}
TARGET_SCHEMES["ort-mobile"] = TARGET_SCHEMES["ort"]
GENERIC_SCHEMES = {
    "coreml": {"fp32": "fp16", "none": "fp16", "int8-weight": "int8", "int4": "int4-block"},
    "qnn": {"int8": "w8a16", "int8-weight": "w8a16", "int4": "w4a16", "fp32": "fp16"},
    "ort": {"int8": "int8-weight"},
    "ort-mobile": {"int8": "int8-weight"},
}
COREML_UNITS = {"cpu_and_ne": "ane", "all": "ane", "cpu_and_gpu": "gpu", "cpu_only": "cpu"}
# onnxruntime nodes per call of an optimum decoder export, as edgepack's quantizers leave it: fixed + per layer.
# From the SmolLM2 (30 layers) and tiny llama (2 layers) graphs; nodes computed from constants only are not counted.
ORT_NODES = {"fp32": (71, 154.7), "fp16": (71, 158.7), "int8-weight": (79, 168.7), "int8-dynamic": (71, 179.8),
             "int8-static": (71, 154.7), "int4": (79, 172.6), "gguf": (79, 172.6)}


@dataclass(frozen=True)
class Storage:
    """How a group of weights is stored: the format projection divides by, and bits per weight."""

    fmt: str  # fp32 | fp16 | int8 | int4
    bits: float
    label: str


FP32 = Storage("fp32", 32, "fp32")
FP16 = Storage("fp16", 16, "fp16")


@dataclass(frozen=True)
class TargetLayout:
    """How one target stores a decoder and runs its cache."""

    target: str
    scheme: str
    unit: str
    linear: Storage
    lm_head: Storage
    embedding: Storage
    kv_bytes: float  # bytes per cached value
    kv_fixed: bool  # a static program: the cache holds `context` slots and every call reads all of them
    prefill_chunk: int | None = None  # tokens per prefill call of a static program
    head_dim_multiple: int = 1  # Core ML pads the state's head dimension to this multiple
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        return {
            "target": self.target, "scheme": self.scheme, "unit": self.unit,
            "linear": self.linear.label, "lm_head": self.lm_head.label, "embedding": self.embedding.label,
            "bits_per_weight": {"linear": self.linear.bits, "lm_head": self.lm_head.bits, "embedding": self.embedding.bits},
            "kv_cache": f"{self.kv_bytes * 8:g}-bit, " + ("fixed slots, all read every call" if self.kv_fixed else "grows with the position"),
            "notes": list(self.notes),
        }


def resolve_scheme(target: str, scheme: str) -> str:
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; `edgepack estimate` costs {', '.join(TARGETS)}")
    own = GENERIC_SCHEMES.get(target, {}).get(scheme, scheme)
    if own not in TARGET_SCHEMES[target]:
        raise UsageError(f"--scheme {scheme} does not apply to target {target}; choose one of {', '.join(TARGET_SCHEMES[target])} "
                         f"(or {', '.join(GENERIC_SCHEMES.get(target, {}))})")
    return own


def target_layout(target: str, scheme: str, unit: str | None = None, embedding: str | None = None,
                  prefill_chunk: int | None = None) -> TargetLayout:
    """The layout of `scheme` on `target`, run on `unit` (default: the target's own compute unit)."""
    scheme = resolve_scheme(target, scheme)
    if target in ("ort", "ort-mobile"):
        return _ort_layout(target, scheme, unit or "cpu")
    if target == "coreml":
        return _coreml_layout(scheme, unit or "ane", embedding, prefill_chunk)
    return _qnn_layout(scheme, unit or "htp", prefill_chunk)


def _ort_layout(target: str, scheme: str, unit: str) -> TargetLayout:
    if unit != "cpu":
        raise UsageError(f"target {target} runs on the CPU (onnxruntime's CPU provider), not on the {UNIT_NAMES.get(unit, unit)}")
    int8_block = Storage("int8", 8 + 16 / 32, "int8 blocks of 32, fp16 scales")
    layouts = {
        "fp32": (FP32, FP32, FP32, 4.0),
        "fp16": (FP16, FP16, FP16, 4.0),  # keep_io_types: the cache stays fp32 at the graph's inputs
        "int8-weight": (Storage("int8", 9.0, "int8 blocks of 32 as two 4-bit planes, fp16 scales"), int8_block, int8_block, 4.0),
        "int8-dynamic": (Storage("int8", 8.0, "int8 per channel"), Storage("int8", 8.0, "int8 per channel"), FP32, 4.0),
        "int8-static": (Storage("int8", 8.0, "int8 per channel (QDQ)"), Storage("int8", 8.0, "int8 per channel"), Storage("int8", 8.0, "int8"), 4.0),
        "int4": (Storage("int4", 4 + 16 / 32 + 32 / 32, "uint4 blocks of 32, fp16 scale, fp32 block minimum"), int8_block, int8_block, 4.0),
        "gguf": (Storage("int4", 5.0, "the GGUF's blocks"), Storage("int8", 8.5, "the GGUF's blocks"), Storage("int8", 8.5, "the GGUF's blocks"), 4.0),
    }
    linear, lm_head, emb, kv = layouts[scheme]
    notes = ("gguf: bytes of the GGUF's own tensors when MODEL is a .gguf file",) if scheme == "gguf" else ()
    return TargetLayout(target, scheme, unit, linear, lm_head, emb, kv, kv_fixed=False, notes=notes)


def _coreml_layout(scheme: str, unit: str, embedding: str | None, prefill_chunk: int | None) -> TargetLayout:
    if unit not in ("ane", "gpu", "cpu"):
        raise UsageError(f"a Core ML package runs on the Neural Engine, GPU or CPU, not on the {UNIT_NAMES.get(unit, unit)}")
    weights = {
        "fp16": FP16,
        "int8": Storage("int8", 8.0, "int8 per channel"),
        "int4-block": Storage("int4", 4 + 32 / 32, "uint4 blocks of 32, fp16 scale and offset"),
        "palettize4": Storage("int4", 4.0, "4-bit palette indices"),
    }[scheme]
    emb = {"int8": Storage("int8", 8.0, "int8 per row"), None: weights, "same": weights}.get(embedding, weights)
    fixed = unit == "ane"  # the Neural Engine program has fixed shapes; GPU and CPU get the flexible one
    notes = ["fp16 state of max_context slots, head_dim padded to a multiple of 32; the decode function attends over "
             "every slot under the mask, and writes the cache as cache * (1 - written) + new: the whole state is read "
             "twice and written once per call"] if fixed else []
    return TargetLayout("coreml", scheme, unit, weights, emb, emb, 2.0, kv_fixed=fixed,
                        prefill_chunk=(prefill_chunk or 64) if fixed else None, head_dim_multiple=32 if fixed else 1, notes=tuple(notes))


def _qnn_layout(scheme: str, unit: str, prefill_chunk: int | None) -> TargetLayout:
    if unit != "htp":
        raise UsageError(f"a QNN bundle runs on the Hexagon NPU (htp), not on the {UNIT_NAMES.get(unit, unit)}")
    weights, act = {"w8a16": (Storage("int8", 8.0, "int8 per channel"), 2.0), "w4a16": (Storage("int4", 4.0, "int4 per channel"), 2.0),
                    "w8a8": (Storage("int8", 8.0, "int8 per channel"), 1.0), "fp16": (FP16, 2.0)}[scheme]
    emb = FP16 if scheme == "fp16" else Storage("int8", 8.0, "int8 per tensor")
    lm_head = weights if scheme != "w4a16" else Storage("int8", 8.0, "int8 per channel")
    return TargetLayout("qnn", scheme, unit, weights, lm_head, emb, act, kv_fixed=True, prefill_chunk=prefill_chunk or 32,
                        notes=("static graphs over max_context cache slots: every call reads the whole cache",))


def layout_from_target_json(data: dict) -> TargetLayout:
    """The layout of a built coreml, qnn or executorch bundle, from its target.json facts."""
    facts = data.get("facts") or {}
    target = data.get("target")
    if target == "coreml":
        config = facts.get("config") or {}
        compress = config.get("compress") or "none"
        fixed = bool(facts.get("program"))
        unit = "ane" if fixed else COREML_UNITS.get(config.get("compute_units") or "all", "gpu")
        if unit == "ane" and not fixed:
            unit = "gpu"
        scheme = {"none": "fp16"}.get(compress, compress)
        if scheme not in TARGET_SCHEMES["coreml"]:
            scheme = "int4-block"
        return _coreml_layout(scheme, unit, config.get("embedding"), (facts.get("program") or {}).get("prefill_chunk"))
    if target == "qnn":
        precision = facts.get("precision") or "w8a16"
        return _qnn_layout(precision if precision in TARGET_SCHEMES["qnn"] else "w8a16", "htp", facts.get("prefill_len"))
    if target == "executorch":
        return _executorch_layout(facts)
    raise UsageError(f"no cost layout for target {target!r}")


def _executorch_layout(facts: dict) -> TargetLayout:
    """An ExecuTorch program, from its target.json facts: XNNPACK on the CPU, the Core ML delegate on the Neural
    Engine (one token a call over a fixed fp16 cache), the QNN delegate on the HTP."""
    backend = facts.get("backend") or "xnnpack"
    quantization = facts.get("quantization") or {}
    scheme = quantization.get("scheme") or "none"
    group = quantization.get("group_size") or 32
    weights = {
        "none": FP32 if backend == "xnnpack" else FP16,
        "8da4w": Storage("int4", 4 + 32 / group, f"int4 groups of {group}, fp32 scales (int8 activations)"),
        "8da8w": Storage("int8", 8.0, "int8 per channel (int8 activations)"),
        "int8-weight": Storage("int8", 8.0, "int8 per channel"),
        "int4-weight": Storage("int4", 4 + 32 / group, f"int4 groups of {group}, fp32 scales"),
    }.get(scheme, FP32)
    embedding = {"int8": Storage("int8", 8.0, "int8 per row"), "int4": Storage("int4", 4 + 32 / 32, "int4 groups of 32")}.get(
        quantization.get("embedding") or "none", weights if scheme == "none" else FP32)
    if backend == "coreml":
        return TargetLayout("executorch", scheme, "ane", weights, weights, embedding, 2.0, kv_fixed=True, prefill_chunk=1,
                            notes=("Core ML delegate: one token a call over a fixed fp16 cache of max_context slots",))
    if backend == "qnn":
        return TargetLayout("executorch", scheme, "htp", weights, weights, embedding, 2.0, kv_fixed=True, prefill_chunk=1)
    # ExecuTorch's LLM kernels read only the filled part of the cache; transformers' static cache is read whole.
    fixed = not (facts.get("io") or {}).get("custom_kernels")
    return TargetLayout("executorch", scheme, "cpu", weights, weights, embedding, 4.0, kv_fixed=fixed,
                        notes=("XNNPACK delegate, one program for prefill and decode",))


def facts_for(arch: Architecture, layout: TargetLayout, context: int | None = None) -> ModelFacts:
    """ModelFacts of `arch` stored as `layout` (context: the static programs' cache slots)."""
    by_format: dict[str, float] = {}
    weights: dict[str, int] = {}

    def add(storage: Storage, params: float, matrices: int = 0):
        by_format[storage.fmt] = by_format.get(storage.fmt, 0.0) + params * storage.bits / 8
        if matrices:
            weights[storage.fmt] = weights.get(storage.fmt, 0) + matrices

    matrices = arch.linear_matrices()
    per_layer = [(i, o) for role, i, o in matrices if role != "lm_head"]
    add(layout.linear, sum(i * o for i, o in per_layer), len(per_layer))
    gguf = _gguf_bytes(arch) if layout.scheme == "gguf" else None
    gathered = 0.0
    held = 0.0
    if gguf is not None:  # the GGUF's own tensors, byte for byte
        by_format = {}
        for fmt, nbytes in gguf["per_token"].items():
            by_format[fmt] = nbytes
        gathered, held = gguf["gathered"], gguf["held"]
    if layout.scheme != "gguf" or gguf is None:
        add(layout.lm_head, arch.embedding_params, 1)
        if not arch.tied_embeddings:
            row = layout.embedding.bits / 8 * arch.hidden_size  # one row per token
            by_format[layout.embedding.fmt] = by_format.get(layout.embedding.fmt, 0.0) + row
            gathered = row
            held = arch.embedding_params * layout.embedding.bits / 8 - row
    head_dim = math.ceil(arch.head_dim / layout.head_dim_multiple) * layout.head_dim_multiple
    kv_per_position = 2 * arch.layers * arch.kv_heads * head_dim * layout.kv_bytes
    slots = None
    if layout.kv_fixed:
        slots = context or min(arch.max_positions or 2048, 2048)
    nodes = 0
    if layout.unit == "cpu" and layout.target in ("ort", "ort-mobile"):
        base, per = ORT_NODES[layout.scheme]
        nodes = int(round(base + per * arch.layers))
    weight_bytes = sum(by_format.values())
    return ModelFacts(
        onnx_path="",
        file_bytes=int(weight_bytes + held),
        initializer_bytes=int(weight_bytes + held),
        weight_bytes_per_token=int(round(weight_bytes)),
        bytes_per_token_by_format={k: int(round(v)) for k, v in sorted(by_format.items())},
        gathered_bytes_per_token=int(round(gathered)),
        kv_bytes_per_position=int(kv_per_position),
        kv_layers=arch.layers,
        linear_flops_per_token=2 * sum(i * o for _, i, o in matrices),
        attention_flops_per_position=2 * 2 * arch.heads * arch.head_dim * arch.layers,
        nodes=nodes,
        weights_by_format=dict(sorted(weights.items())),
        max_context=arch.max_positions,
        kv_slots=slots,
        # the Core ML decode function reads the state for attention and again for the masked write, then writes it
        kv_traffic=3.0 if (layout.target == "coreml" and layout.kv_fixed) else 1.0,
        prefill_chunk=layout.prefill_chunk,
    )


_GGUF_FORMAT = {"F32": "fp32", "F16": "fp16", "BF16": "fp16", "Q8_0": "int8", "Q8_1": "int8", "Q8_K": "int8", "Q6_K": "int8",
                "Q5_0": "int8", "Q5_1": "int8", "Q5_K": "int8"}


def _gguf_bytes(arch: Architecture) -> dict | None:
    """Bytes read per token from a GGUF's own tensors (format: the kernel's class; 5/6-bit blocks stream like int8)."""
    if not arch.gguf_tensors:
        return None
    per_token: dict[str, float] = {}
    gathered = held = 0.0
    for tensor in arch.gguf_tensors:
        fmt = _GGUF_FORMAT.get(tensor.type_name, "int4")
        nbytes = float(tensor.bytes)
        if tensor.name == "token_embd.weight" and not arch.tied_embeddings:
            row = nbytes / arch.vocab_size
            gathered += row
            held += nbytes - row
            nbytes = row
        per_token[fmt] = per_token.get(fmt, 0.0) + nbytes
    return {"per_token": per_token, "gathered": gathered, "held": held}
