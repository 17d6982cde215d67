"""`edgepack run`: one prompt through an exported decoder, tokens streamed as they are produced."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgepack.core.windows import check_in_vocab, vocab_size_of
from edgepack.errors import BadInputError, UsageError
from edgepack.runtime.generate import DecoderSession, GenerationResult, SamplingConfig, TextStreamer, generate, new_token_limit
from edgepack.runtime.model_dir import TEXT_GENERATION, load_model_dir
from edgepack.runtime.session import create_session


@dataclass(frozen=True)
class RunConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    chat: bool = True
    threads: int | None = None


@dataclass
class RunResult:
    text: str
    prompt_text: str
    generation: GenerationResult
    context_length: int | None = None  # the model's limit on prompt + generated tokens (None: unknown)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> tuple[list[int], str]:
    """Token ids for the prompt: through the chat template when asked and the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:  # the template is the model folder's, and may be broken or refuse a lone user turn
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            raise BadInputError(f"the model's chat template fails on the prompt: {reason} (--no-chat sends the prompt without it)") from exc
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), text
    return list(tokenizer(prompt)["input_ids"]), prompt


def run_prompt(directory: Path | str, prompt: str, config: RunConfig = RunConfig(), write=None) -> RunResult:
    if not prompt:
        # Through a chat template an empty message still makes a prompt, and the model answers nothing in particular.
        raise UsageError("the prompt is empty")
    model_dir = load_model_dir(directory)
    if model_dir.task != TEXT_GENERATION:
        raise UsageError(f"{directory} holds a {model_dir.task} model; `edgepack run` generates text with decoder exports")
    tokenizer = model_dir.load_tokenizer()
    prompt_ids, prompt_text = encode_prompt(tokenizer, prompt, config.chat)
    check_in_vocab(prompt_ids, vocab_size_of(model_dir.config))
    if not prompt_ids:
        raise UsageError("the prompt is empty after tokenization")
    context = model_dir.context_length
    new_token_limit(len(prompt_ids), config.max_new_tokens, context)  # a prompt that does not fit fails before loading
    decoder = DecoderSession(create_session(model_dir.onnx_path, threads=config.threads), model_dir.config,
                             share_kv_buffer=model_dir.share_kv_buffer)
    eos = model_dir.eos_token_ids(tokenizer)
    streamer = TextStreamer(tokenizer, write or (lambda text: None), skip_ids=eos)
    sampling = SamplingConfig(config.temperature, config.top_k, config.top_p, config.seed)
    result = generate(
        decoder, prompt_ids, max_new_tokens=config.max_new_tokens, sampling=sampling, eos_token_ids=eos, on_token=streamer,
        context_length=context,
    )
    streamer.finish()
    text = tokenizer.decode([t for t in result.tokens if t not in eos], skip_special_tokens=True)
    return RunResult(text=text, prompt_text=prompt_text, generation=result, context_length=context)
