"""ONNX files in and out: saving a model (one file or external data) and counting its ops.

onnx is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path

COPY_CHUNK = 64 << 20  # bytes per read when copying external weight data: bounded memory whatever the tensor


def copy_byte_range(path: Path, offset: int, length: int, out) -> int:
    """Copy `length` bytes of `path` from `offset` into the open binary file `out`, a chunk at a time.

    Returns the bytes copied: fewer than `length` when `path` ends first (the caller names what is short).
    """
    copied = 0
    with open(path, "rb") as src:
        src.seek(offset)
        while copied < length:
            chunk = src.read(min(length - copied, COPY_CHUNK))
            if not chunk:
                break
            out.write(chunk)
            copied += len(chunk)
    return copied


def save_model(model, path, *, external_data: bool = False) -> None:
    """Save as one file when it fits protobuf's 2 GB limit, else with external data beside it (`path.name`.data).

    `external_data=True` always writes the weights beside the graph: for models users load, since
    onnxruntime then maps them instead of parsing them out of one protobuf, which lowers peak memory and
    the time to create a session. It empties the tensors of the in-memory `model` (onnx moves their bytes
    out): do not use the model afterwards.
    """
    import onnx

    path = Path(path)
    if external_data or model.ByteSize() >= 2_000_000_000:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data")
    else:
        onnx.save_model(model, str(path))


def op_counts(model) -> dict[str, int]:
    """Nodes per op, sorted by name; ops outside the default domain are keyed `domain.op_type`."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
