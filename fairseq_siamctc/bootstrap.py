"""Error rates of groups of models and paired bootstrap intervals of their differences.

A group is one kind of encoder trained from S seeds (S = 1: one model), each scored on the
same U test utterances: ``errors`` (S, U) edit distances (already averaged over probe seeds) and
``lengths`` (U,) reference lengths. The group's error rate is 100 * sum_u mean_s errors / sum_u
lengths: SUPERB's corpus-level PER, averaged over training seeds utterance by utterance.

The difference of two groups on the same utterances is paired by utterance. Its bootstrap draws,
per replicate, U utterances with replacement (the same for both groups: the pairing) and S training
seeds with replacement; the interval is the percentile interval of the replicated differences.
Resampling seeds makes the interval cover the spread between training runs, not only the test set's
sampling noise. Seeds are drawn for each group independently, or, with ``paired_seeds``, once for
both: row s of both groups then descends from the same training chain (in the study: the seed encoder
pretrained from seed s, and SiamCTC and the control trained from it), so a replicate keeps or drops
whole chains and the interval covers the variance of everything trained along them.
"""

from typing import Dict, Optional, Tuple

import numpy as np


def group_error_rate(errors: np.ndarray, lengths: np.ndarray) -> float:
    """errors (S, U), lengths (U,) -> 100 * sum_u mean_s errors[s, u] / sum_u lengths[u]."""
    errors = np.atleast_2d(np.asarray(errors, dtype=np.float64))
    return 100.0 * float(errors.mean(0).sum()) / float(np.sum(lengths))


def bootstrap_draws(rng: np.random.Generator, replicates: int, utterances: int, seeds_a: int,
                    seeds_b: int, paired_seeds: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index draws: utterances (R, U), seeds of group a (R, S_a), seeds of group b (R, S_b); with
    ``paired_seeds`` (S_a == S_b) one seed draw serves both groups."""
    if paired_seeds and seeds_a != seeds_b:
        raise ValueError(f"paired seeds need as many models in both groups, not {seeds_a} and {seeds_b}")
    utt = rng.integers(0, utterances, (replicates, utterances))
    draw_a = rng.integers(0, seeds_a, (replicates, seeds_a))
    return utt, draw_a, draw_a if paired_seeds else rng.integers(0, seeds_b, (replicates, seeds_b))


def replicated_differences(errors_a: np.ndarray, errors_b: np.ndarray, lengths: np.ndarray,
                           draws: Tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """The difference (a - b) of group error rates under each replicate's draws -> (R,).

    Vectorised through counts: an utterance drawn k times weighs k, a seed drawn k times k / S."""
    utt, seed_a, seed_b = draws
    replicates, num_utt = utt.shape
    counts = np.zeros((replicates, num_utt))
    np.add.at(counts, (np.arange(replicates)[:, None], utt), 1.0)
    diffs = np.zeros(replicates)
    for errors, seeds, sign in ((errors_a, seed_a, 1.0), (errors_b, seed_b, -1.0)):
        errors = np.atleast_2d(np.asarray(errors, dtype=np.float64))
        weights = np.zeros((replicates, errors.shape[0]))
        np.add.at(weights, (np.arange(replicates)[:, None], seeds), 1.0 / seeds.shape[1])
        diffs += sign * np.einsum("rs,su,ru->r", weights, errors, counts)
    return 100.0 * diffs / (counts @ np.asarray(lengths, dtype=np.float64))


def paired_difference(errors_a: np.ndarray, errors_b: np.ndarray, lengths: np.ndarray,
                      replicates: int = 10000, level: float = 0.95, seed: int = 0,
                      draws: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
                      paired_seeds: bool = False) -> Dict[str, float]:
    """{"diff": PER_a - PER_b, "low", "high": the ``level`` percentile interval} (percentage points);
    ``paired_seeds``: row s of a and of b come from the same chain (module docstring)."""
    errors_a, errors_b = np.atleast_2d(errors_a), np.atleast_2d(errors_b)
    if errors_a.shape[1] != len(lengths) or errors_b.shape[1] != len(lengths):
        raise ValueError(f"errors {errors_a.shape} and {errors_b.shape} do not match {len(lengths)} utterances")
    if draws is None:
        draws = bootstrap_draws(np.random.default_rng(seed), replicates, len(lengths),
                                errors_a.shape[0], errors_b.shape[0], paired_seeds)
    replicated = replicated_differences(errors_a, errors_b, lengths, draws)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(replicated, [tail, 100.0 - tail])
    return {"diff": group_error_rate(errors_a, lengths) - group_error_rate(errors_b, lengths),
            "low": float(low), "high": float(high)}
