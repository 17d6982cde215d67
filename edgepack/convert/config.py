"""`edgepack convert`'s options, declared once (command line, recipe [model] table, docs); light to import."""

from __future__ import annotations

from dataclasses import dataclass

from edgepack.options import option


@dataclass(frozen=True)
class ConvertConfig:
    task: str = option("auto", choices=("auto", "text-generation", "feature-extraction"),
                       help="Decoder LLM with KV cache, or encoder embeddings; auto picks from the architecture.")
    opset: int | None = option(None, min=7, help="ONNX opset (default: optimum's choice for the architecture).")
    verify: bool = option(True, cli="--no-verify", help="Skip the parity check against PyTorch.")
    # Parity gate: fp32 ONNX against fp32 PyTorch on the same tokens.
    atol: float = option(1e-3, min=0, help="Parity gate: max abs logit (or embedding) difference allowed.")
    force: bool = option(False, help="Replace a non-empty output folder (only once the new export is complete).", in_recipe=False,
                         note="a bundle replaces its own previous output; --force is for a folder edgepack did not write")
    allow_pickle: bool = option(False, help="Load pickle checkpoints (*.bin, *.pt). Unpickling runs code: only for sources you trust.")
    trust_remote_code: bool = option(False, help="Allow models whose config needs their own Python code (auto_map). Review that code first.")
    greedy_tokens: int = option(32, min=1, in_cli=False, in_recipe=False, help="Greedy tokens compared with PyTorch on each prompt.",
                                note="fixed by the parity check's definition")
    decode_steps: int = option(8, min=1, in_cli=False, in_recipe=False, help="Cached decode steps compared logit by logit.",
                               note="fixed by the parity check's definition")
