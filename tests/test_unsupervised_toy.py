"""Toy unsupervised training: the error of the learnt emissions falls as the sequence-level loss falls."""

import pytest
import torch

from fairseq_siamctc.unsupervised import theory
from fairseq_siamctc.unsupervised.label_lm import NGramLabelLM
from fairseq_siamctc.unsupervised.toy import fixed_length_prior, records_to_markdown, run_toy_experiment


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
