"""Batched greedy CTC decoding that gives exactly what decoding each utterance alone gives.

Two things make a padded batch differ from a batch of one in stock fairseq:

* HuBERT Base, wav2vec 2.0 Base and WavLM Base normalise their first convolution's output with a
  GroupNorm over the whole time axis, so the zeros a batch appends to a short utterance change its
  features. ``padding_independent_logits`` takes those statistics over each utterance's own frames:
  on a CPU by running HuBERT's and wav2vec 2.0's convolutions on each utterance alone (no padded
  audio convolved) and only the transformer on the padded batch, on a GPU by a group norm
  restricted to each utterance's frames (``models.encoders.hubert_features``; the plugin's WavLM
  does so itself), so that the whole batch is a few kernel launches. Frame counts are each
  utterance's own.
* Frames after an utterance's end still get logits (stock ``hubert_ctc``'s ``get_logits`` does not
  mask them), so they are set to certain blank before the argmax.

A fine-tuned model whose encoder is none of those (or a wav2vec 2.0 variant whose batch changes
the frames: input quantizer, sequence cropping) is not known to be padding-independent;
``padding_independent`` says so and callers decode it one utterance at a time.

"Exactly" means up to float rounding: the batch's kernels add in another order than a batch of
one's, so a frame whose two best logits are closer than that rounding may take the other label. A
GPU reorders more than a CPU, and under autocast (``autocast_dtype``: the encoder in float16 or
bfloat16, the argmax on float32 logits) every layer rounds to 11 or 8 significant bits.
``near_tie_frames`` and ``flips_beyond_ties`` tell such frames from real differences.
"""

import contextlib
import warnings
from typing import ContextManager, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.models.hubert import HubertModel
from fairseq.models.wav2vec import Wav2Vec2Model

from .models.encoders import hubert_features
from .models.wavlm import WavLM


# the largest share of a batch's padded samples that may be padding
MAX_PADDING = 0.1
# --autocast choices: the dtype the encoder runs in (None: float32)
AUTOCAST_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# margin (relative to a frame's largest |logit|) within which two logits may swap under autocast:
# 16 units of the dtype's rounding (2^-11 for float16, 2^-8 for bfloat16), as each of an encoder's
# layers in sequence rounds its output and the errors add up
AUTOCAST_TIE_RTOL = {None: 0.0, torch.float16: 16 * 2.0 ** -11, torch.bfloat16: 16 * 2.0 ** -8}


def tie_rtol(autocast: Optional[torch.dtype], device) -> float:
    """AUTOCAST_TIE_RTOL's margin for the precision the encoder actually runs in on ``device``.

    Without autocast a CUDA device may still round: cuDNN's convolutions use TF32 (10 mantissa
    bits, float16's rounding) unless ``torch.backends.cudnn.allow_tf32`` is off, as do matrix
    products below ``torch.set_float32_matmul_precision("highest")``; the batched and one-at-a-time
    ways pick different kernels, so float32 logits differ at that level there, not only at 1e-3."""
    if autocast is None and torch.device(device).type == "cuda" and (
            torch.backends.cudnn.allow_tf32 or torch.get_float32_matmul_precision() != "highest"):
        return AUTOCAST_TIE_RTOL[torch.float16]
    return AUTOCAST_TIE_RTOL[autocast]


def autocast_dtype(name: str, device) -> Optional[torch.dtype]:
    """The dtype that ``--autocast name`` runs the encoder in on ``device`` (None for ``none``).

    A name that is not a choice, or a dtype that this torch cannot autocast to on that device
    (float16 on some CPU builds, bfloat16 on GPUs before Ampere), is a ValueError naming it.
    """
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown autocast {name!r} (choose from {', '.join(AUTOCAST_DTYPES)})")
    dtype = AUTOCAST_DTYPES[name]
    if dtype is None:
        return None
    device = torch.device(device)
    reason = "it ran the probe convolution and product in float32"
    try:  # a tiny convolution and product: torch warns and falls back to float32 where it cannot
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype):
                x = torch.ones(1, 2, 4, device=device)
                outputs = [F.conv1d(x, torch.ones(2, 2, 2, device=device)),
                           F.linear(x, torch.ones(3, 4, device=device))]
        if all(output.dtype == dtype for output in outputs):
            return dtype
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise ValueError(f"autocast {name}: torch {torch.__version__} cannot autocast to {dtype} on {device.type} "
                     f"({reason}); use --autocast none" + (" or bf16" if name == "fp16" else ""))


def autocast(device, dtype: Optional[torch.dtype]) -> ContextManager:
    """torch.autocast to ``dtype`` on ``device``'s type, or nothing for dtype None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def host_to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor copied to ``device``; to a GPU through pinned memory without the host waiting
    for the copy (a plain copy from pageable memory waits for the stream to drain)."""
    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def backbone(model: nn.Module) -> Optional[nn.Module]:
    """The pre-trained encoder inside a fine-tuned CTC model (``hubert_ctc``, ``wav2vec_ctc``,
    ``wavlm_ctc``: ``model.w2v_encoder.w2v_model``), or None for another kind of model."""
    return getattr(getattr(model, "w2v_encoder", None), "w2v_model", None)


def padding_independent(model: nn.Module) -> bool:
    """Whether ``padding_independent_logits`` gives this model's batch-of-one logits for a padded batch."""
    encoder = backbone(model)
    if isinstance(encoder, (HubertModel, WavLM)):
        return True
    if isinstance(encoder, Wav2Vec2Model):
        return (getattr(encoder, "input_quantizer", None) is None
                and getattr(encoder, "crop_seq_to_multiple", 1) == 1
                and not getattr(model.w2v_encoder, "is_d2v_multi", False))
    return False


def cnn_then_batched_encoder(
    model: nn.Module, waves: Sequence[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``extract_features`` of a HubertModel or Wav2Vec2Model (no masking), padding-independent.

    The convolutional feature extractor runs on each utterance alone: its group norm sees only the
    utterance's own frames and no padded audio is convolved (the choice on a CPU, where the
    convolutions' cost is their arithmetic); the transformer, which masks padded keys, runs once
    on the padded batch. waves: B tensors (N_b,) -> x (B, T, D), frame lengths (B,).
    """
    features = [model.feature_extractor(wave[None])[0].transpose(0, 1) for wave in waves]  # (T_b, C) each
    lengths = torch.tensor([f.size(0) for f in features], device=features[0].device)
    features = model.layer_norm(torch.nn.utils.rnn.pad_sequence(features, batch_first=True))
    if model.post_extract_proj is not None:
        features = model.post_extract_proj(features)
    padding_mask = torch.arange(features.size(1), device=lengths.device)[None, :] >= lengths[:, None]
    x, _ = model.encoder(model.dropout_input(features), padding_mask=padding_mask)
    return x, lengths


def padding_independent_logits(
    model: nn.Module, waves: Sequence[torch.Tensor], batch_convolutions: Optional[bool] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fine-tuned CTC model's logits for B utterances, each utterance's as if it were decoded alone.

    waves: B float tensors (N_b,) on the model's device. Returns logits (B, T, V) (frames after an
    utterance's end hold garbage) and frame lengths (B,); see ``padded_batch_logits``.
    """
    source = torch.nn.utils.rnn.pad_sequence(list(waves), batch_first=True)
    return padded_batch_logits(model, source, [len(w) for w in waves], batch_convolutions)


def padded_batch_logits(
    model: nn.Module, source: torch.Tensor, num_samples: Sequence[int], batch_convolutions: Optional[bool] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``padding_independent_logits`` of a batch padded already.

    source (B, S) float on the model's device, zero after each utterance's ``num_samples[b]``
    samples (host integers). Returns logits (B, T, V) in the dtype the model computes them in
    (autocast's, if on; frames after an utterance's end hold garbage) and frame lengths (B,) on the
    device. The model must be in eval mode and ``padding_independent(model)``.
    ``batch_convolutions``: HuBERT's and wav2vec 2.0's convolutions on the padded batch with each
    utterance's own group-norm statistics (``hubert_features``: a few kernel launches for the batch,
    the choice on a GPU) or on each utterance alone (``cnn_then_batched_encoder``: no padded audio
    convolved, the choice on a CPU); None: by the device. Both give the batch-of-one features to
    float rounding.
    """
    encoder = model.w2v_encoder
    device = source.device
    if batch_convolutions is None:
        batch_convolutions = device.type != "cpu"
    if isinstance(encoder.w2v_model, WavLM) or batch_convolutions:
        sample_lengths = host_to_device(torch.tensor(num_samples, dtype=torch.long), device)
        padding_mask = torch.arange(source.size(1), device=device)[None, :] >= sample_lengths[:, None]
        if isinstance(encoder.w2v_model, WavLM):  # its group norm takes each utterance's own frames itself
            x, frame_padding = encoder.w2v_model.extract_features(source, padding_mask=padding_mask, mask=False)
        else:
            x, frame_padding = hubert_features(encoder.w2v_model, source, padding_mask)
        lengths = (torch.full((x.size(0),), x.size(1), dtype=torch.long, device=device) if frame_padding is None
                   else (~frame_padding).sum(-1))
    else:
        x, lengths = cnn_then_batched_encoder(encoder.w2v_model, [row[:n] for row, n in zip(source, num_samples)])
    x = encoder.final_dropout(x)
    if encoder.proj is not None:
        x = encoder.proj(x)
    # the model's own logit adjustments (wav2vec_ctc's blank weight), padding handled below
    logits = model.get_logits({"encoder_out": x.transpose(0, 1), "padding_mask": None,
                               "encoder_padding_mask": None}).transpose(0, 1)
    return logits, lengths


def mask_padded_frames(logits: torch.Tensor, lengths: torch.Tensor, blank: int) -> torch.Tensor:
    """logits (B, T, V), lengths (B,) -> logits where frames at or after lengths[b] are certain blank
    (logit 0 for ``blank``, -inf for every other class)."""
    padded = torch.arange(logits.size(1), device=logits.device)[None, :] >= lengths[:, None]  # (B, T)
    blank_only = torch.full_like(logits[:1, :1], float("-inf"))
    blank_only[..., blank] = 0.0
    return torch.where(padded.unsqueeze(-1), blank_only, logits)


def greedy_ctc(logits: torch.Tensor, lengths: torch.Tensor, blank: int, drop: Sequence[int] = ()) -> List[List[int]]:
    """Best-path CTC decoding of a padded batch.

    logits (B, T, V), lengths (B,) valid frames; the argmax per frame (in float32 whatever the
    logits' dtype) with padded frames blank, repeats collapsed, ``blank`` and the ``drop`` indices
    removed. Returns B lists of label indices. One transfer to the host for the whole batch.
    """
    path = mask_padded_frames(logits.float(), lengths, blank).argmax(dim=-1)  # (B, T)
    previous = F.pad(path[:, :-1], (1, 0), value=-1)
    keep = (path != previous) & (path != blank)
    for index in drop:  # python integers: no index tensor copied to the device
        keep &= path != index
    labels = torch.where(keep, path, -1).cpu()
    return [row[row >= 0].tolist() for row in labels]


def near_tie_frames(logits: torch.Tensor, atol: float = 1e-3, rtol: float = 0.0) -> torch.Tensor:
    """Frames whose best and second-best logits are within ``atol + rtol * scale``.

    logits (..., T, V), V >= 2 -> (..., T) bool. ``scale`` is the frame's largest finite |logit|,
    the size its rounding errors grow with. At such a frame two computations of the logits that
    differ by float rounding (a batch against a batch of one, autocast against float32) may give
    different argmaxes; elsewhere they may not, while their rounding stays below the margin.
    """
    logits = logits.float()
    top = logits.topk(2, dim=-1).values
    scale = torch.where(torch.isfinite(logits), logits.abs(), torch.zeros_like(logits)).amax(dim=-1)
    return top[..., 0] - top[..., 1] <= atol + rtol * scale


def flips_beyond_ties(reference: torch.Tensor, other: torch.Tensor, atol: float = 1e-3,
                      rtol: float = 0.0) -> torch.Tensor:
    """Frames where ``other``'s argmax differs from ``reference``'s and ``reference`` has no near tie.

    reference, other: logits (..., T, V) of the same frames -> (..., T) bool. All False means every
    label that changed changed at a frame that ``near_tie_frames(reference, atol, rtol)`` marks.
    """
    if reference.shape != other.shape:
        raise ValueError(f"logits of shape {tuple(reference.shape)} and {tuple(other.shape)}: not the same frames")
    changed = reference.float().argmax(dim=-1) != other.float().argmax(dim=-1)
    return changed & ~near_tie_frames(reference, atol, rtol)


def length_sorted_batches(num_samples: Sequence[int], batch_size: Optional[int], max_tokens: int,
                          max_padding: float = MAX_PADDING) -> List[List[int]]:
    """Indices grouped into batches of similar length, longest first (so memory peaks at once).

    A batch holds at most ``batch_size`` utterances (None: no limit on the count), at most
    ``max_tokens`` samples once padded to its longest, and at most a ``max_padding`` share of
    padding (what the padding costs is arithmetic thrown away: on a CPU it outweighs what batching
    saves); an utterance that fits no batch is a batch of its own. Callers put the results back in
    their own order through the indices.
    """
    if batch_size is None:
        batch_size = max(len(num_samples), 1)
    if batch_size < 1 or max_tokens < 1:
        raise ValueError(f"batch size and max tokens must be positive, got {batch_size} and {max_tokens}")
    order = np.argsort(-np.asarray(num_samples, dtype=np.int64), kind="stable")
    batches: List[List[int]] = []
    real = 0
    for index in order.tolist():
        size = int(num_samples[index])
        if batches:
            batch = batches[-1]
            padded = (len(batch) + 1) * int(num_samples[batch[0]])
            if len(batch) < batch_size and padded <= max_tokens and padded - (real + size) <= max_padding * padded:
                batch.append(index)
                real += size
                continue
        batches.append([index])
        real = size
    return batches
