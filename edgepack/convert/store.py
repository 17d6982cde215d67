"""Finish optimum's ONNX export on disk: tied weights stored once, external data in one file.

optimum's own post-processing (`remove_duplicate_weights_from_tied_info`) loads every weight into one
ModelProto and serializes it, which fails past protobuf's 2 GB limit and holds a second copy of the
model besides the PyTorch one. Here the graph is read without its external data; weights are read one
tensor at a time (memory-mapped) only to confirm a duplicate and to copy bytes into the final data
file, so memory scales with the largest tensor whatever the model's size. onnx and onnxruntime offer
no streaming rewrite of external data, hence the hand-written copy.

The graph edit is optimum's: a table that is tied between the embedding (Gather) and the lm_head
(MatMul) is kept once, as the Gather's initializer, and the MatMul reads `Transpose(table)`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Offsets in the data file are page-aligned so runtimes may map tensors straight from it.
_ALIGN = 4096
_COPY_CHUNK = 64 << 20


@dataclass
class TiedInfo:
    """What optimum's tying code needs from the PyTorch model, taken before that model is freed."""

    params_with_op: list[dict[str, str]] = field(default_factory=list)
    groups_to_tie: list[list[str]] = field(default_factory=list)


def tied_info(torch_model) -> TiedInfo:
    """The model's tied parameter groups that optimum knows how to store once (Embedding/Linear)."""
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


def finish_export(model_path: Path, tied: TiedInfo) -> dict:
    """Store tied tables once and gather external data into `<model>_data`; return facts for convert.json."""
    import onnx

    model_path = Path(model_path)
    base = model_path.parent
    model = onnx.load(str(model_path), load_external_data=False)
    old_locations = {_external(t)["location"] for t in _all_tensors(model) if _is_external(t)}
    removed = _store_tied_once(model, base, tied)
    if old_locations:
        _gather_external_data(model, base, model_path.name + "_data")
        tmp = model_path.with_name(model_path.name + ".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, model_path)
        for location in old_locations - {model_path.name + "_data"}:
            with contextlib.suppress(FileNotFoundError):
                (base / location).unlink()
    elif removed:
        onnx.save(model, str(model_path))
    return {"tied_weights_stored_once": _all_tied_once(tied, removed), "external_data": bool(old_locations)}


def _all_tied_once(tied: TiedInfo, removed: list[str]) -> bool | None:
    """True when every tied group optimum can tie is stored once; None when the model ties nothing."""
    if not tied.groups_to_tie:
        return None
    return len(removed) >= len(tied.groups_to_tie)


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


def _gather_external_data(model, base: Path, location: str) -> None:
    """Copy every externally stored tensor, one at a time, into `base/location` and point the graph at it."""
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
            with open(base / info["location"], "rb") as src:
                src.seek(int(info.get("offset", 0)))
                left = length
                while left:
                    chunk = src.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise OSError(f"{info['location']} ends before tensor {tensor.name}'s {length} bytes")
                    out.write(chunk)
                    left -= len(chunk)
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = TensorProto.EXTERNAL
            offset += length
    os.replace(tmp, base / location)


def _all_tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def _is_external(tensor) -> bool:
    from onnx import TensorProto

    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def _external(tensor) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}
