"""The speech encoders SiamCTC continues training: building them from a checkpoint, and running them.

HuBERT is fairseq's own ``HubertModel``, built from the checkpoint's config with its label-set sizes
taken from the checkpoint itself (see ``checkpoints.hubert_label_set_sizes``), so no data directory
is needed. WavLM is the plugin's ``WavLM``.

Padding. HuBERT Base and WavLM Base normalise the first convolution's output with a GroupNorm over
the whole time axis, so in fairseq an utterance's features change with the zero padding a batch adds
to it. ``hubert_features`` runs HuBERT with those statistics taken over each utterance's own frames
and its frame mask derived from the convolution lengths, which makes the valid frames of a padded
utterance equal (to float rounding) to the features of the utterance run alone, that is to fairseq's
``HubertModel.extract_features`` on the unpadded audio. The plugin's WavLM does the same. A batch
of utterances of different lengths (and both views of a SiamCTC pair, when they share one pass)
therefore gets every utterance's own features, whatever padding the batch adds.
"""

import functools
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint
from fairseq.dataclass.utils import merge_with_parent
from fairseq.models.hubert import HubertConfig, HubertModel
from fairseq.modules import GradMultiply
from omegaconf import OmegaConf

from .checkpoints import HUBERT, WAVLM, Checkpoint, CheckpointError, hubert_label_set_sizes, label_dictionary, plain
from .wavlm import (
    WavLM,
    WavLMConfig,
    conv_output_lengths,
    frozen_cnn_features,
    lengths_to_padding_mask,
    masked_channel_norm,
)

# encoder settings a SiamCTC config may override (same names in HuBERT's and WavLM's configs)
OVERRIDABLE = (
    "dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "dropout_input", "mask_prob",
    "checkpoint_activations",
)


def encoder_record(checkpoint: Checkpoint) -> Dict[str, Any]:
    """What a SiamCTC model keeps of its base checkpoint to rebuild (and export) the encoder later."""
    if checkpoint.kind == HUBERT:
        # a HuBERT read from Hugging Face has no final_proj: none is invented (see build_encoder)
        return {"kind": HUBERT, "cfg": plain(checkpoint.cfg), "label_set_sizes": hubert_label_set_sizes(checkpoint),
                "final_proj": "final_proj.weight" in checkpoint.model}
    if checkpoint.kind == WAVLM:
        return {"kind": WAVLM, "cfg": dict(checkpoint.cfg), "label_set_sizes": None}
    raise CheckpointError(f"{checkpoint.path}: a {checkpoint.kind} checkpoint holds no base encoder")


def build_encoder(record: Dict[str, Any], overrides: Optional[Dict[str, Any]] = None) -> nn.Module:
    """A randomly initialised encoder of the architecture ``record`` describes; ``overrides`` replace
    settings of its config (dropouts, ``feature_grad_mult``, ...)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if record["kind"] == HUBERT:
        # not fairseq's checkpoint_activations: its wrapper recomputes without the autocast state of the
        # forward pass, so under torch.autocast the recomputed layer fails on mixed dtypes
        checkpointed = bool(overrides.pop("checkpoint_activations", False))
        cfg = OmegaConf.create(record["cfg"])
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        model_cfg.setdefault("label_rate", cfg.task.get("label_rate", -1.0))
        model_cfg.update(overrides)
        hubert_cfg = merge_with_parent(HubertConfig(), OmegaConf.create(model_cfg), remove_missing=True)
        sizes = record["label_set_sizes"]
        dictionaries = [None] if sizes is None else [label_dictionary(n) for n in sizes]
        model = HubertModel(hubert_cfg, cfg.task, dictionaries)
        if not record.get("final_proj", True):
            model.final_proj = None
        if checkpointed:
            checkpoint_layers(model.encoder.layers)
        return model
    if record["kind"] == WAVLM:
        return WavLM(WavLMConfig.from_dict({**record["cfg"], **overrides}))
    raise CheckpointError(f"unknown encoder kind {record['kind']!r}")


def _checkpointed_forward(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_layers(layers: nn.ModuleList) -> None:
    """Activation checkpointing of each layer: only its input is kept for the backward pass, which
    runs the layer again. Non-reentrant torch.utils.checkpoint restores the dropout RNG and the
    autocast state and works with frozen inputs; parameter names stay as they are (the forward
    method is replaced, as fairseq's ``checkpoint_wrapper`` does)."""
    for layer in layers:
        layer.forward = functools.partial(_checkpointed_forward, layer.forward)


def load_encoder(checkpoint: Checkpoint, overrides: Optional[Dict[str, Any]] = None) -> Tuple[Dict[str, Any], nn.Module]:
    """A HuBERT or WavLM checkpoint -> (its record, the encoder with its weights loaded strictly)."""
    record = encoder_record(checkpoint)
    encoder = build_encoder(record, overrides)
    try:
        encoder.load_state_dict(checkpoint.model, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint.path}: the weights do not fit the {record['kind']} model its cfg describes: {err}") from err
    return record, encoder


def normalizes_audio(record: Dict[str, Any]) -> bool:
    """Whether the encoder was trained on waveforms normalised to zero mean and unit variance."""
    if record["kind"] == HUBERT:
        return bool(record["cfg"]["task"].get("normalize", False))
    return bool(record["cfg"].get("normalize", False))


def encoder_dim(encoder: nn.Module) -> int:
    return encoder.cfg.encoder_embed_dim if isinstance(encoder, WavLM) else encoder.encoder.embedding_dim


def num_layers(encoder: nn.Module) -> int:
    return len(encoder.encoder.layers)


def hubert_cnn_features(model: HubertModel, source: torch.Tensor, sample_lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """HuBERT's convolutional feature extractor, its GroupNorm restricted to valid frames.

    source (B, S) waveform, sample_lengths (B,) valid samples or None -> (B, C, T).
    """
    x = source.unsqueeze(1)
    lengths = sample_lengths
    for block in model.feature_extractor.conv_layers:
        conv = block[0]
        x = conv(x)
        if lengths is not None:
            lengths = conv_output_lengths(lengths, [(0, conv.kernel_size[0], conv.stride[0])])
        for module in list(block)[1:]:
            if isinstance(module, nn.GroupNorm) and lengths is not None:
                if module.num_groups != module.num_channels:
                    raise ValueError(f"padding-aware GroupNorm needs one group per channel, got {module.num_groups} groups")
                x = masked_channel_norm(x, lengths, module.weight, module.bias, module.eps)
            else:
                x = module(x)
    return x


def hubert_features(
    model: HubertModel,
    source: torch.Tensor,
    padding_mask: Optional[torch.Tensor] = None,
    output_layer: Optional[int] = None,
    mask: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``HubertModel.extract_features`` made independent of batch padding (see the module docstring).

    source (B, S), padding_mask (B, S) True at padded samples or None; output_layer counted from 1
    (None: the last). Returns (x (B, T, D), frame padding mask (B, T) or None).
    """
    sample_lengths = None if padding_mask is None else (~padding_mask).sum(-1)
    if model.feature_grad_mult > 0:
        features = hubert_cnn_features(model, source, sample_lengths)
        if model.feature_grad_mult != 1.0:
            features = GradMultiply.apply(features, model.feature_grad_mult)
    else:
        features = frozen_cnn_features(functools.partial(hubert_cnn_features, model), source, sample_lengths)
    features = model.layer_norm(features.transpose(1, 2))
    frame_padding_mask = None
    if sample_lengths is not None:
        spec = [(0, c.kernel_size[0], c.stride[0]) for c in (b[0] for b in model.feature_extractor.conv_layers)]
        frame_padding_mask = lengths_to_padding_mask(conv_output_lengths(sample_lengths, spec), features.size(1))
    if model.post_extract_proj is not None:
        features = model.post_extract_proj(features)
    x = model.dropout_input(features)
    if mask:
        x, _ = model.apply_mask(x, frame_padding_mask, None)
    x, _ = model.encoder(x, padding_mask=frame_padding_mask, layer=None if output_layer is None else output_layer - 1)
    return x, frame_padding_mask


def encoder_features(
    encoder: nn.Module,
    source: torch.Tensor,
    padding_mask: Optional[torch.Tensor] = None,
    output_layer: Optional[int] = None,
    mask: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Features of layer ``output_layer`` (from 1; None: the last) of a HuBERT or WavLM encoder."""
    if output_layer is not None and not 1 <= output_layer <= num_layers(encoder):
        raise ValueError(f"layer must be between 1 and {num_layers(encoder)}, got {output_layer}")
    if isinstance(encoder, WavLM):
        return encoder.extract_features(source, padding_mask=padding_mask, mask=mask, output_layer=output_layer)
    return hubert_features(encoder, source, padding_mask, output_layer, mask)


def frame_count(encoder: nn.Module, num_samples: int) -> int:
    """Frames the encoder produces for an unpadded input of ``num_samples`` samples (host arithmetic)."""
    for block in encoder.feature_extractor.conv_layers:
        conv = block[0]
        num_samples = (num_samples - conv.kernel_size[0]) // conv.stride[0] + 1
    return max(num_samples, 0)


def hubert_projection(encoder: nn.Module, dim: int) -> Optional[nn.Linear]:
    """HuBERT's own ``final_proj`` if it maps the encoder output to ``dim`` for one label set, else None."""
    final_proj = getattr(encoder, "final_proj", None)
    if not isinstance(final_proj, nn.Linear) or final_proj.out_features != dim:
        return None
    sizes: List[int] = getattr(encoder, "num_classes", [1])
    return final_proj if len(sizes) == 1 or not encoder.untie_final_proj else None
