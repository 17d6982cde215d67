"""`edgepack target ort` on tiny models: both graph routes, genai_config, onnxruntime-genai parity, quantized source."""

from __future__ import annotations

import json

import pytest

from edgepack.targets.genai_builder import builder_python
from tests.conftest import read_json

needs_builder = pytest.mark.skipif(builder_python() is None, reason="onnxruntime-genai builder env not set up (scripts/setup.sh)")


def _check_bundle(out, route):
    report = read_json(out / "target.json")
    assert report["kind"] == "edgepack.target" and report["target"] == "ort"
    assert report["facts"]["graph_route"] == route
    for name in ("model.onnx", "genai_config.json", "tokenizer.json", "config.json"):
        assert (out / name).is_file(), name
        assert report["files"][name] == (out / name).stat().st_size
    checks = report["checks"]
    assert checks["onnxruntime_genai"]["greedy_tokens_identical"] is True
    assert len(checks["onnxruntime_genai"]["genai_tokens"]) >= 1
    assert report["passed"] is True
    return report


@needs_builder
def test_builder_route_fuses_attention_and_matches(exported_tiny_factory, tmp_path, cli):
    out = tmp_path / "ort"
    result = cli("target", "ort", exported_tiny_factory("llama"), "-o", out, "--max-context", "128")
    assert result.exit_code == 0, result.stderr
    report = _check_bundle(out, "builder")
    ops = report["facts"]["ops"]
    assert ops.get("com.microsoft.GroupQueryAttention") == 2  # one per layer
    assert report["checks"]["parity_vs_source"]["max_abs_logit_diff"] < 1e-3
    assert report["checks"]["parity_vs_source"]["top1_agreement"] == 1.0
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == 128 and genai["search"]["max_length"] == 128
    # 2 layers x (K + V) x 2 kv heads x head_dim 16 x fp32
    assert report["facts"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert report["facts"]["kv_bytes_at_max_context"] == 128 * report["facts"]["kv_bytes_per_token"]
    # The bundle is a runnable export for edgepack too.
    run = cli("run", out, "-p", "The capital of France is", "-n", "6", "--no-stats")
    assert run.exit_code == 0, run.stderr
    # GroupQueryAttention appends in place to one KV buffer per layer: same logits as copying the cache.
    assert genai["search"]["past_present_share_buffer"] is True
    assert report["checks"]["shared_kv_buffer"]["tokens_identical_to_copied_cache"] is True
    _shared_buffer_decodes_like_copied_cache(out)


def _shared_buffer_decodes_like_copied_cache(bundle):
    import numpy as np

    from edgepack.errors import UsageError
    from edgepack.runtime import DecoderSession, create_session, load_model_dir

    model_dir = load_model_dir(bundle)
    assert model_dir.share_kv_buffer is True
    session = create_session(model_dir.onnx_path, threads=1)
    shared, copied = DecoderSession(session, model_dir.config, share_kv_buffer=True), DecoderSession(session, model_dir.config)
    prompt, steps = [5, 17, 42, 99, 7], [300, 12, 64, 3]
    buffer = shared.empty_cache(len(prompt) + len(steps))
    cache = copied.empty_cache()
    logits_shared, buffer = shared.forward(prompt, buffer, 0)
    logits_copied, cache = copied.forward(prompt, cache, 0)
    diffs = [np.abs(logits_shared - logits_copied).max()]
    for i, token in enumerate(steps):
        past = len(prompt) + i
        logits_shared, buffer = shared.forward([token], buffer, past)
        logits_copied, cache = copied.forward([token], cache, past)
        diffs.append(np.abs(logits_shared - logits_copied).max())
    assert max(diffs) <= 1e-5, diffs
    with pytest.raises(UsageError, match="KV buffer holds 9 positions"):
        shared.forward([1], buffer, len(prompt) + len(steps))
    with pytest.raises(UsageError, match="capacity"):
        shared.empty_cache()


def test_max_context_is_capped_by_the_model(exported_tiny_factory, tmp_path, cli):
    out = tmp_path / "capped"
    result = cli("target", "ort", exported_tiny_factory("qwen2"), "-o", out, "--graph", "optimum")
    assert result.exit_code == 0, result.stderr
    report = _check_bundle(out, "optimum")
    assert report["facts"]["max_context_requested"] == 2048
    assert report["facts"]["max_context"] == 256  # tiny models have 256 positions


def test_optimum_route_writes_a_genai_config_that_genai_runs(exported_tiny_factory, tmp_path, cli):
    out = tmp_path / "gpt2"
    result = cli("target", "ort", exported_tiny_factory("gpt2"), "-o", out)
    assert result.exit_code == 0, result.stderr
    report = _check_bundle(out, "optimum")  # auto falls back: the builder does not take gpt2
    genai = json.loads((out / "genai_config.json").read_text())
    inputs = genai["model"]["decoder"]["inputs"]
    import onnx

    graph_inputs = {i.name for i in onnx.load(str(out / "model.onnx")).graph.input}
    for name in ("input_ids", "attention_mask", "position_ids"):
        if name in graph_inputs:
            assert inputs[name] == name
    assert genai["model"]["decoder"]["num_hidden_layers"] == 2
    assert report["checks"]["parity_vs_source"]["max_abs_logit_diff"] < 1e-3


def _ort_bundle_of_quantized(exported_tiny_factory, tmp_path, cli, *scheme_args) -> dict:
    """Quantize the tiny llama with `scheme_args`, build its ort bundle, check it; return target.json."""
    quantized = tmp_path / "q"
    assert cli("quantize", exported_tiny_factory("llama"), "-o", quantized, *scheme_args, "--eval-tokens", "128").exit_code == 0
    out = tmp_path / "ort-q"
    result = cli("target", "ort", quantized, "-o", out)
    assert result.exit_code == 0, result.stderr
    return _check_bundle(out, "builder")


@needs_builder
def test_quantized_source_keeps_its_scheme_and_quality(exported_tiny_factory, tmp_path, cli):
    report = _ort_bundle_of_quantized(exported_tiny_factory, tmp_path, cli, "--scheme", "int4", "--algorithm", "rtn")
    assert report["facts"]["scheme"]["name"] == "int4"
    ops = report["facts"]["ops"]
    # builder graph: fused QKV, o, gate, up, down per layer + lm_head; every weight MatMul is quantized
    assert ops.get("com.microsoft.MatMulNBits", 0) >= 2 * 5 + 1
    assert ops.get("MatMul", 0) == 0
    # RTN's integer zero points too: the source's blocks are carried, nothing is quantized again.
    assert report["facts"]["quantized_weights"]["quantized_again"] == 0
    assert report["checks"]["quality_vs_fp32"]["passed"] is True
    # Saved as onnxruntime optimizes it: the fp16-stored scales are the fp32 tensors the kernels read.
    import onnx

    saved = report["facts"]["saved_optimized"]
    assert saved["level"] == "basic" and saved["bytes"] > saved["compact_bytes"]
    assert not [i.name for i in onnx.load(str(tmp_path / "ort-q" / "model.onnx")).graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    # --compact keeps the quantized layout as written: fp16 scales + Cast, smaller, same logits.
    compact = tmp_path / "ort-compact"
    assert cli("target", "ort", tmp_path / "q", "-o", compact, "--compact").exit_code == 0
    compact_report = read_json(compact / "target.json")
    assert "saved_optimized" not in compact_report["facts"] and compact_report["facts"]["ops"]["Cast"] > ops.get("Cast", 0)
    assert sum(p.stat().st_size for p in compact.glob("model.onnx*")) == saved["compact_bytes"]
    assert compact_report["checks"]["parity_vs_source"]["max_abs_logit_diff"] < 1e-3 and compact_report["passed"] is True


def test_bad_input(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    result = cli("target", "ort", tmp_path / "empty", "-o", tmp_path / "out")
    assert result.exit_code == 3 and len(result.stderr_lines) == 1
    result = cli("target", "nope", tmp_path, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "nope" in result.stderr


@needs_builder
@pytest.mark.parametrize("name,spec", [
    # every q/k/v tensor Q4_1 (the demo's format): one MatMulNBits over the stacked blocks
    ("uniform", "Q4_1"),
    # q Q4_0, k Q4_1, v Q8_0: one MatMulNBits per part, outputs concatenated
    ("mixed", None),
])
def test_gguf_import_covers_the_builders_fused_qkv_and_tied_table(tmp_path, cli, monkeypatch, name, spec):
    from tests.gguf_fixtures import TinyLlamaSpec, write_tiny_llama_gguf

    types = TinyLlamaSpec().types
    if spec:
        types = {role: spec for role in types}
    monkeypatch.setenv("EDGEPACK_GENAI_BUILDER_PYTHON", str(builder_python()))  # it lives under the real cache
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))  # the GGUF's dequantized HF folder goes here
    gguf_file = write_tiny_llama_gguf(tmp_path / f"{name}.gguf", TinyLlamaSpec(types=types, embedding="Q8_0"))
    assert cli("convert", gguf_file, "-o", tmp_path / "fp32", "--no-verify").exit_code == 0
    # The exact import (accuracy_level 0), so the two graphs must agree to float rounding.
    result = cli("quantize", tmp_path / "fp32", "-o", tmp_path / "q", "--scheme", "gguf", "--accuracy-level", "0", "--eval-tokens", "64")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "ort"
    result = cli("target", "ort", tmp_path / "q", "-o", out, "--graph", "builder")
    assert result.exit_code == 0, result.stderr
    report = _check_bundle(out, "builder")
    imported = report["facts"]["scheme_facts"]
    assert imported["unmatched"] == [] and imported["matmuls_kept_float"] == []
    assert [len(f["gguf_tensors"]) for f in imported["fused"]] == [3, 3]  # one fused qkv per layer
    assert all(f["one_matmul"] is (spec is not None) for f in imported["fused"])
    assert imported["embedding"]["shares_weights_with"] == "lm_head"  # the tied table is stored once
    import onnx

    model = onnx.load(str(out / "model.onnx"))
    floats = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
              and min(i.dims) >= 64]
    assert floats == []  # no float weight matrix is left (the block minimums are [k_blocks, N] with k_blocks 2)
    # Lossless: the quantized builder graph computes what the quantized optimum graph computes.
    assert report["checks"]["parity_vs_source"]["max_abs_logit_diff"] < 1e-3
    assert report["checks"]["parity_vs_source"]["top1_agreement"] == 1.0


@needs_builder
def test_int4_at_level_4_runs_one_kernel_per_weight_and_converts_to_ort(exported_tiny_factory, tmp_path, cli):
    """HQQ's float zero points at accuracy_level 4 on the builder graph: integer zero points plus residue columns."""
    report = _ort_bundle_of_quantized(exported_tiny_factory, tmp_path, cli, "--scheme", "int4", "--accuracy-level", "4")
    out = tmp_path / "ort-q"
    source_layout = read_json(tmp_path / "q" / "quantize.json")["facts"]["cpu_layout"]
    carried = report["facts"]["quantized_weights"]
    ops = report["facts"]["ops"]
    # 2 layers x (qkv, o, gate, up, down): each one MatMulNBits with integer zero points, no MatMul + Add pair;
    # the only float MatMuls left are the block sums, one per distinct activation (4 per layer). The residue
    # columns are the source's own (q, k and v's stacked for the fused qkv), not computed again.
    assert source_layout["offset_columns"] == 2 * 7 and source_layout["float_zero_points"] == 0
    assert carried["reused_from_source"] == 2 * 5 + 2 and carried["quantized_again"] == 0  # + lm_head, embedding
    assert ops["com.microsoft.MatMulNBits"] == 2 * 5 + 1 and ops.get("MatMul", 0) == 2 * 4
    assert report["checks"]["parity_vs_source"]["passed"] and report["checks"]["quality_vs_fp32"]["passed"]
    # The fast graph converts to ORT format (the builder's shape hints used to stop the usability checker).
    mobile = tmp_path / "mobile"
    result = cli("target", "ort-mobile", out, "-o", mobile)  # within the default 5% (the bundle is saved optimized)
    assert result.exit_code == 0, result.stderr
    mobile_checks = read_json(mobile / "target.json")["checks"]
    assert mobile_checks["parity_vs_onnx"]["max_abs_diff"] <= 1e-4
    assert mobile_checks["size_vs_onnx"]["passed"] is True and mobile_checks["size_vs_onnx"]["max_ratio"] == 1.05
