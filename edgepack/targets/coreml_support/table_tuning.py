"""Distillation of the split table's stored values (`--embedding split --tune-steps N`).

The least-squares fit (`convert.lut3_blocks`) fits each 3-bit block on its own, weighted by E[h^2]; what a
release is judged on is the model's next-token distribution. The table is tied: the same rows are the
embedding (where a rare token is an *input*, and its error flows through every layer) and the lm_head,
so a row's loss depends on how the model uses it, and a per-block fit cannot see that
(benchmarks/coreml_table_study.py simulates the formats and separates the two effects). So this tunes the stored values end to end: the
package's projections as it stores them, the table as it stores it (int8 rows, 3-bit rows), and a KL loss
against the fp32 model's own next-token distribution on text the fp32 model generates itself from
calibration-text prompts (nothing downloaded, the evaluation text never seen).

Written here because no library does it for this format: coremltools.optimize.torch's trainers
(DKMPalettizer, LinearQuantizer) learn k-means LUTs or linear int4/int8 weights, not 3-bit indices into
fixed int8 levels behind a per-block scale and offset of a tied table split in two, and
onnxruntime/optimum have no quantization-aware tuning. The rounding is straight-through (LSQ-style):
values are kept in level units, so one learning rate fits any weight scale.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np

from edgepack.targets.coreml_support.convert import SplitTable

# Sampling setup: fixed, so two builds tune the same way (seeded, CPU).
TRAIN_SEQUENCES, HELDOUT_SEQUENCES, SEQUENCE_TOKENS, BATCH = 32, 4, 256, 2
LR_LEVELS = 0.06  # Adam step in level units (3-bit levels are int8 values ~36 apart; int8 rows: units of 1)
LR_LOG_SCALE = 6e-4
CHECK_EVERY = 20  # steps between held-out checks


def _generate(model, tokenizer, count: int, tokens: int, seed: int):
    """`count` sampled continuations (temperature 1) of 4-token prompts taken from the calibration text."""
    import torch

    from edgepack.core.texts import calibration_text
    from edgepack.core.windows import split_windows, token_ids

    text, _origin = calibration_text()
    prompts = split_windows(token_ids(tokenizer, text, vocab_size=model.get_input_embeddings().num_embeddings), 4, count=count, cycle=True)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        out = []
        with torch.no_grad():
            for i in range(0, count, 16):
                batch = torch.tensor(prompts[i:i + 16])
                out.append(model.generate(batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                          max_new_tokens=tokens - 4, min_new_tokens=tokens - 4,
                                          pad_token_id=tokenizer.pad_token_id or 0))
    finally:
        torch.random.set_rng_state(generator_state)
    return torch.cat(out)


def tune_split_table(hf_model, tokenizer, fit: SplitTable, *, steps: int, projection_block: int, integer_offsets: bool,
                     block_scales: str = "fp16", sequence_tokens: int = SEQUENCE_TOKENS, seed: int = 0, on_status=None) -> tuple[SplitTable, dict]:
    """Tune `fit` for `steps` Adam steps of KL(fp32 || package) on self-generated text; returns the tuned
    table and a report (held-out KL before and after, on generated sequences not trained on)."""
    status = on_status or (lambda message: None)
    started = time.perf_counter()
    reference = hf_model.eval()
    status(f"table tuning: generating {TRAIN_SEQUENCES + HELDOUT_SEQUENCES} sequences of {sequence_tokens} tokens from the fp32 model")
    data = _distillation_data(reference, tokenizer, sequence_tokens, seed)
    student = _stored_student(reference, projection_block, integer_offsets, block_scales)
    params = _TableParameters(fit, hf_model.get_input_embeddings().weight.detach().float())

    def heldout_loss(candidate: SplitTable) -> float:
        import torch

        with torch.no_grad():
            return float(_distillation_loss(student, data.heldout_target, data.heldout, torch.from_numpy(candidate.dense())))

    before = heldout_loss(fit)
    best, best_kl, best_step = fit, before, 0
    optimizer = params.optimizer()
    losses = []
    for step in range(1, steps + 1):
        k = (step - 1) % len(data.batches)
        loss = _distillation_loss(student, data.targets[k].float(), data.batches[k], params.table())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % CHECK_EVERY == 0 or step == steps:
            # keep the stored table that does best on the held-out sequences (the training KL is noisy)
            candidate = params.stored()
            candidate_kl = heldout_loss(candidate)
            if candidate_kl < best_kl:
                best, best_kl, best_step = candidate, candidate_kl, step
            status(f"table tuning: step {step}/{steps}, training KL {np.mean(losses[-CHECK_EVERY:]):.4f}, held-out KL {candidate_kl:.4f} (start {before:.4f})")
    report = {
        "steps": steps, "train_sequences": TRAIN_SEQUENCES, "heldout_sequences": HELDOUT_SEQUENCES, "sequence_tokens": sequence_tokens,
        "data": "sampled by the fp32 model (temperature 1) from 4-token calibration-text prompts; the evaluation text is not used",
        "loss": "KL(fp32 || package) of the next-token distribution, projections and table as stored",
        "heldout_kl_before": round(before, 5), "heldout_kl_after": round(best_kl, 5), "kept_step": best_step,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return best, report


@dataclass
class _DistillationData:
    """Self-generated token sequences and the fp32 model's next-token log-probabilities on them."""

    batches: list  # training batches of BATCH sequences
    targets: list  # their log-probabilities, fp16 (half the memory)
    heldout: object  # sequences never trained on
    heldout_target: object


def _distillation_data(reference, tokenizer, sequence_tokens: int, seed: int) -> _DistillationData:
    import torch

    text = _generate(reference, tokenizer, TRAIN_SEQUENCES + HELDOUT_SEQUENCES, sequence_tokens, seed)
    train, heldout = text[:TRAIN_SEQUENCES], text[TRAIN_SEQUENCES:]
    batches = [train[i:i + BATCH] for i in range(0, len(train), BATCH)]
    with torch.no_grad():
        targets = [torch.log_softmax(reference(b).logits.float(), -1).half() for b in batches]
        heldout_target = torch.log_softmax(reference(heldout).logits.float(), -1)
    return _DistillationData(batches, targets, heldout, heldout_target)


def _stored_student(reference, projection_block: int, integer_offsets: bool, block_scales: str):
    """A frozen copy of the model computing as the package does: projections as stored (the table is passed per step)."""
    import torch

    from edgepack.targets.coreml_support.convert import stored_projection

    student = copy.deepcopy(reference)
    for module in student.model.layers.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.shape[1] % projection_block == 0:
            as_stored = stored_projection(module.weight.detach().numpy(), projection_block, residue=integer_offsets, block_scales=block_scales)
            module.weight.data = torch.from_numpy(as_stored).to(module.weight.dtype)
    for p in student.parameters():
        p.requires_grad_(False)
    return student


def _distillation_loss(student, target_lp, batch, weights):
    """Mean KL(fp32 || student) over the batch's positions, differentiable (the training objective)."""
    import torch

    embeddings = torch.nn.functional.embedding(batch, weights)
    hidden = student.model(inputs_embeds=embeddings).last_hidden_state
    lp = torch.log_softmax(hidden @ weights.T, -1)
    return (target_lp.exp() * (target_lp - lp)).sum(-1).mean()


class _TableParameters:
    """The split table's trainable values: level coordinates u with w = scale * (u - offset) for the rare rows
    (log scale, sign kept), int8 coordinates for the frequent rows; rounding is straight-through."""

    def __init__(self, fit: SplitTable, source_table):
        import torch

        self.fit = fit
        self.levels = torch.from_numpy(fit.levels.astype(np.float32))
        self.rows, self.cols = fit.index.shape
        blocks = self.cols // fit.block
        scale0 = torch.from_numpy(fit.scale.astype(np.float32))[..., None]
        offset0 = torch.from_numpy(fit.offset.astype(np.float32))[..., None]
        rare_ref = source_table[-self.rows:].reshape(self.rows, blocks, fit.block)
        # start from the weights' own coordinates, not the rounded ones
        self.u_rare = torch.nn.Parameter(rare_ref / scale0 + offset0)
        self.log_scale = torch.nn.Parameter(scale0.abs().clamp_min(1e-12).log())
        self.sign = torch.sign(scale0)
        self.offset = torch.nn.Parameter(offset0.clone())
        self.frequent_scale = torch.from_numpy(fit.frequent_scale.astype(np.float32)).repeat_interleave(32, dim=1)
        self.u_frequent = torch.nn.Parameter(source_table[: fit.frequent.shape[0]] / self.frequent_scale)

    def optimizer(self):
        import torch

        # the rare rows' step in the same fraction of their level range whatever the levels (int8 quantiles span 254)
        spread = (int(self.fit.levels.max()) - int(self.fit.levels.min())) / 254
        return torch.optim.Adam([
            {"params": [self.u_rare, self.offset], "lr": LR_LEVELS * spread},
            {"params": [self.u_frequent], "lr": LR_LEVELS},
            {"params": [self.log_scale], "lr": LR_LOG_SCALE},
        ])

    def _nearest_level(self, u):
        return self.levels[(u.detach()[..., None] - self.levels).abs().argmin(-1)]

    def table(self):
        """The dense table the student computes with (differentiable, straight-through rounding)."""
        import torch

        u_rare, u_frequent = self.u_rare, self.u_frequent
        rare = self.sign * self.log_scale.exp() * (u_rare + (self._nearest_level(u_rare) - u_rare).detach() - self.offset)
        q8 = u_frequent + (u_frequent.detach().round().clamp(-127, 127) - u_frequent).detach()
        return torch.cat([self.frequent_scale * q8, rare.reshape(self.rows, self.cols)])

    def stored(self) -> SplitTable:
        """The table as the package stores it: fp16 scale and offset, each weight at its nearest level under them."""
        import torch

        fit = self.fit
        with torch.no_grad():
            scale = self.sign * self.log_scale.exp()
            weight = scale * (self.u_rare - self.offset)
            scale16, offset16 = scale.half(), self.offset.half()
            u16 = weight / scale16.float() + offset16.float()
            index = (u16[..., None] - self.levels).abs().argmin(-1).reshape(self.rows, self.cols).numpy().astype(np.uint8)
            frequent = self.u_frequent.round().clamp(-127, 127).numpy().astype(np.int8)
        return SplitTable(frequent, fit.frequent_scale, index, scale16[..., 0].numpy(), offset16[..., 0].numpy(), fit.levels, fit.block)
