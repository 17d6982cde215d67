"""ExecuTorch's LLM kernels in a Hugging Face decoder: the KV cache written by `llama::update_cache` and attention
computed by `llama::custom_sdpa` (both from `executorch.extension.llm.custom_ops`), as ExecuTorch's own Llama
export and optimum-executorch's XNNPACK recipe do.

Why not transformers' StaticCache as it is: its cache writes (index_put) and mask arithmetic are ops XNNPACK does
not take, so every layer's graph is cut into many delegate calls (slow to lower, slow to run), and attention reads
the whole cache each token. The custom ops write the cache in place and attend only to the filled prefix.
optimum-executorch wraps the same two ops, but pins transformers 5 (edgepack's stack is on 4.57), so the glue is
here: a StaticCache whose layers are ExecuTorch's `CustomKVCache` ([batch, positions, heads, head_dim]), and an
attention function registered with transformers that calls custom_sdpa from the first query's position.
Decoders with sliding windows or attention softcapping (gemma2) keep transformers' own attention.
"""

from __future__ import annotations

ATTENTION = "edgepack_executorch_sdpa"


def supports(config) -> bool:
    """Whether every layer's attention is plain causal attention over the whole cache, which custom_sdpa computes
    (no sliding window, no attention softcapping)."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return set(layer_types) == {"full_attention"}
    return getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False


def _custom_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface -> llama::custom_sdpa. query/key/value arrive [batch, heads, seq, dim] (key and
    value: the whole cache); the first query token's position is the number of slots its mask row opens, minus one."""
    import torch

    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    first_row = attention_mask.reshape(-1, attention_mask.shape[-1])[0]
    opened = first_row if first_row.dtype == torch.bool else first_row == 0
    start_pos = opened.to(torch.long).sum().item() - 1
    torch._check_is_size(start_pos)
    output = torch.ops.llama.custom_sdpa(query.float(), key.float(), value.float(), start_pos=start_pos, attn_mask=None,
                                         drpout_p=0.0, is_causal=True, scale=scaling)
    return output.to(query.dtype), None


def register() -> None:
    """Load ExecuTorch's custom ops into torch and register the attention function with transformers."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers torch.ops.llama.*)
    from transformers.integrations.executorch import sdpa_mask_without_vmap
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTENTION, _custom_sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask_without_vmap)


def decoder_module(model, context: int):
    """The decoder as forward(input_ids, cache_position) -> logits over a cache of `context` positions written by
    update_cache (the caches are the module's buffers: program state once exported)."""
    import torch
    from executorch.examples.models.llama.source_transformation.custom_kv_cache import CustomKVCache
    from transformers.cache_utils import StaticCache

    register()
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    class ExecuTorchCache(StaticCache):
        def __init__(self):
            super().__init__(config=config, max_cache_len=context)
            self.early_initialization(1, heads, head_dim, torch.float32, "cpu")
            self.custom = torch.nn.ModuleList(CustomKVCache(1, context, heads, head_dim, torch.float32) for _ in self.layers)

        def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
            return self.custom[layer_idx].update(input_pos=cache_kwargs["cache_position"], k_val=key_states, v_val=value_states)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.cache = ExecuTorchCache()
            self.layers_cache = self.cache.custom  # registered as submodules: their k_cache/v_cache are buffers

        def forward(self, input_ids, cache_position):
            return self.model(input_ids=input_ids, cache_position=cache_position, past_key_values=self.cache, use_cache=True,
                              attention_mask=None).logits

    model.config._attn_implementation = ATTENTION
    return Decoder().eval()


def export_decoder(model, context: int):
    """torch.export of `decoder_module` for any query length up to the context, with the back-to-back transposes
    around the custom ops removed (ExecuTorch's RemoveRedundantTransposes) and the program exported again."""
    import torch
    from executorch.extension.llm.export.export_passes import RemoveRedundantTransposes

    module = decoder_module(model, context)
    ids, positions = torch.zeros((1, 3), dtype=torch.long), torch.arange(3, dtype=torch.long)
    seq = torch.export.Dim("seq", max=context - 1)
    shapes = {"input_ids": {1: seq}, "cache_position": {0: seq}}
    with torch.no_grad():
        exported = torch.export.export(module, args=(), kwargs={"input_ids": ids, "cache_position": positions}, dynamic_shapes=shapes, strict=True)
        simplified = RemoveRedundantTransposes()(exported.module())[0]
        return torch.export.export(simplified, args=(), kwargs={"input_ids": ids, "cache_position": positions}, dynamic_shapes=shapes, strict=True)
