"""Issue #4 acceptance on the real demo model (marked `demo`): onnxruntime-genai runs the `ort` bundle
of SmolLM2 (fp32 and int4) and its greedy tokens equal edgepack's; `.ort` matches `.onnx`."""

from __future__ import annotations

import pytest

from edgepack.targets.genai_builder import builder_python
from tests.conftest import read_json

pytestmark = [pytest.mark.demo,
              pytest.mark.skipif(builder_python() is None, reason="onnxruntime-genai builder env not set up (scripts/setup.sh)")]


@pytest.mark.parametrize("scheme", ["fp32", "gguf"])
def test_genai_runs_the_bundle_token_for_token(demo_stages, request, tmp_path, cli, scheme):
    if scheme == "fp32":
        out = tmp_path / "ort-fp32"
        result = cli("target", "ort", demo_stages.paths["export"], "-o", out)
        assert result.exit_code == 0, result.stderr
    else:
        # The starter recipe's ort bundle of its gguf scheme (max_context 2048, the default), as the session's
        # `demo_targets` built it for the starter build to reuse (read only).
        out = request.getfixturevalue("demo_targets").paths[f"ort/{scheme}"]
    report = read_json(out / "target.json")
    assert report["facts"]["graph_route"] == "builder"
    assert report["facts"]["ops"]["com.microsoft.GroupQueryAttention"] == 30
    genai = report["checks"]["onnxruntime_genai"]
    assert genai["greedy_tokens_identical"] is True and len(genai["genai_tokens"]) >= 5
    assert "Paris" in report["checks"]["edgepack_runtime"]["text"]
    assert report["facts"]["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4  # layers x (K,V) x kv heads x head dim x fp32
    assert report["facts"]["kv_bytes_at_max_context"] == 2048 * report["facts"]["kv_bytes_per_token"]
    if scheme == "fp32":
        # The builder ties the table as Gather(Transpose(lm_head)): stored once, in the gather's layout.
        saved = report["facts"]["saved_optimized"]
        assert saved["tied_tables_stored_once"] == 1 and saved["bytes"] < saved["compact_bytes"] + 1e6
    if scheme == "gguf":
        # every weight of the builder graph carries the GGUF's blocks: 30 fused q/k/v, the tied table once
        imported = report["facts"]["scheme_facts"]
        assert imported["unmatched"] == [] and imported["matmuls_kept_float"] == []
        assert len(imported["fused"]) == 30 and all(f["one_matmul"] for f in imported["fused"])
        assert imported["embedding"]["shares_weights_with"] == "lm_head"
        # The GGUF file is 98.4 MB (272 MB before the fused matching). Saved as onnxruntime holds it (fp32 scales,
        # both planes' scales for the tied table's gather and matmul) the bundle is 126 MB.
        saved = report["facts"]["saved_optimized"]
        assert saved["compact_bytes"] < 110e6 and saved["bytes"] < 135e6
        assert saved["bytes"] == sum(p.stat().st_size for p in out.glob("model.onnx*"))
        # Its ORT-format file stays within 5% of it, with identical logits.
        mobile = tmp_path / "mobile-gguf"
        result = cli("target", "ort-mobile", out, "-o", mobile)
        assert result.exit_code == 0, result.stderr
        checks = read_json(mobile / "target.json")["checks"]
        assert checks["size_vs_onnx"]["ratio"] <= 1.05 and checks["parity_vs_onnx"]["max_abs_diff"] <= 1e-4
    assert report["checks"]["shared_kv_buffer"]["tokens_identical_to_copied_cache"] is True
    # onnxruntime-genai's own tokenizer reads the bundle's tokenizer as Hugging Face does.
    assert report["checks"]["tokenizer_genai"]["passed"] is True
    assert report["checks"]["onnxruntime_genai"]["prompt_ids_identical"] is True
    assert "Paris" in report["checks"]["onnxruntime_genai"]["genai_text"]  # genai alone: its tokenizer, template, decode
    _genai_tokenizes_like_hugging_face(out)


def _genai_tokenizes_like_hugging_face(bundle):
    """An app's view: og.Tokenizer(og.Model(bundle)) on text with spaces, newlines, digits and unicode."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    genai, hf = og.Tokenizer(og.Model(str(bundle))), AutoTokenizer.from_pretrained(str(bundle))
    assert [int(i) for i in genai.encode("Hello world")] == hf("Hello world")["input_ids"] == [19556, 905]
    sample = "Name three primary colors.\n\n  1. Red,  2. Blue — naïve café 日本 🙂 2024"
    ids = hf(sample)["input_ids"]
    assert [int(i) for i in genai.encode(sample)] == ids and genai.decode(ids) == sample
    messages = [{"role": "user", "content": "Name three primary colors."}]
    import json

    chat = genai.apply_chat_template(messages=json.dumps(messages), add_generation_prompt=True)
    assert chat == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert hf.eos_token == "<|im_end|>"


def test_ort_mobile_matches_onnx_within_5_percent_size(smollm2_export, tmp_path, cli):
    out = tmp_path / "mobile"
    result = cli("target", "ort-mobile", smollm2_export, "-o", out)
    assert result.exit_code == 0, result.stderr
    checks = read_json(out / "target.json")["checks"]
    assert checks["parity_vs_onnx"]["max_abs_diff"] <= 1e-4
    assert checks["size_vs_onnx"]["ratio"] <= 1.05
