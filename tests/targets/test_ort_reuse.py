"""`target ort` on the builder graph carries the quantized source's own weights instead of quantizing again."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest

from edgepack.targets.genai_builder import builder_python
from tests.conftest import read_json

pytestmark = pytest.mark.skipif(builder_python() is None, reason="onnxruntime-genai builder env not set up (scripts/setup.sh)")


@pytest.fixture(scope="module")
def int4_source(exported_tiny_factory, tmp_path_factory):
    """The tied tiny llama (the Llama 3.2 form: lm_head and embedding one table) quantized int4 (HQQ, the default)."""
    from tests.conftest import run_cli

    out = tmp_path_factory.mktemp("reuse") / "q"
    result = run_cli("quantize", exported_tiny_factory("llama-tied"), "-o", out, "--scheme", "int4", "--eval-tokens", "64")
    assert result.exit_code == 0, result.stderr
    return out


def _quantized_rows(folder) -> Counter:
    """Every row of the graph's quantized-weight initializers (uint8 codes, fp16 scales, block minimums), as bytes,
    keyed by type and row width: the same multiset means the same quantized weights, however stacked or named."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    quantized_inputs = set()
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            quantized_inputs.add(node.input[0 if node.op_type == "GatherBlockQuantized" else 1])
        if node.op_type in ("Cast", "Neg"):  # fp16-stored scales, block minimums
            quantized_inputs.add(node.input[0])
    rows = Counter()
    for init in model.graph.initializer:
        if init.name not in quantized_inputs or len(init.dims) < 2:
            continue
        values = numpy_helper.to_array(init)
        flat = np.ascontiguousarray(values.reshape(values.shape[0], -1))
        for row in flat:
            rows[(str(flat.dtype), flat.shape[1], row.tobytes())] += 1
    return rows


def test_bundle_carries_the_sources_quantized_weights(int4_source, tmp_path, cli):
    out = tmp_path / "ort"
    result = cli("target", "ort", int4_source, "-o", out, "--graph", "builder", "--compact")
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "target.json")
    carried = report["facts"]["quantized_weights"]
    # 2 layers x (fused qkv, o, gate, up, down) + lm_head + the embedding sharing the lm_head's blocks
    assert carried["reused_from_source"] == 12 and carried["quantized_again"] == 0, carried["not_reused"]
    fused = [r for r in carried["reused"] if r["node"].endswith("qkv_proj/MatMul")]
    assert [len(r["from"]) for r in fused] == [3, 3]
    embedding = next(r for r in carried["reused"] if r["node"] == "/model/embed_tokens/Gather")
    assert embedding["shares_blocks_with"] == "/lm_head/MatMul" and embedding["bytes"] == 0
    # Byte for byte the source's codes, scales and minimums (the fused qkv stacks q, k and v's rows).
    assert _quantized_rows(out) == _quantized_rows(int4_source)
    checks = report["checks"]
    assert checks["parity_vs_source"]["kl_mean"] < 1e-9 and checks["parity_vs_source"]["top1_agreement"] == 1.0
    assert report["passed"] is True
    assert report["seconds"]["quantize"] >= 0 and report["seconds"]["builder"] > 0


def _quantize_then_builder_bundle(cli, export, tmp_path, scheme: str):
    """(quantized source, its builder-route ort bundle, the bundle's target.json), both commands exit 0."""
    source, out = tmp_path / "q", tmp_path / "ort"
    result = cli("quantize", export, "-o", source, "--scheme", scheme, "--eval-tokens", "64")
    assert result.exit_code == 0, result.stderr
    result = cli("target", "ort", source, "-o", out, "--graph", "builder", "--compact")
    assert result.exit_code == 0, result.stderr
    return source, out, read_json(out / "target.json")


def test_int8_weight_source_is_carried_byte_for_byte(exported_tiny_factory, tmp_path, cli):
    """int8-weight (8-bit codes as two exact 4-bit planes) on the untied llama: its own int8 embedding table too."""
    source, out, report = _quantize_then_builder_bundle(cli, exported_tiny_factory("llama"), tmp_path, "int8-weight")
    carried = report["facts"]["quantized_weights"]
    assert carried["reused_from_source"] == 2 * 5 + 2 and carried["quantized_again"] == 0, carried["not_reused"]
    assert {r["bits"] for r in carried["reused"]} == {8}
    assert _quantized_rows(out) == _quantized_rows(source)
    assert report["checks"]["parity_vs_source"]["kl_mean"] < 1e-9 and report["passed"] is True


def test_a_weight_without_an_equal_is_quantized_with_the_scheme(int4_source, tmp_path, cli):
    """One k_proj of the Hugging Face weights the builder reads moved by one ulp: the fused qkv of that layer has
    no equal in the fp32 export and gets the scheme; everything else is still carried."""
    from safetensors.numpy import load_file, save_file

    source = tmp_path / "q"
    shutil.copytree(int4_source, source)
    convert = json.loads((source / "convert.json").read_text())
    hf = tmp_path / "hf"
    shutil.copytree(convert["source"]["hf_dir"], hf)
    tensors = load_file(str(hf / "model.safetensors"))
    key = "model.layers.0.self_attn.k_proj.weight"
    tensors[key][0, 0] = np.nextafter(tensors[key][0, 0], np.float32(np.inf))
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    convert["source"]["hf_dir"] = str(hf)
    (source / "convert.json").write_text(json.dumps(convert))

    out = tmp_path / "ort"
    result = cli("target", "ort", source, "-o", out, "--graph", "builder")
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "target.json")
    carried = report["facts"]["quantized_weights"]
    assert carried["reused_from_source"] == 11 and carried["quantized_again"] == 1
    assert carried["not_reused"] == [{"node": "/model/layers.0/attn/qkv_proj/MatMul", "why": "no equal weight in the fp32 export"}]
    assert report["facts"]["scheme_facts"]["matmuls_4bit"] == 1  # the scheme saw only that weight
    ops = report["facts"]["ops"]
    assert ops["com.microsoft.MatMulNBits"] == 2 * 5 + 2  # no weight left float (the int8 lm_head is two 4-bit planes)
    assert report["checks"]["parity_vs_source"]["passed"] is True and report["passed"] is True


def test_weights_the_builder_splits_are_carried_as_row_ranges(exported_tiny_factory, tmp_path, cli):
    """Phi-3 stores gate and up as one gate_up_proj; the builder writes two MatMuls: each gets its rows of the
    source's blocks."""
    source, out, report = _quantize_then_builder_bundle(cli, exported_tiny_factory("phi3"), tmp_path, "int4")
    carried = report["facts"]["quantized_weights"]
    assert carried["quantized_again"] == 0, carried["not_reused"]
    split = {r["node"]: r["from"] for r in carried["reused"] if r["node"].startswith("/model/layers.0/mlp/")}
    assert split["/model/layers.0/mlp/gate_proj/MatMul"] == ["/model/layers.0/mlp/gate_up_proj/MatMul[0:128]"]
    assert split["/model/layers.0/mlp/up_proj/MatMul"] == ["/model/layers.0/mlp/gate_up_proj/MatMul[128:256]"]
    assert _quantized_rows(out) == _quantized_rows(source)
    assert report["checks"]["parity_vs_source"]["kl_mean"] < 1e-9 and report["passed"] is True
