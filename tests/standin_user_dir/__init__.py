"""A test-only fairseq user dir: the plugin plus a stand-in ``siamctc_standin`` criterion, so that the
model/export round trip can train through fairseq-hydra-train independently of the real criterion."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

import fairseq_siamctc  # noqa: F401  (registers the siamctc task and model)


@dataclass
class StandinConfig(FairseqDataclass):
    pass


def masked_mean(x, padding_mask):
    if padding_mask is None:
        return x.mean(1)
    valid = (~padding_mask).unsqueeze(-1).to(x.dtype)
    return (x * valid).sum(1) / valid.sum(1)


@register_criterion("siamctc_standin", dataclass=StandinConfig)
class StandinCriterion(FairseqCriterion):
    """Pulls the utterance means of phi(Z~) and Z together and psi(Z) towards Z: touches every head."""

    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"])
        z, z_pert = out["z"], out["z_pert"]
        pooled = masked_mean(z, out["z_padding_mask"])
        pooled_pert = masked_mean(model.phi(z_pert), out["z_pert_padding_mask"])
        loss = (1 - F.cosine_similarity(pooled, pooled_pert, dim=-1)).sum()
        loss = loss + (model.psi(z) - z).pow(2).mean() * z.size(0)
        batch = z.size(0)
        return loss, batch, {"loss": loss.detach(), "sample_size": batch, "nsentences": batch, "ntokens": batch}

    @staticmethod
    def reduce_metrics(logging_outputs):
        from fairseq import metrics

        total = sum(log["loss"] for log in logging_outputs)
        size = sum(log["sample_size"] for log in logging_outputs)
        metrics.log_scalar("loss", float(total) / max(size, 1), size)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
