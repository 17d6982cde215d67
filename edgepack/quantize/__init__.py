"""Quantization schemes, the quality report against fp32, and the quality gate."""

from edgepack.quantize.pipeline import QualityGate, QuantizeConfig, QuantizedModel, quantize_model
from edgepack.quantize.quality import QualityConfig
from edgepack.quantize.schemes import SCHEME_NAMES, SCHEMES

__all__ = ["QualityConfig", "QualityGate", "QuantizeConfig", "QuantizedModel", "SCHEMES", "SCHEME_NAMES", "quantize_model"]
