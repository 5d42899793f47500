"""The objective's cost structure: the Viterbi alignment through the compiled aligner equals the
former per-frame dynamic programme on large padded batches, and the number of operator calls of the
objective as CUDA runs it (the proxy for GPU kernel launches) does not grow with the number of frames."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from fairseq_siamctc import losses
from fairseq_siamctc.losses import alignment_log_probs, siamctc_loss, viterbi_alignment

torch.set_num_threads(1)


@torch.no_grad()
def loop_viterbi(log_probs, input_lengths, target_lengths):
    """The former implementation, kept as a reference: max-product DP over the extended label
    sequence (blank, 1, blank, 2, ..., blank), one step of a few tensor operations per frame."""
    batch_size, max_in, num_classes = log_probs.shape
    num_states = 2 * (num_classes - 1) + 1
    state = torch.arange(num_states)
    state_label = torch.where(state % 2 == 1, (state + 1) // 2, 0)
    skip_penalty = torch.where((state % 2 == 1) & (state >= 3), 0.0, float("-inf")).to(log_probs.dtype)
    emissions = log_probs.gather(2, state_label.expand(batch_size, max_in, num_states))
    history = log_probs.new_full((max_in, batch_size, num_states + 2), float("-inf"))
    history[0, :, 2:4] = emissions[:, 0, :2]
    moves = torch.zeros((max_in, batch_size, num_states), dtype=torch.long)
    for t in range(1, max_in):
        previous = history[t - 1]
        stay, one, two = previous[:, 2:], previous[:, 1:-1], previous[:, :-2] + skip_penalty
        best = torch.maximum(stay, one)
        moves[t] = torch.where(two > best, 2, (one > stay).long())
        history[t, :, 2:] = torch.maximum(best, two) + emissions[:, t]
    frame = torch.arange(max_in)
    moves.masked_fill_((frame[:, None] >= input_lengths[None, :])[..., None], 0)
    score = history[(input_lengths - 1).clamp(min=0), torch.arange(batch_size), 2:]
    last_blank = (2 * target_lengths).clamp(max=num_states - 1)[:, None]
    last_label = (2 * target_lengths - 1).clamp(min=0)[:, None]
    blank_score = score.gather(1, last_blank)
    label_score = score.gather(1, last_label).masked_fill(target_lengths[:, None] == 0, float("-inf"))
    current = torch.where(label_score > blank_score, last_label, last_blank)
    best_score = torch.maximum(label_score, blank_score).squeeze(1)
    states = [current]
    for t in range(max_in - 1, 0, -1):
        current = current - moves[t].gather(1, current)
        states.append(current)
    path = state_label[torch.cat(states[::-1], dim=1)]
    keep = (frame[None, :] < input_lengths[:, None]) & torch.isfinite(best_score)[:, None]
    return path.masked_fill(~keep, -1)


def random_problem(seed, batch, max_len, dtype=torch.float64):
    """A padded batch as the objective builds it: attention log-probabilities, plain and swapped
    lengths, some utterances infeasible (input shorter than target), one with no frames."""
    gen = torch.Generator().manual_seed(seed)
    input_lengths = torch.randint(0, max_len + 1, (batch,), generator=gen)
    target_lengths = torch.randint(0, max_len + 1, (batch,), generator=gen)
    input_lengths[0], target_lengths[0] = max_len, max_len - 3
    frame = torch.arange(max_len)[None, :]
    query = torch.randn(batch, max_len, 8, generator=gen, dtype=dtype)
    keys = torch.randn(batch, max_len, 8, generator=gen, dtype=dtype)
    log_probs = alignment_log_probs(
        query, keys, frame >= input_lengths[:, None], frame >= target_lengths[:, None], temperature=0.2
    )
    return log_probs, input_lengths, target_lengths


@pytest.mark.parametrize("seed", range(4))
def test_compiled_viterbi_equals_the_per_frame_loop(seed):
    log_probs, input_lengths, target_lengths = random_problem(seed, batch=12, max_len=70)
    expected = loop_viterbi(log_probs, input_lengths, target_lengths)
    got = viterbi_alignment(log_probs, input_lengths, target_lengths)
    assert ((input_lengths < target_lengths) | (input_lengths == 0)).any()  # the -1 cases are exercised
    assert torch.equal(got, expected)
    # float32, as the objective computes it: the same paths (ties are improbable with random scores)
    assert torch.equal(viterbi_alignment(log_probs.float(), input_lengths, target_lengths), expected)


def test_viterbi_marks_utterances_without_a_finite_path():
    log_probs, input_lengths, target_lengths = random_problem(0, batch=3, max_len=10)
    input_lengths[:], target_lengths[:] = 10, 4
    log_probs[1, :, :] = float("-inf")
    log_probs[2, 3, 0] = float("nan")
    path = viterbi_alignment(log_probs, input_lengths, target_lengths)
    assert (path[0] >= 0).all() and (path[1] == -1).all() and (path[2] == -1).all()
    with pytest.raises(ValueError, match="utterance 0: input length 10 and target length 10"):
        viterbi_alignment(log_probs[:, :, :5], input_lengths, torch.full((3,), 10))


OPERATORS = ("aten::", "torchaudio::")


def operator_calls(fn):
    """Operator calls of one call of fn: aten and torchaudio ops not nested in another op (those of
    autograd's backward nodes included). Nested ones are left out: ATen may split an operator into
    a size-dependent number of sub-calls (zero_ of a large tensor, for one), launches of one kernel."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(
        1
        for event in prof.events()
        if event.name.startswith(OPERATORS) and not (event.cpu_parent and event.cpu_parent.name.startswith(OPERATORS))
    )


def objective_call(num_frames, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, dim = 4, 16
    lengths = torch.tensor([num_frames, num_frames - 7, num_frames - 2, num_frames - 11])
    pert_lengths = torch.tensor([num_frames + 9, num_frames - 9, num_frames, num_frames - 20])
    z = torch.randn(batch, num_frames, dim, generator=gen, requires_grad=True)
    z_pert = torch.randn(batch, num_frames + 9, dim, generator=gen, requires_grad=True)
    phi, psi = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
    frame, frame_pert = torch.arange(num_frames)[None], torch.arange(num_frames + 9)[None]
    mask, pert_mask = frame >= lengths[:, None], frame_pert >= pert_lengths[:, None]

    def run():
        out = siamctc_loss(z, z_pert, mask, pert_mask, phi, psi, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()

    return run


def test_operator_calls_do_not_grow_with_the_number_of_frames(monkeypatch):
    # on CPU the CTC term takes the band recursion, a few operators a frame; CUDA takes torch's kernel
    band_on_cpu = operator_calls(objective_call(160)) - operator_calls(objective_call(40))
    monkeypatch.setattr(losses, "band_ctc_applies", lambda *args: False)
    short, long = operator_calls(objective_call(40)), operator_calls(objective_call(160))
    assert short == long
    assert band_on_cpu >= 2 * (160 - 40)  # what the CUDA route is spared
    log_probs, input_lengths, target_lengths = random_problem(1, batch=4, max_len=40, dtype=torch.float32)
    long_problem = random_problem(1, batch=4, max_len=160, dtype=torch.float32)
    lengths = (input_lengths.clamp(min=20), target_lengths.clamp(max=19))  # all feasible: one aligner call each
    long_lengths = (4 * lengths[0], 4 * lengths[1])
    assert operator_calls(lambda: viterbi_alignment(log_probs, *lengths)) == operator_calls(
        lambda: viterbi_alignment(long_problem[0], *long_lengths)
    )
    # the former loop grew by a few operators a frame: what the profile would have shown
    assert operator_calls(lambda: loop_viterbi(long_problem[0], *long_lengths)) > 4 * operator_calls(
        lambda: loop_viterbi(log_probs, *lengths)
    ) / 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths_equal_cpu_paths():
    log_probs, input_lengths, target_lengths = random_problem(5, batch=6, max_len=120, dtype=torch.float32)
    expected = viterbi_alignment(log_probs, input_lengths, target_lengths)
    got = viterbi_alignment(log_probs.cuda(), input_lengths.cuda(), target_lengths.cuda())
    assert got.device.type == "cuda" and torch.equal(got.cpu(), expected)
