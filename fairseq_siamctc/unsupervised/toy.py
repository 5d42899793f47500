"""Toy unsupervised training: learn an emission matrix from units alone with the sequence-level loss.

Label sequences of a fixed length N are drawn from a known bigram LM, units are emitted through a
known emission matrix, and a model emission matrix ``softmax(logits)`` is fitted to the units only
by minimising the sequence-level cross-entropy with the known LM (Adam, full batch). Every
``eval_every`` steps the exact (enumerated) quantities of theorem 1 are recorded for the current
model: the classification-error mismatch next to its bound, and the error of the model's decisions
on the training sequences themselves.

For fixed-length data, ``p_LM`` with an end-of-sentence factor differs from the length-N prior
``pr(c) = p_LM(c) / p_LM(length N)`` by a constant, so the loss has the same gradients.
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass

import torch

from . import theory
from .label_lm import NGramLabelLM
from .seq_level_ce import frame_scores_from_table, seq_level_cross_entropy

# Asymmetric transitions and start probabilities, so that condition 2 holds and no label permutation
# explains the units equally well. Each transition row and its end probability sum to 1.
DEFAULT_START = (0.6, 0.3, 0.1)
DEFAULT_TRANSITION = ((0.1, 0.65, 0.15), (0.15, 0.1, 0.65), (0.6, 0.2, 0.1))
DEFAULT_END = (0.1, 0.1, 0.1)
DEFAULT_EMISSION = ((0.8, 0.1, 0.05, 0.05), (0.05, 0.75, 0.15, 0.05), (0.05, 0.05, 0.3, 0.6))


def fixed_length_prior(label_lm: NGramLabelLM, length: int) -> torch.Tensor:
    """``pr(c)`` over all label sequences of one length, from the LM's n-gram table, renormalised: (C**length,)."""
    table = label_lm.log_probs
    num_labels, order = label_lm.num_labels, label_lm.order
    log_probs = []
    for labels in itertools.product(range(num_labels), repeat=length):
        padded = (num_labels,) * (order - 1) + labels + (num_labels,)
        log_probs.append(sum(table[padded[i - order + 1 : i + 1]] for i in range(order - 1, len(padded))))
    return torch.stack(log_probs).softmax(dim=0)


def stationary_start() -> tuple:
    """The stationary distribution of the default transitions: as start distribution, it gives every
    position the same label distribution, so that P_C has rank 1 and condition 2 fails."""
    transition = torch.tensor(DEFAULT_TRANSITION, dtype=torch.float64)
    transition = transition / transition.sum(1, keepdim=True)  # the end probability is the same for all labels
    values, vectors = torch.linalg.eig(transition.T)
    stationary = vectors[:, values.real.argmax()].real
    return tuple((stationary / stationary.sum()).tolist())


@dataclass
class ToyRecord:
    """The state of training after ``step`` updates (python floats)."""

    step: int
    loss: float
    kl_divergence: float
    error_mismatch: float
    model_error: float
    bayes_error: float
    theorem1_bound: float
    refined_bound: float
    training_sequence_error: float
    training_label_error: float


def run_toy_experiment(
    num_sequences: int = 2000,
    length: int = 4,
    steps: int = 300,
    learning_rate: float = 0.05,
    eval_every: int = 25,
    seed: int = 0,
    start: tuple = DEFAULT_START,
) -> list[ToyRecord]:
    """Trains the emission matrix from units alone; returns the records at steps 0, eval_every, ..., steps.

    ``start``: the LM's first-label distribution. Where the prior violates condition 2 (e.g. a start
    distribution that is stationary for the transitions makes every row of P_C the same), training
    still runs and the bounds are recorded as NaN: theorem 1 does not apply.
    """
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    start, transition, end = (torch.tensor(v, dtype=dtype) for v in (start, DEFAULT_TRANSITION, DEFAULT_END))
    label_lm = NGramLabelLM.from_bigram(start.log(), transition.log(), end.log())
    true_emission = torch.tensor(DEFAULT_EMISSION, dtype=dtype)
    num_labels, num_units = true_emission.shape

    prior = fixed_length_prior(label_lm, length)
    label_marginals = theory.label_marginal_matrix(prior, num_labels, length)
    try:
        theory.check_identifiability(label_marginals)
        identifiable = True
    except ValueError:
        identifiable = False
    true_conditional = theory.local_conditional(true_emission, length)
    true_marginal = theory.observation_marginal(prior, true_conditional)
    bayes_error = theory.sequence_error(prior, true_conditional, theory.decision_rule(prior, true_conditional)).item()
    all_labels = theory.enumerate_sequences(num_labels, length)
    label_index = torch.multinomial(prior, num_sequences, replacement=True, generator=generator)
    labels = all_labels[label_index]  # (S, N)
    units = torch.multinomial(true_emission[labels.reshape(-1)], 1, generator=generator).reshape(num_sequences, length)
    lengths = torch.full((num_sequences,), length)
    # index of each unit sequence in the lexicographic enumeration of X^N
    unit_index = (units * num_units ** torch.arange(length - 1, -1, -1)).sum(1)

    logits = (0.1 * torch.randn(num_labels, num_units, generator=generator, dtype=dtype)).requires_grad_()
    optimizer = torch.optim.Adam([logits], lr=learning_rate)
    records = []
    for step in range(steps + 1):
        loss = seq_level_cross_entropy(frame_scores_from_table(units, logits.log_softmax(-1)), lengths, label_lm)
        if step % eval_every == 0 or step == steps:
            model_conditional = theory.local_conditional(logits.detach().softmax(-1), length)
            model_marginal = theory.observation_marginal(prior, model_conditional)
            decisions = theory.decision_rule(prior, model_conditional)
            model_error = theory.sequence_error(prior, true_conditional, decisions).item()
            decided = all_labels[decisions[unit_index]]
            records.append(
                ToyRecord(
                    step=step,
                    loss=loss.item(),
                    kl_divergence=theory.kl_divergence(true_marginal, model_marginal).item(),
                    error_mismatch=model_error - bayes_error,
                    model_error=model_error,
                    bayes_error=bayes_error,
                    theorem1_bound=(
                        theory.theorem1_bound(label_marginals, true_marginal, model_marginal).item() if identifiable else math.nan
                    ),
                    refined_bound=(
                        theory.refined_bound(label_marginals, true_marginal, model_marginal, num_units).item()
                        if identifiable
                        else math.nan
                    ),
                    training_sequence_error=(decided != labels).any(1).double().mean().item(),
                    training_label_error=(decided != labels).double().mean().item(),
                )
            )
        if step < steps:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return records


def records_to_markdown(records: list[ToyRecord]) -> str:
    """A markdown table of the training records."""
    header = (
        "| step | loss (nats/seq) | KL(pr(x)||q(x)) | model error | Bayes error | mismatch D_q | refined bound | theorem-1 bound "
        "| train seq. error | train label error |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = (
        f"| {r.step} | {r.loss:.4f} | {r.kl_divergence:.2e} | {r.model_error:.4f} | {r.bayes_error:.4f} | "
        f"{r.error_mismatch:.4f} | {r.refined_bound:.3f} | {r.theorem1_bound:.3f} | {r.training_sequence_error:.4f} | "
        f"{r.training_label_error:.4f} |"
        for r in records
    )
    return header + "\n".join(rows) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-sequences", type=int, default=2000)
    parser.add_argument("--length", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(records_to_markdown(run_toy_experiment(args.num_sequences, args.length, args.steps, seed=args.seed)), end="")


if __name__ == "__main__":
    main()
