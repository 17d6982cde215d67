"""The vectorized per-channel weight quantization gives onnxruntime's own scales, zero points and bytes."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from onnx import TensorProto, numpy_helper  # noqa: E402
from onnxruntime.quantization import quant_utils  # noqa: E402

from edgepack.targets.qnn_support import ort_weights  # noqa: E402

TYPES = [TensorProto.INT8, TensorProto.INT4, TensorProto.INT16, TensorProto.UINT8, TensorProto.UINT16]


def _weight(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.normal(0, 0.05, size=(48, 40)).astype(np.float32)
    data[:, 3] = 0.0  # a channel of zeros: onnxruntime's degenerate scale (1.0, zero point 0)
    data[:, 5] = np.abs(data[:, 5])  # one-sided channels
    data[:, 6] = -np.abs(data[:, 6])
    data[:, 7] *= 1e-9  # below the minimum real range
    return data


@pytest.mark.parametrize("quant_type", TYPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [1, 0])
def test_matches_onnxruntime_per_channel_loop(quant_type, symmetric, axis):
    data = _weight(quant_type * 10 + axis)
    zero_points, scales = ort_weights.per_channel_params(data, quant_type, axis, symmetric, min_real_range=0.0001)
    expected = [quant_utils.compute_data_quant_params(data.take(i, axis).ravel(), quant_type, symmetric, min_real_range=0.0001)
                for i in range(data.shape[axis])]
    want_zp = np.asarray([zp for zp, _ in expected])
    want_scale = np.asarray([scale for _, scale in expected])
    assert zero_points.dtype == want_zp.dtype and scales.dtype == want_scale.dtype
    assert np.array_equal(zero_points, want_zp) and scales.tobytes() == want_scale.tobytes()

    weight = numpy_helper.from_array(data, "w")
    ours = ort_weights._fast_quantize_initializer(quant_utils.quantize_onnx_initializer)(weight, quant_type, zero_points, scales, axis)
    theirs = quant_utils.quantize_onnx_initializer(weight, quant_type, want_zp, want_scale, axis)
    assert ours.SerializeToString() == theirs.SerializeToString()


def test_swapped_only_inside_the_context():
    from onnxruntime.quantization import qdq_quantizer

    before = qdq_quantizer.QDQQuantizer._calc_initializer_quant_params, qdq_quantizer.quantize_onnx_initializer
    with ort_weights.vectorized_weight_quantization() as swapped:
        assert swapped == (qdq_quantizer.quantize_onnx_initializer is not before[1])
    assert (qdq_quantizer.QDQQuantizer._calc_initializer_quant_params, qdq_quantizer.quantize_onnx_initializer) == before


@pytest.mark.parametrize("precision", ["w8a16", "w4a16"])
def test_quantize_with_weights_on_disk_writes_the_same_model(tmp_path, monkeypatch, precision):
    """quantize_static reading each weight from its file gives the QDQ model it gives with every weight loaded."""
    import contextlib

    import onnx
    from onnx import helper

    from edgepack.targets.qnn_support import quant

    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.normal(0, 1, (64, 32)).astype(np.float32), "table")
    w1 = numpy_helper.from_array(rng.normal(0, 0.1, (32, 48)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.1, (48, 64)).astype(np.float32), "w2")
    gain = numpy_helper.from_array(rng.normal(1, 0.1, (48,)).astype(np.float32), "gain")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node("Mul", ["h", "gain"], ["g"], name="scale"),
             helper.make_node("Relu", ["g"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["logits"], name="down")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8, 64])], [table, w1, w2, gain])
    feeds = [{"ids": rng.integers(0, 64, (1, 8)).astype(np.int64)} for _ in range(3)]
    written = {}
    for mode in ("loaded", "disk"):
        folder = tmp_path / mode
        folder.mkdir()
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        onnx.save_model(model, str(folder / "g.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="g.onnx.data", size_threshold=64)
        if mode == "loaded":
            monkeypatch.setattr(ort_weights, "weights_read_from_disk", lambda folder: contextlib.nullcontext(False))
        else:
            monkeypatch.undo()
        quant.quantize_qdq(folder / "g.onnx", folder / "g.qdq.onnx", feeds, precision, range_margin=0.25, work=folder)
        written[mode] = (folder / "g.qdq.onnx").read_bytes()
    assert written["disk"] == written["loaded"]
