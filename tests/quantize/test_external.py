"""Tensor-by-tensor weight-only quantization: the same model as in memory, without holding the weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgepack.quantize.external import INLINE_LIMIT, TensorStore, is_external
from edgepack.quantize.graph import validate_with_onnxruntime
from edgepack.quantize.schemes import Int4, Int8Weight
from edgepack.quantize.weight_only import quantize_weight_only


def external_copy(folder, dest):
    """The export re-saved with every weight in model.onnx.data (as real-size exports are)."""
    dest.mkdir()
    model = onnx.load(str(folder / "model.onnx"))
    # A Constant's tensor in the data file too, as optimum's exports of real-size models have them.
    values = np.arange(512, dtype=np.float32)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["edgepack_test_constant"], value=onnx.numpy_helper.from_array(values)))
    model.graph.output.append(onnx.helper.make_tensor_value_info("edgepack_test_constant", onnx.TensorProto.FLOAT, [512]))
    onnx.save_model(model, str(dest / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=INLINE_LIMIT, convert_attribute=True)
    constant = onnx.load(str(dest / "model.onnx"), load_external_data=False).graph.node[0].attribute[0].t
    assert is_external(constant)
    return dest / "model.onnx"


def tensors(model, base_dir) -> dict[str, np.ndarray]:
    store = TensorStore(base_dir)
    return {t.name: store.array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("arch, scheme", [
    ("gpt2", Int4()),  # tied: the lm_head is untied, quantized, and the table shares its blocks
    ("llama", Int8Weight()),  # untied: int8 table by row slices
    ("llama", Int4(algorithm="rtn", accuracy_level=4, embeddings="int4")),  # int4 Gather through the library
])
def test_streamed_quantization_equals_in_memory(arch, scheme, exported_tiny_factory, tmp_path):
    path = external_copy(exported_tiny_factory(arch), tmp_path / "src")
    reference, ref_facts = quantize_weight_only(onnx.load(str(path)), scheme)

    graph_only = onnx.load(str(path), load_external_data=False)
    assert any(is_external(t) for t in graph_only.graph.initializer)
    work = tmp_path / "work"
    work.mkdir()
    with TensorStore(path.parent, work) as store:
        model, facts = quantize_weight_only(graph_only, scheme, store=store)
        # Nothing of weight size is held in the graph: every written tensor went to the spill file.
        held = [t.name for t in model.graph.initializer if not is_external(t) and len(t.raw_data) >= INLINE_LIMIT]
        assert held == []
        out = tmp_path / "out" / "model.onnx"
        out.parent.mkdir()
        store.save(model, out)
    assert not list(work.iterdir())  # the spill file is gone with the store

    assert facts == ref_facts
    validate_with_onnxruntime(out)
    saved = onnx.load(str(out), load_external_data=False)
    assert [(n.op_type, list(n.input), list(n.output)) for n in saved.graph.node] == \
           [(n.op_type, list(n.input), list(n.output)) for n in reference.graph.node]
    ours, theirs = tensors(saved, out.parent), tensors(reference, None)
    assert ours.keys() == theirs.keys()
    for name, values in theirs.items():
        assert ours[name].dtype == values.dtype and np.array_equal(ours[name].view(np.uint8), values.view(np.uint8)), name
    for t in saved.graph.initializer:  # large tensors start on a page: onnxruntime maps them
        offsets = {e.key: e.value for e in t.external_data}
        if is_external(t) and int(offsets["length"]) >= 1 << 20:
            assert int(offsets["offset"]) % 4096 == 0


def test_tie_check_reads_row_blocks(exported_tiny_factory, tmp_path, monkeypatch):
    """The tie check on external tensors compares block by block and still sees a one-bit difference."""
    from edgepack.quantize import cpu_layout
    from edgepack.quantize.graph import lm_head_node, untie_lm_head

    monkeypatch.setattr(cpu_layout, "_COMPARE_ROWS", 7)  # many blocks on a tiny vocabulary
    path = external_copy(exported_tiny_factory("gpt2"), tmp_path / "src")
    for flip in (False, True):
        graph = onnx.load(str(path), load_external_data=False)
        with TensorStore(path.parent, tmp_path / f"work{flip}") as store:
            untie_lm_head(graph, store=store)
            table = next(i for i in graph.graph.initializer if i.name.endswith("wte.weight"))
            assert is_external(table)
            if flip:  # the table now differs from the lm_head's copy by one ulp, in the last block
                values = store.array(table)
                values.view(np.uint32)[-1, -1] ^= 1
                table.CopyFrom(store.add(values, table.name))
            ties = cpu_layout.find_tied_embeddings(graph, lm_head_node(graph), store=store)
        assert bool(ties) is not flip
