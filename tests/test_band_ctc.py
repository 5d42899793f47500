"""The band recursion against torch's own CTC (the full lattice, an independent implementation):
values and gradients on padded batches, the edge widths, gradcheck, and the routing of
frame_ctc_loss."""

import pytest
import torch
import torch.nn.functional as F

from fairseq_siamctc import losses
from fairseq_siamctc.band_ctc import band_ctc_applies, band_ctc_nll

torch.set_num_threads(1)


def torch_ctc(log_probs, input_lengths, target_lengths):
    batch_size, _, num_classes = log_probs.shape
    targets = torch.arange(1, num_classes).expand(batch_size, num_classes - 1)
    return F.ctc_loss(log_probs.transpose(0, 1), targets, input_lengths, target_lengths, reduction="none")


def random_batch(seed, input_lengths, target_lengths, num_classes=None, dtype=torch.float64, scale=3.0):
    """Logits (B, max T, C) whose padded frames and classes hold random values too: nothing may read them."""
    gen = torch.Generator().manual_seed(seed)
    input_lengths, target_lengths = torch.tensor(input_lengths), torch.tensor(target_lengths)
    num_classes = num_classes or int(target_lengths.max()) + 1
    logits = scale * torch.randn(len(input_lengths), int(input_lengths.max()), num_classes, generator=gen, dtype=dtype)
    return logits.requires_grad_(), input_lengths, target_lengths


CASES = {
    # the objective's range: T / L up to 1.25, some T = L, padded frames and classes
    "speeds": ([40, 36, 50, 45, 31], [32, 36, 41, 40, 30]),
    "every T = L (width 1)": ([20, 13, 17], [20, 13, 17]),
    "one-label target": ([9, 12], [1, 11]),
    "one frame": ([1, 3], [1, 2]),
}


@pytest.mark.parametrize("case", CASES)
def test_band_equals_torch_ctc_values_and_gradients(case):
    logits, input_lengths, target_lengths = random_batch(0, *CASES[case], num_classes=int(max(CASES[case][1])) + 4)
    assert band_ctc_applies(logits, input_lengths, target_lengths)
    weights = torch.arange(1.0, len(input_lengths) + 1, dtype=logits.dtype)  # a gradient per utterance
    got = band_ctc_nll(logits.log_softmax(-1), input_lengths, target_lengths)
    (got_grad,) = torch.autograd.grad((weights * got).sum(), logits)
    expected = torch_ctc(logits.log_softmax(-1), input_lengths, target_lengths)
    (expected_grad,) = torch.autograd.grad((weights * expected).sum(), logits)
    # float64 log-space sums of at most 2 T terms of size ~10: agreement to ~1e-12 relative
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-9, atol=1e-10)
    frame = torch.arange(logits.shape[1])
    assert (got_grad[frame[None, :] >= input_lengths[:, None]] == 0).all()


def test_the_gradient_is_minus_the_occupancy_and_torch_adds_exp_log_probs():
    logits, input_lengths, target_lengths = random_batch(1, *CASES["speeds"], num_classes=45)
    log_probs = logits.detach().log_softmax(-1).requires_grad_()
    (band_grad,) = torch.autograd.grad(band_ctc_nll(log_probs, input_lengths, target_lengths).sum(), log_probs)
    (torch_grad,) = torch.autograd.grad(torch_ctc(log_probs, input_lengths, target_lengths).sum(), log_probs)
    valid = (torch.arange(logits.shape[1])[None, :] < input_lengths[:, None])[..., None]
    torch.testing.assert_close(band_grad, torch_grad - log_probs.detach().exp() * valid, rtol=1e-9, atol=1e-10)
    # occupancies of a frame sum to one: each frame is on exactly one state of every path
    torch.testing.assert_close(-band_grad.sum(-1), valid[..., 0].to(band_grad.dtype), rtol=1e-9, atol=1e-10)


def test_gradcheck_with_padding():
    logits, input_lengths, target_lengths = random_batch(2, [7, 5, 6], [5, 5, 3], num_classes=7, scale=1.0)
    log_probs = logits.detach().log_softmax(-1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: band_ctc_nll(x, input_lengths, target_lengths), (log_probs,))


def test_float32_within_rounding_of_torch():
    logits, input_lengths, target_lengths = random_batch(3, [300, 260, 240], [250, 260, 200], dtype=torch.float32)
    log_probs = logits.detach().log_softmax(-1)
    got = band_ctc_nll(log_probs, input_lengths, target_lengths)
    expected = torch_ctc(log_probs, input_lengths, target_lengths)
    # two float32 recursions of 300 steps on values ~1e3: relative differences of a few 1e-7
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_routing_and_refusals():
    logits, input_lengths, target_lengths = random_batch(4, [10, 9], [8, 9])
    assert band_ctc_applies(logits, input_lengths, target_lengths)
    # the band would be wider than the lattice; an infeasible or empty target: torch's kernel
    assert not band_ctc_applies(logits, torch.tensor([10, 9]), torch.tensor([3, 2]))
    assert not band_ctc_applies(logits, torch.tensor([10, 7]), torch.tensor([8, 9]))
    assert not band_ctc_applies(logits, torch.tensor([10, 9]), torch.tensor([8, 0]))
    with pytest.raises(ValueError, match="target length <= input length"):
        band_ctc_nll(logits.log_softmax(-1), torch.tensor([10, 7]), torch.tensor([8, 9]))
    # frame_ctc_loss keeps torch's answer where the band does not apply: inf for an infeasible utterance
    nll = losses.frame_ctc_loss(logits.log_softmax(-1), torch.tensor([10, 7]), torch.tensor([8, 9]))
    assert torch.isfinite(nll[0]) and torch.isinf(nll[1])


def test_frame_ctc_loss_takes_the_band_on_cpu(monkeypatch):
    logits, input_lengths, target_lengths = random_batch(5, *CASES["speeds"])
    log_probs = logits.detach().log_softmax(-1)
    calls = []
    monkeypatch.setattr(losses, "band_ctc_nll", lambda *args: calls.append(args) or band_ctc_nll(*args))
    torch.testing.assert_close(
        losses.frame_ctc_loss(log_probs, input_lengths, target_lengths),
        torch_ctc(log_probs, input_lengths, target_lengths), rtol=1e-10, atol=1e-10,
    )
    assert len(calls) == 1
