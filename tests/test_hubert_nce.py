"""hubert_nce: HuBERT's logits as one matrix product, against fairseq's own compute_nce."""

import types

import pytest
import torch

import fairseq_siamctc  # noqa: F401  (applies the routing)
from fairseq.models.hubert.hubert import HubertModel
from fairseq_siamctc import hubert_nce
from tiny_checkpoints import tiny_hubert_checkpoint

# A cosine of D = 64 float32 terms rounds to within about D * 2^-24 = 4e-6 (|cos| <= 1); the
# temperature 0.1 scales that to 4e-5, so 1e-4 separates rounding from a wrong formula.
LOGIT_TOLERANCE = 1e-4


def labelled_frames(frames=40, dims=64, classes=12, temperature=0.1):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(frames, dims, generator=generator)
    label_embs = torch.randn(classes, dims, generator=generator)
    label_embs[5] = label_embs[2]  # a duplicated embedding: fairseq masks both columns
    targets = torch.randint(0, classes, (frames,), generator=generator)
    targets[:3] = 2
    return x, label_embs, targets, types.SimpleNamespace(logit_temp=temperature)


def fairseq_logits(x, label_embs, targets, model):
    pos = label_embs[targets]
    negs = label_embs.unsqueeze(1).expand(-1, x.size(0), -1)
    return hubert_nce.FAIRSEQ_COMPUTE_NCE(model, x, pos, negs)


def product_logits(x, label_embs, targets, model):
    return hubert_nce.cosine_logits(x, label_embs[targets], label_embs, model.logit_temp)


def test_cosine_logits_equal_fairseq_values_masks_and_gradients():
    x, label_embs, targets, model = labelled_frames()
    weights = torch.randn(x.size(0), label_embs.size(0) + 1, generator=torch.Generator().manual_seed(1))
    results = []
    for compute in (fairseq_logits, product_logits):
        x_, label_embs_ = x.clone().requires_grad_(), label_embs.clone().requires_grad_()
        logits = compute(x_, label_embs_, targets, model)
        finite = torch.isfinite(logits)
        (logits[finite] * weights[finite]).sum().backward()
        results.append((logits.detach(), finite, x_.grad, label_embs_.grad))
    (reference, reference_finite, *reference_grads), (fast, fast_finite, *fast_grads) = results
    assert fast.shape == (40, 13)
    assert torch.equal(fast_finite, reference_finite)
    # -inf exactly where the class embedding is the target's: its own class and its duplicate
    assert not fast_finite[:3, 1 + 2].any() and not fast_finite[:3, 1 + 5].any()
    assert (~fast_finite).sum(1).min() >= 1
    torch.testing.assert_close(fast[fast_finite], reference[reference_finite], atol=LOGIT_TOLERANCE, rtol=0)
    for fast_grad, reference_grad in zip(fast_grads, reference_grads):
        torch.testing.assert_close(fast_grad, reference_grad, atol=1e-3, rtol=1e-4)


def test_materialised_negatives_go_to_fairseq(monkeypatch):
    x, label_embs, targets, model = labelled_frames()
    monkeypatch.setattr(hubert_nce, "cosine_logits", pytest.fail)
    negs = label_embs.unsqueeze(1).expand(-1, x.size(0), -1).contiguous()  # as target_glu leaves them
    logits = hubert_nce._compute_nce(model, x, label_embs[targets], negs)
    assert torch.equal(logits, fairseq_logits(x, label_embs, targets, model))


def test_hubert_forward_takes_the_product_and_matches_fairseq(tmp_path, monkeypatch):
    model = tiny_hubert_checkpoint(tmp_path / "hubert.pt", n_units=20)  # eval mode: no dropout
    source = torch.randn(2, 16_000, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 20, (2, 50), generator=torch.Generator().manual_seed(3))
    calls = []
    product = hubert_nce.cosine_logits
    monkeypatch.setattr(hubert_nce, "cosine_logits", lambda *a, **k: calls.append(1) or product(*a, **k))

    def every_third_frame_masked(self, x, padding_mask, target_list):
        # fairseq draws the spans from fresh entropy; both passes need the same ones
        mask_indices = torch.zeros(x.shape[:2], dtype=torch.bool)
        mask_indices[:, ::3] = True
        x = x.clone()
        x[mask_indices] = self.mask_emb
        return x, mask_indices

    monkeypatch.setattr(HubertModel, "apply_mask", every_third_frame_masked)

    def forward():
        with torch.no_grad():
            return model(source, target_list=[labels], padding_mask=torch.zeros_like(source, dtype=torch.bool))

    fast = forward()
    assert len(calls) == 2  # masked and unmasked frames
    monkeypatch.setattr(HubertModel, "compute_nce", hubert_nce.FAIRSEQ_COMPUTE_NCE)
    reference = forward()
    for key in ("logit_m_list", "logit_u_list"):
        fast_logits, reference_logits = fast[key][0], reference[key][0]
        assert fast_logits.shape == reference_logits.shape and fast_logits.size(1) == 1 + model.num_classes[0]
        assert torch.equal(torch.isinf(fast_logits), torch.isinf(reference_logits))
        finite = torch.isfinite(reference_logits)
        torch.testing.assert_close(fast_logits[finite], reference_logits[finite], atol=LOGIT_TOLERANCE, rtol=0)
