"""`edgepack quantize` on tiny models: every scheme runs, reports its price, and the gate and errors behave."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from tests.conftest import read_json

EVAL = ("--eval-tokens", "128")


def ops_of(folder):
    return {n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}


def check_report(report, scheme_name):
    assert report["kind"] == "edgepack.quantize"
    assert report["scheme"]["name"] == scheme_name
    q = report["quality"]
    for key in ("top1_agreement", "kl_mean", "kl_p99", "ppl_reference", "ppl"):
        assert isinstance(q[key], float) and math.isfinite(q[key]), key
    assert q["positions"] >= 128
    assert 0.0 <= q["top1_agreement"] <= 1.0
    low, high = q["top1_ci95"]
    assert 0.0 <= low <= q["top1_agreement"] <= high <= 1.0 and high - low < 0.2  # >= 128 positions
    assert 0 <= q["near_tie_positions"] <= q["positions"]
    assert q["top1_agreement_decisive"] is None or 0.0 <= q["top1_agreement_decisive"] <= 1.0
    assert q["kl_mean"] >= 0.0 and q["kl_p99"] >= q["kl_mean"] * 0.0
    assert report["size_bytes"] > 0 and report["reference_size_bytes"] > report["size_bytes"] * 0.5
    assert report["size_ratio"] == pytest.approx(report["size_bytes"] / report["reference_size_bytes"])
    assert report["seconds"]["total"] > 0


@pytest.mark.parametrize(
    "scheme, extra, expected_op, max_ratio, min_top1",
    [
        ("int8-weight", (), "MatMulNBits", 0.45, 0.95),
        ("int8-dynamic", (), "DynamicQuantizeLinear", 0.5, 0.8),
        ("int8-static", ("--calibration-samples", "4"), "QuantizeLinear", 0.6, 0.8),
        ("int4", (), "MatMulNBits", 0.4, 0.7),
        ("int4", ("--algorithm", "rtn", "--block-size", "16", "--symmetric"), "MatMulNBits", 0.45, 0.7),
        ("int4", ("--algorithm", "k-quant"), "MatMulNBits", 0.4, 0.7),
        ("int4", ("--algorithm", "gptq", "--calibration-samples", "2"), "MatMulNBits", 0.4, 0.7),
        ("fp16", (), "Cast", 0.6, 0.99),
    ],
)
def test_scheme_runs_and_reports_its_price(scheme, extra, expected_op, max_ratio, min_top1, exported_tiny_factory, tmp_path, cli):
    out = tmp_path / "q"
    result = cli("quantize", exported_tiny_factory("llama"), "-o", out, "--scheme", scheme, *extra, *EVAL)
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "quantize.json")
    check_report(report, scheme)
    assert report["size_ratio"] <= max_ratio
    assert report["quality"]["top1_agreement"] >= min_top1
    low, high = report["quality"]["top1_ci95"]
    assert f"{report['quality']['top1_agreement']:.3f} ({low:.3f}-{high:.3f})" in result.stdout  # the summary table's cell
    assert expected_op in ops_of(out)
    # Only the deliverable: the quantizers' own scratch models (dynamic_in.onnx, static_out.onnx...) stay out of it.
    tiny = exported_tiny_factory("llama")
    side_files = {p.name for p in tiny.iterdir() if p.is_file() and not p.name.startswith("model.onnx")}
    assert {p.name for p in out.iterdir()} == side_files | {"model.onnx", "model.onnx.data", "quantize.json"}
    # The quantized folder is a complete export: `edgepack run` works on it.
    run = cli("run", out, "-p", "The capital of France is", "-n", "8", "--no-stats")
    assert run.exit_code == 0, run.stderr


def test_int4_precision_overrides(exported_tiny_factory, tmp_path, cli):
    out = tmp_path / "mixed"
    result = cli("quantize", exported_tiny_factory("llama"), "-o", out, "--scheme", "int4", "--keep-8bit", r"layers\.0/",
                 "--lm-head", "int4", "--embeddings", "int4", *EVAL)
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "quantize.json")
    facts = report["facts"]
    assert facts["keep_8bit_nodes"] and all("layers.0/" in n for n in facts["keep_8bit_nodes"])
    assert facts["matmuls_8bit"] == len(facts["keep_8bit_nodes"]) == 7  # q, k, v, o, gate, up, down of layer 0
    assert facts["lm_head"]["precision"] == "int4"
    assert facts["embeddings"]["precision"] == "int4"
    graph = onnx.load(str(out / "model.onnx")).graph
    bits = [dict((a.name, a.i) for a in n.attribute)["bits"] for n in graph.node if n.op_type == "MatMulNBits"]
    # accuracy_level 0: each 8-bit weight runs as two exact 4-bit planes (cpu_layout), the others as one.
    assert set(bits) == {4} and len(bits) == facts["matmuls_4bit"] + 2 * facts["matmuls_8bit"]
    assert facts["cpu_layout"]["split_8bit"] == 7 and facts["cpu_layout"]["not_exact"] == []
    assert any(n.op_type == "GatherBlockQuantized" for n in graph.node)


def test_tied_lm_head_is_quantized(exported_tiny_factory, tmp_path, cli):
    """gpt2 ties lm_head to the embedding; optimum exports Transpose(embedding): it must still be quantized."""
    out = tmp_path / "gpt2-int4"
    result = cli("quantize", exported_tiny_factory("gpt2"), "-o", out, "--scheme", "int4", *EVAL)
    assert result.exit_code == 0, result.stderr
    facts = read_json(out / "quantize.json")["facts"]
    assert facts["lm_head"]["untied_from_embedding"] is True
    assert facts["lm_head"]["precision"] == "int8"
    assert "MatMul" not in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node if n.name == facts["lm_head"]["node"]}


def test_encoder_quality_is_cosine(exported_tiny_factory, tmp_path, cli):
    out = tmp_path / "bert-int8"
    result = cli("quantize", exported_tiny_factory("bert"), "-o", out, "--scheme", "int8-weight", "--eval-tokens", "64")
    assert result.exit_code == 0, result.stderr
    quality = read_json(out / "quantize.json")["quality"]
    assert quality["cosine_mean"] > 0.99 and quality["top1_agreement"] is None


def test_encoder_default_is_smoothed_int8_dynamic(exported_tiny_factory, tmp_path, cli):
    """Without --scheme an encoder gets int8-dynamic with SmoothQuant, its worst-resolved inputs weight-only
    and a 4-bit word table; the graph computes what the report says."""
    out = tmp_path / "bert-default"
    result = cli("quantize", exported_tiny_factory("bert"), "-o", out, "--eval-tokens", "64")
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "quantize.json")
    assert report["scheme"]["name"] == "int8-dynamic" and report["requested_scheme"] is None
    assert report["scheme"]["smooth"] == 0.6 and report["scheme"]["embeddings"] == "int4"
    facts = report["facts"]
    assert facts["smooth"]["activations"] > 0 and facts["smooth"]["worst_outlier_ratio_after"] < facts["smooth"]["worst_outlier_ratio_before"]
    assert facts["weight_only_8bit"] and facts["int4_table"]
    from collections import Counter

    ops = Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert {"DynamicQuantizeLinear", "MatMulNBits", "GatherBlockQuantized"} <= set(ops)
    assert ops["MatMulNBits"] == len(facts["weight_only_8bit"])
    assert read_json(out / "quantize.json")["quality"]["cosine_mean"] > 0.99
    # decoders keep int8-weight as their default
    result = cli("quantize", exported_tiny_factory("llama"), "-o", tmp_path / "llama-default", *EVAL)
    assert result.exit_code == 0, result.stderr
    assert read_json(tmp_path / "llama-default" / "quantize.json")["scheme"]["name"] == "int8-weight"


def test_smoothing_keeps_the_fp32_function(exported_tiny_factory, tmp_path):
    """SmoothQuant is exact algebra before quantization: the smoothed fp32 graph gives the same hidden states."""
    import onnx
    import onnxruntime as ort

    from edgepack.quantize.smooth import smooth_matmul_inputs
    from edgepack.runtime.generate import encoder_batch_feeds

    export = exported_tiny_factory("bert")
    model = onnx.load(str(export / "model.onnx"))
    names = {i.name for i in model.graph.input}
    feeds = [encoder_batch_feeds([[2, 7, 19, 44, 3], [2, 9, 3]], names), encoder_batch_feeds([[2, 5, 6, 7, 8, 9, 10, 3]], names)]
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    before = [reference.run(None, f)[0] for f in feeds]
    facts = smooth_matmul_inputs(model, feeds, 0.6)
    assert facts.matmuls >= 4 * 2 and sum(n.op_type == "Mul" and n.name.endswith("_SmoothMul") for n in model.graph.node) == facts.activations
    smoothed = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for f, want in zip(feeds, before):
        np.testing.assert_allclose(smoothed.run(None, f)[0], want, rtol=1e-4, atol=1e-4)


def test_gate_failure_exits_1_and_still_writes(exported_tiny_factory, tmp_path, cli):
    out = tmp_path / "gated"
    result = cli("quantize", exported_tiny_factory("llama"), "-o", out, "--scheme", "int4", "--max-kl", "0", *EVAL)
    assert result.exit_code == 1
    assert len(result.stderr_lines) == 1
    assert "kl_mean" in result.stderr_lines[0] and "--max-kl 0" in result.stderr_lines[0]
    report = read_json(out / "quantize.json")
    assert report["gate"]["passed"] is False and report["gate"]["max_kl"] == 0
    assert (out / "model.onnx").is_file()


def test_gate_pass_exits_0(exported_tiny_factory, tmp_path, cli):
    out = tmp_path / "ok"
    result = cli("quantize", exported_tiny_factory("llama"), "-o", out, "--scheme", "int8-weight",
                 "--max-kl", "0.05", "--min-top1", "0.9", "--max-ppl-ratio", "1.05", *EVAL)
    assert result.exit_code == 0, result.stderr
    assert read_json(out / "quantize.json")["gate"]["passed"] is True


def test_auto_picks_smallest_that_meets_budget(exported_tiny_factory, tmp_path, cli):
    out = tmp_path / "auto"
    result = cli("quantize", exported_tiny_factory("llama"), "-o", out, "--scheme", "auto", "--max-kl", "0.001", *EVAL)
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "quantize.json")
    picked = report["auto"]["picked"]
    assert picked and "auto picked" in result.stdout
    tried = report["auto"]["candidates"]
    assert tried[-1]["label"] == picked and not tried[-1]["gate_failures"]
    assert all(c["gate_failures"] for c in tried[:-1])  # every smaller candidate broke the budget
    assert report["quality"]["kl_mean"] <= 0.001


def test_auto_fails_when_nothing_meets_budget(exported_tiny_factory, tmp_path, cli):
    out = tmp_path / "auto-none"
    result = cli("quantize", exported_tiny_factory("llama"), "-o", out, "--scheme", "auto", "--max-kl", "0", *EVAL)
    assert result.exit_code == 1
    report = read_json(out / "quantize.json")
    assert report["auto"]["picked"] is None and len(report["auto"]["candidates"]) >= 3


def assert_one_line(result, code, *fragments):
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert len(result.stderr_lines) == 1 and result.stderr_lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr_lines[0]


@pytest.mark.parametrize(
    "args, code, fragments",
    [
        (("--scheme", "int3"), 2, ("unknown scheme 'int3'", "int8-weight", "gguf", "auto")),
        (("--scheme", "int4", "--block-size", "24"), 2, ("not a power of two",)),
        (("--scheme", "int4", "--block-size", "8"), 2, ("not a power of two",)),
        (("--scheme", "auto"), 2, ("needs a quality budget",)),
        (("--scheme", "gguf"), 2, ("needs an export made from a .gguf",)),
        (("--scheme", "int4", "--keep-8bit", "("), 2, ("not a valid regular expression",)),
    ],
)
def test_bad_options(args, code, fragments, exported_tiny_factory, tmp_path, cli):
    out = tmp_path / "bad"
    result = cli("quantize", exported_tiny_factory("llama"), "-o", out, *args)
    assert_one_line(result, code, *fragments)
    assert not out.exists()


def test_empty_calibration_and_eval_files(exported_tiny_factory, tmp_path, cli):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    for args in (("--scheme", "int8-static", "--calibration-text", empty), ("--scheme", "int8-weight", "--eval-text", empty)):
        out = tmp_path / "bad"
        result = cli("quantize", exported_tiny_factory("llama"), "-o", out, *args)
        assert_one_line(result, 3, "is empty")
        assert not out.exists()


def test_model_without_expected_inputs(exported_tiny_factory, tmp_path, cli):
    """A decoder graph without its KV-cache inputs is not an edgepack export."""
    import shutil

    src = tmp_path / "nocache"
    shutil.copytree(exported_tiny_factory("llama"), src)
    model = onnx.load(str(src / "model.onnx"))
    keep = [i for i in model.graph.input if not i.name.startswith("past_key_values")]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    onnx.save(model, str(src / "model.onnx"))
    result = cli("quantize", src, "-o", tmp_path / "out", "--scheme", "int8-weight")
    assert_one_line(result, 3, "past_key_values")


def test_quantizing_twice_is_refused(exported_tiny_factory, tmp_path, cli):
    first = tmp_path / "first"
    assert cli("quantize", exported_tiny_factory("llama"), "-o", first, "--no-eval").exit_code == 0
    result = cli("quantize", first, "-o", tmp_path / "second", "--scheme", "int4")
    assert_one_line(result, 3, "already quantized")


def test_no_eval_writes_null_quality(exported_tiny_factory, tmp_path, cli):
    out = tmp_path / "noeval"
    assert cli("quantize", exported_tiny_factory("llama"), "-o", out, "--scheme", "int8-weight", "--no-eval").exit_code == 0
    report = read_json(out / "quantize.json")
    assert report["quality"] is None and report["gate"]["passed"] is True
    assert json.dumps(report["scheme"]) == json.dumps({"name": "int8-weight", "block_size": 32, "symmetric": True, "accuracy_level": 0, "embeddings": "int8"})


def test_without_scheme_quantize_uses_int8_weight(exported_tiny_factory, tmp_path, cli):
    # The demo's int8-weight figures come from the build's quantize stage; this is the CLI default they stand for.
    out = tmp_path / "default"
    assert cli("quantize", exported_tiny_factory("llama"), "-o", out, "--no-eval").exit_code == 0
    assert read_json(out / "quantize.json")["scheme"]["name"] == "int8-weight"
