"""Weight-only block quantization (int4, int8-weight) with onnxruntime's MatMulNBitsQuantizer.

Activations stay float; each MatMul weight becomes `com.microsoft.MatMulNBits` blocks with their own
scales (and zero points). Per-node precision (lm_head, `--keep-8bit` patterns) is done by running the
library quantizer once per bit width over disjoint node sets.
"""

from __future__ import annotations

import numpy as np

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


def quantize_embedding_int8(model, gather, block_size: int) -> bool:
    """Replace a Gather on an fp32 table by GatherBlockQuantized with 8-bit symmetric blocks.

    Written here because onnxruntime's MatMulNBitsQuantizer only emits 4-bit GatherBlockQuantized,
    while the op itself (bits=8, uint8 data, default zero point 128) runs on CPU.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    table = numpy_helper.to_array(inits[gather.input[0]]).astype(np.float32)
    vocab, hidden = table.shape
    if hidden % block_size:
        return False
    blocks = table.reshape(vocab, hidden // block_size, block_size)
    scales = np.abs(blocks).max(axis=-1) / 127.0
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(blocks / scales[..., None]), -127, 127).astype(np.int16) + 128
    data_name, scale_name = f"{gather.input[0]}_Q8", f"{gather.input[0]}_Q8_scales"
    model.graph.initializer.extend([
        numpy_helper.from_array(q.astype(np.uint8).reshape(vocab, hidden), data_name),
        numpy_helper.from_array(scales.astype(np.float32), scale_name),
    ])
    axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
    node = helper.make_node(
        "GatherBlockQuantized", [data_name, gather.input[1], scale_name], list(gather.output),
        name=f"{gather.name}_Q8", domain="com.microsoft", gather_axis=axis, quantize_axis=1, block_size=block_size, bits=8,
    )
    index = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    model.graph.node.insert(index, node)
    if not any(gather.input[0] in n.input for n in model.graph.node):
        model.graph.initializer.remove(inits[gather.input[0]])
    return True


def quantize_weight_only(model, scheme: Int4 | Int8Weight, calibration_reader=None) -> tuple[object, dict]:
    """Apply `scheme` to an in-memory ModelProto; return (new model, facts about what was quantized)."""
    import onnx

    untied = untie_lm_head(model)
    lm_head = lm_head_node(model)
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
    embeddings = {"precision": "fp32", "nodes": []}
    precision = scheme.embeddings
    gathers = embedding_gathers(model)
    if precision == "int8":
        done = [g.name for g in gathers if quantize_embedding_int8(model, g, scheme.block_size)]
        embeddings = {"precision": "int8" if done else "fp32", "nodes": done}
    elif precision == "int4" and gathers:
        names = {g.name for g in gathers}
        model = _run_quantizer(model, bits=4, block_size=scheme.block_size, symmetric=scheme.symmetric,
                               accuracy_level=scheme.accuracy_level, algorithm="rtn", include=names, op_types=("Gather",))
        embeddings = {"precision": "int4", "nodes": sorted(names)}
    onnx.checker.check_model(model) if model.ByteSize() < 2_000_000_000 else None
    facts = {
        "matmuls_4bit": len(four),
        "matmuls_8bit": len(eight),
        "matmuls_float": len(skipped),
        "keep_8bit_nodes": sorted(eight) if not isinstance(scheme, Int8Weight) else [],
        "lm_head": {"node": lm_head, "untied_from_embedding": untied is not None,
                    "precision": "int8" if lm_head in eight else "fp32" if lm_head in skipped else "int4" if lm_head in four else None},
        "embeddings": embeddings,
    }
    return model, facts
