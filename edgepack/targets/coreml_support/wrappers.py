"""PyTorch modules that coremltools can trace: the Hugging Face weights, our own forward.

transformers' own attention-mask and cache code breaks `torch.jit.trace` (and `torch.export`) in
coremltools 9.0 / transformers 4.57, so the forward pass is written here explicitly, re-using the
model's own `nn.Linear`/`nn.Embedding`/norm weights:

* `StatefulDecoder` (Llama family: llama, mistral, qwen2): the KV cache is two registered buffers that
  become Core ML states (`ct.StateType`, iOS 18), updated by slice assignment; inputs are
  `input_ids` (1, q) and an explicit additive `causal_mask` (1, 1, q, end) whose last dimension says how
  long the sequence is after this call (`past = end - q`), the layout of Apple's stateful Llama example.
  Prefill is q > 1, decode q = 1, with the same function.
* `Encoder` (BERT): `input_ids`, `attention_mask` (1, n) -> last hidden state (1, n, hidden).

The fp16 safety pass (`fp16.py`) decides which norms and projections run in a rescaled form: the
rewritten ops compute the same function in exact arithmetic but keep fp16 intermediates in range.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DECODER_TYPES = ("llama", "mistral", "qwen2")
ENCODER_TYPES = ("bert",)


def rms_norm(x, weight, eps: float, rescale: bool):
    """RMSNorm; `rescale` divides by max|x| first so x^2 cannot overflow fp16 (same result in exact arithmetic)."""
    if rescale:
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4)
        x = x / scale
        variance = (x * x).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(variance + eps / (scale * scale)))
    variance = (x * x).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def layer_norm(x, weight, bias, eps: float, rescale: bool):
    """LayerNorm written out; `rescale` normalises by max|x - mean| before squaring."""
    mean = x.mean(-1, keepdim=True)
    centered = x - mean
    if rescale:
        scale = centered.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4)
        centered = centered / scale
        variance = (centered * centered).mean(-1, keepdim=True)
        return weight * (centered * torch.rsqrt(variance + eps / (scale * scale))) + bias
    variance = (centered * centered).mean(-1, keepdim=True)
    return weight * (centered * torch.rsqrt(variance + eps)) + bias


class StatefulDecoder(nn.Module):
    def __init__(self, hf_model, max_context: int, plan=None):
        super().__init__()
        config = hf_model.config
        self.plan = plan  # fp16.SafetyPlan or None
        inner = hf_model.model
        self.embed_tokens = inner.embed_tokens
        self.layers = inner.layers
        self.norm = inner.norm
        self.lm_head = hf_model.lm_head
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = float(getattr(config, "rms_norm_eps", 1e-6))
        self.max_context = max_context
        shape = (config.num_hidden_layers, 1, self.num_kv_heads, max_context, self.head_dim)
        self.register_buffer("key_cache", torch.zeros(shape, dtype=torch.float32))
        self.register_buffer("value_cache", torch.zeros(shape, dtype=torch.float32))
        cos, sin = rope_tables(hf_model, max_context)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _rescale(self, name: str) -> bool:
        return self.plan is not None and name in self.plan.rescale_norms

    @torch.no_grad()
    def forward(self, input_ids, causal_mask):
        q_len = input_ids.shape[1]
        end = causal_mask.shape[-1]
        past = end - q_len
        hidden = self.embed_tokens(input_ids)
        cos = self.rope_cos[past:end].view(1, 1, q_len, self.head_dim)
        sin = self.rope_sin[past:end].view(1, 1, q_len, self.head_dim)
        groups = self.num_heads // self.num_kv_heads
        for index, layer in enumerate(self.layers):
            prefix = f"model.layers.{index}"
            attn = layer.self_attn
            x = rms_norm(hidden, layer.input_layernorm.weight, self.eps, self._rescale(f"{prefix}.input_layernorm"))
            q = attn.q_proj(x)
            k = attn.k_proj(x)
            v = attn.v_proj(x)
            q = q.view(1, q_len, self.num_heads, self.head_dim).transpose(1, 2)
            k = k.view(1, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(1, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            self.key_cache[index : index + 1, :, :, past:end, :] = k.unsqueeze(0)
            self.value_cache[index : index + 1, :, :, past:end, :] = v.unsqueeze(0)
            keys = self.key_cache[index, :, :, :end, :]
            values = self.value_cache[index, :, :, :end, :]
            if groups > 1:
                keys = keys.repeat_interleave(groups, dim=1)
                values = values.repeat_interleave(groups, dim=1)
            if self.plan is not None and prefix in self.plan.prescale_queries:
                # Scores overflow fp16: fold 1/sqrt(d) into q before the product (softmax sees the same values).
                scores = torch.matmul(q * (1.0 / math.sqrt(self.head_dim)), keys.transpose(-1, -2)) + causal_mask
                out = torch.matmul(torch.softmax(scores, dim=-1), values)
            else:
                out = nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=causal_mask)
            out = out.transpose(1, 2).reshape(1, q_len, self.num_heads * self.head_dim)
            hidden = hidden + attn.o_proj(out)
            mlp = layer.mlp
            x = rms_norm(hidden, layer.post_attention_layernorm.weight, self.eps, self._rescale(f"{prefix}.post_attention_layernorm"))
            gate = mlp.gate_proj(x)
            up = mlp.up_proj(x)
            divisor = None if self.plan is None else self.plan.mlp_divisors.get(prefix)
            if divisor:  # act(gate) * up overflows fp16: shrink the product, grow the projection back
                act = nn.functional.silu(gate) * (up * (1.0 / divisor))
                hidden = hidden + mlp.down_proj(act) * divisor
            else:
                hidden = hidden + mlp.down_proj(nn.functional.silu(gate) * up)
        hidden = rms_norm(hidden, self.norm.weight, self.eps, self._rescale("model.norm"))
        return self.lm_head(hidden)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(hf_model, max_context: int):
    """cos/sin (max_context, head_dim) from the model's own rotary embedding (so rope_scaling is honoured)."""
    rotary = hf_model.model.rotary_emb
    positions = torch.arange(max_context, dtype=torch.int64)[None]
    dummy = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(dummy, positions)
    return cos[0].float().contiguous(), sin[0].float().contiguous()


class Encoder(nn.Module):
    """BERT: embeddings + post-norm encoder layers, written out with an explicit additive mask."""

    def __init__(self, hf_model, plan=None):
        super().__init__()
        self.model = hf_model
        self.plan = plan
        config = hf_model.config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.eps = float(config.layer_norm_eps)
        self.act = getattr(config, "hidden_act", "gelu")

    def _rescale(self, name: str) -> bool:
        return self.plan is not None and name in self.plan.rescale_norms

    @torch.no_grad()
    def forward(self, input_ids, attention_mask):
        emb = self.model.embeddings
        n = input_ids.shape[1]
        positions = emb.position_ids[:, :n]
        hidden = emb.word_embeddings(input_ids) + emb.position_embeddings(positions)
        hidden = hidden + emb.token_type_embeddings.weight[0]
        ln = emb.LayerNorm
        hidden = layer_norm(hidden, ln.weight, ln.bias, self.eps, self._rescale("embeddings.LayerNorm"))
        additive = (1.0 - attention_mask.to(hidden.dtype)).view(1, 1, 1, n) * -1e4
        for index, layer in enumerate(self.model.encoder.layer):
            prefix = f"encoder.layer.{index}"
            att = layer.attention.self

            def heads(t):
                return t.view(1, n, self.num_heads, self.head_dim).transpose(1, 2)

            q = heads(att.query(hidden))
            k = heads(att.key(hidden))
            v = heads(att.value(hidden))
            scores = torch.matmul(q * (1.0 / math.sqrt(self.head_dim)), k.transpose(-1, -2)) + additive
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(1, n, self.num_heads * self.head_dim)
            out = layer.attention.output
            x = out.dense(ctx) + hidden
            hidden = layer_norm(x, out.LayerNorm.weight, out.LayerNorm.bias, self.eps, self._rescale(f"{prefix}.attention.output.LayerNorm"))
            inter = layer.intermediate.dense(hidden)
            inter = nn.functional.gelu(inter, approximate="tanh" if self.act in ("gelu_new", "gelu_pytorch_tanh") else "none")
            out = layer.output
            x = out.dense(inter) + hidden
            hidden = layer_norm(x, out.LayerNorm.weight, out.LayerNorm.bias, self.eps, self._rescale(f"{prefix}.output.LayerNorm"))
        return hidden
