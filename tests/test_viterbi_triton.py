"""The batched Triton Viterbi (the CUDA route of ``viterbi_alignment``), run by Triton's interpreter
on CPU tensors: the paths of torchaudio's forced aligner (the route it replaces) exactly, ties
included, brute force over all CTC paths, and the objective's operator calls and kernel launches on
the CUDA route, the same for any number of frames."""

import collections
import functools
import math

import numpy as np
import pytest
import torch
import torchaudio  # noqa: F401  (registers torch.ops.torchaudio.forced_align)

triton = pytest.importorskip("triton")

from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402
from triton.runtime.errors import InterpreterError  # noqa: E402

from fairseq_siamctc import losses, viterbi_triton  # noqa: E402
from fairseq_siamctc.losses import alignment_log_probs, siamctc_loss, viterbi_alignment  # noqa: E402
from fairseq_siamctc.viterbi_triton import viterbi_path  # noqa: E402
from test_losses import brute_force, padded_problem  # noqa: E402


def interpreter_runs() -> bool:
    """Whether Triton's interpreter runs the kernel here: before Triton 3.8 it takes a loop bound's
    index with int() of a one-element array, which recent NumPy refuses (seen with Triton 3.6, the
    version torch 2.11 installs, and NumPy 2.4). The compiled kernel is not concerned."""
    try:
        viterbi_path(torch.zeros(1, 2, 2), torch.tensor([2]), torch.tensor([1]))
    except InterpreterError:
        return False
    return True


needs_interpreter = pytest.mark.skipif(
    not interpreter_runs(),
    reason=f"Triton {triton.__version__}'s interpreter cannot run the kernel with NumPy {np.__version__}",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
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


@needs_interpreter
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


@needs_interpreter
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


@needs_interpreter
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


@needs_interpreter
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


@needs_interpreter
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


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_aligned_in_float32(dtype):
    log_probs, input_lengths, target_lengths = random_batch(4, batch=6, max_len=20)
    half = log_probs.to(dtype)
    path = triton_route(half, input_lengths, target_lengths)
    # the aligner on the same values in float32: the kernel converts each one exactly
    assert torch.equal(path, torchaudio_route(half.float(), input_lengths, target_lengths))
    assert (path[0] >= 0).all()


@needs_interpreter
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


@needs_interpreter
def test_objective_operator_calls_and_launches_do_not_grow_with_frames(monkeypatch):
    """About 6 s: the interpreter runs the kernel over 2 x (250 + 750) frames."""
    short, long = objective_calls(monkeypatch, 250), objective_calls(monkeypatch, 750)
    print(f"aten operator calls and Triton launches, T = 250: {short}, T = 750: {long}")
    assert short == long
    assert short[1] == 1  # the Viterbi: one launch for the batch


@needs_interpreter
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


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_kernel_equals_the_aligner(dtype):
    """The kernel compiled for the GPU (the tests above run the interpreter): random padded batches
    with infeasible utterances, and the paper's shape (8 utterances, 976 perturbed frames against 781
    original ones, a band of 196 states), equal to torchaudio's aligner on the CPU. Max-plus adds one
    float32 number per state and frame in the same order on both sides: equal, not close."""
    for seed, batch, max_len in [(10, 16, 40), (11, 8, 300)]:
        log_probs, input_lengths, target_lengths = random_batch(seed, batch, max_len)
        log_probs = log_probs.to(dtype)
        got = triton_route(log_probs.cuda(), input_lengths.cuda(), target_lengths.cuda())
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), torchaudio_route(log_probs.float(), input_lengths, target_lengths))
    gen = torch.Generator().manual_seed(12)
    input_lengths = torch.randint(800, 977, (8,), generator=gen)
    input_lengths[0] = 976
    target_lengths = (input_lengths * 0.8).long()
    log_probs = attention_batch(12, input_lengths, target_lengths, max_len=976).to(dtype)
    got = triton_route(log_probs.cuda(), input_lengths.cuda(), target_lengths.cuda()).cpu()
    for b, reference in enumerate(forced_align_reference(log_probs.float(), input_lengths, target_lengths)):
        assert got[b, : input_lengths[b]].tolist() == reference


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_interpreter),
                                    pytest.param("cuda", marks=needs_cuda)])
def test_objective_is_the_same_with_either_aligner(monkeypatch, device):
    """siamctc_loss on a padded batch with a swapped utterance: the Triton route (the interpreter on
    a CPU) and torchaudio's route choose the same paths, so every term and gradient agree. Exactly on
    a CPU; on CUDA to float32 rounding, since some backward kernels sum with atomics in any order
    (a different path would move kld by a log-probability difference, far above it)."""
    gen = torch.Generator().manual_seed(13)
    z = torch.randn(3, 120, 32, generator=gen).to(device)
    z_pert = torch.randn(3, 150, 32, generator=gen).to(device)
    frame, frame_pert = torch.arange(120, device=device)[None], torch.arange(150, device=device)[None]
    mask = frame >= torch.tensor([120, 100, 90], device=device)[:, None]
    pert_mask = frame_pert >= torch.tensor([150, 125, 70], device=device)[:, None]  # the last one swapped
    torch.manual_seed(0)
    heads = torch.nn.Linear(32, 32).to(device), torch.nn.Linear(32, 32).to(device)
    results = []
    for backend in ("triton", "torchaudio"):
        monkeypatch.setattr(losses, "viterbi_alignment", functools.partial(viterbi_alignment, backend=backend))
        inputs = z.clone().requires_grad_(), z_pert.clone().requires_grad_()
        out = siamctc_loss(*inputs, mask, pert_mask, *heads, temperature=0.1,
                           generator=torch.Generator(device=device).manual_seed(0))
        out["loss"].backward()
        results.append(({k: v.item() for k, v in out.items()}, inputs[0].grad, inputs[1].grad))
    (terms, *grads), (terms_ta, *grads_ta) = results
    assert terms["swapped_share"] == pytest.approx(1 / 3) and terms["num_aligned"] == 3
    exact = device == "cpu"
    assert terms == (terms_ta if exact else pytest.approx(terms_ta, rel=1e-6, abs=1e-6))
    for grad, grad_ta in zip(grads, grads_ta):
        torch.testing.assert_close(grad, grad_ta, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
