"""The ``seq_level_ce`` criterion: sequence-level cross-entropy of unpaired unit sequences.

``L = -1/S sum_s log sum_c p_LM(c) q(x_s | c)`` with the task's n-gram label LM and the model's
per-frame scores ``log q(x_n | c)`` (see :mod:`fairseq_siamctc.unsupervised.seq_level_ce`).
"""

import math
from dataclasses import dataclass, field

from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..unsupervised.seq_level_ce import seq_level_cross_entropy


@dataclass
class SeqLevelCECriterionConfig(FairseqDataclass):
    normalize_by: ChoiceEnum(["sentences", "frames"]) = field(
        default="sentences",
        metadata={"help": "divide the summed loss by the number of sequences (the paper's 1/S) or of frames"},
    )


@register_criterion("seq_level_ce", dataclass=SeqLevelCECriterionConfig)
class SeqLevelCECriterion(FairseqCriterion):
    def __init__(self, cfg: SeqLevelCECriterionConfig, task):
        super().__init__(task)
        if not hasattr(task, "label_lm"):
            raise ValueError(f"criterion seq_level_ce needs a task with a label LM (e.g. unit_sequence), got {type(task).__name__}")
        self.normalize_by = str(cfg.normalize_by)
        # a submodule, so that the LM's buffers follow the criterion to the training device
        self.label_lm = task.label_lm

    def forward(self, model, sample, reduce=True):
        lengths = sample["net_input"]["lengths"]
        frame_scores = model(**sample["net_input"])
        # the forward recursion sums many terms: half precision would lose them
        nll = seq_level_cross_entropy(frame_scores.float(), lengths, self.label_lm, reduction="sum" if reduce else "none")
        sample_size = sample["nsentences"] if self.normalize_by == "sentences" else sample["ntokens"]
        logging_output = {
            "loss": nll.detach() if reduce else nll.detach().sum(),
            "ntokens": sample["ntokens"],
            "nsentences": sample["nsentences"],
            "sample_size": sample_size,
        }
        return nll, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        loss = sum(log.get("loss", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        nsentences = sum(log.get("nsentences", 0) for log in logging_outputs)
        # fairseq convention: losses in bits
        metrics.log_scalar("loss", loss / max(sample_size, 1) / math.log(2), sample_size, round=4)
        metrics.log_scalar("nll_per_sequence", loss / max(nsentences, 1) / math.log(2), nsentences, round=4)
        metrics.log_scalar("nll_per_frame", loss / max(ntokens, 1) / math.log(2), ntokens, round=4)
        metrics.log_scalar("ntokens", ntokens)
        metrics.log_scalar("nsentences", nsentences)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
