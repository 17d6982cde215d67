"""Weight-only block quantization (int4, int8-weight) with onnxruntime's MatMulNBitsQuantizer.

Activations stay float; each MatMul weight becomes `com.microsoft.MatMulNBits` blocks with their own
scales (and zero points). Per-node precision (lm_head, `--keep-8bit` patterns) is done by running the
library quantizer once per bit width over disjoint node sets. Then `cpu_layout.rewrite_for_cpu`
re-expresses, value for value, what onnxruntime's CPU kernels run slowly (HQQ's float zero points,
8-bit weights at accuracy_level 0) as fast 4-bit pieces, and a tied embedding reads the lm_head's
quantized blocks instead of keeping its own table.
"""

from __future__ import annotations

import contextlib

from edgepack.quantize.cpu_layout import find_tied_embeddings, rewrite_for_cpu
from edgepack.quantize.graph import (
    embedding_gathers,
    lm_head_node,
    matching_names,
    untie_lm_head,
    weight_matmuls,
)
from edgepack.quantize.schemes import Int4, Int8Weight


def _run_quantizer(model, *, bits: int, block_size: int, symmetric: bool, accuracy_level: int, algorithm: str,
                   include: set[str], calibration_reader=None, op_types=("MatMul",), store=None):
    """Quantize exactly the MatMul nodes named in `include` with onnxruntime's quantizer; return the new model.

    HQQ and RTN quantize each weight on its own: they run node by node, each node with its weight in a
    model of its own (`_quantize_node_by_node`), so a model loaded without its weights is quantized
    holding one weight at a time. GPTQ (calibration through the whole model) and k-quant (onnxruntime's
    whole-model routine) get the model with every weight loaded.
    """
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    from edgepack.quantize.external import TensorStore

    logging.getLogger(mnq.__name__).setLevel(logging.WARNING)  # it logs every node at INFO
    store = store if store is not None else TensorStore()

    def make_config():
        if algorithm == "hqq":
            return mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=op_types)
        if algorithm == "gptq":
            return mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=calibration_reader, op_types_to_quantize=op_types)
        if algorithm == "k-quant":
            return mnq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=op_types)
        # "rtn": onnxruntime's own round-to-nearest blocks (integer zero points)
        return mnq.DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level, bits=bits, op_types_to_quantize=op_types
        )

    def make_quantizer(target, exclude):
        return mnq.MatMulNBitsQuantizer(
            target, bits=bits, block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
            nodes_to_exclude=exclude, algo_config=make_config(), op_types_to_quantize=op_types,
        )

    if algorithm in ("hqq", "rtn") and not _has_subgraphs(model):
        from edgepack.core.allocator import reuse_large_allocations

        with reuse_large_allocations() if algorithm == "hqq" else contextlib.nullcontext():
            result = _quantize_node_by_node(model, include, op_types, store, make_quantizer)
    else:
        _load_weights(model, store)
        exclude = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gather") and n.name not in include]
        quantizer = make_quantizer(model, exclude)
        quantizer.process()
        result = quantizer.model.model
    if algorithm in ("hqq", "gptq", "k-quant"):
        # These paths do not set accuracy_level on the nodes they emit; set it so int8 compute is used.
        for node in result.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                from onnx import helper

                node.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))
    return result


def _has_subgraphs(model) -> bool:
    from onnx import AttributeProto

    return any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute)


def _load_weights(model, store) -> None:
    """Every external initializer's bytes into the model (for the library routines that read whole models)."""
    from edgepack.quantize.external import is_external

    for tensor in model.graph.initializer:
        if is_external(tensor):
            tensor.CopyFrom(store.materialize(tensor))


def _quantize_node_by_node(model, include: set[str], op_types, store, make_quantizer):
    """What `MatMulNBitsQuantizer(model).process()` does for HQQ/RTN, one node at a time.

    Each selected node goes, with its weight read from `store`, into a one-node model that onnxruntime's
    quantizer processes (its own code, its own opset and IR updates); its nodes replace the original and
    its new initializers go to `store` (data-less references in `model`), the weight leaves `model` when
    no other node reads it. The one-node model, and the weight's bytes in it, are freed after each node.
    """
    from collections import Counter

    from onnx import helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input)
    outputs = {o.name for o in graph.output}
    replaced, dropped = [], set()
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else node.input[0] if node.input else ""
        if node.op_type not in op_types or node.name not in include or weight not in inits:
            replaced.append(node)
            continue
        single = helper.make_model(helper.make_graph([node], "node", [], []), opset_imports=list(model.opset_import))
        single.ir_version = model.ir_version
        store.materialize(inits[weight], into=single.graph.initializer)
        make_quantizer(single, []).process()
        if [n.op_type for n in single.graph.node] == [node.op_type]:  # the library skipped it (e.g. not 2-D)
            replaced.append(node)
            continue
        # Copies: a message taken from the one-node model would keep that model's arena, and the weight's
        # bytes in it, alive as long as the message is referenced.
        replaced.extend(_standalone(n) for n in single.graph.node)
        for tensor in single.graph.initializer:
            if tensor.name != weight:
                graph.initializer.append(store.take(tensor))
        readers[weight] -= 1
        if readers[weight] == 0 and weight not in outputs:
            dropped.add(weight)
        _merge_opsets(model, single)
        del single
    graph.ClearField("node")
    graph.node.extend(replaced)
    if dropped:
        keep = [t for t in graph.initializer if t.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        stale = [i for i in graph.input if i.name in dropped]  # old IR: initializers listed as inputs too
        for item in stale:
            graph.input.remove(item)
    return model


def _standalone(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _merge_opsets(model, single) -> None:
    """The opset and IR version updates the quantizer made to the one-node model, onto the model."""
    versions = {o.domain: o for o in model.opset_import}
    for opset in single.opset_import:
        if opset.domain not in versions:
            model.opset_import.append(opset)
            versions[opset.domain] = model.opset_import[-1]
        elif versions[opset.domain].version < opset.version:
            versions[opset.domain].version = opset.version
    model.ir_version = max(model.ir_version, single.ir_version)


def quantize_weight_only(model, scheme: Int4 | Int8Weight, calibration_reader=None, store=None) -> tuple[object, dict]:
    """Apply `scheme` to a ModelProto; return (new model, facts about what was quantized).

    With `store` (an `external.TensorStore` over the model's folder and a work folder) the model may be
    loaded without its weights: they are read one at a time and what is written goes to the store's spill
    file, the model holding references (save it with `store.save`). Without, the model is in memory.
    """

    untied = untie_lm_head(model, store=store)
    lm_head = lm_head_node(model)
    tied = find_tied_embeddings(model, lm_head, store=store)  # before quantization: the fp32 lm_head weight goes
    matmuls = [n.name for n in weight_matmuls(model)]
    if isinstance(scheme, Int8Weight):
        eight, four, skipped = set(matmuls), set(), set()
    else:
        eight = matching_names(matmuls, scheme.keep_8bit)
        skipped = set()
        if lm_head in matmuls:
            {"int8": eight, "fp32": skipped}.get(scheme.lm_head, set()).add(lm_head)
        four = set(matmuls) - eight - skipped
    algorithm = "rtn" if isinstance(scheme, Int8Weight) else scheme.algorithm
    if eight:
        # 8-bit blocks always use onnxruntime's RTN: HQQ/k-quant in onnxruntime are 4-bit methods.
        model = _run_quantizer(model, bits=8, block_size=scheme.block_size, symmetric=True,
                               accuracy_level=scheme.accuracy_level, algorithm="rtn", include=eight, store=store)
    if four:
        model = _run_quantizer(model, bits=4, block_size=scheme.block_size, symmetric=scheme.symmetric,
                               accuracy_level=scheme.accuracy_level, algorithm=algorithm, include=four,
                               calibration_reader=calibration_reader, store=store)
    precision = scheme.embeddings
    head_bits = 8 if lm_head in eight else 4 if lm_head in four else None
    wanted_bits = {"int8": 8, "int4": 4}.get(precision)
    # A tied table (bit-identical to lm_head^T, checked) reads the lm_head's blocks when those are at
    # least as precise as the embedding precision asked for: stored once, no table of its own.
    shared = tied if head_bits and wanted_bits and head_bits >= wanted_bits else {}
    gathers = [g for g in embedding_gathers(model) if g.name not in shared]
    if precision == "int4" and gathers:
        model = _run_quantizer(model, bits=4, block_size=scheme.block_size, symmetric=scheme.symmetric,
                               accuracy_level=scheme.accuracy_level, algorithm="rtn", include={g.name for g in gathers},
                               op_types=("Gather",), store=store)
    layout = rewrite_for_cpu(model, tied_embeddings=shared,
                             int8_embeddings=tuple(g.name for g in gathers) if precision == "int8" else (),
                             embedding_block_size=scheme.block_size, store=store)
    nodes = sorted(layout["embeddings_shared"] + layout["embeddings_int8"] + ([g.name for g in gathers] if precision == "int4" else []))
    # Shared: the embedding has the lm_head's precision (>= the one asked for).
    embedding_precision = {8: "int8", 4: "int4"}[head_bits] if layout["embeddings_shared"] else precision if nodes else "fp32"
    embeddings = {"precision": embedding_precision, "nodes": nodes, "shared_with_lm_head": layout["embeddings_shared"]}
    facts = {
        "matmuls_4bit": len(four),
        "matmuls_8bit": len(eight),
        "matmuls_float": len(skipped),
        "keep_8bit_nodes": sorted(eight) if not isinstance(scheme, Int8Weight) else [],
        "lm_head": {"node": lm_head, "untied_from_embedding": untied is not None,
                    "precision": "int8" if lm_head in eight else "fp32" if lm_head in skipped else "int4" if lm_head in four else None,
                    "shared_with_embedding": bool(layout["embeddings_shared"])},
        "embeddings": embeddings,
        "cpu_layout": layout,
    }
    return model, facts
