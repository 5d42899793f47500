"""Discrete unit sequences (e.g. k-means units of speech frames) read from a ``.km`` file.

One utterance a line, space-separated non-negative unit ids (the format of fairseq's
``examples/hubert/simple_kmeans/dump_km_label.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from fairseq.data import FairseqDataset, data_utils


def read_unit_file(path: str | Path, num_units: int, dedup: bool = False) -> list[np.ndarray]:
    """The unit sequences of a ``.km`` file, each an int64 array.

    ``dedup`` merges runs of a repeated unit into one. Empty lines, non-integers and ids outside
    ``[0, num_units)`` raise ValueError naming the file and line.
    """
    sequences = []
    with open(path) as lines:
        for line_number, line in enumerate(lines, start=1):
            tokens = line.split()
            if not tokens:
                raise ValueError(f"{path}:{line_number}: empty unit sequence")
            try:
                units = np.array([int(t) for t in tokens], dtype=np.int64)
            except ValueError:
                raise ValueError(f"{path}:{line_number}: unit ids must be integers, got {line.strip()[:80]!r}") from None
            bad = units[(units < 0) | (units >= num_units)]
            if bad.size:
                raise ValueError(f"{path}:{line_number}: unit id {bad[0]} outside [0, {num_units}) (task.num_units)")
            if dedup:
                units = units[np.concatenate([[True], units[1:] != units[:-1]])]
            sequences.append(units)
    if not sequences:
        raise ValueError(f"{path}: no unit sequences")
    return sequences


class UnitSequenceDataset(FairseqDataset):
    """Unit sequences, batched as ``net_input = {"units": (B, N) long, "lengths": (B,) long}``.

    Padding positions hold unit 0; the lengths say which frames are real.
    """

    def __init__(self, sequences: list[np.ndarray], shuffle: bool = True, seed: int = 1):
        self.sequences = sequences
        self.sizes = np.array([len(s) for s in sequences], dtype=np.int64)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 1

    def __getitem__(self, index):
        return {"id": index, "units": torch.from_numpy(self.sequences[index])}

    def __len__(self):
        return len(self.sequences)

    def collater(self, samples):
        if not samples:
            return {}
        lengths = torch.tensor([len(s["units"]) for s in samples], dtype=torch.long)
        units = torch.zeros(len(samples), int(lengths.max()), dtype=torch.long)
        for row, sample in enumerate(samples):
            units[row, : len(sample["units"])] = sample["units"]
        return {
            "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
            "nsentences": len(samples),
            "ntokens": int(lengths.sum()),
            "net_input": {"units": units, "lengths": lengths},
        }

    def num_tokens(self, index):
        return int(self.sizes[index])

    def size(self, index):
        return int(self.sizes[index])

    def set_epoch(self, epoch):
        self.epoch = epoch

    @property
    def can_reuse_epoch_itr_across_epochs(self):
        return not self.shuffle

    def ordered_indices(self):
        """Shuffled (per epoch, seeded), then stably sorted by length so that batches pad little."""
        if not self.shuffle:
            return np.argsort(self.sizes, kind="stable")
        with data_utils.numpy_seed(self.seed, self.epoch):
            order = np.random.permutation(len(self))
        return order[np.argsort(self.sizes[order], kind="stable")]
