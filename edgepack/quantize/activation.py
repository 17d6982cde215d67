"""Schemes that quantize activations too (int8-dynamic, int8-static QDQ) and fp16, via onnxruntime's own tools."""

from __future__ import annotations

from pathlib import Path

from edgepack.core.onnx_io import save_model
from edgepack.quantize.graph import untie_lm_head
from edgepack.quantize.schemes import Fp16, Int8Dynamic, Int8Static


def quantize_int8_dynamic(model, scheme: Int8Dynamic, work_dir: Path, calibration=None):
    """onnxruntime's quantize_dynamic, after SmoothQuant (`scheme.smooth`) and with the MatMuls whose inputs one
    activation scale resolves worst kept as 8-bit weight-only MatMulNBits (`scheme.sensitive_8bit`); with
    `scheme.embeddings` int4 the largest Gather table becomes GatherBlockQuantized. `calibration()` gives the
    calibration feeds when smoothing or ranking needs them."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    untied = untie_lm_head(model)
    facts: dict = {"lm_head": {"untied_from_embedding": untied is not None}}
    feeds = calibration() if (scheme.smooth or scheme.sensitive_8bit) and calibration is not None else None
    if scheme.smooth and feeds:
        from edgepack.quantize.smooth import smooth_matmul_inputs

        facts["smooth"] = smooth_matmul_inputs(model, feeds, scheme.smooth).to_json()
    weight_only: list[str] = []
    if scheme.sensitive_8bit and feeds:
        from edgepack.quantize.smooth import sensitive_inputs

        weight_only = sensitive_inputs(model, feeds, scheme.sensitive_8bit)
    table = _largest_gather_table(model) if scheme.embeddings == "int4" else None
    src, dst = work_dir / "dynamic_in.onnx", work_dir / "dynamic_out.onnx"
    save_model(model, src)
    # reduce_range (7-bit weights): onnxruntime's u8s8 kernels on x86 CPUs without VNNI (AVX2, AVX-512F) sum
    # pairs of uint8 x int8 products in int16 and saturate, which turns LLM output into noise there. The
    # artifact runs on CPUs we cannot choose, so it is built to be correct on all of them (onnxruntime's
    # quantization docs recommend this for non-VNNI machines); elsewhere it costs one bit of weight precision.
    quantize_dynamic(
        str(src), str(dst), per_channel=scheme.per_channel, weight_type=QuantType.QInt8, reduce_range=True,
        nodes_to_exclude=weight_only + ([table] if table else []), extra_options={"MatMulConstBOnly": True},
    )
    model = onnx.load(str(dst))
    if weight_only or table:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        if weight_only:  # the MatMuls left float are exactly these (the dynamic ones are MatMulInteger now)
            quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=32, is_symmetric=True, accuracy_level=4,
                                             op_types_to_quantize=("MatMul",))
            quantizer.process()
            model = quantizer.model.model
        if table:
            others = [n.name for n in model.graph.node if n.op_type == "Gather" and n.name != table]
            quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=16, is_symmetric=False, op_types_to_quantize=("Gather",),
                                             nodes_to_exclude=others)
            quantizer.process()
            model = quantizer.model.model
    facts["weight_only_8bit"] = weight_only
    facts["int4_table"] = table
    return model, facts


def _largest_gather_table(model) -> str | None:
    """The Gather node reading the largest 2-D initializer (the word embedding table)."""
    inits = {i.name: i for i in model.graph.initializer}
    best, size = None, 0
    for node in model.graph.node:
        init = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if init is not None and len(init.dims) == 2 and init.dims[0] * init.dims[1] > size:
            best, size = node.name, init.dims[0] * init.dims[1]
    return best


def quantize_int8_static(model, scheme: Int8Static, calibration_reader, work_dir: Path):
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgepack.quantize.ort_quant_compat import linear_quantizer_edits

    untied = untie_lm_head(model)
    src, dst = work_dir / "static_in.onnx", work_dir / "static_out.onnx"
    save_model(model, src)
    activation_type = {"uint8": QuantType.QUInt8, "uint16": QuantType.QUInt16}[scheme.activations]
    weight_type = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[scheme.weights]
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[scheme.method]
    with linear_quantizer_edits():  # onnxruntime 1.32's quantizer is quadratic in graph size (see that module)
        quantize_static(
            str(src), str(dst), calibration_reader,
            quant_format=QuantFormat.QDQ,
            activation_type=activation_type,
            weight_type=weight_type,
            per_channel=scheme.per_channel,
            calibrate_method=method,
            op_types_to_quantize=["MatMul", "Gather", "Gemm"],
            # 16-bit Q/DQ needs the com.microsoft Q/DQ ops below opset 21.
            extra_options={"UseQDQContribOps": scheme.activations == "uint16"},
            calibration_providers=["CPUExecutionProvider"],
            use_external_data_format=model.ByteSize() > 1_900_000_000,
        )
    return onnx.load(str(dst)), {"lm_head": {"untied_from_embedding": untied is not None},
                                 "calibration_feeds": len(calibration_reader)}


def convert_fp16(model, scheme: Fp16):
    # onnxruntime's converter (used by Olive too): regularly updated op block list for CPU kernels.
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from edgepack.convert.pooling import POOLING_NODE_PREFIX

    # The sentence pooling stays fp32: its sums over the sequence and the norm are where fp16 loses most, for
    # a few hundred operations per sentence.
    pooling = [n.name for n in model.graph.node if n.name.startswith(POOLING_NODE_PREFIX)]
    return convert_float_to_float16(model, keep_io_types=scheme.keep_io_types, disable_shape_infer=True,
                                    node_block_list=pooling or None), {}
