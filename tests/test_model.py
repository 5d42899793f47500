"""The siamctc model and the encoder loader: checkpoint detection, features against fairseq's
HubertModel, padding independence, projection and freezing, rebuilding without the base file."""

import argparse

import pytest
import torch
from fairseq import checkpoint_utils
from omegaconf import OmegaConf

import fairseq_siamctc  # noqa: F401  (compat: safe loading of fairseq checkpoints)
from fairseq_siamctc.models.checkpoints import (
    ENCODER_RECORD_KEY,
    CheckpointError,
    label_dictionary,
    read_checkpoint,
)
from fairseq_siamctc.models.encoders import encoder_features, load_encoder
from fairseq_siamctc.models.siamctc import SiamCTCModel, SiamCTCModelConfig
from tiny_checkpoints import km_dictionary, tiny_hubert_checkpoint, tiny_wavlm_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def hubert_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("hubert") / "hubert_tiny.pt"
    tiny_hubert_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def fairseq_hubert(hubert_path):
    """The checkpoint loaded by fairseq's own loader: the independent reference."""
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([str(hubert_path)])
    assert cfg.model._name == "hubert"
    return models[0].eval()


def siamctc_model(path, **cfg) -> SiamCTCModel:
    return SiamCTCModel.build_model(OmegaConf.structured(SiamCTCModelConfig(encoder_path=str(path), **cfg)))


def waves(*lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=generator) for n in lengths]


def pad(utterances):
    length = max(len(u) for u in utterances)
    source = torch.zeros(len(utterances), length)
    mask = torch.ones(len(utterances), length, dtype=torch.bool)
    for i, u in enumerate(utterances):
        source[i, : len(u)], mask[i, : len(u)] = u, False
    return source, mask


@pytest.mark.parametrize("layer", [None, 1, 2])
def test_features_equal_fairseq_hubert(hubert_path, fairseq_hubert, layer):
    record, encoder = load_encoder(read_checkpoint(hubert_path))
    assert record["kind"] == "hubert"
    source = waves(12_345)[0][None]
    with torch.no_grad():
        ours, mask = encoder_features(encoder.eval(), source, output_layer=layer)
        ref, _ = fairseq_hubert.extract_features(source, padding_mask=None, mask=False, output_layer=layer)
    assert mask is None
    assert ours.shape == ref.shape == (1, 38, 48)
    assert (ours - ref).abs().max() <= 1e-5


def test_padded_batch_equals_each_utterance_alone(hubert_path, fairseq_hubert):
    _, encoder = load_encoder(read_checkpoint(hubert_path))
    utterances = waves(7_000, 16_000, 11_111, seed=1)
    source, sample_mask = pad(utterances)
    with torch.no_grad():
        ours, frame_mask = encoder_features(encoder.eval(), source, sample_mask, output_layer=1)
        fairseq_padded, _ = fairseq_hubert.extract_features(source, padding_mask=sample_mask, output_layer=1)
        for i, u in enumerate(utterances):
            alone, _ = fairseq_hubert.extract_features(u[None], output_layer=1)
            frames = alone.size(1)
            assert int((~frame_mask[i]).sum()) == frames and not frame_mask[i, :frames].any()
            assert (ours[i, :frames] - alone[0]).abs().max() <= 1e-5
            if len(u) < source.size(1):
                # fairseq's group norm sees the padding: the reason for the padding-aware forward
                assert (fairseq_padded[i, :frames] - alone[0]).abs().max() > 1e-3


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nothing.pt"):
        read_checkpoint(tmp_path / "nothing.pt")


def test_checkpoint_of_another_model_is_named(hubert_path, tmp_path):
    state = torch.load(hubert_path)
    state["cfg"]["model"]["_name"] = "wav2vec_ctc"
    torch.save(state, tmp_path / "ctc.pt")
    with pytest.raises(CheckpointError, match="found a fairseq checkpoint of model 'wav2vec_ctc'"):
        read_checkpoint(tmp_path / "ctc.pt")
    with pytest.raises(CheckpointError, match="found a fairseq checkpoint of model 'wav2vec_ctc'"):
        siamctc_model(tmp_path / "ctc.pt")


def test_truncated_and_foreign_files_are_clear_errors(hubert_path, tmp_path):
    data = hubert_path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt: not a checkpoint: truncated or corrupt file"):
        read_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("hello\n")
    with pytest.raises(CheckpointError, match="text.pt: not a checkpoint"):
        read_checkpoint(tmp_path / "text.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match="found a dict with keys 'weights'"):
        read_checkpoint(tmp_path / "dict.pt")


def test_label_sets_rebuilt_without_task_state(hubert_path, fairseq_hubert, tmp_path):
    state = torch.load(hubert_path)
    del state["task_state"]
    torch.save(state, tmp_path / "no_task_state.pt")
    record, encoder = load_encoder(read_checkpoint(tmp_path / "no_task_state.pt"))
    assert record["label_set_sizes"] == [24]  # 20 k-means units + fairseq's 4 special symbols
    assert label_dictionary(24) == km_dictionary(20)
    assert torch.equal(encoder.label_embs_concat, fairseq_hubert.label_embs_concat)


def test_projection_is_hubert_final_proj_when_it_maps_to_256(hubert_path, tmp_path):
    model = siamctc_model(hubert_path)
    assert model.uses_encoder_projection and model.projection is None
    x = torch.randn(3, 48)
    assert torch.equal(model.project(x), model.encoder.final_proj(x))
    assert (model.phi.in_features, model.phi.out_features, model.psi.in_features) == (256, 256, 256)

    tiny_hubert_checkpoint(tmp_path / "final16.pt", final_dim=16)
    model = siamctc_model(tmp_path / "final16.pt")
    assert not model.uses_encoder_projection
    assert (model.projection.in_features, model.projection.out_features) == (48, 256)
    assert not model.encoder.final_proj.weight.requires_grad  # unused: left as it was


@pytest.mark.parametrize("views_in_one_pass", [False, True])
def test_forward_batches_both_views_like_separate_utterances(hubert_path, views_in_one_pass):
    model = siamctc_model(hubert_path, feature_layer=1, views_in_one_pass=views_in_one_pass).eval()
    source, mask = pad(waves(9_000, 12_000, seed=2))
    source_pert, mask_pert = pad(waves(15_000, 6_000, seed=3))
    with torch.no_grad():
        out = model(source, mask, source_pert, mask_pert)
        assert out["z"].shape == (2, 37, 256) and out["z_pert"].shape == (2, 46, 256)
        for view, padded in (("z", mask), ("z_pert", mask_pert)):
            sources = source if view == "z" else source_pert
            for i in range(2):
                length = int((~padded[i]).sum())
                alone, _ = model.features(sources[i : i + 1, :length])
                frames = alone.size(1)
                view_mask = out[f"{view}_padding_mask"][i]
                assert not view_mask[:frames].any() and view_mask[frames:].all()
                assert (out[view][i, :frames] - alone[0]).abs().max() <= 1e-5
        # layer 1 output through final_proj
        ref, _ = encoder_features(model.encoder, source_pert[1:, :6_000], output_layer=1)
        assert torch.allclose(model.project(ref), out["z_pert"][1, :18], atol=1e-5)
    unpadded = model(source[:, :9_000], None, source_pert, None)
    assert unpadded["z_padding_mask"] is None and unpadded["z_pert_padding_mask"] is None
    assert unpadded["z"].shape == (2, 27, 256)


@pytest.mark.parametrize("kind", ["hubert", "wavlm"])
def test_views_pass_apart_and_drop_the_same_layers(tmp_path, kind):
    """One pass per view, each padded to its own length, with the same layers dropped in both."""
    write = tiny_hubert_checkpoint if kind == "hubert" else tiny_wavlm_checkpoint
    write(tmp_path / "base.pt", encoder_layers=4)
    model = siamctc_model(tmp_path / "base.pt", encoder_layerdrop=0.5).train()
    assert model.encoder.encoder.layerdrop == 0.5
    calls = []  # (layer index, rows x frames of its input)
    for index, layer in enumerate(model.encoder.encoder.layers):
        layer.register_forward_pre_hook(lambda _, args, index=index: calls.append((index, args[0].numel() // args[0].size(-1))))
    source, mask = pad(waves(9_000, 12_000, seed=5))
    source_pert, mask_pert = pad(waves(15_000, 7_000, seed=6))
    kept_sets = set()
    with torch.no_grad():
        for _ in range(12):
            calls.clear()
            out = model(source, mask, source_pert, mask_pert)
            frames, frames_pert = out["z"].size(1), out["z_pert"].size(1)
            assert (frames, frames_pert) == (37, 46)
            first, second = calls[: len(calls) // 2], calls[len(calls) // 2:]
            assert [i for i, _ in first] == [i for i, _ in second]
            # the shorter view's pass is not padded to the longer view (fairseq pads to an even frame count)
            assert all(size <= 2 * (frames + 1) for _, size in first)
            assert all(size >= 2 * frames_pert for _, size in second)
            kept_sets.add(tuple(i for i, _ in first))
    assert len(kept_sets) > 1  # layer drop was on: the test could see different layers dropped


def test_gradients_reach_only_the_trained_parts(hubert_path):
    model = siamctc_model(hubert_path, freeze_layers=1).train()
    source, mask = pad(waves(8_000, 6_000, seed=4))
    out = model(source, mask, source[:, :7_000], mask[:, :7_000])
    (out["z"].pow(2).sum() + out["z_pert"].pow(2).sum()).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, grad in grads.items():
        frozen = name.startswith(("encoder.feature_extractor.", "encoder.encoder.layers.0.", "encoder.post_extract_proj",
                                  "encoder.layer_norm.", "encoder.encoder.pos_conv", "encoder.encoder.layer_norm."))
        frozen |= name in ("encoder.label_embs_concat", "encoder.mask_emb", "phi.weight", "phi.bias", "psi.weight", "psi.bias")
        assert (grad is None) == frozen, name
        if not frozen:
            assert grad.abs().sum() > 0, name
    assert not any(p.requires_grad for p in model.encoder.feature_extractor.parameters())
    assert model.phi.weight.requires_grad and model.psi.weight.requires_grad  # trained by the criterion


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_layers_above_the_feature_layer_are_frozen(tmp_path, layer_norm_first):
    tiny_hubert_checkpoint(tmp_path / "base.pt", layer_norm_first=layer_norm_first)
    model = siamctc_model(tmp_path / "base.pt", feature_layer=1).train()
    source, mask = pad(waves(8_000, 6_000, seed=9))
    out = model(source, mask, source, mask)
    (out["z"].pow(2).sum() + out["z_pert"].pow(2).sum()).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.encoder.layers[1].parameters())
    assert all(p.grad is not None for p in model.encoder.encoder.layers[0].parameters())
    final_norm = model.encoder.encoder.layer_norm.weight
    assert final_norm.requires_grad == (not layer_norm_first) and (final_norm.grad is None) == layer_norm_first


def test_rebuilt_from_its_own_checkpoint_without_the_base_file(tmp_path):
    base = tmp_path / "base.pt"
    tiny_hubert_checkpoint(base, seed=5)
    model = siamctc_model(base, feature_layer=1, dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    state = {
        "args": None,
        "cfg": {"model": OmegaConf.to_container(model.cfg), "task": {"_name": "siamctc"}},
        "model": model.state_dict(),
        "optimizer_history": [{"criterion_name": "SiamCTCCriterion", "num_updates": 3}],
    }
    state["cfg"]["model"]["_name"] = "siamctc"
    torch.save(state, tmp_path / "siamctc.pt")
    base.unlink()
    checkpoint = read_checkpoint(tmp_path / "siamctc.pt")
    assert checkpoint.kind == "siamctc" and checkpoint.model[ENCODER_RECORD_KEY]["kind"] == "hubert"
    rebuilt = SiamCTCModel.from_checkpoint(checkpoint).eval()
    assert rebuilt.cfg.feature_layer == 1 and rebuilt.cfg.dropout == 0.0
    source = waves(5_000, seed=6)[0][None]
    with torch.no_grad():
        assert torch.equal(rebuilt.features(source)[0], model.eval().features(source)[0])


def test_wavlm_encoder(tmp_path):
    reference = tiny_wavlm_checkpoint(tmp_path / "wavlm.pt")
    model = siamctc_model(tmp_path / "wavlm.pt").eval()
    assert model.record["kind"] == "wavlm" and not model.uses_encoder_projection
    assert (model.projection.in_features, model.projection.out_features) == (32, 256)
    source, mask = pad(waves(8_000, 5_000, seed=7))
    with torch.no_grad():
        out = model(source, mask, source[:, :6_000], mask[:, :6_000])
        alone, _ = reference.extract_features(source[1:, :5_000], output_layer=None)
        assert torch.allclose(out["z"][1, : alone.size(1)], model.project(alone[0]), atol=1e-5)
    assert out["z_padding_mask"][1].sum() == out["z"].size(1) - alone.size(1)


def test_task_normalisation_must_match_the_base_checkpoint(hubert_path):
    class Task:
        cfg = OmegaConf.create({"normalize": True})

    cfg = OmegaConf.structured(SiamCTCModelConfig(encoder_path=str(hubert_path)))
    with pytest.raises(ValueError, match="task.normalize=True but .* was trained without waveform normalisation"):
        SiamCTCModel.build_model(cfg, Task())
    Task.cfg.normalize = False
    assert SiamCTCModel.build_model(cfg, Task()).normalize_audio is False


def test_pre_hydra_checkpoint_with_an_args_namespace(hubert_path, fairseq_hubert, tmp_path):
    state = torch.load(hubert_path)
    cfg = state.pop("cfg")
    fields = {k: v for section in ("task", "model") for k, v in cfg[section].items() if k != "_name"}
    state["args"] = argparse.Namespace(**fields, arch="hubert", task="hubert_pretraining", criterion="hubert")
    state["cfg"] = None
    torch.save(state, tmp_path / "old.pt")
    checkpoint = read_checkpoint(tmp_path / "old.pt")
    assert checkpoint.kind == "hubert"
    _, encoder = load_encoder(checkpoint)
    source = waves(6_000, seed=8)[0][None]
    with torch.no_grad():
        assert (encoder_features(encoder.eval(), source)[0] - fairseq_hubert.extract_features(source)[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("cfg, message", [
    ({"feature_layer": 3}, "feature_layer must be between 1 and 2"),
    ({"freeze_layers": 5}, "freeze_layers must be between 0 and 2"),
    ({"freeze_layers": 1, "freeze_feature_extractor": False}, "needs model.freeze_feature_extractor=true"),
])
def test_bad_model_settings_are_clear_errors(hubert_path, cfg, message):
    with pytest.raises(ValueError, match=message):
        siamctc_model(hubert_path, **cfg)
