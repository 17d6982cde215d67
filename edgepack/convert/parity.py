"""Numerical parity of an ONNX export against the PyTorch model it came from.

Decoders: for each prompt, the prompt prefill plus `decode_steps` cached decode steps are fed the
same tokens in both runtimes and compared logit by logit; then each runtime greedily generates
`greedy_tokens` tokens on its own (EOS ignored, so both produce the full length) and the token
sequences are compared. Encoders: per-token hidden states, max abs diff and cosine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.core.gates import DIRECTIONS, GateResult, boolean_gate, evaluate_gate, failed
from edgepack.core.metrics import cosine_per_position, max_abs_diff
from edgepack.runtime.model_dir import TEXT_GENERATION

PARITY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
)
MIN_COSINE = 0.9999


def check_tokenizer_fits(torch_model, tokenizer) -> None:
    """Bad input, before the export, when the tokenizer gives ids the model has no embedding row for.

    Checked on the parity prompts and the bundled evaluation and calibration texts, which every later
    stage feeds by default: a tokenizer from another model would otherwise fail inside PyTorch.
    """
    from edgepack.core.texts import calibration_text, eval_text
    from edgepack.core.windows import check_in_vocab, token_ids

    try:
        rows = int(torch_model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        return
    if tokenizer is None:
        return
    for prompt in PARITY_PROMPTS:
        check_in_vocab(list(tokenizer(prompt, add_special_tokens=True)["input_ids"]), rows)
    for text, _origin in (eval_text(None), calibration_text(None)):
        token_ids(tokenizer, text, vocab_size=rows)


def prompt_token_ids(tokenizer, vocab_size: int) -> list[list[int]]:
    if tokenizer is not None:
        ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in PARITY_PROMPTS]
        if all(ids):
            return [list(map(int, i)) for i in ids]
    # No tokenizer: fixed pseudo-random ids still exercise every path of the graph.
    rng = np.random.default_rng(0)
    return [list(map(int, rng.integers(0, vocab_size, size=n))) for n in (6, 9, 12)]


@dataclass
class TorchReference:
    """PyTorch's side of the parity check, computed before the PyTorch model is freed.

    Decoders: per prompt, the greedy tokens and the logits row that chose each. Encoders: per prompt,
    the feeds (named as the ONNX graph's inputs) and the last hidden state.
    """

    task: str
    model_config: dict
    prompts: list[list[int]]
    outputs: list
    # Encoders: all prompts as one right-padded batch (feeds, last hidden state [B, T, H]), the reference of the
    # pooled sentence embedding, padding included.
    batch: tuple[dict, np.ndarray] | None = None


def check_parity(torch_model, tokenizer, onnx_path: Path, task: str, config) -> dict:
    """Both halves in one call (the PyTorch model stays alive throughout)."""
    return compare_with_onnx(torch_reference(torch_model, tokenizer, onnx_path, task, config), onnx_path, config)


def torch_reference(torch_model, tokenizer, onnx_path: Path, task: str, config) -> TorchReference:
    vocab = int(getattr(torch_model.config, "vocab_size", 0) or 0)
    prompts = prompt_token_ids(tokenizer, vocab or 100)
    if task == TEXT_GENERATION:
        outputs = [_torch_greedy(torch_model, prompt, config.greedy_tokens) for prompt in prompts]
    else:
        outputs = [_torch_encode(torch_model, prompt, _graph_inputs(onnx_path)) for prompt in prompts]
        return TorchReference(task, torch_model.config.to_dict(), prompts, outputs,
                              batch=_torch_encode_batch(torch_model, prompts, _graph_inputs(onnx_path)))
    return TorchReference(task, torch_model.config.to_dict(), prompts, outputs)


def compare_with_onnx(reference: TorchReference, onnx_path: Path, config, pooling=None) -> dict:
    from edgepack.runtime.session import create_session

    session = create_session(onnx_path)
    if reference.task == TEXT_GENERATION:
        return decoder_parity(reference, session, config)
    return encoder_parity(reference, session, config, pooling)


def _graph_inputs(onnx_path: Path) -> set[str]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return {i.name for i in graph.input if i.name not in initializers}


def _torch_encode(torch_model, prompt: list[int], input_names: set[str]) -> tuple[dict, np.ndarray]:
    import torch

    from edgepack.runtime.generate import encoder_feeds

    feeds = encoder_feeds(prompt, input_names)
    with torch.no_grad():
        hidden = torch_model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state[0].double().numpy()
    return feeds, hidden


def _torch_encode_batch(torch_model, prompts: list[list[int]], input_names: set[str]) -> tuple[dict, np.ndarray]:
    import torch

    from edgepack.runtime.generate import encoder_batch_feeds

    feeds = encoder_batch_feeds(prompts, input_names)
    with torch.no_grad():
        hidden = torch_model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.double().numpy()
    return feeds, hidden


def _torch_greedy(torch_model, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits row that chose each, with the KV cache, in PyTorch."""
    import torch

    tokens: list[int] = []
    logits_rows: list[np.ndarray] = []
    with torch.no_grad():
        ids = torch.tensor([prompt], dtype=torch.long)
        out = torch_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        for step in range(steps):
            row = out.logits[0, -1].float().numpy().copy()  # not a view that keeps the whole logits tensor alive
            logits_rows.append(row)
            token = int(np.argmax(row))
            tokens.append(token)
            if step + 1 == steps:
                break
            total = len(prompt) + len(tokens)
            out = torch_model(
                input_ids=torch.tensor([[token]], dtype=torch.long),
                attention_mask=torch.ones((1, total), dtype=torch.long),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
    return tokens, logits_rows


def decoder_parity(reference: TorchReference, session, config) -> dict:
    from edgepack.runtime.generate import DecoderSession, generate

    decoder = DecoderSession(session, reference.model_config)
    per_prompt = []
    max_diff = 0.0
    all_identical = True
    for prompt, (torch_tokens, torch_logits) in zip(reference.prompts, reference.outputs):
        # Teacher-forced: the ONNX model sees exactly the tokens PyTorch chose, so logits are comparable
        # even where a near-tie would make free-running generation diverge.
        cache, past, diffs = decoder.empty_cache(), 0, []
        feed = list(prompt)
        for step in range(1 + config.decode_steps):
            logits, cache = decoder.forward(feed, cache, past)
            past += len(feed)
            diffs.append(max_abs_diff(logits[-1].astype(np.float64), torch_logits[step]))
            feed = [torch_tokens[step]]

        onnx_tokens = generate(decoder, prompt, max_new_tokens=config.greedy_tokens).tokens
        identical = onnx_tokens == torch_tokens
        first_mismatch = next((i for i, (a, b) in enumerate(zip(onnx_tokens, torch_tokens)) if a != b), None)
        prompt_max = max(diffs)
        max_diff = max(max_diff, prompt_max)
        all_identical &= identical
        per_prompt.append(
            {
                "prompt_tokens": len(prompt),
                "max_abs_logit_diff": prompt_max,
                "max_abs_logit_diff_per_step": diffs,
                "greedy_tokens_identical": identical,
                "first_mismatch": first_mismatch,
                "torch_tokens": torch_tokens,
                "onnx_tokens": onnx_tokens,
            }
        )
    report = {
        "method": (
            f"prefill + {config.decode_steps} cached decode steps compared logit by logit (teacher-forced); "
            f"greedy generation of {config.greedy_tokens} tokens compared token by token, EOS ignored; fp32, CPU"
        ),
        "prompts": len(reference.prompts),
        "atol": config.atol,
        "max_abs_logit_diff": max_diff,
        "greedy_tokens_identical": all_identical,
        "passed": None,
        "per_prompt": per_prompt,
    }
    report["passed"] = not failed(parity_gates(report))
    return report


def _sentence_parity(reference: TorchReference, session, pooling) -> dict | None:
    """The graph's pooled sentence embeddings of the padded batch against sentence-transformers' pooling of
    PyTorch's hidden states (`pooling.pool`)."""
    from edgepack.convert.pooling import pool, sentence_output

    name = sentence_output(session)
    if name is None or pooling is None or reference.batch is None:
        return None
    feeds, hidden = reference.batch
    got = session.run([name], feeds)[0].astype(np.float64)
    want = pool(hidden, feeds["attention_mask"], pooling)
    cos = cosine_per_position(got, want)
    return {"output": name, "modes": list(pooling.modes), "normalize": pooling.normalize, "sentences": int(got.shape[0]),
            "padded_to": int(feeds["attention_mask"].shape[1]), "max_abs_diff": max_abs_diff(got, want),
            "min_cosine": float(np.min(cos))}


def encoder_parity(reference: TorchReference, session, config, pooling=None) -> dict:
    output_name = session.get_outputs()[0].name
    max_diff, min_cos, per_prompt = 0.0, 1.0, []
    for prompt, (feeds, torch_out) in zip(reference.prompts, reference.outputs):
        onnx_out = session.run([output_name], feeds)[0][0].astype(np.float64)
        diff = max_abs_diff(onnx_out, torch_out)
        cos = cosine_per_position(onnx_out, torch_out)
        max_diff, min_cos = max(max_diff, diff), min(min_cos, float(np.min(cos)))
        per_prompt.append({"prompt_tokens": len(prompt), "max_abs_diff": diff, "min_cosine": float(np.min(cos))})
    sentence = _sentence_parity(reference, session, pooling)
    report = {
        "method": f"last_hidden_state per token, {output_name}; fp32, CPU",
        "prompts": len(reference.prompts),
        "atol": config.atol,
        "min_cosine_required": MIN_COSINE,
        "max_abs_embedding_diff": max_diff,
        "min_cosine": min_cos,
        "max_abs_logit_diff": None,
        "greedy_tokens_identical": None,
        "passed": None,
        "per_prompt": per_prompt,
        "sentence_embedding": sentence,
    }
    report["passed"] = not failed(parity_gates(report))
    return report


def parity_gates(parity: dict) -> list[GateResult]:
    """The gates of a parity report (convert.json `parity`), the first failing one first in what it explains.

    Decoders: greedy tokens identical, a yes/no gate (figure 1 when every prompt's tokens match, else 0,
    limit 1), then max |logit diff| at most `atol`. Encoders: max |embedding diff| at most `atol`, then
    min cosine at least MIN_COSINE.
    """
    atol = parity["atol"]
    if parity.get("greedy_tokens_identical") is not None:
        diff = parity["max_abs_logit_diff"]
        greedy = boolean_gate("greedy_tokens_identical", parity["greedy_tokens_identical"], stage="convert",
                              message=f"greedy tokens differ from PyTorch (max |logit diff| {diff:.3g})")
        return [greedy, _gate("max_abs_logit_diff", "max |logit diff|", diff, atol, "max", "atol")]
    gates = [_gate("max_abs_embedding_diff", "max |embedding diff|", parity["max_abs_embedding_diff"], atol, "max", "atol"),
             _gate("min_cosine", "min cosine", parity["min_cosine"], parity.get("min_cosine_required", MIN_COSINE), "min", "required")]
    sentence = parity.get("sentence_embedding")
    if sentence:
        gates.append(_gate("min_cosine", "sentence embedding min cosine", sentence["min_cosine"],
                           parity.get("min_cosine_required", MIN_COSINE), "min", "required"))
    return gates


def _gate(name: str, label: str, figure: float, limit: float, direction: str, option: str) -> GateResult:
    gate = evaluate_gate(name, figure, limit, direction, stage="convert", option=option)
    relation = "within" if gate.passed else DIRECTIONS[direction][1]
    number = f"{figure:.6f}" if name == "min_cosine" else f"{figure:.3g}"
    return gate.reframed("", f"{label} {number} {relation} {option} {limit:g}")
