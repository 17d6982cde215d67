"""Decoder architectures the NPU targets (Core ML, QNN) take, and what each one needs: the one table.

Core ML traces its own forward pass (`coreml_support/wrappers.py`) over the Hugging Face modules, so it
must know every way an architecture departs from Llama; QNN starts from the optimum-onnx export, where
those differences are already in the graph, and uses this table only to accept or refuse a model_type.
Attention scaling (1/sqrt(head_dim), granite's attention_multiplier, gemma2's query_pre_attn_scalar) and
attention logit softcapping are read from the Hugging Face attention module itself (`scaling`,
`attn_logit_softcapping`), the activation from its MLP module (`act_fn`/`activation_fn`), and RoPE
(including rope_scaling and partial rotary dimensions) from the model's own rotary embedding: they need
no entry here.

Light module: no heavy imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgepack.errors import UnsupportedModelError


@dataclass(frozen=True)
class DecoderArch:
    """How one decoder family differs from Llama (the defaults are Llama's)."""

    fused_qkv: bool = False  # one qkv_proj instead of q_proj/k_proj/v_proj (phi3)
    fused_gate_up: bool = False  # one gate_up_proj, split in halves gate|up (phi3)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (qwen3: self_attn.q_norm/k_norm)
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight): gemma stores weights centred on 0
    embedding_scale: str | None = None  # "sqrt_hidden" (gemma) or a config key holding the factor (granite)
    sandwich_norms: bool = False  # norms after attention and around the MLP (gemma2: post_attention, pre/post_feedforward)
    residual_multiplier: str | None = None  # config key scaling each block's output before the residual add (granite)
    logits_divisor: str | None = None  # config key dividing the logits (granite: logits_scaling)
    final_softcap: str | None = None  # config key: logits = cap * tanh(logits / cap) (gemma2)
    note: str = ""

    def embedding_factor(self, config) -> float:
        if self.embedding_scale == "sqrt_hidden":
            return math.sqrt(float(_get(config, "hidden_size")))
        return float(_get(config, self.embedding_scale, 1.0)) if self.embedding_scale else 1.0

    def residual_factor(self, config) -> float:
        return float(_get(config, self.residual_multiplier, 1.0)) if self.residual_multiplier else 1.0

    def logits_factor(self, config) -> float:
        return 1.0 / float(_get(config, self.logits_divisor, 1.0)) if self.logits_divisor else 1.0

    def logit_softcap(self, config) -> float | None:
        cap = _get(config, self.final_softcap, None) if self.final_softcap else None
        return float(cap) if cap else None

    def attention_modules(self) -> tuple[str, ...]:
        names = ("qkv_proj", "o_proj") if self.fused_qkv else ("q_proj", "k_proj", "v_proj", "o_proj")
        return names + (("q_norm", "k_norm") if self.qk_norm else ())

    def mlp_modules(self) -> tuple[str, ...]:
        return ("gate_up_proj", "down_proj") if self.fused_gate_up else ("gate_proj", "up_proj", "down_proj")

    def layer_norms(self) -> tuple[str, ...]:
        if self.sandwich_norms:
            return ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
        return ("input_layernorm", "post_attention_layernorm")


DECODERS: dict[str, DecoderArch] = {
    "llama": DecoderArch(),
    "mistral": DecoderArch(note="sliding-window attention when config.sliding_window is set"),
    "qwen2": DecoderArch(note="q/k/v projections with bias; sliding window only with use_sliding_window"),
    "qwen3": DecoderArch(qk_norm=True),
    "phi3": DecoderArch(fused_qkv=True, fused_gate_up=True, note="may set sliding_window (Phi-3-mini-4k: 2047)"),
    "gemma": DecoderArch(norm_offset=1.0, embedding_scale="sqrt_hidden", note="gelu (tanh) MLP, tied embeddings"),
    "gemma2": DecoderArch(norm_offset=1.0, embedding_scale="sqrt_hidden", sandwich_norms=True, final_softcap="final_logit_softcapping",
                          note="attention softcap and query_pre_attn_scalar from the attention module; every other layer sliding-window"),
    "granite": DecoderArch(embedding_scale="embedding_multiplier", residual_multiplier="residual_multiplier", logits_divisor="logits_scaling",
                           note="attention_multiplier replaces 1/sqrt(head_dim) (the attention module's `scaling`)"),
}
DECODER_TYPES = tuple(DECODERS)
# Activations (config hidden_act / hidden_activation) coremltools 9.0 converts from the traced module.
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new")


def _get(config, key: str, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def supported_decoders() -> str:
    return ", ".join(DECODER_TYPES)


def sliding_window(config: dict) -> int | None:
    """The attention window of the model's sliding-window layers, or None if every layer sees the whole sequence.

    `layer_types` (transformers' per-layer list) decides when the config has it; otherwise mistral, phi3 and
    gemma2 slide whenever `sliding_window` is set, qwen2/qwen3 only with `use_sliding_window`.
    """
    window = _get(config, "sliding_window")
    if not window:
        return None
    types = _get(config, "layer_types")
    if types:
        return int(window) if "sliding_attention" in types else None
    if _get(config, "model_type") in ("qwen2", "qwen3"):
        return int(window) if _get(config, "use_sliding_window", False) else None
    return int(window)


def check_decoder(config: dict, context: int, target: str) -> dict:
    """Refuse a decoder the NPU targets do not take, or a context its sliding window would cut; facts for target.json.

    A query at position q sees keys at q - window + 1 .. q (transformers' sliding mask), so with
    context <= window the window never removes a key and every layer is plain causal attention.
    """
    model_type = _get(config, "model_type", "")
    if model_type not in DECODERS:
        raise UnsupportedModelError(f"model_type {model_type!r}: target {target} takes the decoders {supported_decoders()}")
    window = sliding_window(config)
    if window is None:
        return {"sliding_window": None}
    if context > window:
        raise UnsupportedModelError(
            f"model_type {model_type!r}: --max-context {context} is above the sliding window ({window}); target {target} "
            f"builds full causal attention, which matches the model only up to {window} tokens: pass --max-context {window} or less")
    return {"sliding_window": {"window": window, "active": False,
                               "note": f"context {context} <= window {window}: the window removes no key, every layer attends to the whole cache"}}
