"""Static-shape graphs the Hexagon NPU (HTP) takes, cut from an optimum export.

* `make_static`: every dimension fixed (batch 1, the sequence, the cache length), then constant-folded
  by onnxruntime (basic level: EP-independent). Without folding, QNN's graph finalisation fails with
  QNN_COMMON_ERROR_MEM_ALLOC on the shape arithmetic left in the graph.
* `split_host_prep`: the nodes that depend only on `attention_mask` / `position_ids` (mask building
  with int64/bool ops, rotary cos/sin) move to a small CPU graph; their results (an additive attention
  bias, cos, sin) become float inputs of the NPU graph. The HTP would run int64/bool mask arithmetic
  badly or not at all, and it is the layout Qualcomm's own LLM pipelines use.
* Masks use `MASK_VALUE` instead of -inf/float-min: quantized activations need a finite range.
* `scale_free_rms_norms`: RMSNorm as y * rsqrt(mean(y^2) + eps) with y = x / max|x| per position, so no
  tensor carries x^2 (see the function: with SmolLM2's massive activations x^2 spans 0..6e8, and one
  16-bit scale for it zeroes every ordinary position).
* `new_kv_outputs`: the decoder returns only this call's keys/values (not past + new), so the host
  writes them into its fixed-size cache.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edgepack.errors import BadInputError

MASK_VALUE = -100.0  # additive bias for masked positions; exp(-100) ~ 4e-44, and a 16-bit range stays fine
HOST_INPUTS = ("attention_mask", "position_ids", "token_type_ids")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


def fix_dims(model, dims: dict[str, int]) -> None:
    """Fix named dimensions (onnxruntime's helper), then check nothing symbolic is left on inputs/outputs."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import is_fixed_size_tensor, make_dim_param_fixed

    for name, value in dims.items():
        make_dim_param_fixed(model.graph, name, int(value))
    # onnxruntime's fix_output_shapes, without its onnx.checker pass: that pass reads external data files
    # relative to the working directory, and the graph here is loaded without its weights.
    inferred = onnx.shape_inference.infer_shapes(model)
    for output, new in zip(model.graph.output, inferred.graph.output):
        if not is_fixed_size_tensor(output) and is_fixed_size_tensor(new):
            output.type.tensor_type.shape.CopyFrom(new.type.tensor_type.shape)
    del inferred
    left = sorted({f"{v.name}[{d.dim_param or '?'}]" for v in list(model.graph.input) + list(model.graph.output)
                   for d in v.type.tensor_type.shape.dim if not d.HasField("dim_value")})
    if left:
        raise BadInputError(f"dynamic dimension(s) left in the graph after fixing shapes: {', '.join(left[:6])}; "
                            "the HTP runs static shapes only")


def _scalar(init) -> bool:
    """A one-element initializer (always stored inside the graph: only these are read as values here)."""
    import onnx

    return int(np.prod(init.dims)) == 1 and init.data_location != onnx.TensorProto.EXTERNAL


def constant_fold(model, work: Path, name: str, data_folder: Path | None = None):
    """onnxruntime's basic-level optimizer (constant folding, redundant-node removal), saved and reloaded.

    `model` may be the export's graph without its weights (onnx.load(..., load_external_data=False)), its
    external tensors read from `data_folder` (the export's folder; onnxruntime refuses external data outside
    the model's own folder, so the graph goes in as bytes). The folded model keeps every tensor over 1 KB in
    `<name>.folded.onnx.data` beside it and is returned without them: the weights stay on disk, and the graph
    surgery reads only the small constants kept inline."""
    import onnx
    import onnxruntime as ort

    dst = work / f"{name}.folded.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{dst.name}.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.add_session_config_entry("session.disable_prepacking", "1")
    if data_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_folder))
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del session
    return onnx.load(str(dst), load_external_data=False)


def finite_masks(model) -> int:
    """-inf / float-min constants (mask fill values) -> MASK_VALUE. Returns how many were changed."""
    import onnx
    from onnx import numpy_helper

    changed = 0
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) > 64:
            continue
        array = numpy_helper.to_array(init)
        bad = np.isneginf(array) | (array <= -1e30)
        if bad.any():
            init.CopyFrom(numpy_helper.from_array(np.where(bad, np.float32(MASK_VALUE), array).astype(np.float32), init.name))
            changed += 1
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == onnx.TensorProto.FLOAT:
                    array = numpy_helper.to_array(attr.t)
                    bad = np.isneginf(array) | (array <= -1e30)
                    if bad.any() and array.size <= 64:
                        attr.t.CopyFrom(numpy_helper.from_array(np.where(bad, np.float32(MASK_VALUE), array).astype(np.float32)))
                        changed += 1
    return changed


def scale_free_rms_norms(model) -> int:
    """Pow(x, 2) -> ReduceMean -> Add(eps) -> Sqrt -> Div(x, .)  becomes the same on y = x / max|x| (per position).

    Why: quantized activations have one scale per tensor. LLMs carry "massive activations" on a few positions
    (SmolLM2's residual stream reaches ~25,000 on the first token), so x^2 spans 0..6e8 and its 16-bit step
    (~12,000) rounds x^2 of every ordinary position to 0: RMSNorm then divides by sqrt(eps) and the model
    emits noise. y is in [-1, 1] on every position, mean(y^2) in
    [1/hidden, 1], and y / sqrt(mean(y^2) + eps / max|x|^2) = x / sqrt(mean(x^2) + eps) exactly; eps /
    max|x|^2 is computed as (sqrt(eps) / max|x|)^2. The max's own quantization error nearly cancels: rms
    normalisation is scale invariant. Returns how many norms were rewritten.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only(name, op):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def is_two(name):
        return name in inits and _scalar(inits[name]) and float(numpy_helper.to_array(inits[name]).reshape(-1)[0]) == 2.0

    axes = "qnn.scale_free_rms.axes"
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    rewritten, new_nodes, extra_inits = 0, {}, []
    for node in list(model.graph.node):
        if node.op_type != "Pow" or not is_two(node.input[1]):
            continue
        mean = only(node.output[0], "ReduceMean")
        add = mean and only(mean.output[0], "Add")
        sqrt = add and only(add.output[0], "Sqrt")
        div = sqrt and only(sqrt.output[0], "Div")
        x = node.input[0]
        if div is None or div.input[0] != x:
            continue
        eps_slot = next((i for i, name in enumerate(add.input) if name in inits and _scalar(inits[name])), None)
        if eps_slot is None:
            continue
        base = node.name.rsplit("/", 1)[0] if "/" in node.name else node.output[0]
        eps = float(numpy_helper.to_array(inits[add.input[eps_slot]]).reshape(-1)[0])
        root_eps = f"{base}/ScaleFree_sqrt_eps"
        extra_inits.append(numpy_helper.from_array(np.array(np.sqrt(max(eps, 0.0)), dtype=np.float32), root_eps))
        absx, peak, y = f"{base}/ScaleFree_abs", f"{base}/ScaleFree_max", f"{base}/ScaleFree_y"
        new_nodes[id(node)] = [
            helper.make_node("Abs", [x], [absx], name=f"{base}/ScaleFree_Abs"),
            helper.make_node("ReduceMax", [absx, axes], [peak], name=f"{base}/ScaleFree_ReduceMax", keepdims=1) if opset >= 18 else
            helper.make_node("ReduceMax", [absx], [peak], name=f"{base}/ScaleFree_ReduceMax", keepdims=1, axes=[-1]),
            helper.make_node("Div", [x, peak], [y], name=f"{base}/ScaleFree_Div"),
            # eps / max|x|^2 as (sqrt(eps) / max|x|)^2: no tensor holds max|x|^2 itself
            helper.make_node("Div", [root_eps, peak], [f"{base}/ScaleFree_eps_root"], name=f"{base}/ScaleFree_EpsDiv"),
            helper.make_node("Mul", [f"{base}/ScaleFree_eps_root"] * 2, [f"{base}/ScaleFree_eps"], name=f"{base}/ScaleFree_EpsMul"),
        ]
        node.input[0] = y
        div.input[0] = y
        add.input[eps_slot] = f"{base}/ScaleFree_eps"
        rewritten += 1
    if rewritten:
        model.graph.initializer.extend(extra_inits)
        if opset >= 18:
            model.graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), axes))
        nodes = []
        for node in model.graph.node:
            nodes.extend(new_nodes.get(id(node), []))
            nodes.append(node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        _drop_unread_initializers(model)  # the eps constants
    return rewritten


def squares_as_mul(model) -> int:
    """Pow(x, 2) -> Mul(x, x). The QDQ quantizer quantizes Pow's exponent like any other constant input: the
    dequantized 2 is 2 +- a step, and a negative base to a non-integer power is NaN (every RMSNorm then
    yields NaN and the model's output is noise). Mul is exact and the HTP's
    cheapest op. Returns how many were replaced."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    replaced = 0
    for node in model.graph.node:
        if node.op_type != "Pow" or node.input[1] not in inits:
            continue
        if not _scalar(inits[node.input[1]]):
            continue
        exponent = numpy_helper.to_array(inits[node.input[1]])
        if float(exponent.reshape(-1)[0]) == 2.0:
            node.op_type = "Mul"
            node.input[1] = node.input[0]
            replaced += 1
    _drop_unread_initializers(model)  # the exponents
    return replaced


def _drop_unread_initializers(model) -> None:
    used = {name for n in model.graph.node for name in n.input} | {o.name for o in model.graph.output}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)


def drop_nan_guards(model) -> int:
    """Where(IsNaN(x), 0, x) after Softmax -> x: with finite masks no row is all-masked, the guard is identity."""
    producers = {o: n for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    removed = 0
    for node in list(model.graph.node):
        if node.op_type != "Where":
            continue
        cond = producers.get(node.input[0])
        if cond is None or cond.op_type != "IsNaN" or cond.input[0] != node.input[2] or node.output[0] in outputs:
            continue
        _rename_uses(model, node.output[0], node.input[2])
        model.graph.node.remove(node)
        if not any(cond.output[0] in n.input for n in model.graph.node):
            model.graph.node.remove(cond)
        removed += 1
    return removed


def rotary_positions_as_input(model) -> bool:
    """An export without a `position_ids` input (optimum's gemma/gemma2 configs) gets one, feeding the rotary embedding.

    Why: such an export computes positions as past_length + i, which the static layout breaks: slot j of the
    fixed cache holds position j, so the new tokens sit in slots past..past+S whatever their real positions.
    The causal mask keeps the slot index (it must, to line up with the cache slots), but the rotary embedding
    must see the real positions, as in exports that take `position_ids` (llama, phi3, qwen): the rotary
    subgraph's one non-constant outside input is redirected to a new `position_ids` input, which the host
    graph then turns into cos/sin like theirs. Returns whether the graph was changed.
    """
    import onnx
    from onnx import helper

    graph = model.graph
    if any(i.name == "position_ids" for i in graph.input):
        return False
    rotary = [n for n in graph.node if "/rotary_emb/" in n.name]
    produced = {o for n in rotary for o in n.output}
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    outside = {i for n in rotary for i in n.input if i and i not in produced and i not in constants}
    if len(outside) != 1:
        return False
    positions = outside.pop()
    for node in rotary:
        for index, name in enumerate(node.input):
            if name == positions:
                node.input[index] = "position_ids"
    graph.input.append(helper.make_tensor_value_info("position_ids", onnx.TensorProto.INT64, ["batch_size", "sequence_length"]))
    return True


def drop_empty_concat_inputs(model) -> int:
    """Concat inputs with a zero-size dimension removed (a Concat left with one input: its uses read that input).

    Why: a rotary embedding over the whole head still concatenates the empty pass-through part
    (phi3's `torch.cat([q_rot * cos + ..., q[..., rotary_dim:]])`); the HTP takes no empty tensor, so the
    Slice producing it and the Concat around it would stay off the NPU. Returns how many inputs went.
    """
    inferred = _shapes_without_weights(model)
    infos = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    empty = {v.name for v in infos if any(d.HasField("dim_value") and d.dim_value == 0 for d in v.type.tensor_type.shape.dim)}
    empty |= {i.name for i in model.graph.initializer if 0 in i.dims}
    outputs = {o.name for o in model.graph.output}
    removed = 0
    for node in list(model.graph.node):
        if node.op_type != "Concat" or not any(i in empty for i in node.input):
            continue
        rest = [i for i in node.input if i not in empty]
        if not rest:
            continue
        removed += len(node.input) - len(rest)
        if len(rest) == 1 and node.output[0] not in outputs:
            _rename_uses(model, node.output[0], rest[0])
            model.graph.node.remove(node)
        else:
            del node.input[:]
            node.input.extend(rest)
    if removed:
        _drop_dead_nodes(model)
    return removed


def _shapes_without_weights(model, small: int = 1024):
    """onnx shape inference on a copy whose large initializers are typed graph inputs instead.

    Why: `infer_shapes` serializes the model it is given, weights included (twice the memory, and a
    protobuf cannot pass 2 GB); shapes need only the weights' types and dims, and the small constants
    (Slice bounds, Reshape targets) that data propagation reads.
    """
    import onnx
    from onnx import helper

    graph = model.graph
    kept = [i for i in graph.initializer if int(np.prod(i.dims)) <= small]
    typed = [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in graph.initializer if int(np.prod(i.dims)) > small]
    light = helper.make_graph(graph.node, graph.name, list(graph.input) + typed, list(graph.output), kept)
    return onnx.shape_inference.infer_shapes(helper.make_model(light, opset_imports=list(model.opset_import), ir_version=model.ir_version),
                                             data_prop=True)


def _drop_dead_nodes(model) -> None:
    """Nodes none of whose outputs is read (by a node or as a graph output), repeatedly; then unread initializers."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = {name for n in model.graph.node for name in n.input} | outputs
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    _drop_unread_initializers(model)


def _rename_uses(model, old: str, new: str) -> None:
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


def new_kv_outputs(model) -> dict[str, str]:
    """present.N.* = Concat(past_key_values.N.*, new) -> output `new` only, renamed to present.N.*; returns {output: past input}."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inputs = {i.name for i in model.graph.input}
    mapping = {}
    for output in model.graph.output:
        match = _PRESENT.match(output.name)
        if not match:
            continue
        concat = producers.get(output.name)
        past = f"past_key_values.{match.group(1)}.{match.group(2)}"
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 2 or concat.input[0] != past or past not in inputs:
            raise BadInputError(f"{output.name} is not Concat({past}, new) in this export; the static-cache rewrite needs that layout")
        new = concat.input[1]
        producer = producers.get(new)
        if producer is None or new in inputs:
            raise BadInputError(f"{output.name}: the new keys/values are not computed in the graph")
        # Rename: the producer of the new slice writes the output name; the Concat stays internal.
        internal = f"{output.name}.full"
        concat.output[0] = internal
        _rename_uses(model, output.name, internal)
        producer.output[list(producer.output).index(new)] = output.name
        _rename_uses(model, new, output.name)
        dims = output.type.tensor_type.shape.dim
        past_info = next(i for i in model.graph.input if i.name == past)
        past_len = past_info.type.tensor_type.shape.dim[2].dim_value
        if dims[2].HasField("dim_value"):
            dims[2].dim_value = dims[2].dim_value - past_len
        mapping[output.name] = past
    return mapping


def split_host_prep(model, host_inputs=HOST_INPUTS) -> tuple[object, object | None, list[str], list[str]]:
    """Move the nodes computed only from `host_inputs` (and constants) to a CPU graph.

    Returns (npu_model, host_model or None, host graph inputs, bridge tensors). Bridge tensors become
    float inputs of the NPU graph with the same names.
    """
    import onnx
    from onnx import helper

    graph = model.graph
    inits = {i.name for i in graph.initializer}
    graph_inputs = {i.name: i for i in graph.input}
    present = [name for name in host_inputs if name in graph_inputs]
    if not present:
        return model, None, [], []
    host_tensors = set(present)
    host_nodes = []
    for node in graph.node:  # topological order
        real = [i for i in node.input if i]
        if real and all(i in host_tensors or i in inits for i in real) and any(i in host_tensors for i in real):
            host_nodes.append(node)
            host_tensors.update(node.output)
    host_ids = {id(n) for n in host_nodes}
    npu_nodes = [n for n in graph.node if id(n) not in host_ids]
    needed = {i for n in npu_nodes for i in n.input} | {o.name for o in graph.output}
    bridge = [t for t in dict.fromkeys(o for n in host_nodes for o in n.output) if t in needed]
    direct = [name for name in present if name in needed]  # host inputs the NPU graph reads as they are
    if direct:
        raise BadInputError(f"input(s) {', '.join(direct)} feed the model directly, not only its mask/rotary preparation; "
                            "edgepack cannot move them off the NPU")
    # Types and shapes of the bridge tensors, from shape inference on the full model.
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    infos = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for name in bridge:
        info = infos.get(name)
        if info is None or any(not d.HasField("dim_value") for d in info.type.tensor_type.shape.dim):
            raise BadInputError(f"cannot infer a static shape for {name}, which the host graph hands to the NPU graph")
        if info.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise BadInputError(f"{name} (computed from {', '.join(present)}) is not float; the NPU graph cannot take it as an input")
    used_inits = {i for n in host_nodes for i in n.input if i in inits}
    host_graph = helper.make_graph(
        host_nodes, "edgepack_host_prep", [graph_inputs[name] for name in present],
        [infos[name] for name in bridge], [i for i in graph.initializer if i.name in used_inits])
    host = helper.make_model(host_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)

    npu_inputs = [i for i in graph.input if i.name not in present] + [infos[name] for name in bridge]
    npu_used = {i for n in npu_nodes for i in n.input}
    npu_graph = helper.make_graph(npu_nodes, graph.name, npu_inputs, list(graph.output),
                                  [i for i in graph.initializer if i.name in npu_used])
    npu = helper.make_model(npu_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return npu, host, present, bridge


def unsupported_inputs(model) -> list[str]:
    """NPU graph inputs that are neither float nor int32/int64 token ids."""
    import onnx

    allowed = {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    return [i.name for i in model.graph.input if i.type.tensor_type.elem_type not in allowed]

