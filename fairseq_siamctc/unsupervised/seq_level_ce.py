r"""The sequence-level cross-entropy loss of unsupervised training.

``L = -1/S sum_s log sum_{c_1^{N_s}} p_LM(c_1^{N_s}) q(x_{s,1}^{N_s} | c_1^{N_s})`` with the local
emissions of condition 1, ``q(x|c) = prod_n q(x_n | c_n)``. It is the cross-entropy of the model's
marginal ``q(x)`` on unpaired observation sequences, so minimising it minimises
``KL(pr(x) || q(x))``, which bounds the classification-error mismatch (see :mod:`.theory`).

The sum over label sequences is the forward algorithm over the states of the label LM
(:class:`.label_lm.NGramLabelLM`); ``p_LM`` includes the end-of-sentence probability after the last
label. Each step is a matrix product in scaled probability space (memory B x S, not B x S x S),
shifted by the running maximum so that it is exact in log space.
"""

from __future__ import annotations

import torch

from .label_lm import NGramLabelLM


def frame_scores_from_table(units: torch.Tensor, emission_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-frame ``log q(x_n | c)`` from an emission table.

    units: (B, N) long unit ids (padding may hold any valid id); emission_log_probs: (C, X).
    Returns (B, N, C).
    """
    return emission_log_probs.transpose(0, 1)[units]


def _log_matmul_exp(log_alpha: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """``log(exp(log_alpha) @ trans)`` for transition probabilities ``trans``: (B, S) x (S, S) -> (B, S)."""
    shift = log_alpha.amax(dim=1, keepdim=True)
    # an all -inf row (impossible prefix) must stay -inf, not become NaN
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    probs = (log_alpha - shift).exp() @ trans
    # clamping keeps the gradient finite for unreachable states (log 0); their mass stays negligible
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log() + shift


def sequence_log_likelihood(
    frame_scores: torch.Tensor,
    lengths: torch.Tensor,
    log_init: torch.Tensor,
    log_trans: torch.Tensor,
    log_final: torch.Tensor,
    state_label: torch.Tensor,
) -> torch.Tensor:
    """``log sum_c p_LM(c) prod_n exp(frame_scores[b, n, c_n])`` for every sequence of the batch.

    frame_scores: (B, N, C) per-frame ``log q(x_n | c)``; lengths: (B,) long, each in [1, N] (frames
    past a length are ignored); the LM as a finite-state machine: log_init (S,), log_trans (S, S),
    log_final (S,), state_label (S,) long (the label each state emits). Returns (B,).
    """
    like = dict(device=frame_scores.device, dtype=frame_scores.dtype)
    log_init, log_trans, log_final = log_init.to(**like), log_trans.to(**like), log_final.to(**like)
    emissions = frame_scores[:, :, state_label.to(frame_scores.device)]  # (B, N, S)
    trans = log_trans.exp()
    log_alpha = log_init + emissions[:, 0]
    for frame in range(1, emissions.shape[1]):
        stepped = _log_matmul_exp(log_alpha, trans) + emissions[:, frame]
        log_alpha = torch.where((frame < lengths)[:, None], stepped, log_alpha)
    return torch.logsumexp(log_alpha + log_final, dim=1)


def seq_level_cross_entropy(
    frame_scores: torch.Tensor, lengths: torch.Tensor, label_lm: NGramLabelLM, reduction: str = "mean"
) -> torch.Tensor:
    """The loss ``-1/S sum_s log sum_c p_LM(c) q(x_s | c)``.

    frame_scores: (B, N, C) per-frame ``log q(x_n | c)`` (e.g. :func:`frame_scores_from_table`);
    lengths: (B,) in [1, N]. reduction: "mean" (the paper's 1/S), "sum" or "none" ((B,) per sequence).
    """
    if frame_scores.dim() != 3 or frame_scores.shape[-1] != label_lm.num_labels:
        raise ValueError(
            f"frame scores must be (B, N, C={label_lm.num_labels}), got {tuple(frame_scores.shape)}"
        )
    nll = -sequence_log_likelihood(
        frame_scores, lengths, label_lm.log_init, label_lm.log_trans, label_lm.log_final, label_lm.state_label
    )
    if reduction == "mean":
        return nll.mean()
    if reduction == "sum":
        return nll.sum()
    if reduction == "none":
        return nll
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
