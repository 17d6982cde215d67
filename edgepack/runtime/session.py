"""ONNX Runtime session creation with explicit thread settings."""

from __future__ import annotations

from pathlib import Path


def create_session(onnx_path: Path, *, threads: int | None = None, providers: list[str] | None = None):
    """An InferenceSession on `onnx_path`; `threads` sets intra-op threads (None: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    # Warnings about unused initializers etc. are noise for users; errors still raise.
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers or ["CPUExecutionProvider"])
