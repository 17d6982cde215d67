"""fp16 safety pass: find activations that overflow fp16 and decide which ops run in a rescaled form.

The fp32 PyTorch model reads the evaluation text with forward hooks recording, per layer, the largest
|activation| that reaches each op fp16 would choke on:

* RMSNorm/LayerNorm: the input is squared, so max|x|^2 must stay below the fp16 maximum (65504).
  SmolLM2's residual stream reaches ~23,000 (squares ~5e8): the fp16 program then gives garbage.
  Rewrite: divide by max|x| (per row) before squaring, eps scaled to match (exactly the same function).
* Attention scores q.k: bounded by max||q_head|| * max||k_head|| (RoPE is a rotation). Rewrite: fold
  1/sqrt(head_dim) into q before the product instead of scaling the scores afterwards.
* MLP product act(gate) * up: rewrite as act(gate) * (up / s), then down_proj(...) * s.
* Anything else above the fp16 range (a projection output, the residual stream itself) cannot be
  rewritten locally and is reported as unsafe.

A margin (default 4x) covers text that drives activations higher than the evaluation text did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FP16_MAX = 65504.0


@dataclass
class SafetyPlan:
    margin: float = 4.0
    rescale_norms: set = field(default_factory=set)  # module names
    prescale_queries: set = field(default_factory=set)  # layer prefixes
    mlp_divisors: dict = field(default_factory=dict)  # layer prefix -> power of two
    unsafe: list = field(default_factory=list)  # above the fp16 maximum and cannot be rewritten locally
    warnings: list = field(default_factory=list)  # in fp16 range but with less headroom than the margin
    stats: dict = field(default_factory=dict)  # name -> max |activation| (fp32 reference)
    tokens: int = 0

    @property
    def rewrites(self) -> list[dict]:
        out = [{"op": name, "rewrite": "norm divides by max|x| before squaring", "max_abs_input": self.stats.get(name)}
               for name in sorted(self.rescale_norms, key=_natural)]
        out += [{"op": f"{p}.self_attn", "rewrite": "1/sqrt(head_dim) folded into q before q.k", "max_score_bound": self.stats.get(f"{p}.self_attn.score_bound")}
                for p in sorted(self.prescale_queries, key=_natural)]
        out += [{"op": f"{p}.mlp", "rewrite": f"up / {d:g} before act(gate)*up, down_proj output * {d:g}", "max_abs_product": self.stats.get(f"{p}.mlp.product")}
                for p, d in sorted(self.mlp_divisors.items(), key=lambda kv: _natural(kv[0]))]
        return out

    def to_json(self) -> dict:
        largest = sorted(self.stats.items(), key=lambda kv: -kv[1])[:8]
        return {
            "method": "fp32 PyTorch forward on the evaluation text with hooks; limit = 65504 / margin",
            "tokens": self.tokens,
            "margin": self.margin,
            "limit": FP16_MAX / self.margin,
            "rewrites": self.rewrites,
            "rewritten_ops": len(self.rewrites),
            "unsafe": self.unsafe,
            "low_headroom": self.warnings,
            "passed": not self.unsafe,
            "largest_activations": [{"op": k, "max_abs": round(v, 3)} for k, v in largest],
        }


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.replace(".", " ").split()]


def analyse(hf_model, token_windows: list[list[int]], *, kind: str, margin: float = 4.0, enabled: bool = True) -> SafetyPlan:
    """Record max |activation| per op on the given token windows and plan the rewrites."""
    import torch

    plan = SafetyPlan(margin=margin)
    stats: dict[str, float] = {}

    def record(name, value):
        stats[name] = max(stats.get(name, 0.0), float(value))

    hooks = []
    norm_names = []
    for name, module in hf_model.named_modules():
        cls = type(module).__name__
        if cls.endswith("RMSNorm") or isinstance(module, torch.nn.LayerNorm):
            norm_names.append(name)
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: record(n, i[0].detach().abs().max())))
        elif isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: record(n, o.detach().abs().max())))
        if kind == "decoder" and cls.endswith("Attention") and hasattr(module, "q_proj"):
            hooks.append(module.q_proj.register_forward_hook(lambda m, i, o, n=name, a=module: record(f"{n}.q_norm", _head_norm(o, a))))
            hooks.append(module.k_proj.register_forward_hook(lambda m, i, o, n=name, a=module: record(f"{n}.k_norm", _head_norm(o, a))))
        elif kind == "decoder" and cls.endswith("Attention") and hasattr(module, "qkv_proj"):  # fused (phi3): q | k | v
            hooks.append(module.qkv_proj.register_forward_hook(lambda m, i, o, n=name, a=module: _record_fused(record, n, o, a)))
        if kind == "decoder" and cls.endswith("MLP") and hasattr(module, "down_proj"):
            hooks.append(module.down_proj.register_forward_hook(lambda m, i, o, n=name: record(f"{n}.product", i[0].detach().abs().max())))
    try:
        with torch.no_grad():
            for window in token_windows:
                ids = torch.tensor([window], dtype=torch.long)
                if kind == "decoder":
                    hf_model(input_ids=ids, use_cache=False)
                else:
                    hf_model(input_ids=ids, attention_mask=torch.ones_like(ids))
                plan.tokens += len(window)
    finally:
        for hook in hooks:
            hook.remove()

    limit = FP16_MAX / margin
    for name in list(stats):
        if name.endswith(".q_norm"):
            prefix = name[: -len(".q_norm")]
            stats[f"{prefix}.score_bound"] = stats[name] * stats.get(f"{prefix}.k_norm", 0.0)
    plan.stats = {k: v for k, v in stats.items() if not k.endswith((".q_norm", ".k_norm"))}
    if not enabled:
        return plan
    for name in norm_names:
        if stats.get(name, 0.0) ** 2 > limit:
            plan.rescale_norms.add(_strip(name))
    for name, value in stats.items():
        if name.endswith(".self_attn.score_bound") and value > limit:
            prefix = name[: -len(".self_attn.score_bound")]
            head_dim = getattr(hf_model.config, "head_dim", None) or hf_model.config.hidden_size // hf_model.config.num_attention_heads
            if value / math.sqrt(head_dim) > FP16_MAX:
                plan.unsafe.append(f"{prefix} attention scores reach {value / math.sqrt(head_dim):.3g} even scaled")
            plan.prescale_queries.add(_strip(prefix))
        elif name.endswith(".mlp.product") and value > limit:
            prefix = name[: -len(".mlp.product")]
            plan.mlp_divisors[_strip(prefix)] = float(2 ** math.ceil(math.log2(value / limit)))
        elif not name.endswith((".score_bound", ".product")) and name not in norm_names and value > limit:
            if value > FP16_MAX:
                plan.unsafe.append(f"{name} output reaches {value:.3g} > fp16 maximum {FP16_MAX:g}")
            else:
                plan.warnings.append(f"{name} output reaches {value:.3g}: in fp16 range, headroom {FP16_MAX / value:.1f}x < margin {margin:g}x")
    plan.stats = {_strip(k): v for k, v in plan.stats.items()}
    return plan


def _strip(name: str) -> str:
    """HF module names under the task wrapper -> the names the wrapper uses (model.layers.N..., encoder.layer.N...)."""
    return name[len("bert."):] if name.startswith("bert.") else name


def _head_norm(output, attention) -> float:
    head_dim = getattr(attention, "head_dim", None) or output.shape[-1]
    heads = output.detach().reshape(*output.shape[:-1], -1, head_dim)
    return float(heads.norm(dim=-1).max())


def _record_fused(record, name: str, output, attention) -> None:
    q_size = attention.config.num_attention_heads * attention.head_dim
    k_size = attention.config.num_key_value_heads * attention.head_dim
    record(f"{name}.q_norm", _head_norm(output[..., :q_size], attention))
    record(f"{name}.k_norm", _head_norm(output[..., q_size : q_size + k_size], attention))
