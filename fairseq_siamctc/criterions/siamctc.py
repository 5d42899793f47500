"""The ``siamctc`` criterion: eq. 6 of the paper, L = L_CTC + alpha * L_KLD + beta * L_TINCE.

The model returns the two views' encoder outputs (``z``, ``z_pert`` and their padding masks) and
owns the heads ``phi`` (attention) and ``psi`` (TINCE); the math lives in
:func:`fairseq_siamctc.losses.siamctc_loss`.

Non-finite values. In fp32 (and bf16, which fairseq does not loss-scale) a non-finite encoder output
or loss term stops training with an error naming it. Under fp16 or AMP an overflow is expected now
and then and is fairseq's to handle: the step returns a NaN loss whose gradient is NaN in every
trained parameter, so fairseq's loss scaler skips the update and lowers the scale ("gradient
overflow detected" in the log), on every rank alike (raising here would stop one rank and leave the
others waiting in the all-reduce). Each such batch is logged with a count.
"""

import logging
from dataclasses import dataclass, field

import torch
from omegaconf import II

from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..losses import SIMILARITIES, siamctc_loss

logger = logging.getLogger(__name__)

TERMS = ("ctc", "kld", "tince")
STATISTICS = ("blank_share", "slope_error", "path_offset", "swapped_share")


def num_frames(features, padding_mask):
    """Encoder frames of one view (fairseq's ``ntokens``, for its words-per-second figures)."""
    if padding_mask is None:
        return features.shape[0] * features.shape[1]
    return (~padding_mask).sum().detach()


@dataclass
class SiamCTCCriterionConfig(FairseqDataclass):
    ctc_weight: float = field(
        default=1.0, metadata={"help": "weight of the attention-CTC term (eq. 2); 0 switches it off (paper table 2)"}
    )
    alpha: float = field(
        default=1.0,
        metadata={"help": "weight of the KL term to the Viterbi path (eq. 5); 0 switches it off (paper table 2)"},
    )
    beta: float = field(
        default=1.0, metadata={"help": "weight of the temporal InfoNCE term (eq. 4); 0 switches it off (paper table 2)"}
    )
    temperature: float = field(
        default=2.0, metadata={"help": "temperature of the attention logits sim(phi(z~)_i, z_j) / temperature"}
    )
    blank_logit: float = field(default=-1.0, metadata={"help": "fixed logit of the blank class of the attention-CTC"})
    similarity: ChoiceEnum(SIMILARITIES) = field(
        default="cosine", metadata={"help": "similarity of the attention logits"}
    )
    num_negatives: int = field(default=20, metadata={"help": "TINCE: negatives per anchor frame (M)"})
    min_distance: int = field(
        default=5, metadata={"help": "TINCE: negatives lie at least this many frames from the anchor (K)"}
    )
    tince_temperature: float = field(default=0.2, metadata={"help": "TINCE: temperature of the cosine similarities"})
    seed: int = field(
        default=II("common.seed"),
        metadata={"help": "seed of the TINCE negatives in validation (training draws from fairseq's per-update seed)"},
    )
    fp16: bool = field(
        default=II("common.fp16"),
        metadata={"help": "fp16 training: a non-finite batch is left to fairseq's loss scaler instead of stopping"},
    )
    amp: bool = field(
        default=II("common.amp"),
        metadata={"help": "AMP training: a non-finite batch is left to fairseq's loss scaler instead of stopping"},
    )


@register_criterion("siamctc", dataclass=SiamCTCCriterionConfig)
class SiamCTCCriterion(FairseqCriterion):
    def __init__(self, cfg: SiamCTCCriterionConfig, task):
        super().__init__(task)
        if cfg.ctc_weight == 0 and cfg.alpha == 0 and cfg.beta == 0:
            raise ValueError("criterion siamctc: ctc_weight, alpha and beta are all 0, nothing to train")
        self.cfg = cfg
        self.non_finite_batches = 0

    @property
    def loss_scaled(self) -> bool:
        """Whether fairseq scales the loss (fp16, AMP) and so skips the steps whose gradients overflow."""
        return self.cfg.fp16 is True or self.cfg.amp is True  # not an unresolved interpolation

    def negatives_generator(self, device) -> torch.Generator:
        """Generator of the TINCE negatives.

        Training: seeded from the global CPU generator, which fairseq's trainer reseeds with
        common.seed + update number before every step: reproducible, resumable, new negatives at
        every step and micro-batch, and no device sync. Validation: the fixed ``seed``, so that
        validation losses are comparable between checkpoints.
        """
        seed = int(torch.randint(2**62, (1,))) if self.training else self.cfg.seed
        return torch.Generator(device=device).manual_seed(seed)

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        z, z_pert = net_output["z"], net_output["z_pert"]
        # before the loss: the Viterbi alignment needs finite scores (one host sync per step)
        if not bool(torch.isfinite(z).all() & torch.isfinite(z_pert).all()):
            return self.non_finite_step(model, z, z_pert, {"encoder output": None})
        cfg = self.cfg
        terms = siamctc_loss(
            z,
            z_pert,
            net_output.get("z_padding_mask"),
            net_output.get("z_pert_padding_mask"),
            model.phi,
            model.psi,
            temperature=cfg.temperature,
            blank_logit=cfg.blank_logit,
            similarity=str(cfg.similarity),
            num_negatives=cfg.num_negatives,
            min_distance=cfg.min_distance,
            tince_temperature=cfg.tince_temperature,
            alpha=cfg.alpha,
            beta=cfg.beta,
            ctc_weight=cfg.ctc_weight,
            generator=self.negatives_generator(z.device),
        )
        bad = self.non_finite_terms(terms)
        if bad:
            return self.non_finite_step(model, z, z_pert, bad)
        batch_size = z.shape[0]
        loss = terms["loss"] * batch_size
        logging_output = {
            "loss": loss.detach(),
            "ntokens": num_frames(z, net_output.get("z_padding_mask"))
            + num_frames(z_pert, net_output.get("z_pert_padding_mask")),
            "nsentences": batch_size,
            "sample_size": batch_size,
            "aligned": terms["num_aligned"].detach(),
        }
        for name in TERMS + STATISTICS:
            logging_output[name] = terms[name].detach() * batch_size
        return loss, batch_size, logging_output

    def non_finite_terms(self, terms) -> dict:
        """The enabled terms that are not finite, by name (one host sync per step)."""
        weights = {"ctc": self.cfg.ctc_weight, "kld": self.cfg.alpha, "tince": self.cfg.beta}
        enabled = [name for name in TERMS if weights[name] != 0]
        values = torch.stack([terms[name].detach().float() for name in enabled])
        if bool(torch.isfinite(values).all()):
            return {}
        return {name: float(value) for name, value in zip(enabled, values) if not torch.isfinite(value)}

    def non_finite_step(self, model, z, z_pert, bad: dict):
        """fp32: raises FloatingPointError naming what is not finite. fp16/AMP: a NaN loss for fairseq's
        loss scaler, reaching every trained parameter so that every gradient is NaN and the step is skipped."""
        what = ", ".join(name if value is None else f"{name}={value}" for name, value in bad.items())
        if not self.loss_scaled or not self.training:
            raise FloatingPointError(
                f"criterion siamctc: non-finite {what}; check the encoder outputs for NaN/inf "
                "(e.g. fp16 overflow) or lower the learning rate"
            )
        self.non_finite_batches += 1
        logger.warning(
            f"criterion siamctc: non-finite {what} in this batch (fp16/AMP): left to fairseq's loss scaler, "
            f"which skips the step ({self.non_finite_batches} such batches so far in this process)"
        )
        batch_size = z.shape[0]
        touch = z.float().sum() + z_pert.float().sum()
        touch = touch + sum(p.float().sum() for p in model.parameters() if p.requires_grad)
        loss = touch * float("nan")
        nan = loss.detach()
        logging_output = {"loss": nan, "ntokens": 0, "nsentences": batch_size, "sample_size": batch_size,
                          "aligned": 0}
        for name in TERMS + STATISTICS:
            logging_output[name] = nan
        return loss, batch_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        denominator = max(sample_size, 1)
        for name in ("loss",) + TERMS + STATISTICS:
            total = sum(log.get(name, 0) for log in logging_outputs)
            metrics.log_scalar(name, total / denominator, sample_size, round=4)
        metrics.log_scalar("aligned", sum(log.get("aligned", 0) for log in logging_outputs), round=0)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
