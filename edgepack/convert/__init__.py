"""Export to ONNX (optimum-onnx) and parity against PyTorch.

Names are imported on first use: the command line reads ConvertConfig's option declarations without
loading the exporter.
"""

import importlib

__all__ = ["ConvertConfig", "ExportedModel", "convert_model"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("edgepack.convert.export"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
