"""PyTorch (Hugging Face weights) -> Core ML ML Program, and weight compression.

Decoders: `StatefulDecoder` traced with `torch.jit.trace`, converted with two `ct.StateType` KV-cache
states (iOS 18), flexible query length and sequence end (`ct.RangeDim`), fp16 compute precision.
Encoders: `Encoder` traced at a fixed sequence length (the Neural Engine compiles static shapes).

Compression runs on the converted program and touches only constants feeding `linear`, `matmul` and
`gather` (projection and embedding weights); RoPE tables, masks and norm weights stay fp16.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass

import numpy as np

from edgepack.errors import UnsupportedModelError
from edgepack.targets.coreml_support import compat

COMPRESSIONS = ("none", "int8", "int4-block", "palettize4")
WEIGHT_CONSUMERS = ("linear", "matmul", "gather")


@dataclass(frozen=True)
class CompressionScheme:
    """A compression scheme as a value (written into target.json as such)."""

    name: str = "none"
    block_size: int = 32
    embedding: str = "same"  # int4-block: "same" (uint4 affine per block), "row" (uint4 affine per row) or "int8" (per channel)

    def describe(self) -> dict:
        if self.name == "none":
            return {"name": "none", "weights": "fp16"}
        if self.name == "int8":
            return {"name": "int8", "op": "constexpr_blockwise_shift_scale", "dtype": "int8", "mode": "linear_symmetric",
                    "granularity": "per_channel", "applies_to": list(WEIGHT_CONSUMERS), "tool": "coremltools.optimize.coreml.linear_quantize_weights"}
        if self.name == "int4-block":
            return {"name": "int4-block", "op": "constexpr_blockwise_shift_scale", "dtype": "uint4", "block_size": self.block_size,
                    "scale": "fp16 per block", "offset": "fp16 per block (w = scale * (q - offset))",
                    "fit": "per block min/max affine: reproduces GGUF Q4_1 blocks exactly when the source was Q4_1",
                    "embedding": {"same": "uint4 affine per block", "row": "uint4 affine per row (one scale and offset per token)", "int8": "int8 per channel"}[self.embedding],
                    "applies_to": list(WEIGHT_CONSUMERS), "tool": "edgepack graph pass (coremltools MIL builder)"}
        return {"name": "palettize4", "op": "constexpr_lut_to_dense", "nbits": 4, "mode": "uniform", "granularity": "per_grouped_channel",
                "group_size": 16, "applies_to": list(WEIGHT_CONSUMERS), "tool": "coremltools.optimize.coreml.palettize_weights"}


def _ct():
    compat.apply()
    import coremltools as ct

    return ct


def convert_decoder(hf_model, *, model_type: str, max_context: int, plan, compute_units: str):
    import torch

    ct = _ct()
    from edgepack.targets.coreml_support.wrappers import StatefulDecoder

    wrapper = StatefulDecoder(hf_model, max_context, plan).eval()
    example = (torch.zeros((1, 2), dtype=torch.int32), torch.zeros((1, 1, 2, 5), dtype=torch.float32))
    try:
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    except Exception as exc:
        raise UnsupportedModelError(f"model_type {model_type!r}: torch.jit.trace failed: {_first_line(exc)}") from exc
    wrapper.key_cache.zero_()
    wrapper.value_cache.zero_()
    query = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
    end = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
    state_shape = tuple(wrapper.key_cache.shape)
    return _convert(
        ct, traced, model_type,
        inputs=[ct.TensorType(name="input_ids", shape=(1, query), dtype=np.int32),
                ct.TensorType(name="causal_mask", shape=(1, 1, query, end), dtype=np.float16)],
        outputs=[ct.TensorType(name="logits", dtype=np.float16)],
        states=[ct.StateType(wrapped_type=ct.TensorType(shape=state_shape, dtype=np.float16), name="key_cache"),
                ct.StateType(wrapped_type=ct.TensorType(shape=state_shape, dtype=np.float16), name="value_cache")],
        compute_units=compute_units,
    )


def convert_encoder(hf_model, *, model_type: str, seq_len: int, plan, compute_units: str):
    import torch

    ct = _ct()
    from edgepack.targets.coreml_support.wrappers import Encoder

    wrapper = Encoder(hf_model, plan).eval()
    example = (torch.zeros((1, seq_len), dtype=torch.int32), torch.ones((1, seq_len), dtype=torch.int32))
    try:
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    except Exception as exc:
        raise UnsupportedModelError(f"model_type {model_type!r}: torch.jit.trace failed: {_first_line(exc)}") from exc
    return _convert(
        ct, traced, model_type,
        inputs=[ct.TensorType(name="input_ids", shape=(1, seq_len), dtype=np.int32),
                ct.TensorType(name="attention_mask", shape=(1, seq_len), dtype=np.int32)],
        outputs=[ct.TensorType(name="last_hidden_state", dtype=np.float16)],
        states=None,
        compute_units=compute_units,
    )


def _convert(ct, traced, model_type, *, inputs, outputs, states, compute_units):
    units = {"all": ct.ComputeUnit.ALL, "cpu_and_ne": ct.ComputeUnit.CPU_AND_NE,
             "cpu_and_gpu": ct.ComputeUnit.CPU_AND_GPU, "cpu_only": ct.ComputeUnit.CPU_ONLY}[compute_units]
    kwargs = dict(inputs=inputs, outputs=outputs, minimum_deployment_target=ct.target.iOS18,
                  compute_precision=ct.precision.FLOAT16, compute_units=units, convert_to="mlprogram",
                  skip_model_load=True)
    if states:
        kwargs["states"] = states
    try:
        with _quiet_progress():
            return ct.convert(traced, **kwargs)
    except Exception as exc:
        message = str(exc)
        op = re.search(r"convert function for op '([^']+)' not implemented", message)
        if op:
            raise UnsupportedModelError(f"model_type {model_type!r}: coremltools 9.0 cannot convert torch op '{op.group(1)}'") from exc
        raise UnsupportedModelError(f"model_type {model_type!r}: coremltools conversion failed: {_first_line(exc)}") from exc


@contextlib.contextmanager
def _quiet_progress():
    """coremltools draws tqdm progress bars on stderr; edgepack keeps stderr for errors and its own status."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _first_line(exc) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def compress(mlmodel, scheme: CompressionScheme):
    """Apply `scheme` to the weights feeding linear/matmul/gather; returns the new MLModel."""
    if scheme.name == "none":
        return mlmodel
    compat.apply()
    import coremltools.optimize.coreml as cto

    if scheme.name == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0)
        config = cto.OptimizationConfig(global_config=None, op_type_configs={t: op for t in WEIGHT_CONSUMERS})
        with _quiet_progress():
            return cto.linear_quantize_weights(mlmodel, config=config)
    if scheme.name == "palettize4":
        op = cto.OpPalettizerConfig(mode="uniform", nbits=4, granularity="per_grouped_channel", group_size=16, weight_threshold=0)
        config = cto.OptimizationConfig(global_config=None, op_type_configs={t: op for t in WEIGHT_CONSUMERS})
        with _quiet_progress():
            return cto.palettize_weights(mlmodel, config=config)
    if scheme.name == "int4-block":
        from coremltools.models.utils import _apply_graph_pass

        with _quiet_progress():
            return _apply_graph_pass(mlmodel, AffineBlockInt4Pass(scheme.block_size, scheme.embedding))
    raise ValueError(scheme.name)


def affine_blocks(weight: np.ndarray, block: int):
    """Per-block (along the last axis) min/max affine uint4: w ~= scale * (q - offset)."""
    rows, cols = weight.shape
    w = weight.astype(np.float32).reshape(rows, cols // block, block)
    lo, hi = w.min(axis=-1), w.max(axis=-1)
    scale = (hi - lo) / 15.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint((w - lo[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    offset = -lo / scale
    return q.reshape(rows, cols), scale.astype(np.float16), offset.astype(np.float16)


def _make_pass_class():
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    class _Pass(AbstractGraphPass):
        def __init__(self, block: int, embedding: str):
            super().__init__()
            self.block, self.embedding = block, embedding
            self.replaced = 0

        def apply(self, prog):
            from coremltools.converters.mil import Builder as mb
            from coremltools.converters.mil.mil import types

            for function in prog.functions.values():
                for op in list(function.operations):
                    if op.op_type != "const" or op.outputs[0].val is None:
                        continue
                    var = op.outputs[0]
                    children = var.child_ops
                    value = var.val
                    if not children or not isinstance(value, np.ndarray) or value.ndim != 2 or value.dtype.kind != "f":
                        continue
                    if any(c.op_type not in WEIGHT_CONSUMERS or not _is_weight_input(c, var) for c in children):
                        continue
                    rows, cols = value.shape
                    is_embedding = any(c.op_type == "gather" for c in children)
                    with function:
                        if is_embedding and self.embedding == "int8":
                            absmax = np.abs(value.astype(np.float32)).max(axis=1, keepdims=True)
                            scale = np.where(absmax > 0, absmax / 127.0, 1.0)
                            data = np.clip(np.rint(value / scale), -127, 127).astype(np.int8)
                            new = mb.constexpr_blockwise_shift_scale(data=data, scale=scale.astype(value.dtype), before_op=op, name=op.name + "_int8")
                        elif cols % self.block == 0 or (is_embedding and self.embedding == "row"):
                            q, scale, offset = affine_blocks(value, cols if is_embedding and self.embedding == "row" else self.block)
                            new = mb.constexpr_blockwise_shift_scale(
                                data=q.astype(types.np_uint4_dtype), scale=scale.astype(value.dtype),
                                offset=offset.astype(value.dtype), before_op=op, name=op.name + "_uint4")
                        else:
                            continue
                    function.replace_uses_of_var_after_op(anchor_op=op, old_var=var, new_var=new, no_check_var_types=True)
                    function.remove_ops([op])
                    self.replaced += 1

    return _Pass


def _is_weight_input(child, var) -> bool:
    if child.op_type == "linear":
        return child.weight is var
    if child.op_type == "gather":
        return child.x is var
    return child.op_type == "matmul"


def AffineBlockInt4Pass(block: int, embedding: str):  # noqa: N802  (a class built lazily: coremltools imports)
    return _make_pass_class()(block, embedding)
