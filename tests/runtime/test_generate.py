"""edgepack's onnxruntime generation loop: cache handling, greedy vs sampling, EOS, streaming, `run`."""

from __future__ import annotations

import numpy as np
import pytest

from edgepack.runtime import DecoderSession, SamplingConfig, create_session, generate, load_model_dir
from edgepack.runtime.generate import sample_next
from edgepack.runtime.run import RunConfig, run_prompt


@pytest.fixture(scope="module")
def llama_dir(exported_tiny_factory):
    return exported_tiny_factory("llama")


@pytest.fixture(scope="module")
def decoder(llama_dir):
    model_dir = load_model_dir(llama_dir)
    return DecoderSession(create_session(model_dir.onnx_path, threads=1), model_dir.config)


def test_cached_decoding_equals_full_recompute(decoder):
    """Logits for the last token are the same whether earlier tokens come from the KV cache or are recomputed."""
    tokens = [5, 17, 42, 99, 7, 300, 12]
    cache, past = decoder.empty_cache(), 0
    cached_rows = []
    for token in tokens:
        logits, cache = decoder.forward([token], cache, past)
        past += 1
        cached_rows.append(logits[-1])
    full, _ = decoder.forward(tokens, decoder.empty_cache(), 0)
    assert np.max(np.abs(np.stack(cached_rows) - full)) < 1e-4
    assert cache["past_key_values.0.key"].shape[2] == len(tokens)


def test_greedy_is_deterministic_and_respects_length(decoder):
    a = generate(decoder, [1, 20, 30], max_new_tokens=12)
    b = generate(decoder, [1, 20, 30], max_new_tokens=12)
    assert a.tokens == b.tokens
    assert len(a.tokens) == 12 and a.stop_reason == "length"
    assert len(a.step_seconds) == 12
    assert a.time_to_first_token_s > 0 and a.decode_ms_per_token > 0


def test_seeded_sampling_reproduces_and_differs_across_seeds(decoder):
    sampling = SamplingConfig(temperature=1.5, top_k=0, top_p=1.0, seed=7)
    a = generate(decoder, [1, 20, 30], max_new_tokens=24, sampling=sampling)
    b = generate(decoder, [1, 20, 30], max_new_tokens=24, sampling=sampling)
    c = generate(decoder, [1, 20, 30], max_new_tokens=24, sampling=SamplingConfig(1.5, 0, 1.0, seed=8))
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_top_k_one_and_tiny_top_p_are_greedy(decoder):
    greedy = generate(decoder, [1, 20, 30], max_new_tokens=10).tokens
    top_k = generate(decoder, [1, 20, 30], max_new_tokens=10, sampling=SamplingConfig(1.0, 1, 1.0, seed=3)).tokens
    top_p = generate(decoder, [1, 20, 30], max_new_tokens=10, sampling=SamplingConfig(1.0, 0, 1e-9, seed=3)).tokens
    assert greedy == top_k == top_p


def test_sample_next_only_picks_from_top_k():
    logits = np.array([0.0, 5.0, 4.9, -3.0, 4.8])
    rng = np.random.default_rng(0)
    picks = {sample_next(logits, SamplingConfig(temperature=2.0, top_k=2, seed=0), rng) for _ in range(200)}
    assert picks == {1, 2}


def test_stops_on_eos(decoder):
    free = generate(decoder, [1, 20, 30], max_new_tokens=6)
    eos = free.tokens[3]
    stopped = generate(decoder, [1, 20, 30], max_new_tokens=6, eos_token_ids={eos})
    first = free.tokens.index(eos)
    assert stopped.stop_reason == "eos"
    assert stopped.tokens == free.tokens[: first + 1]


def test_run_prompt_streams_what_it_returns(llama_dir):
    pieces: list[str] = []
    result = run_prompt(llama_dir, "What is the capital of France?", RunConfig(max_new_tokens=16), write=pieces.append)
    assert "".join(pieces) == result.text
    assert result.prompt_text.startswith("<|im_start|>user\nWhat is the capital of France?")
    assert 1 <= len(result.generation.tokens) <= 16


def test_run_without_chat_template_uses_raw_prompt(llama_dir):
    result = run_prompt(llama_dir, "The capital of France is", RunConfig(max_new_tokens=4, chat=False))
    assert result.prompt_text == "The capital of France is"


def test_cli_run_seed_reproduces(llama_dir, cli):
    args = ("run", llama_dir, "-p", "Once upon a time", "-n", "20", "--temperature", "1.2", "--top-p", "0.95", "--seed", "11", "--no-stats")
    first, second = cli(*args), cli(*args)
    assert first.exit_code == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()


def test_run_refuses_encoder_export(exported_tiny_factory, cli):
    result = cli("run", exported_tiny_factory("bert"), "-p", "hi")
    assert result.exit_code == 2
    assert "feature-extraction" in result.stderr
