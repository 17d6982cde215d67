"""Core ML target in bounded memory: the MIL reference's decompression kernels compute exactly what
coremltools' own do, and the fp16 cast pass's range checks decide as coremltools 9.0's do without
indexing whole weights. (The bounded decompression cache is checked in test_coreml.py on an int4 package.)"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("coremltools")


def _constexpr_program():
    """A MIL function whose outputs are decompressed constexpr weights of every layout the int4-block pass writes."""
    from edgepack.targets.coreml_support import compat

    compat.apply()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    rng = np.random.default_rng(0)
    q4 = rng.integers(0, 16, (48, 96)).astype(types.np_uint4_dtype)
    scale = rng.uniform(1e-3, 0.05, (48, 3)).astype(np.float16)
    offset = rng.uniform(0, 15, (48, 3)).astype(np.float16)
    int8 = rng.integers(-127, 128, (40, 64)).astype(np.int8)
    row_scale = rng.uniform(1e-3, 0.05, (40, 1)).astype(np.float16)
    codes = rng.integers(0, 256, (3, 1, 48)).astype(np.uint8)
    lut = np.sort(rng.uniform(1e-3, 0.1, (1, 1, 1, 256, 1))).astype(np.float16)
    index = rng.integers(0, 8, (30, 64)).astype(types.np_uint3_dtype)
    levels = rng.integers(-127, 128, (2, 1, 8, 1)).astype(np.int8)  # a table per block of 15 rows
    rare_scale = rng.uniform(1e-3, 0.05, (30, 4)).astype(np.float16)
    rare_offset = rng.uniform(-2, 2, (30, 4)).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=__import__("coremltools").target.iOS18)
    def prog(x):
        blocks = mb.constexpr_blockwise_shift_scale(data=q4, scale=scale, offset=offset, name="blocks")
        channels = mb.constexpr_blockwise_shift_scale(data=int8, scale=row_scale, name="channels")
        coded = mb.constexpr_lut_to_dense(indices=codes, lut=lut, name="coded")
        offsets = mb.constexpr_blockwise_shift_scale(data=codes, scale=np.full((1, 1, 1), 1 / 16, np.float16),
                                                     offset=np.full((1, 1, 1), 136, np.uint8), name="offsets")
        rare = mb.constexpr_blockwise_shift_scale(data=mb.constexpr_lut_to_dense(indices=index, lut=levels, name="levels"),
                                                  scale=rare_scale, offset=rare_offset, name="rare")
        return blocks, channels, coded, offsets, rare

    return prog.functions["main"]


def test_decompression_kernels_match_coremltools_bit_for_bit():
    from edgepack.targets.coreml_support.mil_reference import _decompress

    function = _constexpr_program()
    for var in function.outputs:
        expected = np.asarray(var.op.materialized_val_inference())
        got = _decompress(var)
        assert got.dtype == expected.dtype and got.shape == expected.shape, var.name
        assert np.array_equal(got.view(np.uint16), expected.view(np.uint16)) if got.dtype == np.float16 else np.array_equal(got, expected), var.name


def test_fp16_overflow_check_decides_as_coremltools_9():
    from edgepack.targets.coreml_support import compat

    def coremltools_9(value):  # coremltools 9.0's test, which indexes the whole array
        abs_value = np.abs(np.expand_dims(value, 0))
        return bool(np.max(abs_value[np.where(abs_value < 1e38)], initial=0.0) > 65504)

    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, (3, 1000)).astype(np.float32)
    cases = [base, np.float32(7.0), np.float32(70000.0), np.array([], np.float32)]
    for special in (65504.0, 65505.0, -70000.0, np.inf, -np.inf, np.nan, 1e38, -3.4e38, 2e5):
        value = base.copy()
        value[2, 999] = special
        cases.append(value)
    for value in cases:
        assert compat._fp16_overflows(value) == coremltools_9(value), value
    chunked = np.zeros(3 * compat._CHUNK, np.float32)
    chunked[-1] = 1e5  # in the last chunk
    assert compat._fp16_overflows(chunked) and coremltools_9(chunked)

