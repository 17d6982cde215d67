"""Sentence embeddings for sentence-transformers folders: the pooling and normalization in the graph.

A sentence-transformers model is a Hugging Face encoder plus modules listed in `modules.json`: a
`Pooling` module (`1_Pooling/config.json`: which tokens make the sentence vector) and often `Normalize`
(unit length). Apps compare those sentence vectors, not per-token hidden states, so the export appends the
same computation to the ONNX graph as a second output, `sentence_embedding` [batch, hidden], masked by
`attention_mask` as sentence-transformers masks it (padding never counts).

optimum-onnx exports the transformer only (its sentence-transformers path needs the library installed and
re-loads the model through it); the pooling is a handful of ONNX nodes, written here on the exported graph
without touching its weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SENTENCE_OUTPUT = "sentence_embedding"
POOLING_NODE_PREFIX = "/pooling/"
# 1_Pooling/config.json flag -> our mode name; sentence-transformers concatenates several when more are set.
_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
          "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_lasttoken": "lasttoken",
          "pooling_mode_weightedmean_tokens": "weightedmean"}
SUPPORTED_MODES = ("cls", "mean", "max", "mean_sqrt_len")


@dataclass(frozen=True)
class SentencePooling:
    """What the folder's modules.json asks for; `unsupported` says why no sentence output can be written."""

    modes: tuple[str, ...]
    normalize: bool
    unsupported: str | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data["modes"] = list(self.modes)
        data["output"] = None if self.unsupported else SENTENCE_OUTPUT
        return data


def read_sentence_pooling(hf_dir: Path) -> SentencePooling | None:
    """The pooling of a sentence-transformers folder, None for a plain Hugging Face folder."""
    modules_file = Path(hf_dir) / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
    except (OSError, ValueError):
        return SentencePooling((), False, "modules.json is not valid JSON")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)]
    pooling = next((m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling")), None)
    if pooling is None:
        return SentencePooling((), "Normalize" in kinds, "modules.json lists no Pooling module")
    others = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    normalize = "Normalize" in kinds
    try:
        config = json.loads((Path(hf_dir) / pooling.get("path", "") / "config.json").read_text())
    except (OSError, ValueError):
        return SentencePooling((), normalize, f"{pooling.get('path', '')}/config.json of the Pooling module is missing or invalid")
    modes = tuple(mode for key, mode in _MODES.items() if config.get(key))
    if others:  # Dense layers etc. carry their own weights outside the transformer
        return SentencePooling(modes, normalize, f"modules {', '.join(others)} after the transformer are not exported")
    if not modes:
        return SentencePooling(modes, normalize, "the Pooling module sets no pooling mode")
    missing = [m for m in modes if m not in SUPPORTED_MODES]
    if missing:
        return SentencePooling(modes, normalize, f"pooling mode {', '.join(missing)} is not exported (supported: {', '.join(SUPPORTED_MODES)})")
    return SentencePooling(modes, normalize)


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: SentencePooling) -> np.ndarray:
    """Reference pooling in numpy, as sentence-transformers computes it: hidden [B, T, H], mask [B, T] -> [B, H*modes]."""
    hidden = hidden.astype(np.float64)
    m = mask.astype(np.float64)[..., None]
    count = np.maximum(m.sum(axis=1), 1e-9)
    parts = []
    for mode in pooling.modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(np.where(m > 0, hidden, -1e9).max(axis=1))
        elif mode == "mean":
            parts.append((hidden * m).sum(axis=1) / count)
        elif mode == "mean_sqrt_len":
            parts.append((hidden * m).sum(axis=1) / np.sqrt(count))
    out = np.concatenate(parts, axis=-1)
    if pooling.normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


def add_sentence_output(onnx_path: Path, pooling: SentencePooling) -> None:
    """Append the pooling (and normalization) to the exported graph as the output `sentence_embedding`.

    The graph is rewritten without its weights (they stay in their external data file, untouched).
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    hidden = graph.output[0].name
    inputs = {i.name for i in graph.input}
    if "attention_mask" not in inputs:
        raise ValueError(f"{onnx_path} has no attention_mask input to pool with")
    nodes, inits = [], []

    def const(name: str, values, dtype=np.int64):
        inits.append(onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def node(op: str, ins: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, ins, [name], name=POOLING_NODE_PREFIX + name, **attrs))
        return name

    p = "pooling."
    axes1, axes_last = const(p + "axes1", [1]), const(p + "axes_last", [-1])
    # CastLike, not Cast to float: a later float16 conversion of the graph keeps the mask in the hidden states' type.
    mask = node("CastLike", ["attention_mask", hidden], p + "mask")
    mask3 = node("Unsqueeze", [mask, axes_last], p + "mask3")  # [B, T, 1]
    parts = []
    if any(m in pooling.modes for m in ("mean", "mean_sqrt_len")):
        summed = node("ReduceSum", [node("Mul", [hidden, mask3], p + "masked"), axes1], p + "summed", keepdims=0)
        count = node("Max", [node("ReduceSum", [mask3, axes1], p + "count", keepdims=0), const(p + "tiny", 1e-9, np.float32)],
                     p + "count_clamped")
    for mode in pooling.modes:
        if mode == "cls":
            parts.append(node("Gather", [hidden, const(p + "first", 0)], p + "cls", axis=1))
        elif mode == "mean":
            parts.append(node("Div", [summed, count], p + "mean"))
        elif mode == "mean_sqrt_len":
            parts.append(node("Div", [summed, node("Sqrt", [count], p + "sqrt_count")], p + "mean_sqrt_len"))
        elif mode == "max":
            # padding gets -1e9 before the max, as sentence-transformers sets it
            padded = node("Where", [node("Cast", [mask3], p + "mask_bool", to=TensorProto.BOOL), hidden,
                                    const(p + "minus_big", -1e9, np.float32)], p + "max_input")
            parts.append(node("ReduceMax", [padded, axes1], p + "max", keepdims=0))
    pooled = parts[0] if len(parts) == 1 else node("Concat", parts, p + "concat", axis=-1)
    if pooling.normalize:
        norm = node("ReduceL2", [pooled, axes_last], p + "norm", keepdims=1)
        norm = node("Max", [norm, const(p + "eps", 1e-12, np.float32)], p + "norm_clamped")
        pooled = node("Div", [pooled, norm], p + "normalized")
    nodes[-1].output[0] = SENTENCE_OUTPUT
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    graph.output.append(helper.make_tensor_value_info(SENTENCE_OUTPUT, TensorProto.FLOAT, ["batch_size", None]))
    onnx.save(model, str(onnx_path))


def sentence_output(session) -> str | None:
    """The sentence-embedding output of an encoder session, if the export has one."""
    names = [o.name for o in session.get_outputs()]
    return SENTENCE_OUTPUT if SENTENCE_OUTPUT in names else None
