"""`edgepack convert` on tiny random models of each supported family: parity figures and convert.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import read_json
from tests.tiny_models import DECODERS

ATOL = 1e-3


@pytest.mark.parametrize("arch", DECODERS)
def test_decoder_export_matches_pytorch(arch, tiny_model_factory, tmp_path, cli):
    out = tmp_path / "export"
    result = cli("convert", tiny_model_factory(arch), "-o", out)
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "convert.json")
    parity = report["parity"]
    assert report["task"] == "text-generation"
    assert report["model_type"] == arch
    assert parity["greedy_tokens_identical"] is True
    assert 0.0 <= parity["max_abs_logit_diff"] <= ATOL
    assert parity["passed"] is True
    assert parity["prompts"] == 3
    for prompt in parity["per_prompt"]:
        assert len(prompt["torch_tokens"]) == 32
        assert prompt["onnx_tokens"] == prompt["torch_tokens"]
        assert len(prompt["max_abs_logit_diff_per_step"]) == 9  # prefill + 8 cached decode steps
    # The export carries what `run` needs beside the graph.
    for name in ("model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
        assert report["files"][name] == (out / name).stat().st_size
    assert report["num_parameters"] > 10_000
    assert report["versions"]["onnxruntime"] == "1.32.0"
    assert report["seconds"]["total"] > 0
    assert report["opset"] >= 14


def test_encoder_export_matches_pytorch(tiny_model_factory, tmp_path, cli):
    out = tmp_path / "bert"
    result = cli("convert", tiny_model_factory("bert"), "-o", out)
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "convert.json")
    assert report["task"] == "feature-extraction"
    parity = report["parity"]
    assert parity["max_abs_embedding_diff"] <= ATOL
    assert parity["min_cosine"] >= 0.9999
    assert parity["greedy_tokens_identical"] is None
    assert parity["passed"] is True


def test_task_can_be_forced_to_feature_extraction(tiny_model_factory, tmp_path, cli):
    out = tmp_path / "llama-fe"
    result = cli("convert", tiny_model_factory("llama"), "-o", out, "--task", "feature-extraction")
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "convert.json")
    assert report["task"] == "feature-extraction"
    assert report["parity"]["passed"] is True


def test_no_verify_skips_parity_and_opset_is_honoured(tiny_model_factory, tmp_path, cli):
    out = tmp_path / "opset17"
    result = cli("convert", tiny_model_factory("llama"), "-o", out, "--no-verify", "--opset", "17")
    assert result.exit_code == 0, result.stderr
    report = read_json(out / "convert.json")
    assert report["parity"] is None
    assert report["opset"] == 17


def test_parity_gate_fails_with_exit_1_when_tolerance_is_impossible(tiny_model_factory, tmp_path, cli):
    out = tmp_path / "strict"
    result = cli("convert", tiny_model_factory("llama"), "-o", out, "--atol", "0")
    report = read_json(out / "convert.json")
    # fp32 ONNX Runtime and PyTorch differ in the last bits, so a zero tolerance must fail the gate.
    assert report["parity"]["max_abs_logit_diff"] > 0
    assert report["parity"]["passed"] is False
    assert result.exit_code == 1
    assert result.stderr_lines[-1].startswith("error: parity failed")


def test_force_replaces_existing_output(tiny_model_factory, tmp_path, cli):
    out = tmp_path / "again"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = cli("convert", tiny_model_factory("gpt2"), "-o", out, "--force", "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert not (out / "stale.txt").exists()
    assert (out / "model.onnx").is_file()
    assert not list(tmp_path.glob(".again*")), "temporary folders must be gone"


def test_pickle_weights_convert_with_allow_pickle(tmp_path, cli):
    from tests import tiny_models

    source = tiny_models.build("llama", tmp_path / "pickled", safe_serialization=False)
    assert (source / "pytorch_model.bin").is_file()
    result = cli("convert", source, "-o", tmp_path / "out", "--allow-pickle")
    assert result.exit_code == 0, result.stderr
    assert read_json(tmp_path / "out" / "convert.json")["parity"]["greedy_tokens_identical"] is True


def _tiny_copy(tiny_model_factory, tmp_path, arch="llama"):
    import shutil

    return Path(shutil.copytree(tiny_model_factory(arch), tmp_path / f"{arch}-copy"))


def test_unknown_model_type_lists_decoders_and_encoders_apart(tiny_model_factory, tmp_path, cli):
    model = _tiny_copy(tiny_model_factory, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "frobnicator"
    (model / "config.json").write_text(json.dumps(config))
    result = cli("convert", model, "-o", tmp_path / "out")
    assert result.exit_code == 3, result.stderr
    (line,) = result.stderr_lines
    decoders_text, encoders_text = line.split("Supported decoders: ")[1].split("; supported encoders: ")
    decoders, encoders = set(decoders_text.split(", ")), set(encoders_text.split(", "))
    assert {"llama", "qwen2", "mistral", "phi3", "gemma", "gpt2"} <= decoders
    assert {"bert", "roberta", "distilbert"} <= encoders
    assert not decoders & encoders
    assert not {"bart", "t5", "whisper"} & (decoders | encoders), "encoder-decoders are refused, so not listed"
    assert not {"vit", "resnet", "wav2vec2"} & encoders, "edgepack feeds token ids: no image or audio encoders"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "not-json"])
def test_tokenizer_that_does_not_load_is_bad_input(tiny_model_factory, tmp_path, cli, damage):
    """Dropping it silently gave exit 0 and an export `run` could not use."""
    model = _tiny_copy(tiny_model_factory, tmp_path)
    path = model / "tokenizer.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 3] if damage == "truncated" else "not a tokenizer")
    out = tmp_path / "out"
    result = cli("convert", model, "-o", out)
    assert result.exit_code == 3, result.stderr
    (line,) = result.stderr_lines
    assert line.startswith(f"error: the tokenizer in {model} does not load (tokenizer.json")
    assert "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))
