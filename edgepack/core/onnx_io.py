"""ONNX files in and out: saving a model (one file or external data) and counting its ops.

onnx is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path


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
