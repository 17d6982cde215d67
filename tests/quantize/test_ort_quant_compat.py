"""The linear-time quantizer edits (quantize/ort_quant_compat.py) give byte-identical QDQ models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.quantize import ort_quant_compat
from edgepack.targets.qnn_support.quant import _Reader


def _model(path):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "r"], ["sq"], name="square"),
        helper.make_node("Add", ["r", "sq"], ["s"], name="add"),
        helper.make_node("MatMul", ["s", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(onnx.shape_inference.infer_shapes(model), path)


def _quantize(src, out, feeds, patched: bool) -> bytes:
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    config = get_qnn_qdq_config(str(src), _Reader(feeds), activation_type=QuantType.QUInt16, weight_type=QuantType.QInt8)
    if patched:
        with ort_quant_compat.linear_quantizer_edits() as applied:
            assert applied, "this onnxruntime is not one the edits were checked against"
            quantize(str(src), str(out), config)
    else:
        quantize(str(src), str(out), config)
    return out.read_bytes()


def test_linear_edits_give_the_same_qdq_model(tmp_path):
    import onnxruntime

    if not onnxruntime.__version__.startswith(ort_quant_compat.CHECKED_VERSIONS):
        pytest.skip(f"onnxruntime {onnxruntime.__version__} keeps its own quantizer code")
    src = tmp_path / "m.onnx"
    _model(src)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 4, 16)).astype(np.float32)} for _ in range(3)]
    reference = _quantize(src, tmp_path / "ref.onnx", feeds, patched=False)
    patched = _quantize(src, tmp_path / "new.onnx", feeds, patched=True)
    assert patched == reference
    qdq = onnx.load_from_string(patched)
    assert sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node) >= 4  # activations really were quantized
    # The originals are back after the block.
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    assert MinMaxCalibrater.augment_graph is not ort_quant_compat._augment_graph


def test_calibrated_ranges_match_the_original_calibrator(tmp_path):
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    src = tmp_path / "m.onnx"
    _model(src)
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((1, 4, 16)).astype(np.float32)} for _ in range(2)]

    def ranges(patched: bool):
        context = ort_quant_compat.linear_quantizer_edits() if patched else _nothing()
        with context:
            calibrator = create_calibrator(str(src), None, augmented_model_path=str(tmp_path / f"aug{patched}.onnx"),
                                           calibrate_method=CalibrationMethod.MinMax)
        calibrator.collect_data(_Reader(feeds))
        return {k: (float(np.min(v.range_value[0])), float(np.max(v.range_value[1]))) for k, v in calibrator.compute_data().data.items()}

    reference, patched = ranges(False), ranges(True)
    assert set(reference) == {"x", "h", "r", "sq", "s", "y"}
    assert patched == reference


class _nothing:
    def __enter__(self):
        return False

    def __exit__(self, *exc):
        return False
