"""The ``siamctc`` criterion with a stand-in model that has the SiamCTC model's interface."""

import dataclasses

import pytest
import torch
from fairseq import metrics
from fairseq.criterions import CRITERION_REGISTRY

import fairseq_siamctc  # noqa: F401  (registers the criterion)
from fairseq_siamctc.criterions.siamctc import SiamCTCCriterion, SiamCTCCriterionConfig
from fairseq_siamctc.losses import siamctc_loss

DIM = 8


class StandInModel(torch.nn.Module):
    """Frames in, z out: a linear 'encoder' shared by both views, and the heads phi and psi."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.encoder = torch.nn.Linear(3, DIM)
        self.phi = torch.nn.Linear(DIM, DIM)
        self.psi = torch.nn.Linear(DIM, DIM)
        self.scale = scale

    def forward(self, source, padding_mask, source_pert, padding_mask_pert):
        return {
            "z": self.encoder(source) * self.scale,
            "z_pert": self.encoder(source_pert) * self.scale,
            "z_padding_mask": padding_mask,
            "z_pert_padding_mask": padding_mask_pert,
        }


def make_sample(seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths, pert_lengths = torch.tensor([30, 22, 17]), torch.tensor([36, 18, 17])  # plain, swapped, equal
    return {
        "id": torch.tensor([4, 9, 1]),
        "net_input": {
            "source": torch.randn(3, 30, 3, generator=gen),
            "padding_mask": torch.arange(30)[None, :] >= lengths[:, None],
            "source_pert": torch.randn(3, 36, 3, generator=gen),
            "padding_mask_pert": torch.arange(36)[None, :] >= pert_lengths[:, None],
        },
    }


def make_criterion(**overrides):
    cfg = dataclasses.replace(SiamCTCCriterionConfig(seed=1), **overrides)
    return SiamCTCCriterion.build_criterion(cfg, task=None)


def test_registered_with_the_paper_defaults():
    assert CRITERION_REGISTRY["siamctc"] is SiamCTCCriterion
    cfg = SiamCTCCriterionConfig()
    paper = dict(
        ctc_weight=1.0, alpha=1.0, beta=1.0, temperature=2.0, blank_logit=-1.0, similarity="cosine",
        num_negatives=20, min_distance=5, tince_temperature=0.2,
    )
    assert {name: getattr(cfg, name) for name in paper} == paper
    for f in dataclasses.fields(cfg):
        if f.name != "_name":  # fairseq's own
            assert f.metadata.get("help"), f.name


def test_loss_is_the_objective_times_the_batch_and_logs_every_term():
    model, sample = StandInModel(), make_sample()
    criterion = make_criterion()
    criterion.eval()
    loss, sample_size, log = criterion(model, sample)
    out = model(**sample["net_input"])
    expected = siamctc_loss(
        out["z"], out["z_pert"], out["z_padding_mask"], out["z_pert_padding_mask"], model.phi, model.psi,
        generator=torch.Generator().manual_seed(1),
    )
    assert sample_size == 3
    assert loss.item() == pytest.approx(3 * expected["loss"].item(), rel=1e-6)
    for name in ("ctc", "kld", "tince", "blank_share", "slope_error", "path_offset", "swapped_share"):
        assert log[name].item() == pytest.approx(3 * expected[name].item(), rel=1e-6, abs=1e-7), name
    assert log["ntokens"].item() == 30 + 22 + 17 + 36 + 18 + 17
    loss.backward()
    assert model.encoder.weight.grad.abs().sum() > 0 and model.psi.weight.grad.abs().sum() > 0


def test_terms_can_be_switched_off():
    model, sample = StandInModel(), make_sample(1)
    full = make_criterion()
    full.eval()
    _, _, log = full(model, sample)
    for overrides, kept in (
        (dict(alpha=0.0, beta=0.0), ("ctc",)),
        (dict(beta=0.0), ("ctc", "kld")),
        (dict(alpha=0.0), ("ctc", "tince")),
        (dict(ctc_weight=0.0), ("kld", "tince")),
    ):
        criterion = make_criterion(**overrides)
        criterion.eval()
        model.zero_grad()
        loss, _, partial = criterion(model, sample)
        assert loss.item() == pytest.approx(sum(log[name].item() for name in kept), rel=1e-6), overrides
        for name in ("ctc", "kld", "tince"):  # switched-off terms are still logged
            assert partial[name].item() == pytest.approx(log[name].item(), rel=1e-6)
        loss.backward()
        assert (model.psi.weight.grad is not None and model.psi.weight.grad.abs().sum() > 0) == ("tince" in kept)
    with pytest.raises(ValueError, match="all 0"):
        make_criterion(ctc_weight=0.0, alpha=0.0, beta=0.0)


def test_negatives_are_reproducible_from_the_fairseq_seed_and_fixed_in_validation():
    model, sample = StandInModel(), make_sample(2)
    criterion = make_criterion()
    criterion.train()
    losses = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)  # what fairseq's trainer does before each update
        losses.append(criterion(model, sample)[2]["tince"].item())
    assert losses[0] == losses[1] and losses[0] != losses[2]
    criterion.eval()
    torch.manual_seed(0)
    first = criterion(model, sample)[2]["tince"].item()
    torch.manual_seed(1)
    assert criterion(model, sample)[2]["tince"].item() == first


def test_reduce_metrics_averages_over_utterances():
    model = StandInModel()
    criterion = make_criterion()
    criterion.eval()
    logs = [criterion(model, make_sample(seed))[2] for seed in (3, 4)]
    with metrics.aggregate() as agg:
        SiamCTCCriterion.reduce_metrics(logs)
    assert SiamCTCCriterion.logging_outputs_can_be_summed()
    for name in ("loss", "ctc", "kld", "tince", "blank_share", "slope_error", "path_offset", "swapped_share"):
        expected = (logs[0][name] + logs[1][name]).item() / 6
        assert agg.get_smoothed_value(name) == pytest.approx(expected, abs=1e-4), name


def test_non_finite_term_raises_naming_it():
    model, sample = StandInModel(scale=float("nan")), make_sample()
    with pytest.raises(FloatingPointError, match="non-finite encoder output"):
        make_criterion()(model, sample)
    model = StandInModel()
    model.phi.weight.data.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=r"non-finite ctc=nan, kld="):
        make_criterion(beta=0.0)(model, sample)
    # a NaN only in a switched-off term does not stop training
    model = StandInModel()
    model.psi.weight.data.fill_(float("nan"))
    loss, _, log = make_criterion(beta=0.0)(model, sample)
    assert torch.isfinite(loss) and torch.isnan(log["tince"])
    with pytest.raises(FloatingPointError, match="tince"):
        make_criterion()(model, sample)


def test_trains_the_real_model_end_to_end(tmp_path):
    from omegaconf import OmegaConf

    from fairseq_siamctc.models.siamctc import SiamCTCModel, SiamCTCModelConfig
    from tiny_checkpoints import tiny_hubert_checkpoint

    tiny_hubert_checkpoint(tmp_path / "hubert_tiny.pt")
    model = SiamCTCModel.build_model(
        OmegaConf.structured(SiamCTCModelConfig(encoder_path=str(tmp_path / "hubert_tiny.pt")))
    ).train()
    gen = torch.Generator().manual_seed(0)
    source, source_pert = torch.randn(2, 16_000, generator=gen), torch.randn(2, 14_000, generator=gen)
    mask, mask_pert = torch.zeros(2, 16_000, dtype=torch.bool), torch.zeros(2, 14_000, dtype=torch.bool)
    mask[1, 12_000:], mask_pert[0, 11_000:] = True, True
    sample = {"id": torch.tensor([0, 1]), "net_input": {
        "source": source, "padding_mask": mask, "source_pert": source_pert, "padding_mask_pert": mask_pert,
    }}
    criterion = make_criterion()
    criterion.train()
    loss, sample_size, log = criterion(model, sample)
    assert sample_size == 2 and torch.isfinite(loss)
    loss.backward()
    for name in ("phi.weight", "psi.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("encoder."))


@pytest.mark.parametrize("setting", ["fp16", "amp"])
@pytest.mark.parametrize("where", ["encoder output", "tince"])
def test_under_loss_scaling_a_non_finite_batch_is_left_to_the_scaler(setting, where, caplog):
    """fp16/AMP: no error; a NaN loss whose gradient is NaN in every trained parameter, which is what
    fairseq's loss scaler needs to see to skip the step and lower the scale (on every rank)."""
    model, sample = StandInModel(scale=float("inf") if where == "encoder output" else 1.0), make_sample()
    if where == "tince":
        model.psi.weight.data.fill_(float("nan"))
    criterion = make_criterion(**{setting: True})
    criterion.train()
    with caplog.at_level("WARNING"):
        loss, sample_size, log = criterion(model, sample)
    assert torch.isnan(loss) and sample_size == 3 and torch.isnan(log["loss"])
    assert f"non-finite {where}" in caplog.text and "1 such batches" in caplog.text
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isnan(p.grad).all(), name
    # validation has no loss scaler: there it still stops
    criterion.eval()
    with pytest.raises(FloatingPointError, match=f"non-finite {where}"):
        criterion(model, sample)


def test_fairseq_fp16_optimizer_skips_the_step_and_lowers_the_scale():
    """The NaN step through fairseq's own memory-efficient fp16 optimizer: OverflowError from its loss
    scaler (what fairseq's trainer catches), scale halved, no weight changed."""
    from omegaconf import OmegaConf
    from fairseq.optim.adam import FairseqAdam
    from fairseq.optim.fp16_optimizer import MemoryEfficientFP16Optimizer

    model, sample = StandInModel(scale=float("inf")), make_sample()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = OmegaConf.create({
        "optimizer": {"_name": "adam", "lr": [1e-3], "adam_betas": "(0.9, 0.999)", "adam_eps": 1e-8,
                      "weight_decay": 0.0, "use_old_adam": False, "fp16_adam_stats": False, "tpu": False},
        "common": {"fp16_init_scale": 128, "fp16_scale_window": None, "fp16_scale_tolerance": 0.0,
                   "threshold_loss_scale": None, "min_loss_scale": 1e-4, "memory_efficient_bf16": False,
                   "bf16": False, "model_parallel_size": 1},
        "distributed_training": {"distributed_world_size": 1},
        "optimization": {"update_freq": [1]},
    })
    params = list(model.parameters())
    optimizer = MemoryEfficientFP16Optimizer(cfg, params, FairseqAdam(cfg.optimizer, params), allow_unsupported=True)
    criterion = make_criterion(fp16=True)
    criterion.train()
    loss, sample_size, _ = criterion(model, sample)
    optimizer.backward(loss)
    optimizer.multiply_grads(1.0 / sample_size)
    with pytest.raises(OverflowError, match="setting loss scale to: 64"):
        optimizer.clip_grad_norm(1.0)
    assert optimizer.scaler.loss_scale == 64.0
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_float16_cosine_logits_of_padded_views_have_finite_gradients():
    """fp16 training pads the views with zero frames before the cosine product; 0 / max(0, eps)
    with an eps that float16 rounds to 0 would make every gradient NaN, and every fp16 step an overflow."""
    from fairseq_siamctc.losses import similarity_matrix

    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, DIM, generator=gen).half()
    keys = torch.randn(2, 5, DIM, generator=gen).half()
    query[0, 4:], keys[1, 3:] = 0, 0  # the padding
    query.requires_grad_(), keys.requires_grad_()
    logits = similarity_matrix(query, keys, "cosine", scale=0.5)
    mask = torch.zeros(2, 6, 5, dtype=torch.bool)
    mask[0, 4:], mask[1, :, 3:] = True, True
    logits.masked_fill(mask, 0.0).float().sum().backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(keys.grad).all()
