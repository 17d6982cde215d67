"""edgepack's own decoding loop over an ONNX decoder with its KV cache as explicit inputs/outputs.

Written here rather than taken from optimum's ORTModelForCausalLM because later stages (quantized
graphs, static-shape NPU graphs, profiling) need the loop's timing and cache handling in our hands,
and because it must run with onnxruntime alone, without torch.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np

from edgepack.errors import BadInputError, UsageError

_PAST_NAME = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy. top_k 0 and top_p 1.0 mean no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]
    stop_reason: str  # "eos" | "length" | "context" (max_new_tokens would have passed the model's context)
    time_to_first_token_s: float
    decode_seconds: float  # time for all tokens after the first
    step_seconds: list[float] = field(default_factory=list)

    @property
    def decode_ms_per_token(self) -> float | None:
        n = len(self.tokens) - 1
        return 1000.0 * self.decode_seconds / n if n > 0 else None


class DecoderSession:
    """Wraps an InferenceSession of a decoder exported with past key/values; carries the cache between calls.

    `share_kv_buffer=True` is for graphs whose attention is onnxruntime's GroupQueryAttention (the `ort`
    target's builder graph, marked `past_present_share_buffer` in its genai_config.json): the cache is then
    one fixed-size buffer per layer, bound as both past input and present output through IO binding, so
    GroupQueryAttention appends each step's keys and values in place, as onnxruntime-genai does. The
    default copies the whole cache into new present tensors every step (a cost that grows with the
    context), which is what any other graph needs.
    """

    def __init__(self, session, config: dict | None = None, *, share_kv_buffer: bool = False):
        self.session = session
        self.share_kv_buffer = share_kv_buffer
        config = config or {}
        self.input_names = {i.name for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]
        if "input_ids" not in self.input_names or "logits" not in self.output_names:
            raise BadInputError("not a decoder graph: needs an input_ids input and a logits output")
        self.past_inputs: list[tuple[str, list]] = []
        for inp in session.get_inputs():
            if _PAST_NAME.match(inp.name):
                self.past_inputs.append((inp.name, list(inp.shape), _ORT_TO_NUMPY.get(inp.type, np.float32)))
        self.past_inputs.sort(key=lambda item: (int(_PAST_NAME.match(item[0]).group(1)), item[0]))
        self._config = config

    @property
    def has_cache(self) -> bool:
        return bool(self.past_inputs)

    def empty_cache(self, capacity: int | None = None) -> dict:
        """An empty cache. With `share_kv_buffer`, `capacity` (the most positions it will hold) is required."""
        if self.share_kv_buffer and not capacity:
            raise UsageError("a shared KV buffer needs its capacity (prompt + new tokens)")
        cache = {}
        for name, shape, dtype in self.past_inputs:
            # [batch, kv_heads, past_len, head_dim]: the static dims come from the graph, else from the config.
            heads = shape[1] if isinstance(shape[1], int) else self._kv_heads()
            head_dim = shape[3] if isinstance(shape[3], int) else self._head_dim()
            if self.share_kv_buffer:
                import onnxruntime as ort

                cache[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, capacity, head_dim), dtype=dtype))
            else:
                cache[name] = np.zeros((1, heads, 0, head_dim), dtype=dtype)
        return cache

    def _kv_heads(self) -> int:
        return int(self._config.get("num_key_value_heads") or self._config.get("num_attention_heads") or self._config["n_head"])

    def _head_dim(self) -> int:
        if self._config.get("head_dim"):
            return int(self._config["head_dim"])
        hidden = self._config.get("hidden_size") or self._config["n_embd"]
        heads = self._config.get("num_attention_heads") or self._config["n_head"]
        return int(hidden) // int(heads)

    def make_feeds(self, token_ids, cache: dict[str, np.ndarray], past_length: int) -> dict[str, np.ndarray]:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        feeds = {"input_ids": ids}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones((1, past_length + n), dtype=np.int64)
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.arange(past_length, past_length + n, dtype=np.int64).reshape(1, n)
        feeds.update(cache)
        return feeds

    def forward(self, token_ids, cache: dict, past_length: int):
        """Run `token_ids` (a sequence) after `past_length` cached positions; return (logits [n, vocab], new cache)."""
        if self.share_kv_buffer:
            return self._forward_shared(token_ids, cache, past_length)
        outputs = self.session.run(None, self.make_feeds(token_ids, cache, past_length))
        named = dict(zip(self.output_names, outputs))
        new_cache = {}
        for name, _shape, _dtype in self.past_inputs:
            new_cache[name] = named[name.replace("past_key_values", "present")]
        return named["logits"][0], new_cache

    def _forward_shared(self, token_ids, cache: dict, past_length: int):
        feeds = self.make_feeds(token_ids, {}, past_length)
        needed = past_length + feeds["input_ids"].shape[1]
        capacity = next(iter(cache.values())).shape()[2] if cache else 0
        if needed > capacity:
            raise UsageError(f"the KV buffer holds {capacity} positions; {needed} needed")
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, buffer in cache.items():
            binding.bind_ortvalue_input(name, buffer)
            binding.bind_ortvalue_output(name.replace("past_key_values", "present"), buffer)
        binding.bind_output("logits")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[-1].numpy()[0], cache


def encoder_feeds(token_ids, input_names) -> dict[str, np.ndarray]:
    """Inputs for one sequence through an encoder graph, limited to the inputs the graph has."""
    return encoder_batch_feeds([list(token_ids)], input_names)


def encoder_batch_feeds(sequences, input_names) -> dict[str, np.ndarray]:
    """Inputs for a batch of sequences, right-padded with token 0 and masked out, limited to the graph's inputs."""
    width = max(len(s) for s in sequences)
    ids = np.zeros((len(sequences), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    feeds = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids),
        "position_ids": np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape).copy(),
    }
    return {name: value for name, value in feeds.items() if name in input_names}


def sample_next(logits: np.ndarray, sampling: SamplingConfig, rng: np.random.Generator) -> int:
    if sampling.greedy:
        return int(np.argmax(logits))
    # -inf marks a token the graph rules out; NaN, +inf or no finite logit at all is a broken graph (e.g. fp16 overflow).
    if np.isnan(logits).any() or np.isposinf(logits).any() or not np.isfinite(logits).any():
        raise BadInputError("the model's next-token logits are not finite (NaN or infinite): the graph is broken, "
                            "nothing can be sampled from it")
    with np.errstate(over="ignore", invalid="ignore"):
        scores = logits.astype(np.float64) / sampling.temperature
        if sampling.top_k and sampling.top_k < scores.shape[-1]:
            kth = np.partition(scores, -sampling.top_k)[-sampling.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - np.max(scores))
        probs /= probs.sum()
    if not np.isfinite(probs).all():
        raise UsageError(f"temperature {sampling.temperature:g} is too small to sample with (the scaled logits overflow); "
                         "use 0 for greedy decoding")
    if sampling.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = order[: int(np.searchsorted(cumulative, sampling.top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.shape[-1], p=probs))


def new_token_limit(prompt_len: int, max_new_tokens: int, context_length: int | None) -> int:
    """How many tokens may be generated after `prompt_len` prompt tokens; UsageError when none can."""
    if prompt_len < 1:
        raise UsageError("the prompt encodes to zero tokens")
    if context_length is None:
        return max_new_tokens
    if prompt_len >= context_length:
        raise UsageError(
            f"the prompt is too long for this model: {prompt_len} tokens, and its context holds "
            f"{context_length} (prompt and new tokens together)"
        )
    return min(max_new_tokens, context_length - prompt_len)


def generate(
    decoder: DecoderSession,
    prompt_tokens: list[int],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    eos_token_ids: set[int] | frozenset = frozenset(),
    on_token=None,
    context_length: int | None = None,
) -> GenerationResult:
    """Prefill the prompt, then decode one token at a time with the KV cache until EOS or `max_new_tokens`.

    With `context_length` (the model's limit on prompt + generated tokens), a prompt that leaves no room
    for a new token is a UsageError, and generation stops with stop_reason "context" when the context is
    full before `max_new_tokens`: the number is an upper bound, like EOS, and a graph fed past its
    positions fails or extrapolates silently.
    """
    limit = new_token_limit(len(prompt_tokens), max_new_tokens, context_length)
    rng = np.random.default_rng(sampling.seed)
    cache = decoder.empty_cache(len(prompt_tokens) + limit)
    tokens: list[int] = []
    step_seconds: list[float] = []
    stop_reason = "length" if limit == max_new_tokens else "context"
    start = time.perf_counter()
    pending = list(prompt_tokens)
    past_length = 0
    ttft = 0.0
    while len(tokens) < limit:
        step_start = time.perf_counter()
        if decoder.has_cache:
            logits, cache = decoder.forward(pending, cache, past_length)
            past_length += len(pending)
        else:  # a graph without a cache recomputes the whole sequence each step
            logits, _ = decoder.forward(list(prompt_tokens) + tokens, {}, 0)
        token = sample_next(logits[-1], sampling, rng)
        now = time.perf_counter()
        step_seconds.append(now - step_start)
        if not tokens:
            ttft = now - start
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos_token_ids:
            stop_reason = "eos"
            break
        pending = [token]
    total = time.perf_counter() - start
    return GenerationResult(
        prompt_tokens=list(prompt_tokens),
        tokens=tokens,
        stop_reason=stop_reason,
        time_to_first_token_s=ttft,
        decode_seconds=total - ttft,
        step_seconds=step_seconds,
    )


class TextStreamer:
    """Turns a stream of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer, write, skip_ids: set[int] | frozenset = frozenset()):
        self.tokenizer = tokenizer
        self.write = write
        self.skip_ids = skip_ids
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, token: int) -> None:
        if token in self.skip_ids:
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.printed :])
        self.printed = len(text)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > self.printed:
            self.write(text[self.printed :])
            self.printed = len(text)
