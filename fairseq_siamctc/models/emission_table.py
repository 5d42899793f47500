"""The ``emission_table`` model: a learnable emission matrix ``q(x | c)`` of condition 1."""

from dataclasses import dataclass, field

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from torch import nn

from ..unsupervised.seq_level_ce import frame_scores_from_table


@dataclass
class EmissionTableConfig(FairseqDataclass):
    init_std: float = field(
        default=0.1, metadata={"help": "std of the initial logits; small: start near uniform emissions"}
    )


@register_model("emission_table", dataclass=EmissionTableConfig)
class EmissionTableModel(BaseFairseqModel):
    """``q(x | c) = softmax_x(logits[c, x])``, the same at every position (local emissions)."""

    def __init__(self, num_labels: int, num_units: int, init_std: float):
        super().__init__()
        self.logits = nn.Parameter(init_std * torch.randn(num_labels, num_units))

    @classmethod
    def build_model(cls, cfg: EmissionTableConfig, task):
        return cls(task.num_labels, task.cfg.num_units, cfg.init_std)

    def emission_log_probs(self) -> torch.Tensor:
        """``log q(x | c)``: (C, X)."""
        return self.logits.log_softmax(dim=-1)

    def forward(self, units: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """units: (B, N) long -> per-frame ``log q(x_n | c)``: (B, N, C). lengths are the criterion's."""
        return frame_scores_from_table(units, self.emission_log_probs())
