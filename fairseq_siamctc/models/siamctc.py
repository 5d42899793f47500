"""The ``siamctc`` model: a pre-trained HuBERT or WavLM encoder shared by both views, a projection to
256 dimensions, and the heads ``phi`` (attention) and ``psi`` (TINCE) the ``siamctc`` criterion uses.

State dict layout (what ``siamctc-export`` relies on): ``encoder.*`` is the base model's own state
dict, unchanged in names; ``projection.*`` exists only when the encoder has no suitable projection of
its own (HuBERT's ``final_proj`` is used where it maps to ``projection_dim``); ``phi.*``, ``psi.*``;
``_extra_state`` records the base checkpoint (kind, whole config, label-set sizes) so that the model
can be rebuilt and exported without the original file.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import merge_with_parent
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import MISSING

from .checkpoints import ENCODER_RECORD_KEY, HUBERT, WAVLM, Checkpoint, CheckpointError, read_checkpoint
from .encoders import (
    OVERRIDABLE,
    build_encoder,
    encoder_dim,
    encoder_features,
    encoder_record,
    frame_count,
    hubert_projection,
    load_encoder,
    normalizes_audio,
)


@dataclass
class SiamCTCModelConfig(FairseqDataclass):
    encoder_path: str = field(
        default=MISSING, metadata={"help": "pre-trained HuBERT (fairseq) or WavLM (cfg/model dict) checkpoint to continue training"}
    )
    feature_layer: Optional[int] = field(
        default=None, metadata={"help": "transformer layer (from 1) whose output is projected; None: the last"}
    )
    projection_dim: int = field(
        default=256, metadata={"help": "dimension of the trained features Z (HuBERT's final_proj is reused when it has it)"}
    )
    freeze_feature_extractor: bool = field(
        default=True, metadata={"help": "keep the convolutional feature extractor fixed (paper: frozen)"}
    )
    freeze_layers: int = field(
        default=0, metadata={"help": "keep the first N transformer layers (and everything below them) fixed"}
    )
    apply_mask: bool = field(
        default=False, metadata={"help": "apply the encoder's span masking to both views during training"}
    )
    mask_prob: Optional[float] = field(
        default=None, metadata={"help": "masking probability when apply_mask; None: the checkpoint's"}
    )
    dropout: Optional[float] = field(default=None, metadata={"help": "transformer dropout; None: the checkpoint's"})
    attention_dropout: Optional[float] = field(default=None, metadata={"help": "attention dropout; None: the checkpoint's"})
    activation_dropout: Optional[float] = field(default=None, metadata={"help": "FFN activation dropout; None: the checkpoint's"})
    encoder_layerdrop: Optional[float] = field(default=None, metadata={"help": "layer drop probability; None: the checkpoint's"})
    dropout_input: Optional[float] = field(default=None, metadata={"help": "dropout on the CNN features; None: the checkpoint's"})
    feature_grad_mult: float = field(
        default=1.0, metadata={"help": "gradient scale into the feature extractor when it is not frozen"}
    )
    checkpoint_activations: bool = field(
        default=False, metadata={"help": "recompute each transformer layer in the backward pass: less memory, more time"}
    )
    views_in_one_pass: bool = field(
        default=False,
        metadata={"help": "encode both views in one batch padded to the longer view (as in span-masked training, "
                          "which always does); off: one pass per view, each padded to its own length"},
    )


def pad_views(
    source: torch.Tensor, padding_mask: Optional[torch.Tensor], source_pert: torch.Tensor, padding_mask_pert: Optional[torch.Tensor]
):
    """Stacks two batches of waveforms (B, S) and (B, S~) into one (2B, max(S, S~)) batch.

    Returns (sources, padding mask (2B, S_max) True at padding, or None when neither view is padded).
    """
    length = max(source.size(1), source_pert.size(1))
    if padding_mask is None and padding_mask_pert is None and source.size(1) == source_pert.size(1):
        return torch.cat([source, source_pert]), None

    def padded(wave, mask):
        if mask is None:
            mask = torch.zeros(wave.shape, dtype=torch.bool, device=wave.device)
        extra = length - wave.size(1)
        return F.pad(wave, (0, extra)), F.pad(mask, (0, extra), value=True)

    (a, mask_a), (b, mask_b) = padded(source, padding_mask), padded(source_pert, padding_mask_pert)
    return torch.cat([a, b]), torch.cat([mask_a, mask_b])


@register_model("siamctc", dataclass=SiamCTCModelConfig)
class SiamCTCModel(BaseFairseqModel):
    def __init__(self, cfg: SiamCTCModelConfig, record: Dict[str, Any], encoder: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.record = record
        self.encoder = encoder
        n_layers = len(encoder.encoder.layers)
        if cfg.feature_layer is not None and not 1 <= cfg.feature_layer <= n_layers:
            raise ValueError(f"model.feature_layer must be between 1 and {n_layers} (or None), got {cfg.feature_layer}")
        if not 0 <= cfg.freeze_layers <= n_layers:
            raise ValueError(f"model.freeze_layers must be between 0 and {n_layers}, got {cfg.freeze_layers}")
        own = hubert_projection(encoder, cfg.projection_dim)
        self.uses_encoder_projection = own is not None
        self.projection = None if own is not None else nn.Linear(encoder_dim(encoder), cfg.projection_dim)
        self.phi = nn.Linear(cfg.projection_dim, cfg.projection_dim)
        self.psi = nn.Linear(cfg.projection_dim, cfg.projection_dim)
        self._freeze()

    def _freeze(self):
        encoder, cfg = self.encoder, self.cfg
        frozen = []
        # parts of the base model SiamCTC never runs stay exactly as they were (and are exported so);
        # frozen rather than merely gradient-less, so that distributed training sees no unused parameters
        frozen += [getattr(encoder, "label_embs_concat", None), getattr(encoder, "target_glu", None)]
        if not self.uses_encoder_projection:
            frozen.append(getattr(encoder, "final_proj", None))
        if not cfg.apply_mask:
            frozen.append(encoder.mask_emb)
        if cfg.freeze_feature_extractor:
            frozen.append(encoder.feature_extractor)
        if cfg.freeze_layers > 0:
            if not cfg.freeze_feature_extractor:
                raise ValueError("model.freeze_layers > 0 needs model.freeze_feature_extractor=true (the CNN lies below the frozen layers)")
            frozen += [encoder.layer_norm, encoder.post_extract_proj, encoder.encoder.pos_conv]
            if not getattr(encoder.encoder, "layer_norm_first", True):
                frozen.append(encoder.encoder.layer_norm)  # post-LN models normalise before layer 1
            frozen += list(encoder.encoder.layers[: cfg.freeze_layers])
        if cfg.feature_layer is not None:
            # layers above the feature layer (and a pre-LN model's final norm) never run
            frozen += list(encoder.encoder.layers[cfg.feature_layer :])
            if getattr(encoder.encoder, "layer_norm_first", False):
                frozen.append(encoder.encoder.layer_norm)
        for part in frozen:
            if part is not None:
                part.requires_grad_(False)

    @classmethod
    def build_model(cls, cfg: SiamCTCModelConfig, task=None):
        checkpoint = read_checkpoint(cfg.encoder_path)
        if checkpoint.kind not in (HUBERT, WAVLM):
            raise CheckpointError(
                f"model.encoder_path={cfg.encoder_path}: a SiamCTC training checkpoint is no base encoder; "
                "continue its run with checkpoint.restore_file, or start from its `siamctc-export` output"
            )
        task_normalize = getattr(getattr(task, "cfg", None), "normalize", None)
        if task_normalize is not None and bool(task_normalize) != normalizes_audio(encoder_record(checkpoint)):
            raise ValueError(
                f"task.normalize={task_normalize} but {cfg.encoder_path} was trained "
                f"{'with' if not task_normalize else 'without'} waveform normalisation; set task.normalize to match"
            )
        record, encoder = load_encoder(checkpoint, _encoder_overrides(cfg))
        return cls(cfg, record, encoder)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, **cfg_overrides) -> "SiamCTCModel":
        """A SiamCTC training checkpoint -> the trained model, without the base checkpoint's file."""
        if ENCODER_RECORD_KEY not in checkpoint.model:
            raise CheckpointError(f"{checkpoint.path}: SiamCTC checkpoint without the record of its base encoder")
        model_cfg = checkpoint.cfg.model
        cfg = merge_with_parent(SiamCTCModelConfig(), model_cfg, remove_missing=True)
        for key, value in cfg_overrides.items():
            setattr(cfg, key, value)
        record = checkpoint.model[ENCODER_RECORD_KEY]
        model = cls(cfg, record, build_encoder(record, _encoder_overrides(cfg)))
        model.load_state_dict(checkpoint.model, strict=True)
        return model

    def get_extra_state(self) -> Dict[str, Any]:
        return self.record

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        if state["kind"] != self.record["kind"]:
            raise CheckpointError(f"a SiamCTC state dict of a {state['kind']} encoder cannot load into a {self.record['kind']} model")
        self.record = state

    @property
    def normalize_audio(self) -> bool:
        """Whether input waveforms must be normalised to zero mean and unit variance (as the base model was trained)."""
        return normalizes_audio(self.record)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) encoder features -> (..., projection_dim)."""
        return self.encoder.final_proj(x) if self.uses_encoder_projection else self.projection(x)

    def features(self, source, padding_mask=None, output_layer=None):
        """Projected features of one batch: source (B, S) -> ((B, T, projection_dim), frame mask or None)."""
        x, frame_mask = encoder_features(
            self.encoder, source, padding_mask, output_layer=output_layer or self.cfg.feature_layer,
            mask=self.cfg.apply_mask and self.training,
        )
        return self.project(x), frame_mask

    def forward(self, source, padding_mask=None, source_pert=None, padding_mask_pert=None, **unused):
        """Both views through the shared encoder, which drops the same layers for both when layer drop is on.

        source (B, S), source_pert (B, S~) waveforms, padding masks (B, S) / (B, S~) True at padding or None.
        Returns z (B, T, P), z_pert (B, T~, P), z_padding_mask (B, T) / z_pert_padding_mask (B, T~) True at
        padded frames, or None where the view had no padding mask.
        """
        if source_pert is None:
            raise ValueError("siamctc model: forward needs both views (source and source_pert)")
        if self.cfg.views_in_one_pass or (self.cfg.apply_mask and self.training):
            return self._forward_one_pass(source, padding_mask, source_pert, padding_mask_pert)
        # A view 0.8x as fast is 1.25x as long: padded together, the other view would pay for the
        # difference in every layer. Layer drop draws from numpy's global generator (fairseq's
        # encoder and ours); replaying its state makes the second pass drop the layers the first did.
        # Span masking draws from it as well, per utterance, which is why it takes the one pass.
        layer_drop_draws = np.random.get_state()
        z, z_mask = self.features(source, padding_mask)
        np.random.set_state(layer_drop_draws)
        z_pert, z_pert_mask = self.features(source_pert, padding_mask_pert)
        return {"z": z, "z_pert": z_pert, "z_padding_mask": z_mask, "z_pert_padding_mask": z_pert_mask}

    def _forward_one_pass(self, source, padding_mask, source_pert, padding_mask_pert):
        batch = source.size(0)
        sources, masks = pad_views(source, padding_mask, source_pert, padding_mask_pert)
        z_all, frame_mask = self.features(sources, masks)
        frames, frames_pert = frame_count(self.encoder, source.size(1)), frame_count(self.encoder, source_pert.size(1))
        z, z_pert = z_all[:batch, :frames], z_all[batch:, :frames_pert]
        z_mask = None if padding_mask is None else frame_mask[:batch, :frames]
        z_pert_mask = None if padding_mask_pert is None else frame_mask[batch:, :frames_pert]
        return {"z": z, "z_pert": z_pert, "z_padding_mask": z_mask, "z_pert_padding_mask": z_pert_mask}


def _encoder_overrides(cfg: SiamCTCModelConfig) -> Dict[str, Any]:
    overrides = {name: getattr(cfg, name) for name in OVERRIDABLE}
    overrides["feature_grad_mult"] = 0.0 if cfg.freeze_feature_extractor else cfg.feature_grad_mult
    return overrides
