"""Small ONNX graph edits the quantizers need before they can see every weight."""

from __future__ import annotations

import re

import numpy as np


def initializer_map(model) -> dict:
    return {init.name: init for init in model.graph.initializer}


def producer_map(model) -> dict:
    return {out: node for node in model.graph.node for out in node.output}


def untie_lm_head(model, store=None) -> str | None:
    """Store a tied lm_head (`Transpose(embedding)` -> MatMul) as its own initializer; return the MatMul's name.

    optimum exports a tied lm_head as a Transpose of the embedding table, which neither quantize_dynamic
    nor MatMulNBitsQuantizer treats as a constant weight, so the largest matrix would stay fp32.
    With `store` (an `external.TensorStore`) the table is read from, and the copy written to, its files.
    """
    from edgepack.quantize.external import TensorStore

    store = store if store is not None else TensorStore()
    inits = initializer_map(model)
    producers = producer_map(model)
    untied = None
    for node in list(model.graph.node):
        if node.op_type != "MatMul":
            continue
        source = producers.get(node.input[1])
        if source is None or source.op_type != "Transpose" or source.input[0] not in inits:
            continue
        weight = store.array(inits[source.input[0]])
        perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), None)
        transposed = np.ascontiguousarray(weight.transpose(perm) if perm else weight.T)
        del weight
        name = f"{source.input[0]}.lm_head_untied"
        model.graph.initializer.append(store.add(transposed, name))
        del transposed
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


def validate_with_onnxruntime(path) -> None:
    """Load the model in onnxruntime: the validator that matters (onnx.checker rejects graphs that use
    onnxruntime's ops in the default domain, e.g. SimplifiedLayerNormalization from onnxruntime-genai's builder)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
