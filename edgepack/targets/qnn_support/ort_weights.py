"""Per-channel weight quantization of onnxruntime's QDQ quantizer, all channels at once.

onnxruntime 1.32's `QDQQuantizer` computes a per-channel weight's scale and zero point, and then its
quantized values, in a Python loop over the channels (`compute_data_quant_params` and `quantize_nparray`
per channel): on a decoder's static graph (hundreds of MatMul weights, 200,000 output channels in all)
that loop is half of `quantize_static`'s time, and the QNN target runs it once per graph on the same
weights. The replacements below do the same arithmetic on whole arrays: the same float32/float64 steps
in the same order, so the scales, zero points and quantized bytes are identical (a test compares them
with onnxruntime's own functions). They apply only inside `vectorized_weight_quantization()`, only to
integer per-channel weights without per-channel range overrides, and only to the onnxruntime versions
checked here; every other tensor goes through onnxruntime's code.
"""

from __future__ import annotations

import contextlib

import numpy as np

CHECKED_VERSIONS = ("1.32.",)


def _integer_types():
    from onnx import TensorProto

    return (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT4, TensorProto.UINT4)


def per_channel_params(data: np.ndarray, quant_type: int, axis: int, symmetric: bool, reduce_range: bool = False,
                       min_real_range: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(zero points, scales), one per index of `axis`: onnxruntime's `compute_data_quant_params` applied to
    each `data.take(i, axis)`, vectorized (`compute_scale_zp`'s steps on arrays)."""
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(quant_type, reduce_range, symmetric=symmetric)
    rows = np.moveaxis(data, axis, 0).reshape(data.shape[axis], -1)
    rmin = rows.min(axis=1)
    rmax = rows.max(axis=1)
    rmin = np.minimum(rmin, np.array(0, dtype=rmin.dtype))
    rmax = np.maximum(rmax, np.array(0, dtype=rmax.dtype))
    if min_real_range is not None:
        rmax = np.maximum(rmax, rmin + np.asarray(min_real_range, dtype=rmin.dtype))
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin, rmax = -absmax, +absmax
    scale = (rmax.astype(np.float64) - rmin.astype(np.float64)) / (np.array(qmax, dtype=np.float64) - np.array(qmin, dtype=np.float64))
    finfo = np.finfo(rmax.dtype)
    min_scale = finfo.smallest_subnormal if rmax.dtype == np.float16 else finfo.tiny
    stored = scale.astype(rmax.dtype)
    degenerate = (stored if rmax.dtype == np.float16 else scale) < min_scale
    if symmetric:
        zero = np.full(rows.shape[0], np.round((qmin + qmax) / np.array(2.0, dtype=np.float64)))
    else:
        with np.errstate(divide="ignore", invalid="ignore"):  # degenerate channels divide by 0; replaced below
            zero = np.round(qmin - rmin / scale)
    zero_points = np.where(degenerate, 0, zero).astype(qmin.dtype)
    scales = np.where(degenerate, np.array(1.0, dtype=rmax.dtype), stored).astype(rmax.dtype)
    return zero_points, scales


def quantize_per_channel(data: np.ndarray, quant_type: int, zero_points: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    """onnxruntime's `quantize_nparray` per channel along `axis` (full integer range), vectorized."""
    from onnxruntime.quantization.quant_utils import ONNX_TYPE_TO_NP_TYPE, get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(quant_type, reduce_range=False, symmetric=False)
    shape = [1] * data.ndim
    shape[axis] = data.shape[axis]
    values = np.asarray((data.astype(np.float32) / scales.reshape(shape)).round() + zero_points.reshape(shape))
    np.clip(values, qmin, qmax, out=values)
    return values.astype(ONNX_TYPE_TO_NP_TYPE[quant_type])


def _fast_initializer_params(quantizer, original):
    """QDQQuantizer._calc_initializer_quant_params with the plain per-channel integer weights computed by
    `per_channel_params`; every other tensor goes through onnxruntime's method."""
    from onnx import TensorProto
    from onnxruntime.quantization.base_quantizer import QuantizationParams
    from onnxruntime.quantization.qdq_quantizer import QDQQuantTensorType
    from onnxruntime.quantization.quant_utils import normalize_axis

    initializers = {}
    for init in quantizer.model.initializer():
        initializers.setdefault(init.name, init)  # the first of a name, as onnxruntime's find_by_name
    fast, rest = {}, {}
    for name, info in quantizer.tensors_to_quantize.items():
        init = initializers.get(name)
        overrides = quantizer.tensor_quant_overrides.get(name, [{}])
        is_weight = info.tensor_type is QDQQuantTensorType.WEIGHT
        quant_type = quantizer.weight_qType if is_weight else quantizer.activation_qType
        if "quant_type" in overrides[0]:
            quant_type = overrides[0]["quant_type"].tensor_type
        axis = overrides[0].get("axis", info.axis)
        plain = (init is not None and axis is not None and init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
                 and quant_type in _integer_types() and not (is_weight and quantizer.block_size > 0)
                 and len(overrides) == 1 and not {"rmin", "rmax", "scale", "zero_point"} & set(overrides[0])
                 and not quantizer.tensor_quant_overrides.overrides_scale_zp(name))
        valid, axis = normalize_axis(axis, len(init.dims)) if plain else (False, None)
        if not valid:
            rest[name] = info
            continue
        from onnx import numpy_helper

        data = numpy_helper.to_array(init)
        zero_points, scales = per_channel_params(
            data, quant_type, axis, overrides[0].get("symmetric", True), overrides[0].get("reduce_range", quantizer.reduce_range),
            quantizer.min_real_range)
        fast[name] = QuantizationParams(zero_point=zero_points, scale=scales, quant_type=quant_type, axis=axis)
    everything = quantizer.tensors_to_quantize
    quantizer.tensors_to_quantize = rest
    try:
        computed = original(quantizer)
    finally:
        quantizer.tensors_to_quantize = everything
    return {name: fast.get(name, computed.get(name)) for name in everything if name in fast or name in computed}


def _fast_quantize_initializer(original):
    def quantize_onnx_initializer(weight, quant_type, zero_point, scale, axis=None, quant_weight_name=None, block_size=0):
        import onnx
        from onnx import numpy_helper
        from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX, pack_bytes_to_4bit

        if axis is None or block_size or quant_type not in _integer_types() or weight.data_type not in (
                onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            return original(weight, quant_type, zero_point, scale, axis, quant_weight_name, block_size)
        data = numpy_helper.to_array(weight)
        quantized = quantize_per_channel(data, quant_type, np.asarray(zero_point), np.asarray(scale), axis)
        name = quant_weight_name if quant_weight_name else f"{weight.name}{TENSOR_NAME_QUANT_SUFFIX}"
        if quant_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            packed = bytes(pack_bytes_to_4bit(quantized.tobytes()))
            return onnx.helper.make_tensor(name, quant_type, weight.dims, packed, raw=True)
        return numpy_helper.from_array(quantized.reshape(weight.dims), name)

    return quantize_onnx_initializer


@contextlib.contextmanager
def vectorized_weight_quantization():
    """Swap the per-channel loops for whole-array versions for the duration of a quantization (checked
    onnxruntime versions only; yields whether they are swapped)."""
    import onnxruntime
    from onnxruntime.quantization import qdq_quantizer

    if not onnxruntime.__version__.startswith(CHECKED_VERSIONS):
        yield False
        return
    saved_params = qdq_quantizer.QDQQuantizer._calc_initializer_quant_params
    saved_quantize = qdq_quantizer.quantize_onnx_initializer
    qdq_quantizer.QDQQuantizer._calc_initializer_quant_params = lambda self: _fast_initializer_params(self, saved_params)
    qdq_quantizer.quantize_onnx_initializer = _fast_quantize_initializer(saved_quantize)
    try:
        yield True
    finally:
        qdq_quantizer.QDQQuantizer._calc_initializer_quant_params = saved_params
        qdq_quantizer.quantize_onnx_initializer = saved_quantize


def _read_external(tensor, folder) -> np.ndarray:
    """One external initializer's values, read from its data file (only this tensor); the tensor is left as it is."""
    from onnx.external_data_helper import ExternalDataInfo
    from onnx.helper import tensor_dtype_to_np_dtype

    info = ExternalDataInfo(tensor)
    dtype = np.dtype(tensor_dtype_to_np_dtype(tensor.data_type))
    count = int(np.prod(tensor.dims, dtype=np.int64))
    with (folder / info.location).open("rb") as f:
        f.seek(int(info.offset or 0))
        values = np.fromfile(f, dtype=dtype, count=count)
    if values.size != count:
        raise ValueError(f"{tensor.name}: {info.location} holds {values.size} of its {count} values")
    return values.reshape(tuple(tensor.dims))


@contextlib.contextmanager
def weights_read_from_disk(folder):
    """`quantize_static` with the model's external weights left on disk: it loads the graph without them, each
    weight is read from its file when the quantizer needs its values (and dropped after), and only the quantized
    weights are held. What is still external when the QDQ model is saved (float constants it keeps) is read in
    then, so the saved model is complete.

    Why: `quantize_static` loads the whole model with its weights (`load_model_with_shape_infer`) and keeps them
    until it has saved, beside the quantized ones: three to four times the fp32 weight bytes at its peak, the
    largest step of the QNN target. onnxruntime's quantizer has no streaming mode; these are the points where it
    reads an initializer's values (`onnx.numpy_helper.to_array`, through `tensor_proto_to_array`) and loads and
    saves the model. Checked onnxruntime versions only (yields whether it is swapped)."""
    import importlib
    from pathlib import Path

    import onnx
    import onnxruntime
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
    from onnxruntime.quantization import base_quantizer, quant_utils
    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.quantization.quant_utils import add_infer_metadata, generate_identified_filename

    if not onnxruntime.__version__.startswith(CHECKED_VERSIONS):
        yield False
        return
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")  # the module; the package exports a function of that name
    folder = Path(folder)
    saved_to_array, saved_save = numpy_helper.to_array, ONNXModel.save_model_to_file

    def load_model_with_shape_infer(model_path: Path):
        inferred = generate_identified_filename(model_path, "-inferred")
        onnx.shape_inference.infer_shapes_path(str(model_path), str(inferred))
        try:
            model = onnx.load(str(inferred), load_external_data=False)
        finally:
            inferred.unlink(missing_ok=True)
        add_infer_metadata(model)
        return model

    def save_and_reload_model_with_shape_infer(model):
        # The graph alone, beside the weights' files so that its external references resolve (onnxruntime's
        # version saves a copy with its weights in a temporary folder).
        import uuid

        path = folder / f"edgepack-reload-{uuid.uuid4().hex}.onnx"
        onnx.save_model(model, str(path))
        try:
            return load_model_with_shape_infer(path)
        finally:
            path.unlink(missing_ok=True)

    def to_array(tensor, base_dir: str = ""):
        if not base_dir and uses_external_data(tensor):
            return _read_external(tensor, folder)
        return saved_to_array(tensor, base_dir)

    def save_model_to_file(self, output_path, use_external_data_format=False):
        for tensor in self.model.graph.initializer:
            if uses_external_data(tensor):
                load_external_data_for_tensor(tensor, str(folder))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
        return saved_save(self, output_path, use_external_data_format)

    swaps = [(ort_quantize, "load_model_with_shape_infer", load_model_with_shape_infer),
             (ort_quantize, "save_and_reload_model_with_shape_infer", save_and_reload_model_with_shape_infer),
             (quant_utils, "save_and_reload_model_with_shape_infer", save_and_reload_model_with_shape_infer),  # update_opset_version
             (base_quantizer, "save_and_reload_model_with_shape_infer", save_and_reload_model_with_shape_infer),
             (numpy_helper, "to_array", to_array), (ONNXModel, "save_model_to_file", save_model_to_file)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    for owner, name, value in swaps:
        setattr(owner, name, value)
    try:
        yield True
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
