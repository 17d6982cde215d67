"""Initializers of a model loaded without its weights, read and written one tensor at a time.

The weight-only schemes quantize an export tensor by tensor: the graph is loaded with
`onnx.load(..., load_external_data=False)`, each weight is read from its file when its node is
quantized, and what the quantizers write goes straight to a spill file beside the output, so the
process holds the graph, one tensor and its quantized form, not the model.

Why by hand:
  * protobuf's upb runtime allocates every byte set into a message from the arena of the message's
    root and returns none of it until the root is freed: weights set into the model (by
    `load_external_data_for_tensor`, `numpy_helper.from_array` appended to the graph, a quantizer's
    new initializers) stay resident after the tensor is removed. Tensors therefore live in the graph
    only as external references; a quantizer gets a weight in a small graph of its own, freed after.
  * `onnx.save_model(save_as_external_data=True)` writes only tensors whose bytes are in the message,
    so a model whose weights are still references to another file needs them loaded first: all at once.
    `TensorStore.save` copies each referenced tensor from its file instead, offsets aligned to 4 KiB for
    tensors of 1 MiB and more, which is what onnxruntime memory-maps instead of copying on CPU.

A model held fully in memory (tests, small graphs) works the same: its tensors are simply inline.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from edgepack.core.onnx_io import copy_byte_range

ALIGN = 4096  # onnxruntime maps external initializers whose offset is page-aligned (ModelSavingOptions)
ALIGN_THRESHOLD = 1 << 20  # ... and aligns only tensors of at least this size when it saves
INLINE_LIMIT = 1024  # smaller tensors stay in the graph (onnx.save_model's default size threshold)


def _external_info(tensor) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def is_external(tensor) -> bool:
    from onnx import TensorProto

    return tensor.data_location == TensorProto.EXTERNAL


class TensorStore:
    """Reads initializers from wherever they are (inline, the export's data file, the spill file) and
    writes new ones to a spill file in `work_dir`, returning data-less references to put in the graph.

    `base_dir` is the folder the model's external data locations are relative to (None: no external data).
    Use as a context manager: the spill file is deleted on exit.
    """

    def __init__(self, base_dir: Path | str | None = None, work_dir: Path | str | None = None):
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self._spill_dir: Path | None = None
        self._spill = None
        self._spill_name = f"edgepack-spill-{uuid.uuid4().hex[:12]}.data"

    # ---- reading

    def _path(self, location: str) -> Path:
        if location == self._spill_name and self._spill_dir is not None:
            return self._spill_dir / location
        if self.base_dir is None:
            raise ValueError(f"external data {location!r} but no folder to read it from")
        return self.base_dir / location

    def _span(self, tensor) -> tuple[Path, int, int]:
        info = _external_info(tensor)
        path = self._path(info["location"])
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else path.stat().st_size - offset
        return path, offset, length

    @staticmethod
    def dtype(tensor) -> np.dtype:
        from onnx import helper

        return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))

    def array(self, tensor) -> np.ndarray:
        """The tensor's values, a fresh array (the message is not changed)."""
        from onnx import numpy_helper

        if not is_external(tensor):
            return numpy_helper.to_array(tensor)
        if self._spill is not None:
            self._spill.flush()
        path, offset, length = self._span(tensor)
        dtype = self.dtype(tensor)
        if dtype.itemsize * int(np.prod(tensor.dims, dtype=np.int64)) != length:  # packed (int4) or odd types
            return numpy_helper.to_array(self.materialize(tensor))
        with path.open("rb") as f:
            f.seek(offset)
            values = np.fromfile(f, dtype=dtype, count=length // dtype.itemsize)
        return values.reshape(tuple(tensor.dims))

    def rows(self, tensor, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D tensor (one contiguous read for external data)."""
        if not is_external(tensor):
            return self.array(tensor)[start:stop]
        if self._spill is not None:
            self._spill.flush()
        path, offset, _ = self._span(tensor)
        dtype, cols = self.dtype(tensor), int(tensor.dims[1])
        stop = min(stop, int(tensor.dims[0]))
        with path.open("rb") as f:
            f.seek(offset + start * cols * dtype.itemsize)
            values = np.fromfile(f, dtype=dtype, count=(stop - start) * cols)
        return values.reshape(stop - start, cols)

    def columns(self, tensor, start: int, stop: int) -> np.ndarray:
        """Columns [start, stop) of a 2-D tensor, copied out of a short-lived memory map (the pages it
        touched leave the process's resident set with the map)."""
        if not is_external(tensor):
            return np.ascontiguousarray(self.array(tensor)[:, start:stop])
        if self._spill is not None:
            self._spill.flush()
        path, offset, _ = self._span(tensor)
        mapped = np.memmap(path, dtype=self.dtype(tensor), mode="r", offset=offset, shape=tuple(int(d) for d in tensor.dims))
        try:
            return np.array(mapped[:, start:stop])
        finally:
            mapped._mmap.close()
            del mapped

    def materialize(self, tensor, into=None):
        """A copy of the tensor with its bytes inline: a new message, or one added to `into` (a repeated
        TensorProto field, e.g. a small graph's initializers) to hold the bytes in that message's arena."""
        from onnx import TensorProto

        copy = into.add() if into is not None else TensorProto()
        if not is_external(tensor):
            copy.CopyFrom(tensor)
            return copy
        if self._spill is not None:
            self._spill.flush()
        path, offset, length = self._span(tensor)
        copy.name = tensor.name
        copy.data_type = tensor.data_type
        copy.dims.extend(tensor.dims)
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise ValueError(f"{tensor.name}: external data ends early in {path}")
        copy.raw_data = data
        return copy

    # ---- writing

    def _spill_file(self):
        if self._spill is None:
            if self.work_dir is None:
                raise ValueError("no work folder to spill tensors to")
            self._spill_dir = self.work_dir / f".{self._spill_name}.d"
            self._spill_dir.mkdir(parents=True, exist_ok=True)
            self._spill = (self._spill_dir / self._spill_name).open("w+b")
        return self._spill

    def add(self, values: np.ndarray, name: str):
        """Write `values` to the spill file; return a data-less TensorProto referring to them. Without a
        work folder (an in-memory model) the tensor is returned inline instead."""
        from onnx import TensorProto, helper, numpy_helper

        values = np.ascontiguousarray(values)
        if self.work_dir is None or values.nbytes < INLINE_LIMIT:
            return numpy_helper.from_array(values, name)
        f = self._spill_file()
        f.seek(0, os.SEEK_END)
        offset = f.tell()
        values.tofile(f)
        ref = TensorProto()
        ref.name = name
        ref.data_type = helper.np_dtype_to_tensor_dtype(values.dtype)
        ref.dims.extend(values.shape)
        _set_external(ref, self._spill_name, offset, values.nbytes)
        return ref

    def take(self, tensor):
        """A library-made tensor (bytes inline, its own message) as a spilled reference. Its bytes are
        written as they are: packed types (int4) have no numpy form of the same size."""
        from onnx import TensorProto

        if is_external(tensor) or self.work_dir is None:
            return tensor
        if not tensor.HasField("raw_data"):  # typed fields (float_data, int32_data...): through numpy
            return self.add(self.array(tensor), tensor.name)
        data = tensor.raw_data
        if len(data) < INLINE_LIMIT:
            return tensor
        f = self._spill_file()
        f.seek(0, os.SEEK_END)
        offset = f.tell()
        f.write(data)
        ref = TensorProto()
        ref.name = tensor.name
        ref.data_type = tensor.data_type
        ref.dims.extend(tensor.dims)
        _set_external(ref, self._spill_name, offset, len(data))
        return ref

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None

    def __enter__(self) -> TensorStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- saving

    def save(self, model, path: Path | str) -> None:
        """Write `model` to `path` with every initializer of INLINE_LIMIT bytes or more in `path.name`.data.

        Referenced tensors are copied from their files in chunks; inline ones are written and cleared.
        The message is changed in place (its tensors refer to the new data file afterwards).
        """
        import onnx

        path = Path(path)
        location = f"{path.name}.data"
        if self._spill is not None:
            self._spill.flush()
        with (path.parent / location).open("wb") as out:
            for tensor in _initializers(model.graph):
                if is_external(tensor):
                    source, offset, length = self._span(tensor)
                    start = _aligned_start(out, length)
                    if copy_byte_range(source, offset, length, out) != length:
                        raise ValueError(f"{tensor.name}: external data ends early in {source}")
                    _set_external(tensor, location, start, length)
                elif tensor.HasField("raw_data") and len(tensor.raw_data) >= INLINE_LIMIT:
                    data = tensor.raw_data
                    start = _aligned_start(out, len(data))
                    out.write(data)
                    tensor.ClearField("raw_data")
                    _set_external(tensor, location, start, len(data))
                    del data
        onnx.save_model(model, str(path))


def _aligned_start(out, length: int) -> int:
    position = out.tell()
    if length >= ALIGN_THRESHOLD and position % ALIGN:
        out.write(b"\0" * (ALIGN - position % ALIGN))
    return out.tell()


def _set_external(tensor, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL


def _initializers(graph):
    """Every tensor of a graph that may hold data: initializers and tensor attributes (a Constant's value,
    which exporters also store as external data), of the graph and of its subgraphs (If/Loop/Scan bodies)."""
    from onnx import AttributeProto

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == AttributeProto.GRAPH:
                yield from _initializers(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _initializers(sub)
