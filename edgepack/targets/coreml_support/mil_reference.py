"""A reference interpreter for Core ML ML Programs, for hosts where Core ML cannot run (Linux CI).

The saved `.mlpackage` is read back into coremltools' Python MIL (`milproto` loader), then the main
function's ops are executed in order: each op's own `value_inference()` (the numpy semantics
coremltools uses for constant folding) computes its outputs from the values of its inputs, with small
numpy kernels below for the ops coremltools has none for (states) or whose numpy version would be
needlessly slow in fp16 (matrix products).

Memory: compressed weights (constexpr ops) stay compressed. Decompressed values are kept across calls
up to `MILProgram.cache_bytes` (1 GiB by default: all of a ~0.5B-parameter model's); past that a weight
is decompressed when an op reads it and dropped once that op has run. Every other value is freed
after its last reader. So the interpreter holds the compressed program, at most the cache, one dense
weight and the live activations, whatever the model's size.

Numerics: every op output is stored in the op's declared dtype, so an fp16 program keeps fp16
intermediates (overflow to inf, fp16 rounding) as Core ML does; matrix products and reductions
accumulate in fp32 and round the result to fp16, like the Neural Engine and GPU. It is a reference for
what the program computes, not a simulation of any device's exact rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class _Value:
    """Stands in for coremltools' builtin value holder: `Var.val` reads `._sym_val.val`."""

    __slots__ = ("val",)

    def __init__(self, val):
        self.val = val


@dataclass
class MILProgram:
    """A loaded ML Program and the state it carries between calls (KV cache)."""

    function: object
    states: dict[str, np.ndarray] = field(default_factory=dict)
    state_types: dict[str, tuple[tuple[int, ...], np.dtype]] = field(default_factory=dict)
    missing_kernels: set[str] = field(default_factory=set)
    last_uses: dict[int, list[int]] | None = None  # op index -> values no later op reads (freed after it runs)
    cache_bytes: int = 1 << 30  # decompressed constexpr outputs kept across calls, up to this many bytes
    decompressed: dict[int, np.ndarray] = field(default_factory=dict)  # id(var) -> its decompressed value

    def reset(self) -> None:
        # In place: the functions of one package share this dict (see load_functions).
        self.states.clear()
        self.states.update({name: np.zeros(shape, dtype) for name, (shape, dtype) in self.state_types.items()})

    def input_names(self) -> list[str]:
        return list(self.function.inputs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_function(self, feeds)


def load_program(package: Path | str, function_name: str = "main") -> MILProgram:
    return load_functions(package, (function_name,))[function_name]


def function_names(package: Path | str) -> list[str]:
    """The functions of a saved package: ["main"], or a multifunction package's names (default first)."""
    from edgepack.targets.coreml_support import compat

    compat.quiet()
    import coremltools as ct

    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    functions = [f.name for f in spec.description.functions]
    if not functions:
        return ["main"]
    default = spec.description.defaultFunctionName
    return [default] + [name for name in functions if name != default]


def load_functions(package: Path | str, names) -> dict[str, MILProgram]:
    """Several functions of one package, read once, sharing one state (the KV cache of a multifunction
    package is one state that its prefill and decode functions both read and write)."""
    from edgepack.targets.coreml_support import compat

    compat.quiet()
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
    from coremltools.converters.mil.mil import types

    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    program = load_milproto(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
    states: dict[str, np.ndarray] = {}
    result = {}
    for function_name in names:
        function = program.functions[function_name]
        loaded = MILProgram(function=function, states=states)
        for name, var in function.inputs.items():
            if types.is_state(var.sym_type):
                wrapped = var.sym_type.wrapped_type()
                shape = tuple(int(d) for d in wrapped.get_shape())
                loaded.state_types[name] = (shape, types.nptype_from_builtin(wrapped.get_primitive()))
        loaded.reset()
        result[function_name] = loaded
    return result


def _np_dtype(var):
    from coremltools.converters.mil.mil import types

    try:
        if types.is_tensor(var.sym_type):
            return types.nptype_from_builtin(var.sym_type.get_primitive())
        return types.nptype_from_builtin(var.sym_type)
    except Exception:
        return None


def _f32(x):
    return np.asarray(x, dtype=np.float32)


def _linear(op, get):
    x, w = _f32(get(op.x)), _f32(get(op.weight))
    y = x @ w.T
    if op.bias is not None:
        y = y + _f32(get(op.bias))
    return y


def _matmul(op, get):
    x, y = _f32(get(op.x)), _f32(get(op.y))
    if op.transpose_x.val:
        x = np.swapaxes(x, -1, -2)
    if op.transpose_y.val:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _sdpa(op, get):
    q, k, v = _f32(get(op.query)), _f32(get(op.key)), _f32(get(op.value))
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.sqrt(q.shape[-1])
    if op.attn_mask is not None:
        mask = get(op.attn_mask)
        if mask.dtype == np.bool_:
            scores = np.where(mask, scores, -np.inf)
        else:
            scores = scores + _f32(mask)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.matmul(weights, v)


def _softmax(op, get):
    x = _f32(get(op.x))
    axis = int(op.axis.val)
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _gather(op, get):
    x, idx = get(op.x), np.asarray(get(op.indices)).astype(np.int64)
    axis = int(op.axis.val)
    if axis < 0:
        axis += x.ndim
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    batch = int(op.batch_dims.val) if getattr(op, "batch_dims", None) is not None else 0
    if batch:
        raise NotImplementedError("gather with batch_dims")
    return np.take(x, idx, axis=axis)


def _shape(op, get):
    return np.array(get(op.x).shape, dtype=np.int32)


def _reduce(fn):
    def kernel(op, get):
        x = get(op.x)
        axes = None if op.axes is None else tuple(int(a) for a in np.atleast_1d(op.axes.val))
        keep = bool(op.keep_dims.val) if op.keep_dims is not None else False
        return fn(_f32(x), axis=axes, keepdims=keep)

    return kernel


def _binary(fn):
    """Elementwise float arithmetic in fp32, stored in the op's dtype by the caller: the same result as
    numpy's fp16 ufuncs (which compute in fp32 too), without their slow fp16 loops (a 1024-token prefill
    through per-block partial sums is mostly elementwise work). Integer inputs: the op's own value inference."""

    def kernel(op, get):
        x, y = get(op.x), get(op.y)
        if np.asarray(x).dtype.kind != "f" or np.asarray(y).dtype.kind != "f":
            return None
        return fn(_f32(x), _f32(y))

    return kernel


def _layer_norm(op, get):
    x = _f32(get(op.x))
    axes = tuple(int(a) for a in np.atleast_1d(op.axes.val)) if op.axes is not None else (-1,)
    eps = float(op.epsilon.val) if op.epsilon is not None else 1e-5
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if op.gamma is not None:
        y = y * _f32(get(op.gamma))
    if op.beta is not None:
        y = y + _f32(get(op.beta))
    return y


def _reshape(op, get):
    x = get(op.x)
    shape = [int(d) for d in np.atleast_1d(get(op.shape))]
    shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return np.reshape(x, shape)


def _silu(op, get):
    x = _f32(get(op.x))
    return x / (1.0 + np.exp(-x))


def _sigmoid(op, get):
    return 1.0 / (1.0 + np.exp(-_f32(get(op.x))))


def _gelu(op, get):
    x = _f32(get(op.x))
    mode = op.mode.val if op.mode is not None else "EXACT"
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf, otypes=[np.float32])(x / np.sqrt(2.0)))


def _relu(op, get):
    return np.maximum(get(op.x), 0)


def _read_state(op, get, program):
    return program.states[op.input.name]


def _update_state(op, get, program):
    value = get(op.value)
    program.states[op.state.name] = np.array(value, copy=True)
    return value


# Ops computed here rather than by value_inference: states (no value inference exists), and matrix
# products/normalisations that numpy would run in slow fp16 loops (accumulate in fp32 instead).
KERNELS = {
    "linear": _linear,
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "matmul": _matmul,
    "scaled_dot_product_attention": _sdpa,
    "softmax": _softmax,
    "gather": _gather,
    "shape": _shape,
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),  # numpy 2.4 refuses coremltools' np.bool_ keepdims in value_inference
    "reduce_min": _reduce(np.min),
    "layer_norm": _layer_norm,
    "reshape": _reshape,
    "silu": _silu,
    "sigmoid": _sigmoid,
    "gelu": _gelu,
    "relu": _relu,
}
STATE_KERNELS = {"read_state": _read_state, "coreml_update_state": _update_state}


def run_function(program: MILProgram, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from coremltools.converters.mil.mil import types

    function = program.function
    env: dict[int, np.ndarray] = {}

    def get(var):
        key = id(var)
        if key in env:
            return env[key]
        if var.val is not None:  # a constant
            return var.val
        if var.op is not None and var.op.op_type.startswith("constexpr_"):
            return _cached_decompress(program, var)
        raise RuntimeError(f"MIL reference: no value for {var.name}")

    for name, var in function.inputs.items():
        if types.is_state(var.sym_type):
            continue
        if name not in feeds:
            raise KeyError(f"missing input {name}")
        env[id(var)] = np.asarray(feeds[name]).astype(_np_dtype(var))

    released = _last_uses(program)
    for index, op in enumerate(function.operations):
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            continue  # constants; compressed ones are decompressed by `get` when an op reads them
        if op.op_type in STATE_KERNELS:
            outputs = STATE_KERNELS[op.op_type](op, get, program)
        else:  # a kernel returns None for inputs it does not take (integer arithmetic): the generic paths then
            outputs = KERNELS[op.op_type](op, get) if op.op_type in KERNELS else None
        if outputs is None:
            outputs = _value_inference(op, get, program)
        if not isinstance(outputs, (tuple, list)):
            outputs = (outputs,)
        for var, value in zip(op.outputs, outputs):
            dtype = _np_dtype(var)
            value = np.asarray(value)
            if dtype is not None and value.dtype != dtype:
                with np.errstate(over="ignore", invalid="ignore"):
                    value = value.astype(dtype)
            env[id(var)] = value
        for key in released.get(index, ()):
            env.pop(key, None)
    return {var.name: get(var) for var in function.outputs}


def _cached_decompress(program: MILProgram, var) -> np.ndarray:
    key = id(var)
    if key in program.decompressed:
        return program.decompressed[key]
    value = _decompress(var)
    if sum(v.nbytes for v in program.decompressed.values()) + value.nbytes <= program.cache_bytes:
        program.decompressed[key] = value
    return value


def _decompress(var) -> np.ndarray:
    """The dense value of a constexpr op's output (a compressed weight), in its declared dtype."""
    op = var.op
    kernel = DECOMPRESS_KERNELS.get(op.op_type)
    value = kernel(op) if kernel is not None else None
    if value is None:
        value = op.materialized_val_inference() if hasattr(op, "materialized_val_inference") else op.value_inference()
    if isinstance(value, (tuple, list)):
        value = value[list(op.outputs).index(var)]
    value = np.asarray(value)
    dtype = _np_dtype(var)
    return value if dtype is None or value.dtype == dtype else value.astype(dtype)


def _const_value(var) -> np.ndarray:
    return np.asarray(var.val if var.val is not None else _decompress(var))


def _blocked_views(shape: tuple, grid: tuple):
    """Reshapes that make a per-block parameter of shape `grid` broadcast against data of `shape`: an axis
    the grid divides into blocks becomes (blocks, block size) in the data and (blocks, 1) in the parameter.
    Returns (data view, parameter view of an axis-by-axis shape) as functions of the parameter's shape."""
    view = []
    for size, blocks in zip(shape, grid):
        view += [size] if blocks in (1, size) else [blocks, size // blocks]

    def param_view(param_shape):
        out = []
        for size, blocks, n in zip(shape, grid, param_shape):
            out += [n] if blocks in (1, size) else [n, 1]
        return out

    return view, param_view


def _shift_scale(op) -> np.ndarray | None:
    """constexpr_blockwise_shift_scale: scale * (data - offset). The same values as coremltools' own
    decompression (numpy fp16 arithmetic rounds each op's result to fp16: so does this, after exact fp32
    steps), on block views of the data where coremltools repeats scale and offset to full size in fp16,
    which costs numpy a full-size fp16 copy of scale and offset for every weight."""
    data = _const_value(op.data)
    scale = _const_value(op.scale)
    offset = None if op.offset is None else _const_value(op.offset)
    if data.ndim != scale.ndim or (offset is not None and offset.ndim != data.ndim):
        return None
    out_dtype = scale.dtype
    view, param_view = _blocked_views(data.shape, scale.shape)
    x = data.reshape(view).astype(np.float32)
    if offset is not None:
        x -= offset.reshape(param_view(offset.shape)).astype(np.float32)
        x = x.astype(out_dtype).astype(np.float32)  # the fp16 subtraction's rounding
    x *= scale.reshape(param_view(scale.shape)).astype(np.float32)
    return x.astype(out_dtype).reshape(data.shape)


def _lut_to_dense(op) -> np.ndarray | None:
    """constexpr_lut_to_dense with scalar entries: each index looked up in its block's table. coremltools'
    own decompression repeats every block's table for every element first (16 entries an element for 4
    bits: a 2k x 128k table needs 8 GB); this indexes the tables by block in place."""
    indices, lut = _const_value(op.indices), _const_value(op.lut)
    if lut.ndim != indices.ndim + 2 or lut.shape[-1] != 1:
        return None  # vector palettization: coremltools' own
    grid = lut.shape[:-2]
    view, param_view = _blocked_views(indices.shape, grid)
    table = lut[..., 0].reshape(param_view(grid) + [lut.shape[-2]])
    index = []
    for axis, n in enumerate(table.shape[:-1]):
        shape = [1] * len(view)
        shape[axis] = n
        index.append(np.zeros(shape, np.intp) if n == 1 else np.arange(n).reshape(shape))
    index.append(indices.reshape(view).astype(np.intp))
    return table[tuple(index)].reshape(indices.shape)


DECOMPRESS_KERNELS = {"constexpr_blockwise_shift_scale": _shift_scale, "constexpr_lut_to_dense": _lut_to_dense}


def _last_uses(program: MILProgram) -> dict[int, list[int]]:
    """Which values each op reads for the last time. Freeing them keeps the interpreter's memory at the
    live activations: a 1024-token prefill through per-block partial sums ([blocks, tokens, N] per
    projection, --block-scales uint8) otherwise holds tens of GB. Programs with nested blocks free nothing."""
    if program.last_uses is None:
        operations = list(program.function.operations)
        last: dict[int, int] = {}
        if not any(op.blocks for op in operations):
            for index, op in enumerate(operations):
                for value in op.inputs.values():
                    for var in value if isinstance(value, (list, tuple)) else (value,):
                        if var is not None:
                            last[id(var)] = index
        keep = {id(var) for var in program.function.outputs}
        program.last_uses = {}
        for key, index in last.items():
            if key not in keep:
                program.last_uses.setdefault(index, []).append(key)
    return program.last_uses


def _value_inference(op, get, program):
    """Run the op's own value_inference with its inputs' values put where it reads them."""
    from coremltools.converters.mil.mil import types

    saved = []
    try:
        for var in _input_vars(op):
            try:
                value = get(var)
            except RuntimeError:
                continue
            saved.append((var, var._sym_val, var._sym_type))
            var._sym_val = _Value(value)
            if types.is_tensor(var._sym_type) and isinstance(value, np.ndarray):
                # Concrete shapes for flexible (symbolic) dimensions: value inference reads `x.shape`.
                var._sym_type = types.tensor(var._sym_type.get_primitive(), value.shape)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                result = op.value_inference()
            except NotImplementedError:
                result = None
        if result is None:
            program.missing_kernels.add(op.op_type)
            raise NotImplementedError(f"MIL reference: no value inference for op {op.op_type} ({op.name})")
        return result
    finally:
        for var, old_val, old_type in saved:
            var._sym_val, var._sym_type = old_val, old_type


def _input_vars(op):
    seen = []
    for value in op.inputs.values():
        for var in value if isinstance(value, (list, tuple)) else (value,):
            if var is not None and var.op is not None and var.op.op_type == "const":
                continue
            seen.append(var)
    return seen
