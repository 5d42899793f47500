"""CTC of the target 1, 2, ..., L over the band of states that can lie on a complete path.

SiamCTC's CTC target is every key frame once, in order: L distinct labels. A path that is in
state s (of the 2 L + 1 states blank, 1, blank, 2, ..., L, blank) at frame t has advanced at most
two states per frame from the start, s <= 2 t + 1, and must still reach the last label or the final
blank by frame T - 1, s >= 2 L - 1 - 2 (T - 1 - t). Between the two bounds lie 2 (T - L) + 1
states, against the 2 L + 1 that torch's CPU kernel visits at every frame: for the views of the
paper's speed grid (T / L <= 1.25 after the role swap) at most a quarter of them, and a single
state at T = L. This module runs the forward (alpha) and backward (beta) recursions over that
band only, in coordinates that slide with t (state s = 2 t + 1 - 2 (T - L) + r, r in [0, W)), so
that each frame is a few vectorised operations on a (B, W) tensor. The result is the full
lattice's, to rounding: the band only leaves out states of probability zero.

The frame loop is in Python: two passes of T small operations. That suits a CPU, where it is several
times faster than torch's kernel (bench/README.md), and not a GPU, where each operation is a kernel
launch: :func:`fairseq_siamctc.losses.frame_ctc_loss` sends CUDA inputs to torch's kernel instead.
"""

import math
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["band_ctc_applies", "band_ctc_nll"]


def _band_classes(input_lengths: Tensor, target_lengths: Tensor, max_in: int, width: int) -> Tuple[Tensor, Tensor]:
    """(T, B, W) class of each band state (0 = blank, j = label j) and whether the state exists.

    State s = 2 t + 1 - 2 (T_b - L_b) + r: odd s (even r) is label (s + 1) / 2, even s a blank. A
    state exists where 0 <= s <= min(2 L_b, 2 t + 1); from t = T_b on, s > 2 L_b in the whole window.
    """
    device = input_lengths.device
    t = torch.arange(max_in, device=device)[:, None]
    first_state = 2 * t + 1 - 2 * (input_lengths - target_lengths)[None, :]  # (T, B): r = 0
    last_state = torch.minimum(2 * target_lengths[None, :], 2 * t + 1)
    state = first_state[..., None] + torch.arange(width, device=device)  # (T, B, W)
    exists = (state >= 0) & (state <= last_state[..., None])
    is_label = torch.arange(width, device=device) % 2 == 0
    classes = state.add_(1).bitwise_right_shift_(1).mul_(is_label).masked_fill_(~exists, 0)
    return classes, exists


class _BandCTC(torch.autograd.Function):
    """The recursions over the band, each frame's states of all utterances in one flat vector.

    An utterance holds W + 2 slots of it: its W band states and two that never exist, so that the
    shifts by one and two states of one utterance read -inf instead of the next utterance, and every
    slice of a frame's update is contiguous.
    """

    @staticmethod
    def forward(ctx, log_probs: Tensor, input_lengths: Tensor, target_lengths: Tensor, width: int) -> Tensor:
        batch_size, max_in, _ = log_probs.shape
        slots = width + 2
        size = batch_size * slots
        classes, exists = _band_classes(input_lengths, target_lengths, max_in, slots)
        emissions = log_probs.transpose(0, 1).gather(2, classes).masked_fill_(~exists, float("-inf"))
        emissions = emissions.view(max_in, size)
        # a label state (even r) may also be entered from the previous label, two states back
        skip = torch.zeros(batch_size, slots, dtype=log_probs.dtype, device=log_probs.device)
        skip[:, 1::2] = float("-inf")
        skip = skip.view(size)

        # alpha[t, :size]; the two -inf columns after it are the shifted reads past the last slot
        alpha = torch.full((max_in, size + 2), float("-inf"), dtype=log_probs.dtype, device=log_probs.device)
        alpha[0, :size] = emissions[0]
        # per-frame views made once (in C++) rather than sliced in the loop
        stay, step, same = (alpha[:, 2:].unbind(0), alpha[:, 1:-1].unbind(0), alpha[:, :size].unbind(0))
        emitted = emissions.unbind(0)
        for t in range(1, max_in):
            # frame t's window starts two states later: state r came from r + 2 (stay), r + 1, r (skip)
            stay_or_step = torch.logaddexp(stay[t - 1], step[t - 1])
            torch.logaddexp(stay_or_step, same[t - 1] + skip, out=same[t])
            same[t].add_(emitted[t])  # -inf on the slots that do not exist, whatever was read into them
        alpha = alpha[:, :size]
        # the path ends in the last label (r = 0) or the final blank (r = 1) at frame T_b - 1
        first_slot = torch.arange(batch_size, device=log_probs.device) * slots
        ends = alpha[input_lengths - 1]
        last_label, final_blank = ends.gather(1, first_slot[:, None]), ends.gather(1, first_slot[:, None] + 1)
        log_likelihood = torch.logaddexp(last_label, final_blank)[:, 0]
        ctx.save_for_backward(input_lengths, classes, emissions, alpha, skip, log_likelihood)
        ctx.shape = log_probs.shape
        return -log_likelihood

    @staticmethod
    def backward(ctx, grad_nll: Tensor):
        input_lengths, classes, emissions, alpha, skip, log_likelihood = ctx.saved_tensors
        max_in, batch_size, slots = classes.shape
        size = batch_size * slots
        options = dict(dtype=emissions.dtype, device=emissions.device)
        # beta[t]: log-probability of completing the path from a state at frame t, frame t's own
        # emission excluded (so alpha + beta never subtracts an emission of -inf)
        final = torch.full((batch_size, slots), float("-inf"), **options)
        final[:, :2] = 0.0
        final = final.view(size)
        frames = torch.arange(max_in, device=emissions.device)[:, None]
        ends_here = (frames == input_lengths[None, :] - 1).repeat_interleave(slots, dim=1)  # (T, size)
        beta = torch.empty_like(emissions)
        beta[max_in - 1] = final
        # emission + beta of frame t + 1 after two -inf columns: the shifted reads before the first slot
        following = torch.full((size + 2,), float("-inf"), **options)
        stay, step, same = following[:size], following[1:-1], following[2:]
        betas, emitted, ends = beta.unbind(0), emissions.unbind(0), ends_here.unbind(0)
        for t in range(max_in - 2, -1, -1):
            torch.add(emitted[t + 1], betas[t + 1], out=same)
            # state r goes to r - 2 (stay), r - 1 or r (skip into a label) of frame t + 1's window
            stay_or_step = torch.logaddexp(stay, step)
            torch.logaddexp(stay_or_step, same + skip, out=betas[t])
            torch.where(ends[t], final, betas[t], out=betas[t])
        # exp is slow where its result is not a normal number (denormals, -inf): occupancies below
        # e times the smallest normal one (1e-38 in float32) are set to 0 instead of computed
        log_occupancy = (alpha + beta).view(max_in, batch_size, slots).sub_(log_likelihood[None, :, None])
        floor = math.log(torch.finfo(log_occupancy.dtype).tiny) + 1.0
        negligible = log_occupancy < floor
        occupancy = log_occupancy.clamp_(min=floor).exp_().masked_fill_(negligible, 0.0)
        # d(-log p) / d log_probs[t, c] = -(occupancy of the states of class c at t); the blank sums
        # its states, and states that do not exist add their zero occupancy to the blank
        grad = torch.zeros(max_in, batch_size, ctx.shape[2], **options)
        grad.scatter_add_(2, classes, occupancy.mul_(-grad_nll[None, :, None]))
        return grad.transpose(0, 1), None, None, None


def band_ctc_applies(log_probs: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> bool:
    """Whether :func:`band_ctc_nll` is the better way to this CTC: a CPU tensor, every utterance
    feasible with a non-empty target (1 <= L <= T, the cases it computes) and the band narrower than
    the 2 L + 1 states of the full lattice (T - L < max L). Reads the lengths, so CPU inputs only."""
    if log_probs.device.type != "cpu" or input_lengths.numel() == 0:
        return False
    slack = input_lengths - target_lengths
    return bool((target_lengths.min() >= 1) & (slack.min() >= 0) & (slack.max() < target_lengths.max()))


def band_ctc_nll(log_probs: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> Tensor:
    """CTC negative log-likelihood of the target 1, 2, ..., target_length over the feasible band.

    log_probs (B, T_in, C) with blank 0 and C > max target length, input_lengths (B,) and
    target_lengths (B,) with 1 <= target_length <= input_length <= T_in -> (B,), as
    ``F.ctc_loss(log_probs.transpose(0, 1), [1..L], ..., reduction="none")`` computes it.

    The gradient is the derivative with respect to ``log_probs`` (minus each class's occupancy);
    torch's CTC returns that derivative plus ``exp(log_probs)``, which equals it after a
    log-softmax backward. The lengths are read to the host once (the band's width).
    """
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be (B, T_in, C), got {tuple(log_probs.shape)}")
    batch_size, max_in, num_classes = log_probs.shape
    if input_lengths.shape != (batch_size,) or target_lengths.shape != (batch_size,):
        raise ValueError(f"input_lengths and target_lengths must be ({batch_size},)")
    input_lengths = input_lengths.to(device=log_probs.device, dtype=torch.long)
    target_lengths = target_lengths.to(device=log_probs.device, dtype=torch.long)
    if batch_size == 0:
        return log_probs.new_zeros(0)
    slack = input_lengths - target_lengths
    shortest_target, least_slack, most_slack, longest_input, longest_target = torch.stack(
        [target_lengths.min(), slack.min(), slack.max(), input_lengths.max(), target_lengths.max()]
    ).tolist()
    if shortest_target < 1 or least_slack < 0 or longest_input > max_in or longest_target >= num_classes:
        raise ValueError(
            f"band CTC needs 1 <= target length <= input length <= {max_in} and target length < {num_classes}; "
            f"got input lengths {input_lengths.tolist()}, target lengths {target_lengths.tolist()}"
        )
    return _BandCTC.apply(log_probs, input_lengths, target_lengths, 2 * most_slack + 1)
