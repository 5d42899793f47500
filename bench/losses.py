"""Cost of the SiamCTC objective next to the encoder step and to LASER's soft-DTW, on CPU.

A batch of B utterances of 10 to 15 s (T = 500 to 750 frames at 50 Hz, D = 256); each perturbed
view is T / speed frames for a speed factor from {0.8, ..., 1.2}, so the batch mixes plain and
swapped (sped-up) utterances. Timed, forward + backward, one thread:
- ``siamctc_loss`` whole, and its parts: attention log-probabilities, CTC, Viterbi, TINCE; the
  whole objective and the CTC both ways: the band recursion that a CPU takes and torch's kernel that
  CUDA takes;
- LASER's alternative: soft-DTW (gamma 0.1, cosine distance) between the two views, a
  straightforward numba DP (forward and backward) on top of the torch distance matrix;
- a HuBERT-base encoder (fairseq's HubertModel, base config, random weights, CNN frozen as in
  SiamCTC training) forward + backward on both views of ``--encoder-utterances`` utterances of the
  batch's mean length, scaled linearly to B utterances.
Times are CPU seconds of the process (one thread), each small timing the minimum over
``--repeats`` runs.

    python bench/losses.py [--batch 8] [--encoder-utterances 2] [--repeats 3]
"""

import argparse
import contextlib
import logging
import math
import pathlib
import statistics
import sys
import time

import numba
import numpy as np
import torch
import torch.nn.functional as F

from fairseq_siamctc.losses import (
    alignment_log_probs,
    frame_ctc_loss,
    siamctc_loss,
    tince_loss,
    viterbi_alignment,
)

SPEEDS = (0.8, 0.9, 1.0, 1.1, 1.2)
FRAME_RATE = 50


def make_batch(batch, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(500, 751, (batch,), generator=gen)
    speeds = torch.tensor(SPEEDS)[torch.randint(len(SPEEDS), (batch,), generator=gen)]
    pert_lengths = (lengths / speeds).round().long()
    z = torch.randn(batch, int(lengths.max()), dim, generator=gen)
    z_pert = torch.randn(batch, int(pert_lengths.max()), dim, generator=gen)
    mask = torch.arange(z.shape[1])[None, :] >= lengths[:, None]
    pert_mask = torch.arange(z_pert.shape[1])[None, :] >= pert_lengths[:, None]
    return z, z_pert, mask, pert_mask, lengths, pert_lengths


def best_time(fn, repeats):
    """CPU seconds of this process: with one thread, the run time that other processes on a shared
    machine do not inflate (wall-clock time on a loaded machine can be several times larger)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


@numba.njit(cache=False)
def soft_dtw_forward(dist, gamma):
    n, m = dist.shape
    r = np.full((n + 2, m + 2), np.inf)
    r[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            a, b, c = -r[i - 1, j - 1] / gamma, -r[i - 1, j] / gamma, -r[i, j - 1] / gamma
            top = max(a, b, c)
            softmin = -gamma * (math.log(math.exp(a - top) + math.exp(b - top) + math.exp(c - top)) + top)
            r[i, j] = dist[i - 1, j - 1] + softmin
    return r


@numba.njit(cache=False)
def soft_dtw_backward(dist, r, gamma):
    n, m = dist.shape
    d = np.zeros((n + 2, m + 2))
    d[1 : n + 1, 1 : m + 1] = dist
    e = np.zeros((n + 2, m + 2))
    e[n + 1, m + 1] = 1.0
    r[:, m + 1] = -np.inf
    r[n + 1, :] = -np.inf
    r[n + 1, m + 1] = r[n, m]
    for j in range(m, 0, -1):
        for i in range(n, 0, -1):
            a = math.exp((r[i + 1, j] - r[i, j] - d[i + 1, j]) / gamma)
            b = math.exp((r[i, j + 1] - r[i, j] - d[i, j + 1]) / gamma)
            c = math.exp((r[i + 1, j + 1] - r[i, j] - d[i + 1, j + 1]) / gamma)
            e[i, j] = e[i + 1, j] * a + e[i, j + 1] * b + e[i + 1, j + 1] * c
    return e[1 : n + 1, 1 : m + 1]


def soft_dtw_step(z, z_pert, lengths, pert_lengths, gamma=0.1):
    """LASER-style loss: mean over pairs of soft-DTW on the cosine distance, forward and backward."""
    dist = 1 - torch.bmm(F.normalize(z, dim=-1), F.normalize(z_pert, dim=-1).transpose(1, 2))
    grads = torch.zeros_like(dist)
    total = 0.0
    for b, (n, m) in enumerate(zip(lengths.tolist(), pert_lengths.tolist())):
        pair = dist[b, :n, :m].detach().double().numpy()
        r = soft_dtw_forward(pair, gamma)
        total += r[n, m]
        grads[b, :n, :m] = torch.from_numpy(soft_dtw_backward(pair, r, gamma))
    dist.backward(grads / len(lengths))
    return total / len(lengths)


@contextlib.contextmanager
def cuda_route():
    """The objective as it runs on CUDA: the CTC through torch's kernel instead of the CPU's band."""
    import fairseq_siamctc.losses as losses

    band_ctc_applies = losses.band_ctc_applies
    losses.band_ctc_applies = lambda *args: False
    try:
        yield
    finally:
        losses.band_ctc_applies = band_ctc_applies


def count_operators(frame_counts, batch, dim, seed):
    """Operator calls of one objective call (forward + backward), the proxy for GPU kernel launches,
    at several T: as CUDA runs it, as a CPU runs it, and as CUDA ran it with the former per-frame
    Viterbi loop (the tests' reference)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
    from test_losses_operators import loop_viterbi, operator_calls

    import fairseq_siamctc.losses as losses

    phi, psi = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
    print(f"operator calls of one siamctc_loss call, forward + backward, B = {batch}, D = {dim}:")
    print(f"{'T':>6s} {'CUDA route':>11s} {'CPU route (band CTC)':>21s} {'CUDA, per-frame Viterbi loop':>29s}")
    for frames in frame_counts:
        gen = torch.Generator().manual_seed(seed)
        lengths = frames - torch.randint(0, frames // 4, (batch,), generator=gen)
        lengths[0] = frames
        speeds = torch.tensor(SPEEDS)[torch.randint(len(SPEEDS), (batch,), generator=gen)]
        pert_lengths = (lengths / speeds).round().long()
        z = torch.randn(batch, frames, dim, generator=gen, requires_grad=True)
        z_pert = torch.randn(batch, int(pert_lengths.max()), dim, generator=gen, requires_grad=True)
        mask = torch.arange(z.shape[1])[None, :] >= lengths[:, None]
        pert_mask = torch.arange(z_pert.shape[1])[None, :] >= pert_lengths[:, None]

        def call():
            out = losses.siamctc_loss(z, z_pert, mask, pert_mask, phi, psi, generator=torch.Generator().manual_seed(0))
            out["loss"].backward()

        with cuda_route():
            counts = [operator_calls(call)]
        counts.append(operator_calls(call))
        compiled = losses.viterbi_alignment
        losses.viterbi_alignment = loop_viterbi
        try:
            with cuda_route():
                counts.append(operator_calls(call))
        finally:
            losses.viterbi_alignment = compiled
        print(f"{frames:6d} {counts[0]:11d} {counts[1]:21d} {counts[2]:29d}")
    print()


def hubert_base():
    from fairseq.data import Dictionary
    from fairseq.models.hubert.hubert import HubertConfig, HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

    # base: 12 layers, 768 dims, 3072 FFN, 12 heads; the CNN frozen as SiamCTC trains it
    model = HubertModel(HubertConfig(label_rate=50.0, feature_grad_mult=0.0), HubertPretrainingConfig(), [Dictionary()])
    return model.train()


def encoder_step(model, seconds, utterances, seed):
    """Forward + backward of both views (speed 1.0 and 0.9) of `utterances` clips of `seconds`."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for speed in (1.0, 0.9):
        wav = torch.randn(utterances, int(16000 * seconds / speed), generator=gen)
        features, _ = model.extract_features(wav, mask=False)
        total = total + model.final_proj(features).pow(2).mean()
    total.backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="utterances in the batch")
    parser.add_argument("--dim", type=int, default=256, help="feature dimension (the projection's: 256)")
    parser.add_argument("--encoder-utterances", type=int, default=2, help="0 skips the encoder")
    parser.add_argument("--repeats", type=int, default=3, help="timings are the minimum over this many runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch")
    parser.add_argument("--ops-frames", type=int, nargs="+", default=[250, 750],
                        help="frame counts at which the operator calls of one objective call are counted")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("numba").setLevel(logging.WARNING)  # fairseq's import leaves the root logger at DEBUG
    count_operators(args.ops_frames, args.batch, args.dim, args.seed)

    z, z_pert, mask, pert_mask, lengths, pert_lengths = make_batch(args.batch, args.dim, args.seed)
    phi, psi = torch.nn.Linear(args.dim, args.dim), torch.nn.Linear(args.dim, args.dim)
    z.requires_grad_(), z_pert.requires_grad_()
    swapped = int((pert_lengths < lengths).sum())
    print(
        f"B = {args.batch}, T = {lengths.min()}..{lengths.max()}, T~ = {pert_lengths.min()}..{pert_lengths.max()}, "
        f"D = {args.dim}, {swapped} swapped, torch threads = {torch.get_num_threads()}"
    )

    def full():
        siamctc_loss(z, z_pert, mask, pert_mask, phi, psi, generator=torch.Generator().manual_seed(0))["loss"].backward()

    # the parts, each on the layout the objective uses: inputs phi(z~) or z, classes the other view
    size = max(z.shape[1], z_pert.shape[1])
    in_len, tgt_len = torch.maximum(lengths, pert_lengths), torch.minimum(lengths, pert_lengths)
    padded_lp = torch.randn(args.batch, size, size + 1, generator=torch.Generator().manual_seed(1)).log_softmax(-1)
    leaf_lp = padded_lp.clone().requires_grad_()

    def attention():
        alignment_log_probs(phi(z_pert), z, pert_mask, mask).sum().backward()

    def ctc():
        frame_ctc_loss(leaf_lp, in_len, tgt_len).sum().backward()

    def on_cuda_route(fn):
        def run():
            with cuda_route():
                fn()

        return run

    def viterbi():
        viterbi_alignment(padded_lp, in_len, tgt_len)

    def tince():
        gen = torch.Generator().manual_seed(0)
        (tince_loss(z, psi(z), mask, generator=gen) + tince_loss(z_pert, psi(z_pert), pert_mask, generator=gen)).backward()

    soft_dtw_step(z[:1, :20], z_pert[:1, :20], torch.tensor([20]), torch.tensor([20]))  # numba compilation
    timings = {}
    for name, fn in (
        ("siamctc_loss (all terms)", full),
        ("  ... CTC by torch's kernel", on_cuda_route(full)),
        ("  attention log-probs", attention),
        ("  CTC (band recursion)", ctc),
        ("  CTC (torch's kernel)", on_cuda_route(ctc)),
        ("  Viterbi alignment", viterbi),
        ("  TINCE (both views)", tince),
        ("soft-DTW (numba + distance)", lambda: soft_dtw_step(z, z_pert, lengths, pert_lengths)),
    ):
        timings[name] = best_time(fn, args.repeats)

    encoder = None
    if args.encoder_utterances:
        model = hubert_base()
        seconds = statistics.mean(lengths.tolist()) / FRAME_RATE
        encoder_step(model, 1.0, 1, args.seed)  # warm-up
        measured = best_time(lambda: encoder_step(model, seconds, args.encoder_utterances, args.seed), 1)
        encoder = measured * args.batch / args.encoder_utterances
        print(
            f"HuBERT base, {args.encoder_utterances} x {seconds:.1f} s, two views: {measured:.2f} CPU s measured, "
            f"x {args.batch / args.encoder_utterances:g} -> {encoder:.1f} s for the batch"
        )

    print(f"{'forward + backward':32s} {'CPU s':>8s} {'% of encoder':>13s} {'x soft-DTW':>11s}")
    dtw = timings["soft-DTW (numba + distance)"]
    for name, seconds in timings.items():
        share = f"{100 * seconds / encoder:.2f}" if encoder else "-"
        print(f"{name:32s} {seconds:8.3f} {share:>13s} {seconds / dtw:11.2f}")
    if encoder:
        print(f"{'HuBERT base encoder (scaled)':32s} {encoder:8.1f} {100:13.0f} {encoder / dtw:11.0f}")


if __name__ == "__main__":
    main()
