"""Quantization schemes, the quality report against fp32, and the quality gate.

Names are imported on first use: the command line reads the scheme declarations (schemes.py) without
loading the quantizers.
"""

import importlib

_EXPORTS = {
    "QualityConfig": "edgepack.quantize.quality",
    "QualityGate": "edgepack.quantize.pipeline",
    "QuantizeConfig": "edgepack.quantize.pipeline",
    "QuantizedModel": "edgepack.quantize.pipeline",
    "quantize_model": "edgepack.quantize.pipeline",
    "SCHEMES": "edgepack.quantize.schemes",
    "SCHEME_NAMES": "edgepack.quantize.schemes",
}

__all__ = ["QualityConfig", "QualityGate", "QuantizeConfig", "QuantizedModel", "SCHEMES", "SCHEME_NAMES", "quantize_model"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
