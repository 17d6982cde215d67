"""A decoder's shapes from its configuration alone: a Hugging Face folder or config.json, or a GGUF header.

`edgepack estimate` costs a model before anything is built, so this reads no weights and imports no
numpy, torch or gguf: the `gguf` package's reader parses every tokenizer string into arrays (seconds
for a 128k vocabulary), while the few header fields needed here take a short struct walk, written
by hand below (GGUF v2/v3 layout: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from edgepack.errors import BadInputError, UsageError

# ggml tensor type -> (name, elements per block, bytes per block); the gguf package's GGML_QUANT_SIZES
# (tests/profiles/test_architecture.py compares the two).
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    20: ("IQ4_NL", 32, 18), 23: ("IQ4_XS", 256, 136), 30: ("BF16", 1, 2),
}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "granite", "smollm3", "olmo2")


@dataclass(frozen=True)
class GgufTensor:
    name: str
    elements: int
    type_name: str
    bytes: int


@dataclass(frozen=True)
class Architecture:
    """What costing a decoder needs: its shapes, and for a GGUF source the bytes of each stored tensor."""

    model_type: str
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    max_positions: int | None
    source: str
    gguf_tensors: tuple[GgufTensor, ...] = ()

    def linear_matrices(self) -> list[tuple[str, int, int]]:
        """(role, inputs, outputs) of every weight matrix a decoded token multiplies by, lm_head last."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = [("q_proj", self.hidden_size, q), ("k_proj", self.hidden_size, kv), ("v_proj", self.hidden_size, kv),
                 ("o_proj", q, self.hidden_size), ("gate_proj", self.hidden_size, self.intermediate_size),
                 ("up_proj", self.hidden_size, self.intermediate_size), ("down_proj", self.intermediate_size, self.hidden_size)]
        return layer * self.layers + [("lm_head", self.hidden_size, self.vocab_size)]

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        linear = sum(i * o for _, i, o in self.linear_matrices())
        return linear + (0 if self.tied_embeddings else self.embedding_params)

    @property
    def kv_values_per_position(self) -> int:
        """K and V values of all layers for one cached position."""
        return 2 * self.layers * self.kv_heads * self.head_dim

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in ("model_type", "hidden_size", "layers", "heads", "kv_heads", "head_dim",
                                             "intermediate_size", "vocab_size", "tied_embeddings", "max_positions", "source")}
        out["params"] = self.params
        if self.gguf_tensors:
            counts: dict[str, int] = {}
            for tensor in self.gguf_tensors:
                counts[tensor.type_name] = counts.get(tensor.type_name, 0) + 1
            out["gguf_tensor_types"] = counts
        return out


def read_architecture(model: Path | str) -> Architecture:
    """A model folder (its config.json), a config .json file, or a .gguf file; one-line errors otherwise."""
    path = Path(model)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return _from_gguf(ggufs[0])
            raise BadInputError(f"{path} has no config.json: pass a Hugging Face model folder, its config.json or a .gguf file")
        return from_config(_read_config(config_path), str(config_path))
    if not path.exists():
        raise BadInputError(f"model not found: {path} does not exist (pass a model folder, a config.json or a .gguf file)")
    if path.suffix.lower() == ".gguf":
        return _from_gguf(path)
    return from_config(_read_config(path), str(path))


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path} is not a readable JSON model configuration: {exc}") from exc
    if not isinstance(config, dict):
        raise BadInputError(f"{path} is not a model configuration (expected a JSON object)")
    return config


def _int(config: dict, where: str, *keys: str, default=None) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    if default is not None:
        return default
    raise BadInputError(f"{where}: no `{keys[0]}` (a positive integer): cannot cost the model without it")


def from_config(config: dict, where: str = "config.json") -> Architecture:
    """A Hugging Face decoder configuration -> Architecture (multimodal configs: their `text_config`)."""
    if isinstance(config.get("text_config"), dict) and "hidden_size" not in config:
        config = {**config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings", config["text_config"].get("tie_word_embeddings"))}
    model_type = str(config.get("model_type") or "")
    architectures = config.get("architectures") or []
    if model_type not in DECODER_TYPES and not any(str(a).endswith("ForCausalLM") for a in architectures):
        raise UsageError(f"{where}: model_type {model_type or '(none)'!r} is not a decoder edgepack can cost; "
                         f"`edgepack estimate` projects text generation ({', '.join(DECODER_TYPES)})")
    hidden = _int(config, where, "hidden_size", "n_embd")
    heads = _int(config, where, "num_attention_heads", "n_head")
    head_dim = _int(config, where, "head_dim", default=hidden // heads)
    return Architecture(
        model_type=model_type or "llama",
        hidden_size=hidden,
        layers=_int(config, where, "num_hidden_layers", "n_layer"),
        heads=heads,
        kv_heads=_int(config, where, "num_key_value_heads", default=heads),
        head_dim=head_dim,
        intermediate_size=_int(config, where, "intermediate_size", "n_inner", default=4 * hidden),
        vocab_size=_int(config, where, "vocab_size"),
        tied_embeddings=bool(config.get("tie_word_embeddings", model_type.startswith("gemma"))),
        max_positions=_int(config, where, "max_position_embeddings", "n_positions", default=0) or None,
        source=where,
    )


def read_gguf_header(path: Path) -> tuple[dict, list[GgufTensor]]:
    """(metadata without arrays, tensors) of a GGUF file, reading only its header."""
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _parse_header(buffer, path)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path} is not a readable GGUF file: {exc}") from exc


def _parse_header(buffer, path: Path) -> tuple[dict, list[GgufTensor]]:
    if buffer[:4] != b"GGUF":
        raise BadInputError(f"{path} is not a GGUF file (no GGUF magic)")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", buffer, 4)
    if version < 2:
        raise BadInputError(f"{path} is GGUF version {version}; versions 2 and 3 are read")
    offset = 24

    def string(at: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", buffer, at)
        return bytes(buffer[at + 8:at + 8 + length]).decode("utf-8", "replace"), at + 8 + length

    def value(kind: int, at: int):
        if kind == _STRING:
            return string(at)
        if kind == _ARRAY:
            element, count = struct.unpack_from("<IQ", buffer, at)
            at += 12
            if element == _STRING:
                for _ in range(count):  # token lists: skip, lengths only
                    (length,) = struct.unpack_from("<Q", buffer, at)
                    at += 8 + length
                return ("array", count), at
            if element not in _SCALARS:
                raise BadInputError(f"{path}: unsupported GGUF array element type {element}")
            return ("array", count), at + count * struct.calcsize(_SCALARS[element])
        if kind not in _SCALARS:
            raise BadInputError(f"{path}: unsupported GGUF value type {kind}")
        (result,) = struct.unpack_from(_SCALARS[kind], buffer, at)
        return result, at + struct.calcsize(_SCALARS[kind])

    metadata = {}
    for _ in range(kv_count):
        key, offset = string(offset)
        (kind,) = struct.unpack_from("<I", buffer, offset)
        metadata[key], offset = value(kind, offset + 4)
    tensors = []
    for _ in range(tensor_count):
        name, offset = string(offset)
        (dims,) = struct.unpack_from("<I", buffer, offset)
        shape = struct.unpack_from(f"<{dims}Q", buffer, offset + 4)
        ggml_type, _data_offset = struct.unpack_from("<IQ", buffer, offset + 4 + 8 * dims)
        offset += 4 + 8 * dims + 12
        elements = 1
        for dim in shape:
            elements *= dim
        if ggml_type not in GGML_TYPES:
            raise BadInputError(f"{path}: tensor {name} has ggml type {ggml_type}, which edgepack cannot cost")
        type_name, block, block_bytes = GGML_TYPES[ggml_type]
        tensors.append(GgufTensor(name, elements, type_name, elements // block * block_bytes))
    return metadata, tensors


def _from_gguf(path: Path) -> Architecture:
    metadata, tensors = read_gguf_header(path)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise BadInputError(f"{path}: no general.architecture in the GGUF header")

    def get(key: str, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        return value if not isinstance(value, tuple) else default

    names = {t.name: t for t in tensors}
    vocab = get("vocab_size")
    if vocab is None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        vocab = tokens[1] if isinstance(tokens, tuple) else None
    hidden = get("embedding_length")
    heads = get("attention.head_count")
    config = {
        "model_type": {"qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma": "gemma", "phi3": "phi3"}.get(arch, "llama"),
        "hidden_size": hidden, "num_hidden_layers": get("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads), "intermediate_size": get("feed_forward_length"),
        "vocab_size": vocab, "max_position_embeddings": get("context_length"),
        "head_dim": get("attention.key_length") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None),
        "tie_word_embeddings": "output.weight" not in names,
    }
    found = from_config(config, str(path))
    return replace(found, gguf_tensors=tuple(tensors))
