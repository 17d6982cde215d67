"""Export to ONNX (optimum-onnx) and parity against PyTorch."""

from edgepack.convert.export import ConvertConfig, ExportedModel, convert_model

__all__ = ["ConvertConfig", "ExportedModel", "convert_model"]
