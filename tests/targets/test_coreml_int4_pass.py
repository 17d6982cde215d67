"""The int4-block graph pass on a hand-built MIL program (no torch conversion: fast).

The program holds what the converted decoders hold: a table read by a gather and by a linear (tied
lm_head) and one projection. Each layout must produce the same ops, in the same order, with the same
names (the saved package is compared byte for byte across builds), and the weights the formulas say.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("coremltools")

SPLIT_LOOKUP = ("minimum:embed_ids_frequent sub:embed_ids_shift maximum:embed_ids_rare gather:embed_frequent gather:embed_rare "
                "less:embed_is_frequent expand_dims:embed_cond select:embed_split")
SCALED_SUM = ("constexpr_blockwise_shift_scale:w_int4 constexpr_lut_to_dense:w_scales constexpr_blockwise_shift_scale:w_offsets "
              "reshape:proj_b transpose:proj_bt matmul:proj_bp reduce_sum:proj_bs mul:proj_bo sub:proj_bz mul:proj_bd reduce_sum:proj_br "
              "reshape:proj_by")
SPLIT_LOGITS = "linear:logits_frequent linear:logits_rare concat:logits_split"
LAYOUTS = {
    "affine": ({}, "constexpr_blockwise_shift_scale:table_uint4 gather:embed constexpr_blockwise_shift_scale:w_uint4 linear:proj "
                   "slice_by_size:cut linear:logits"),
    "split+residue": (dict(embedding="split", split_rows=100, split_block=16, integer_offsets=True),
                      "constexpr_blockwise_shift_scale:table_frequent constexpr_lut_to_dense:table_levels "
                      f"constexpr_blockwise_shift_scale:table_rare {SPLIT_LOOKUP} constexpr_blockwise_shift_scale:w_uint4 "
                      "constexpr_blockwise_shift_scale:w_residue linear:proj_q linear:proj_block_sums linear:proj_residue add:proj_sum "
                      f"slice_by_size:cut {SPLIT_LOGITS}"),
    "int8-table+uint8-scales": (dict(block_scales="uint8", embedding="int8"),
                                f"constexpr_blockwise_shift_scale:table_int8 gather:embed {SCALED_SUM} slice_by_size:cut linear:logits"),
    "uniform-split+uint8-scales": (dict(embedding="split", split_rows=100, split_block=16, split_bits=4, split_levels="uniform", block_scales="uint8"),
                                   "constexpr_blockwise_shift_scale:table_frequent constexpr_blockwise_shift_scale:table_rare "
                                   f"{SPLIT_LOOKUP} {SCALED_SUM} slice_by_size:cut {SPLIT_LOGITS}"),
}


def _weights():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((160, 64)) * 0.05).astype(np.float16), (rng.standard_normal((96, 64)) * 0.05).astype(np.float16)


def _compressed_program(**scheme_options):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from edgepack.targets.coreml_support.convert import AffineBlockInt4Pass, CompressionScheme

    table, proj = _weights()

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4), dtype=types.int32)], opset_version=ct.target.iOS18)
    def prog(ids):
        t = mb.const(val=table, name="table")
        h = mb.gather(x=t, indices=ids, axis=0, name="embed")
        y = mb.linear(x=h, weight=mb.const(val=proj, name="w"), name="proj")
        return mb.linear(x=mb.slice_by_size(x=y, begin=[0, 0, 0], size=[1, 4, 64], name="cut"), weight=t, name="logits")

    graph_pass = AffineBlockInt4Pass(CompressionScheme("int4-block", **scheme_options))
    graph_pass(prog)
    assert graph_pass.replaced == 2  # the table and the projection
    return prog.functions["main"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_int4_block_pass_ops_in_order(layout):
    options, expected = LAYOUTS[layout]
    function = _compressed_program(**options)
    assert " ".join(f"{op.op_type}:{op.name}" for op in function.operations if op.op_type != "const") == expected


def test_int4_block_pass_weights_are_the_stored_projection():
    from edgepack.targets.coreml_support.convert import fit_split_table, stored_projection

    table, proj = _weights()
    ops = {op.name: op for op in _compressed_program().operations}
    assert np.allclose(ops["w_uint4"].materialized_val_inference(), stored_projection(proj.astype(np.float32), 32, False), atol=2e-3)
    assert np.allclose(ops["table_uint4"].materialized_val_inference(), stored_projection(table.astype(np.float32), 32, False), atol=2e-3)

    ops = {op.name: op for op in _compressed_program(embedding="split", split_rows=100, split_block=16, integer_offsets=True).operations}
    residue = ops["w_residue"].materialized_val_inference().astype(np.float32)  # s * k per (row, block), applied to -blocksum/16
    weight = ops["w_uint4"].materialized_val_inference().astype(np.float32) - np.repeat(residue, 32, axis=1) / 16
    assert np.allclose(weight, stored_projection(proj.astype(np.float32), 32, True), atol=2e-3)
    dense = np.concatenate([ops["table_frequent"].materialized_val_inference(), ops["table_rare"].materialized_val_inference()])
    assert np.allclose(dense, fit_split_table(table, 100, 16, None).dense(), atol=2e-3)
