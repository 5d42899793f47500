"""The batched Triton Viterbi (the CUDA route of ``viterbi_alignment``), run by Triton's interpreter
on CPU tensors: the paths of torchaudio's forced aligner (the route it replaces) exactly, ties
included, brute force over all CTC paths, and the objective's operator calls and kernel launches on
the CUDA route, the same for any number of frames."""

import collections
import functools
import math

import pytest
import torch
import torchaudio  # noqa: F401  (registers torch.ops.torchaudio.forced_align)

pytest.importorskip("triton")

from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

from fairseq_siamctc import losses, viterbi_triton  # noqa: E402
from fairseq_siamctc.losses import alignment_log_probs, siamctc_loss, viterbi_alignment  # noqa: E402
from fairseq_siamctc.viterbi_triton import viterbi_path  # noqa: E402
from test_losses import brute_force, padded_problem  # noqa: E402

triton_route = functools.partial(viterbi_alignment, backend="triton")
torchaudio_route = functools.partial(viterbi_alignment, backend="torchaudio")


def forced_align_reference(log_probs, input_lengths, target_lengths):
    """torchaudio's aligner called directly on each feasible utterance (float32 at least, as the
    objective calls it); None for the others."""
    paths = []
    for b, (t_in, t_tgt) in enumerate(zip(input_lengths.tolist(), target_lengths.tolist())):
        if t_in == 0 or t_in < t_tgt or t_tgt == 0:
            paths.append(None)
            continue
        emissions = log_probs[b : b + 1, :t_in, : t_tgt + 1].to(torch.promote_types(log_probs.dtype, torch.float32))
        aligned, _ = torch.ops.torchaudio.forced_align(
            emissions.contiguous(), torch.arange(1, t_tgt + 1)[None], torch.tensor([t_in]), torch.tensor([t_tgt]), 0
        )
        paths.append(aligned[0].tolist())
    return paths


def attention_batch(seed, input_lengths, target_lengths, max_len, dtype=torch.float32):
    """Attention log-probabilities of a padded batch as the objective builds them (padded keys -inf,
    padded frames all blank)."""
    gen = torch.Generator().manual_seed(seed)
    frame = torch.arange(max_len)[None, :]
    query = torch.randn(len(input_lengths), max_len, 8, generator=gen, dtype=dtype)
    keys = torch.randn(len(input_lengths), max_len, 8, generator=gen, dtype=dtype)
    return alignment_log_probs(
        query, keys, frame >= input_lengths[:, None], frame >= target_lengths[:, None], temperature=0.2
    )


def random_batch(seed, batch, max_len, dtype=torch.float32):
    """A padded batch of random lengths (some infeasible), the first two utterances feasible with
    slack (T > L) and without (T = L)."""
    gen = torch.Generator().manual_seed(seed)
    input_lengths = torch.randint(0, max_len + 1, (batch,), generator=gen)
    target_lengths = torch.randint(0, max_len + 1, (batch,), generator=gen)
    input_lengths[:2], target_lengths[:2] = max_len, torch.tensor([max_len - 4, max_len])
    return attention_batch(seed, input_lengths, target_lengths, max_len, dtype), input_lengths, target_lengths


@pytest.mark.parametrize("seed,dtype", [(0, torch.float32), (1, torch.float32), (2, torch.float64)])
def test_paths_equal_forced_align_on_a_padded_batch(seed, dtype):
    log_probs, input_lengths, target_lengths = random_batch(seed, batch=10, max_len=24, dtype=dtype)
    path = triton_route(log_probs, input_lengths, target_lengths)
    assert path.shape == (10, 24) and path.dtype == torch.long
    assert ((input_lengths < target_lengths) | (input_lengths == 0)).any()  # the -1 cases are exercised
    assert torch.equal(path, torchaudio_route(log_probs, input_lengths, target_lengths))
    for b, reference in enumerate(forced_align_reference(log_probs, input_lengths, target_lengths)):
        t_in = input_lengths[b].item()
        if reference is not None:
            assert path[b, :t_in].tolist() == reference
        elif t_in >= target_lengths[b].item():  # empty target: all blank
            assert (path[b, :t_in] == 0).all()
        else:
            assert (path[b, :t_in] == -1).all()
        assert (path[b, t_in:] == -1).all()
    assert path[1].tolist() == list(range(1, 25))  # T = L: the only path


@pytest.mark.parametrize("seed,attention", [(0, True), (2, False)])
def test_paths_equal_brute_force(seed, attention):
    input_lengths, target_lengths = [7, 5, 6, 3, 4, 2], [4, 3, 1, 3, 0, 3]  # the last two: blanks only, infeasible
    log_probs, in_len, tgt_len = padded_problem(seed, input_lengths, target_lengths, attention=attention)
    path = triton_route(log_probs, in_len, tgt_len)
    for b, (t_in, t_tgt) in enumerate(zip(input_lengths, target_lengths)):
        _, expected_path = brute_force(log_probs[b], t_in, t_tgt)
        assert path[b, :t_in].tolist() == (expected_path or [-1] * t_in)
        assert (path[b, t_in:] == -1).all()


def best_score(log_probs, t_in, t_tgt):
    """The highest score of any path of the target 1..t_tgt (max-plus recursion over the 2 L + 1
    states in Python floats), whatever the tie-breaking."""
    states = [0 if s % 2 == 0 else (s + 1) // 2 for s in range(2 * t_tgt + 1)]
    alpha = [log_probs[0, c].item() if s < 2 else -math.inf for s, c in enumerate(states)]
    for t in range(1, t_in):
        alpha = [
            max(alpha[s], alpha[s - 1] if s >= 1 else -math.inf, alpha[s - 2] if s >= 3 and s % 2 else -math.inf)
            + log_probs[t, c].item()
            for s, c in enumerate(states)
        ]
    return max(alpha[-2:]) if t_tgt else alpha[0]


def test_ties_are_broken_as_the_aligner_breaks_them():
    """Log-probabilities of -1 or -2 make every kind of tie (stay, step, skip, final state). The
    aligner's strict comparisons stay where a step ties with the skip: not always the best score,
    which the comparison with the best score shows these inputs reach."""
    gen = torch.Generator().manual_seed(0)
    batch, max_len, num_classes = 48, 7, 6
    log_probs = -torch.randint(1, 3, (batch, max_len, num_classes), generator=gen).float()
    input_lengths = torch.randint(1, max_len + 1, (batch,), generator=gen)
    target_lengths = torch.minimum(torch.randint(1, num_classes, (batch,), generator=gen), input_lengths)
    path = triton_route(log_probs, input_lengths, target_lengths)
    below_best = 0
    for b, reference in enumerate(forced_align_reference(log_probs, input_lengths, target_lengths)):
        t_in, t_tgt = input_lengths[b].item(), target_lengths[b].item()
        assert path[b, :t_in].tolist() == reference
        score = log_probs[b, torch.arange(t_in), path[b, :t_in]].sum().item()  # integers: exact
        below_best += score < best_score(log_probs[b], t_in, t_tgt)
    assert below_best > 0


def test_equal_lengths_and_utterances_without_a_finite_path():
    input_lengths, target_lengths = torch.tensor([9, 9, 9, 6, 3, 0]), torch.tensor([9, 5, 5, 6, 4, 0])
    log_probs = attention_batch(3, input_lengths, target_lengths, max_len=9)
    log_probs[1, :, 3] = -math.inf  # label 3 never emitted: no finite path
    log_probs[2, 4, :] = float("nan")  # every path meets a NaN
    path = triton_route(log_probs, input_lengths, target_lengths)
    assert path[0].tolist() == list(range(1, 10))
    assert path[3].tolist() == list(range(1, 7)) + [-1] * 3
    assert (path[[1, 2, 4, 5]] == -1).all()  # no finite path; no finite path; T < L; no frames
    assert torch.equal(path, torchaudio_route(log_probs, input_lengths, target_lengths))


def test_minus_one_exactly_where_no_path_has_a_finite_score():
    """-inf log-probabilities on the target's labels: -1 where the best score is -inf, else a path of
    the best score. torchaudio's aligner returned, for one of these problems (58, T = L), classes
    that are no path of the target with a finite sum; viterbi_alignment marks that on its route too."""
    gen = torch.Generator().manual_seed(1)
    log_probs = (2 * torch.randn(64, 9, 7, generator=gen)).log_softmax(-1)
    log_probs = log_probs.masked_fill(torch.rand(64, 9, 7, generator=gen) < 0.3, -math.inf)
    input_lengths = torch.randint(1, 10, (64,), generator=gen)
    target_lengths = torch.randint(0, 7, (64,), generator=gen)
    path = triton_route(log_probs, input_lengths, target_lengths)
    assert torch.equal(path, torchaudio_route(log_probs, input_lengths, target_lengths))
    marked = 0
    for b, (t_in, t_tgt) in enumerate(zip(input_lengths.tolist(), target_lengths.tolist())):
        best = best_score(log_probs[b], t_in, t_tgt) if t_in >= t_tgt else -math.inf
        if best == -math.inf:
            marked += 1
            assert (path[b] == -1).all()
        else:  # random scores: a unique best, summed here in another order (float32 rounding)
            assert log_probs[b, torch.arange(t_in), path[b, :t_in]].sum().item() == pytest.approx(best, abs=1e-5)
    assert 0 < marked < 64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_aligned_in_float32(dtype):
    log_probs, input_lengths, target_lengths = random_batch(4, batch=6, max_len=20)
    half = log_probs.to(dtype)
    path = triton_route(half, input_lengths, target_lengths)
    # the aligner on the same values in float32: the kernel converts each one exactly
    assert torch.equal(path, torchaudio_route(half.float(), input_lengths, target_lengths))
    assert (path[0] >= 0).all()


def test_lengths_that_do_not_fit_are_named_or_marked():
    log_probs, input_lengths, target_lengths = random_batch(5, batch=3, max_len=8)
    with pytest.raises(ValueError, match="utterance 1: input length 9 and target length 2"):
        triton_route(log_probs, torch.tensor([8, 9, 3]), torch.tensor([2, 2, 2]))
    with pytest.raises(ValueError, match="backend must be one of"):
        viterbi_alignment(log_probs, input_lengths, target_lengths, backend="cuda")
    # the kernel itself (lengths on a GPU are not read): such utterances are -1, the others unchanged
    path = viterbi_path(log_probs, torch.tensor([8, 9, 8]), torch.tensor([2, 2, 9]))
    assert (path[1:] == -1).all()
    assert torch.equal(path[0], viterbi_path(log_probs[:1], torch.tensor([8]), torch.tensor([2]))[0])
    assert (path[0] >= 0).all()


class OperatorCalls(TorchDispatchMode):
    """Every aten operator call (those of autograd's backward included), by operator."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func] += 1
        return func(*args, **(kwargs or {}))


def count_launches(monkeypatch):
    """Records each launch of the Viterbi kernel (its grid) in the returned list; the interpreter's
    own tensor copies run outside any dispatch mode: a GPU launch has none."""
    launches = []
    kernel = viterbi_triton._kernel

    class CountedKernel:
        def __init__(self, interpret):
            self.kernel = kernel(interpret)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(grid)
                with _disable_current_modes():
                    self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(viterbi_triton, "_kernel", CountedKernel)
    return launches


def objective_calls(monkeypatch, num_frames):
    """(aten operator calls, Triton launches) of one forward and backward pass of siamctc_loss on
    the route CUDA takes: torch's CTC kernel (not the CPU band) and the Triton Viterbi. The
    interpreter's own tensor copies run outside the count: a GPU launch has none."""
    launches = count_launches(monkeypatch)
    monkeypatch.setattr(losses, "band_ctc_applies", lambda *args: False)
    monkeypatch.setattr(losses, "viterbi_alignment", triton_route)
    gen = torch.Generator().manual_seed(0)
    batch, dim = 2, 16
    z = torch.randn(batch, num_frames, dim, generator=gen, requires_grad=True)
    z_pert = torch.randn(batch, num_frames + 9, dim, generator=gen, requires_grad=True)
    phi, psi = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
    frame, frame_pert = torch.arange(num_frames)[None], torch.arange(num_frames + 9)[None]
    mask = frame >= torch.tensor([num_frames, num_frames - 7])[:, None]
    pert_mask = frame_pert >= torch.tensor([num_frames + 9, num_frames - 20])[:, None]  # one swapped
    with OperatorCalls() as counter:
        out = siamctc_loss(z, z_pert, mask, pert_mask, phi, psi, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
    assert torch.isfinite(out["kld"]) and (z.grad[1, num_frames - 7 :] == 0).all()
    monkeypatch.undo()
    return sum(counter.calls.values()), len(launches)


def test_objective_operator_calls_and_launches_do_not_grow_with_frames(monkeypatch):
    """About 6 s: the interpreter runs the kernel over 2 x (250 + 750) frames."""
    short, long = objective_calls(monkeypatch, 250), objective_calls(monkeypatch, 750)
    print(f"aten operator calls and Triton launches, T = 250: {short}, T = 750: {long}")
    assert short == long
    assert short[1] == 1  # the Viterbi: one launch for the batch


def test_viterbi_operator_calls_do_not_grow_with_frames_or_batch(monkeypatch):
    launches = count_launches(monkeypatch)
    counts = []
    for batch, max_len in [(2, 12), (5, 30)]:
        log_probs, input_lengths, target_lengths = random_batch(6, batch, max_len)
        with OperatorCalls() as counter:
            triton_route(log_probs, input_lengths, target_lengths)
        counts.append(sum(counter.calls.values()))
    print(f"viterbi_alignment on the Triton route: {counts[0]} aten operator calls, one launch")
    assert counts[0] == counts[1] <= 30 and launches == [(2,), (5,)]
