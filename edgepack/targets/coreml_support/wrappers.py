"""PyTorch modules that coremltools can trace: the Hugging Face weights, our own forward.

transformers' own attention-mask and cache code breaks `torch.jit.trace` (and `torch.export`) in
coremltools 9.0 / transformers 4.57, so the forward pass is written here explicitly, re-using the
model's own `nn.Linear`/`nn.Embedding`/norm weights, activation modules, attention scaling and rotary tables:

* `StatefulDecoder` (the decoders of `edgepack/targets/architectures.py`: llama, mistral, qwen2, qwen3,
  phi3, gemma, gemma2, granite; that table says where each departs from Llama): the KV cache is two registered buffers that
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
    """Any decoder of `architectures.DECODERS`: the table says where it departs from Llama."""

    def __init__(self, hf_model, max_context: int, plan=None):
        super().__init__()
        from edgepack.targets.architectures import DECODERS

        config = hf_model.config
        self.arch = arch = DECODERS[config.model_type]
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
        attn = self.layers[0].self_attn
        # The attention module's own scaling: 1/sqrt(head_dim), granite's attention_multiplier, gemma2's query_pre_attn_scalar.
        self.attn_scale = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self.attn_softcap = getattr(attn, "attn_logit_softcapping", None)
        self.embed_factor = arch.embedding_factor(config)
        self.residual_factor = arch.residual_factor(config)
        self.logits_factor = arch.logits_factor(config)
        self.logit_softcap = arch.logit_softcap(config)
        shape = (config.num_hidden_layers, 1, self.num_kv_heads, max_context, self.head_dim)
        self.register_buffer("key_cache", torch.zeros(shape, dtype=torch.float32))
        self.register_buffer("value_cache", torch.zeros(shape, dtype=torch.float32))
        cos, sin = rope_tables(hf_model, max_context)
        self.rotary_dim = cos.shape[-1]  # < head_dim: partial rotary (the rest of each head passes through)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _rescale(self, name: str) -> bool:
        return self.plan is not None and name in self.plan.rescale_norms

    def _norm(self, module, x, name: str):
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or self.eps
        weight = module.weight + self.arch.norm_offset if self.arch.norm_offset else module.weight
        return rms_norm(x, weight, float(eps), self._rescale(name))

    def _rope(self, x, cos, sin):
        if self.rotary_dim == self.head_dim:
            return x * cos + rotate_half(x) * sin
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)

    def _qkv(self, attn, x, q_len: int, prefix: str):
        if self.arch.fused_qkv:
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            qkv = attn.qkv_proj(x)
            q, k, v = qkv[..., :q_size], qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :]
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(1, q_len, self.num_heads, self.head_dim)
        k = k.view(1, q_len, self.num_kv_heads, self.head_dim)
        v = v.view(1, q_len, self.num_kv_heads, self.head_dim)
        if self.arch.qk_norm:
            q = self._norm(attn.q_norm, q, f"{prefix}.self_attn.q_norm")
            k = self._norm(attn.k_norm, k, f"{prefix}.self_attn.k_norm")
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _mlp(self, mlp, x, prefix: str):
        if self.arch.fused_gate_up:
            gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        act = getattr(mlp, "act_fn", None) or mlp.activation_fn  # the model's own activation module
        divisor = None if self.plan is None else self.plan.mlp_divisors.get(prefix)
        if divisor:  # act(gate) * up overflows fp16: shrink the product, grow the projection back
            return mlp.down_proj(act(gate) * (up * (1.0 / divisor))) * divisor
        return mlp.down_proj(act(gate) * up)

    @torch.no_grad()
    def forward(self, input_ids, causal_mask):
        q_len = input_ids.shape[1]
        end = causal_mask.shape[-1]
        past = end - q_len
        cos = self.rope_cos[past:end].view(1, 1, q_len, self.rotary_dim)
        sin = self.rope_sin[past:end].view(1, 1, q_len, self.rotary_dim)

        def write_cache(index, k, v):
            self.key_cache[index : index + 1, :, :, past:end, :] = k.unsqueeze(0)
            self.value_cache[index : index + 1, :, :, past:end, :] = v.unsqueeze(0)
            return self.key_cache[index, :, :, :end, :], self.value_cache[index, :, :, :end, :]

        return self._decoder(input_ids, causal_mask, cos, sin, write_cache)

    def _decoder(self, input_ids, causal_mask, cos, sin, write_cache):
        """The decoder stack for `q` tokens: `write_cache(layer, k, v)` stores this call's keys and values and
        returns the keys and values attention reads (the cache up to the sequence end)."""
        hidden = self._layers(self._embed(input_ids), causal_mask, cos, sin, write_cache, range(len(self.layers)))
        return self._logits(self._norm(self.norm, hidden, "model.norm"))

    def _embed(self, input_ids):
        hidden = self.embed_tokens(input_ids)
        return hidden * self.embed_factor if self.embed_factor != 1.0 else hidden

    def _layers(self, hidden, causal_mask, cos, sin, write_cache, indices):
        """The decoder layers `indices` over the hidden states (1, q, hidden)."""
        q_len = hidden.shape[1]
        for index in indices:
            layer = self.layers[index]
            prefix = f"model.layers.{index}"
            attn = layer.self_attn
            x = self._norm(layer.input_layernorm, hidden, f"{prefix}.input_layernorm")
            q, k, v = self._qkv(attn, x, q_len, prefix)
            q = self._rope(q, cos, sin)
            k = self._rope(k, cos, sin)
            keys, values = write_cache(index, k, v)
            out = self._attend(q, keys, values, causal_mask, prefix)
            out = out.transpose(1, 2).reshape(1, q_len, self.num_heads * self.head_dim)
            out = attn.o_proj(out)
            if self.arch.sandwich_norms:
                out = self._norm(layer.post_attention_layernorm, out, f"{prefix}.post_attention_layernorm")
                hidden = hidden + out
                x = self._norm(layer.pre_feedforward_layernorm, hidden, f"{prefix}.pre_feedforward_layernorm")
                out = self._norm(layer.post_feedforward_layernorm, self._mlp(layer.mlp, x, prefix), f"{prefix}.post_feedforward_layernorm")
                hidden = hidden + out
                continue
            hidden = hidden + (out * self.residual_factor if self.residual_factor != 1.0 else out)
            x = self._norm(layer.post_attention_layernorm, hidden, f"{prefix}.post_attention_layernorm")
            out = self._mlp(layer.mlp, x, prefix)
            hidden = hidden + (out * self.residual_factor if self.residual_factor != 1.0 else out)
        return hidden

    def _attend(self, q, keys, values, causal_mask, prefix: str):
        """Attention of q (1, heads, q, head_dim) over the cache's keys and values (1, kv_heads, end, head_dim)."""
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
        default_scale = abs(self.attn_scale - self.head_dim ** -0.5) < 1e-9 and not self.attn_softcap
        if default_scale and not (self.plan is not None and prefix in self.plan.prescale_queries):
            return nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=causal_mask)
        return self._scores_softmax(q, keys, values, causal_mask)

    def _scores_softmax(self, q, keys, values, causal_mask):
        # The scale folded into q before the product (scores stay in fp16 range; softmax sees the same values),
        # then the model's own logit softcap if it has one (gemma2), then the mask.
        scores = torch.matmul(q * self.attn_scale, keys.transpose(-1, -2))
        if self.attn_softcap:
            scores = torch.tanh(scores * (1.0 / self.attn_softcap)) * self.attn_softcap
        return torch.matmul(torch.softmax(scores + causal_mask, dim=-1), values)

    def _logits(self, hidden):
        return self._scaled_logits(self.lm_head(hidden))

    def _scaled_logits(self, logits):
        """The model's own logits multiplier (granite) and final softcap (gemma2)."""
        if self.logits_factor != 1.0:
            logits = logits * self.logits_factor
        if self.logit_softcap:
            logits = torch.tanh(logits * (1.0 / self.logit_softcap)) * self.logit_softcap
        return logits


# The largest axis the Neural Engine of A16 and later takes (ane.ANE_AXIS_LIMIT_NEW): a larger vocabulary's
# logits are computed and returned in slices of at most this many tokens.
LOGITS_SLICE = 65536


class FixedShapeDecoder(StatefulDecoder):
    """The decoder with fixed shapes for the Neural Engine, which compiles static shapes only.

    Traced once per query length: a prefill chunk of `q` tokens and the one-token decode step, both over the
    whole KV cache. Inputs: `input_ids` (1, q) int32 (or, for a part after the first, `hidden_states`
    (1, q, hidden)); `causal_mask` (1, 1, q, context) fp16, additive (0 where
    query i may attend, verify.MASK_MIN elsewhere); `positions` (1, q, context) fp16 one-hot, row i with a 1 at the
    cache slot token i goes to (all zero for padding at the end of a last, partial chunk).
    The position arithmetic is done by the caller and enters as fp16 tensors, so the program holds no integer
    compute and no shape that depends on an input (apple/ml-ane-transformers; Anemll feeds its ANE models the
    same way): the RoPE rows are `positions @ table`, the cache write is the blend
    `cache * (1 - written) + positions^T @ k`, and attention reads the whole cache under the mask.

    `layers` (start, stop): one part of a model split into several packages (the Neural Engine loads a weight
    file of at most 1 GiB on iOS): the first part embeds the tokens, the last one ends with the norm and the
    logits, the others take and return hidden states; each part's state holds its own layers' cache.
    """

    def __init__(self, hf_model, max_context: int, plan=None, logits_slice: int = LOGITS_SLICE, layers: tuple[int, int] | None = None):
        super().__init__(hf_model, max_context, plan)
        self.logits_slice = logits_slice
        self.start, self.stop = layers or (0, len(self.layers))
        self.first, self.last = self.start == 0, self.stop == len(self.layers)
        # A state whose last dimension is not a multiple of 32 fails on the Neural Engine (ane.RULES
        # "state-alignment-32"): heads are stored zero-padded to the next multiple and read back unpadded.
        # The cache is rank 4, (layers, kv_heads, context, head_dim): no batch axis (ane.RULES "rank-4").
        self.head_pad = -self.head_dim % 32
        shape = (self.stop - self.start, self.num_kv_heads, max_context, self.head_dim + self.head_pad)
        self.register_buffer("key_cache", torch.zeros(shape, dtype=torch.float32))
        self.register_buffer("value_cache", torch.zeros(shape, dtype=torch.float32))

    @torch.no_grad()
    def forward(self, tokens_or_hidden, causal_mask, positions):
        cos = torch.matmul(positions, self.rope_cos).unsqueeze(1)  # (1, 1, q, rotary)
        sin = torch.matmul(positions, self.rope_sin).unsqueeze(1)
        keep = (1.0 - positions.sum(dim=1)).view(1, 1, self.max_context, 1)  # 0 at the slots this call writes
        place = positions.transpose(1, 2).unsqueeze(1)  # (1, 1, context, q)

        def write_cache(index, k, v):
            index -= self.start  # this part's own layers
            if self.head_pad:
                k = nn.functional.pad(k, (0, self.head_pad))
                v = nn.functional.pad(v, (0, self.head_pad))
            keys = self.key_cache[index : index + 1] * keep + torch.matmul(place, k)  # (1, kv_heads, context, head_dim)
            values = self.value_cache[index : index + 1] * keep + torch.matmul(place, v)
            self.key_cache[index : index + 1] = keys
            self.value_cache[index : index + 1] = values
            if self.head_pad:
                return keys[..., : self.head_dim], values[..., : self.head_dim]
            return keys, values

        hidden = self._embed(tokens_or_hidden) if self.first else tokens_or_hidden
        hidden = self._layers(hidden, causal_mask, cos, sin, write_cache, range(self.start, self.stop))
        return self._logits(self._norm(self.norm, hidden, "model.norm")) if self.last else hidden

    def _attend(self, q, keys, values, causal_mask, prefix: str):
        """Grouped-query attention without a rank-5 tensor (the Neural Engine compiler rejects them: ane.RULES "rank-4"):
        the query heads sharing a KV head are stacked along the query axis, (1, kv_heads, groups * q, head_dim), and
        the mask is tiled to match; always written out (matmul, softmax), as ml-ane-transformers does."""
        groups = self.num_heads // self.num_kv_heads
        q_len = q.shape[2]
        if groups > 1:
            q = q.reshape(1, self.num_kv_heads, groups * q_len, self.head_dim)
            causal_mask = causal_mask.repeat(1, 1, groups, 1)
        out = self._scores_softmax(q, keys, values, causal_mask)
        return out.reshape(1, self.num_heads, q_len, self.head_dim) if groups > 1 else out

    def _logits(self, hidden):
        vocab = self.lm_head.weight.shape[0]
        if vocab <= self.logits_slice:
            return super()._logits(hidden)
        weight, bias = self.lm_head.weight, self.lm_head.bias
        slices = []
        for start in range(0, vocab, self.logits_slice):
            stop = min(start + self.logits_slice, vocab)
            slices.append(self._scaled_logits(nn.functional.linear(hidden, weight[start:stop], None if bias is None else bias[start:stop])))
        return tuple(slices)


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
