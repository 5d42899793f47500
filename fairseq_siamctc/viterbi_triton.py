"""The best CTC path of the target 1, 2, ..., L for a whole batch in one Triton kernel launch.

torchaudio's forced aligner takes one utterance at a time and, on CUDA, launches one kernel per
frame: 7,808 launches for the paper's batch, 59 of the 68 ms of the objective's forward and backward
pass (measured on an H200 before this kernel).
Here one program per utterance runs the whole max-product recursion, keeps its back-pointers
(int8) in a scratch buffer and backtracks in the same launch: one launch per batch, whatever T.

The states blank, 1, blank, 2, ..., L, blank are held in pairs: pair k is the blank after label k
(state 2 k) and label k (state 2 k - 1, none for k = 0), so that label k is class k and a frame's
label emissions are one contiguous load. A blank is entered from itself or from the label of its
pair; label k from itself, from the blank of pair k - 1 or from label k - 1 (the skip, allowed
since consecutive labels differ). Only the previous pair's values cross lanes: they go through a
small scratch row in global memory, with a barrier between store and load (two rows, used in
turn, so that one barrier per frame also orders a row's reads before its next write).

Only the band of states that can lie on a complete path is computed, as torchaudio's aligner does
(see :mod:`fairseq_siamctc.band_ctc`): at frame t, states 2 L - 1 - 2 (T - 1 - t) to 2 t + 1; the
others are -inf. Ties are broken as torchaudio's aligner (2.11) breaks them, with its strict
comparisons (which also decide where a score is NaN): a move is taken only if its score is strictly
above both others' (the skip first), else the state stays; at the end, the final blank only if
strictly above the last label. So where a step ties with the skip above staying, the path stays:
not the best score, but the aligner's path (on quantised scores, for a few problems in a hundred).
Scores are summed in float32 (float64 for float64 inputs) in the aligner's order, which gives its
CPU paths exactly; its CUDA aligner subtracts each frame's maximum, which rounds differently, so a
near-tie there can go the other way. Where no end state has a finite score the utterance gets -1
(the aligner then backtracks through states it never computed).

The kernel runs compiled on CUDA and under Triton's interpreter on a CPU (slow: for tests).
"""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["viterbi_path"]


def _viterbi_program(
    log_probs_ptr,
    input_lengths_ptr,
    target_lengths_ptr,
    path_ptr,
    alpha_ptr,
    back_ptr,
    max_in,
    num_classes,
    stride_batch,
    stride_frame,
    BLOCK: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One utterance b = program id: log_probs (B, T_in, C) (classes contiguous) -> path[b] (T_in,)
    int64. Scratch: alpha (B, 2, 2, BLOCK) in the compute dtype, back (B, T_in, BLOCK) int8."""
    b = tl.program_id(0).to(tl.int64)
    num_frames = tl.load(input_lengths_ptr + b).to(tl.int32)
    num_labels = tl.load(target_lengths_ptr + b).to(tl.int32)
    # lengths that do not fit the tensors are not read further (checked on the host where free)
    fits = (num_frames >= 0) & (num_frames <= max_in) & (num_labels >= 0) & (num_labels < num_classes)
    feasible = fits & (num_frames > 0) & (num_frames >= num_labels)
    num_frames = tl.where(feasible, num_frames, 0)
    num_labels = tl.where(feasible, num_labels, 0)

    path_row = path_ptr + b * max_in
    for start in range(0, max_in, BLOCK_T):
        frame = start + tl.arange(0, BLOCK_T)
        tl.store(path_row + frame, tl.full([BLOCK_T], -1, tl.int64), mask=(frame >= num_frames) & (frame < max_in))

    dtype = alpha_ptr.dtype.element_ty
    neg_inf = tl.full([BLOCK], float("-inf"), dtype)
    k = tl.arange(0, BLOCK)
    blank_state, label_state = 2 * k, 2 * k - 1
    exists = k <= num_labels
    has_label = exists & (k >= 1)
    emissions_row = log_probs_ptr + b * stride_batch
    alpha_row = alpha_ptr + b * (4 * BLOCK)
    back_row = back_ptr + b * max_in * BLOCK

    # frame 0: the first blank (only if T > L) and label 1
    low, high = 2 * (num_labels - num_frames) + 1, tl.minimum(1, 2 * num_labels)
    blank_in = exists & (blank_state >= low) & (blank_state <= high)
    label_in = has_label & (label_state >= low) & (label_state <= high)
    blank_emission = tl.load(emissions_row).to(dtype)
    label_emission = tl.load(emissions_row + k, mask=label_in, other=float("-inf")).to(dtype)
    blank = tl.where(blank_in, blank_emission, neg_inf)
    label = tl.where(label_in, label_emission, neg_inf)
    tl.store(alpha_row + k, blank)
    tl.store(alpha_row + BLOCK + k, label)
    tl.debug_barrier()

    for t in range(1, num_frames):
        previous = alpha_row + ((t - 1) % 2) * (2 * BLOCK)
        current = alpha_row + (t % 2) * (2 * BLOCK)
        before = tl.maximum(k - 1, 0)
        blank_before = tl.load(previous + before, mask=k >= 1, other=float("-inf"))
        label_before = tl.load(previous + BLOCK + before, mask=k >= 2, other=float("-inf"))

        low = 2 * (t - num_frames + num_labels) + 1
        high = tl.minimum(2 * t + 1, 2 * num_labels)
        blank_in = exists & (blank_state >= low) & (blank_state <= high)
        label_in = has_label & (label_state >= low) & (label_state <= high)
        frame_row = emissions_row + t * stride_frame
        blank_emission = tl.load(frame_row).to(dtype)
        label_emission = tl.load(frame_row + k, mask=label_in, other=float("-inf")).to(dtype)

        # blank of pair k: stay (0) or step from label k (1)
        blank_steps = label > blank
        new_blank = tl.where(blank_steps, label, blank) + blank_emission
        # label k: skip from label k - 1 (2) or step from the blank of pair k - 1 (1), each only if
        # strictly above both other moves, else stay (0)
        label_skips = (label_before > blank_before) & (label_before > label)
        label_steps = (blank_before > label) & (blank_before > label_before)
        best = tl.where(label_skips, label_before, tl.where(label_steps, blank_before, label))
        new_label = best + label_emission
        move = tl.where(label_skips, 2, tl.where(label_steps, 1, 0))
        code = blank_steps.to(tl.int32) | (move << 1)
        tl.store(back_row + t * BLOCK + k, code.to(tl.int8), mask=blank_in | label_in)

        blank = tl.where(blank_in, new_blank, neg_inf)
        label = tl.where(label_in, new_label, neg_inf)
        tl.store(current + k, blank)
        tl.store(current + BLOCK + k, label)
        tl.debug_barrier()

    # the path ends in the final blank if strictly better, else in the last label
    last = alpha_row + (tl.maximum(num_frames - 1, 0) % 2) * (2 * BLOCK)
    final_blank = tl.load(last + num_labels)
    last_label = tl.load(last + BLOCK + num_labels)
    ends_in_blank = final_blank > last_label
    score = tl.where(ends_in_blank, final_blank, last_label)
    finite = feasible & (score > float("-inf")) & (score < float("inf"))  # false for NaN
    state = tl.where(ends_in_blank, 2 * num_labels, 2 * num_labels - 1)

    for step in range(0, num_frames):
        t = num_frames - 1 - step
        is_label = (state % 2) == 1
        pair = tl.minimum(tl.maximum((state + 1) // 2, 0), BLOCK - 1)
        tl.store(path_row + t, tl.where(finite, tl.where(is_label, pair, 0), -1).to(tl.int64))
        code = tl.load(back_row + t * BLOCK + pair, mask=finite & (t > 0), other=0).to(tl.int32)
        state -= tl.where(is_label, (code >> 1) & 3, code & 1)


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool):
    """The kernel compiled for a GPU, or run by Triton's interpreter (CPU tensors), whatever
    TRITON_INTERPRET says: the interpreter is chosen per call, not when this module is imported."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_viterbi_program)
    return triton.jit(_viterbi_program)


def viterbi_path(log_probs: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> Tensor:
    """Best CTC path of the target 1, 2, ..., target_length, the whole batch in one kernel launch.

    log_probs (B, T_in, C) float16, bfloat16, float32 or float64, blank 0; input_lengths (B,) and
    target_lengths (B,) integer tensors on its device -> LongTensor (B, T_in): the class at each
    input frame (0 = blank, j = label j), -1 on padded frames and on every frame of an infeasible
    utterance (no frames, input shorter than target, or no path of finite score). Scores are summed
    in float32 (float64 for float64 inputs). Lengths outside 0 <= T <= T_in, 0 <= L < C mark the
    utterance infeasible rather than raise: checking them would cost a host sync on CUDA.

    CUDA tensors run the compiled kernel; CPU tensors Triton's interpreter (for tests: slow).
    """
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be (B, T_in, C), got shape {tuple(log_probs.shape)}")
    batch_size, max_in, num_classes = log_probs.shape
    if input_lengths.shape != (batch_size,) or target_lengths.shape != (batch_size,):
        raise ValueError(
            f"input_lengths {tuple(input_lengths.shape)} and target_lengths {tuple(target_lengths.shape)} "
            f"must be ({batch_size},)"
        )
    if log_probs.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"log_probs must be float16, bfloat16, float32 or float64, got {log_probs.dtype}")
    device = log_probs.device
    path = torch.empty(batch_size, max_in, dtype=torch.long, device=device)
    if batch_size == 0 or max_in == 0:
        return path
    if log_probs.stride(2) != 1:
        log_probs = log_probs.contiguous()
    compute_dtype = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    block = triton.next_power_of_2(num_classes)  # pair k holds label k: k = 0 .. C - 1
    alpha = torch.empty(batch_size, 2, 2, block, dtype=compute_dtype, device=device)
    back = torch.empty(batch_size, max_in, block, dtype=torch.int8, device=device)
    _kernel(device.type != "cuda")[(batch_size,)](
        log_probs,
        input_lengths.to(device),
        target_lengths.to(device),
        path,
        alpha,
        back,
        max_in,
        num_classes,
        log_probs.stride(0),
        log_probs.stride(1),
        BLOCK=block,
        BLOCK_T=min(1024, triton.next_power_of_2(max_in)),
        num_warps=max(1, min(8, block // 128)),
    )
    return path
