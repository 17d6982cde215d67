"""`run` holds prompt + new tokens to the model's context: exports (position embeddings) and `ort` bundles
(genai_config.json context_length, smaller than the graph's own limit)."""

from __future__ import annotations

import pytest

from edgepack.errors import BadInputError, UsageError
from edgepack.runtime import DecoderSession, create_session, generate, load_model_dir
from edgepack.runtime.run import RunConfig, run_prompt
from edgepack.targets.genai_builder import builder_python
from tests.conftest import run_cli

needs_builder = pytest.mark.skipif(builder_python() is None, reason="onnxruntime-genai builder env not set up (scripts/setup.sh)")

# About 300 tokens with the tiny tokenizer: past the tiny models' 256 positions.
LONG_PROMPT = "Paris is the capital of France. " * 40
# About 80 tokens: inside the graph's 256 positions, past a 64-token bundle.
MEDIUM_PROMPT = "Paris is the capital of France. " * 10


def _prompt_tokens(folder, text: str) -> int:
    return len(load_model_dir(folder).load_tokenizer()(text)["input_ids"])


@pytest.fixture(scope="module")
def ort64(exported_tiny_factory, tmp_path_factory):
    """The builder graph of the tiny llama with a 64-token context: its rotary tables still cover 256 positions."""
    out = tmp_path_factory.mktemp("context") / "ort64"
    result = run_cli("target", "ort", exported_tiny_factory("llama"), "-o", out, "--graph", "builder", "--max-context", "64", "--no-verify")
    assert result.exit_code == 0, result.stderr
    return out


def test_context_length_of_exports_comes_from_the_position_embeddings(exported_tiny_factory):
    assert load_model_dir(exported_tiny_factory("llama")).context_length == 256  # max_position_embeddings
    assert load_model_dir(exported_tiny_factory("gpt2")).context_length == 256  # n_positions


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_longer_than_the_context_is_one_usage_error(exported_tiny_factory, cli, arch):
    folder = exported_tiny_factory(arch)
    tokens = _prompt_tokens(folder, LONG_PROMPT)
    assert tokens > 256
    result = cli("run", folder, "-p", LONG_PROMPT, "--no-chat", "-n", "4")
    assert result.exit_code == 2, result.stderr
    assert result.stderr_lines == [f"error: the prompt is too long for this model: {tokens} tokens, and its context holds 256 "
                                   "(prompt and new tokens together)"]
    assert result.stdout == ""


def test_max_new_tokens_past_the_context_stops_there(exported_tiny_factory, cli):
    """gpt2's learned positions end at 256: generating past them used to crash inside onnxruntime."""
    folder = exported_tiny_factory("gpt2")
    result = run_prompt(folder, "hello", RunConfig(max_new_tokens=300))
    generation = result.generation
    assert result.context_length == 256
    assert generation.stop_reason == "context"
    assert len(generation.prompt_tokens) + len(generation.tokens) == 256
    run = cli("run", folder, "-p", "hello", "-n", "300")
    assert run.exit_code == 0, run.stderr
    assert "(stop: context full at 256 tokens)" in run.stderr
    assert "error" not in run.stderr


def test_generate_bounds_at_the_context(exported_tiny_factory):
    model_dir = load_model_dir(exported_tiny_factory("llama"))
    decoder = DecoderSession(create_session(model_dir.onnx_path, threads=1), model_dir.config)
    prompt = [5, 17, 42, 99, 7]
    # exactly the room left: the requested length, not the context, ends it
    assert generate(decoder, prompt, max_new_tokens=3, context_length=8).stop_reason == "length"
    clamped = generate(decoder, prompt, max_new_tokens=4, context_length=8)
    assert clamped.stop_reason == "context" and len(clamped.tokens) == 3
    assert len(generate(decoder, prompt, max_new_tokens=50, context_length=6).tokens) == 1
    with pytest.raises(UsageError, match="5 tokens, and its context holds 5"):
        generate(decoder, prompt, max_new_tokens=1, context_length=5)
    with pytest.raises(UsageError, match="zero tokens"):
        generate(decoder, [], max_new_tokens=1)


def test_encoder_graph_is_not_a_decoder(exported_tiny_factory):
    model_dir = load_model_dir(exported_tiny_factory("bert"))
    with pytest.raises(BadInputError, match="not a decoder graph"):
        DecoderSession(create_session(model_dir.onnx_path, threads=1), model_dir.config)


@needs_builder
def test_bundle_context_length_bounds_run(ort64, cli):
    """The bundle promises 64 positions (genai_config.json): `run` keeps to them though the graph would go further."""
    assert load_model_dir(ort64).context_length == 64
    tokens = _prompt_tokens(ort64, MEDIUM_PROMPT)
    assert 64 < tokens < 256
    result = cli("run", ort64, "-p", MEDIUM_PROMPT, "--no-chat")
    assert result.exit_code == 2, result.stderr
    assert result.stderr_lines == [f"error: the prompt is too long for this model: {tokens} tokens, and its context holds 64 "
                                   "(prompt and new tokens together)"]

    # A huge --max-new-tokens sizes the shared KV buffer to the context and stops where onnxruntime-genai stops.
    run = cli("run", ort64, "-p", "hello", "-n", "100000")
    assert run.exit_code == 0, run.stderr
    assert "(stop: context full at 64 tokens)" in run.stderr
    result = run_prompt(ort64, "hello", RunConfig(max_new_tokens=100000))
    assert result.generation.stop_reason == "context"
    assert len(result.generation.prompt_tokens) + len(result.generation.tokens) == 64

    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(ort64))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False)  # max_length: the bundle's own 64
    generator = og.Generator(model, params)
    generator.append_tokens(result.generation.prompt_tokens)
    while not generator.is_done():
        generator.generate_next_token()
    assert list(generator.get_sequence(0)) == result.generation.prompt_tokens + result.generation.tokens


@needs_builder
def test_profile_holds_to_the_same_context(ort64, cli, tmp_path):
    result = cli("profile", ort64, "-o", tmp_path / "p.json", "--prompt-len", "60", "--gen-len", "8", "--runs", "1", "--warmup", "0")
    assert result.exit_code == 2, result.stderr
    assert result.stderr_lines == ["error: --prompt-len 60 + --gen-len 8 = 68 exceeds the model's context 64"]
    assert not (tmp_path / "p.json").exists()
