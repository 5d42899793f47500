"""Theorem 1 quantities against naive loops, the bound on random pairs, and why both conditions are needed."""

import itertools
import math

import pytest
import torch

from fairseq_siamctc.unsupervised import theory

C, X, N = 3, 4, 3


def random_pair(generator, scale):
    def dirichlet(shape):
        sample = torch.distributions.Gamma(torch.ones(shape, dtype=torch.float64), 1.0).sample()
        return sample / sample.sum(-1, keepdim=True)

    torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=generator)))
    prior = dirichlet((C**N,))
    true_emission = dirichlet((C, X))
    model_emission = (1 - scale) * true_emission + scale * dirichlet((C, X))
    return prior, true_emission, model_emission


def naive_quantities(prior, true_emission, model_emission):
    """Excess error, L1 distance and P_C by explicit loops over sequences."""
    labels = list(itertools.product(range(C), repeat=N))
    observations = list(itertools.product(range(X), repeat=N))

    def cond(emission, c, x):
        return math.prod(emission[c_n, x_n].item() for c_n, x_n in zip(c, x))

    bayes_correct = model_correct = l1 = 0.0
    for x in observations:
        true_joint = [prior[i].item() * cond(true_emission, c, x) for i, c in enumerate(labels)]
        model_joint = [prior[i].item() * cond(model_emission, c, x) for i, c in enumerate(labels)]
        bayes_correct += max(true_joint)
        model_correct += true_joint[max(range(len(labels)), key=model_joint.__getitem__)]
        l1 += abs(sum(true_joint) - sum(model_joint))
    label_marginals = torch.zeros(N, C, dtype=torch.float64)
    for i, c in enumerate(labels):
        for n, c_n in enumerate(c):
            label_marginals[n, c_n] += prior[i]
    return bayes_correct - model_correct, l1, label_marginals


def test_quantities_match_naive_loops():
    generator = torch.Generator().manual_seed(0)
    prior, true_emission, model_emission = random_pair(generator, 0.5)
    report = theory.evaluate_pair(prior, true_emission, model_emission, N)
    mismatch, l1, label_marginals = naive_quantities(prior, true_emission, model_emission)
    assert math.isclose(report.error_mismatch, mismatch, abs_tol=1e-12)
    assert math.isclose(report.l1_distance, l1, abs_tol=1e-12)
    torch.testing.assert_close(theory.label_marginal_matrix(prior, C, N), label_marginals)
    inverse = torch.linalg.inv(label_marginals)  # square and of full rank here: the pseudo-inverse is the inverse
    assert math.isclose(report.pinv_norm1, inverse.abs().sum(0).max().item(), rel_tol=1e-9)
    assert math.isclose(report.theorem1_bound, N**2 * report.pinv_norm1 * l1, rel_tol=1e-9)


def test_bound_holds_on_random_pairs_at_every_distance():
    generator = torch.Generator().manual_seed(1)
    for draw in range(60):
        scale = 10 ** (-3 + 3 * draw / 59)
        report = theory.evaluate_pair(*random_pair(generator, scale), N)
        assert 0.0 <= report.error_mismatch <= report.refined_bound + 1e-12
        assert report.refined_bound <= report.theorem1_bound + 1e-12
        # Pinsker: the L1 distance never exceeds sqrt(2 KL)
        assert report.theorem1_bound <= report.pinsker_bound * (1 + 1e-9)


def test_identical_models_have_zero_mismatch_and_zero_bound():
    prior, true_emission, _ = random_pair(torch.Generator().manual_seed(2), 0.0)
    report = theory.evaluate_pair(prior, true_emission, true_emission.clone(), N)
    assert report.error_mismatch == 0.0 and report.theorem1_bound == 0.0 and report.kl_divergence == 0.0


def test_condition_2_is_needed():
    """Labels i.i.d. with one distribution: P_C has rank 1, and swapping two labels' emissions leaves
    q(x) equal to pr(x) while the decisions go wrong - no bound on the error by q(x) can hold."""
    unigram = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    labels = theory.enumerate_sequences(C, N)
    prior = unigram[labels].prod(-1)
    label_marginals = theory.label_marginal_matrix(prior, C, N)
    with pytest.raises(ValueError, match=r"condition 2.*rank 1 < 3.*linearly dependent"):
        theory.check_identifiability(label_marginals)
    true_emission = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]], dtype=torch.float64)
    swapped = true_emission[[1, 0, 2]]
    same_prob = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    prior = same_prob[labels].prod(-1)  # labels 0 and 1 equally likely: the swap is invisible in q(x)
    true_conditional = theory.local_conditional(true_emission, N)
    swapped_conditional = theory.local_conditional(swapped, N)
    true_marginal = theory.observation_marginal(prior, true_conditional)
    torch.testing.assert_close(theory.observation_marginal(prior, swapped_conditional), true_marginal)
    assert theory.error_mismatch(prior, true_conditional, swapped_conditional) > 0.3


def test_condition_2_needs_enough_positions():
    prior = torch.full((C**2,), 1.0 / C**2, dtype=torch.float64)
    with pytest.raises(ValueError, match="only N=2 positions for 3 labels"):
        theory.check_identifiability(theory.label_marginal_matrix(prior, C, 2))


def test_condition_1_is_needed():
    """A non-local model that exchanges two equally likely label sequences keeps q(x) = pr(x), with a
    full-rank P_C, and still decides wrongly."""
    generator = torch.Generator().manual_seed(3)
    prior, true_emission, _ = random_pair(generator, 0.0)
    first, second = 5, 19  # label sequences (0,1,2) and (2,0,1)
    prior[first] = prior[second] = prior.sum()  # likely enough to be decided often
    prior = prior / prior.sum()
    theory.check_identifiability(theory.label_marginal_matrix(prior, C, N))
    true_conditional = theory.local_conditional(true_emission, N)
    exchanged = true_conditional.clone()
    exchanged[[first, second]] = true_conditional[[second, first]]
    with pytest.raises(ValueError, match=r"condition 1.*c=\["):
        theory.check_local_emissions(exchanged, C, X, N)
    torch.testing.assert_close(
        theory.observation_marginal(prior, exchanged), theory.observation_marginal(prior, true_conditional)
    )
    assert theory.error_mismatch(prior, true_conditional, exchanged) > 0.0


def test_local_emissions_are_recovered_from_a_factorised_table():
    _, true_emission, _ = random_pair(torch.Generator().manual_seed(4), 0.0)
    table = theory.local_conditional(true_emission, N)
    torch.testing.assert_close(theory.check_local_emissions(table, C, X, N), true_emission)
    position_dependent = table.clone()
    position_dependent[0] = theory.local_conditional(true_emission[[1, 1, 1]], N)[0]
    with pytest.raises(ValueError, match="condition 1"):
        theory.check_local_emissions(position_dependent, C, X, N)
    with pytest.raises(ValueError, match="sum to 1"):
        theory.check_local_emissions(table * 0.5, C, X, N)


def test_kl_divergence_and_pinsker_constant():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    assert math.isclose(theory.kl_divergence(p, q).item(), math.log(2))
    assert math.isinf(theory.kl_divergence(q, p).item())
    label_marginals = torch.diag(torch.tensor([0.5, 0.25], dtype=torch.float64))
    assert math.isclose(theory.pinsker_beta(label_marginals).item(), 2 * 2**4 * 4.0**2)


@pytest.mark.parametrize("order", [2, 3])
def test_lm_label_marginals_match_enumeration(order):
    from fairseq_siamctc.unsupervised.label_lm import NGramLabelLM
    from fairseq_siamctc.unsupervised.toy import fixed_length_prior

    generator = torch.Generator().manual_seed(order)
    probs = torch.rand((C + 1,) * order, generator=generator, dtype=torch.float64) + 0.1
    lm = NGramLabelLM((probs / probs.sum(-1, keepdim=True)).log())
    length = 4
    expected = theory.label_marginal_matrix(fixed_length_prior(lm, length), C, length)
    actual = theory.lm_label_marginals(lm.log_init, lm.log_trans, lm.log_final, lm.state_label, C, length)
    torch.testing.assert_close(actual, expected)
