"""Round trip: tiny base checkpoint -> siamctc training through fairseq-hydra-train -> siamctc-export ->
reload with the base model's own loader -> fairseq's stock CTC fine-tuning; the same from and back to a
Hugging Face directory (transformers' own from_pretrained as the reference), s3prl's converted layout,
safe outputs; and siamctc-extract-features.

Training uses the plugin's own ``siamctc`` task and criterion, found through ``common.user_dir``."""

import pathlib

import numpy as np
import pytest
import soundfile as sf
import torch
from fairseq import checkpoint_utils
from omegaconf import OmegaConf

import fairseq_siamctc  # noqa: F401
from conftest import CPU_OVERRIDES, PLUGIN_DIR, run_fairseq, write_audio_corpus
from fairseq_siamctc.cli import export, extract_features
from fairseq_siamctc.models.checkpoints import CheckpointError, read_checkpoint
from fairseq_siamctc.models.encoders import encoder_features
from fairseq_siamctc.models.siamctc import SiamCTCModel
from fairseq_siamctc.models.wavlm import WavLM, read_wavlm_checkpoint
from test_formats import hf_model, s3prl_style_load
from tiny_checkpoints import tiny_hubert_checkpoint, tiny_wavlm_checkpoint

torch.set_num_threads(1)

def write_config(path, cfg: dict) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), path / "run.yaml")
    return path


def train_siamctc(corpus, base, run_dir, updates=3) -> pathlib.Path:
    """A few SiamCTC updates on the tiny corpus; returns checkpoint_last.pt."""
    config = write_config(run_dir / "config", {
        "common": {"user_dir": str(PLUGIN_DIR), "seed": 1, "log_format": "json"},
        "checkpoint": {"save_dir": str(run_dir / "checkpoints"), "no_epoch_checkpoints": True},
        "task": {"_name": "siamctc", "data": str(corpus), "max_sample_size": 16000, "min_sample_size": 8000},
        "dataset": {"batch_size": 3, "disable_validation": True},
        "criterion": {"_name": "siamctc"},
        "optimization": {"max_update": updates, "lr": [1e-3], "clip_norm": 1.0},
        "optimizer": {"_name": "adam", "weight_decay": 0.01},
        "lr_scheduler": {"_name": "polynomial_decay", "warmup_updates": 1, "total_num_update": updates},
        "model": {"_name": "siamctc", "encoder_path": str(base)},
    })
    proc = run_fairseq("fairseq-hydra-train", [
        "--config-dir", config, "--config-name", "run", f"hydra.run.dir={run_dir}", *CPU_OVERRIDES,
    ], cwd=run_dir)
    assert f'"num_updates": "{updates}"' in proc.stdout + proc.stderr
    return run_dir / "checkpoints" / "checkpoint_last.pt"


def finetune_ctc(corpus, model_cfg: dict, run_dir):
    """fairseq's stock CTC fine-tuning (audio_finetuning task, ctc criterion) for 2 updates."""
    config = write_config(run_dir / "config", {
        "common": {"user_dir": str(PLUGIN_DIR), "seed": 1, "log_format": "json"},
        "checkpoint": {"save_dir": str(run_dir / "checkpoints"), "no_epoch_checkpoints": True},
        "task": {"_name": "audio_finetuning", "data": str(corpus), "labels": "ltr", "normalize": False},
        "dataset": {"max_tokens": 100000, "validate_after_updates": 0, "valid_subset": "valid"},
        "criterion": {"_name": "ctc", "zero_infinity": True},
        "optimization": {"max_update": 2, "lr": [1e-4], "sentence_avg": True},
        "optimizer": {"_name": "adam"},
        "lr_scheduler": {"_name": "fixed"},
        "model": {"freeze_finetune_updates": 0, "mask_length": 2, "mask_channel_length": 4, **model_cfg},
    })
    proc = run_fairseq("fairseq-hydra-train", [
        "--config-dir", config, "--config-name", "run", f"hydra.run.dir={run_dir}", *CPU_OVERRIDES,
    ], cwd=run_dir)
    assert '"num_updates": "2"' in proc.stdout + proc.stderr
    return run_dir / "checkpoints" / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_audio_corpus(tmp_path_factory.mktemp("corpus"), splits=(("train", 6), ("valid", 2)))


@pytest.fixture(scope="module")
def hubert_run(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("hubert_run")
    base = root / "hubert_base.pt"
    tiny_hubert_checkpoint(base)
    return base, train_siamctc(corpus, base, root / "siamctc")


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a, b)


def test_hubert_round_trip(hubert_run, corpus, tmp_path):
    base, trained = hubert_run
    assert read_checkpoint(trained).kind == "siamctc"
    siamctc_state = torch.load(trained)["model"]
    base_state = torch.load(base)["model"]
    exported = tmp_path / "exported.pt"
    assert export.main([str(trained), str(exported)]) == 0

    # fairseq's own loader, as for hubert_base_ls960.pt
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(exported)])
    hubert = models[0]
    assert cfg.model._name == "hubert" and [len(d) for d in task.dictionaries] == [24]
    state = hubert.state_dict()
    assert state.keys() == base_state.keys()
    for name, value in state.items():
        assert torch.equal(value, siamctc_state["encoder." + name]), name
    # trained: the transformer and final_proj (the projection); untouched: the frozen CNN, the label embeddings
    assert changed(state["encoder.layers.1.fc1.weight"], base_state["encoder.layers.1.fc1.weight"])
    assert changed(state["final_proj.weight"], base_state["final_proj.weight"])
    for name in ("feature_extractor.conv_layers.0.0.weight", "feature_extractor.conv_layers.0.2.weight", "label_embs_concat"):
        assert torch.equal(state[name], base_state[name]), name

    finetune_ctc(corpus, {"_name": "hubert_ctc", "w2v_path": str(exported)}, tmp_path / "ctc")


def test_wavlm_round_trip(corpus, tmp_path):
    base = tmp_path / "wavlm_base.pt"
    tiny_wavlm_checkpoint(base)
    trained = train_siamctc(corpus, base, tmp_path / "siamctc")
    exported = tmp_path / "wavlm_exported.pt"
    assert export.main([str(trained), str(exported)]) == 0
    raw = torch.load(exported)
    assert set(raw) == {"cfg", "model"} and raw["cfg"] == torch.load(base)["cfg"]
    reloaded = WavLM(raw["cfg"])
    reloaded.load_state_dict(read_wavlm_checkpoint(str(exported))["model"], strict=True)
    siamctc_state = torch.load(trained)["model"]
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, siamctc_state["encoder." + name]), name
    assert changed(raw["model"]["encoder.layers.0.fc1.weight"], torch.load(base)["model"]["encoder.layers.0.fc1.weight"])

    finetune_ctc(corpus, {"_name": "wavlm_ctc", "w2v_path": str(exported)}, tmp_path / "ctc")

    # the same run as a Hugging Face directory: transformers' WavLMModel computes the trained encoder
    assert export.main([str(trained), str(tmp_path / "wavlm_hf"), "--format", "hf"]) == 0
    assert_hf_features_equal(tmp_path / "wavlm_hf", SiamCTCModel.from_checkpoint(read_checkpoint(trained)).encoder)


def assert_hf_features_equal(directory, encoder, samples=9_000):
    """transformers' from_pretrained on an export computes the plugin's features (float32 rounding: 1e-5)."""
    source = 0.1 * torch.randn(1, samples, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, _ = encoder_features(encoder.eval(), source)
        got = hf_model(directory)(source).last_hidden_state
    assert (got - expected).abs().max() <= 1e-5


def test_hubert_exports_to_hf_and_s3prl(hubert_run, tmp_path):
    _, trained = hubert_run
    model = SiamCTCModel.from_checkpoint(read_checkpoint(trained))
    assert export.main([str(trained), str(tmp_path / "fairseq.pt")]) == 0
    assert export.main([str(trained), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert_hf_features_equal(tmp_path / "hf", model.encoder)
    # nothing is lost: the directory reads back to the fairseq export's weights, the heads are beside it
    fairseq_state = read_checkpoint(tmp_path / "fairseq.pt").model
    back = read_checkpoint(tmp_path / "hf")
    assert back.model.keys() == fairseq_state.keys()
    assert all(torch.equal(back.model[k], v) for k, v in fairseq_state.items())
    siamctc_state = torch.load(trained)["model"]
    for name in ("phi.weight", "psi.bias"):
        assert torch.equal(back.state["hf_heads"][name], siamctc_state[name])
    # s3prl's converted layout, loaded the way s3prl's hubert_local loads it
    assert export.main([str(trained), str(tmp_path / "s3prl.pt"), "--format", "s3prl"]) == 0
    source = 0.1 * torch.randn(1, 9_000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, _ = encoder_features(model.encoder.eval(), source)
        got = s3prl_style_load(tmp_path / "s3prl.pt").extract_features(source, padding_mask=None, mask=False)[0]
    assert torch.equal(got, expected)


def test_export_outputs_are_safe(hubert_run, tmp_path, capsys, monkeypatch):
    _, trained = hubert_run
    out = tmp_path / "out.pt"
    out.write_bytes(b"old")
    assert export.main([str(trained), str(out)]) == 1
    assert "exists; use --force" in capsys.readouterr().err and out.read_bytes() == b"old"
    assert export.main([str(trained), str(tmp_path)]) == 1  # a directory target, refused before any work
    assert "is a directory; --format fairseq writes one file" in capsys.readouterr().err
    assert export.main([str(trained), str(out), "--format", "hf"]) == 1
    assert "is a file; --format hf writes a directory" in capsys.readouterr().err
    # a failure while writing leaves the old output and no temporary file
    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    assert export.main([str(trained), str(out), "--force"]) == 1
    assert "disk full" in capsys.readouterr().err
    monkeypatch.undo()
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]
    assert export.main([str(trained), str(out), "--force"]) == 0
    assert read_checkpoint(out).kind == "hubert"
    hf_dir = tmp_path / "hf"
    assert export.main([str(trained), str(hf_dir), "--format", "hf"]) == 0
    (hf_dir / "marker").write_text("old")
    assert export.main([str(trained), str(hf_dir), "--format", "hf"]) == 1
    assert export.main([str(trained), str(hf_dir), "--format", "hf", "--force"]) == 0
    assert not (hf_dir / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out.pt"]


def test_siamctc_run_from_a_hugging_face_directory(corpus, tmp_path):
    """A HubertModel directory written by transformers -> SiamCTC through fairseq-hydra-train -> back
    to a directory transformers loads, and to a fairseq checkpoint that stock hubert_ctc fine-tunes."""
    transformers = pytest.importorskip("transformers")
    config = transformers.HubertConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(32,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    )
    torch.manual_seed(0)
    transformers.HubertModel(config).save_pretrained(str(tmp_path / "hf_base"))
    transformers.Wav2Vec2FeatureExtractor(do_normalize=False).save_pretrained(str(tmp_path / "hf_base"))
    trained = train_siamctc(corpus, tmp_path / "hf_base", tmp_path / "siamctc")
    model = SiamCTCModel.from_checkpoint(read_checkpoint(trained))
    assert model.projection is not None and model.encoder.final_proj is None  # its own projection, none invented
    assert export.main([str(trained), str(tmp_path / "hf_out"), "--format", "hf"]) == 0
    assert_hf_features_equal(tmp_path / "hf_out", model.encoder)
    base_state = transformers.HubertModel.from_pretrained(str(tmp_path / "hf_base")).state_dict()
    out_state = hf_model(tmp_path / "hf_out").state_dict()
    assert not torch.equal(out_state["encoder.layers.1.feed_forward.intermediate_dense.weight"],
                           base_state["encoder.layers.1.feed_forward.intermediate_dense.weight"])
    # --projected on the directory: SiamCTC's trained projection, kept in the side file
    audio = tmp_path / "utt.wav"
    sf.write(audio, 0.1 * np.random.default_rng(4).standard_normal(12_000).astype(np.float32), 16_000)
    assert extract_features.main(["--checkpoint", str(tmp_path / "hf_out"), "--projected", "--out",
                                  str(tmp_path / "projected"), str(audio)]) == 0
    with torch.no_grad():
        reference, _ = model.eval().features(torch.from_numpy(sf.read(audio, dtype="float32")[0])[None])
    assert np.abs(np.load(tmp_path / "projected" / "utt.npy") - reference[0].numpy()).max() <= 1e-5
    assert export.main([str(trained), str(tmp_path / "s3prl.pt"), "--format", "s3prl"]) == 1
    assert export.main([str(trained), str(tmp_path / "fairseq.pt")]) == 0
    finetune_ctc(corpus, {"_name": "hubert_ctc", "w2v_path": str(tmp_path / "fairseq.pt")}, tmp_path / "ctc")


def test_export_converts_base_checkpoints_and_refuses_others(hubert_run, tmp_path, capsys):
    base, _ = hubert_run
    # a base checkpoint is converted as it is: fairseq -> hf -> fairseq gives its weights back
    assert export.main([str(base), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert export.main([str(tmp_path / "hf"), str(tmp_path / "back.pt")]) == 0
    original, back = torch.load(base)["model"], read_checkpoint(tmp_path / "back.pt").model
    assert back.keys() == original.keys() and all(torch.equal(back[k], v) for k, v in original.items())
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(tmp_path / "back.pt")])  # fairseq's strict loader
    (tmp_path / "config.yaml").write_text("model: {}\n")
    assert export.main([str(tmp_path / "config.yaml"), str(tmp_path / "out.pt")]) == 1
    assert "not a checkpoint" in capsys.readouterr().err
    assert export.main([str(tmp_path / "missing.pt"), str(tmp_path / "out.pt")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(3)
    sf.write(root / "utt_a.wav", rng.standard_normal(12_000).astype(np.float32) * 0.1, 16_000)
    sf.write(root / "utt_b.wav", rng.standard_normal(20_000).astype(np.float32) * 0.1, 16_000)
    (root / "list.tsv").write_text(f"{root}\nutt_b.wav\t20000\n")
    return root


def test_extract_features_equal_fairseq_hubert(hubert_run, audio_dir, tmp_path):
    base, _ = hubert_run
    out = tmp_path / "layer1"
    assert extract_features.main(["--checkpoint", str(base), "--layer", "1", "--out", str(out),
                                  str(audio_dir / "utt_a.wav"), str(audio_dir / "list.tsv")]) == 0
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(base)])
    reference = models[0].eval()
    for name in ("utt_a", "utt_b"):
        features = np.load(out / f"{name}.npy")
        wav, _ = sf.read(audio_dir / f"{name}.wav", dtype="float32")
        with torch.no_grad():
            ref, _ = reference.extract_features(torch.from_numpy(wav)[None], padding_mask=None, mask=False, output_layer=1)
        assert features.dtype == np.float32 and features.shape == tuple(ref.shape[1:])
        assert np.abs(features - ref[0].numpy()).max() <= 1e-5


def test_extract_projected_features_of_a_siamctc_checkpoint(hubert_run, audio_dir, tmp_path):
    _, trained = hubert_run
    out = tmp_path / "projected"
    assert extract_features.main(["--checkpoint", str(trained), "--projected", "--out", str(out),
                                  str(audio_dir / "utt_a.wav")]) == 0
    model = SiamCTCModel.from_checkpoint(read_checkpoint(trained)).eval()
    wav, _ = sf.read(audio_dir / "utt_a.wav", dtype="float32")
    with torch.no_grad():
        ref, _ = model.features(torch.from_numpy(wav)[None])
    features = np.load(out / "utt_a.npy")
    assert features.shape == (ref.size(1), 256)
    assert np.abs(features - ref[0].numpy()).max() <= 1e-5


def test_extract_features_errors(hubert_run, audio_dir, tmp_path, capsys):
    base, _ = hubert_run
    args = ["--out", str(tmp_path / "x"), str(audio_dir / "utt_a.wav")]
    assert extract_features.main(["--checkpoint", str(base), "--layer", "3", *args]) == 1
    assert "--layer must be between 1 and 2" in capsys.readouterr().err
    assert extract_features.main(["--checkpoint", str(tmp_path / "none.pt"), *args]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert extract_features.main(["--checkpoint", str(base), "--out", str(tmp_path / "x"), str(audio_dir / "nope.wav")]) == 1
    assert "audio file not found: " in capsys.readouterr().err
    (audio_dir / "sub").mkdir(exist_ok=True)
    (audio_dir / "sub" / "utt_a.wav").write_bytes((audio_dir / "utt_a.wav").read_bytes())
    assert extract_features.main(["--checkpoint", str(base), *args, str(audio_dir / "sub" / "utt_a.wav")]) == 1
    assert "would both be written to utt_a.npy" in capsys.readouterr().err
    sf.write(tmp_path / "click.wav", np.ones(300, dtype=np.float32), 16_000)
    assert extract_features.main(["--checkpoint", str(base), "--out", str(tmp_path / "x"), str(tmp_path / "click.wav")]) == 1
    assert "click.wav: 300 samples is shorter than one frame" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_checkpoint(audio_dir / "utt_a.wav")


def test_export_after_fp16_training_is_float32(hubert_run, tmp_path):
    _, trained = hubert_run
    state = torch.load(trained)
    state["model"] = {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "fp16.pt")
    assert export.main([str(tmp_path / "fp16.pt"), str(tmp_path / "out.pt")]) == 0
    exported = torch.load(tmp_path / "out.pt")["model"]
    assert all(v.dtype == torch.float32 for v in exported.values() if v.is_floating_point())
    assert torch.equal(exported["final_proj.weight"], state["model"]["encoder.final_proj.weight"].float())


def test_extract_features_of_a_wavlm_checkpoint(audio_dir, tmp_path, capsys):
    reference = tiny_wavlm_checkpoint(tmp_path / "wavlm.pt")
    out = tmp_path / "wavlm_features"
    assert extract_features.main(["--checkpoint", str(tmp_path / "wavlm.pt"), "--layer", "1", "--out", str(out),
                                  str(audio_dir / "utt_b.wav")]) == 0
    wav, _ = sf.read(audio_dir / "utt_b.wav", dtype="float32")
    with torch.no_grad():
        ref, _ = reference.extract_features(torch.from_numpy(wav)[None], output_layer=1)
    features = np.load(out / "utt_b.npy")
    assert features.shape == tuple(ref.shape[1:]) and np.abs(features - ref[0].numpy()).max() <= 1e-5
    assert extract_features.main(["--checkpoint", str(tmp_path / "wavlm.pt"), "--projected", "--out", str(out), "--force",
                                  str(audio_dir / "utt_b.wav")]) == 1
    assert "has no 256-dimensional projection of its own" in capsys.readouterr().err


def test_plot_alignment_of_a_siamctc_checkpoint(hubert_run, audio_dir, tmp_path, capsys):
    from fairseq_siamctc.cli import plot_alignment

    out = tmp_path / "alignment.png"
    assert plot_alignment.main(["--checkpoint", str(hubert_run[1]), "--manifest", str(audio_dir / "list.tsv"),
                                "--speed", "0.8", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert plot_alignment.main(["--checkpoint", str(hubert_run[1]), "--manifest", str(audio_dir / "list.tsv"),
                                "--index", "3", "--out", str(out)]) == 1
    assert "--index 3: " in capsys.readouterr().err
