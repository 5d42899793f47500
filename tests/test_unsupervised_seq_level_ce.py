"""The sequence-level cross-entropy against brute-force sums over all label sequences."""

import itertools
import math

import pytest
import torch

from fairseq_siamctc.unsupervised.label_lm import NGramLabelLM, estimate_ngram_table, read_label_sequences
from fairseq_siamctc.unsupervised.seq_level_ce import (
    frame_scores_from_table,
    seq_level_cross_entropy,
    sequence_log_likelihood,
)


def random_ngram_table(num_labels, order, generator):
    """A random n-gram table: every history a random distribution over the labels and EOS."""
    probs = torch.rand((num_labels + 1,) * order, generator=generator, dtype=torch.float64) + 0.05
    return (probs / probs.sum(-1, keepdim=True)).log()


def brute_force_lm_log_prob(table, labels):
    """log p_LM(c) straight from the n-gram table, BOS-padded history, EOS at the end."""
    num_labels, order = table.shape[0] - 1, table.dim()
    padded = [num_labels] * (order - 1) + list(labels) + [num_labels]
    return sum(table[tuple(padded[i - order + 1 : i + 1])] for i in range(order - 1, len(padded)))


def brute_force_nll(frame_scores, lengths, lm_log_prob):
    """-log sum_c p_LM(c) prod_n q(x_n|c_n), enumerating every label sequence of each length."""
    num_labels = frame_scores.shape[-1]
    result = []
    for scores, length in zip(frame_scores, lengths.tolist()):
        terms = [
            lm_log_prob(labels) + sum(scores[n, c] for n, c in enumerate(labels))
            for labels in itertools.product(range(num_labels), repeat=length)
        ]
        result.append(-torch.logsumexp(torch.stack(terms), 0))
    return torch.stack(result)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_matches_brute_force_with_padding(order):
    generator = torch.Generator().manual_seed(order)
    num_labels, num_units = 3, 4
    table = random_ngram_table(num_labels, order, generator)
    lm = NGramLabelLM(table)
    emission = torch.randn(num_labels, num_units, generator=generator, dtype=torch.float64).log_softmax(-1)
    lengths = torch.tensor([4, 1, 3, 2])
    units = torch.randint(num_units, (4, 4), generator=generator)
    frame_scores = frame_scores_from_table(units, emission)
    expected = brute_force_nll(frame_scores, lengths, lambda c: brute_force_lm_log_prob(table, c))
    actual = seq_level_cross_entropy(frame_scores, lengths, lm, reduction="none")
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(seq_level_cross_entropy(frame_scores, lengths, lm), expected.mean())
    torch.testing.assert_close(seq_level_cross_entropy(frame_scores, lengths, lm, reduction="sum"), expected.sum())


def test_unnormalised_per_frame_scores_match_brute_force():
    generator = torch.Generator().manual_seed(7)
    table = random_ngram_table(3, 2, generator)
    frame_scores = 3 * torch.randn(3, 3, 3, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([3, 2, 1])
    expected = brute_force_nll(frame_scores, lengths, lambda c: brute_force_lm_log_prob(table, c))
    torch.testing.assert_close(seq_level_cross_entropy(frame_scores, lengths, NGramLabelLM(table), "none"), expected)


def test_padding_frames_are_ignored():
    generator = torch.Generator().manual_seed(3)
    lm = NGramLabelLM(random_ngram_table(3, 2, generator))
    emission = torch.randn(3, 5, generator=generator, dtype=torch.float64).log_softmax(-1)
    units = torch.randint(5, (2, 6), generator=generator)
    lengths = torch.tensor([6, 2])
    other_padding = units.clone()
    other_padding[1, 2:] = (units[1, 2:] + 1) % 5
    first = seq_level_cross_entropy(frame_scores_from_table(units, emission), lengths, lm, "none")
    second = seq_level_cross_entropy(frame_scores_from_table(other_padding, emission), lengths, lm, "none")
    torch.testing.assert_close(first, second)
    alone = seq_level_cross_entropy(frame_scores_from_table(units[1:, :2], emission), lengths[1:], lm, "none")
    torch.testing.assert_close(first[1:], alone)


def test_label_loop_matches_hmm_formula():
    """With a self-loop probability, p(c) over frame labels is the HMM product written out by hand."""
    generator = torch.Generator().manual_seed(11)
    num_labels, loop = 3, 0.6
    table = random_ngram_table(num_labels, 2, generator)
    probs = table.exp()

    def hmm_log_prob(labels):
        p = probs[num_labels, labels[0]]
        for previous, current in zip(labels, labels[1:]):
            p = p * (loop * (previous == current) + (1 - loop) * probs[previous, current])
        return (p * (1 - loop) * probs[labels[-1], num_labels]).log()

    frame_scores = torch.randn(2, 4, num_labels, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([4, 3])
    expected = brute_force_nll(frame_scores, lengths, hmm_log_prob)
    lm = NGramLabelLM(table, label_loop_prob=loop)
    torch.testing.assert_close(seq_level_cross_entropy(frame_scores, lengths, lm, "none"), expected)


def test_lm_probabilities_of_all_lengths_sum_to_one():
    """With all scores 0 the likelihood is the LM mass of one length; over all lengths it sums to 1."""
    generator = torch.Generator().manual_seed(5)
    probs = torch.rand(3, 3, 3, generator=generator, dtype=torch.float64)
    probs[..., 2] += 1.0  # EOS probability >= 1/3 keeps the mass beyond 60 labels below 1e-10
    table = (probs / probs.sum(-1, keepdim=True)).log()
    max_length = 60
    lengths = torch.arange(1, max_length + 1)
    frame_scores = torch.zeros(max_length, max_length, 2, dtype=torch.float64)
    mass = (-seq_level_cross_entropy(frame_scores, lengths, NGramLabelLM(table), "none")).exp()
    empty = table[2, 2, 2].exp()  # p(EOS | BOS BOS)
    assert math.isclose(empty + mass.sum(), 1.0, abs_tol=1e-9)


def test_gradients_match_finite_differences():
    generator = torch.Generator().manual_seed(2)
    lm = NGramLabelLM(random_ngram_table(3, 2, generator))
    units = torch.randint(4, (3, 4), generator=generator)
    lengths = torch.tensor([4, 2, 3])
    logits = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)

    def loss(emission_logits):
        return seq_level_cross_entropy(frame_scores_from_table(units, emission_logits.log_softmax(-1)), lengths, lm)

    assert torch.autograd.gradcheck(loss, (logits,))
    trigram = NGramLabelLM(random_ngram_table(2, 3, generator))
    frame_scores = torch.randn(2, 5, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s: seq_level_cross_entropy(s, torch.tensor([5, 3]), trigram, "none"), (frame_scores,)
    )


def test_float32_agrees_with_float64():
    generator = torch.Generator().manual_seed(4)
    lm = NGramLabelLM(random_ngram_table(4, 2, generator))
    frame_scores = torch.randn(5, 30, 4, generator=generator, dtype=torch.float64).log_softmax(-1)
    lengths = torch.tensor([30, 1, 17, 25, 9])
    exact = sequence_log_likelihood(frame_scores, lengths, lm.log_init, lm.log_trans, lm.log_final, lm.state_label)
    single = sequence_log_likelihood(
        frame_scores.float(), lengths, lm.log_init, lm.log_trans, lm.log_final, lm.state_label
    )
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), exact, rtol=1e-5, atol=1e-4)


def test_ngram_estimate_counts_by_hand():
    k = 0.5
    table = estimate_ngram_table([[0, 1], [0]], num_labels=2, order=2, add_k=k).exp()
    # after BOS: label 0 twice, label 1 and EOS never; three outcomes smoothed by k
    assert math.isclose(table[2, 0], (2 + k) / (2 + 3 * k))
    assert math.isclose(table[2, 1], k / (2 + 3 * k))
    # after label 0: label 1 once, EOS once
    assert math.isclose(table[0, 2], (1 + k) / (2 + 3 * k))
    torch.testing.assert_close(table.sum(-1), torch.ones(3, dtype=torch.float64))


def test_bad_input_is_reported(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        estimate_ngram_table([[0, 3]], num_labels=2)
    path = tmp_path / "train.phn"
    path.write_text("a b\nb z\n")
    with pytest.raises(ValueError, match=r"train.phn:2.*'z'"):
        read_label_sequences(path, symbols=["a", "b"])
    assert read_label_sequences(path) == (["a", "b", "z"], [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="C=3"):
        seq_level_cross_entropy(torch.zeros(1, 2, 4), torch.tensor([2]), NGramLabelLM(random_ngram_table(3, 2, torch.Generator())))
