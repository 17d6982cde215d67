"""ONNX Runtime sessions and the generation loop shared by run, convert's parity check, quality and profiling."""

from edgepack.runtime.generate import DecoderSession, GenerationResult, SamplingConfig, generate
from edgepack.runtime.model_dir import ExportedModelDir, load_model_dir
from edgepack.runtime.session import create_session

__all__ = [
    "DecoderSession",
    "ExportedModelDir",
    "GenerationResult",
    "SamplingConfig",
    "create_session",
    "generate",
    "load_model_dir",
]
