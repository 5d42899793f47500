"""hubert_nce: HuBERT's logits as one matrix product, against fairseq's own compute_nce."""

import types

import pytest
import torch
from omegaconf import OmegaConf

import fairseq_siamctc  # noqa: F401  (applies the routing)
from fairseq.models.hubert import HubertConfig, HubertModel
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
from fairseq_siamctc import hubert_nce
from tiny_checkpoints import km_dictionary, tiny_hubert_model_cfg

# A cosine of D = 64 float32 terms rounds to within about D * 2^-24 = 4e-6 (|cos| <= 1); the
# temperature 0.1 scales that to 4e-5, so 1e-4 separates rounding from a wrong formula.
LOGIT_TOLERANCE = 1e-4


def labelled_frames(frames=40, dims=64, classes=12, temperature=0.1):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(frames, dims, generator=generator)
    label_embs = torch.randn(classes, dims, generator=generator)
    label_embs[5] = label_embs[2]  # a duplicated embedding: fairseq masks both columns
    label_embs[7, :8] = label_embs[2, :8]  # equal at first, not in every element: not masked
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
    # each gradient element sums 13 logits' terms of size up to 10 |weight| / |vector|, each off by
    # the logits' rounding: 1e-3 absolute is two orders above that and far below a wrong formula
    for fast_grad, reference_grad in zip(fast_grads, reference_grads):
        torch.testing.assert_close(fast_grad, reference_grad, atol=1e-3, rtol=1e-4)


def test_cosine_logits_stay_float32_under_autocast():
    x, label_embs, targets, model = labelled_frames()
    plain = product_logits(x, label_embs, targets, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = product_logits(x, label_embs, targets, model)
    # a bfloat16 product (8 bits of mantissa) would be off by about 1e-2 / 0.1 = 0.1
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, atol=LOGIT_TOLERANCE, rtol=0)


def test_equal_rows_against_brute_force():
    generator = torch.Generator().manual_seed(4)
    a = torch.randint(0, 2, (30, 6), generator=generator).float()  # many repeated and near rows
    b = torch.cat([a[::3], torch.randint(0, 2, (10, 6), generator=generator).float()])
    b[0, -1] = float("nan")
    brute_force = torch.tensor([[bool((a[i] == b[j]).all()) for j in range(len(b))] for i in range(len(a))])
    assert brute_force.any() and not brute_force.all()
    assert torch.equal(hubert_nce.equal_rows(a, b, head=2), brute_force)


def test_materialised_negatives_go_to_fairseq(monkeypatch):
    x, label_embs, targets, model = labelled_frames()
    monkeypatch.setattr(hubert_nce, "cosine_logits", pytest.fail)
    negs = label_embs.unsqueeze(1).expand(-1, x.size(0), -1).contiguous()  # as target_glu leaves them
    logits = hubert_nce._compute_nce(model, x, label_embs[targets], negs)
    assert torch.equal(logits, fairseq_logits(x, label_embs, targets, model))


def two_label_set_hubert():
    """A tiny HuBERT predicting two label sets (24 and 16 classes): the second set's embeddings sit
    at an offset in the one parameter that holds both."""
    torch.manual_seed(0)
    cfg = OmegaConf.merge(OmegaConf.structured(HubertConfig),
                          {k: v for k, v in tiny_hubert_model_cfg().items() if k != "_name"})
    task_cfg = OmegaConf.structured(HubertPretrainingConfig(data="unused", labels=["a", "b"], label_rate=50))
    return HubertModel(cfg, task_cfg, [km_dictionary(20), km_dictionary(12)]).eval()  # eval: no dropout


def test_hubert_forward_takes_the_product_and_matches_fairseq(monkeypatch):
    model = two_label_set_hubert()
    source = torch.randn(2, 16_000, generator=torch.Generator().manual_seed(2))
    labels = [torch.randint(4, 24, (2, 50), generator=torch.Generator().manual_seed(3)),
              torch.randint(4, 16, (2, 50), generator=torch.Generator().manual_seed(4))]
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

    def forward_backward():
        model.zero_grad(set_to_none=True)
        result = model(source, target_list=labels, padding_mask=torch.zeros_like(source, dtype=torch.bool))
        logits = torch.cat([torch.cat(result[key], 1) for key in ("logit_m_list", "logit_u_list")])
        finite = torch.isfinite(logits)
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4))
        (logits[finite] * weights[finite]).sum().backward()
        # the class embeddings reach the logits through views of one parameter: check the route
        return logits.detach(), model.label_embs_concat.grad, model.final_proj.weight.grad

    fast = forward_backward()
    assert len(calls) == 4  # masked and unmasked frames of each label set
    monkeypatch.setattr(HubertModel, "compute_nce", hubert_nce.FAIRSEQ_COMPUTE_NCE)
    reference = forward_backward()
    (fast_logits, *fast_grads), (reference_logits, *reference_grads) = fast, reference
    assert fast_logits.shape == reference_logits.shape and fast_logits.size(1) == (1 + 24) + (1 + 16)
    assert torch.equal(torch.isinf(fast_logits), torch.isinf(reference_logits))
    finite = torch.isfinite(reference_logits)
    torch.testing.assert_close(fast_logits[finite], reference_logits[finite], atol=LOGIT_TOLERANCE, rtol=0)
    for fast_grad, reference_grad in zip(fast_grads, reference_grads):
        assert reference_grad.abs().max() > 0
        torch.testing.assert_close(fast_grad, reference_grad, rtol=1e-4, atol=1e-4 * reference_grad.abs().max().item())
