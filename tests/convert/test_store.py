"""Tied embedding tables stored once, on graphs with inline weights and with external data.

Exports past 2 GB reach `finish_export` as torch writes them (every weight in its own file) or as
optimum gathers them (FORCE_ONNX_EXTERNAL_DATA); both layouts take the same code path as a model of
any size, so tiny models check it.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import read_json
from tests.tiny_models import VOCAB_SIZE

HIDDEN = 64


def _tables(model) -> list[str]:
    """Initializers shaped like the embedding table or its transpose."""
    return [i.name for i in model.graph.initializer if sorted(i.dims) == sorted([VOCAB_SIZE, HIDDEN])]


def _external_locations(model) -> set[str]:
    from onnx.external_data_helper import _get_all_tensors

    return {e.value for t in _get_all_tensors(model) for e in t.external_data if e.key == "location"}


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_tied_table_is_stored_once_and_parity_passes(external, tiny_model_factory, tmp_path, cli, monkeypatch):
    import onnx

    if external:  # optimum's own switch: the weights go to model.onnx_data as for a model past 2 GB
        monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")
    out = tmp_path / "tied"
    result = cli("convert", tiny_model_factory("llama-tied"), "-o", out)
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "convert.json")
    assert report["parity"]["passed"] is True
    assert report["parity"]["greedy_tokens_identical"] is True
    assert report["tied_weights_stored_once"] is True

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert _tables(model) == ["model.embed_tokens.weight"]
    transposes = [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] == "model.embed_tokens.weight"]
    assert len(transposes) == 1
    assert any(transposes[0].output[0] in n.input for n in model.graph.node if n.op_type == "MatMul")
    if external:
        assert _external_locations(model) == {"model.onnx_data"}
        assert sorted(p.name for p in out.glob("model.onnx*")) == ["model.onnx", "model.onnx_data"]
        # One table's bytes, not two: the data file is smaller than the weights plus a second table.
        table_bytes = VOCAB_SIZE * HIDDEN * 4
        assert (out / "model.onnx_data").stat().st_size < report["num_parameters"] * 4 + table_bytes
    else:
        assert not (out / "model.onnx_data").exists()


def test_untied_model_reports_nothing_to_tie(exported_tiny_factory):
    report = read_json(exported_tiny_factory("llama") / "convert.json")
    assert report["tied_weights_stored_once"] is None


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_per_tensor_files_are_gathered_and_the_table_stored_once(fold, tiny_model_factory, tmp_path):
    """torch's layout past 2 GB: one file per weight. The result must compute what the raw export computes.

    Folded (torch's default): the tied table's transpose is a second initializer, removed here.
    Unfolded (weights past 2 GiB): every Linear reads Transpose(weight); those are stored transposed here.
    """
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    from edgepack.convert.export import export_onnx
    from edgepack.convert.store import finish_export, tied_info

    torch_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory("llama-tied")), dtype=torch.float32)
    raw = tmp_path / "raw"
    assert export_onnx(torch_model, raw, "text-generation", None, fold=fold)[1] is fold
    proto = onnx.load(str(raw / "model.onnx"))
    weights = {i.name for i in proto.graph.initializer}
    weight_transposes = sum(n.op_type == "Transpose" and n.input[0] in weights for n in proto.graph.node)
    if fold:
        assert len(_tables(proto)) == 2 and weight_transposes == 0  # the table and its folded transpose
    else:
        assert len(_tables(proto)) == 1 and weight_transposes == 15  # 2 layers x 7 Linears + the lm_head

    work = tmp_path / "per-tensor"
    work.mkdir()
    onnx.save(proto, str(work / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len({p.name for p in work.iterdir()} - {"model.onnx"}) > 10

    facts = finish_export(work / "model.onnx", tied_info(torch_model), folded_export=fold)
    assert facts == {"tied_weights_stored_once": True, "external_data": True}
    assert sorted(p.name for p in work.iterdir()) == ["model.onnx", "model.onnx_data"]
    done = onnx.load(str(work / "model.onnx"), load_external_data=False)
    assert _tables(done) == ["model.embed_tokens.weight"]
    assert _external_locations(done) == {"model.onnx_data"}
    inits = {i.name for i in done.graph.initializer}
    # Only the tied table sits behind a Transpose (the Gather reads it too); every other MatMul reads an initializer.
    assert [n.input[0] for n in done.graph.node if n.op_type == "Transpose" and n.input[0] in inits] == ["model.embed_tokens.weight"]
    assert sum(n.op_type == "MatMul" and n.input[1] in inits for n in done.graph.node) == 14

    feeds = _decoder_feeds(proto)
    want = ort.InferenceSession(str(raw / "model.onnx")).run(None, feeds)
    got = ort.InferenceSession(str(work / "model.onnx")).run(None, feeds)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


def _decoder_feeds(model) -> dict[str, np.ndarray]:
    """Five prompt tokens and an empty cache, shaped from the graph's inputs."""
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.name == "input_ids":
            feeds[value.name] = np.array([[5, 17, 42, 7, 99]], dtype=np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((1, 5), dtype=np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = np.arange(5, dtype=np.int64)[None]
        elif value.name.startswith("past_key_values"):
            feeds[value.name] = np.zeros((1, dims[1], 0, dims[3]), dtype=np.float32)
        else:
            raise AssertionError(f"unexpected input {value.name}")
    return feeds


def test_graph_without_external_data_is_left_inline(tmp_path):
    """A graph with nothing to tie and no external data is not rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    from edgepack.convert.store import TiedInfo, finish_export

    weight = numpy_helper.from_array(np.ones((2, 2), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])], [weight])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    before = path.read_bytes()
    assert finish_export(path, TiedInfo()) == {"tied_weights_stored_once": None, "external_data": False}
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_small_constant_arithmetic_is_folded_and_the_rest_kept(tmp_path):
    """What torch's folding did: nodes reading only Constants become Constants; nodes reading inputs stay."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from edgepack.convert.store import TiedInfo, finish_export

    nodes = [
        helper.make_node("Constant", [], ["c"], name="/c", value=numpy_helper.from_array(np.array(4.0, dtype=np.float32))),
        helper.make_node("Sqrt", ["c"], ["root"], name="/sqrt"),
        helper.make_node("Constant", [], ["axes"], name="/axes", value=numpy_helper.from_array(np.array([0], dtype=np.int64))),
        helper.make_node("Unsqueeze", ["root", "axes"], ["root1"], name="/unsqueeze"),
        helper.make_node("Mul", ["x", "root1"], ["y"], name="/mul"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    finish_export(path, TiedInfo(), folded_export=False)
    done = onnx.load(str(path))
    assert [(n.op_type, n.name) for n in done.graph.node] == [("Constant", "/unsqueeze"), ("Mul", "/mul")]
    y = ort.InferenceSession(str(path)).run(None, {"x": np.array([3.0], dtype=np.float32)})[0]
    np.testing.assert_array_equal(y, [6.0])
