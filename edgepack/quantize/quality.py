"""Quality of a quantized model against its fp32 reference, teacher-forced on the same text.

Decoders: both models read the same token windows; for every scored position we compare the
next-token distributions: perplexity of each model on the real next token, top-1 agreement, and
KL(fp32 || quantized) (mean and p99), the figures llama.cpp's `llama-perplexity --kl-divergence`
reports. Encoders: cosine similarity of per-token embeddings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.errors import BadInputError
from edgepack.quantize.calibration import DEFAULT_EVAL_TEXT, read_text
from edgepack.runtime.model_dir import TEXT_GENERATION


@dataclass(frozen=True)
class QualityConfig:
    eval_text: Path | None = None
    eval_tokens: int = 512  # scored positions, at least
    context: int = 512  # window length (capped by the model's max positions)
    threads: int | None = None


# A position whose fp32 top-1 and top-2 log-probabilities are closer than this is a near tie: any small
# weight change flips it about half the time. On SmolLM2's evaluation text 6 of the first 64 positions are
# near ties, so top-1 over a few hundred positions moves by points between models of the same quality
# (issue #5); the interval and the near-tie count below say how much of a top-1 figure that is.
NEAR_TIE_NATS = 0.1


def wilson_interval(hits: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return [0.0, 1.0]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def top1_figures(reference_log_probs: np.ndarray, agree: np.ndarray) -> dict:
    """Top-1 agreement with its 95% interval, the reference's near ties, and agreement away from them."""
    top2 = np.partition(reference_log_probs, -2, axis=-1)[:, -2:]  # the two largest, unordered beyond that
    decisive = (top2.max(-1) - top2.min(-1)) >= NEAR_TIE_NATS
    return {
        "top1_agreement": float(agree.mean()),
        "top1_ci95": wilson_interval(int(agree.sum()), int(agree.size)),
        "near_tie_positions": int((~decisive).sum()),
        "top1_agreement_decisive": float(agree[decisive].mean()) if decisive.any() else None,
    }


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class QualityEvaluator:
    """Holds the fp32 reference's outputs so several candidates (e.g. for `auto`) are compared cheaply."""

    def __init__(self, reference_onnx: Path, model_dir, tokenizer, config: QualityConfig = QualityConfig()):
        self.config = config
        self.model_dir = model_dir
        text, self.origin = read_text(config.eval_text, DEFAULT_EVAL_TEXT)
        self.text_sha256 = hashlib.sha256(text.encode()).hexdigest()
        ids = list(tokenizer(text)["input_ids"]) if tokenizer is not None else []
        max_pos = int(model_dir.config.get("max_position_embeddings") or model_dir.config.get("n_positions") or config.context)
        self.context = max(8, min(config.context, max_pos))
        self.windows: list[list[int]] = []
        scored = 0
        for start in range(0, len(ids), self.context):
            window = ids[start : start + self.context]
            if len(window) < 8 or scored >= config.eval_tokens:
                break
            self.windows.append(window)
            scored += len(window) - 1
        if scored < config.eval_tokens:
            raise BadInputError(
                f"evaluation text {self.origin} gives {scored} scored token positions; at least {config.eval_tokens} "
                "are needed (pass a longer --eval-text or a smaller --eval-tokens)"
            )
        self.task = model_dir.task
        self.reference = self._outputs(reference_onnx)

    def _outputs(self, onnx_path: Path) -> list[np.ndarray]:
        """Logits (decoders) or hidden states (encoders) for every window, one session per model."""
        from edgepack.runtime.generate import DecoderSession, encoder_feeds
        from edgepack.runtime.session import create_session

        session = create_session(onnx_path, threads=self.config.threads)
        if self.task == TEXT_GENERATION:
            decoder = DecoderSession(session, self.model_dir.config)
            return [decoder.forward(w, decoder.empty_cache(), 0)[0] for w in self.windows]
        names = {i.name for i in session.get_inputs()}
        results = [session.run(None, encoder_feeds(window, names))[0][0] for window in self.windows]
        return results

    def evaluate(self, candidate_onnx: Path) -> dict:
        candidate = self._outputs(candidate_onnx)
        if self.task != TEXT_GENERATION:
            return self._encoder_figures(candidate)
        kls, agree, nll_ref, nll_q, ref_lps = [], [], [], [], []
        max_abs = max(float(np.max(np.abs(r.astype(np.float64) - c))) for r, c in zip(self.reference, candidate))
        for window, ref, cand in zip(self.windows, self.reference, candidate):
            lp_ref, lp_q = _log_softmax(ref[:-1]), _log_softmax(cand[:-1])
            targets = np.array(window[1:])
            rows = np.arange(len(targets))
            nll_ref.append(-lp_ref[rows, targets])
            nll_q.append(-lp_q[rows, targets])
            kls.append(np.sum(np.exp(lp_ref) * (lp_ref - lp_q), axis=-1))
            agree.append(np.argmax(ref[:-1], axis=-1) == np.argmax(cand[:-1], axis=-1))
            ref_lps.append(lp_ref)
        kl = np.maximum(np.concatenate(kls), 0.0)
        ppl_ref, ppl = float(np.exp(np.concatenate(nll_ref).mean())), float(np.exp(np.concatenate(nll_q).mean()))
        return {
            "method": "teacher-forced next-token distributions on the same windows; KL(fp32 || quantized) per position",
            "eval_text": self.origin,
            "eval_text_sha256": self.text_sha256,
            "positions": int(kl.size),
            "windows": len(self.windows),
            "context": self.context,
            "ppl_reference": ppl_ref,
            "ppl": ppl,
            "ppl_ratio": ppl / ppl_ref,
            **top1_figures(np.concatenate(ref_lps), np.concatenate(agree)),
            "kl_mean": float(kl.mean()),
            "kl_p99": float(np.percentile(kl, 99)),
            "kl_max": float(kl.max()),
            "max_abs_logit_diff": max_abs,
        }

    def _encoder_figures(self, candidate) -> dict:
        cos = []
        for ref, cand in zip(self.reference, candidate):
            ref, cand = ref.astype(np.float64), cand.astype(np.float64)
            cos.append(np.sum(ref * cand, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1) + 1e-30))
        cos = np.concatenate(cos)
        return {
            "method": "cosine similarity of per-token embeddings on the same windows",
            "eval_text": self.origin,
            "eval_text_sha256": self.text_sha256,
            "positions": int(cos.size),
            "windows": len(self.windows),
            "context": self.context,
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "ppl_reference": None,
            "ppl": None,
            "ppl_ratio": None,
            "top1_agreement": None,
            "top1_ci95": None,
            "near_tie_positions": None,
            "top1_agreement_decisive": None,
            "kl_mean": None,
            "kl_p99": None,
            "kl_max": None,
        }
