"""WavLM encoder: checkpoint layout, relative position bias, equivalence with torchaudio, padding, loading."""

import logging
import re

import pytest
import torch

from fairseq_siamctc.models.wavlm import (
    WavLM,
    WavLMConfig,
    WavLMSelfAttention,
    build_wavlm_from_state,
    load_wavlm_checkpoint,
    position_gate,
    relative_position_bucket,
)

torch.set_num_threads(1)

# The published wavlm_base.pt, as its state dict is laid out by the reference implementation
# (conv extractor in "default" mode without conv bias, 12 post-LN layers of 768 dims, 12 heads,
# a 320 x 12 bias table in layer 0 only, a gate in every layer). Written out by hand.
BASE_GLOBAL = {
    "mask_emb": (768,),
    "feature_extractor.conv_layers.0.0.weight": (512, 1, 10),
    "feature_extractor.conv_layers.0.2.weight": (512,),
    "feature_extractor.conv_layers.0.2.bias": (512,),
    **{f"feature_extractor.conv_layers.{i}.0.weight": (512, 512, 3) for i in (1, 2, 3, 4)},
    **{f"feature_extractor.conv_layers.{i}.0.weight": (512, 512, 2) for i in (5, 6)},
    "layer_norm.weight": (512,),
    "layer_norm.bias": (512,),
    "post_extract_proj.weight": (768, 512),
    "post_extract_proj.bias": (768,),
    "encoder.pos_conv.0.weight_g": (1, 1, 128),
    "encoder.pos_conv.0.weight_v": (768, 48, 128),
    "encoder.pos_conv.0.bias": (768,),
    "encoder.layer_norm.weight": (768,),
    "encoder.layer_norm.bias": (768,),
    "encoder.layers.0.self_attn.relative_attention_bias.weight": (320, 12),
}
BASE_PER_LAYER = {
    **{f"self_attn.{p}_proj.weight": (768, 768) for p in "qkv"},
    **{f"self_attn.{p}_proj.bias": (768,) for p in "qkv"},
    "self_attn.out_proj.weight": (768, 768),
    "self_attn.out_proj.bias": (768,),
    "self_attn.grep_linear.weight": (8, 64),
    "self_attn.grep_linear.bias": (8,),
    "self_attn.grep_a": (1, 12, 1, 1),
    "self_attn_layer_norm.weight": (768,),
    "self_attn_layer_norm.bias": (768,),
    "fc1.weight": (3072, 768),
    "fc1.bias": (3072,),
    "fc2.weight": (768, 3072),
    "fc2.bias": (768,),
    "final_layer_norm.weight": (768,),
    "final_layer_norm.bias": (768,),
}
BASE_CFG = dict(
    extractor_mode="default", encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072,
    encoder_attention_heads=12, layer_norm_first=False, conv_bias=False,
    conv_feature_layers="[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2", conv_pos=128, conv_pos_groups=16,
    relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True,
)


def tiny_cfg(**overrides) -> dict:
    cfg = dict(
        extractor_mode="default", encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=48,
        encoder_attention_heads=4, layer_norm_first=False, conv_bias=False,
        conv_feature_layers="[(16,10,5)] + [(16,3,2)] * 2 + [(16,2,2)]", conv_pos=8, conv_pos_groups=4,
        relative_position_embedding=True, num_buckets=16, max_distance=40, gru_rel_pos=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, dropout_input=0.0, encoder_layerdrop=0.0,
    )
    cfg.update(overrides)
    return cfg


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, so that gates, norms and biases all matter in comparisons."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.5 if p.dim() > 1 else 0.2))
            if name.endswith("weight_g") or "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model.eval()


def test_base_model_has_exactly_the_published_parameters():
    with torch.device("meta"):
        model = WavLM(WavLMConfig.from_dict(BASE_CFG))
    expected = dict(BASE_GLOBAL)
    for layer in range(12):
        expected.update({f"encoder.layers.{layer}.{name}": shape for name, shape in BASE_PER_LAYER.items()})
    actual = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert sorted(set(actual) - set(expected)) == []
    assert sorted(set(expected) - set(actual)) == []
    assert actual == expected


def test_config_defaults_are_wavlm_base():
    cfg = WavLMConfig()
    assert {k: getattr(cfg, k) for k in BASE_CFG} == BASE_CFG


def test_unknown_config_keys_are_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = WavLMConfig.from_dict({**tiny_cfg(), "layer_wise_gradient_decay_ratio": 1.0}, source="ckpt.pt")
    assert cfg.encoder_layers == 2
    assert "layer_wise_gradient_decay_ratio" in caplog.text and "ckpt.pt" in caplog.text


def test_bad_conv_feature_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="conv_feature_layers"):
        WavLM(tiny_cfg(conv_feature_layers="__import__('os').getcwd()"))


# --- relative position buckets (num_buckets=320, max_distance=800: 160 buckets a direction, 80 exact)
# far buckets: 80 + floor(80 * log(d / 80) / log(10)), capped at 159.
@pytest.mark.parametrize(
    "offset, bucket",
    [
        (0, 0), (1, 160 + 1), (-1, 1), (5, 165), (-5, 5), (79, 160 + 79), (-79, 79),
        (80, 160 + 80), (-80, 80),  # log(1) = 0: first far bucket
        (252, 160 + 119), (253, 160 + 120),  # 80 * sqrt(10) = 252.98: halfway in log scale
        (-799, 159), (800, 160 + 159), (-800, 159), (5000, 319), (-5000, 159),  # saturation
    ],
)
def test_relative_position_bucket_by_hand(offset, bucket):
    assert relative_position_bucket(torch.tensor([offset]), 320, 800).item() == bucket


def test_relative_position_bucket_is_monotone_per_direction():
    offsets = torch.arange(0, 2000)
    forward = relative_position_bucket(offsets, 320, 800)
    backward = relative_position_bucket(-offsets, 320, 800)
    assert (forward[1:].diff() >= 0).all() and (backward.diff() >= 0).all()
    assert set(backward.tolist()) == set(range(160)) and set(forward[1:].tolist()) == set(range(161, 320))


# --- the gate: a * (b * grep_a - 1) + 2 with a, b the sigmoids of the sums of two groups of four logits
@pytest.mark.parametrize(
    "logits_a, logits_b, grep_a, gate",
    [
        (0.0, 0.0, 1.0, 1.75),  # a = b = 1/2: 1/2 * (1/2 - 1) + 2
        (0.0, 0.0, 3.0, 2.25),  # 1/2 * (3/2 - 1) + 2
        (10.0, 10.0, 3.0, 4.0),  # a = b = 1: grep_a + 1
        (10.0, -10.0, 3.0, 1.0),  # a = 1, b = 0: 1
        (-10.0, 10.0, 3.0, 2.0),  # a = 0: 2
    ],
)
def test_position_gate_by_hand(logits_a, logits_b, grep_a, gate):
    # each group's four logits sum to 4x the value: saturated sigmoids stay saturated
    logits = torch.tensor([logits_a] * 4 + [logits_b] * 4).view(1, 1, 1, 8)
    value = position_gate(logits, torch.full((1, 1, 1, 1), grep_a))
    assert value.shape == (1, 1, 1, 1)
    assert value.item() == pytest.approx(gate, abs=1e-6)


def test_attention_scales_the_bias_by_the_gate_and_masks_padded_keys():
    torch.manual_seed(0)
    heads, dim, T = 2, 8, 6
    attn = WavLMSelfAttention(dim, heads, 0.0, True, num_buckets=8, max_distance=20, gru_rel_pos=True).eval()
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):  # no content term: logits = gated bias
            proj.weight.zero_()
            proj.bias.zero_()
        for proj in (attn.v_proj, attn.out_proj):
            proj.weight.copy_(torch.eye(dim))
            proj.bias.zero_()
        attn.grep_linear.weight.zero_()
        attn.grep_linear.bias.copy_(torch.tensor([10.0] * 4 + [10.0] * 4))  # a = b = 1
        attn.grep_a.copy_(torch.tensor([0.5, 2.0]).view(1, 2, 1, 1))  # gates 1.5 and 3
    x = torch.randn(2, T, dim)
    padding = torch.zeros(2, T, dtype=torch.bool)
    padding[1, 4:] = True
    bias = attn.compute_position_bias(T)
    assert bias.shape == (1, heads, T, T)
    out = attn(x, padding, bias)

    table = attn.relative_attention_bias.weight.detach()
    gates = [1.5, 3.0]
    for b in range(2):
        valid = int((~padding[b]).sum())
        for i in range(valid):
            expected = torch.zeros(dim)
            for h in range(heads):
                logits = torch.tensor(
                    [gates[h] * table[relative_position_bucket(torch.tensor(j - i), 8, 20), h] for j in range(valid)]
                )
                weights = torch.softmax(logits, 0)
                head = slice(h * dim // heads, (h + 1) * dim // heads)
                expected[head] = (weights[:, None] * x[b, :valid, head]).sum(0)
            torch.testing.assert_close(out[b, i], expected, atol=1e-5, rtol=1e-5)


# --- equivalence with torchaudio's independent WavLM implementation on the same weights
def to_torchaudio_state(state: dict) -> dict:
    """Our (checkpoint) parameter names -> torchaudio's ``wavlm_model`` names; q, k, v fused."""
    rules = [
        (r"^feature_extractor\.conv_layers\.(\d+)\.0\.", r"feature_extractor.conv_layers.\1.conv."),
        (r"^feature_extractor\.conv_layers\.(\d+)\.2\.(1\.)?", r"feature_extractor.conv_layers.\1.layer_norm."),
        (r"^layer_norm\.", "encoder.feature_projection.layer_norm."),
        (r"^post_extract_proj\.", "encoder.feature_projection.projection."),
        (r"^encoder\.pos_conv\.0\.bias", "encoder.transformer.pos_conv_embed.conv.bias"),
        (r"^encoder\.pos_conv\.0\.weight_g", "encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original0"),
        (r"^encoder\.pos_conv\.0\.weight_v", "encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original1"),
        (r"^encoder\.layer_norm\.", "encoder.transformer.layer_norm."),
        (r"^encoder\.layers\.", "encoder.transformer.layers."),
        (r"self_attn\.out_proj", "attention.attention.out_proj"),
        (r"self_attn\.relative_attention_bias", "attention.rel_attn_embed"),
        (r"self_attn\.grep_linear", "attention.gru_rel_pos_linear"),
        (r"self_attn\.grep_a", "attention.gru_rel_pos_const"),
        (r"self_attn_layer_norm", "layer_norm"),
        (r"\.fc1\.", ".feed_forward.intermediate_dense."),
        (r"\.fc2\.", ".feed_forward.output_dense."),
    ]
    renamed, fused = {}, {}
    for name, value in state.items():
        if name == "mask_emb":
            continue
        for pattern, replacement in rules:
            name = re.sub(pattern, replacement, name)
        projection = re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", name)
        if projection:
            prefix, which, kind = projection.groups()
            fused.setdefault(f"{prefix}.attention.attention.in_proj_{kind}", {})[which] = value
        else:
            renamed[name] = value
    for name, parts in fused.items():
        renamed[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return renamed


@pytest.mark.parametrize("extractor_mode, layer_norm_first", [("default", False), ("layer_norm", True)])
def test_features_equal_torchaudio_wavlm(extractor_mode, layer_norm_first):
    from torchaudio.models import wavlm_model

    cfg = WavLMConfig.from_dict(tiny_cfg(extractor_mode=extractor_mode, layer_norm_first=layer_norm_first))
    ours = randomize(WavLM(cfg))
    theirs = wavlm_model(
        extractor_mode="group_norm" if extractor_mode == "default" else "layer_norm",
        extractor_conv_layer_config=ours.conv_layers_spec, extractor_conv_bias=False,
        encoder_embed_dim=32, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=8, encoder_pos_conv_groups=4,
        encoder_num_layers=2, encoder_num_heads=4, encoder_num_buckets=16, encoder_max_distance=40,
        encoder_attention_dropout=0.0, encoder_ff_interm_features=48, encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0, encoder_layer_norm_first=layer_norm_first, encoder_layer_drop=0.0, aux_num_out=None,
    ).eval()
    theirs.load_state_dict(to_torchaudio_state(ours.state_dict()), strict=True)
    wave = torch.randn(2, 4000)  # 99 frames: offsets beyond the 4 exact buckets and max_distance 40
    with torch.no_grad():
        reference, _ = theirs.extract_features(wave)
        for layer in (1, 2):
            features, padding_mask = ours.extract_features(wave, output_layer=layer)
            assert padding_mask is None
            torch.testing.assert_close(features, reference[layer - 1], atol=1e-5, rtol=1e-5)
        last, _ = ours.extract_features(wave)
    if layer_norm_first:  # the final layer norm only without output_layer, as in the reference
        expected_last = ours.encoder.layer_norm(reference[-1])
    else:
        expected_last = reference[-1]
    torch.testing.assert_close(last, expected_last, atol=1e-5, rtol=1e-5)
    assert last.shape == (2, 99, 32)


@pytest.mark.parametrize("extractor_mode", ["default", "layer_norm"])
def test_utterance_features_do_not_depend_on_padding(extractor_mode):
    # In float64: the claim is exact equality up to rounding, and float32 rounding of the
    # channel norm alone reaches 7e-5 here, while float64 agrees to 1e-15.
    model = randomize(WavLM(tiny_cfg(extractor_mode=extractor_mode)), seed=1).double()
    generator = torch.Generator().manual_seed(2)
    long = torch.randn(5000, generator=generator, dtype=torch.float64)
    short = torch.randn(3333, generator=generator, dtype=torch.float64)
    batch = torch.zeros(2, 5000, dtype=torch.float64)
    batch[0], batch[1, :3333] = long, short
    padding = torch.zeros(2, 5000, dtype=torch.bool)
    padding[1, 3333:] = True
    with torch.no_grad():
        batched, frame_padding = model.extract_features(batch, padding_mask=padding)
        alone_short, _ = model.extract_features(short[None])
        alone_long, _ = model.extract_features(long[None])
    frames = alone_short.size(1)
    assert frame_padding[0].sum() == 0 and int((~frame_padding[1]).sum()) == frames
    torch.testing.assert_close(batched[1, :frames], alone_short[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(batched[0], alone_long[0], atol=1e-10, rtol=1e-10)


def test_feature_grad_mult_scales_the_extractor_gradient():
    torch.manual_seed(0)
    wave = torch.randn(1, 2000)
    grads = {}
    for mult in (1.0, 0.1, 0.0):
        model = randomize(WavLM(tiny_cfg(feature_grad_mult=mult)))
        features, _ = model.extract_features(wave)
        features.pow(2).sum().backward()
        grads[mult] = model.feature_extractor.conv_layers[0][0].weight.grad
        assert model.post_extract_proj.weight.grad is not None
    assert grads[0.0] is None
    torch.testing.assert_close(grads[0.1], 0.1 * grads[1.0])


def test_masking_uses_the_mask_embedding_and_spares_padding():
    torch.manual_seed(0)
    model = WavLM(tiny_cfg(mask_prob=0.8, mask_length=2))
    x = torch.randn(2, 40, 32)
    padding = torch.zeros(2, 40, dtype=torch.bool)
    padding[1, 20:] = True
    masked = model.apply_mask(x.clone(), padding)
    is_mask = (masked == model.mask_emb).all(-1)
    assert is_mask[0].sum() >= 2 and is_mask[1].sum() >= 2
    assert not is_mask[1, 20:].any()
    torch.testing.assert_close(masked[~is_mask], x[~is_mask])


def test_checkpoint_round_trip_strict(tmp_path):
    model = randomize(WavLM(tiny_cfg()))
    path = tmp_path / "wavlm_tiny.pt"
    torch.save({"cfg": WavLMConfig.from_dict(tiny_cfg()).to_dict(), "model": model.state_dict()}, path)
    loaded, cfg = load_wavlm_checkpoint(str(path))
    assert cfg["encoder_layers"] == 2 and cfg["max_distance"] == 40
    loaded.load_state_dict(model.state_dict(), strict=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)
    wave = torch.randn(1, 3000)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().extract_features(wave)[0], model.extract_features(wave)[0])


def test_loading_bad_files_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_wavlm_checkpoint(str(tmp_path / "nowhere.pt"))

    model = WavLM(tiny_cfg())
    good = tmp_path / "good.pt"
    torch.save({"cfg": tiny_cfg(), "model": model.state_dict()}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pt.*cannot be read"):
        load_wavlm_checkpoint(str(truncated))

    other = tmp_path / "other.pt"
    torch.save({"args": None, "model": {"w": torch.zeros(1)}}, other)
    with pytest.raises(ValueError, match=r"other.pt: not a WavLM checkpoint.*keys \['args', 'model'\]"):
        load_wavlm_checkpoint(str(other))

    state = model.state_dict()
    del state["encoder.layers.0.self_attn.relative_attention_bias.weight"]
    with pytest.raises(ValueError, match="missing.*relative_attention_bias"):
        build_wavlm_from_state({"cfg": tiny_cfg(), "model": state}, source="edited.pt")

    with pytest.raises(ValueError, match="size mismatch|do not match"):
        build_wavlm_from_state({"cfg": tiny_cfg(encoder_ffn_embed_dim=64), "model": model.state_dict()}, "x.pt")


def test_layer_results_and_output_layer_agree():
    model = randomize(WavLM(tiny_cfg(encoder_layers=3)))
    wave = torch.randn(1, 3000)
    with torch.no_grad():
        (last, layer_results), _ = model.extract_features(wave, ret_layer_results=True)
        assert len(layer_results) == 4  # the transformer input, then each layer
        torch.testing.assert_close(layer_results[-1], last)
        for layer in (1, 2):
            torch.testing.assert_close(model.extract_features(wave, output_layer=layer)[0], layer_results[layer])
            (_, partial), _ = model.extract_features(wave, output_layer=layer, ret_layer_results=True)
            assert len(partial) == layer + 1
    with pytest.raises(ValueError, match="output_layer must be between 1 and 3"):
        model.extract_features(wave, output_layer=4)
