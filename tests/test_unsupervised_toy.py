"""Toy unsupervised training: the error of the learnt emissions falls as the sequence-level loss falls."""

import math

import pytest
import torch

from fairseq_siamctc.unsupervised import theory
from fairseq_siamctc.unsupervised.label_lm import NGramLabelLM
from fairseq_siamctc.unsupervised.toy import (
    DEFAULT_EMISSION,
    DEFAULT_END,
    DEFAULT_START,
    DEFAULT_TRANSITION,
    fixed_length_prior,
    records_to_markdown,
    run_toy_experiment,
    stationary_start,
)


@pytest.mark.parametrize("seed", [1, 2])
def test_error_goes_down_with_the_loss(seed):
    records = run_toy_experiment(num_sequences=1000, steps=100, eval_every=25, seed=seed)
    assert [r.step for r in records] == [0, 25, 50, 75, 100]
    losses = [r.loss for r in records]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    first, second, third = records[:3]
    # the large early drops of the loss come with large drops of the error
    assert first.error_mismatch > second.error_mismatch > third.error_mismatch
    assert records[-1].error_mismatch < 0.05 * first.error_mismatch
    assert records[-1].training_label_error < 0.5 * first.training_label_error
    for record in records:
        assert record.error_mismatch <= record.refined_bound <= record.theorem1_bound
        assert record.model_error == pytest.approx(record.bayes_error + record.error_mismatch)
    assert records_to_markdown(records).count("\n") == len(records) + 2


def test_fixed_length_prior_matches_the_lm_by_enumeration():
    """pr(c) for fixed length N is p_LM(c, EOS) renormalised over the C**N sequences."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 3, generator=generator, dtype=torch.float64)
    probs = probs / probs.sum(-1, keepdim=True)
    table = probs.log()
    prior = fixed_length_prior(NGramLabelLM(table), 3)
    labels = theory.enumerate_sequences(2, 3)
    p = torch.stack([probs[2, a] * probs[a, b] * probs[b, c] * probs[c, 2] for a, b, c in labels.tolist()])
    torch.testing.assert_close(prior, p / p.sum())


def prior_with_start(start):
    lm = NGramLabelLM.from_bigram(*(torch.tensor(v, dtype=torch.float64).log() for v in (start, DEFAULT_TRANSITION, DEFAULT_END)))
    return fixed_length_prior(lm, 4)


def test_without_condition_2_a_small_kl_allows_a_large_error():
    """The toy LM's transitions are nearly a cycle 0 -> 1 -> 2 -> 0. With a stationary start every
    position has the same label distribution (P_C of rank 1) and rotating the labels' emissions
    barely changes q(x), yet decides wrongly; the default start (condition 2 holds) exposes it."""
    emission = torch.tensor(DEFAULT_EMISSION, dtype=torch.float64)
    rotated = emission[[1, 2, 0]]
    true_conditional = theory.local_conditional(emission, 4)
    rotated_conditional = theory.local_conditional(rotated, 4)
    kl = {}
    for name, start in (("stationary", stationary_start()), ("default", DEFAULT_START)):
        prior = prior_with_start(start)
        kl[name] = theory.kl_divergence(
            theory.observation_marginal(prior, true_conditional), theory.observation_marginal(prior, rotated_conditional)
        ).item()
        assert theory.error_mismatch(prior, true_conditional, rotated_conditional) > 0.5
    with pytest.raises(ValueError, match="rank 1 < 3"):
        theory.check_identifiability(theory.label_marginal_matrix(prior_with_start(stationary_start()), 3, 4))
    theory.check_identifiability(theory.label_marginal_matrix(prior_with_start(DEFAULT_START), 3, 4))
    assert kl["stationary"] < 0.01 and kl["default"] > 0.3


def test_training_without_condition_2_can_settle_on_the_rotation():
    records = run_toy_experiment(num_sequences=1000, steps=100, eval_every=50, seed=1, start=stationary_start())
    assert all(math.isnan(r.theorem1_bound) for r in records)
    assert records[-1].loss < records[0].loss
    assert records[-1].kl_divergence < 0.02 and records[-1].error_mismatch > 0.5
