"""The shared quality metrics against straightforward references (torch / plain numpy) and known values."""

import numpy as np
import pytest

from edgepack.core import metrics


def _logits(rows=24, vocab=50, seed=0, scale=4.0):
    return (np.random.default_rng(seed).normal(size=(rows, vocab)) * scale).astype(np.float32)


def test_log_softmax_matches_torch_in_float64_and_leaves_its_input_alone():
    import torch

    logits = _logits()
    before = logits.copy()
    lp = metrics.log_softmax(logits)
    assert lp.dtype == np.float64
    np.testing.assert_array_equal(logits, before)
    expected = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
    np.testing.assert_allclose(lp, expected, rtol=0, atol=1e-12)
    # shift-invariant and stable far outside exp's range
    np.testing.assert_allclose(metrics.log_softmax(logits.astype(np.float64) + 1e4), lp, atol=1e-9)


def test_kl_per_position_matches_torch_kl_div_and_is_never_negative():
    import torch

    lp_ref = metrics.log_softmax(_logits(seed=1))
    lp_q = metrics.log_softmax(_logits(seed=1) + _logits(seed=2, scale=0.3))
    kl = metrics.kl_per_position(lp_ref, lp_q)
    expected = torch.nn.functional.kl_div(torch.from_numpy(lp_q), torch.from_numpy(lp_ref), reduction="none", log_target=True).sum(-1)
    np.testing.assert_allclose(kl, expected.numpy(), rtol=1e-10, atol=1e-14)
    assert (kl > 0).all()
    assert (metrics.kl_per_position(lp_ref, lp_ref) == 0).all()  # rounding noise below 0 is clipped


def test_kl_summary_keys_in_report_order():
    kl = np.random.default_rng(3).exponential(size=1000)
    full = metrics.kl_summary(kl)
    assert list(full) == ["kl_mean", "kl_p99", "kl_max"]
    assert full["kl_mean"] == float(np.mean(kl)) and full["kl_max"] == float(np.max(kl))
    ordered = sorted(kl)  # p99 of 1000 values: 1% of the way from the 990th to the 991st (linear interpolation)
    assert full["kl_p99"] == pytest.approx(ordered[989] + 0.01 * (ordered[990] - ordered[989]), rel=1e-14)
    assert list(metrics.kl_summary(kl, p99=False)) == ["kl_mean", "kl_max"]


def test_token_nll_and_perplexity_match_cross_entropy():
    import torch

    logits = _logits(seed=4)
    targets = np.random.default_rng(5).integers(0, logits.shape[1], size=logits.shape[0]).tolist()
    nll = metrics.token_nll(metrics.log_softmax(logits), targets)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits).double(), torch.tensor(targets), reduction="none")
    np.testing.assert_allclose(nll, expected.numpy(), rtol=1e-12)
    assert metrics.perplexity(nll) == pytest.approx(float(torch.exp(expected.mean())), rel=1e-12)
    # a model certain of every real next token has perplexity 1; a uniform one, the vocabulary size
    assert metrics.perplexity(metrics.token_nll(metrics.log_softmax(np.zeros((4, 7))), [0, 1, 2, 3])) == pytest.approx(7.0)


def test_top1_agreement_and_near_ties():
    reference = _logits(rows=10, vocab=8, seed=6)
    reference[:, 0] = reference.max(-1) + 1.0  # token 0 clearly on top ...
    reference[:2, 3] = reference[:2, 0] - metrics.NEAR_TIE_NATS / 4  # ... but a near tie with token 3 at rows 0-1
    candidate = reference.copy()
    candidate[0, 3] += 1.0  # flips a near tie
    candidate[7, 5] = candidate[7, 0] + 1.0  # flips a decisive position
    agree = metrics.top1_agreement(reference, candidate)
    assert agree.tolist() == [i not in (0, 7) for i in range(10)]
    figures = metrics.top1_figures(metrics.log_softmax(reference), agree)
    assert figures == {"top1_agreement": 0.8, "top1_ci95": metrics.wilson_interval(8, 10), "near_tie_positions": 2,
                       "top1_agreement_decisive": 7 / 8}
    # every position a near tie: no decisive agreement to report
    flat = metrics.log_softmax(np.zeros((3, 4)))
    assert metrics.top1_figures(flat, np.array([True, False, True]))["top1_agreement_decisive"] is None


@pytest.mark.parametrize("hits, n, low, high", [
    (9, 10, 0.5958, 0.9821),  # textbook example
    (0, 10, 0.0, 0.2775),  # z^2 / (n + z^2)
    (10, 10, 0.7225, 1.0),
    (50, 100, 0.4038, 0.5962),
    (0, 0, 0.0, 1.0),  # no evidence: the whole range
])
def test_wilson_interval_known_values(hits, n, low, high):
    interval = metrics.wilson_interval(hits, n)
    assert interval == pytest.approx([low, high], abs=1e-4)
    assert all(type(x) is float for x in interval)


def test_cosine_per_position_matches_torch_and_zero_vectors_give_zero():
    import torch

    a, b = _logits(seed=7), _logits(seed=8)
    expected = torch.nn.functional.cosine_similarity(torch.from_numpy(a).double(), torch.from_numpy(b).double(), dim=-1, eps=1e-300)
    np.testing.assert_allclose(metrics.cosine_per_position(a, b), expected.numpy(), rtol=1e-12)
    np.testing.assert_allclose(metrics.cosine_per_position(a, 3 * a), 1.0, rtol=1e-12)
    b[2] = 0
    assert metrics.cosine_per_position(a, b)[2] == 0.0


def test_max_abs_diff_in_the_callers_dtype():
    a = np.array([1.0, -2.0, 3.5], dtype=np.float32)
    b = np.array([1.25, -2.0, 3.0], dtype=np.float32)
    assert metrics.max_abs_diff(a, b) == 0.5
    # float32 inputs subtract in float32; a float64 operand makes the difference exact
    x, y = np.float32(1.0000001), np.float32(1e-9)
    assert metrics.max_abs_diff(np.array([x]), np.array([y])) == float(np.float32(x - y))
    assert metrics.max_abs_diff(np.array([x], dtype=np.float64), np.array([y])) == float(np.float64(x) - np.float64(y))
    assert metrics.max_abs_diff(np.array([x], dtype=np.float64), np.array([y])) != metrics.max_abs_diff(np.array([x]), np.array([y]))
