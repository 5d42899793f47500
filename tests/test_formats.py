"""Checkpoint formats: fairseq HuBERT / WavLM <-> Hugging Face directories <-> s3prl's converted HuBERT.

The references are third parties' own code: ``transformers``' ``from_pretrained`` and forward pass,
fairseq's ``HubertModel`` built the way s3prl's ``load_converted_model`` builds it. Features are
compared in float32 on one unpadded utterance; both sides compute the same operations in the same
order up to attention kernels, so the differences are float32 rounding (< 1e-6 here), and 1e-5 is
the bound asked of a round trip."""

import json
import shutil
from dataclasses import fields

import numpy as np
import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models.hubert import HubertConfig, HubertModel
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
from omegaconf import OmegaConf

import fairseq_siamctc  # noqa: F401
from fairseq_siamctc.cli import extract_features
from fairseq_siamctc.models.checkpoints import HF, HUBERT, S3PRL, WAVLM, CheckpointError, plain, read_checkpoint, write_s3prl_checkpoint
from fairseq_siamctc.models.encoders import encoder_features, encoder_record, load_encoder, normalizes_audio
from fairseq_siamctc.models.formats import (
    HF_SIDE_FILE,
    FormatError,
    hf_config_from_wavlm,
    hf_directory_files,
    write_directory_atomically,
)
from fairseq_siamctc.models.siamctc import SiamCTCModel, SiamCTCModelConfig
from tiny_checkpoints import tiny_hubert_checkpoint, tiny_wavlm_checkpoint

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

TOLERANCE = 1e-5
LAYOUTS = {
    "hubert_base": (tiny_hubert_checkpoint, {}),
    "hubert_large": (tiny_hubert_checkpoint, {"extractor_mode": "layer_norm", "layer_norm_first": True}),
    "wavlm_base": (tiny_wavlm_checkpoint, {}),
    "wavlm_large": (tiny_wavlm_checkpoint, {"extractor_mode": "layer_norm", "layer_norm_first": True}),
}


def waveform(samples=9_000, seed=1) -> torch.Tensor:
    return 0.1 * torch.randn(1, samples, generator=torch.Generator().manual_seed(seed))


def plugin_features(path, source, layer=None) -> torch.Tensor:
    _, encoder = load_encoder(read_checkpoint(path))
    with torch.no_grad():
        return encoder_features(encoder.eval(), source, output_layer=layer)[0]


def hf_model(directory):
    config = json.loads((directory / "config.json").read_text())
    cls = transformers.HubertModel if config["model_type"] == "hubert" else transformers.WavLMModel
    return cls.from_pretrained(str(directory)).eval()


def write_hf(checkpoint_path, out_dir):
    checkpoint = read_checkpoint(checkpoint_path)
    record = encoder_record(checkpoint)
    write_directory_atomically(out_dir, hf_directory_files(record["kind"], record["cfg"], dict(checkpoint.model)))
    return checkpoint


@pytest.fixture(params=list(LAYOUTS))
def base(request, tmp_path):
    make, overrides = LAYOUTS[request.param]
    path = tmp_path / f"{request.param}.pt"
    make(path, **overrides)
    return path


def test_fairseq_to_hf_to_plugin_round_trip(base, tmp_path):
    out = tmp_path / "hf"
    original = write_hf(base, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "preprocessor_config.json"] + ([HF_SIDE_FILE] if original.kind == HUBERT else []))
    back = read_checkpoint(out)
    assert back.kind == original.kind and back.format == HF
    # every weight comes back (HuBERT's final_proj and label embeddings through the side file)
    assert back.model.keys() == original.model.keys()
    for name, value in original.model.items():
        assert torch.equal(back.model[name], value), name
    source = waveform()
    for layer in (1, None):
        expected = plugin_features(base, source, layer)
        assert (plugin_features(out, source, layer) - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("make", [tiny_hubert_checkpoint, tiny_wavlm_checkpoint])
def test_round_trip_without_masking_keeps_mask_emb(make, tmp_path):
    make(tmp_path / "base.pt", mask_prob=0.0)
    original = write_hf(tmp_path / "base.pt", tmp_path / "hf")
    assert "masked_spec_embed" not in hf_model(tmp_path / "hf").state_dict()  # transformers has none without masking
    assert torch.equal(read_checkpoint(tmp_path / "hf").model["mask_emb"], original.model["mask_emb"])


def test_from_pretrained_gives_the_plugin_features(base, tmp_path):
    out = tmp_path / "hf"
    write_hf(base, out)
    source = waveform()
    with torch.no_grad():
        hf = hf_model(out)(source, output_hidden_states=True)
    # last_hidden_state: after the final layer norm of pre-LN models, as the plugin's default output
    assert (hf.last_hidden_state - plugin_features(base, source)).abs().max() <= TOLERANCE
    assert (hf.hidden_states[1] - plugin_features(base, source, layer=1)).abs().max() <= TOLERANCE


def hf_reference_directory(tmp_path, kind="hubert", **config):
    """A directory written by transformers itself (no side file): the shape of facebook/hubert-base-ls960."""
    settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                    conv_dim=(24, 24, 24), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
                    num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4)
    settings.update(config)
    torch.manual_seed(0)
    if kind == "hubert":
        model = transformers.HubertModel(transformers.HubertConfig(**settings))
    else:
        model = transformers.WavLMModel(transformers.WavLMConfig(num_buckets=16, max_bucket_distance=40, **settings))
    with torch.no_grad():  # non-trivial norms so that a misplaced one shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    out = tmp_path / f"hf_{kind}"
    model.save_pretrained(str(out))
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(str(out))
    return out, model.eval()


@pytest.mark.parametrize("kind", ["hubert", "wavlm"])
@pytest.mark.parametrize("layout", ["safetensors", "bin_old_weight_norm", "sharded"])
def test_reads_directories_transformers_writes(tmp_path, kind, layout):
    out, model = hf_reference_directory(tmp_path, kind)
    if layout != "safetensors":
        from safetensors.torch import load_file, save_file

        state = load_file(str(out / "model.safetensors"))
        (out / "model.safetensors").unlink()
        if layout == "bin_old_weight_norm":
            state = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v"): v
                     for k, v in state.items()}
            torch.save(state, out / "pytorch_model.bin")
        else:
            names = sorted(state)
            shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
            for shard, keys in shards.items():
                save_file({k: state[k] for k in keys}, str(out / shard))
            weight_map = {k: shard for shard, keys in shards.items() for k in keys}
            (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    checkpoint = read_checkpoint(out)
    assert checkpoint.kind == (HUBERT if kind == "hubert" else WAVLM)
    record, encoder = load_encoder(checkpoint)
    assert normalizes_audio(record)  # do_normalize from preprocessor_config.json
    source = waveform()
    with torch.no_grad():
        expected = model(source).last_hidden_state
        got = encoder_features(encoder.eval(), source)[0]
    assert (got - expected).abs().max() <= TOLERANCE


def test_hf_hubert_has_no_invented_projection(tmp_path, capsys):
    out, _ = hf_reference_directory(tmp_path, "hubert", hidden_size=256, intermediate_size=64)
    checkpoint = read_checkpoint(out)
    assert "final_proj.weight" not in checkpoint.model
    record, encoder = load_encoder(checkpoint)
    assert encoder.final_proj is None and record["label_set_sizes"] is None
    # SiamCTC trains its own projection (even where the width would fit a final_proj of 256)
    model = SiamCTCModel(SiamCTCModelConfig(encoder_path=str(out)), record, encoder)
    assert not model.uses_encoder_projection and model.projection is not None
    wav = tmp_path / "a.wav"
    import soundfile as sf

    sf.write(wav, waveform()[0].numpy(), 16_000)
    assert extract_features.main(["--checkpoint", str(out), "--projected", "--out", str(tmp_path / "f"), str(wav)]) == 1
    assert "has no 256-dimensional projection of its own" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def s3prl_converted(fairseq_path, out_path):
    """What s3prl's ``load_and_convert_fairseq_ckpt`` writes, made here from the fairseq file."""
    state = torch.load(fairseq_path, weights_only=True)
    cfg = plain(state["cfg"])
    converted = {
        "task_cfg": cfg["task"],
        "model_cfg": cfg["model"],
        "model_weight": state["model"],
        "dictionaries_symbols": [list(d.symbols) for d in state["task_state"]["dictionaries"]],
    }
    torch.save(converted, out_path)


def s3prl_style_load(path) -> HubertModel:
    """s3prl's ``load_converted_model``: plain dicts merged into the config dataclasses (unknown keys
    dropped), the model built from the symbol lists, weights loaded strictly; here with fairseq's
    classes, which s3prl's hubert_model copies."""
    state = torch.load(path, map_location="cpu", weights_only=True)  # no class needs to be unpickled
    assert type(state["task_cfg"]) is dict and type(state["model_cfg"]) is dict

    def merge(cls, cfg):
        names = {f.name for f in fields(cls)}
        return OmegaConf.structured(cls(**{k: v for k, v in cfg.items() if k in names}))

    dictionaries = []
    for symbols in state["dictionaries_symbols"]:
        dictionary = Dictionary()
        for symbol in symbols[dictionary.nspecial:]:
            dictionary.add_symbol(symbol)
        assert dictionary.symbols == symbols
        dictionaries.append(dictionary)
    model = HubertModel(merge(HubertConfig, state["model_cfg"]), merge(HubertPretrainingConfig, state["task_cfg"]), dictionaries)
    model.load_state_dict(state["model_weight"], strict=True)
    return model.eval()


@pytest.mark.parametrize("layout", ["hubert_base", "hubert_large"])
def test_s3prl_converted_file_gives_the_fairseq_features(tmp_path, layout):
    make, overrides = LAYOUTS[layout]
    make(tmp_path / "fairseq.pt", **overrides)
    s3prl_converted(tmp_path / "fairseq.pt", tmp_path / "s3prl.pt")
    checkpoint = read_checkpoint(tmp_path / "s3prl.pt")
    assert checkpoint.kind == HUBERT and checkpoint.format == S3PRL
    source = waveform()
    assert torch.equal(plugin_features(tmp_path / "s3prl.pt", source), plugin_features(tmp_path / "fairseq.pt", source))
    # and back: the plugin's s3prl writer gives a file s3prl's loader accepts, with the same features
    record = encoder_record(checkpoint)
    write_s3prl_checkpoint(tmp_path / "again.pt", record["cfg"], dict(checkpoint.model), record["label_set_sizes"])
    with torch.no_grad():
        reference = s3prl_style_load(tmp_path / "again.pt").extract_features(source, padding_mask=None, mask=False)[0]
    assert torch.equal(reference, plugin_features(tmp_path / "fairseq.pt", source))


def test_s3prl_export_refused_without_pretraining_heads(tmp_path):
    out, _ = hf_reference_directory(tmp_path, "hubert")
    checkpoint = read_checkpoint(out)
    record = encoder_record(checkpoint)
    with pytest.raises(CheckpointError, match="final_proj"):
        write_s3prl_checkpoint(tmp_path / "s3prl.pt", record["cfg"], dict(checkpoint.model), record["label_set_sizes"])
    assert list(tmp_path.glob("*.pt")) == [] and list(tmp_path.glob(".*.tmp")) == []


def test_unrepresentable_configurations_are_refused_naming_the_field(tmp_path):
    tiny_wavlm_checkpoint(tmp_path / "w.pt", gru_rel_pos=False)
    cfg = torch.load(tmp_path / "w.pt", weights_only=True)["cfg"]
    with pytest.raises(FormatError, match="gru_rel_pos=False"):
        hf_config_from_wavlm(cfg)
    tiny_hubert_checkpoint(tmp_path / "h.pt", activation_fn="tanh")
    with pytest.raises(FormatError, match="activation_fn='tanh'"):
        write_hf(tmp_path / "h.pt", tmp_path / "hf_h")
    assert not (tmp_path / "hf_h").exists()

    out, _ = hf_reference_directory(tmp_path, "hubert", feat_extract_activation="relu")
    with pytest.raises(CheckpointError, match="feat_extract_activation='relu'"):
        read_checkpoint(out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": "wav2vec2"}))
    with pytest.raises(CheckpointError, match="model_type='wav2vec2'"):
        read_checkpoint(out)
    shutil.rmtree(out)
    out.mkdir()
    with pytest.raises(CheckpointError, match="without config.json"):
        read_checkpoint(out)


def test_padding_caveat(tmp_path):
    """HF's group-norm HuBERT changes a padded utterance's features even with an attention mask;
    the plugin's padding-aware HuBERT does not (what the README's caveat says)."""
    out, model = hf_reference_directory(tmp_path, "hubert")
    _, encoder = load_encoder(read_checkpoint(out))
    source = waveform(8_000)
    padded = torch.cat([source, torch.zeros(1, 4_000)], dim=1)
    mask = torch.zeros_like(padded, dtype=torch.long)
    mask[:, :8_000] = 1
    with torch.no_grad():
        alone = model(source).last_hidden_state
        hf_padded = model(padded, attention_mask=mask).last_hidden_state[:, : alone.size(1)]
        ours_alone = encoder_features(encoder.eval(), source)[0]
        ours_padded = encoder_features(encoder, padded, padding_mask=mask == 0)[0][:, : alone.size(1)]
    assert (hf_padded - alone).abs().max() > 100 * TOLERANCE
    assert (ours_padded - ours_alone).abs().max() <= TOLERANCE
    assert np.isclose(float((ours_alone - alone).abs().max()), 0.0, atol=TOLERANCE)


@pytest.mark.parametrize("kind", ["hubert", "wavlm"])
def test_name_table_covers_the_published_base_layout(kind):
    """fairseq's HuBERT Base / the plugin's WavLM Base (their default configs) against transformers'
    default HubertConfig / WavLMConfig (facebook/hubert-base-ls960's and microsoft/wavlm-base's
    architecture): the configs map onto each other and every weight finds its counterpart, same shape."""
    from fairseq_siamctc.models.formats import hf_config_from_hubert, hf_state_from_encoder
    from fairseq_siamctc.models.wavlm import WavLM, WavLMConfig

    if kind == "hubert":
        cfg = {"model": {k: (str(v) if isinstance(v, str) else v) for k, v in vars(HubertConfig()).items()},
               "task": {"normalize": False}}
        ours = HubertModel(OmegaConf.structured(HubertConfig(label_rate=50.0)),
                           OmegaConf.structured(HubertPretrainingConfig(data="")), [None])
        hf_config, _ = hf_config_from_hubert(cfg)
        reference = transformers.HubertModel(transformers.HubertConfig())
        cfg_model = cfg["model"]
    else:
        cfg_model = WavLMConfig().to_dict()
        ours = WavLM(cfg_model)
        hf_config, _ = hf_config_from_wavlm(cfg_model)
        reference = transformers.WavLMModel(transformers.WavLMConfig())
    defaults = reference.config.to_dict()
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
                  "conv_kernel", "conv_stride", "conv_bias", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups",
                  "feat_extract_norm", "do_stable_layer_norm"):
        assert hf_config[field] == (list(defaults[field]) if isinstance(defaults[field], tuple) else defaults[field]), field
    state = hf_state_from_encoder(kind, cfg_model, ours.state_dict(), {**hf_config, "apply_spec_augment": True})
    expected = reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(state[k].shape == expected[k].shape for k in state)
