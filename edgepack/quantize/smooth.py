"""SmoothQuant for int8-dynamic: move activation outliers into the weights before quantizing per tensor.

onnxruntime's dynamic quantization gives each activation tensor one uint8 scale per call. Transformer
activations have a few outlier channels (LayerNorm outputs tens of times the median channel), so that one
scale leaves the ordinary channels a handful of levels. SmoothQuant (Xiao et al., 2023) rescales each input
channel j of a MatMul X @ W:

    s_j = max|X_j| ** alpha / max|W_j,:| ** (1 - alpha),   X' = X / s,   W' = diag(s) @ W

X' @ W' == X @ W in real arithmetic; X' has flatter channels for the per-tensor activation scale and W'
is quantized per output channel, which absorbs the growth. The division is one Mul per activation,
inserted only on the branch to the MatMuls that read it. max|X_j| comes from the calibration text.

onnxruntime ships SmoothQuant only through Intel Neural Compressor's static-quantization path (a separate,
heavy dependency, and static QDQ, not the dynamic kernels); the rewrite is a few lines of graph algebra, so
it is written here.

`sensitive_inputs` ranks the activations by how coarsely one per-tensor uint8 scale resolves them after
smoothing (max |x| over RMS): the worst keep float activations (8-bit weight-only MatMulNBits instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Smoothing:
    alpha: float
    activations: int = 0  # activations smoothed
    matmuls: int = 0
    # max over channels of max|X_j| / median channel, the worst activation, before and after
    worst_outlier_ratio_before: float = 0.0
    worst_outlier_ratio_after: float = 0.0

    def to_json(self) -> dict:
        return {"alpha": self.alpha, "activations": self.activations, "matmuls": self.matmuls,
                "worst_outlier_ratio_before": round(self.worst_outlier_ratio_before, 2),
                "worst_outlier_ratio_after": round(self.worst_outlier_ratio_after, 2)}


def weight_matmuls(model) -> dict[str, list]:
    """MatMul nodes with a 2-D initializer weight, grouped by the activation they read."""
    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def activation_stats(model, names: list[str], feeds: list[dict]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(per-channel max |x|, RMS over all values) of each named activation over the calibration feeds."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in present)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the activations keep their names
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    absmax: dict[str, np.ndarray] = {}
    squares: dict[str, float] = dict.fromkeys(names, 0.0)
    counts: dict[str, int] = dict.fromkeys(names, 0)
    for feed in feeds:
        values = session.run(names, {k: v for k, v in feed.items() if k in inputs})
        for name, value in zip(names, values):
            flat = np.abs(value.reshape(-1, value.shape[-1]).astype(np.float64))
            peak = flat.max(axis=0)
            absmax[name] = peak if name not in absmax else np.maximum(absmax[name], peak)
            squares[name] += float((flat**2).sum())
            counts[name] += flat.size
    rms = {name: float(np.sqrt(squares[name] / max(counts[name], 1))) for name in names}
    return absmax, rms


def smooth_matmul_inputs(model, feeds: list[dict], alpha: float) -> Smoothing:
    """Rewrite `model` (weights loaded) in place: each weight MatMul's input divided by s, its weight rows times s."""
    from onnx import helper, numpy_helper

    groups = weight_matmuls(model)
    names = list(groups)
    absmax, _ = activation_stats(model, names, feeds)
    inits = {i.name: i for i in model.graph.initializer}
    result = Smoothing(alpha)
    placed: list[tuple[object, object]] = []
    for activation, nodes in groups.items():
        amax = np.maximum(absmax[activation], 1e-5)
        weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in nodes]
        if any(w.shape[0] != amax.shape[0] for w in weights):
            continue
        wmax = np.maximum(np.max([np.abs(w).max(axis=1) for w in weights], axis=0), 1e-5)
        s = np.clip(amax**alpha / wmax ** (1 - alpha), 1e-3, 1e3).astype(np.float32)
        for node, w in zip(nodes, weights):
            tensor = inits[node.input[1]]
            tensor.CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), tensor.name))
        scale = numpy_helper.from_array((1.0 / s).astype(np.float32), activation + "_smooth_scale")
        model.graph.initializer.append(scale)
        smoothed = activation + "_smoothed"
        placed.append((nodes[0], helper.make_node("Mul", [activation, scale.name], [smoothed], name=activation + "_SmoothMul")))
        for node in nodes:
            node.input[0] = smoothed
        after = amax / s
        result.activations += 1
        result.matmuls += len(nodes)
        result.worst_outlier_ratio_before = max(result.worst_outlier_ratio_before, float(amax.max() / np.median(amax)))
        result.worst_outlier_ratio_after = max(result.worst_outlier_ratio_after, float(after.max() / np.median(after)))
    order = list(model.graph.node)
    for first, mul in placed:  # each Mul right before the first MatMul reading it keeps the order topological
        order.insert(order.index(first), mul)
    del model.graph.node[:]
    model.graph.node.extend(order)
    return result


def sensitive_inputs(model, feeds: list[dict], fraction: float) -> list[str]:
    """Names of the MatMuls reading the `fraction` of weight-MatMul activations that one per-tensor uint8 scale
    resolves worst (highest max |x| / RMS, measured on the calibration feeds)."""
    if fraction <= 0:
        return []
    groups = weight_matmuls(model)
    absmax, rms = activation_stats(model, list(groups), feeds)
    ratio = {name: float(absmax[name].max()) / max(rms[name], 1e-12) for name in groups}
    count = max(1, int(round(fraction * len(groups))))
    worst = sorted(groups, key=lambda name: ratio[name], reverse=True)[:count]
    return [node.name for name in worst for node in groups[name]]
