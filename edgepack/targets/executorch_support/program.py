"""The ExecuTorch program of a Hugging Face model: quantized with torchao, exported with `torch.export`, lowered
to a delegate (XNNPACK, Core ML, QNN) with ExecuTorch's own partitioners, and serialized as a `.pte`.

Everything here is ExecuTorch's and torchao's public API; what edgepack adds is the choice of wrapper per
model kind, the shapes each backend can take, and the delegation report. torch, transformers, torchao and
executorch are imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("xnnpack", "coreml", "qnn")
# Per backend, the quantization schemes its delegate runs (the first is the default for decoders).
#   8da4w: int8 dynamic activations, int4 weights in groups (ExecuTorch's LLM default on XNNPACK, KleidiAI on Arm)
#   8da8w: int8 dynamic activations, int8 per-channel weights
#   int8-weight / int4-weight: weight-only (Core ML turns them into its own constexpr compression ops)
# XNNPACK has no weight-only scheme here: this ExecuTorch lowers torchao's int8 weight-only layout to an XNNPACK
# program whose logits are wrong (the parity check catches it), so it is not offered.
SCHEMES = {
    "xnnpack": ("8da4w", "none", "8da8w"),
    "coreml": ("none", "int8-weight", "int4-weight"),
    "qnn": ("none",),
}
# Encoders are small and accuracy-sensitive: they stay unquantized unless asked (see `default_scheme`).
ENCODER_DEFAULT = "none"
# Graph nodes that are bookkeeping, not computation: not counted as fallbacks in the delegation report.
BOOKKEEPING_OPS = ("getitem", "alloc", "copy_", "output", "placeholder", "_assert_scalar", "sym_size", "_local_scalar_dense", "sym_constrain_range")


def default_scheme(backend: str, kind: str) -> str:
    return SCHEMES[backend][0] if kind == "decoder" else ENCODER_DEFAULT


@dataclass
class Delegation:
    """What the delegate took: node counts and, per operator, what stayed on ExecuTorch's portable CPU kernels."""

    backend: str
    subgraphs: int
    delegated_nodes: int
    fallback_nodes: int
    fallback_ops: dict[str, int] = field(default_factory=dict)  # operator -> nodes left outside the delegate

    @property
    def share(self) -> float:
        total = self.delegated_nodes + self.fallback_nodes
        return self.delegated_nodes / total if total else 0.0

    def to_json(self) -> dict:
        return {"backend": self.backend, "delegated_subgraphs": self.subgraphs, "delegated_nodes": self.delegated_nodes,
                "fallback_nodes": self.fallback_nodes, "delegated_share": round(self.share, 4), "fallback_ops": self.fallback_ops}


def load_model(hf_dir, kind: str):
    """The fp32 PyTorch model, gradients off (export needs inference tensors), and its tokenizer (None if absent)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from edgepack.errors import BadInputError

    cls = AutoModelForCausalLM if kind == "decoder" else AutoModel
    try:
        model = cls.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True, attn_implementation="sdpa").eval()
    except Exception as exc:
        raise BadInputError(f"transformers cannot load {hf_dir}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    model.requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    except Exception:
        tokenizer = None
    return model, tokenizer


EMBEDDINGS = ("auto", "none", "int8", "int4")


def embedding_scheme(requested: str, backend: str, scheme: str) -> str:
    """The token table's storage: auto = int8 per row for a quantized XNNPACK program, else as the source."""
    if requested != "auto":
        return requested
    return "int8" if backend == "xnnpack" and scheme != "none" else "none"


def quantize_embedding(model, embedding: str) -> object:
    """The token embedding table as ExecuTorch's quantized embedding (int8 per row, or int4 in groups of 32 with
    a scale each), run by ExecuTorch's quantized kernels; returns the model with it replaced. A table the lm_head
    shares stays whole for the lm_head (its own scheme quantizes it)."""
    if embedding == "none":
        return model
    import contextlib
    import sys

    import executorch.kernels.quantized  # noqa: F401  (registers quantized_decomposed::embedding_* with torch)
    from executorch.examples.models.llama.source_transformation.quantize import EmbeddingQuantHandler

    bits = 8 if embedding == "int8" else 4
    with contextlib.redirect_stdout(sys.stderr):  # the handler prints each table it replaces: library output, not edgepack's
        return EmbeddingQuantHandler(model, bitwidth=bits, group_size=None if bits == 8 else 32, packed=bits == 4,
                                     quantize_with_hqq=False).quantized_model()


def quantize_model(model, scheme: str, group_size: int) -> None:
    """Quantize the model's Linear layers in place with torchao, as ExecuTorch's own LLM export does."""
    if scheme == "none":
        return
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    configs = {
        "8da4w": lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size)),
        "8da8w": lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
        "int8-weight": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
        "int4-weight": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)),
    }
    # A Linear whose input width is not a multiple of the group cannot be grouped: it stays fp32.
    grouped = scheme in ("8da4w", "int4-weight")
    quantize_(model, configs[scheme](),
              filter_fn=lambda module, _fqn: isinstance(module, torch.nn.Linear) and (not grouped or module.in_features % group_size == 0))


def encoder_module(model):
    """An encoder as a module of (input_ids, attention_mask) -> last_hidden_state, the signature the .pte keeps."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Encoder(model).eval()


def uses_llm_ops(model, kind: str, backend: str) -> bool:
    """Whether the decoder gets ExecuTorch's LLM kernels (custom_sdpa, update_cache; see llm_ops): on XNNPACK, whose
    programs run on the CPU where those kernels live, for decoders whose attention they compute."""
    from edgepack.targets.executorch_support import llm_ops

    return kind == "decoder" and backend == "xnnpack" and llm_ops.supports(model.config)


def export_program(model, kind: str, context: int, dynamic: bool, llm_ops: bool = False):
    """`torch.export` of the model. Decoders: forward(input_ids, cache_position) -> logits, the signature of
    ExecuTorch's LLM runner, with the KV cache as mutable buffers (program state); with `llm_ops`, the cache and
    attention are ExecuTorch's LLM kernels, else transformers' ExecuTorch wrapper over its StaticCache. Encoders:
    (input_ids, attention_mask) -> last_hidden_state. `dynamic`: any query length up to the context (prefill and
    decode in one method); else fixed shapes (one decode token; encoders a full context)."""
    import torch

    if llm_ops:
        from edgepack.targets.executorch_support import llm_ops as ops

        return ops.export_decoder(model, context)
    if kind == "decoder":
        from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

        model.generation_config.cache_implementation = "static"
        wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=context)
        length = 2 if dynamic else 1
        ids, positions = torch.zeros((1, length), dtype=torch.long), torch.arange(length, dtype=torch.long)
        shapes = None
        if dynamic:
            seq = torch.export.Dim("seq", min=1, max=context - 1)
            shapes = {"input_ids": {1: seq}, "cache_position": {0: seq}}
        with torch.no_grad():
            return wrapper.export(input_ids=ids, cache_position=positions, dynamic_shapes=shapes, strict=True)
    module = encoder_module(model)
    length = 8 if dynamic else context
    ids, mask = torch.zeros((1, length), dtype=torch.long), torch.ones((1, length), dtype=torch.long)
    shapes = None
    if dynamic:
        seq = torch.export.Dim("seq", min=2, max=context)
        shapes = {"input_ids": {1: seq}, "attention_mask": {1: seq}}
    with torch.no_grad():
        return torch.export.export(module, (ids, mask), dynamic_shapes=shapes, strict=True)


def partitioners(backend: str, qnn_soc: str = "SM8650"):
    """ExecuTorch's partitioner for the backend (Core ML: fp16, iOS 18, all compute units)."""
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner()]
    if backend == "coreml":
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner

        specs = CoreMLBackend.generate_compile_specs(minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                                                     compute_unit=ct.ComputeUnit.ALL, model_type=CoreMLBackend.MODEL_TYPE.MODEL)
        # The KV-cache writes (index_put at the cache position) are ops Core ML's converter rejects on a
        # static cache: they stay on ExecuTorch's CPU kernels, the cache a program buffer they write in place.
        return [CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=False, skip_ops_for_coreml_delegation=["aten.index_put.default"])]
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
    from executorch.backends.qualcomm.utils.utils import generate_htp_compiler_spec, generate_qnn_executorch_compiler_spec, get_soc_to_chipset_map

    specs = generate_qnn_executorch_compiler_spec(soc_model=get_soc_to_chipset_map()[qnn_soc], backend_options=generate_htp_compiler_spec(use_fp16=True))
    return [QnnPartitioner(specs)]


def lower(exported, backend: str, constant_methods: dict):
    """The exported program lowered to `backend` and serialized: (ExecuTorch program manager, Delegation)."""
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    # _check_ir_validity off: torchao's quantize/dequantize ops are not core ATen but are what XNNPACK fuses.
    edge = to_edge_transform_and_lower(exported, partitioner=partitioners(backend), constant_methods=constant_methods or None,
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    info = get_delegation_info(edge.exported_program().graph_module)
    fallback = {op: b.non_delegated for op, b in sorted(info.delegation_by_operator.items())
                if b.non_delegated and not any(op == name or op.startswith(name) for name in BOOKKEEPING_OPS)}
    delegation = Delegation(backend, info.num_delegated_subgraphs, info.num_delegated_nodes, sum(fallback.values()), fallback)
    return edge.to_executorch(), delegation


def qnn_unavailable() -> str | None:
    """Why this host cannot lower to the QNN delegate (None: it can)."""
    import os
    import platform
    from pathlib import Path

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return "ExecuTorch's QNN lowering runs on x86_64 Linux hosts only"
    root = os.environ.get("QNN_SDK_ROOT")
    if not root or not (Path(root) / "lib" / "x86_64-linux-clang" / "libQnnHtp.so").is_file():
        return ("ExecuTorch's QNN backend compiles against the Qualcomm AI Engine Direct SDK: set QNN_SDK_ROOT to an SDK "
                "(lib/x86_64-linux-clang/libQnnHtp.so) of the version the executorch package was built with, on an x86_64 Linux host")
    try:
        import executorch.backends.qualcomm.python.PyQnnManagerAdaptor  # noqa: F401
    except ImportError as exc:
        return f"the executorch package has no QNN bindings ({exc}): build ExecuTorch with the QNN backend"
    return None
