"""Tiny llama GGUF files written with gguf's GGUFWriter: random weights in chosen GGML block types.

Legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are quantized from random floats with `gguf.quants.quantize`.
gguf-py has no quantizer for K-quants or IQ types, so those tensors are random *blocks*: random bytes
with sane fp16 super-block scales written in. A random block is as valid as a quantized one: its
weights are whatever `gguf.quants.dequantize` (and so transformers) makes of it.

The tokenizer is a "gpt2" byte-level BPE (tokens, token_type, merges), the kind transformers' GGUF
loader turns into a fast tokenizer for llama (like SmolLM2's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Byte offset and value of the fp16 scale fields in one block of each random-block type.
_RANDOM_BLOCK_SCALES = {
    "Q2_K": [(80, 2e-3), (82, 1e-3)],  # d, dmin
    "Q3_K": [(108, 1e-3)],  # d
    "Q4_K": [(0, 2e-4), (2, 2e-4)],  # d, dmin
    "Q5_K": [(0, 1e-4), (2, 2e-4)],  # d, dmin
    "Q6_K": [(208, 2e-5)],  # d
    "IQ4_NL": [(0, 2e-4)],  # d
}


@dataclass
class TinyLlamaSpec:
    hidden: int = 64
    layers: int = 2
    vocab: int = 512
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    # GGML type of each weight role (llama.cpp tensor names); blk.N.<role>.weight
    types: dict[str, str] = field(
        default_factory=lambda: {
            "attn_q": "Q4_0",
            "attn_k": "Q4_1",
            "attn_v": "Q8_0",
            "attn_output": "Q4_1",
            "ffn_gate": "Q4_0",
            "ffn_up": "Q4_1",
            "ffn_down": "Q8_0",
        }
    )
    embedding: str = "Q8_0"
    # {"blk.1.attn_v": "F16"}: per-tensor overrides of `types`
    overrides: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    add_bos: bool = False  # tokenizer.ggml.add_bos_token
    chat_template: str | None = None  # tokenizer.chat_template

    def linear_types(self) -> dict[str, str]:
        """GGUF tensor name -> GGML type of every linear (MatMul) weight."""
        out = {}
        for i in range(self.layers):
            for role, kind in self.types.items():
                out[f"blk.{i}.{role}.weight"] = self.overrides.get(f"blk.{i}.{role}", kind)
        return out


def byte_level_chars() -> list[str]:
    """GPT-2's bytes_to_unicode table (the 256 printable stand-ins for bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def tokenizer_vocab(vocab: int) -> tuple[list[str], list[int], list[str]]:
    tokens = SPECIAL_TOKENS + byte_level_chars()
    merges: list[str] = []
    letters = "Ġetaoinshrdlucmfwypvbgk"
    for a in letters:
        for b in letters[1:]:
            if len(tokens) >= vocab:
                break
            merged = a + b
            if merged not in tokens:
                merges.append(f"{a} {b}")
                tokens.append(merged)
    if len(tokens) < vocab:
        raise ValueError(f"vocab {vocab} too large for the toy merge table")
    token_type = [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS))
    return tokens, token_type, merges


def _blocks(values: np.ndarray, kind: str, rng: np.random.Generator):
    """(array, raw_dtype) to hand to GGUFWriter.add_tensor for a [rows, cols] weight of type `kind`."""
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import quantize

    qtype = GGMLQuantizationType[kind]
    if kind == "F32":
        return values.astype(np.float32), None
    if kind == "F16":
        return values.astype(np.float16), None
    if kind in _RANDOM_BLOCK_SCALES:
        block, type_size = GGML_QUANT_SIZES[qtype]
        rows, cols = values.shape
        raw = rng.integers(0, 256, (rows, cols // block, type_size), dtype=np.uint8)
        for offset, scale in _RANDOM_BLOCK_SCALES[kind]:
            d = (scale * rng.uniform(0.5, 1.5, (rows, cols // block))).astype(np.float16)
            raw[..., offset : offset + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
        return raw.reshape(rows, -1), qtype
    return quantize(values.astype(np.float32), qtype), qtype


def write_tiny_llama_gguf(path: Path, spec: TinyLlamaSpec = TinyLlamaSpec()) -> Path:
    """Write a random llama GGUF (tied lm_head: no output.weight) that transformers can load."""
    import gguf

    rng = np.random.default_rng(spec.seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_block_count(spec.layers)
    writer.add_context_length(256)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(spec.hidden // spec.heads)
    writer.add_vocab_size(spec.vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    tokens, token_type, merges = tokenizer_vocab(spec.vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_type)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(spec.add_bos)
    if spec.chat_template:
        writer.add_chat_template(spec.chat_template)

    def add(name: str, rows: int, cols: int, kind: str, std: float = 0.05):
        values = rng.normal(0.0, std, (rows, cols)).astype(np.float32)
        array, raw_dtype = _blocks(values, kind, rng)
        if raw_dtype is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_dtype=raw_dtype)

    def add_norm(name: str, size: int):
        writer.add_tensor(name, (1.0 + rng.normal(0.0, 0.05, size)).astype(np.float32))

    head_dim = spec.hidden // spec.heads
    shapes = {  # role -> (rows = out_features, cols = in_features)
        "attn_q": (spec.hidden, spec.hidden),
        "attn_k": (spec.kv_heads * head_dim, spec.hidden),
        "attn_v": (spec.kv_heads * head_dim, spec.hidden),
        "attn_output": (spec.hidden, spec.hidden),
        "ffn_gate": (spec.ffn, spec.hidden),
        "ffn_up": (spec.ffn, spec.hidden),
        "ffn_down": (spec.hidden, spec.ffn),
    }
    add("token_embd.weight", spec.vocab, spec.hidden, spec.embedding, std=0.5)
    types = spec.linear_types()
    for i in range(spec.layers):
        add_norm(f"blk.{i}.attn_norm.weight", spec.hidden)
        add_norm(f"blk.{i}.ffn_norm.weight", spec.hidden)
        for role, (rows, cols) in shapes.items():
            add(f"blk.{i}.{role}.weight", rows, cols, types[f"blk.{i}.{role}.weight"])
    add_norm("output_norm.weight", spec.hidden)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
