"""The SiamCTC objective (paper section 3) as plain, batched PyTorch functions.

Conventions: B utterances, T frames, D features; padding masks follow fairseq (``True`` marks a
padded frame, padding at the end). Every function runs unchanged on CUDA; lengths stay tensors, and
on CUDA the only host synchronisation is torch's CTC kernel reading the lengths, once per batch
(never once per frame). On CUDA no function's number of operator calls or kernel launches grows
with T; on a CPU, where operator calls are cheap, :func:`frame_ctc_loss` runs a recursion of a few
operators per frame over the band of feasible states (:mod:`fairseq_siamctc.band_ctc`), several
times faster there than torch's kernel.

- :func:`alignment_log_probs`: attention logits with a fixed blank column, log-softmax over classes.
- :func:`frame_ctc_loss`: CTC NLL of the target ``1, 2, ..., L`` (every key frame once, in order).
- :func:`viterbi_alignment`: the best CTC path for that target (the hard alignment of the KLD term),
  through torchaudio's compiled forced aligner on a CPU and one Triton kernel on CUDA.
- :func:`tince_loss`: temporal InfoNCE (eq. 3) with in-utterance negatives.
- :func:`siamctc_loss`: eq. 6, with the role swap ("transpose") where the perturbed view is shorter.
"""

import importlib.util
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
import torchaudio  # noqa: F401  (registers torch.ops.torchaudio.forced_align)
from torch import Tensor

from .band_ctc import band_ctc_applies, band_ctc_nll

__all__ = ["alignment_log_probs", "frame_ctc_loss", "viterbi_alignment", "tince_loss", "siamctc_loss"]

SIMILARITIES = ("cosine", "dot")


def lengths_from_padding_mask(padding_mask: Optional[Tensor], batch_size: int, max_len: int, device) -> Tensor:
    """(B, T) bool padding mask (or None: nothing padded) -> (B,) long lengths."""
    if padding_mask is None:
        return torch.full((batch_size,), max_len, dtype=torch.long, device=device)
    if padding_mask.shape != (batch_size, max_len):
        raise ValueError(f"padding mask has shape {tuple(padding_mask.shape)}, expected {(batch_size, max_len)}")
    return max_len - padding_mask.long().sum(1)


def _check_similarity(similarity: str, temperature: float) -> None:
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def similarity_matrix(query: Tensor, keys: Tensor, similarity: str = "cosine", scale: float = 1.0) -> Tensor:
    """(B, Tq, D), (B, Tk, D) -> (B, Tq, Tk) cosine similarities or dot products, times ``scale``.

    The scale is applied to the query, a (B, Tq, D) pass rather than one over (B, Tq, Tk).
    """
    if query.dim() != 3 or keys.dim() != 3 or query.shape[0] != keys.shape[0] or query.shape[2] != keys.shape[2]:
        raise ValueError(f"query {tuple(query.shape)} and keys {tuple(keys.shape)} must be (B, Tq, D) and (B, Tk, D)")
    if similarity == "cosine":
        # 1e-8 is 0 in float16: the zero rows of the padded views would be 0 / 0 (NaN gradients)
        eps = max(1e-8, torch.finfo(query.dtype).tiny)
        query = F.normalize(query, dim=-1, eps=eps)
        keys = F.normalize(keys, dim=-1, eps=eps)
    if scale != 1.0:
        query = query * scale
    return torch.bmm(query, keys.transpose(1, 2))


def scores_to_log_probs(
    logits: Tensor,
    query_padding_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    blank_logit: float,
) -> Tensor:
    """(B, Tq, Tk) logits (similarities / temperature) -> (B, Tq, 1 + Tk) log-probabilities, class 0
    the fixed blank.

    Padded keys get logit -inf. Padded query frames become all-blank rows (log-probability 0 on
    the blank), so that the tensor is well defined everywhere and carries no gradient there.
    Computed in at least float32: half-precision log-softmax over ~750 classes loses the CTC tails.
    Each step is one pass over the (B, Tq, Tk) tensor: both masks in one fill, the blank by padding.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    mask = None if key_padding_mask is None else key_padding_mask[:, None, :]
    if query_padding_mask is not None:
        mask = query_padding_mask[:, :, None] if mask is None else mask | query_padding_mask[:, :, None]
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    return F.pad(logits, (1, 0), value=blank_logit).log_softmax(-1)


def alignment_log_probs(
    query: Tensor,
    keys: Tensor,
    query_padding_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    *,
    temperature: float = 2.0,
    blank_logit: float = -1.0,
    similarity: str = "cosine",
) -> Tensor:
    """Attention-CTC log-probabilities.

    query (B, Tq, D), keys (B, Tk, D), masks (B, Tq) / (B, Tk) bool (True = pad) ->
    (B, Tq, 1 + Tk): log-softmax over classes; class 0 is the blank with logit ``blank_logit``,
    class j the key frame j - 1 with logit sim(query_i, key_{j-1}) / temperature; padded keys -inf.
    """
    _check_similarity(similarity, temperature)
    logits = similarity_matrix(query, keys, similarity, scale=1.0 / temperature)
    return scores_to_log_probs(logits, query_padding_mask, key_padding_mask, blank_logit)


def frame_ctc_loss(log_probs: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> Tensor:
    """CTC negative log-likelihood of the target 1, 2, ..., target_length, not normalised.

    log_probs (B, T_in, C) with blank 0, input_lengths (B,), target_lengths (B,) with
    target_lengths <= C - 1 -> (B,). An infeasible utterance (input shorter than target) gets inf.

    CPU batches of feasible utterances whose band is narrower than the lattice (SiamCTC's views:
    T / L <= 1.25) go through :func:`~fairseq_siamctc.band_ctc.band_ctc_nll`: the same values; its
    gradient is the exact one with respect to ``log_probs``, torch's that plus ``exp(log_probs)``,
    equal after the log-softmax that makes them. The rest go through torch's kernel.
    """
    if band_ctc_applies(log_probs, input_lengths, target_lengths):
        return band_ctc_nll(log_probs, input_lengths, target_lengths)
    batch_size, _, num_classes = log_probs.shape
    targets = torch.arange(1, num_classes, device=log_probs.device).expand(batch_size, num_classes - 1)
    # -inf classes (padded keys) make torch's CTC gradient NaN (it evaluates -inf - -inf); a finite
    # floor leaves the loss unchanged, since those classes lie on no path of the target.
    floored = log_probs.clamp(min=torch.finfo(log_probs.dtype).min)
    return F.ctc_loss(
        floored.transpose(0, 1),
        targets,
        input_lengths,
        target_lengths,
        blank=0,
        reduction="none",
        zero_infinity=False,
    )


VITERBI_BACKENDS = ("auto", "triton", "torchaudio")


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@torch.no_grad()
def viterbi_alignment(
    log_probs: Tensor, input_lengths: Tensor, target_lengths: Tensor, *, backend: str = "auto"
) -> Tensor:
    """Best CTC path for the target 1, 2, ..., target_length.

    log_probs (B, T_in, C), input_lengths (B,), target_lengths (B,) -> LongTensor (B, T_in): the
    class of the path at each input frame (0 = blank), -1 on padded frames and on every frame of an
    infeasible utterance (input shorter than target, or no path of finite log-probability).

    ``backend``:
    - ``"triton"``: :func:`~fairseq_siamctc.viterbi_triton.viterbi_path`, the whole batch in one
      kernel launch and no host sync; on a CPU it runs under Triton's interpreter (slow: for tests);
    - ``"torchaudio"``: one call of torchaudio's compiled forced aligner per utterance, the lengths
      read to the host once (it takes each utterance at its exact shape); on CUDA the aligner
      launches one small kernel per frame and copies its back-pointers to the host every 100 frames;
    - ``"auto"``: ``"triton"`` for CUDA tensors (where Triton is installed), else ``"torchaudio"``,
      the faster one on a CPU.

    Both routes give torchaudio's CPU aligner's paths, ties included (the kernel makes the same
    comparisons in the same precision; see :mod:`~fairseq_siamctc.viterbi_triton` for its CUDA
    aligner). Lengths that do not fit ``log_probs`` raise a ValueError, except on the Triton route
    with lengths on a GPU, where checking them would cost a host sync: their utterances get -1 there.
    """
    if backend not in VITERBI_BACKENDS:
        raise ValueError(f"backend must be one of {VITERBI_BACKENDS}, got {backend!r}")
    batch_size, max_in, num_classes = log_probs.shape
    device = log_probs.device
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _triton_available() else "torchaudio"
    if backend == "triton":
        if input_lengths.device.type == "cpu" and target_lengths.device.type == "cpu":
            _read_lengths(log_probs.shape, input_lengths, target_lengths)
        from .viterbi_triton import viterbi_path

        path = viterbi_path(log_probs, input_lengths, target_lengths)
    else:
        path = _forced_align_paths(log_probs, input_lengths, target_lengths)
    # a path through a NaN or -inf emission is marked as well; summed in float32 at least, since a
    # half-precision sum over ~1000 frames can overflow
    score = log_probs.gather(2, path.clamp(min=0)[..., None]).squeeze(-1)
    score = score.to(torch.promote_types(score.dtype, torch.float32)).masked_fill(path < 0, 0.0).sum(1)
    return path.masked_fill(~torch.isfinite(score)[:, None], -1)


def _read_lengths(shape, input_lengths: Tensor, target_lengths: Tensor):
    """[(input length, target length)] per utterance, read to the host; a ValueError names the first
    utterance whose lengths do not fit log_probs of ``shape`` (B, T_in, C)."""
    _, max_in, num_classes = shape
    lengths = torch.stack([input_lengths.long(), target_lengths.long()], 1).tolist()
    for b, (in_len, target_len) in enumerate(lengths):
        if not (0 <= in_len <= max_in and 0 <= target_len < num_classes):
            raise ValueError(
                f"utterance {b}: input length {in_len} and target length {target_len} do not fit log_probs of shape "
                f"{tuple(shape)}"
            )
    return lengths


def _forced_align_paths(log_probs: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> Tensor:
    """viterbi_alignment through torchaudio's aligner, one call per utterance, before the check of
    non-finite scores."""
    batch_size, max_in, num_classes = log_probs.shape
    device = log_probs.device
    path = torch.full((batch_size, max_in), -1, dtype=torch.long, device=device)
    if log_probs.dtype not in (torch.float32, torch.float64):
        log_probs = log_probs.float()  # the aligner takes float16 too, but CTC tails need float32
    targets = torch.arange(1, num_classes, device=device)[None]
    for b, (in_len, target_len) in enumerate(_read_lengths(log_probs.shape, input_lengths, target_lengths)):
        if in_len == 0 or in_len < target_len:
            continue
        if target_len == 0:
            path[b, :in_len] = 0
            continue
        emissions = log_probs[b : b + 1, :in_len, : target_len + 1].contiguous()
        aligned, _ = torch.ops.torchaudio.forced_align(
            emissions, targets[:, :target_len], input_lengths[b : b + 1], target_lengths[b : b + 1], 0
        )
        path[b, :in_len] = aligned[0].clamp(0, target_len)  # on NaN scores its classes can be out of range
    # where no state at the end has a finite score, the aligner can backtrack through states it never
    # computed and return classes that are no path of the target (with a finite sum): marked too
    return path.masked_fill(~_is_target_path(path, target_lengths)[:, None], -1)


def _is_target_path(path: Tensor, target_lengths: Tensor) -> Tensor:
    """path (B, T_in) classes, -1 on padding -> (B,) bool: whether each row collapses to 1, 2, ...,
    target_length: every label is a repeat of the previous frame's or the next one not yet emitted."""
    if path.shape[1] == 0:
        return target_lengths == 0
    reached = path.clamp(min=0).cummax(1).values
    before = F.pad(path[:, :-1], (1, 0), value=0)
    reached_before = F.pad(reached[:, :-1], (1, 0), value=0)
    allowed = (path <= 0) | (path == before) | (path == reached_before + 1)
    return allowed.all(1) & (reached[:, -1] == target_lengths)


def _hash32(x: Tensor) -> Tensor:
    """Integer hash ("lowbias32", C. Wellons) of int64 tensors holding 32-bit values; wraps like uint32."""
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def sample_negative_indices(
    lengths: Tensor,
    max_len: int,
    num_negatives: int = 20,
    min_distance: int = 5,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Uniform in-utterance negatives for every anchor frame, drawn with replacement.

    lengths (B,) -> (indices (B, max_len, M) long, has_candidates (B, max_len) bool). For anchor i
    of utterance b, indices are frames j < lengths[b] with |j - i| >= min_distance; anchors on
    padding or without any such frame get has_candidates False (and index 0).

    Randomness: one number is drawn from ``generator`` (the device's default generator if None; it
    must live on the device of ``lengths``), and each draw is a hash of that number with
    (b, i, slot). So the same generator state gives the same negatives, and padding an utterance
    (a larger max_len) leaves its negatives unchanged, which a flat ``torch.rand`` would not.
    """
    if min_distance < 1 or num_negatives < 1:
        raise ValueError(f"min_distance and num_negatives must be >= 1, got {min_distance} and {num_negatives}")
    device = lengths.device
    anchor = torch.arange(max_len, device=device)[None, :]
    length = lengths[:, None]
    # excluded window [first, last] around the anchor, clipped to the utterance
    first = (anchor - min_distance + 1).clamp(min=0)
    last = torch.minimum(anchor + min_distance - 1, length - 1)
    excluded = (last - first + 1).clamp(min=0)
    num_candidates = (length - excluded).clamp(min=0)
    has_candidates = (anchor < length) & (num_candidates > 0)

    seed = torch.randint(2**32, (1,), generator=generator, device=device)
    slot = _hash32(seed + torch.arange(num_negatives, device=device))
    per_anchor = _hash32(slot[None, :] ^ torch.arange(max_len, device=device)[:, None])  # (T, M)
    utterance = _hash32(torch.arange(lengths.shape[0], device=device) + 0x9E3779B9)
    bits = _hash32(per_anchor[None] ^ utterance[:, None, None])  # uniform on [0, 2^32)
    rank = (bits * num_candidates[..., None]) >> 32  # uniform on [0, num_candidates)
    index = torch.where(rank < first[..., None], rank, rank + excluded[..., None])
    return index.masked_fill(~has_candidates[..., None], 0), has_candidates


def tince_per_anchor(h: Tensor, pred: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """Eq. 3 per anchor: h, pred (B, T, D), negatives (B, T, M) frame indices -> (B, T) NLL.

    Anchor pred[i], positive h[i + 1] (the last frame gets a zero-vector positive: mask it out),
    negatives h[negatives[i]], cosine similarity / temperature.
    """
    h_unit = F.normalize(h, dim=-1, eps=1e-8)
    pred_unit = F.normalize(pred, dim=-1, eps=1e-8)
    # all T x T similarities, then a gather: faster on CPU than gathering M feature vectors per anchor
    # (whose backward is a scatter of B*T*M*D values) and within the O(B*T*T) memory of the CTC term
    similarities = torch.bmm(pred_unit, h_unit.transpose(1, 2))
    similarities = similarities.to(torch.promote_types(similarities.dtype, torch.float32))
    positive = F.pad(similarities.diagonal(offset=1, dim1=1, dim2=2), (0, 1))
    negative = similarities.gather(2, negatives)
    logits = torch.cat([positive[..., None], negative], dim=-1) / temperature
    return logits.logsumexp(-1) - logits[..., 0]


def tince_loss(
    h: Tensor,
    pred: Tensor,
    padding_mask: Optional[Tensor] = None,
    *,
    num_negatives: int = 20,
    min_distance: int = 5,
    temperature: float = 0.2,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Temporal InfoNCE (eq. 3): h (B, T, D) features, pred = psi(h) (B, T, D) -> scalar.

    Mean over anchors i that have a positive (i + 1 < length) and at least one negative candidate
    (|j - i| >= min_distance); utterances too short contribute nothing, and a batch without any
    valid anchor gives a zero that still carries a gradient.
    """
    if h.shape != pred.shape or h.dim() != 3:
        raise ValueError(f"h {tuple(h.shape)} and pred {tuple(pred.shape)} must both be (B, T, D)")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    batch_size, max_len, _ = h.shape
    lengths = lengths_from_padding_mask(padding_mask, batch_size, max_len, h.device)
    negatives, has_candidates = sample_negative_indices(lengths, max_len, num_negatives, min_distance, generator)
    has_positive = torch.arange(max_len, device=h.device)[None, :] + 1 < lengths[:, None]
    valid = has_candidates & has_positive
    nll = tince_per_anchor(h, pred, negatives, temperature)
    return torch.where(valid, nll, 0.0).sum() / valid.sum().clamp(min=1)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values (B,) over mask (B,); where() keeps inf/NaN of masked entries out of the gradient."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def alignment_statistics(path: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> Dict[str, Tensor]:
    """Per-utterance statistics of Viterbi paths: path (B, T_in) as from :func:`viterbi_alignment`.

    Returns (B,) tensors and their validity masks:
    - ``blank_share``: share of input frames on which the path emits the blank;
    - ``slope_error``: |least-squares slope of class index against input frame, over the frames
      that emit a class, - target_length / input_length|. Each class is emitted once and in order, so
      the ratio is the slope of a uniform time warp (a speed change); bursts of emissions after long
      blank runs (a degenerate alignment) raise it. Defined with at least two emitting frames;
    - ``path_offset``: mean distance, in class frames, between the emitted class and the diagonal
      (class centre at input frame t scaled by the length ratio): the alignment error if the true
      warp is uniform, as for speed perturbation.
    """
    frame = torch.arange(path.shape[1], device=path.device, dtype=torch.float64)[None, :]
    on_path = path >= 0
    emits = path > 0
    in_len = on_path.sum(1).double()
    count = emits.sum(1).double()
    ratio = target_lengths.double() / input_lengths.double().clamp(min=1)
    blank_share = ((path == 0).sum(1).double() / in_len.clamp(min=1))

    x = torch.where(emits, frame, 0.0)
    y = torch.where(emits, path.double(), 0.0)
    n = count.clamp(min=1)
    mean_x, mean_y = x.sum(1) / n, y.sum(1) / n
    cov = (torch.where(emits, (frame - mean_x[:, None]) * (path - mean_y[:, None]), 0.0)).sum(1)
    var = (torch.where(emits, (frame - mean_x[:, None]) ** 2, 0.0)).sum(1)
    slope = cov / var.clamp(min=1e-12)
    slope_error = (slope - ratio).abs()

    diagonal = (frame + 0.5) * ratio[:, None] + 0.5
    path_offset = torch.where(emits, (path - diagonal).abs(), 0.0).sum(1) / n
    return {
        "blank_share": blank_share,
        "blank_share_valid": in_len > 0,
        "slope_error": slope_error,
        "slope_error_valid": count >= 2,
        "path_offset": path_offset,
        "path_offset_valid": count >= 1,
    }


def siamctc_loss(
    z: Tensor,
    z_pert: Tensor,
    z_padding_mask: Optional[Tensor],
    z_pert_padding_mask: Optional[Tensor],
    phi: Callable[[Tensor], Tensor],
    psi: Callable[[Tensor], Tensor],
    *,
    temperature: float = 2.0,
    blank_logit: float = -1.0,
    similarity: str = "cosine",
    num_negatives: int = 20,
    min_distance: int = 5,
    tince_temperature: float = 0.2,
    alpha: float = 1.0,
    beta: float = 1.0,
    ctc_weight: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Tensor]:
    """SiamCTC objective, eq. 6: loss = ctc_weight * ctc + alpha * kld + beta * tince.

    z (B, T, D) original view, z_pert (B, T~, D) perturbed view, masks (B, T) / (B, T~) bool or None,
    phi / psi the heads (D -> D). Per utterance the CTC inputs are phi(z_pert)'s frames and the classes
    z's frames; where the perturbed view is shorter (T~_b < T_b) the roles swap (inputs z, classes
    phi(z_pert)): the same similarity matrix, transposed. Both kinds mix freely in one batch.

    Returns scalars: ``loss``; ``ctc`` (mean over utterances of the CTC NLL / target length); ``kld``
    (mean over utterances of minus the mean over input frames of the Viterbi path's log-probability);
    ``tince`` (eq. 4); statistics (detached) ``blank_share``, ``slope_error``, ``path_offset`` (see
    :func:`alignment_statistics`), ``swapped_share`` (share of utterances that swapped roles) and
    ``num_aligned`` (utterances with at least one frame in each view; the others contribute nothing
    to ctc and kld). A term with weight 0 is still computed, without gradient, and left out of ``loss``
    (``ctc_weight`` and ``generator``, the source of the TINCE negatives, extend the paper's terms).
    """
    if ctc_weight == 0 and alpha == 0 and beta == 0:
        raise ValueError("ctc_weight, alpha and beta are all 0: the SiamCTC loss would be empty")
    if z.dim() != 3 or z_pert.dim() != 3 or z.shape[0] != z_pert.shape[0] or z.shape[2] != z_pert.shape[2]:
        raise ValueError(f"z {tuple(z.shape)} and z_pert {tuple(z_pert.shape)} must be (B, T, D) and (B, T~, D)")
    _check_similarity(similarity, temperature)
    batch_size, len_orig, _ = z.shape
    len_pert = z_pert.shape[1]
    orig_lengths = lengths_from_padding_mask(z_padding_mask, batch_size, len_orig, z.device)
    pert_lengths = lengths_from_padding_mask(z_pert_padding_mask, batch_size, len_pert, z.device)
    grad = torch.is_grad_enabled()

    with torch.set_grad_enabled(grad and (ctc_weight != 0 or alpha != 0)):
        # one square layout holds both directions, so swapping needs no host sync; the views are
        # padded to it before the product (a (B, T, D) pass, not one over the (B, T~, T) scores)
        size = max(len_orig, len_pert)
        projected = F.pad(phi(z_pert), (0, 0, 0, size - len_pert))
        plain = F.pad(z, (0, 0, 0, size - len_orig))
        swapped = pert_lengths < orig_lengths
        # both similarities are symmetric: swapping the operands of a swapped utterance gives its
        # transposed scores without a pass over the (B, S, S) tensor
        query = torch.where(swapped[:, None, None], plain, projected)
        keys = torch.where(swapped[:, None, None], projected, plain)
        logits = similarity_matrix(query, keys, similarity, scale=1.0 / temperature)  # (B, S, S)
        input_lengths = torch.where(swapped, orig_lengths, pert_lengths)
        target_lengths = torch.where(swapped, pert_lengths, orig_lengths)
        aligned = target_lengths > 0
        # empty utterances get a dummy 1-frame problem, computed and masked out, to stay finite
        target_lengths = target_lengths.clamp(min=1)
        input_lengths = torch.maximum(input_lengths, target_lengths)
        frame = torch.arange(size, device=z.device)[None, :]
        log_probs = scores_to_log_probs(
            logits, frame >= input_lengths[:, None], frame >= target_lengths[:, None], blank_logit
        )

    with torch.set_grad_enabled(grad and ctc_weight != 0):
        ctc = _masked_mean(frame_ctc_loss(log_probs, input_lengths, target_lengths) / target_lengths, aligned)

    path = viterbi_alignment(log_probs.detach(), input_lengths, target_lengths)
    on_path = path >= 0
    with torch.set_grad_enabled(grad and alpha != 0):
        path_log_probs = log_probs.gather(2, path.clamp(min=0)[..., None]).squeeze(-1)
        kld_per_utt = -torch.where(on_path, path_log_probs, 0.0).sum(1) / input_lengths
        # lengths always admit a path, so a missing one means non-finite scores: report, do not hide
        kld_per_utt = torch.where(on_path.any(1), kld_per_utt, float("inf"))
        kld = _masked_mean(kld_per_utt, aligned)

    with torch.set_grad_enabled(grad and beta != 0):
        tince_args = dict(
            num_negatives=num_negatives, min_distance=min_distance, temperature=tince_temperature, generator=generator
        )
        tince = 0.5 * (
            tince_loss(z, psi(z), z_padding_mask, **tince_args)
            + tince_loss(z_pert, psi(z_pert), z_pert_padding_mask, **tince_args)
        )

    weighted = [(w, term) for w, term in ((ctc_weight, ctc), (alpha, kld), (beta, tince)) if w != 0]
    loss = sum(w * term for w, term in weighted)
    stats = alignment_statistics(path, input_lengths, target_lengths)
    result = {"loss": loss, "ctc": ctc, "kld": kld, "tince": tince}
    for name in ("blank_share", "slope_error", "path_offset"):
        result[name] = _masked_mean(stats[name], stats[f"{name}_valid"] & aligned).float()
    result["swapped_share"] = (swapped & aligned).float().sum() / batch_size
    result["num_aligned"] = aligned.sum()
    return result
