"""n-gram label language models as dense finite-state machines for the forward algorithm.

An n-gram LM over C labels is stored as a table ``log_probs`` of shape ``(C+1,) * order``: the first
``order - 1`` axes are the history (index C = begin of sentence, BOS), the last axis the predicted
symbol (index C = end of sentence, EOS). For the forward algorithm it is compiled into states =
the last ``max(order - 1, 1)`` symbols (BOS only as a prefix), each state emitting its last label:
``log_init (S,)``, ``log_trans (S, S)``, ``log_final (S,)`` and ``state_label (S,)``.

Frame-level units of speech repeat a label over several frames; ``label_loop_prob`` adds an HMM
self-loop (stay in the state with that probability, else take an LM step, EOS included), so that a
phone LM estimated from transcripts can score frame-level label sequences.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn


def estimate_ngram_table(sequences: Sequence[Sequence[int]], num_labels: int, order: int = 2, add_k: float = 0.1) -> torch.Tensor:
    """Add-k smoothed n-gram log-probabilities from label sequences: ``(C+1,) * order`` float64.

    Every history predicts the C labels and EOS (never BOS). Histories that cannot occur (BOS after
    a label) get the uniform distribution; they are never used.
    """
    if order < 1:
        raise ValueError(f"n-gram order must be >= 1, got {order}")
    if add_k <= 0:
        raise ValueError(f"add_k must be > 0 so that every label sequence has a probability, got {add_k}")
    bos = eos = num_labels
    counts = torch.full((num_labels + 1,) * order, float(add_k), dtype=torch.float64)
    for line_number, sequence in enumerate(sequences, start=1):
        for label in sequence:
            if not 0 <= label < num_labels:
                raise ValueError(f"label sequence {line_number}: label {label} is outside [0, {num_labels})")
        padded = [bos] * (order - 1) + list(sequence) + [eos]
        for end in range(order - 1, len(padded)):
            counts[tuple(padded[end - order + 1 : end + 1])] += 1.0
    return (counts / counts.sum(dim=-1, keepdim=True)).log()


def read_label_sequences(path: str | Path, symbols: Sequence[str] | None = None) -> tuple[list[str], list[list[int]]]:
    """Reads a label file (one utterance a line, space-separated symbols, e.g. a ``.phn`` file).

    Returns the symbol inventory (sorted, or ``symbols`` if given) and the sequences as indices.
    A symbol outside a given inventory raises ValueError naming the file and line.
    """
    lines = Path(path).read_text().splitlines()
    tokenised = [line.split() for line in lines]
    inventory = list(symbols) if symbols is not None else sorted({s for tokens in tokenised for s in tokens})
    index = {s: i for i, s in enumerate(inventory)}
    sequences = []
    for line_number, tokens in enumerate(tokenised, start=1):
        unknown = [s for s in tokens if s not in index]
        if unknown:
            raise ValueError(f"{path}:{line_number}: label(s) {unknown} not in the label inventory")
        sequences.append([index[s] for s in tokens])
    if not inventory:
        raise ValueError(f"{path}: no labels found")
    return inventory, sequences


class NGramLabelLM(nn.Module):
    """A dense finite-state form of an n-gram label LM (buffers follow the module's device)."""

    def __init__(self, log_probs: torch.Tensor, label_loop_prob: float = 0.0):
        super().__init__()
        order = log_probs.dim()
        num_labels = log_probs.shape[0] - 1
        if any(size != num_labels + 1 for size in log_probs.shape):
            raise ValueError(f"n-gram table must have shape (C+1,)*order, got {tuple(log_probs.shape)}")
        if not 0.0 <= label_loop_prob < 1.0:
            raise ValueError(f"label_loop_prob must be in [0, 1), got {label_loop_prob}")
        self.order = order
        self.num_labels = num_labels
        bos = num_labels
        state_length = max(order - 1, 1)
        states = [
            (bos,) * (state_length - k) + labels
            for k in range(1, state_length + 1)
            for labels in itertools.product(range(num_labels), repeat=k)
        ]
        state_index = {state: i for i, state in enumerate(states)}
        num_states = len(states)
        log_probs = log_probs.to(torch.float64)
        log_init = torch.full((num_states,), -math.inf, dtype=torch.float64)
        log_trans = torch.full((num_states, num_states), -math.inf, dtype=torch.float64)
        log_final = torch.empty(num_states, dtype=torch.float64)
        start_history = (bos,) * (order - 1)
        for label in range(num_labels):
            log_init[state_index[(bos,) * (state_length - 1) + (label,)]] = log_probs[start_history + (label,)]
        for i, state in enumerate(states):
            history = state[len(state) - (order - 1) :] if order > 1 else ()
            log_final[i] = log_probs[history + (num_labels,)]
            for label in range(num_labels):
                log_trans[i, state_index[state[1:] + (label,) if order > 1 else (label,)]] = log_probs[history + (label,)]
        if label_loop_prob > 0.0:
            log_trans = torch.log(label_loop_prob * torch.eye(num_states, dtype=torch.float64) + (1 - label_loop_prob) * log_trans.exp())
            log_final = log_final + math.log1p(-label_loop_prob)
        self.register_buffer("log_probs", log_probs, persistent=False)
        self.register_buffer("log_init", log_init, persistent=False)
        self.register_buffer("log_trans", log_trans, persistent=False)
        self.register_buffer("log_final", log_final, persistent=False)
        self.register_buffer("state_label", torch.tensor([s[-1] for s in states], dtype=torch.long), persistent=False)

    @classmethod
    def estimate(
        cls, sequences: Sequence[Sequence[int]], num_labels: int, order: int = 2, add_k: float = 0.1, label_loop_prob: float = 0.0
    ) -> "NGramLabelLM":
        """Estimates the n-gram table from label sequences (see :func:`estimate_ngram_table`)."""
        return cls(estimate_ngram_table(sequences, num_labels, order, add_k), label_loop_prob)

    @classmethod
    def from_bigram(cls, log_start: torch.Tensor, log_transition: torch.Tensor, log_end: torch.Tensor) -> "NGramLabelLM":
        """A bigram LM from ``log p(c | BOS)`` (C,), ``log p(c' | c)`` (C, C) and ``log p(EOS | c)`` (C,).

        Rows of ``[log_transition, log_end]`` and ``log_start`` must be log-distributions (the empty
        sequence has probability zero).
        """
        num_labels = log_start.shape[0]
        table = torch.full((num_labels + 1, num_labels + 1), -math.inf, dtype=torch.float64)
        table[num_labels, :num_labels] = log_start.to(torch.float64)
        table[:num_labels, :num_labels] = log_transition.to(torch.float64)
        table[:num_labels, num_labels] = log_end.to(torch.float64)
        return cls(table)
