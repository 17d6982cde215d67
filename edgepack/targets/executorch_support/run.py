"""A `.pte` run in ExecuTorch's Python runtime (the same C++ runtime and kernels an app links), next to the
PyTorch model it came from: logits over the evaluation text, greedy tokens, hidden states, and timing.

A decoder program's KV cache is a buffer of the loaded method: a run starts at position 0 and overwrites what
the one before it left (the attention masks every slot past the current position), so one loaded method serves
every comparison and measurement in turn.
"""

from __future__ import annotations

import time
from pathlib import Path


def load_method(pte: Path, threads: int | None = None):
    """The program's `forward` method, with XNNPACK's thread pool set to `threads` (None: ExecuTorch's default)."""
    import executorch.kernels.quantized  # noqa: F401  (the quantized embedding kernels)
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (the LLM kernels a decoder program may call)
    from executorch.runtime import Runtime

    if threads:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(int(threads))
    return Runtime.get().load_program(str(pte)).load_method("forward")


def thread_count() -> int | None:
    try:
        from executorch.extension.pybindings import portable_lib

        return int(portable_lib._threadpool_get_thread_count())
    except (ImportError, AttributeError):
        return None


def decoder_logits(method, ids: list[int], decode_steps: int):
    """Logits (positions, vocab) for `ids`: all but the last `decode_steps` tokens as one prefill call, then one
    call per token (so the cache path is checked, not only the prefill)."""
    import numpy as np
    import torch

    split = len(ids) - decode_steps
    outputs = [method.execute([torch.tensor([ids[:split]], dtype=torch.long), torch.arange(split, dtype=torch.long)])[0][0]]
    for position in range(split, len(ids)):
        outputs.append(method.execute([torch.tensor([[ids[position]]], dtype=torch.long), torch.tensor([position], dtype=torch.long)])[0][0])
    return np.concatenate([o.float().numpy() for o in outputs])


def _generate(method, prompt: list[int], count: int):
    """Yield (token, seconds of its call) for `count` greedy tokens after `prompt`: the prompt in one call (its
    seconds: the time to the first token), then one call per token."""
    import torch

    t0 = time.perf_counter()
    logits = method.execute([torch.tensor([prompt], dtype=torch.long), torch.arange(len(prompt), dtype=torch.long)])[0]
    token = int(logits[0, -1].argmax())
    yield token, time.perf_counter() - t0
    for position in range(len(prompt), len(prompt) + count - 1):
        t0 = time.perf_counter()
        logits = method.execute([torch.tensor([[token]], dtype=torch.long), torch.tensor([position], dtype=torch.long)])[0]
        token = int(logits[0, -1].argmax())
        yield token, time.perf_counter() - t0


def greedy(method, prompt: list[int], count: int) -> list[int]:
    """`count` greedy tokens after `prompt`."""
    return [token for token, _seconds in _generate(method, prompt, count)]


def encoder_hidden(method, ids, mask):
    """last_hidden_state (tokens, hidden) of one sequence."""
    import torch

    return method.execute([torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)])[0][0].float().numpy()


def timed_generation(method, prompt: list[int], gen_len: int) -> list[float]:
    """Seconds of each step of one greedy generation: the prompt's (TTFT), then each later token's."""
    return [seconds for _token, seconds in _generate(method, prompt, gen_len)]


def measure_decoder(method, prompt: list[int], gen_len: int, runs: int) -> dict:
    """TTFT (the prefill call and the first token's argmax) and decode ms/token (each later token's call),
    median over `runs` after one warm-up run."""
    import statistics

    ttft, per_token = [], []
    for run in range(runs + 1):
        steps = timed_generation(method, prompt, gen_len)
        if run:  # run 0 warms caches and the thread pool
            ttft.append(steps[0] * 1e3)
            per_token.append(statistics.median(steps[1:]) * 1e3)
    return {"ttft_ms": round(statistics.median(ttft), 3), "decode_ms_per_token": round(statistics.median(per_token), 3),
            "decode_ms_per_token_runs": [round(v, 3) for v in per_token], "ttft_ms_runs": [round(v, 3) for v in ttft]}


def measure_encoder(method, ids, mask, runs: int) -> dict:
    """Latency of one sequence (median over `runs` after one warm-up)."""
    import statistics

    times = []
    for run in range(runs + 1):
        t0 = time.perf_counter()
        encoder_hidden(method, ids, mask)
        if run:
            times.append((time.perf_counter() - t0) * 1e3)
    return {"latency_ms": round(statistics.median(times), 3), "latency_ms_runs": [round(v, 3) for v in times]}


# ---------------------------------------------------------------------------------------------- PyTorch


def torch_logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def torch_greedy(model, prompt: list[int], count: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of the PyTorch model, the whole sequence recomputed each step (no cache to share bugs with),
    and at each step the gap in nats between its two likeliest tokens."""
    import torch

    ids, gaps = list(prompt), []
    with torch.no_grad():
        for _ in range(count):
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].double(), -1)
            top2 = torch.topk(log_probs, 2).values
            gaps.append(float(top2[0] - top2[1]))
            ids.append(int(log_probs.argmax()))
    return ids[len(prompt):], gaps


def torch_hidden(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state[0].float().numpy()
