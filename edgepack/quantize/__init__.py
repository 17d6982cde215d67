"""Quantization schemes and quality evaluation (issue #3: int8-dynamic, int8-weight, int8-static, int4, fp16, gguf)."""
