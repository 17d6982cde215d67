"""Weight-only block quantization (int4, int8-weight) with onnxruntime's MatMulNBitsQuantizer.

Activations stay float; each MatMul weight becomes `com.microsoft.MatMulNBits` blocks with their own
scales (and zero points). Per-node precision (lm_head, `--keep-8bit` patterns) is done by running the
library quantizer once per bit width over disjoint node sets. Then `cpu_layout.rewrite_for_cpu`
re-expresses, value for value, what onnxruntime's CPU kernels run slowly (HQQ's float zero points,
8-bit weights at accuracy_level 0) as fast 4-bit pieces, and a tied embedding reads the lm_head's
quantized blocks instead of keeping its own table.
"""

from __future__ import annotations

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
                   include: set[str], calibration_reader=None, op_types=("MatMul",)):
    """Quantize exactly the MatMul nodes named in `include` with onnxruntime's quantizer; return the new model."""
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    logging.getLogger(mnq.__name__).setLevel(logging.WARNING)  # it logs every node at INFO

    exclude = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gather") and n.name not in include]
    if algorithm == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=op_types)
    elif algorithm == "gptq":
        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=calibration_reader, op_types_to_quantize=op_types)
    elif algorithm == "k-quant":
        config = mnq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=op_types)
    else:  # "rtn": onnxruntime's own round-to-nearest blocks (integer zero points)
        config = mnq.DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level, bits=bits, op_types_to_quantize=op_types
        )
    quantizer = mnq.MatMulNBitsQuantizer(
        model, bits=bits, block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
        nodes_to_exclude=exclude, algo_config=config, op_types_to_quantize=op_types,
    )
    quantizer.process()
    result = quantizer.model.model
    if algorithm in ("hqq", "gptq", "k-quant"):
        # These paths do not set accuracy_level on the nodes they emit; set it so int8 compute is used.
        for node in result.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                from onnx import helper

                node.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))
    return result


def quantize_weight_only(model, scheme: Int4 | Int8Weight, calibration_reader=None) -> tuple[object, dict]:
    """Apply `scheme` to an in-memory ModelProto; return (new model, facts about what was quantized)."""

    untied = untie_lm_head(model)
    lm_head = lm_head_node(model)
    tied = find_tied_embeddings(model, lm_head)  # before quantization: the fp32 lm_head weight goes
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
                               accuracy_level=scheme.accuracy_level, algorithm="rtn", include=eight)
    if four:
        model = _run_quantizer(model, bits=4, block_size=scheme.block_size, symmetric=scheme.symmetric,
                               accuracy_level=scheme.accuracy_level, algorithm=algorithm, include=four,
                               calibration_reader=calibration_reader)
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
                               op_types=("Gather",))
    layout = rewrite_for_cpu(model, tied_embeddings=shared,
                             int8_embeddings=tuple(g.name for g in gathers) if precision == "int8" else (),
                             embedding_block_size=scheme.block_size)
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
