"""What one decoded token costs a model, read from its ONNX graph: bytes read, KV cache bytes, FLOPs, nodes.

Rule for weight bytes read per decoded token (docs/profile-json.md, "Bytes per token"):
  * every initializer is read once per token, in full;
  * except a table consumed only as the data input of Gather (axis 0) / GatherBlockQuantized: an
    embedding (or rotary cache) lookup reads one row per token, so it counts bytes / rows
    (its block scales and zero points likewise);
  * a table that is both gathered and multiplied (a tied lm_head in an fp32 export, where the lm_head
    reads `Transpose(embed_tokens)`) is read in full once: the lm_head needs every row.
Each byte is assigned a *format* (fp32, fp16, int8, int4) from the op that consumes it: MatMulNBits
by its `bits` attribute, everything else by the tensor's dtype. Projection divides each format's bytes
by that format's effective bandwidth.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.errors import BadInputError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
# Bytes per element by ONNX TensorProto data type; 4-bit types are packed two per byte.
_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 21: 0.5, 22: 0.5}
_FLOAT_FORMAT = {1: "fp32", 10: "fp16", 16: "bf16", 11: "fp64"}
_GATHER_OPS = {"Gather", "GatherBlockQuantized"}


@dataclass
class ModelFacts:
    """Per-token costs of one model file. Bytes are exact sums over the graph; FLOPs count MACs x 2."""

    onnx_path: str
    file_bytes: int  # model.onnx plus external data files
    initializer_bytes: int  # all weights held in memory
    weight_bytes_per_token: int  # read per decoded token (rule in the module docstring)
    bytes_per_token_by_format: dict[str, int] = field(default_factory=dict)
    gathered_bytes_per_token: int = 0  # of which: rows read from gather-only tables
    kv_bytes_per_position: int = 0  # K and V of all layers for one cached position
    kv_layers: int = 0
    linear_flops_per_token: int = 0  # 2 x MACs in MatMul/Gemm/MatMulNBits weights
    attention_flops_per_position: int = 0  # 2 x 2 x heads x head_dim x layers (QK^T and AV) per cached position
    nodes: int = 0  # graph nodes that run per call: nodes computed from constants only are folded by onnxruntime
    # weight matrices per format (an 8-bit weight that runs as two 4-bit MatMulNBits planes counts once, as int8);
    # each costs a fixed per-call overhead beside its bytes (calibrated as gemv_<format>_weight_us)
    weights_by_format: dict[str, int] = field(default_factory=dict)
    max_context: int | None = None
    # A static program (Core ML's Neural Engine program, QNN's graphs) holds a cache of `kv_slots` positions and
    # reads all of them every call, `kv_traffic` times; None: the cache grows with the position (onnxruntime).
    kv_slots: int | None = None
    kv_traffic: float = 1.0
    prefill_chunk: int | None = None  # tokens per prefill call of a static program; None: the whole prompt in one call

    def kv_read_bytes(self, position: int) -> int:
        """Cache bytes streamed to decode the token at `position`."""
        slots = self.kv_slots if self.kv_slots is not None else position
        return int(self.kv_bytes_per_position * slots * self.kv_traffic)

    def decode_bytes(self, position: int) -> int:
        """Bytes read to decode the token at `position` (0-based): weights + the K/V of every earlier position
        (of every slot, for a static program)."""
        return self.weight_bytes_per_token + self.kv_read_bytes(position)

    def prefill_flops(self, prompt_len: int) -> int:
        """Linear layers for every prompt token + causal attention (sum over positions 1..P)."""
        attention = self.attention_flops_per_position * prompt_len * (prompt_len + 1) // 2
        return self.linear_flops_per_token * prompt_len + attention

    def decode_flops(self, position: int) -> int:
        return self.linear_flops_per_token + self.attention_flops_per_position * (position + 1)

    def kv_bytes(self, positions: int) -> int:
        """Cache held in memory at `positions` tokens (a static program holds all its slots)."""
        return self.kv_bytes_per_position * (self.kv_slots if self.kv_slots is not None else positions)

    def to_json(self) -> dict:
        return {
            "file_bytes": self.file_bytes,
            "initializer_bytes": self.initializer_bytes,
            "weight_bytes_per_token": self.weight_bytes_per_token,
            "bytes_per_token_by_format": dict(self.bytes_per_token_by_format),
            "gathered_bytes_per_token": self.gathered_bytes_per_token,
            "kv_bytes_per_position": self.kv_bytes_per_position,
            "kv_layers": self.kv_layers,
            "linear_flops_per_token": self.linear_flops_per_token,
            "attention_flops_per_position": self.attention_flops_per_position,
            "nodes": self.nodes,
            "weights_by_format": dict(self.weights_by_format),
            "max_context": self.max_context,
            **({"kv_slots": self.kv_slots, "kv_traffic": self.kv_traffic} if self.kv_slots is not None else {}),
            **({"prefill_chunk": self.prefill_chunk} if self.prefill_chunk else {}),
            "rule": "initializers read in full once per token; gather-only tables read one row per token; "
                    "KV bytes per position from past_key_values shapes and dtypes",
        }


def tensor_bytes(tensor) -> float:
    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    return count * _ELEMENT_BYTES.get(tensor.data_type, 4)


def model_facts(onnx_path: Path | str, config: dict | None = None) -> ModelFacts:
    """Read the graph (not the weights' values) and compute per-token costs."""
    import onnx

    onnx_path = Path(onnx_path)
    if onnx_path.suffix == ".ort":  # an ort-mobile bundle: cost the graph onnxruntime saved, folded as it ships
        from edgepack.profiles.ort_format import read_ort_graph

        model = read_ort_graph(onnx_path)
    else:
        try:
            model = onnx.load(str(onnx_path), load_external_data=False)
        except Exception as exc:
            raise BadInputError(f"{onnx_path} is not a readable ONNX model: {exc}") from exc
    config = config or {}
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}

    consumers: dict[str, list[tuple]] = defaultdict(list)  # initializer -> [(node, input index)]
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in inits:
                consumers[name].append((node, index))

    producers = {out: node for node in graph.node for out in node.output}
    plane_pairs = _eight_bit_planes(graph, producers)
    by_format: dict[str, float] = defaultdict(float)
    gathered = 0.0
    linear_macs = 0
    for name, tensor in inits.items():
        size = tensor_bytes(tensor)
        uses = consumers.get(name, [])
        fmt = _format_of(tensor, uses, plane_pairs)
        if uses and all(node.op_type in _GATHER_OPS and _is_row_gather(node, index) for node, index in uses):
            rows = int(tensor.dims[0]) if tensor.dims else 1
            per_token = size / max(rows, 1)
            gathered += per_token
            by_format[fmt] += per_token
            continue
        by_format[fmt] += size
    weights: dict[str, int] = defaultdict(int)
    for node in graph.node:
        linear_macs += _linear_macs(node, inits, producers)
        fmt = _weight_format(node, inits, producers, plane_pairs)
        if fmt:
            weights[fmt] += 1

    files = [onnx_path] + [p for p in onnx_path.parent.glob(onnx_path.name + "*") if p != onnx_path]
    files += [p for p in onnx_path.parent.glob("*.data") if p not in files]
    file_bytes = sum(p.stat().st_size for p in files if p.is_file())

    kv_per_pos, kv_layers, heads_dims = _kv_per_position(graph, config)
    attention = 0
    if kv_layers:
        # QK^T and AV each cost heads x head_dim MACs per cached position per layer.
        attention = 2 * 2 * heads_dims * kv_layers
    facts = ModelFacts(
        onnx_path=str(onnx_path),
        file_bytes=int(file_bytes),
        initializer_bytes=int(sum(tensor_bytes(t) for t in inits.values())),
        weight_bytes_per_token=int(round(sum(by_format.values()))),
        bytes_per_token_by_format={k: int(round(v)) for k, v in sorted(by_format.items())},
        gathered_bytes_per_token=int(round(gathered)),
        kv_bytes_per_position=int(kv_per_pos),
        kv_layers=kv_layers,
        linear_flops_per_token=int(2 * linear_macs),
        attention_flops_per_position=int(attention),
        nodes=runtime_nodes(graph, inits),
        weights_by_format=dict(sorted(weights.items())),
        max_context=_max_context(config),
    )
    return facts


def _is_row_gather(node, index: int) -> bool:
    """True when the initializer at `index` is looked up row by row (data, scales or zero points of a gather)."""
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Gather":
        axis = attrs["axis"].i if "axis" in attrs else 0
        return index == 0 and axis == 0
    # GatherBlockQuantized: inputs data, indices, scales, zero_points; rows are gathered along gather_axis.
    axis = attrs["gather_axis"].i if "gather_axis" in attrs else 0
    return index in (0, 2, 3) and axis == 0


def _eight_bit_planes(graph, producers) -> dict[str, str]:
    """edgepack's exact CPU layout runs an 8-bit weight as two 4-bit MatMulNBits planes on one input whose
    outputs are added (edgepack/quantize/cpu_layout.py): {node name: "lo" | "hi"} for such pairs."""
    planes: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        a, b = (producers.get(name) for name in node.input)
        if (a is not None and b is not None and a.op_type == b.op_type == "MatMulNBits" and a.input[0] == b.input[0]
                and all(next((x.i for x in n.attribute if x.name == "bits"), 4) == 4 for n in (a, b))):
            planes[a.name or a.output[0]] = "lo"
            planes[b.name or b.output[0]] = "hi"
    return planes


def _nbits_format(node, plane_pairs: dict) -> str:
    if (node.name or node.output[0]) in plane_pairs:
        return "int8"
    return f"int{next((a.i for a in node.attribute if a.name == 'bits'), 4)}"


def _weight_format(node, inits: dict, producers: dict, plane_pairs: dict) -> str | None:
    """The format of the weight matrix this node multiplies by, counted once per matrix; None if it has none."""
    if node.op_type == "MatMulNBits":
        if plane_pairs.get(node.name or node.output[0]) == "hi":
            return None  # the second plane of an 8-bit weight: counted with its "lo" plane
        return _nbits_format(node, plane_pairs)
    if node.op_type in ("MatMul", "Gemm") and len(node.input) >= 2:
        weight = _source_initializer(node.input[1], inits, producers)
        # not the block sums of the quantized layouts (A @ 0/1 indicator); their block minimums come through Neg
        if weight is not None and len(weight.dims) == 2 and "block_indicator" not in weight.name:
            return _FLOAT_FORMAT.get(weight.data_type)
    return None


def _format_of(tensor, uses, plane_pairs: dict | None = None) -> str:
    for node, _index in uses:  # a tied table's MatMulNBits use decides (its Gather reads the same planes)
        if node.op_type == "MatMulNBits":
            return _nbits_format(node, plane_pairs or {})
    for node, _index in uses:
        if node.op_type == "GatherBlockQuantized":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            return f"int{bits}"
    if tensor.data_type in _FLOAT_FORMAT:
        return _FLOAT_FORMAT[tensor.data_type]
    if tensor.data_type in (2, 3):
        return "int8"
    if tensor.data_type in (21, 22):
        return "int4"
    return "other"


def _source_initializer(name: str, inits: dict, producers: dict):
    """Follow Transpose/Cast/Identity back to an initializer (the tied lm_head is MatMul(x, Transpose(W)))."""
    seen = 0
    while name not in inits and name in producers and seen < 4:
        node = producers[name]
        if node.op_type not in ("Transpose", "Cast", "Identity", "DequantizeLinear"):
            return None
        name = node.input[0]
        seen += 1
    return inits.get(name)


def _linear_macs(node, inits: dict, producers: dict) -> int:
    if node.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in node.attribute if a.name in ("K", "N")}
        return int(attrs.get("K", 0)) * int(attrs.get("N", 0))
    if node.op_type in ("MatMul", "Gemm", "MatMulInteger"):
        weight = _source_initializer(node.input[1], inits, producers)
        if weight is not None and len(weight.dims) >= 2:
            macs = 1
            for dim in weight.dims[-2:]:
                macs *= int(dim)
            return macs
    return 0


def runtime_nodes(graph, inits) -> int:
    """Nodes that run per call. onnxruntime constant-folds at session creation every node whose inputs are
    all constants (Constant, and edgepack's quantized layouts compute fp16 -> fp32 scales, zero points and
    offsets from initializers with Cast / ConstantOfShape / Neg / Transpose): those cost nothing per token."""
    constant = set(inits) | {""}
    running = 0
    for node in graph.node:  # ONNX graphs are topologically sorted
        if all(name in constant for name in node.input) and node.op_type not in _NONDETERMINISTIC:
            constant.update(node.output)
        else:
            running += 1
    return running


_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _kv_per_position(graph, config: dict) -> tuple[int, int, int]:
    """(bytes per cached position over all layers, layers, heads x head_dim of one K tensor)."""
    per_pos = 0
    layers = set()
    heads_dims = 0
    for inp in graph.input:
        match = _PAST.match(inp.name)
        if not match:
            continue
        layers.add(int(match.group(1)))
        tensor_type = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        heads = dims[1] if len(dims) > 1 and dims[1] else _kv_heads(config)
        head_dim = dims[3] if len(dims) > 3 and dims[3] else _head_dim(config)
        per_pos += heads * head_dim * _ELEMENT_BYTES.get(tensor_type.elem_type, 4)
        if match.group(2) == "key":
            # attention FLOPs scale with the query heads, which may exceed the KV heads (GQA)
            heads_dims = _query_heads(config, heads) * head_dim
    return int(per_pos), len(layers), int(heads_dims)


def _kv_heads(config: dict) -> int:
    return int(config.get("num_key_value_heads") or config.get("num_attention_heads") or config.get("n_head") or 1)


def _query_heads(config: dict, default: int) -> int:
    return int(config.get("num_attention_heads") or config.get("n_head") or default)


def _head_dim(config: dict) -> int:
    if config.get("head_dim"):
        return int(config["head_dim"])
    hidden = config.get("hidden_size") or config.get("n_embd") or 0
    heads = config.get("num_attention_heads") or config.get("n_head") or 1
    return int(hidden) // int(heads)


def _max_context(config: dict) -> int | None:
    from edgepack.runtime.model_dir import max_positions

    return max_positions(config)
