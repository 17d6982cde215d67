"""ONNX Runtime session creation with explicit thread settings."""

from __future__ import annotations

from pathlib import Path


def create_session(onnx_path: Path, *, threads: int | None = None, providers: list[str] | None = None, prepack: bool = True,
                   arena: bool = True):
    """An InferenceSession on `onnx_path`; `threads` sets intra-op threads (None: onnxruntime's default).

    `prepack=False` keeps onnxruntime from storing a second, repacked copy of each weight (for MatMul on
    CPU, the size of the weight): for sessions that only read a float model's outputs, where memory
    matters more than the last few percent of speed. Quantized ops need their packed weights to run as
    deployed; keep it on for those.

    `arena=False` frees each intermediate tensor when the run is done with it instead of keeping it in
    onnxruntime's CPU arena, which grows by powers of two and keeps its peak for the session's lifetime:
    for sessions that run a few long windows (logits of window x vocabulary floats), where the arena's
    growth, not the weights, sets the process peak.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not arena:
        options.enable_cpu_mem_arena = False
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    # Warnings about unused initializers etc. are noise for users; errors still raise.
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers or ["CPUExecutionProvider"])
