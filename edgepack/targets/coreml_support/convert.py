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
from pathlib import Path

import numpy as np

from edgepack.errors import UnsupportedModelError
from edgepack.targets.coreml_support import compat

COMPRESSIONS = ("none", "int8", "int4-block", "palettize4")
WEIGHT_CONSUMERS = ("linear", "matmul", "gather")


@dataclass(frozen=True)
class CompressionScheme:
    """A compression scheme as a value (written into target.json as such)."""

    @property
    def deployment_target(self) -> str:
        """iOS 18, except the split table with normal levels: its indices feed a per-block scale (constexpr_lut_to_dense ->
        constexpr_blockwise_shift_scale), which Core ML runs from iOS 26 on; for older targets coremltools'
        canonicalize_quantized_lut_pattern pass rewrites it into one int8 LUT per block (+1.3 bits a weight).
        Uniform 4-bit levels are plain uint4 codes (no LUT), so that table stays iOS 18."""
        return "iOS26" if self.name == "int4-block" and self.embedding == "split" and self.split_levels == "normal" else "iOS18"

    name: str = "none"
    block_size: int = 32
    embedding: str = "same"  # int4-block: "same" (uint4 affine per block), "row" (uint4 per row), "int8" (per channel) or "split"
    integer_offsets: bool = False  # int4-block: uint4 offsets + int4 rounding residue through block sums (see _residue_projection)
    split_rows: int = 6000  # embedding "split": ids below this in int8 (per block of 32) ...
    split_block: int = 48  # ... the others 3-bit (or split_bits) with an fp16 scale and offset per block of this many entries
    split_bits: int = 3  # embedding "split": bits of the rare rows' level indices (3: 8 levels, 4: 16 levels)
    split_levels: str = "normal"  # embedding "split": "normal" quantiles through a LUT (iOS 26), or "uniform" (4 bits: plain uint4, iOS 18)
    block_scales: str = "fp16"  # int4-block: "fp16" per block in the weight op, or "uint8" codes applied to block sums (see _scaled_sum_projection)

    def describe(self) -> dict:
        if self.name == "none":
            return {"name": "none", "weights": "fp16"}
        if self.name == "int8":
            return {"name": "int8", "op": "constexpr_blockwise_shift_scale", "dtype": "int8", "mode": "linear_symmetric",
                    "granularity": "per_channel", "applies_to": list(WEIGHT_CONSUMERS), "tool": "coremltools.optimize.coreml.linear_quantize_weights"}
        if self.name == "int4-block":
            coded = self.block_scales == "uint8"
            return {"name": "int4-block", "op": "constexpr_blockwise_shift_scale", "dtype": "int4 (q - 8)" if coded else "uint4", "block_size": self.block_size,
                    "scale": "uint8 code per block (see block_scales)" if coded else "fp16 per block",
                    "offset": ("uint8 per block, in sixteenths of the coded scale (w = scale * (q - offset))" if coded
                               else "fp16 per block (w = scale * (q - offset))"),
                    "fit": ("per block min/max affine: the int4 codes are GGUF Q4_1's when the source was Q4_1; each scale is coded "
                            "within half a step of a log-spaced table and the offset refitted to it" if coded else
                            "per block min/max affine: reproduces GGUF Q4_1 blocks exactly when the source was Q4_1"),
                    "embedding": {"same": "uint4 affine per block", "row": "uint4 affine per row (one scale and offset per token)", "int8": "int8 per channel",
                                  "split": (f"ids < {self.split_rows}: int8 per block of 32; the rest: " + (
                                      "uint4 (uniform levels, constexpr_blockwise_shift_scale)" if self.split_levels == "uniform" else
                                      f"{self.split_bits}-bit indices into {2 ** self.split_bits} int8 levels (normal quantiles; "
                                      f"constexpr_lut_to_dense feeding constexpr_blockwise_shift_scale)")
                                      + f" with an fp16 scale and offset per block of {self.split_block}, fitted by least squares weighted by E[h^2]")}[self.embedding],
                    "offsets": ("uint8 sixteenths of the block's coded scale, applied to the block sums of the activation"
                                if coded else
                                "uint4 (the rounded fp16 offset) plus the rounding residue in int4 sixteenths of the block's scale, "
                                "applied as block sums of the activation times the residues" if self.integer_offsets else "fp16"),
                    "block_scales": ("uint8 codes into a 256-entry log-spaced fp16 table per weight (constexpr_lut_to_dense), "
                                     "multiplying each block's partial sum (the int4 codes feed a matmul per block)"
                                     if coded else "fp16 per block, inside constexpr_blockwise_shift_scale"),
                    "applies_to": list(WEIGHT_CONSUMERS), "tool": "edgepack graph pass (coremltools MIL builder)"}
        return {"name": "palettize4", "op": "constexpr_lut_to_dense", "nbits": 4, "mode": "uniform", "granularity": "per_grouped_channel",
                "group_size": 16, "applies_to": list(WEIGHT_CONSUMERS), "tool": "coremltools.optimize.coreml.palettize_weights"}


def _ct():
    compat.apply()
    import coremltools as ct

    return ct


def convert_decoder(hf_model, *, model_type: str, max_context: int, plan, compute_units: str, deployment_target: str = "iOS18"):
    import torch

    ct = _ct()
    from edgepack.targets.coreml_support.wrappers import StatefulDecoder

    wrapper = StatefulDecoder(hf_model, max_context, plan).eval()
    example = (torch.zeros((1, 2), dtype=torch.int32), torch.zeros((1, 1, 2, 5), dtype=torch.float32))
    traced = _trace_decoder(wrapper, example, model_type)
    query = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
    end = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
    return _convert(
        ct, traced, model_type,
        inputs=[ct.TensorType(name="input_ids", shape=(1, query), dtype=np.int32),
                ct.TensorType(name="causal_mask", shape=(1, 1, query, end), dtype=np.float16)],
        outputs=[ct.TensorType(name="logits", dtype=np.float16)],
        states=_kv_states(ct, wrapper), compute_units=compute_units, deployment_target=deployment_target,
    )


def _trace_decoder(wrapper, example, model_type: str):
    """`torch.jit.trace` of a decoder wrapper, its cache buffers zeroed again after the example call."""
    import torch

    try:
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    except Exception as exc:
        raise UnsupportedModelError(f"model_type {model_type!r}: torch.jit.trace failed: {_first_line(exc)}") from exc
    wrapper.key_cache.zero_()
    wrapper.value_cache.zero_()
    return traced


def _kv_states(ct, wrapper) -> list:
    """The wrapper's key and value cache buffers as fp16 Core ML states."""
    shape = tuple(wrapper.key_cache.shape)
    return [ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=name) for name in ("key_cache", "value_cache")]


# Inputs and outputs that carry the hidden states between the parts of a model split into several packages.
HIDDEN_IN, HIDDEN_OUT = "hidden_states", "output_hidden_states"


def convert_decoder_fixed(hf_model, *, model_type: str, max_context: int, query: int, plan, compute_units: str,
                          deployment_target: str = "iOS18", layers: tuple[int, int] | None = None):
    """One fixed-shape function of the Neural Engine program (`wrappers.FixedShapeDecoder`): `query` tokens
    (a prefill chunk, or 1 for decode) over a KV cache of `max_context`; `layers`: the part of a split model.
    Returns (MLModel, output names)."""
    import torch

    ct = _ct()
    from edgepack.targets.coreml_support.wrappers import FixedShapeDecoder

    wrapper = FixedShapeDecoder(hf_model, max_context, plan, layers=layers).eval()
    hidden_size = int(hf_model.config.hidden_size)
    positions = torch.zeros((1, query, max_context), dtype=torch.float32)
    positions[0, torch.arange(query), torch.arange(query)] = 1.0
    first = torch.zeros((1, query), dtype=torch.int32) if wrapper.first else torch.zeros((1, query, hidden_size), dtype=torch.float32)
    example = (first, torch.zeros((1, 1, query, max_context), dtype=torch.float32), positions)
    traced = _trace_decoder(wrapper, example, model_type)
    vocab = int(hf_model.lm_head.weight.shape[0])
    slices = -(-vocab // wrapper.logits_slice)
    names = ([HIDDEN_OUT] if not wrapper.last else ["logits"] if slices == 1 else [f"logits_{i}" for i in range(slices)])
    mlmodel = _convert(
        ct, traced, model_type,
        inputs=[ct.TensorType(name="input_ids", shape=(1, query), dtype=np.int32) if wrapper.first else
                ct.TensorType(name=HIDDEN_IN, shape=(1, query, hidden_size), dtype=np.float16),
                ct.TensorType(name="causal_mask", shape=(1, 1, query, max_context), dtype=np.float16),
                ct.TensorType(name="positions", shape=(1, query, max_context), dtype=np.float16)],
        outputs=[ct.TensorType(name=name, dtype=np.float16) for name in names],
        states=_kv_states(ct, wrapper), compute_units=compute_units, deployment_target=deployment_target,
    )
    return mlmodel, names


# Integer ops coremltools puts between an int32 input and the gather that reads it: a round trip through
# int16 and the wrap of negative indices (select(i >= 0, i, i + rows)).
_INDEX_OPS = ("cast", "greater_equal", "add", "select")


def direct_token_lookup(mlmodel):
    """The embedding gather reads `input_ids` directly: token ids are never negative, so the integer ops
    coremltools adds for negative indices and int16 round trips (`_INDEX_OPS`) are dropped, leaving the
    program no integer compute (the Neural Engine computes in fp16; see ane.RULES["integer-compute"])."""
    # coremltools' _apply_graph_pass, but its re-conversion runs the default pipeline without
    # guard_negative_gather_indices, which would put the integer ops back (and without the int16/fp16 casts,
    # as _apply_graph_pass does). Run last: every coremltools compression re-converts with that pass.
    ct = _ct()
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
    from coremltools.models.utils import _convert_model_spec_to_pymil_prog

    spec = mlmodel.get_spec()
    prog = _convert_model_spec_to_pymil_prog(mlmodel, spec.specificationVersion, load_milproto)
    _make_direct_lookup_pass()().apply(prog)
    pipeline = ct.PassPipeline()
    pipeline.remove_passes({"common::guard_negative_gather_indices", "common::add_fp16_cast", "common::add_int16_cast"})
    with _quiet_progress():
        return mil_convert(prog, convert_to="mlprogram", convert_from="milinternal", specification_version=spec.specificationVersion,
                           compute_units=mlmodel.compute_unit, model_description=spec.description, skip_model_load=True,
                           pass_pipeline=pipeline)


def _index_root(var, inputs: set):
    """The function input an index tensor is computed from through `_INDEX_OPS` only, else None."""
    roots, stack = set(), [var]
    while stack:
        var = stack.pop()
        if id(var) in inputs:
            roots.add(var)
            continue
        op = var.op
        if op is None or op.op_type not in _INDEX_OPS:
            return None
        stack += [v for v in op.inputs.values() if not isinstance(v, (list, tuple)) and v.val is None]
    return roots.pop() if len(roots) == 1 else None


def _make_direct_lookup_pass():
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    class _DirectLookup(AbstractGraphPass):
        def apply(self, prog):
            for function in prog.functions.values():
                inputs = {id(v) for v in function.inputs.values()}
                with function:
                    for op in list(function.operations):
                        if op.op_type != "gather" or op.indices.op is None:
                            continue
                        root = _index_root(op.indices, inputs)
                        if root is None:
                            continue
                        new = mb.gather(x=op.x, indices=root, axis=op.axis, batch_dims=op.batch_dims, validate_indices=False,
                                        before_op=op, name=op.name + "_direct")
                        op.enclosing_block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new)
                        op.enclosing_block.remove_ops([op])
            from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

            PASS_REGISTRY["common::dead_code_elimination"](prog)  # the integer ops the gathers no longer read

    return _DirectLookup


def save_multifunction(packages: dict[str, Path], out: Path, default: str) -> None:
    """One .mlpackage holding each of `packages` (function name -> single-function package) as a function;
    coremltools stores a weight that several functions hold identically once."""
    ct = _ct()
    descriptor = ct.utils.MultiFunctionDescriptor()
    for name, package in packages.items():
        descriptor.add_function(str(package), src_function_name="main", target_function_name=name)
    descriptor.default_function_name = default
    with _quiet_progress():
        ct.utils.save_multifunction(descriptor, str(out))


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


def _convert(ct, traced, model_type, *, inputs, outputs, states, compute_units, deployment_target: str = "iOS18"):
    units = {"all": ct.ComputeUnit.ALL, "cpu_and_ne": ct.ComputeUnit.CPU_AND_NE,
             "cpu_and_gpu": ct.ComputeUnit.CPU_AND_GPU, "cpu_only": ct.ComputeUnit.CPU_ONLY}[compute_units]
    kwargs = dict(inputs=inputs, outputs=outputs, minimum_deployment_target=getattr(ct.target, deployment_target),
                  compute_precision=ct.precision.FLOAT16, compute_units=units, convert_to="mlprogram",
                  skip_model_load=True)
    if states:
        kwargs["states"] = states
    try:
        with _quiet_progress():
            mlmodel = ct.convert(traced, **kwargs)
    except Exception as exc:
        message = str(exc)
        op = re.search(r"convert function for op '([^']+)' not implemented", message)
        if op:
            raise UnsupportedModelError(f"model_type {model_type!r}: coremltools 9.0 cannot convert torch op '{op.group(1)}'") from exc
        raise UnsupportedModelError(f"model_type {model_type!r}: coremltools conversion failed: {_first_line(exc)}") from exc
    # The MLModel keeps the converted MIL program (fp16 weights: half the fp32 model) beside its package, which
    # holds the same weights; compression reads them back from the package and saving copies the package, so
    # the in-memory copy is dropped rather than kept alongside the PyTorch model and the compressed program.
    mlmodel._mil_program = None
    return mlmodel


@contextlib.contextmanager
def _quiet_progress():
    """coremltools draws tqdm progress bars on stderr; edgepack keeps stderr for errors and its own status."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _first_line(exc) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def compress(mlmodel, scheme: CompressionScheme, column_weights=None, split_table=None):
    """Apply `scheme` to the weights feeding linear/matmul/gather; returns the new MLModel.

    `column_weights` (E[h_k^2] of the activations multiplying the tied table) weight the fit of the split
    table's 3-bit rows; `split_table` (a SplitTable) is that table already fitted or tuned."""
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
            return _apply_graph_pass(mlmodel, AffineBlockInt4Pass(scheme, column_weights, split_table))
    raise ValueError(scheme.name)


# Rows per step of the row-wise fits below: their float32 temporaries stay at a few tens of MB instead of
# several copies of the whole weight (a 128k-token table is 1 GB in float32).
_ROW_CHUNK_ELEMENTS = 1 << 22


def _by_rows(fit, weight: np.ndarray, *args):
    """`fit` (row-independent, returning arrays with one row per weight row) applied to chunks of rows."""
    step = max(1, _ROW_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    if weight.shape[0] <= step:
        return fit(weight, *args)
    parts = [fit(weight[start:start + step], *args) for start in range(0, weight.shape[0], step)]
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def affine_blocks(weight: np.ndarray, block: int):
    """Per-block (along the last axis) min/max affine uint4: w ~= scale * (q - offset)."""
    return _by_rows(_affine_blocks, weight, block)


def _affine_blocks(weight: np.ndarray, block: int):
    rows, cols = weight.shape
    w = weight.astype(np.float32).reshape(rows, cols // block, block)
    lo, hi = w.min(axis=-1), w.max(axis=-1)
    scale = (hi - lo) / 15.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint((w - lo[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    offset = -lo / scale
    return q.reshape(rows, cols), scale.astype(np.float16), offset.astype(np.float16)


def integer_offsets(offset: np.ndarray):
    """Offsets z -> (uint4 zero point, int4 residue k) with z = zero + k/16 to within 1/32 (for 0 <= z <= 15).

    k = round(16 (z - round(z))) is in -8..8; 8 (z half way) moves to the next zero point as k = -8."""
    z = offset.astype(np.float32)
    zero = np.rint(z)
    k = np.rint((z - zero) * 16)
    zero = np.where(k > 7, zero + 1, zero)
    k = np.where(k > 7, k - 16, k)
    return np.clip(zero, 0, 15), np.clip(k, -8, 7)


def stored_projection(weight: np.ndarray, block: int, residue: bool, block_scales: str = "fp16") -> np.ndarray:
    """The weights an int4-block projection computes with, as the package stores them (fp32 copy):
    w = s * (q - z) with fp16 offsets, s * (q - round(z)) - s * k / 16 with integer offsets, or
    s' * (q - z' / 16) with uint8 block scales (s' the coded scale, z' the uint8 offset; see scaled_blocks)."""
    rows, cols = weight.shape
    if block_scales == "uint8":
        q, codes, table, zero16 = scaled_blocks(weight, block)
        s = table.astype(np.float32)[codes][..., None]
        z = (zero16.astype(np.float32) - 8) / 16
        return (s * (q.reshape(rows, cols // block, block).astype(np.float32) - z[..., None])).reshape(rows, cols)
    q, scale, offset = affine_blocks(weight, block)
    q = q.reshape(rows, cols // block, block).astype(np.float32)
    s = scale.astype(np.float32)[..., None]
    if not residue:
        return (s * (q - offset.astype(np.float32)[..., None])).reshape(rows, cols)
    zero, k = integer_offsets(offset)
    return (s * (q - zero[..., None]) - s * (k / 16)[..., None]).reshape(rows, cols)


def scaled_blocks(weight: np.ndarray, block: int):
    """Per-block affine uint4 (as affine_blocks) with the fp16 block scales coded in 8 bits.

    Returns (q uint8 [rows, cols], codes uint8 [rows, blocks], table fp16 [256], zero16 uint8 [rows, blocks]):
    w ~= table[codes] * (q - (zero16 - 8) / 16). The table is log-spaced between the tensor's smallest and
    largest block scale, so every scale keeps the same relative precision (step ln(max/min)/255; SmolLM2's
    projections: 0.5-1.6%, so each coded scale is within 0.8% of the fp16 one). The offset is refitted to
    the coded scale (least squares over the block, which takes up the mean of the scale's rounding error)
    and stored in sixteenths of it: 8 bits where --integer-offsets spends 4 + 4.
    """
    rows, cols = weight.shape
    w = weight.astype(np.float64).reshape(rows, cols // block, block)
    q, scale, _ = affine_blocks(weight, block)
    q = q.reshape(rows, cols // block, block)
    live = q.max(-1) > 0  # constant blocks (q all 0, scale 1 by convention) take any scale: not in the table's range
    s = scale.astype(np.float64)
    low, high = (s[live].min(), s[live].max()) if live.any() else (1.0, 1.0)
    table = np.exp(np.linspace(np.log(low), np.log(max(high, low)), 256)).astype(np.float16)
    t = table.astype(np.float64)
    codes = np.clip(np.searchsorted((t[1:] + t[:-1]) / 2, s), 0, 255).astype(np.uint8)
    coded = t[codes]
    # w = coded * (q - z): least-squares z over the block, in sixteenths (centred on 8 for the int4 codes q - 8)
    z = (q * coded[..., None] - w).mean(-1) / coded
    zero16 = np.clip(np.rint(z * 16) + 8, 0, 255).astype(np.uint8)
    return q.reshape(rows, cols), codes, table, zero16


# Levels of the split table's rare rows: the 2**bits quantiles of a normal distribution at the centres of
# equal-probability bins (weights are bell-shaped), as int8 (constexpr_lut_to_dense takes int8 tables).
_NORMAL_LEVELS = {3: np.array([-1.534, -0.887, -0.489, -0.157, 0.157, 0.489, 0.887, 1.534]),
                  4: np.array([-1.863, -1.318, -1.01, -0.776, -0.579, -0.402, -0.237, -0.078,
                               0.078, 0.237, 0.402, 0.579, 0.776, 1.01, 1.318, 1.863])}
SPLIT_BITS = tuple(_NORMAL_LEVELS)


def split_levels(bits: int, kind: str = "normal") -> np.ndarray:
    """int8 levels of the rare rows: normal quantiles scaled to +-127 (a LUT), or "uniform" 0..2**bits - 1,
    which are the uint4 codes themselves (no LUT: plain constexpr_blockwise_shift_scale, iOS 18)."""
    if kind == "uniform":
        return np.arange(2 ** bits, dtype=np.int8)
    levels = _NORMAL_LEVELS[bits]
    return np.rint(levels / levels[-1] * 127).astype(np.int8)


SPLIT_LEVELS = split_levels(3)


def int8_rows(weight: np.ndarray):
    """Symmetric int8 per row: w ~= scale * q, scale float32 (rows, 1)."""
    absmax = np.abs(weight.astype(np.float32)).max(axis=1, keepdims=True)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0)
    return np.clip(np.rint(weight / scale), -127, 127).astype(np.int8), scale


def int8_blocks(weight: np.ndarray, block: int = 32):
    """Symmetric int8 per block of the last axis: w ~= scale * q."""
    rows, cols = weight.shape
    w = weight.astype(np.float32).reshape(rows, cols // block, block)
    scale = np.abs(w).max(axis=-1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(w / scale[..., None]), -127, 127).astype(np.int8)
    return q.reshape(rows, cols), scale.astype(np.float16)


def lut3_blocks(weight: np.ndarray, block: int, levels: np.ndarray, column_weights: np.ndarray | None, iters: int = 3):
    """Indices into `levels` (8 for 3 bits, 16 for 4) with a per-block scale and offset, w ~= scale * (levels[i] - offset).

    Scale and offset are refitted by least squares (weighted per column by E[h_k^2] of the activations that
    multiply the table, when given) around nearest-level assignments, a few rounds from the min/max fit.
    """
    rows, cols = weight.shape
    x = weight.astype(np.float64).reshape(rows, cols // block, block)
    lv = levels.astype(np.float64)
    w = np.ones((1, 1, block)) if column_weights is None else column_weights.astype(np.float64).reshape(1, cols // block, block)
    w = np.broadcast_to(w, x.shape)
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    s = np.where(hi > lo, (hi - lo) / (lv[-1] - lv[0]), 1.0)
    o = lv[0] - lo / s
    for it in range(iters + 1):
        s = s.astype(np.float16).astype(np.float64)  # fit the rounding the program stores
        o = o.astype(np.float16).astype(np.float64)
        index = np.abs((x / s + o)[..., None] - lv).argmin(-1)
        if it == iters:
            break
        chosen = lv[index]
        sw = w.sum(-1, keepdims=True)
        mean_l, mean_x = (w * chosen).sum(-1, keepdims=True) / sw, (w * x).sum(-1, keepdims=True) / sw
        var = (w * (chosen - mean_l) ** 2).sum(-1, keepdims=True)
        fitted = (w * (chosen - mean_l) * (x - mean_x)).sum(-1, keepdims=True) / np.maximum(var, 1e-30)
        s_new = np.where((var > 0) & (np.abs(fitted) > 1e-8), fitted, s)
        o = -(mean_x - s_new * mean_l) / s_new
        s = s_new
    return index.reshape(rows, cols).astype(np.uint8), s[..., 0].astype(np.float16), o[..., 0].astype(np.float16)


@dataclass
class SplitTable:
    """The split table as the package stores it: ids < len(frequent) int8 per block of 32, the rest
    indices into `levels` (3 or 4 bits) with an fp16 scale and offset per block of `block`: w = scale * (levels[i] - offset)."""

    frequent: np.ndarray  # int8 [F, cols]
    frequent_scale: np.ndarray  # fp16 [F, cols / 32]
    index: np.ndarray  # uint8 0..len(levels)-1 [rows - F, cols]
    scale: np.ndarray  # fp16 [rows - F, cols / block]
    offset: np.ndarray  # fp16 [rows - F, cols / block]
    levels: np.ndarray  # int8 [8] or [16]
    block: int

    @property
    def uniform(self) -> bool:
        """Levels 0..n-1: the indices are the stored codes (no LUT)."""
        return bool(np.array_equal(self.levels, np.arange(len(self.levels))))

    def dense(self) -> np.ndarray:
        frequent = self.frequent.astype(np.float32) * self.frequent_scale.astype(np.float32).repeat(32, axis=1)
        rare = self.scale.astype(np.float32).repeat(self.block, axis=1) * (
            self.levels.astype(np.float32)[self.index] - self.offset.astype(np.float32).repeat(self.block, axis=1))
        return np.concatenate([frequent, rare])


def fit_split_table(table: np.ndarray, split_rows: int, block: int, column_weights: np.ndarray | None, bits: int = 3,
                    kind: str = "normal") -> SplitTable:
    """Least-squares fit, block by block (what `--embedding split` stores, and where `--tune-steps` starts)."""
    levels = split_levels(bits, kind)
    frequent, frequent_scale = int8_blocks(table[:split_rows])
    index, scale, offset = lut3_blocks(table[split_rows:], block, levels, column_weights)
    return SplitTable(frequent, frequent_scale, index, scale, offset, levels, block)


@dataclass(frozen=True)
class _ScaledSumWeights:
    """MIL vars of one projection with uint8 block scales: int4 codes [blocks, 32, N], the coded scales and
    offsets [blocks, 1, N], and the shared shape/axis constants the per-block sums use."""

    weight: object
    scales: object
    offsets: object
    split: object
    perm: object
    last: object
    first: object


class _Int4BlockRewrites:
    """The int4-block graph pass's work, one method per rewrite (the pass class itself is built lazily:
    its base class is in coremltools, which the module does not import at load time)."""

    def __init__(self, scheme: CompressionScheme, column_weights: np.ndarray | None = None, split_table=None):
        super().__init__()
        self.split_table = split_table  # a SplitTable fitted (or tuned) outside, else fitted here
        self.scheme = scheme
        self.block, self.embedding = scheme.block_size, scheme.embedding
        self.replaced = 0
        self.column_weights = column_weights  # E[h^2] per table column, weighting the split table's fit
        self._indicators: dict = {}

    def apply(self, prog):
        for function in prog.functions.values():
            self._indicators = {}
            for op in list(function.operations):
                var = _compressible_weight(op)
                if var is None:
                    continue
                with function:
                    done = self._rewrite(function, op, var, var.val)
                if done:
                    self.replaced += 1

    def _rewrite(self, function, op, var, value) -> bool:
        """One weight const, by the layout its consumers and the scheme call for; False when left as it is."""
        children = var.child_ops
        is_embedding = any(c.op_type == "gather" for c in children)
        blocked_linear = not is_embedding and value.shape[1] % self.block == 0 and all(c.op_type == "linear" for c in children)
        if is_embedding and self.embedding == "split":
            return self._split_table(function, op, var, value)
        if blocked_linear and self.scheme.block_scales == "uint8":
            return self._scaled_sum_projection(function, op, var, value)
        if blocked_linear and self.scheme.integer_offsets:
            return self._residue_projection(function, op, var, value)
        return self._replace(function, op, var, value, is_embedding)

    def _replace(self, function, op, var, value, is_embedding) -> bool:
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import types

        cols = value.shape[1]
        if is_embedding and self.embedding == "int8":
            data, scale = _by_rows(int8_rows, value)
            new = mb.constexpr_blockwise_shift_scale(data=data, scale=scale.astype(value.dtype), before_op=op, name=op.name + "_int8")
        elif cols % self.block == 0 or (is_embedding and self.embedding == "row"):
            q, scale, offset = affine_blocks(value, cols if is_embedding and self.embedding == "row" else self.block)
            new = mb.constexpr_blockwise_shift_scale(
                data=q.astype(types.np_uint4_dtype), scale=scale.astype(value.dtype),
                offset=offset.astype(value.dtype), before_op=op, name=op.name + "_uint4")
        else:
            return False
        function.replace_uses_of_var_after_op(anchor_op=op, old_var=var, new_var=new, no_check_var_types=True)
        function.remove_ops([op])
        return True

    def _block_indicator(self, cols: int, before_op):
        """-1/16 at [b, k] for k in block b: linear(x, it) gives minus a sixteenth of each block's sum."""
        from coremltools.converters.mil import Builder as mb

        if cols not in self._indicators:
            indicator = np.zeros((cols // self.block, cols), np.float16)
            for b in range(cols // self.block):
                indicator[b, b * self.block:(b + 1) * self.block] = -1.0 / 16
            self._indicators[cols] = mb.const(val=indicator, before_op=before_op, name=f"block_sums_{cols}")
        return self._indicators[cols]

    def _residue_projection(self, function, op, var, value) -> bool:
        """uint4 codes with integer (uint4) offsets, plus the offsets' rounding residue.

        A block w = s * (q - z) with a fractional offset z (GGUF Q4_1, or any min/max fit) is
        s * (q - round(z)) - s * r with |r| <= 1/2. The first term is one constexpr_blockwise_shift_scale
        with uint4 offsets (4 bits per block where fp16 offsets take 16); r is stored as int4 sixteenths
        k = round(16 r), so the second term is s * k / 16 per (row, block), shared scale s. For an input
        x: x @ W.T = linear(x, s * (q - round(z))) + linear(-blocksum(x) / 16, s * k): two small
        linears and an add per projection. The residue's own rounding (|r - k/16| <= 1/32 of a step)
        is the only change to the weights.
        """
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import types

        q, scale, offset = affine_blocks(value, self.block)
        zero, k = integer_offsets(offset)
        dtype = value.dtype
        shared_scale = mb.const(val=scale.astype(dtype), before_op=op, name=op.name + "_scale")
        weight = mb.constexpr_blockwise_shift_scale(
            data=q.astype(types.np_uint4_dtype), scale=shared_scale, offset=zero.astype(types.np_uint4_dtype),
            before_op=op, name=op.name + "_uint4")
        residue = mb.constexpr_blockwise_shift_scale(
            data=k.astype(types.np_int4_dtype), scale=shared_scale, before_op=op, name=op.name + "_residue")
        indicator = self._block_indicator(value.shape[1], op)
        for child in list(var.child_ops):
            kwargs = {"bias": child.bias} if child.bias is not None else {}
            main = mb.linear(x=child.x, weight=weight, before_op=child, name=child.name + "_q", **kwargs)
            sums = mb.linear(x=child.x, weight=indicator, before_op=child, name=child.name + "_block_sums")
            correction = mb.linear(x=sums, weight=residue, before_op=child, name=child.name + "_residue")
            out = mb.add(x=main, y=correction, before_op=child, name=child.name + "_sum")
            function.replace_uses_of_var_after_op(anchor_op=child, old_var=child.outputs[0], new_var=out)
            function.remove_ops([child])
        function.remove_ops([op])
        return True

    def _shared_const(self, value: np.ndarray, name: str, before_op):
        """One const per value and function (shapes, per-tensor scales): the spec stores each const op."""
        from coremltools.converters.mil import Builder as mb

        key = (name, value.dtype.str, value.shape, value.tobytes())
        if key not in self._indicators:
            self._indicators[key] = mb.const(val=value, before_op=before_op, name=f"{name}_{len(self._indicators)}")
        return self._indicators[key]

    def _scaled_sum_projection(self, function, op, var, value) -> bool:
        """int4 codes with the block scales in 8 bits: the scale multiplies each block's partial sum.

        constexpr_blockwise_shift_scale takes fp16 scales per block (0.5 bit a weight at blocks of 32, 6.6 MB
        for SmolLM2). Written out per block instead, x @ W.T = sum_b s_b * (x_b @ (q_b - 8) - (z_b - 8) * sum(x_b)):
        one matmul batched over the blocks ([blocks, M, 32] @ [blocks, 32, N], int4 codes with a per-tensor
        scale of 1), the block sums, then the offsets (uint8 sixteenths) and the scales (uint8 codes into a
        per-tensor fp16 table, constexpr_lut_to_dense) as elementwise ops on [blocks, M, N] and a sum over
        the blocks. Weights stay compressed and decoding reads 4.5 bits a weight (5 by default, 4.75 with --integer-offsets);
        the cost is a [blocks, M, N] intermediate (on-chip-sized when decoding one token; M tokens x that in prefill).
        Codes are centred (q - 8, z - 8) so the fp16 partial sums do not cancel.
        """
        rows = value.shape[0]
        out_shapes = _flexible_out_shapes(var, rows)
        if out_shapes is None:
            return False  # (not reached for the wrappers here: one flexible dimension at most)
        parts = self._scaled_sum_weights(op, value)
        for child in list(var.child_ops):
            out = self._scaled_sum_child(child, parts, out_shapes[id(child)])
            function.replace_uses_of_var_after_op(anchor_op=child, old_var=child.outputs[0], new_var=out)
            function.remove_ops([child])
        function.remove_ops([op])
        return True

    def _scaled_sum_weights(self, op, value) -> _ScaledSumWeights:
        """The compressed weight and the shared constants every consumer of `value` reads (before `op`)."""
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import types

        rows, cols = value.shape
        blocks, dtype = cols // self.block, value.dtype
        q, codes, table, zero16 = scaled_blocks(value, self.block)
        data = (q.reshape(rows, blocks, self.block).astype(np.int8) - 8).transpose(1, 2, 0)  # [blocks, 32, N]
        one = self._shared_const(np.ones((1, 1, 1), dtype), "unit_scale", op)
        weight = mb.constexpr_blockwise_shift_scale(data=data.astype(types.np_int4_dtype), scale=one,
                                                    before_op=op, name=op.name + "_int4")
        scales = mb.constexpr_lut_to_dense(indices=codes.T.reshape(blocks, 1, rows), lut=table.astype(dtype).reshape(1, 1, 1, 256, 1),
                                           before_op=op, name=op.name + "_scales")
        sixteenth = self._shared_const(np.full((1, 1, 1), 1 / 16, dtype), "sixteenth", op)
        centre = self._shared_const(np.full((1, 1, 1), 136, np.uint8), "offset_centre", op)
        offsets = mb.constexpr_blockwise_shift_scale(data=zero16.T.reshape(blocks, 1, rows), scale=sixteenth, offset=centre,
                                                     before_op=op, name=op.name + "_offsets")
        split = self._shared_const(np.array([-1, blocks, self.block], np.int32), "block_shape", op)
        perm = self._shared_const(np.array([1, 0, 2], np.int32), "block_perm", op)
        last, first = self._shared_const(np.array([-1], np.int32), "axis_last", op), self._shared_const(np.array([0], np.int32), "axis_first", op)
        return _ScaledSumWeights(weight, scales, offsets, split, perm, last, first)

    @staticmethod
    def _scaled_sum_child(child, parts: _ScaledSumWeights, out_shape: list[int]):
        """The ops replacing one linear consumer: per-block partial sums, offsets and scales, summed over blocks."""
        from coremltools.converters.mil import Builder as mb

        name, x = child.name, child.x
        blocked = mb.transpose(x=mb.reshape(x=x, shape=parts.split, before_op=child, name=name + "_b"), perm=parts.perm,
                               before_op=child, name=name + "_bt")
        partial = mb.matmul(x=blocked, y=parts.weight, before_op=child, name=name + "_bp")
        sums = mb.reduce_sum(x=blocked, axes=parts.last, keep_dims=True, before_op=child, name=name + "_bs")
        shifted = mb.sub(x=partial, y=mb.mul(x=sums, y=parts.offsets, before_op=child, name=name + "_bo"),
                         before_op=child, name=name + "_bz")
        total = mb.reduce_sum(x=mb.mul(x=shifted, y=parts.scales, before_op=child, name=name + "_bd"), axes=parts.first,
                              keep_dims=False, before_op=child, name=name + "_br")
        out = mb.reshape(x=total, shape=np.array(out_shape, np.int32), before_op=child, name=name + "_by")
        if child.bias is not None and (child.bias.val is None or np.any(child.bias.val)):  # zero biases: no op
            out = mb.add(x=out, y=child.bias, before_op=child, name=name + "_bb")
        return out

    def _split_table(self, function, op, var, value) -> bool:
        """Tied table in two parts: ids < F in int8 per block of 32, the rest 3-bit (see lut3_blocks).

        Lookups become two gathers and a select; the logits two linears and a concat.
        """
        f, block = self.scheme.split_rows, self.scheme.split_block
        rows, cols = value.shape
        if not 0 < f < rows or cols % block or cols % 32:
            return False
        if any(c.op_type == "gather" and int(c.axis.val) not in (0, -2) for c in var.child_ops):
            return False
        table = self._program_split_table(value)
        frequent, rare = self._split_parts(op, table, value.dtype)
        for child in list(var.child_ops):
            if child.op_type == "gather":
                out = _split_lookup(child, frequent, rare, f)
            else:
                out = _split_logits(child, frequent, rare, f)
            function.replace_uses_of_var_after_op(anchor_op=child, old_var=child.outputs[0], new_var=out)
            function.remove_ops([child])
        function.remove_ops([op])
        return True

    def _program_split_table(self, value) -> SplitTable:
        """The split table for the program's table `value`: the one given (checked to be this table), else fitted here."""
        f, block = self.scheme.split_rows, self.scheme.split_block
        rows, cols = value.shape
        table = self.split_table if self.split_table is not None else fit_split_table(
            value, f, block, self.column_weights, self.scheme.split_bits, self.scheme.split_levels)
        if table.frequent.shape[0] != f or table.frequent.shape[0] + table.index.shape[0] != rows or table.index.shape[1] != cols:
            raise ValueError(f"the fitted split table does not match the program's table {value.shape} (split at {f})")
        if self.split_table is not None:  # fitted outside from the PyTorch weights: it must be this table
            error = np.sqrt(np.mean((table.dense() - value.astype(np.float32)) ** 2)) / max(float(np.std(value.astype(np.float32))), 1e-12)
            if error > 0.5:
                raise ValueError(f"the fitted split table is not the program's table (relative RMS error {error:.2f})")
        return table

    @staticmethod
    def _split_parts(op, table: SplitTable, dtype):
        """The table's two parts as constexpr weights (before `op`): int8 frequent rows, and the rare rows' levels
        (uint4 codes when uniform, else indices through a LUT) with their per-block scale and offset."""
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import types

        data8, scale8, index, scale3, offset3 = table.frequent, table.frequent_scale, table.index, table.scale, table.offset
        frequent = mb.constexpr_blockwise_shift_scale(data=data8, scale=scale8.astype(dtype), before_op=op, name=op.name + "_frequent")
        count = len(table.levels)
        index_type = {8: types.np_uint3_dtype, 16: types.np_uint4_dtype}[count]
        if table.uniform:  # the codes themselves: uint4 data with the per-block scale and offset (iOS 18)
            levels = index.astype(index_type)
        else:
            levels = mb.constexpr_lut_to_dense(indices=index.astype(index_type), lut=table.levels.astype(np.int8).reshape(1, 1, count, 1),
                                               before_op=op, name=op.name + "_levels")
        rare = mb.constexpr_blockwise_shift_scale(data=levels, scale=scale3.astype(dtype), offset=offset3.astype(dtype),
                                                  before_op=op, name=op.name + "_rare")
        return frequent, rare


def _make_pass_class():
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    class _Pass(_Int4BlockRewrites, AbstractGraphPass):
        pass

    return _Pass


def _split_lookup(child, frequent, rare, f: int):
    """A gather from the split table: both parts gathered with clamped ids, the right one selected per id."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    ids = child.indices  # coremltools may have narrowed them (uint16): compare in int32
    if ids.dtype != types.int32:
        ids = mb.cast(x=ids, dtype="int32", before_op=child, name=child.name + "_ids_int32")
    first = mb.minimum(x=ids, y=np.int32(f - 1), before_op=child, name=child.name + "_ids_frequent")
    shifted = mb.sub(x=ids, y=np.int32(f), before_op=child, name=child.name + "_ids_shift")
    second = mb.maximum(x=shifted, y=np.int32(0), before_op=child, name=child.name + "_ids_rare")
    a = mb.gather(x=frequent, indices=first, axis=0, before_op=child, name=child.name + "_frequent")
    b = mb.gather(x=rare, indices=second, axis=0, before_op=child, name=child.name + "_rare")
    is_frequent = mb.less(x=ids, y=np.int32(f), before_op=child, name=child.name + "_is_frequent")
    cond = mb.expand_dims(x=is_frequent, axes=[-1], before_op=child, name=child.name + "_cond")
    return mb.select(cond=cond, a=a, b=b, before_op=child, name=child.name + "_split")


def _split_logits(child, frequent, rare, f: int):
    """A linear on the split table: the logits of both parts, concatenated in id order."""
    from coremltools.converters.mil import Builder as mb

    kwargs_a = {"bias": mb.const(val=child.bias.val[:f], before_op=child)} if child.bias is not None else {}
    kwargs_b = {"bias": mb.const(val=child.bias.val[f:], before_op=child)} if child.bias is not None else {}
    a = mb.linear(x=child.x, weight=frequent, before_op=child, name=child.name + "_frequent", **kwargs_a)
    b = mb.linear(x=child.x, weight=rare, before_op=child, name=child.name + "_rare", **kwargs_b)
    return mb.concat(values=[a, b], axis=-1, before_op=child, name=child.name + "_split")


def _flexible_out_shapes(var, rows: int) -> dict | None:
    """Output shape per consumer of `var` (by id), its one flexible dimension (if any) as -1; None for more than one."""
    out_shapes = {}
    for child in var.child_ops:
        lead = list(child.x.shape[:-1])
        symbolic = [i for i, d in enumerate(lead) if not isinstance(d, (int, np.integer))]
        if len(symbolic) > 1:
            return None
        out_shapes[id(child)] = [-1 if i in symbolic else int(d) for i, d in enumerate(lead)] + [rows]
    return out_shapes


def _compressible_weight(op):
    """The output var of a 2-D float const that feeds only weight inputs of linear/matmul/gather, else None."""
    if op.op_type != "const" or op.outputs[0].val is None:
        return None
    var = op.outputs[0]
    children = var.child_ops
    value = var.val
    if not children or not isinstance(value, np.ndarray) or value.ndim != 2 or value.dtype.kind != "f":
        return None
    if any(c.op_type not in WEIGHT_CONSUMERS or not _is_weight_input(c, var) for c in children):
        return None
    return var


def _is_weight_input(child, var) -> bool:
    if child.op_type == "linear":
        return child.weight is var
    if child.op_type == "gather":
        return child.x is var
    return child.op_type == "matmul"


def AffineBlockInt4Pass(scheme: CompressionScheme, column_weights=None, split_table=None):  # noqa: N802  (a class built lazily: coremltools imports)
    return _make_pass_class()(scheme, column_weights, split_table)
