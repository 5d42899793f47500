"""The SiamCTC objective against independent references: brute force over all CTC paths,
torchaudio's forced aligner, naive per-anchor loops and the role swap done by hand."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import torchaudio.functional as AF

from fairseq_siamctc.losses import (
    alignment_log_probs,
    alignment_statistics,
    frame_ctc_loss,
    sample_negative_indices,
    siamctc_loss,
    tince_loss,
    viterbi_alignment,
)


def padding_mask(lengths, max_len):
    return torch.arange(max_len)[None, :] >= torch.as_tensor(lengths)[:, None]


def collapse(path):
    labels = [c for i, c in enumerate(path) if i == 0 or c != path[i - 1]]
    return [c for c in labels if c != 0]


def brute_force(log_probs, input_length, target_length):
    """(NLL of the target 1..L summed over every valid path, best path) by enumerating all paths."""
    target = list(range(1, target_length + 1))
    scores, best, best_path = [], -math.inf, None
    for path in itertools.product(range(target_length + 1), repeat=input_length):
        if collapse(path) != target:
            continue
        score = sum(log_probs[t, c].item() for t, c in enumerate(path))
        scores.append(score)
        if score > best:
            best, best_path = score, list(path)
    if not scores:
        return math.inf, None
    return -torch.logsumexp(torch.tensor(scores, dtype=torch.float64), 0).item(), best_path


def padded_problem(seed, input_lengths, target_lengths, dtype=torch.float64, attention=True):
    """Log-probabilities of a padded batch, padded keys at -inf as the objective makes them: from
    attention between random frames, or from peaked random logits (which favour skipping classes)."""
    gen = torch.Generator().manual_seed(seed)
    max_in, max_target = max(input_lengths), max(target_lengths)
    if not attention:
        logits = 4 * torch.randn(len(input_lengths), max_in, 1 + max_target, generator=gen, dtype=dtype)
        key_mask = F.pad(padding_mask(target_lengths, max_target), (1, 0))
        log_probs = logits.masked_fill(key_mask[:, None, :], -math.inf).log_softmax(-1)
        return log_probs, torch.tensor(input_lengths), torch.tensor(target_lengths)
    query = torch.randn(len(input_lengths), max_in, 4, generator=gen, dtype=dtype)
    keys = torch.randn(len(input_lengths), max_target, 4, generator=gen, dtype=dtype)
    log_probs = alignment_log_probs(
        query,
        keys,
        padding_mask(input_lengths, max_in),
        padding_mask(target_lengths, max_target),
        temperature=0.3,
    )
    return log_probs, torch.tensor(input_lengths), torch.tensor(target_lengths)


def test_alignment_log_probs_blank_column_similarity_and_masks():
    gen = torch.Generator().manual_seed(0)
    query, keys = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 4, 5, generator=gen)
    key_mask, query_mask = padding_mask([4, 2], 4), padding_mask([3, 1], 3)
    for similarity in ("cosine", "dot"):
        log_probs = alignment_log_probs(
            query, keys, query_mask, key_mask, temperature=0.5, blank_logit=-1.5, similarity=similarity
        )
        assert log_probs.shape == (2, 3, 5)
        b, i, j = 0, 1, 2
        if similarity == "cosine":
            expected = F.cosine_similarity(query[b, i], keys[b, j], dim=0)
        else:
            expected = query[b, i] @ keys[b, j]
        # differences of log-probabilities are differences of logits: the blank's logit is fixed
        assert torch.allclose(log_probs[b, i, 1 + j] - log_probs[b, i, 0], expected / 0.5 + 1.5, atol=1e-5)
        assert torch.allclose(log_probs.exp().sum(-1), torch.ones(2, 3))
        assert torch.isneginf(log_probs[1, 0, 3:]).all() and torch.isfinite(log_probs[1, 0, :3]).all()
        # a padded query frame is an all-blank row
        assert log_probs[1, 1, 0] == 0 and torch.isneginf(log_probs[1, 1, 1:]).all()


@pytest.mark.parametrize("seed,attention", [(0, True), (1, True), (2, False), (3, False)])
def test_ctc_and_viterbi_equal_brute_force_on_a_padded_batch(seed, attention):
    input_lengths, target_lengths = [7, 5, 6, 3, 4, 2], [4, 3, 1, 3, 0, 3]  # the last two: blanks only, infeasible
    log_probs, in_len, tgt_len = padded_problem(seed, input_lengths, target_lengths, attention=attention)
    nll = frame_ctc_loss(log_probs, in_len, tgt_len)
    path = viterbi_alignment(log_probs, in_len, tgt_len)
    assert path.shape == (6, 7) and path.dtype == torch.long
    for b, (t_in, t_tgt) in enumerate(zip(input_lengths, target_lengths)):
        expected_nll, expected_path = brute_force(log_probs[b], t_in, t_tgt)
        if expected_path is None:
            assert math.isinf(nll[b].item()) and (path[b] == -1).all()
            continue
        assert nll[b].item() == pytest.approx(expected_nll, rel=1e-9)
        assert path[b, :t_in].tolist() == expected_path
        assert (path[b, t_in:] == -1).all()


def test_ctc_gradient_is_finite_with_padded_keys_and_matches_gradcheck():
    in_len, tgt_len = torch.tensor([6, 4, 5]), torch.tensor([3, 2, 5])
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(3, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(3, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    q_mask, k_mask = padding_mask([6, 4, 5], 6), padding_mask([3, 2, 5], 5)

    def nll(query, keys):
        return frame_ctc_loss(alignment_log_probs(query, keys, q_mask, k_mask, temperature=0.3), in_len, tgt_len)

    nll(query, keys).sum().backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(keys.grad).all()
    assert (query.grad[1, 4:] == 0).all() and (keys.grad[0, 3:] == 0).all()  # padding gets no gradient
    assert torch.autograd.gradcheck(nll, (query.detach().requires_grad_(), keys.detach().requires_grad_()))


def test_viterbi_agrees_with_torchaudio_forced_align():
    gen = torch.Generator().manual_seed(7)
    batch, max_in, max_target = 5, 90, 60
    input_lengths = torch.tensor([90, 75, 60, 88, 41])
    target_lengths = torch.tensor([60, 30, 60, 1, 40])
    logits = torch.randn(batch, max_in, 1 + max_target, generator=gen) * 3
    logits[:, :, 1:] = logits[:, :, 1:].masked_fill(padding_mask(target_lengths, max_target)[:, None, :], -math.inf)
    log_probs = logits.log_softmax(-1)
    path = viterbi_alignment(log_probs, input_lengths, target_lengths)
    for b in range(batch):
        t_in, t_tgt = input_lengths[b].item(), target_lengths[b].item()
        targets = torch.arange(1, t_tgt + 1, dtype=torch.int32)[None]
        reference, _ = AF.forced_align(log_probs[b : b + 1, :t_in], targets, blank=0)
        assert path[b, :t_in].tolist() == reference[0].tolist()
        assert (path[b, t_in:] == -1).all()


def test_sample_negative_indices_respect_distance_and_cover_all_candidates_uniformly():
    lengths = torch.tensor([12, 9, 4, 0])
    num_negatives, min_distance = 4000, 3
    index, has_candidates = sample_negative_indices(
        lengths, 12, num_negatives, min_distance, torch.Generator().manual_seed(0)
    )
    assert index.shape == (4, 12, num_negatives)
    for b, length in enumerate(lengths.tolist()):
        for i in range(12):
            candidates = [j for j in range(length) if abs(j - i) >= min_distance] if i < length else []
            assert has_candidates[b, i].item() == bool(candidates)
            if not candidates:
                continue
            counts = torch.bincount(index[b, i], minlength=12)
            assert set(torch.nonzero(counts).flatten().tolist()) == set(candidates)
            expected = num_negatives / len(candidates)
            assert (counts[candidates] - expected).abs().max() < 5 * math.sqrt(expected)


def naive_tince(h, pred, lengths, negatives, has_candidates, temperature):
    losses = []
    for b in range(h.shape[0]):
        for i in range(lengths[b] - 1):
            if not has_candidates[b, i]:
                continue
            others = [h[b, i + 1]] + [h[b, j] for j in negatives[b, i].tolist()]
            sims = torch.stack([F.cosine_similarity(pred[b, i], other, dim=0) for other in others]) / temperature
            losses.append(-torch.log_softmax(sims, 0)[0])
    return torch.stack(losses).mean()


def test_tince_equals_naive_loop_given_the_same_negatives():
    gen = torch.Generator().manual_seed(1)
    lengths = [20, 13, 6, 2]
    h = torch.randn(4, 20, 8, generator=gen, dtype=torch.float64)
    pred = torch.randn(4, 20, 8, generator=gen, dtype=torch.float64)
    mask = padding_mask(lengths, 20)
    loss = tince_loss(
        h, pred, mask, num_negatives=7, min_distance=4, temperature=0.3, generator=torch.Generator().manual_seed(5)
    )
    negatives, has_candidates = sample_negative_indices(torch.tensor(lengths), 20, 7, 4, torch.Generator().manual_seed(5))
    assert loss.item() == pytest.approx(naive_tince(h, pred, lengths, negatives, has_candidates, 0.3).item(), rel=1e-10)


def test_tince_is_log_of_negatives_plus_one_on_collapsed_features():
    psi = torch.nn.Linear(16, 16)
    h = torch.randn(1, 1, 16).expand(3, 40, 16)
    loss = tince_loss(h, psi(h), padding_mask([40, 25, 11], 40), num_negatives=20, min_distance=5)
    assert loss.item() == pytest.approx(math.log(21), rel=1e-5)


def test_tince_gradcheck_and_no_valid_anchor_gives_a_differentiable_zero():
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(2, 9, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    pred = torch.randn(2, 9, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = padding_mask([9, 7], 9)

    def loss(h, pred):
        return tince_loss(h, pred, mask, num_negatives=3, min_distance=2, generator=torch.Generator().manual_seed(0))

    assert torch.autograd.gradcheck(loss, (h, pred))
    short = tince_loss(h, pred, padding_mask([4, 0], 9), min_distance=5)  # no frame 5 steps away
    assert short.item() == 0 and short.requires_grad
    short.backward()
    assert (h.grad == 0).all()


class Heads:
    """phi and psi as fixed random linear maps, in float64."""

    def __init__(self, dim, seed):
        gen = torch.Generator().manual_seed(seed)
        self.phi = torch.nn.Linear(dim, dim).double()
        self.psi = torch.nn.Linear(dim, dim).double()
        with torch.no_grad():
            for p in list(self.phi.parameters()) + list(self.psi.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))


def views(seed, orig_lengths, pert_lengths, dim=6):
    gen = torch.Generator().manual_seed(seed)
    t, t_pert = max(orig_lengths), max(pert_lengths)
    z = torch.randn(len(orig_lengths), t, dim, generator=gen, dtype=torch.float64)
    z_pert = torch.randn(len(pert_lengths), t_pert, dim, generator=gen, dtype=torch.float64)
    return z, z_pert, padding_mask(orig_lengths, t), padding_mask(pert_lengths, t_pert)


def by_hand(z, z_pert, heads, temperature):
    """CTC and KLD of one unpadded utterance, the roles chosen by hand."""
    if z_pert.shape[1] < z.shape[1]:
        inputs, classes = z, heads.phi(z_pert)
    else:
        inputs, classes = heads.phi(z_pert), z
    log_probs = alignment_log_probs(inputs, classes, temperature=temperature)
    in_len, tgt_len = torch.tensor([inputs.shape[1]]), torch.tensor([classes.shape[1]])
    ctc = frame_ctc_loss(log_probs, in_len, tgt_len)[0] / classes.shape[1]
    path = viterbi_alignment(log_probs, in_len, tgt_len)[0]
    kld = -log_probs[0, torch.arange(inputs.shape[1]), path].mean()
    return ctc, kld


def test_swapped_and_plain_utterances_in_one_batch_equal_the_roles_set_by_hand():
    orig_lengths, pert_lengths = [9, 6, 7], [7, 8, 7]  # swapped, plain, equal lengths (plain)
    z, z_pert, mask, pert_mask = views(0, orig_lengths, pert_lengths)
    heads = Heads(6, 0)
    out = siamctc_loss(z, z_pert, mask, pert_mask, heads.phi, heads.psi, temperature=0.5)
    expected = [
        by_hand(z[b : b + 1, :t], z_pert[b : b + 1, :tp], heads, 0.5)
        for b, (t, tp) in enumerate(zip(orig_lengths, pert_lengths))
    ]
    assert out["ctc"].item() == pytest.approx(sum(c for c, _ in expected).item() / 3, rel=1e-9)
    assert out["kld"].item() == pytest.approx(sum(k for _, k in expected).item() / 3, rel=1e-9)
    assert out["swapped_share"].item() == pytest.approx(1 / 3)


def test_tince_term_is_the_average_of_both_branches():
    z, z_pert, mask, pert_mask = views(1, [30, 22], [25, 28])
    heads = Heads(6, 1)
    out = siamctc_loss(z, z_pert, mask, pert_mask, heads.phi, heads.psi, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)  # the objective draws the negatives of z first, then of z_pert
    expected = 0.5 * (
        tince_loss(z, heads.psi(z), mask, generator=gen) + tince_loss(z_pert, heads.psi(z_pert), pert_mask, generator=gen)
    )
    assert out["tince"].item() == pytest.approx(expected.item(), rel=1e-12)
    assert out["loss"].item() == pytest.approx((out["ctc"] + out["kld"] + out["tince"]).item(), rel=1e-12)
    weighted = siamctc_loss(
        z, z_pert, mask, pert_mask, heads.phi, heads.psi, alpha=0.3, beta=2.0, ctc_weight=0.0,
        generator=torch.Generator().manual_seed(4),
    )
    assert weighted["loss"].item() == pytest.approx((0.3 * out["kld"] + 2.0 * out["tince"]).item(), rel=1e-12)


def test_objective_gradcheck_on_a_padded_mixed_batch():
    heads = Heads(3, 5)
    z, z_pert, mask, pert_mask = views(5, [6, 4], [5, 7], dim=3)  # swapped, plain

    def loss(z, z_pert):
        out = siamctc_loss(
            z, z_pert, mask, pert_mask, heads.phi, heads.psi, temperature=0.5, num_negatives=2, min_distance=2,
            generator=torch.Generator().manual_seed(0),
        )
        return out["loss"]

    assert torch.autograd.gradcheck(loss, (z.requires_grad_(), z_pert.requires_grad_()))


def all_terms(out):
    return {k: v.item() for k, v in out.items()}


def test_padding_changes_no_term_and_padded_frames_get_no_gradient():
    heads = Heads(6, 2)
    z, z_pert, _, _ = views(2, [24], [30])
    alone = siamctc_loss(z, z_pert, None, None, heads.phi, heads.psi, generator=torch.Generator().manual_seed(0))
    # the same utterance padded with garbage frames on both views
    z_pad = torch.cat([z, 1e3 * torch.randn(1, 11, 6, dtype=torch.float64)], 1).requires_grad_()
    z_pert_pad = torch.cat([z_pert, -1e3 * torch.randn(1, 5, 6, dtype=torch.float64)], 1).requires_grad_()
    padded = siamctc_loss(
        z_pad, z_pert_pad, padding_mask([24], 35), padding_mask([30], 35), heads.phi, heads.psi,
        generator=torch.Generator().manual_seed(0),
    )
    for name, value in all_terms(alone).items():
        assert padded[name].item() == pytest.approx(value, rel=1e-9, abs=1e-12), name
    padded["loss"].backward()
    assert (z_pad.grad[0, 24:] == 0).all() and (z_pert_pad.grad[0, 30:] == 0).all()

    # in a batch, the mean over utterances equals the mean of each utterance alone
    orig_lengths, pert_lengths = [24, 10, 31], [30, 14, 20]
    z, z_pert, mask, pert_mask = views(3, orig_lengths, pert_lengths)
    batch = siamctc_loss(z, z_pert, mask, pert_mask, heads.phi, heads.psi)
    singles = [
        siamctc_loss(z[b : b + 1, :t], z_pert[b : b + 1, :tp], None, None, heads.phi, heads.psi)
        for b, (t, tp) in enumerate(zip(orig_lengths, pert_lengths))
    ]
    for name in ("ctc", "kld", "blank_share", "slope_error", "path_offset", "swapped_share"):
        assert batch[name].item() == pytest.approx(sum(s[name].item() for s in singles) / 3, rel=1e-6), name
    # changing what lies under the padding changes nothing, TINCE negatives included
    z2, z_pert2 = z.clone(), z_pert.clone()
    z2[mask], z_pert2[pert_mask] = 7.0, -3.0
    first = siamctc_loss(z, z_pert, mask, pert_mask, heads.phi, heads.psi, generator=torch.Generator().manual_seed(9))
    second = siamctc_loss(z2, z_pert2, mask, pert_mask, heads.phi, heads.psi, generator=torch.Generator().manual_seed(9))
    for name, value in all_terms(first).items():
        assert second[name].item() == pytest.approx(value, rel=1e-12), name


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_gradients_are_finite_with_extreme_logits_and_empty_utterances(similarity):
    torch.manual_seed(0)
    phi, psi = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    # utterances: normal, swapped, empty original view, empty perturbed view, one frame each
    orig_lengths, pert_lengths = [40, 30, 0, 12, 1], [44, 20, 10, 0, 1]
    z = (30 * torch.randn(5, 40, 8)).requires_grad_()
    z_pert = (30 * torch.randn(5, 44, 8)).requires_grad_()
    out = siamctc_loss(
        z, z_pert, padding_mask(orig_lengths, 40), padding_mask(pert_lengths, 44), phi, psi,
        temperature=0.05, tince_temperature=0.05, similarity=similarity,
    )
    assert out["num_aligned"].item() == 3
    for name in ("loss", "ctc", "kld", "tince"):
        assert torch.isfinite(out[name]), name
    out["loss"].backward()
    for tensor in (z.grad, z_pert.grad, phi.weight.grad, psi.weight.grad):
        assert torch.isfinite(tensor).all()
    assert z.grad[0].abs().sum() > 0 and (z.grad[2] == 0).all()


def test_a_batch_of_empty_utterances_gives_a_differentiable_zero():
    phi, psi = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    z = torch.randn(2, 3, 4, requires_grad=True)
    out = siamctc_loss(z, torch.randn(2, 5, 4), padding_mask([0, 0], 3), padding_mask([5, 0], 5), phi, psi)
    assert out["loss"].item() == 0 and out["num_aligned"].item() == 0
    out["loss"].backward()
    assert torch.isfinite(z.grad).all()


def test_alignment_statistics_of_hand_made_paths():
    # input 6 frames, 3 classes: an even spread, and all classes in a burst at the end
    path = torch.tensor([[1, 0, 2, 0, 3, 0], [0, 0, 0, 1, 2, 3], [1, 2, 3, -1, -1, -1]])
    stats = alignment_statistics(path, torch.tensor([6, 6, 3]), torch.tensor([3, 3, 3]))
    assert stats["blank_share"].tolist() == pytest.approx([0.5, 0.5, 0.0])
    # least-squares slope of class against frame: 0.5, 1.0 and 1.0, against length ratios 0.5, 0.5, 1.0
    assert stats["slope_error"].tolist() == pytest.approx([0.0, 0.5, 0.0])
    # distance of class c at frame t from the diagonal (t + 0.5) * ratio + 0.5
    assert stats["path_offset"].tolist() == pytest.approx([0.25, (1.25 + 0.75 + 0.25) / 3, 0.0])


def test_bad_arguments_are_named():
    z = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match="similarity"):
        alignment_log_probs(z, z, similarity="l2")
    with pytest.raises(ValueError, match="all 0"):
        siamctc_loss(z, z, None, None, torch.nn.Identity(), torch.nn.Identity(), alpha=0, beta=0, ctc_weight=0)
    with pytest.raises(ValueError, match="padding mask"):
        tince_loss(z, z, torch.zeros(1, 5, dtype=torch.bool))
