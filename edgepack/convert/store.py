"""Finish optimum's ONNX export on disk: tied tables once, weights in MatMul layout, external data in one file.

optimum's post-processing is skipped: its tied-weight deduplication (`remove_duplicate_weights_from_tied_info`)
loads every weight into one ModelProto and serializes it, a second copy of the model that also fails
past protobuf's 2 GB limit. `finish_export` reads the graph without its external data instead, reads
weights one at a time (memory-mapped) and copies external data into one file a tensor at a time, so its
memory scales with the largest tensor whatever the model's size; onnx and onnxruntime offer no
streaming rewrite of external data, hence the hand-written copy.

Two export forms arrive here (see `export.export_onnx`):
- folded by torch (`export_onnx(fold=True)`): the tied lm_head is a second, transposed copy of the embedding
  table; it is removed and the MatMul reads `Transpose(table)`, exactly optimum's edit.
- unfolded (the default, since folding would hold a second copy of every Linear weight beside the
  PyTorch model): every Linear reads `Transpose(weight)`. Each weight nothing else reads is stored
  transposed (the [in, out] layout folding produces and onnxruntime's quantizers expect for MatMul) and
  its Transpose dropped; the tied table, also read by the embedding's Gather, keeps its Transpose and so
  is stored once. Small constant arithmetic torch would have folded is folded here.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepack.core.onnx_io import COPY_CHUNK, copy_byte_range

# Offsets in the data file are page-aligned so runtimes may map tensors straight from it.
_ALIGN = 4096


@dataclass
class TiedInfo:
    """What optimum's tying code needs from the PyTorch model, taken before that model is freed."""

    params_with_op: list[dict[str, str]] = field(default_factory=list)
    groups_to_tie: list[list[str]] = field(default_factory=list)


def tied_info(torch_model) -> TiedInfo:
    """The model's tied parameter groups that an ONNX graph can share (Embedding/Linear), as optimum decides."""
    from accelerate.utils import find_tied_parameters
    from optimum.onnx.transformations_utils import _get_weights_to_tie

    groups = find_tied_parameters(torch_model)
    if not groups:
        return TiedInfo()
    params_with_op, to_tie, _ignored = _get_weights_to_tie(groups, torch_model)
    return TiedInfo(params_with_op, to_tie)


@contextlib.contextmanager
def per_tensor_external_data():
    """Let optimum's exporter leave torch's external data files as they are.

    When torch writes a model past 2 GB it stores every weight in its own file; optimum then reloads
    the whole model into memory to gather them into one file. `finish_export` does that gathering
    tensor by tensor instead, so optimum's step is switched off (its FORCE_ONNX_EXTERNAL_DATA setting
    is still honoured).
    """
    from optimum.exporters.onnx import convert

    original = convert.check_model_uses_external_data
    convert.check_model_uses_external_data = lambda model: False
    try:
        yield
    finally:
        convert.check_model_uses_external_data = original


def finish_export(model_path: Path, tied: TiedInfo, *, folded_export: bool = True) -> dict:
    """Tied tables once, weights in MatMul layout, external data gathered into `<model>_data`.

    `folded_export`: torch folded constants (the duplicate of a tied table is then a separate
    initializer, removed here); otherwise the weight Transposes and small constant arithmetic are folded
    here. Returns facts for convert.json.
    """
    import onnx

    model_path = Path(model_path)
    base = model_path.parent
    model = onnx.load(str(model_path), load_external_data=False)
    old_locations = {_external(t)["location"] for t in _all_tensors(model) if _is_external(t)}
    folded, transposed = len(_store_tied_once(model, base, tied)), set()
    if not folded_export:
        folded, transposed = _fold_weight_transposes(model, base)
        folded += _fold_small_constants(model)
    if old_locations:
        _gather_external_data(model, base, model_path.name + "_data", transposed)
        tmp = model_path.with_name(model_path.name + ".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, model_path)
        for location in old_locations - {model_path.name + "_data"}:
            with contextlib.suppress(FileNotFoundError):
                (base / location).unlink()
    elif folded:
        onnx.save(model, str(model_path))
    return {"tied_weights_stored_once": _all_tied_once(model, tied, base), "external_data": bool(old_locations)}


def _all_tied_once(model, tied: TiedInfo, base: Path) -> bool | None:
    """True when no tied group optimum can tie has a second copy; None when the model ties nothing.

    A group is stored once when its table feeds a Gather and no other initializer holds the same
    values (or their transpose): shapes are compared first, values only for a shape match.
    """
    if not tied.groups_to_tie:
        return None
    graph = model.graph
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    tables = [i for i in graph.initializer if i.name in gathered and len(i.dims) == 2]
    for table in tables:
        shape = tuple(table.dims)
        for other in graph.initializer:
            if other is table or tuple(other.dims) not in (shape, shape[::-1]) or other.data_type != table.data_type:
                continue
            a, b = _array(table, base), _array(other, base)
            if _same(a, b) or _same(a.T, b):
                return False
    return bool(tables)


def _fold_weight_transposes(model, base: Path) -> tuple[int, set[str]]:
    """Replace Transpose(2-D initializer) by the transposed initializer when nothing else reads it.

    Inline initializers are transposed here; external ones are named in the returned set and their
    bytes are transposed while `_gather_external_data` copies them. Returns (Transposes removed, that set).
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in _all_nodes(graph):
        for value in node.input:
            readers[value] = readers.get(value, 0) + 1
    outputs = {o.name for o in graph.output}
    pending: set[str] = set()
    keep = []
    for node in graph.node:
        name = node.input[0] if node.op_type == "Transpose" and node.input else None
        init = inits.get(name) if name else None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if init is None or len(init.dims) != 2 or perm != [1, 0] or readers[name] != 1 or node.output[0] in outputs:
            keep.append(node)
            continue
        if _is_external(init):
            init.name = node.output[0]
            init.dims[:] = list(init.dims)[::-1]
            pending.add(init.name)
        else:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(init).T), node.output[0]))
        del inits[name]
    folded = len(graph.node) - len(keep)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
    return folded, pending


def _store_tied_once(model, base: Path, tied: TiedInfo) -> list[str]:
    """optimum's `_deduplicate_gather_matmul`, comparing tables chunk by chunk from disk."""
    if not tied.groups_to_tie:
        return []
    import onnx
    from optimum.onnx.transformations_utils import _find_matching_initializers

    graph = model.graph
    index = {init.name: i for i, init in enumerate(graph.initializer)}
    groups = _find_matching_initializers(tied.params_with_op, model, index)
    op_of = {node.name: node.op_type for node in graph.node}
    removed: list[str] = []
    for params in tied.groups_to_tie:
        members = groups.get(tuple(params))
        if not members:
            continue
        # onnxruntime's quantizers handle Transpose -> MatMul better than Transpose -> Gather, so the
        # Gather keeps the table (optimum's choice too).
        ref = next((m for m in members if {op_of.get(n) for n in m["nodes_containing_initializer"]} == {"Gather"}), None)
        if ref is None:
            continue
        ref_name = next(iter(ref["initializer_name"]))
        for member in members:
            if member is ref or len(member["initializer_name"]) != 1:
                continue
            name = next(iter(member["initializer_name"]))
            if name == ref_name or name not in index:
                continue
            ref_init, init = graph.initializer[index[ref_name]], graph.initializer[index[name]]
            if ref_init.data_type != init.data_type:
                continue
            ref_data, data = _array(ref_init, base), _array(init, base)
            if _same(ref_data, data):
                replacement = ref_name
            elif ref_data.ndim == 2 and _same(ref_data.T, data):
                replacement = f"{ref_name}_transposed"
                if replacement not in {o for n in graph.node for o in n.output}:
                    first = next(i for i, n in enumerate(graph.node) if name in n.input)
                    graph.node.insert(first, onnx.helper.make_node(
                        "Transpose", [ref_name], [replacement], name=f"Transpose_{len(graph.node) + 1}"))
            else:
                continue
            del ref_data, data
            for node in graph.node:
                for i, value in enumerate(node.input):
                    if value == name:
                        node.input[i] = replacement
            graph.initializer.pop(index[name])
            index = {init.name: i for i, init in enumerate(graph.initializer)}
            removed.append(name)
    return removed


def _same(a: np.ndarray, b: np.ndarray, rows: int = 4096) -> bool:
    """Exact equality, a block of rows at a time (no full-size temporary)."""
    if a.shape != b.shape:
        return False
    if a.ndim < 2:
        return bool(np.array_equal(a, b))
    return all(np.array_equal(a[i:i + rows], b[i:i + rows]) for i in range(0, a.shape[0], rows))


def _array(tensor, base: Path) -> np.ndarray:
    """The tensor's values: memory-mapped when stored outside the graph."""
    from onnx import helper, numpy_helper

    if not _is_external(tensor):
        return numpy_helper.to_array(tensor)
    info = _external(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(tensor.dims)
    return np.memmap(base / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=shape)


def _gather_external_data(model, base: Path, location: str, transposed: set[str] = frozenset()) -> None:
    """Copy every externally stored tensor, one at a time, into `base/location` and point the graph at it.

    Tensors named in `transposed` hold the transpose of their stored bytes (their dims already swapped).
    """
    from onnx import TensorProto

    tmp = base / (location + ".tmp")
    offset = 0
    with open(tmp, "wb") as out:
        for tensor in _all_tensors(model):
            if not _is_external(tensor):
                continue
            info = _external(tensor)
            length = int(info["length"]) if "length" in info else (base / info["location"]).stat().st_size - int(info.get("offset", 0))
            pad = (-offset) % _ALIGN
            out.write(b"\0" * pad)
            offset += pad
            if tensor.name in transposed:
                _write_transposed(tensor, base, out)
            else:
                _copy_bytes(base / info["location"], int(info.get("offset", 0)), length, out)
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = TensorProto.EXTERNAL
            offset += length
    os.replace(tmp, base / location)


# Folded only when every input is a Constant node's output and the result stays this small: the shape
# arithmetic torch's own folding would have done, never a weight.
_SMALL_CONSTANT_ELEMENTS = 1 << 16


def _fold_small_constants(model) -> int:
    """Fold nodes that read only small Constant outputs into Constant nodes (what torch's folding does).

    With folding off, torch leaves shape arithmetic on constants (Unsqueeze, Cast, Concat, Sqrt...) in
    the graph; onnxruntime would fold it at load, but graph tools downstream read it, and it costs bytes.
    onnx's reference evaluator computes each node, so the values are the operator's definition.
    """
    from onnx import AttributeProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    values: dict[str, np.ndarray] = {}
    keep, folded = [], 0
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and [a.name for a in node.attribute] == ["value"]:
            if not _is_external(node.attribute[0].t):
                values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            keep.append(node)
            continue
        inputs = [i for i in node.input if i]
        foldable = (
            node.domain in ("", "ai.onnx") and inputs and all(i in values for i in inputs)
            and not any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute)
            and node.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial")
        )
        outputs = _evaluate(node, values, model.opset_import, ReferenceEvaluator, helper) if foldable else None
        if outputs is None or any(np.size(o) > _SMALL_CONSTANT_ELEMENTS for o in outputs):
            keep.append(node)
            continue
        for k, (name, value) in enumerate(zip(node.output, outputs)):
            value = np.asarray(value)
            values[name] = value
            # Named like the node it replaces: some graph tools key nodes by name.
            label = (node.name or name) + (f"_{k}" if k else "")
            keep.append(helper.make_node("Constant", [], [name], name=label, value=numpy_helper.from_array(value)))
        folded += 1
    if not folded:
        return 0
    read = {i for n in keep for i in n.input} | {o.name for o in graph.output}
    keep = [n for n in keep if n.op_type != "Constant" or any(o in read for o in n.output)]
    del graph.node[:]
    graph.node.extend(keep)
    return folded


def _evaluate(node, values, opsets, evaluator, helper):
    bare = helper.make_node(node.op_type, list(node.input), list(node.output), domain=node.domain)
    bare.attribute.extend(node.attribute)
    inputs = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(values[i].dtype), values[i].shape) for i in node.input if i]
    outputs = [helper.make_empty_tensor_value_info(o) for o in node.output]
    graph = helper.make_graph([bare], "fold", inputs, outputs)
    try:
        return evaluator(helper.make_model(graph, opset_imports=list(opsets))).run(None, {i: values[i] for i in node.input if i})
    except Exception:  # an operator the reference evaluator lacks: onnxruntime folds it at load instead
        return None


def _all_nodes(graph):
    """Every node, including those of subgraphs (which may read the outer graph's initializers)."""
    from onnx import AttributeProto

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


def _copy_bytes(path: Path, offset: int, length: int, out) -> None:
    if copy_byte_range(path, offset, length, out) != length:
        raise OSError(f"{path.name} ends before {length} bytes from offset {offset}")


def _write_transposed(tensor, base: Path, out) -> None:
    """Write the transpose of a stored [rows, cols] matrix (tensor.dims already [cols, rows]), a block of rows at a time."""
    cols, rows = tensor.dims
    stored = _array(_with_dims(tensor, [rows, cols]), base)
    step = max(1, COPY_CHUNK // max(1, rows * stored.itemsize))
    for start in range(0, cols, step):
        out.write(np.ascontiguousarray(stored[:, start:start + step].T).tobytes())
    del stored


def _with_dims(tensor, dims):
    from onnx import TensorProto

    copy = TensorProto()
    copy.CopyFrom(tensor)
    copy.dims[:] = dims
    return copy


def _all_tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def _is_external(tensor) -> bool:
    from onnx import TensorProto

    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def _external(tensor) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}
