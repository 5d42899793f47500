"""wavlm_ctc: a WavLM checkpoint fine-tuned with fairseq's stock audio_finetuning task and ctc criterion."""

import types

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary
from omegaconf import OmegaConf

import fairseq_siamctc  # noqa: F401
from conftest import CPU_OVERRIDES, FAIRSEQ_DIR, PLUGIN_DIR, run_fairseq
from fairseq_siamctc.models.wavlm import WavLM, WavLMConfig
from fairseq_siamctc.models.wavlm_ctc import WavLMCtc, WavLMCtcConfig

torch.set_num_threads(1)

# 320x downsampling like WavLM Base (50 frames a second), tiny widths.
TINY_WAVLM = dict(
    encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=48, encoder_attention_heads=4,
    conv_feature_layers="[(16,10,5)] + [(16,3,2)] * 4 + [(16,2,2)] * 2", conv_pos=8, conv_pos_groups=4,
    num_buckets=16, max_distance=40, feature_grad_mult=0.1, dropout=0.1, encoder_layerdrop=0.05,
    mask_prob=0.8, layer_wise_gradient_decay_ratio=1.0,  # a key this implementation does not know
)


def save_tiny_wavlm(path, normalize=False, seed=0):
    torch.manual_seed(seed)
    cfg = {**TINY_WAVLM, "normalize": normalize}
    model = WavLM(cfg)
    torch.save({"cfg": {**WavLMConfig.from_dict(cfg).to_dict(), **cfg}, "model": model.state_dict()}, path)
    return model


def letters_task(n_letters=5):
    dictionary = Dictionary()
    for letter in "|ABCD"[:n_letters]:
        dictionary.add_symbol(letter)
    return types.SimpleNamespace(source_dictionary=None, target_dictionary=dictionary)


def ctc_cfg(w2v_path, **overrides):
    values = dict(w2v_path=str(w2v_path), normalize=False, data="unused", dropout=0.0, attention_dropout=0.0,
                  mask_prob=0.5, mask_length=2, layerdrop=0.0, feature_grad_mult=0.0)
    values.update(overrides)
    return OmegaConf.structured(WavLMCtcConfig(**values))


def test_build_loads_the_checkpoint_and_applies_finetuning_settings(tmp_path):
    pretrained = save_tiny_wavlm(tmp_path / "wavlm.pt")
    cfg = ctc_cfg(tmp_path / "wavlm.pt")
    model = WavLMCtc.build_model(cfg, letters_task())
    encoder = model.w2v_encoder.w2v_model
    for name, value in pretrained.state_dict().items():
        torch.testing.assert_close(encoder.state_dict()[name], value)
    assert encoder.cfg.dropout == 0.0 and encoder.cfg.mask_prob == 0.5 and encoder.cfg.mask_length == 2
    assert encoder.cfg.encoder_layerdrop == 0.0 and encoder.feature_grad_mult == 0.0
    assert cfg.w2v_args["encoder_embed_dim"] == 32  # kept, so that a fine-tuned checkpoint reloads alone
    assert model.w2v_encoder.proj.out_features == len(letters_task().target_dictionary)


def test_no_pretrained_weights_and_normalize_mismatch(tmp_path):
    pretrained = save_tiny_wavlm(tmp_path / "wavlm.pt")
    model = WavLMCtc.build_model(ctc_cfg(tmp_path / "wavlm.pt", no_pretrained_weights=True), letters_task())
    name = "encoder.layers.0.self_attn.relative_attention_bias.weight"
    assert not torch.equal(model.w2v_encoder.w2v_model.state_dict()[name], pretrained.state_dict()[name])
    with pytest.raises(ValueError, match="task.normalize=True.*normalize=False"):
        WavLMCtc.build_model(ctc_cfg(tmp_path / "wavlm.pt", normalize=True), letters_task())
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        WavLMCtc.build_model(ctc_cfg(tmp_path / "missing.pt"), letters_task())


def test_forward_gives_time_major_logits_with_frame_padding(tmp_path):
    save_tiny_wavlm(tmp_path / "wavlm.pt")
    model = WavLMCtc.build_model(ctc_cfg(tmp_path / "wavlm.pt"), letters_task()).eval()
    source = torch.randn(2, 16000)
    padding = torch.zeros(2, 16000, dtype=torch.bool)
    padding[1, 8000:] = True
    with torch.no_grad():
        out = model(source=source, padding_mask=padding)
        alone = model(source=source[1:, :8000], padding_mask=None)
    assert out["encoder_out"].shape == (49, 2, 9)  # 1 s: 49 frames; 5 letters + 4 fairseq specials
    assert out["padding_mask"].sum(-1).tolist() == [0, 49 - 24]
    torch.testing.assert_close(out["encoder_out"][:24, 1], alone["encoder_out"][:, 0], atol=1e-5, rtol=1e-5)
    probs = model.get_normalized_probs(out, log_probs=False)
    torch.testing.assert_close(probs.sum(-1), torch.ones(49, 2))
    torch.testing.assert_close(probs[:, 0], torch.softmax(out["encoder_out"][:, 0], -1))  # unpadded: untouched
    torch.testing.assert_close(probs[:24, 1], torch.softmax(out["encoder_out"][:24, 1], -1))
    assert (probs[24:, 1, 0] == 1).all() and (probs[24:, 1, 1:] == 0).all()  # padding: certain blank
    assert torch.isfinite(out["encoder_out"]).all()  # the network output itself is left as it was


def test_encoder_is_frozen_for_freeze_finetune_updates(tmp_path):
    save_tiny_wavlm(tmp_path / "wavlm.pt")
    model = WavLMCtc.build_model(ctc_cfg(tmp_path / "wavlm.pt", freeze_finetune_updates=3), letters_task())
    layer_weight = model.w2v_encoder.w2v_model.encoder.layers[0].fc1.weight
    for updates, trains_encoder in ((2, False), (3, True)):
        model.zero_grad()
        model.set_num_updates(updates)
        model(source=torch.randn(1, 4000), padding_mask=None)["encoder_out"].sum().backward()
        assert model.w2v_encoder.proj.weight.grad is not None
        assert (layer_weight.grad is not None) == trains_encoder


def test_stock_audio_finetuning_with_ctc_trains_and_reloads(audio_corpus, tmp_path):
    pretrained = save_tiny_wavlm(tmp_path / "wavlm.pt")
    run_dir = tmp_path / "finetune"
    proc = run_fairseq("fairseq-hydra-train", [
        "--config-dir", FAIRSEQ_DIR / "examples/wav2vec/config/finetuning", "--config-name", "base_10h",
        f"common.user_dir={PLUGIN_DIR}", f"task.data={audio_corpus}", "model._name=wavlm_ctc",
        f"model.w2v_path={tmp_path / 'wavlm.pt'}", f"hydra.run.dir={run_dir}", "dataset.valid_subset=valid",
        "dataset.max_tokens=100000", "optimization.max_update=2", "optimization.update_freq=[1]",
        "model.freeze_finetune_updates=0", "dataset.validate_after_updates=0", "++model.mask_length=2",
        "model.mask_channel_length=4", *CPU_OVERRIDES,
    ], cwd=tmp_path)
    assert '"num_updates": "2"' in proc.stdout + proc.stderr

    (tmp_path / "wavlm.pt").unlink()  # the fine-tuned checkpoint must reload on its own
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(run_dir / "checkpoints" / "checkpoint_last.pt")], arg_overrides={"data": str(audio_corpus)}
    )
    model = models[0].eval()
    assert cfg.model._name == "wavlm_ctc" and isinstance(model, WavLMCtc)
    fine_tuned = model.w2v_encoder.w2v_model.state_dict()
    conv = "feature_extractor.conv_layers.0.0.weight"  # frozen by feature_grad_mult=0: still the pretrained one
    torch.testing.assert_close(fine_tuned[conv], pretrained.state_dict()[conv])
    trained = "encoder.layers.1.fc2.weight"
    assert not torch.equal(fine_tuned[trained], pretrained.state_dict()[trained])
    with torch.no_grad():
        out = model(source=torch.randn(1, 16000), padding_mask=None)
    assert out["encoder_out"].shape == (49, 1, len(task.target_dictionary))
    assert torch.isfinite(out["encoder_out"]).all()
