"""The study's statistics: group error rates and paired bootstrap intervals, against naive loops."""

import numpy as np
import pytest

from fairseq_siamctc.bootstrap import (
    bootstrap_draws,
    group_error_rate,
    paired_difference,
    replicated_differences,
)


def naive_difference(errors_a, errors_b, lengths, utt, seeds_a, seeds_b):
    """One replicate, the slow way: build the resampled test set and seed sets, score each group."""
    def rate(errors, seeds):
        total = 0.0
        for u in utt:
            total += sum(errors[s][u] for s in seeds) / len(seeds)
        return 100.0 * total / sum(lengths[u] for u in utt)
    return rate(errors_a, seeds_a) - rate(errors_b, seeds_b)


def test_replicated_differences_match_a_naive_loop():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 30, 40)
    errors_a = rng.integers(0, 20, (3, 40))
    errors_b = rng.integers(0, 20, (1, 40))  # e.g. the seed encoder: one model
    draws = bootstrap_draws(np.random.default_rng(1), 50, 40, 3, 1)
    fast = replicated_differences(errors_a, errors_b, lengths, draws)
    slow = [naive_difference(errors_a, errors_b, lengths, u, sa, sb) for u, sa, sb in zip(*draws)]
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12)


def test_group_error_rate_and_interval():
    lengths = np.array([10, 20, 30])
    errors = np.array([[1, 2, 3], [3, 2, 1]])
    assert group_error_rate(errors, lengths) == pytest.approx(100.0 * (2 + 2 + 2) / 60)
    # one model against itself: nothing varies
    assert paired_difference(errors[:1], errors[:1], lengths, replicates=200) == {"diff": 0.0, "low": 0.0, "high": 0.0}
    # two training seeds resampled independently per group: the interval covers their spread
    spread = paired_difference(errors, errors, lengths, replicates=2000)
    assert spread["diff"] == 0.0 and spread["low"] < 0 < spread["high"]
    rng = np.random.default_rng(2)
    lengths = rng.integers(10, 40, 300)
    base = rng.binomial(lengths, 0.3, (3, 300))
    better = rng.binomial(lengths, 0.2, (3, 300))  # 10 points fewer errors
    result = paired_difference(better, base, lengths, replicates=2000)
    assert result["low"] < result["diff"] < result["high"] < 0
    assert -14 < result["low"] and result["high"] < -6
