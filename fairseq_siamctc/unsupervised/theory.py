r"""The classification-error bound of sequence-level unsupervised training, computed exactly.

Setting (all sequences have the same length N; labels c in C, observations x in X):

- the true joint is ``pr(c_1^N, x_1^N) = pr(c_1^N) * pr(x_1^N | c_1^N)``;
- the label prior ``pr(c_1^N)`` (the language model) is known: in unsupervised training it is
  estimated from text alone, so the model shares it: ``q(c_1^N, x_1^N) = pr(c_1^N) * q(x_1^N | c_1^N)``;
- the marginals over observation sequences are ``pr(x) = sum_c pr(c) pr(x|c)`` and
  ``q(x) = sum_c pr(c) q(x|c)``; unpaired observations only ever show ``pr(x)``.

Condition 1 (local emissions): ``pr(x|c) = prod_n e(x_n | c_n)`` with one emission matrix ``e``
(|C| x |X|) for every position, and the model has the same form with its own matrix ``f``.

Condition 2 (identifiability): the matrix ``P_C`` (N x |C|), ``(P_C)_{n,c} = pr_n(c)`` (the
probability of label c at position n under the prior), has full column rank |C| (so N >= |C|).

Decision rules and the error mismatch: the Bayes rule is ``c_pr(x) = argmax_c pr(c) pr(x|c)``, the
model's rule is ``c_q(x) = argmax_c pr(c) q(x|c)``. The sequence error of a rule ``r`` is
``E(r) = 1 - sum_x pr(x, r(x))`` and the mismatch is the excess error ``D_q = E(c_q) - E(c_pr) >= 0``.

Theorem 1, as implemented (derivation):

1. Mismatch by the joint L1 distance. For every x, ``q(x, c_q(x)) >= q(x, c_pr(x))``, hence
   ``pr(x, c_pr) - pr(x, c_q) <= [pr(x, c_pr) - q(x, c_pr)] + [q(x, c_q) - pr(x, c_q)]``; both terms
   are zero when the rules agree, and involve two different label sequences otherwise, so
   ``D_q <= sum_{x,c} |pr(x,c) - q(x,c)| = sum_c pr(c) ||pr(.|c) - q(.|c)||_1``.
2. Product distributions: ``||prod_n e(.|c_n) - prod_n f(.|c_n)||_1 <= sum_n ||e(.|c_n) - f(.|c_n)||_1``
   (telescoping), so ``D_q <= sum_n sum_k pr_n(k) ||e_k - f_k||_1 <= N max_k ||e_k - f_k||_1``.
3. Position marginals identify the emissions. By condition 1, the observation marginal at position
   n is ``pr_n(a) = sum_k pr_n(k) e(a|k)``, i.e. ``pr_.(a) = P_C e(a|.)``, and likewise for q. With
   ``Delta_n = pr_n - q_n`` and condition 2 (``P_C^+ P_C = I``): ``e(a|k) - f(a|k) = sum_n (P_C^+)_{k,n} Delta_n(a)``,
   so ``||e_k - f_k||_1 <= sum_n |(P_C^+)_{k,n}| ||Delta_n||_1``.
4. Marginalisation does not increase L1 distances: ``||Delta_n||_1 <= ||pr(x) - q(x)||_1``.

Steps 1-4 give the refined bound ``D_q <= sum_n sum_k pr_n(k) sum_m |(P_C^+)_{k,m}| ||Delta_m||_1``
(:func:`refined_bound`) and, bounding every entry of ``P_C^+`` by its induced 1-norm
``||P_C^+||_1 = max_n sum_k |(P_C^+)_{k,n}|`` (maximum absolute column sum of the |C| x N matrix) and
every ``||Delta_m||_1`` by ``||pr(x) - q(x)||_1``, the paper's form
``D_q <= N^2 ||P_C^+||_1 sum_x |pr(x) - q(x)|`` (:func:`theorem1_bound`): one factor N from the
positions of the product (step 2), one from the sum over m (step 3). The constant is valid for any
reading of ``||.||_1`` that bounds the largest absolute entry (induced 1- or inf-norm, entrywise sum).
Pinsker's inequality ``sum_x |pr(x) - q(x)| <= sqrt(2 KL(pr(x) || q(x)))`` (KL in nats) gives
``D_q^2 <= beta KL(pr(x) || q(x))`` with ``beta = 2 N^4 ||P_C^+||_1^2`` (:func:`pinsker_bound`).

Necessity of the conditions (shown in the tests): without condition 1, a model that exchanges two
equally likely label sequences keeps ``q(x) = pr(x)`` and decides wrongly; with i.i.d. labels (P_C
of rank 1), exchanging the emissions of two equally likely labels does the same. For an LM with
context, a rank-deficient P_C does not make every wrong model invisible (q(x) still reflects the
label transitions), but nothing ties the error to the KL any more: see :mod:`.toy`, where a label
rotation costs KL 0.008 nats and a sequence error mismatch of 0.54.

The same chain bounds the excess label (per-position) error of position-wise MAP decisions: at each
position n the excess is at most ``sum_x sum_k |pr(x, c_n = k) - q(x, c_n = k)|``, which is at most
the joint L1 distance of step 1.

Everything here except :func:`lm_label_marginals` enumerates all |C|^N label and |X|^N observation
sequences: small sizes only.
Tensors are float64; sequences are enumerated in lexicographic order (:func:`enumerate_sequences`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def enumerate_sequences(num_symbols: int, length: int, device=None) -> torch.Tensor:
    """All ``num_symbols ** length`` sequences in lexicographic order: (num_symbols**length, length) long."""
    if num_symbols < 1 or length < 1:
        raise ValueError(f"need num_symbols >= 1 and length >= 1, got {num_symbols} and {length}")
    symbols = torch.arange(num_symbols, device=device)
    grids = torch.meshgrid(*([symbols] * length), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def local_conditional(emission: torch.Tensor, length: int) -> torch.Tensor:
    """Condition-1 conditional ``q(x|c) = prod_n emission[c_n, x_n]`` for all sequence pairs.

    emission: (C, X), rows are distributions. Returns (C**length, X**length).
    """
    num_labels, num_obs = emission.shape
    labels = enumerate_sequences(num_labels, length, emission.device)
    observations = enumerate_sequences(num_obs, length, emission.device)
    # (Mc, Mx, N): emission[c_n, x_n] for every pair and position
    per_position = emission[labels[:, None, :], observations[None, :, :]]
    return per_position.prod(dim=-1)


def observation_marginal(prior: torch.Tensor, conditional: torch.Tensor) -> torch.Tensor:
    """``p(x) = sum_c prior(c) p(x|c)``. prior: (Mc,), conditional: (Mc, Mx). Returns (Mx,)."""
    return prior @ conditional


def decision_rule(prior: torch.Tensor, conditional: torch.Tensor) -> torch.Tensor:
    """MAP rule ``argmax_c prior(c) p(x|c)`` for every observation sequence: (Mx,) long (label-sequence index)."""
    return (prior[:, None] * conditional).argmax(dim=0)


def sequence_error(prior: torch.Tensor, true_conditional: torch.Tensor, decisions: torch.Tensor) -> torch.Tensor:
    """Sequence error ``1 - sum_x pr(x, r(x))`` of the rule ``decisions`` (Mx,) under the true joint. Scalar."""
    joint = prior[:, None] * true_conditional
    correct = joint.gather(0, decisions[None, :]).sum()
    return 1.0 - correct


def error_mismatch(prior: torch.Tensor, true_conditional: torch.Tensor, model_conditional: torch.Tensor) -> torch.Tensor:
    """``D_q = E(c_q) - E(c_pr)``: the excess sequence error of the model's rule over the Bayes rule. Scalar."""
    model_error = sequence_error(prior, true_conditional, decision_rule(prior, model_conditional))
    bayes_error = sequence_error(prior, true_conditional, decision_rule(prior, true_conditional))
    return model_error - bayes_error


def label_marginal_matrix(prior: torch.Tensor, num_labels: int, length: int) -> torch.Tensor:
    """``P_C`` (length, num_labels): ``(P_C)_{n,c}`` = probability of label c at position n under ``prior`` (Mc,)."""
    if prior.shape != (num_labels**length,):
        raise ValueError(f"prior has shape {tuple(prior.shape)}, expected ({num_labels ** length},) = C**N")
    labels = enumerate_sequences(num_labels, length, prior.device)
    one_hot = torch.nn.functional.one_hot(labels, num_labels).to(prior.dtype)  # (Mc, N, C)
    return torch.einsum("m,mnc->nc", prior, one_hot)


def lm_label_marginals(
    log_init: torch.Tensor, log_trans: torch.Tensor, log_final: torch.Tensor, state_label: torch.Tensor, num_labels: int, length: int
) -> torch.Tensor:
    """``P_C`` (length, num_labels) of the length-N prior ``pr(c) = p_LM(c) / p_LM(length N)`` of a finite-state label LM.

    Forward-backward over the LM's states (see :class:`.label_lm.NGramLabelLM`) instead of
    enumerating the C**N sequences, so it works for real phone inventories.
    """
    log_init, log_trans, log_final = (t.to(torch.float64) for t in (log_init, log_trans, log_final))
    forward = [log_init]
    for _ in range(length - 1):
        forward.append(torch.logsumexp(forward[-1][:, None] + log_trans, dim=0))
    backward = [log_final]
    for _ in range(length - 1):
        backward.append(torch.logsumexp(log_trans + backward[-1][None, :], dim=1))
    log_state_posteriors = torch.stack(forward) + torch.stack(backward[::-1])  # (N, S)
    state_posteriors = (log_state_posteriors - torch.logsumexp(log_state_posteriors[0], dim=0)).exp()
    marginals = torch.zeros(length, num_labels, dtype=torch.float64, device=state_posteriors.device)
    return marginals.index_add_(1, state_label.to(state_posteriors.device), state_posteriors)


def pinv_norm1(label_marginals: torch.Tensor) -> torch.Tensor:
    """``||P_C^+||_1``: induced 1-norm (maximum absolute column sum) of the (C, N) pseudo-inverse. Scalar."""
    return torch.linalg.pinv(label_marginals).abs().sum(dim=0).max()


def l1_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sum_x |p(x) - q(x)|``. Scalar."""
    return (p - q).abs().sum()


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` in nats, with ``0 log 0 = 0``; infinite where q = 0 < p. Scalar."""
    terms = torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p))
    return terms.sum()


def theorem1_bound(label_marginals: torch.Tensor, true_marginal: torch.Tensor, model_marginal: torch.Tensor) -> torch.Tensor:
    """``N^2 ||P_C^+||_1 sum_x |pr(x) - q(x)|`` (theorem 1). label_marginals: (N, C); marginals: (Mx,)."""
    length = label_marginals.shape[0]
    return length**2 * pinv_norm1(label_marginals) * l1_distance(true_marginal, model_marginal)


def pinsker_beta(label_marginals: torch.Tensor) -> torch.Tensor:
    """``beta = 2 N^4 ||P_C^+||_1^2`` of the Pinsker form ``D_q^2 <= beta KL(pr(x) || q(x))``. Scalar."""
    length = label_marginals.shape[0]
    return 2.0 * length**4 * pinv_norm1(label_marginals) ** 2


def pinsker_bound(label_marginals: torch.Tensor, true_marginal: torch.Tensor, model_marginal: torch.Tensor) -> torch.Tensor:
    """``sqrt(beta KL(pr(x) || q(x)))``, the bound on ``D_q`` of the Pinsker form. Scalar."""
    return (pinsker_beta(label_marginals) * kl_divergence(true_marginal, model_marginal)).sqrt()


def position_marginals(marginal: torch.Tensor, num_obs: int, length: int) -> torch.Tensor:
    """Per-position observation marginals of a distribution over X^N: (Mx,) -> (N, X)."""
    cube = marginal.reshape((num_obs,) * length)
    dims = tuple(range(length))
    return torch.stack([cube.sum(dim=tuple(d for d in dims if d != n)) for n in dims])


def refined_bound(
    label_marginals: torch.Tensor, true_marginal: torch.Tensor, model_marginal: torch.Tensor, num_obs: int
) -> torch.Tensor:
    """The bound before its last two relaxations (steps 1-3 of the module docstring). Scalar.

    ``sum_n sum_k pr_n(k) sum_m |(P_C^+)_{k,m}| ||pr_m - q_m||_1`` with pr_m, q_m the observation
    marginals at position m.
    """
    length = label_marginals.shape[0]
    position_l1 = (
        position_marginals(true_marginal, num_obs, length) - position_marginals(model_marginal, num_obs, length)
    ).abs().sum(dim=1)  # (N,)
    per_label = torch.linalg.pinv(label_marginals).abs() @ position_l1  # (C,): bound on ||e_k - f_k||_1
    return (label_marginals @ per_label).sum()


def position_marginals_rows(conditionals: torch.Tensor, num_obs: int, length: int) -> torch.Tensor:
    """:func:`position_marginals` for each row of (R, X**N): returns (R, N, X)."""
    return torch.stack([position_marginals(row, num_obs, length) for row in conditionals])


def check_local_emissions(conditional: torch.Tensor, num_labels: int, num_obs: int, length: int, atol: float = 1e-9) -> torch.Tensor:
    """Checks condition 1 on a full conditional table and returns the emission matrix it factorises into.

    conditional: (C**N, X**N), rows ``p(.|c)``. The emission is read off the position-1 marginal of
    the sequences ``c = (k, k, ..., k)``; the table must equal the product it implies everywhere.
    Raises ValueError naming the worst label/observation sequence pair otherwise. Returns (C, X).
    """
    expected_shape = (num_labels**length, num_obs**length)
    if conditional.shape != expected_shape:
        raise ValueError(f"conditional table has shape {tuple(conditional.shape)}, expected {expected_shape}")
    row_sums = conditional.sum(dim=1)
    if not torch.allclose(row_sums, torch.ones_like(row_sums), atol=atol * conditional.shape[1]):
        worst = (row_sums - 1).abs().argmax().item()
        raise ValueError(f"p(x|c) does not sum to 1 over x for label sequence index {worst} (sum {row_sums[worst].item():.6g})")
    repeated = torch.arange(num_labels, device=conditional.device) * sum(num_labels**n for n in range(length))
    emission = position_marginals_rows(conditional[repeated], num_obs, length)[:, 0, :]
    deviation = (conditional - local_conditional(emission, length)).abs()
    if deviation.max() > atol:
        label_index, obs_index = divmod(deviation.argmax().item(), conditional.shape[1])
        labels = enumerate_sequences(num_labels, length, conditional.device)[label_index].tolist()
        observations = enumerate_sequences(num_obs, length, conditional.device)[obs_index].tolist()
        raise ValueError(
            "condition 1 (local emissions) violated: p(x|c) is not prod_n e(x_n|c_n) with one emission matrix; "
            f"largest deviation {deviation.max().item():.3g} at c={labels}, x={observations}"
        )
    return emission


def check_identifiability(label_marginals: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """Checks condition 2 (``P_C`` of full column rank) and returns its singular values, largest first.

    A singular value below ``rtol`` times the largest counts as zero. Raises ValueError with the
    rank found and the reason (too few positions, or linearly dependent label marginals).
    """
    length, num_labels = label_marginals.shape
    singular_values = torch.linalg.svdvals(label_marginals)
    rank = int((singular_values > rtol * singular_values[0]).sum())
    if rank < num_labels:
        reason = (
            f"only N={length} positions for {num_labels} labels"
            if length < num_labels
            else "the position-wise label marginals are linearly dependent"
        )
        raise ValueError(
            f"condition 2 (identifiability) violated: P_C ({length}x{num_labels}) has rank {rank} < {num_labels} "
            f"({reason}); smallest singular value {singular_values[-1].item():.3g}"
        )
    return singular_values


@dataclass
class BoundReport:
    """Every quantity of theorem 1 for one (pr, q) pair (python floats)."""

    error_mismatch: float
    bayes_error: float
    model_error: float
    l1_distance: float
    kl_divergence: float
    pinv_norm1: float
    smallest_singular_value: float
    theorem1_bound: float
    refined_bound: float
    pinsker_bound: float


def evaluate_pair(prior: torch.Tensor, true_emission: torch.Tensor, model_emission: torch.Tensor, length: int) -> BoundReport:
    """Checks both conditions and computes every quantity of theorem 1.

    prior: (C**N,) label-sequence prior; true_emission, model_emission: (C, X) row-stochastic.
    """
    num_labels, num_obs = true_emission.shape
    if model_emission.shape != true_emission.shape:
        raise ValueError(f"model emission {tuple(model_emission.shape)} and true emission {tuple(true_emission.shape)} differ in shape")
    for name, emission in (("true", true_emission), ("model", model_emission)):
        sums = emission.sum(dim=1)
        if (emission < 0).any() or not torch.allclose(sums, torch.ones_like(sums)):
            raise ValueError(f"{name} emission rows must be probability distributions, row sums {sums.tolist()}")
    label_marginals = label_marginal_matrix(prior, num_labels, length)
    singular_values = check_identifiability(label_marginals)
    true_conditional = local_conditional(true_emission, length)
    model_conditional = local_conditional(model_emission, length)
    true_marginal = observation_marginal(prior, true_conditional)
    model_marginal = observation_marginal(prior, model_conditional)
    bayes_error = sequence_error(prior, true_conditional, decision_rule(prior, true_conditional))
    model_error = sequence_error(prior, true_conditional, decision_rule(prior, model_conditional))
    return BoundReport(
        error_mismatch=(model_error - bayes_error).item(),
        bayes_error=bayes_error.item(),
        model_error=model_error.item(),
        l1_distance=l1_distance(true_marginal, model_marginal).item(),
        kl_divergence=kl_divergence(true_marginal, model_marginal).item(),
        pinv_norm1=pinv_norm1(label_marginals).item(),
        smallest_singular_value=singular_values[-1].item(),
        theorem1_bound=theorem1_bound(label_marginals, true_marginal, model_marginal).item(),
        refined_bound=refined_bound(label_marginals, true_marginal, model_marginal, num_obs).item(),
        pinsker_bound=pinsker_bound(label_marginals, true_marginal, model_marginal).item(),
    )
