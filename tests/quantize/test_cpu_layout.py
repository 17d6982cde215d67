"""cpu_layout: onnxruntime's MatMulNBits output re-expressed in the fast 4-bit layout, exactly.

Each rewrite is checked twice: the weights each MatMul site multiplies by (read by running the site on
an identity matrix, which makes A @ W = W exactly at accuracy_level 0) are bit-identical before and
after, and the whole model's logits equal the un-rewritten MatMulNBits model's within 1e-4.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest

from edgepack.quantize.cpu_layout import NBitsWeight, find_tied_embeddings, offset_columns, rewrite_for_cpu, snap_for_exact_layout
from edgepack.quantize.graph import lm_head_node, untie_lm_head, weight_matmuls
from edgepack.quantize.schemes import Int4, Int8Weight
from edgepack.quantize.weight_only import _run_quantizer, quantize_weight_only
from tests.quantize.test_gguf_import import run_logits

REL_TOL = 1e-4
PROMPT = [5, 17, 300, 42, 7, 99, 260, 3, 480, 11]


def quantized(folder, *, bits, algorithm, symmetric=True, accuracy_level=0):
    """The fp32 export with every weight MatMul (lm_head untied) through onnxruntime's quantizer, snapped."""
    model = onnx.load(str(folder / "model.onnx"))
    untie_lm_head(model)
    names = {n.name for n in weight_matmuls(model)}
    model = _run_quantizer(model, bits=bits, block_size=32, symmetric=symmetric, accuracy_level=accuracy_level,
                           algorithm=algorithm, include=names)
    snap_for_exact_layout(model)
    return model


def run_cut(model, source: str, target: str, value: np.ndarray) -> np.ndarray:
    """Run the part of `model` between tensor `source` (fed `value`) and tensor `target`."""
    import onnxruntime as ort
    from onnx import helper

    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    nodes, seen, stack = [], set(), [target]
    while stack:
        name = stack.pop()
        if name == source or name in inits or name in seen or name not in producers:
            continue
        seen.add(name)
        node = producers[name]
        if node not in nodes:
            nodes.append(node)
            stack.extend(i for i in node.input if i)
    order = [n for n in model.graph.node if n in nodes]
    used = {i for n in order for i in n.input}
    dtype = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    graph = helper.make_graph(
        order, "cut", [helper.make_tensor_value_info(source, dtype, list(value.shape))],
        [helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None)],
        [inits[n] for n in used if n in inits],
    )
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {source: value})[0]


def weights_at(model, outputs: dict[str, tuple[str, int]]) -> dict[str, np.ndarray]:
    """{output: W [K, N]}: each (A input -> output) site run on A = eye(K), which gives W exactly at level 0."""
    return {y: run_cut(model, a, y, np.eye(k, dtype=np.float32)[None])[0] for y, (a, k) in outputs.items()}


def matmul_sites(model) -> dict[str, tuple[str, int]]:
    return {
        n.output[0]: (n.input[0], next(a.i for a in n.attribute if a.name == "K"))
        for n in model.graph.node if n.op_type == "MatMulNBits"
    }


def logits(model, folder, tmp_path, name):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    config = json.loads((folder / "config.json").read_text())
    return run_logits(path, config, PROMPT)


def assert_same_logits(ref, got):
    (ref_logits, ref_tokens), (got_logits, got_tokens) = ref, got
    rel = float(np.abs(got_logits - ref_logits).max() / np.abs(ref_logits).max())
    assert rel <= REL_TOL, f"max |logit diff| / max |logit| = {rel:.2e}"
    assert got_tokens == ref_tokens


def ops(model) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in model.graph.node:
        out.setdefault(node.op_type, []).append(node)
    return out


def attr(node, name, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


@pytest.mark.parametrize(
    "case, bits, algorithm, symmetric, fact",
    [
        ("hqq-float-zero-points", 4, "hqq", False, "float_zero_points"),
        ("rtn-8bit-symmetric", 8, "rtn", True, "split_8bit"),
        ("rtn-8bit-uint8-zero-points", 8, "rtn", False, "split_8bit"),
    ],
)
def test_rewrite_is_exact(case, bits, algorithm, symmetric, fact, exported_tiny_factory, tmp_path):
    folder = exported_tiny_factory("llama")
    reference = quantized(folder, bits=bits, algorithm=algorithm, symmetric=symmetric)
    sites = matmul_sites(reference)
    model = copy.deepcopy(reference)
    facts = rewrite_for_cpu(model)
    onnx.checker.check_model(model)
    assert facts["not_exact"] == [] and facts["skipped"] == []
    assert facts[fact] == len(sites) and facts["unchanged"] == 0

    # Only 4-bit MatMulNBits with integer / default zero points remain: the fast kernel.
    for node in ops(model)["MatMulNBits"]:
        assert attr(node, "bits") == 4
        zero = node.input[3] if len(node.input) > 3 else ""
        assert not zero or not any(i.name == zero and i.data_type == onnx.TensorProto.FLOAT for i in model.graph.initializer)
    if fact == "split_8bit":
        assert len(ops(model)["MatMulNBits"]) == 2 * len(sites)
    if fact == "float_zero_points" or case.endswith("uint8-zero-points"):
        # the block-minimum term: one offset MatMul per weight, block sums shared by weights reading one input
        matmuls = [n.name for n in ops(model)["MatMul"]]
        assert sum(name.endswith("_OffsetMatMul") for name in matmuls) == len(sites)
        distinct_inputs = set(sites.values())  # (activation, K) pairs
        assert sum(name.startswith("BlockSum_") for name in matmuls) == len(distinct_inputs) < len(sites)
    # Snapped scales are fp16-exact: stored as fp16.
    assert facts["fp16_scale_tensors"] >= len(sites)

    before, after = weights_at(reference, sites), weights_at(model, sites)
    for y in sites:
        assert before[y].dtype == after[y].dtype == np.float32
        assert np.array_equal(before[y], after[y]), y  # every value identical (0.0 and -0.0 compare equal)
    assert_same_logits(logits(reference, folder, tmp_path, "ref"), logits(model, folder, tmp_path, "new"))


def test_snap_is_tiny_and_idempotent(exported_tiny_factory):
    model = onnx.load(str(exported_tiny_factory("llama") / "model.onnx"))
    names = {n.name for n in weight_matmuls(model)}
    model = _run_quantizer(model, bits=4, block_size=32, symmetric=False, accuracy_level=0, algorithm="hqq", include=names)
    first = snap_for_exact_layout(model)
    assert first["nodes"] == len(names)
    assert 0 < first["max_rel_change"] < 2e-3  # a fraction of a 4-bit step
    assert snap_for_exact_layout(model)["nodes"] == 0


def test_accuracy_level_4_keeps_8bit_and_folds_4bit_offsets_into_columns(exported_tiny_factory, tmp_path):
    folder = exported_tiny_factory("llama")
    eight = quantized(folder, bits=8, algorithm="rtn", accuracy_level=4)
    facts = rewrite_for_cpu(eight)
    assert facts["unchanged"] == len(ops(eight)["MatMulNBits"]) and facts["split_8bit"] == 0
    four = quantized(folder, bits=4, algorithm="hqq", symmetric=False, accuracy_level=4)
    reference = copy.deepcopy(four)
    count = len(ops(four)["MatMulNBits"])
    facts = rewrite_for_cpu(four)
    # Float zero points at level 4: integer zero points + the residue as extra K columns, one node per weight.
    assert facts["offset_columns"] == count and facts["float_zero_points"] == 0 and facts["not_exact"] == []
    assert 0 < facts["offset_columns_max_rel_error"] < 0.01  # a fraction of the residue's 4-bit step
    nodes = ops(four)["MatMulNBits"]
    assert len(nodes) == count and not [n for n in four.graph.node if "OffsetMatMul" in n.name]
    assert all(len(n.input) == 4 and attr(n, "K") % 32 == 0 and attr(n, "accuracy_level") == 4 for n in nodes)
    zero_points = [onnx.numpy_helper.to_array(i) for i in four.graph.initializer if i.name in {n.input[3] for n in nodes}]
    assert all(z.dtype == np.uint8 for z in zero_points)  # integer zero points: MatMulNBits' fast path
    (ref, _), (got, _) = logits(reference, folder, tmp_path, "ref"), logits(four, folder, tmp_path, "new")
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 0.05  # int8 activations: close, not exact


def test_offset_columns_reconstruct_the_float_zero_point_weights():
    """W_new[n, k] = s*(u - zi) + residue of k's block, from the returned codes; error as reported, shrinking per plane."""
    rng = np.random.default_rng(0)
    rows, k, block = 6, 96, 32
    nb = k // block
    scale = rng.uniform(0.01, 0.1, (rows, nb)).astype(np.float32)
    zero = rng.uniform(0, 15, (rows, nb)).astype(np.float32)  # HQQ-style float zero points
    codes = rng.integers(0, 16, (rows, k)).astype(np.uint8)
    w = NBitsWeight(None, 4, block, 4, codes, scale, zero, ("B", "s", "z"))
    target = w.dequantize().astype(np.float64)
    errors = []
    for planes in (1, 2):
        new_codes, scales, zeros, error = offset_columns(w, planes)
        pad = 32  # 3 block sums, padded to one block
        assert new_codes.shape == (rows, k + planes * pad) and scales.shape == zeros.shape == (rows, nb + planes)
        deq = (new_codes.reshape(rows, -1, block).astype(np.float64) - zeros[..., None]) * scales[..., None]
        deq = deq.reshape(rows, -1)
        main = deq[:, :k]
        residue = sum(deq[:, k + p * pad: k + p * pad + nb] for p in range(planes))  # per block of k
        rebuilt = main + np.repeat(residue, block, axis=1)
        measured = float(np.abs(rebuilt - target).max() / np.abs(target).max())
        assert measured == pytest.approx(error, rel=1e-3, abs=1e-6)
        assert np.all(zeros[:, :nb] == np.clip(np.round(zero), 0, 15))  # integer zero points of the main codes
        errors.append(error)
    assert errors[0] < 0.01 and errors[1] < errors[0] / 2  # the second plane leaves mostly the fp16 snap of the scales


def assert_stored_once(model, heads, vocab, hidden):
    """One quantized tensor feeds the lm_head MatMulNBits and the embedding GatherBlockQuantized; no float table."""
    gbq = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized" and n.input[0] in {h.input[1] for h in heads}]
    assert heads and len(gbq) == len(heads) and {n.input[0] for n in gbq} == {n.input[1] for n in heads}
    assert all(attr(n, "quantize_axis") == 2 and attr(n, "gather_axis") == 0 for n in gbq)
    floats = {tuple(i.dims) for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    assert (vocab, hidden) not in floats and (hidden, vocab) not in floats
    codes = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8 and i.dims and i.dims[0] == vocab]
    assert {i.name for i in codes} == {n.input[1] for n in heads}  # the table's codes exist once


@pytest.mark.parametrize("bits, algorithm, symmetric", [(8, "rtn", True), (4, "hqq", False)])
def test_tied_embedding_reads_the_lm_head_blocks(bits, algorithm, symmetric, exported_tiny_factory, tmp_path):
    """gpt2 ties wte to the lm_head: the Gather reads the lm_head's blocks; rows and logits exact."""
    folder = exported_tiny_factory("gpt2")
    fp32 = onnx.load(str(folder / "model.onnx"))
    table_name = next(i.name for i in fp32.graph.initializer if i.name.endswith("wte.weight"))
    untie_lm_head(fp32)
    ties = find_tied_embeddings(fp32, lm_head_node(fp32))
    (gather_name, head_out), = ties.items()
    gather = next(n for n in fp32.graph.node if n.name == gather_name)
    assert gather.input[0] == table_name
    vocab, hidden = next(list(i.dims) for i in fp32.graph.initializer if i.name == table_name)
    reference = _run_quantizer(fp32, bits=bits, block_size=32, symmetric=symmetric, accuracy_level=0, algorithm=algorithm,
                               include={n.name for n in weight_matmuls(fp32)})
    snap_for_exact_layout(reference)
    head_a = next(n.input[0] for n in reference.graph.node if head_out in n.output)
    w = weights_at(reference, {head_out: (head_a, hidden)})[head_out]  # the lm_head's weights [H, V]

    model = copy.deepcopy(reference)
    facts = rewrite_for_cpu(model, tied_embeddings=ties)
    onnx.checker.check_model(model)
    assert facts["embeddings_shared"] == [gather_name] and facts["not_exact"] == []
    heads = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith(lm_head_node(fp32) or "?")]
    assert len(heads) == (2 if bits == 8 else 1)
    assert_stored_once(model, heads, vocab, hidden)
    assert np.array_equal(weights_at(model, {head_out: (head_a, hidden)})[head_out], w)
    rows = run_cut(model, gather.input[1], gather.output[0], np.arange(vocab, dtype=np.int64)[None])[0]
    assert np.array_equal(rows, w.T)  # identical values (the identity trick may give -0.0 for 0.0)

    # Logits: as the un-rewritten MatMulNBits model whose fp32 table holds those same (quantized) rows.
    table = next(i for i in reference.graph.initializer if i.name == table_name)
    table.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(w.T), table_name))
    assert_same_logits(logits(reference, folder, tmp_path, "ref"), logits(model, folder, tmp_path, "new"))


@pytest.mark.parametrize("scheme", [Int8Weight(), Int4(), Int4(accuracy_level=0, lm_head="int4", embeddings="int4")])
def test_weight_only_schemes_share_the_tied_table(scheme, exported_tiny_factory):
    fp32 = onnx.load(str(exported_tiny_factory("gpt2") / "model.onnx"))
    vocab, hidden = next(list(i.dims) for i in fp32.graph.initializer if i.name.endswith("wte.weight"))
    model, facts = quantize_weight_only(fp32, scheme)
    assert facts["lm_head"]["shared_with_embedding"] is True and facts["embeddings"]["shared_with_lm_head"]
    assert facts["embeddings"]["precision"] == facts["lm_head"]["precision"]
    assert facts["cpu_layout"]["not_exact"] == [] and facts["cpu_layout"]["skipped"] == []
    heads = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith(facts["lm_head"]["node"])]
    assert_stored_once(model, heads, vocab, hidden)
    level = scheme.accuracy_level
    slow = [n.name for n in model.graph.node if n.op_type == "MatMulNBits" and (attr(n, "bits") == 8 and level == 0)]
    assert slow == []


def test_genai_builder_tied_form_and_untied_table(exported_tiny_factory, tmp_path):
    """Gather(Transpose(lm_head weight)) shares too; a table that differs from lm_head^T by one bit does not."""
    fp32 = onnx.load(str(exported_tiny_factory("gpt2") / "model.onnx"))
    untie_lm_head(fp32)
    head = lm_head_node(fp32)
    matmul = next(n for n in fp32.graph.node if n.name == head)
    gather = next(n for n in fp32.graph.node if n.op_type == "Gather" and n.input[0].endswith("wte.weight"))
    assert find_tied_embeddings(fp32, head) == {gather.name: matmul.output[0]}

    genai = copy.deepcopy(fp32)
    g_gather = next(n for n in genai.graph.node if n.name == gather.name)
    genai.graph.node.insert(0, onnx.helper.make_node("Transpose", [matmul.input[1]], ["lm_head_table"], perm=[1, 0]))
    table_name = g_gather.input[0]
    g_gather.input[0] = "lm_head_table"
    keep = [i for i in genai.graph.initializer if i.name != table_name]
    del genai.graph.initializer[:]
    genai.graph.initializer.extend(keep)
    assert find_tied_embeddings(genai, head) == {gather.name: matmul.output[0]}
    model, facts = quantize_weight_only(genai, Int8Weight())
    assert facts["embeddings"]["shared_with_lm_head"] == [gather.name]
    assert "Transpose" not in {n.op_type for n in model.graph.node if "lm_head_table" in n.output}
    assert not [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and 512 in i.dims]

    off = copy.deepcopy(fp32)
    table = next(i for i in off.graph.initializer if i.name == gather.input[0])
    values = onnx.numpy_helper.to_array(table).copy()
    values.view(np.uint32)[3, 5] ^= 1  # one ulp
    table.CopyFrom(onnx.numpy_helper.from_array(values, table.name))
    assert find_tied_embeddings(off, head) == {}
    model, facts = quantize_weight_only(off, Int8Weight())
    assert facts["embeddings"]["shared_with_lm_head"] == [] and facts["lm_head"]["shared_with_embedding"] is False
    assert gather.name in facts["embeddings"]["nodes"] and facts["embeddings"]["precision"] == "int8"


def test_untied_embedding_is_8bit_blocks(exported_tiny_factory):
    """llama does not tie: its table becomes 8-bit GatherBlockQuantized, rows equal onnxruntime's RTN blocks."""
    from edgepack.quantize.cpu_layout import rtn_blocks

    fp32 = onnx.load(str(exported_tiny_factory("llama") / "model.onnx"))
    gather = next(n for n in fp32.graph.node if n.op_type == "Gather" and "embed_tokens" in n.input[0])
    table = onnx.numpy_helper.to_array(next(i for i in fp32.graph.initializer if i.name == gather.input[0]))
    model, facts = quantize_weight_only(copy.deepcopy(fp32), Int8Weight())
    assert facts["embeddings"] == {"precision": "int8", "nodes": [gather.name], "shared_with_lm_head": []}
    assert facts["lm_head"]["shared_with_embedding"] is False
    gbq = ops(model)["GatherBlockQuantized"]
    assert len(gbq) == 1 and attr(gbq[0], "bits") == 8
    rows = run_cut(model, gather.input[1], gather.output[0], np.arange(table.shape[0], dtype=np.int64)[None])[0]
    assert np.array_equal(rows, rtn_blocks(table, 8, 32).dequantize())
    assert float(np.abs(rows - table).max()) <= float(np.abs(table).max()) / 100
