"""QDQ quantization for the HTP with onnxruntime's QNN helpers, and the accuracy rescue.

Precisions (weights / activations):
  w8a16  int8 symmetric per-channel MatMul weights, uint16 activations (the HTP's usual LLM setting)
  w4a16  int4 symmetric per-channel MatMul weights, uint16 activations
  w8a8   int8 symmetric per-channel MatMul weights, uint8 activations
  fp16   no quantization: the HTP runs the fp32 graph in fp16 (`enable_htp_fp16_precision`)

16-bit activations are asymmetric by default (twice the resolution for one-sided tensors: tiny Llama
max |logit diff| 0.064 symmetric -> 0.044); `activation_symmetric=True` gives symmetric ranges (an early
QNN simulator crash with asymmetric uint16 activations did not reproduce with onnxruntime-qnn 2.7).

onnxruntime 1.32's quantizer is quadratic in graph size in two places; `edgepack.quantize.ort_quant_compat`
swaps them for linear versions during quantization (SmolLM2's 15,000-node prefill graph: see that module).

Rescue: each weight is quantized alone (the others stay fp32) in the fp32 prefill graph on CPU and the
KL(fp32 || that) over the calibration windows is its sensitivity; the `rescue` most sensitive weights
are kept at 16 bits (int16 per-channel, which the HTP runs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepack.core.metrics import cosine_per_position, kl_per_position, log_softmax

PRECISIONS = ("w8a16", "w4a16", "w8a8", "fp16")


class _Reader:
    def __init__(self, feeds):
        self.feeds = feeds
        self._iter = iter(feeds)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self):
        self._iter = iter(self.feeds)


def weight_tensors(model) -> dict[str, dict]:
    """Constant weights the rescue can keep at 16 bits: MatMul right-hand sides and Gather tables."""
    inits = {i.name: i for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) >= 2:
            found.setdefault(node.input[1], {"op": "MatMul", "node": node.name, "dims": list(inits[node.input[1]].dims)})
        elif node.op_type == "Gather" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2:
            found.setdefault(node.input[0], {"op": "Gather", "node": node.name, "dims": list(inits[node.input[0]].dims)})
    return found


def _types(precision: str):
    from onnxruntime.quantization import QuantType

    weight = {"w8a16": QuantType.QInt8, "w4a16": QuantType.QInt4, "w8a8": QuantType.QInt8}[precision]
    activation = QuantType.QUInt8 if precision == "w8a8" else QuantType.QUInt16
    return weight, activation


def calibrate(fp32_path: Path, feeds: list[dict], work: Path):
    """MinMax ranges of every float tensor over the calibration feeds, as onnxruntime's TensorsData (what its
    MinMaxCalibrater computes: a ReduceMin and a ReduceMax per float tensor that is not a constant, min and max
    over the feeds).

    Written here rather than with onnxruntime's calibrator because of memory: that one loads the model with its
    weights, keeps it and an augmented copy, and runs a session holding another (prepacked) copy. Here the
    augmented graph is built without weights and its session maps them from the graph's data file."""
    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    from edgepack.targets.qnn_support.static_model import mapped_sessions

    model = onnx.load(str(fp32_path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    value_infos = {vi.name: vi for vi in inferred.graph.value_info}
    value_infos.update({o.name: o for o in inferred.graph.output})
    value_infos.update({i.name: i for i in inferred.graph.input})
    del inferred
    constants = {init.name for init in model.graph.initializer}
    tensors = sorted({name for node in model.graph.node for name in (*node.input, *node.output)
                      if name in value_infos and name not in constants
                      and value_infos[name].type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16)})
    outputs = []
    for name in tensors:
        for op in ("ReduceMin", "ReduceMax"):
            output = f"{name}.edgepack_{op}"
            model.graph.node.append(helper.make_node(op, [name], [output], name=output, keepdims=0))
            model.graph.output.append(helper.make_tensor_value_info(output, value_infos[name].type.tensor_type.elem_type, []))
            outputs.append(output)
    augmented = fp32_path.parent / f"{fp32_path.stem}.augmented.onnx"  # beside the graph: same external data
    onnx.save_model(model, str(augmented))
    del model
    session = mapped_sessions({"augmented": augmented})["augmented"]
    low, high = {}, {}
    for feed in feeds:
        for name, value in zip(outputs, session.run(outputs, feed)):
            tensor, op = name.rsplit(".edgepack_", 1)
            if op == "ReduceMin":
                low[tensor] = min(low.get(tensor, np.inf), float(np.min(value)))
            else:
                high[tensor] = max(high.get(tensor, -np.inf), float(np.max(value)))
    del session
    augmented.unlink()
    return TensorsData(CalibrationMethod.MinMax, {name: (np.float32(low[name]), np.float32(high[name])) for name in tensors})


def _external_bytes(model_path: Path) -> int:
    """Bytes of the external data files a model reads (0 for a self-contained model)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    model = onnx.load(str(model_path), load_external_data=False)
    files = {ExternalDataInfo(t).location for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    return sum((model_path.parent / name).stat().st_size for name in files)


def _ranges(data) -> dict[str, tuple[float, float]]:
    return {name: (float(np.min(item.range_value[0])), float(np.max(item.range_value[1]))) for name, item in data.data.items()}


def quantize_qdq(fp32_path: Path, out_path: Path, feeds: list[dict], precision: str, keep_16bit: set[str] = frozenset(),
                 range_margin: float = 0.0, work: Path | None = None, activation_symmetric: bool | None = None) -> dict:
    """QDQ model for the HTP. Returns facts (types, overrides).

    `range_margin` widens every calibrated 16-bit activation range by that fraction: MinMax
    calibration clips whatever other text drives beyond the calibration windows (seen on a tiny Llama:
    max |logit diff| 0.27 with the margin off, 0.06 with 0.25), and at 16 bits 25% costs a third of a bit.
    Done through the quantizer's rmin/rmax tensor overrides, so it keeps the parameters that must match
    (Reshape, Transpose, Concat ...) consistent. (Scaling the scales of the finished QDQ model instead
    broke the tiny Llama: max |logit diff| 0.64.)

    Memory: the calibration runs once, here, and reaches onnxruntime's quantizer as its calibration cache
    (`quantize_static(calibration_cache_path=...)`), so the quantizer does not build a second augmented model
    and session; the graph is read here without its weights (structure, names and shapes are all that is needed).
    """
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    from edgepack.quantize.ort_quant_compat import linear_quantizer_edits
    from edgepack.targets.qnn_support.ort_weights import vectorized_weight_quantization, weights_read_from_disk

    work = work or out_path.parent
    weight_type, activation_type = _types(precision)
    if activation_symmetric is None:
        activation_symmetric = activation_type == QuantType.QUInt16
    # onnxruntime's QNN preprocessing: Erf sequences -> Gelu, ReduceL2 -> LpNormalization (ops the HTP runs).
    # It loads the whole model (three copies of the weights at its peak), so it runs only on graphs holding what its
    # fusions look for: Erf (Gelu), ReduceL2 (LpNormalization), a 6-D Transpose (SpaceToDepth).
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    fusable = any(n.op_type in ("Erf", "ReduceL2") or (n.op_type == "Transpose" and any(
        len(a.ints) == 6 for a in n.attribute if a.name == "perm")) for n in graph.node)
    del graph
    prepped = out_path.parent / f"{fp32_path.stem}.qnnprep.onnx"
    if fusable and qnn_preprocess_model(str(fp32_path), str(prepped), save_as_external_data=True, all_tensors_to_one_file=True,
                                        external_data_location=f"{prepped.name}.data"):
        fp32_path = prepped
    model = onnx.load(str(fp32_path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 21)
    if opset < 21 and (activation_type == QuantType.QUInt16 or keep_16bit):
        # 16-bit QDQ needs opset 21. onnxruntime's quantizer upgrades the model itself, with its weights (the
        # version converter and a shape-inference reload: several copies of them); the graph alone upgrades the
        # same way and keeps reading the weights from their file beside it.
        model = onnx.version_converter.convert_version(model, 21)
        upgraded = fp32_path.parent / f"{fp32_path.stem}.opset21.onnx"
        onnx.save_model(model, str(upgraded))
        fp32_path = upgraded
    weights = weight_tensors(model)
    overrides: dict[str, list[dict]] = {}
    for name, info in weights.items():
        quant_type = QuantType.QInt16 if name in keep_16bit else weight_type
        if info["op"] == "MatMul":
            # Per output channel (the last axis of the [in, out] weight), symmetric.
            overrides[name] = [{"axis": len(info["dims"]) - 1, "quant_type": quant_type, "symmetric": True}]
        elif name in keep_16bit or precision == "w4a16":
            # Gather tables stay per-tensor; int4 tables are not worth their loss, they go to int8 at least.
            overrides[name] = [{"quant_type": QuantType.QInt16 if name in keep_16bit else QuantType.QInt8, "symmetric": True}]
    data = calibrate(fp32_path, feeds, work)
    widened = 0
    if range_margin > 0:
        graph_inputs = {i.name: i for i in model.graph.input}
        # Softmax outputs get [0, 1] from the quantizer itself.
        fixed = {n.output[0] for n in model.graph.node if n.op_type == "Softmax"}
        initializers = {i.name for i in model.graph.initializer}
        for name, (low, high) in _ranges(data).items():
            # Constants keep parameters computed from their own values: the same in every graph cut from one
            # export, so graphs compiled into one context binary share them.
            if name in initializers or name in overrides or name in fixed or (
                    name in graph_inputs and graph_inputs[name].type.tensor_type.elem_type != 1):
                continue
            span = max(high - low, 1e-6)
            overrides[name] = [{"rmin": np.float32(low - range_margin * span if low < 0 else low),
                                "rmax": np.float32(high + range_margin * span)}]
            widened += 1
    inits = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            # gamma/beta as 8-bit symmetric constants (as activations they got 16-bit asymmetric
            # parameters that the HTP's LayerNorm refused on a tiny BERT).
            for name in node.input[1:3]:
                if name in inits and name not in overrides:
                    overrides[name] = [{"quant_type": QuantType.QInt8, "symmetric": True}]
    del model
    config = get_qnn_qdq_config(
        str(fp32_path), _Reader(feeds), activation_type=activation_type, weight_type=weight_type,
        activation_symmetric=activation_symmetric, weight_symmetric=True, init_overrides=overrides,
    )
    # The QDQ model's weights in a file beside it: the compiler's process reads them from there into onnxruntime
    # only (see ep._model_source), and a model of any size fits protobuf's 2 GB limit.
    cache = work / f"{out_path.stem}.calibration.json"
    save_tensors_data(data, cache)
    del data
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's "consider pre-processing" / opset-upgrade advice, on the root logger
    try:
        with linear_quantizer_edits(), vectorized_weight_quantization(), weights_read_from_disk(fp32_path.parent):
            quantize_static(
                str(fp32_path), str(out_path), None, calibrate_method=config.calibrate_method,
                quant_format=config.quant_format, activation_type=config.activation_type, weight_type=config.weight_type,
                op_types_to_quantize=config.op_types_to_quantize, nodes_to_quantize=config.nodes_to_quantize,
                nodes_to_exclude=config.nodes_to_exclude, per_channel=config.per_channel, reduce_range=config.reduce_range,
                use_external_data_format=True, calibration_providers=config.calibration_providers,
                extra_options=config.extra_options, calibration_cache_path=str(cache))
    finally:
        root.setLevel(level)
    return {
        "weights": str(weight_type).split(".")[-1], "activations": str(activation_type).split(".")[-1],
        "activation_symmetric": activation_symmetric, "weight_granularity": "per-channel (MatMul), per-tensor (Gather)",
        "weights_16bit": sorted(keep_16bit), "calibration_feeds": len(feeds),
        "range_margin": range_margin, "activation_ranges_widened": widened,
    }


def _fake_quant(array: np.ndarray, bits: int, axis: int | None) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    if axis is None:
        scale = np.abs(array).max() / qmax
    else:
        reduce = tuple(i for i in range(array.ndim) if i != axis % array.ndim)
        scale = np.abs(array).max(axis=reduce, keepdims=True) / qmax
    scale = np.where(scale == 0, 1.0, scale)
    return (np.clip(np.round(array / scale), -qmax - 1, qmax) * scale).astype(array.dtype)


def _read(tensor, folder: Path) -> np.ndarray:
    """One initializer's values, read from its external data file (only this tensor) or from the graph."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import ExternalDataInfo
    from onnx.helper import tensor_dtype_to_np_dtype

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = ExternalDataInfo(tensor)
    dtype = np.dtype(tensor_dtype_to_np_dtype(tensor.data_type))
    count = int(np.prod(tensor.dims))
    with (folder / info.location).open("rb") as f:
        f.seek(int(info.offset or 0))
        return np.fromfile(f, dtype=dtype, count=count).reshape(tuple(tensor.dims))


def sensitivity(fp32_path: Path, feeds: list[dict], precision: str, work: Path, output: str = "logits", limit: int | None = None) -> list[dict]:
    """Per-weight KL(fp32 || only that weight quantized) on CPU, most sensitive first."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    bits = {"w8a16": 8, "w8a8": 8, "w4a16": 4}[precision]
    # Memory: the graph is read without its weights; the session maps them from the graph's data file (weights
    # that are graph inputs are not prepacked, so not copied), and each trial reads one weight from that file.
    model = onnx.load(str(fp32_path), load_external_data=False)
    weights = weight_tensors(model)
    inits = {i.name: i for i in model.graph.initializer}
    # Weights become overridable (graph inputs with a default), so one session serves every trial.
    for name in weights:
        model.graph.input.append(helper.make_tensor_value_info(name, inits[name].data_type, list(inits[name].dims)))
    probe = fp32_path.parent / "sensitivity.onnx"  # beside the graph: its external tensors resolve the same way
    onnx.save_model(model, str(probe))
    originals = {name: inits[name] for name in weights}
    del model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(probe), sess_options=options, providers=["CPUExecutionProvider"])
    reference = [session.run([output], feed)[0] for feed in feeds]
    decoder = output == "logits"
    results = []
    for name, info in weights.items():
        axis = len(info["dims"]) - 1 if info["op"] == "MatMul" else None
        trial_bits = bits if info["op"] == "MatMul" else 8
        quantized = _fake_quant(_read(originals[name], fp32_path.parent), trial_bits, axis)
        scores = []
        for feed, ref in zip(feeds, reference):
            out = session.run([output], {**feed, name: quantized})[0]
            ref, out = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
            if decoder:
                scores.append(float(kl_per_position(log_softmax(ref), log_softmax(out)).mean()))
            else:
                scores.append(float(np.mean(1.0 - cosine_per_position(ref, out))))
        results.append({"tensor": name, "node": info["node"], "op": info["op"], "params": int(np.prod(info["dims"])),
                        "metric": "kl_mean" if decoder else "1-cosine", "score": float(np.mean(scores))})
    results.sort(key=lambda r: -r["score"])
    return results[:limit] if limit else results
