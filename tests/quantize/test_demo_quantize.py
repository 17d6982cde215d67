"""Issue #3 acceptance on the real demo model, SmolLM2-135M-Instruct (marked `demo`)."""

from __future__ import annotations

import pytest

from tests.conftest import read_json

pytestmark = pytest.mark.demo


def quantize(cli, export, out, *args):
    result = cli("quantize", export, "-o", out, *args)
    assert result.exit_code == 0, result.stderr
    return read_json(out / "quantize.json")


# "What is the capital of France?" alone is a near tie in fp32 SmolLM2 for the first answer token ("The" 25.33 vs
# "L" 25.24): int8-weight flips it and answers in French ("L'Étoile, la Marseillaise, ..."). Asking for one
# sentence removes the tie; every scheme then answers "The capital of France is Paris."
PROMPT = "What is the capital of France? Answer in one sentence."


def answers_paris(cli, folder):
    result = cli("run", folder, "--prompt", PROMPT, "--max-new-tokens", "24", "--no-stats")
    assert result.exit_code == 0, result.stderr
    assert "Paris" in result.stdout, result.stdout


# int8-weight and gguf are the starter recipe's schemes: the session's `demo_stages` quantized them (the same
# quantize_model and configuration as `edgepack quantize` with its defaults) for the starter build to reuse.


def test_default_int8_is_nearly_lossless_at_under_30_percent(demo_stages, cli):
    folder = demo_stages.paths["int8-weight"]
    report = read_json(folder / "quantize.json")
    assert report["scheme"]["name"] == "int8-weight"
    assert report["quality"]["top1_agreement"] >= 0.95
    assert report["quality"]["kl_mean"] <= 0.01
    assert report["size_ratio"] <= 0.30
    assert report["quality"]["positions"] >= 512
    answers_paris(cli, folder)


def test_gguf_import_is_lossless_and_under_100_mb(demo_stages, cli):
    folder = demo_stages.paths["gguf"]
    report = read_json(folder / "quantize.json")
    assert report["scheme"]["name"] == "gguf"
    assert report["size_bytes"] <= 100_000_000
    assert report["quality"]["top1_agreement"] >= 0.95
    assert report["quality"]["kl_mean"] <= 0.01
    assert report["facts"]["embedding"]["shares_weights_with"] == "lm_head"  # the tied table is stored once
    assert report["facts"]["unmatched"] == [] and report["facts"]["requantized"] == []
    answers_paris(cli, folder)


def test_best_int4_from_fp32_is_under_110_mb_and_half_the_builders_kl(smollm2_export, tmp_path, cli):
    report = quantize(cli, smollm2_export, tmp_path / "int4", "--scheme", "int4")
    assert report["size_bytes"] <= 110_000_000
    assert report["quality"]["kl_mean"] <= 0.5 * 0.42  # onnxruntime-genai builder INT4, measured for issue #3
    answers_paris(cli, tmp_path / "int4")


def test_auto_picks_the_smallest_scheme_within_budget(smollm2_export, tmp_path, cli):
    result = cli("quantize", smollm2_export, "-o", tmp_path / "auto", "--scheme", "auto", "--max-kl", "0.05")
    assert result.exit_code == 0, result.stderr
    report = read_json(tmp_path / "auto" / "quantize.json")
    assert report["auto"]["picked"] and report["auto"]["picked"].startswith("gguf")  # GGUF source: its own blocks first
    assert "auto picked: gguf" in result.stdout


@pytest.mark.parametrize("scheme", ["int8-dynamic", "fp16"])
def test_other_schemes_still_answer(smollm2_export, tmp_path, cli, scheme):
    report = quantize(cli, smollm2_export, tmp_path / scheme, "--scheme", scheme, "--eval-tokens", "128")
    assert report["scheme"]["name"] == scheme
    answers_paris(cli, tmp_path / scheme)
