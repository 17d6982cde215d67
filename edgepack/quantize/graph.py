"""Small ONNX graph edits the quantizers need before they can see every weight."""

from __future__ import annotations

import re

import numpy as np


def initializer_map(model) -> dict:
    return {init.name: init for init in model.graph.initializer}


def producer_map(model) -> dict:
    return {out: node for node in model.graph.node for out in node.output}


def untie_lm_head(model) -> str | None:
    """Store a tied lm_head (`Transpose(embedding)` -> MatMul) as its own initializer; return the MatMul's name.

    optimum exports a tied lm_head as a Transpose of the embedding table, which neither quantize_dynamic
    nor MatMulNBitsQuantizer treats as a constant weight, so the largest matrix would stay fp32.
    """
    from onnx import numpy_helper

    inits = initializer_map(model)
    producers = producer_map(model)
    untied = None
    for node in list(model.graph.node):
        if node.op_type != "MatMul":
            continue
        source = producers.get(node.input[1])
        if source is None or source.op_type != "Transpose" or source.input[0] not in inits:
            continue
        weight = numpy_helper.to_array(inits[source.input[0]])
        perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), None)
        transposed = np.ascontiguousarray(weight.transpose(perm) if perm else weight.T)
        name = f"{source.input[0]}.lm_head_untied"
        model.graph.initializer.append(numpy_helper.from_array(transposed, name))
        node.input[1] = name
        if not any(source.output[0] in n.input for n in model.graph.node if n is not node):
            model.graph.node.remove(source)
        untied = node.name
    return untied


def lm_head_node(model) -> str | None:
    """Name of the MatMul that produces the logits (possibly through a cast/reshape), if any."""
    producers = producer_map(model)
    frontier = [o.name for o in model.graph.output if o.name == "logits"]
    seen = set()
    while frontier:
        name = frontier.pop()
        node = producers.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in ("MatMul", "MatMulNBits", "MatMulInteger"):
            return node.name
        if node.op_type in ("Cast", "Reshape", "Identity", "Add", "DequantizeLinear", "QuantizeLinear"):
            frontier.extend(node.input[:1])
    return None


def weight_matmuls(model) -> list:
    """MatMul nodes whose second input is a constant 2-D initializer (the ones weight-only schemes quantize)."""
    inits = initializer_map(model)
    nodes = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            nodes.append(node)
    return nodes


def embedding_gathers(model) -> list:
    inits = initializer_map(model)
    return [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]


def matching_names(names, patterns: tuple[str, ...]) -> set[str]:
    compiled = [re.compile(p) for p in patterns]
    return {name for name in names if any(c.search(name) for c in compiled)}


def op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def save_model(model, path, *, external_data: bool = False) -> None:
    """Save as one file when it fits protobuf's 2 GB limit, else with external data beside it (`path.name`.data).

    `external_data=True` always writes the weights beside the graph: for models users load, since
    onnxruntime then maps them instead of parsing them out of one protobuf (a lower peak RSS at session
    creation and a faster load, since the weights are not copied out of a parsed message). It empties
    the tensors of the in-memory `model` (onnx moves their bytes out): do not use the model afterwards.
    """
    import onnx

    if external_data or model.ByteSize() >= 2_000_000_000:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data")
    else:
        onnx.save_model(model, str(path))


def validate_with_onnxruntime(path) -> None:
    """Load the model in onnxruntime: the validator that matters (onnx.checker rejects graphs that use
    onnxruntime's ops in the default domain, e.g. SimplifiedLayerNormalization from onnxruntime-genai's builder)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
