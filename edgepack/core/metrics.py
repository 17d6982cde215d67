"""Quality metrics of a candidate model's outputs against its fp32 reference, defined once.

Decoders are compared on next-token distributions: log-softmax in float64, KL(reference || candidate)
per position, top-1 agreement with its 95% Wilson interval and the reference's near ties, perplexity on
the real next token, max |logit diff|. Encoders are compared per token: cosine similarity and max |diff|.
Callers pass arrays in the dtype they want the differences taken in; log-softmax and cosine always work
in float64.
"""

from __future__ import annotations

import numpy as np

# A position whose reference top-1 and top-2 log-probabilities are closer than this is a near tie: any
# small weight change flips it about half the time, so top-1 over a few hundred positions moves by points
# between models of the same quality; the interval and the near-tie count say how much of a top-1 figure
# that is.
NEAR_TIE_NATS = 0.1


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64 (the input is never modified)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_per_position(reference_log_probs: np.ndarray, candidate_log_probs: np.ndarray) -> np.ndarray:
    """KL(reference || candidate) for every position (last axis: vocabulary), rounding negatives up to 0."""
    return np.maximum(np.sum(np.exp(reference_log_probs) * (reference_log_probs - candidate_log_probs), axis=-1), 0.0)


def kl_summary(kl: np.ndarray, *, p99: bool = True) -> dict:
    """Mean, 99th percentile (when asked for) and max of per-position KL."""
    figures = {"kl_mean": float(kl.mean())}
    if p99:
        figures["kl_p99"] = float(np.percentile(kl, 99))
    figures["kl_max"] = float(kl.max())
    return figures


def token_nll(log_probs: np.ndarray, targets) -> np.ndarray:
    """Negative log-likelihood of each position's real next token (`log_probs`: positions x vocabulary)."""
    targets = np.asarray(targets)
    return -log_probs[np.arange(len(targets)), targets]


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(nll.mean()))


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per position: do both pick the same most likely token (logits or log-probabilities)?"""
    return reference.argmax(-1) == candidate.argmax(-1)


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


def cosine_per_position(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis, in float64 (0 for an all-zero vector, not nan)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b|, computed in the arrays' own (promoted) dtype."""
    return float(np.max(np.abs(a - b)))
