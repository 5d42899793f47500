"""model.checkpoint_activations: the same gradients with and without it, for HuBERT and the plugin's
WavLM, with dropout on and under bfloat16 autocast; each layer really recomputed in the backward
pass; fewer tensors kept for it."""

import pytest
import torch
from omegaconf import OmegaConf

import fairseq_siamctc  # noqa: F401
from fairseq_siamctc.models.siamctc import SiamCTCModel, SiamCTCModelConfig

torch.set_num_threads(1)


def model(path, checkpoint_activations):
    cfg = SiamCTCModelConfig(encoder_path=str(path), checkpoint_activations=checkpoint_activations)
    return SiamCTCModel.build_model(OmegaConf.structured(cfg)).double().train()


def views(seed=0):
    """Two padded views of two utterances each (the padding masks matter to the recomputation)."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(2, 4000, generator=generator, dtype=torch.float64)
    source_pert = torch.randn(2, 4800, generator=generator, dtype=torch.float64)
    mask = torch.arange(4000)[None, :] >= torch.tensor([[4000], [3100]])
    mask_pert = torch.arange(4800)[None, :] >= torch.tensor([[3700], [4800]])
    return source.masked_fill(mask, 0), mask, source_pert.masked_fill(mask_pert, 0), mask_pert


def gradients(net, seed, autocast=False):
    """Parameter gradients of a loss that weighs every valid frame differently; dropout drawn from
    seed; the forward pass under bfloat16 autocast if asked (the backward pass outside, as usual)."""
    source, mask, source_pert, mask_pert = views()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        dtype = next(net.parameters()).dtype
        out = net(source.to(dtype), mask, source_pert.to(dtype), mask_pert)
        out = {k: v.double() if v is not None and v.is_floating_point() else v for k, v in out.items()}
    weights = torch.Generator().manual_seed(1)
    loss = 0
    for z, z_mask in ((out["z"], out["z_padding_mask"]), (out["z_pert"], out["z_pert_padding_mask"])):
        w = torch.randn(z.shape, generator=weights, dtype=z.dtype)
        loss = loss + (w * z).masked_fill(z_mask[..., None], 0).sum() + z.pow(2).masked_fill(z_mask[..., None], 0).mean()
    net.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("base", ["hubert.pt", "wavlm.pt"])
def test_gradients_equal_with_and_without_checkpointing(base_checkpoints, base):
    plain = model(base_checkpoints / base, False)
    checkpointed = model(base_checkpoints / base, True)
    checkpointed.load_state_dict(plain.state_dict())
    # dropout on inside the layers: the recomputation must redraw the same masks
    assert any(isinstance(getattr(m, "p", None), float) and m.p > 0 for m in plain.encoder.encoder.layers[0].modules())

    calls = []
    for layer in checkpointed.encoder.encoder.layers:
        layer.fc1.register_forward_hook(lambda *_: calls.append(1))
    expected = gradients(plain, seed=3)
    got = gradients(checkpointed, seed=3)
    # every layer ran four times: once per view in the forward pass, once per view recomputed for the backward pass
    assert len(calls) == 4 * len(checkpointed.encoder.encoder.layers)
    layer_params = {f"encoder.encoder.layers.{n}" for n, _ in checkpointed.encoder.encoder.layers.named_parameters()}
    assert expected.keys() == got.keys() and layer_params <= expected.keys()
    # float64, and the recomputation repeats the same operations: only summation order may differ
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)
    # a different dropout draw changes the gradients: the comparison above is not vacuous
    other = gradients(plain, seed=4)
    assert any(not torch.allclose(other[n], expected[n]) for n in expected)


@pytest.mark.parametrize("base", ["hubert.pt", "wavlm.pt"])
def test_gradients_equal_under_bfloat16_autocast(base_checkpoints, base):
    # the recomputation must run under the forward pass's autocast state (fairseq's own wrapper does
    # not: its recomputed layer meets bfloat16 inputs with float32 weights and fails)
    plain = model(base_checkpoints / base, False).float()
    checkpointed = model(base_checkpoints / base, True).float()
    checkpointed.load_state_dict(plain.state_dict())
    expected, got = gradients(plain, seed=3, autocast=True), gradients(checkpointed, seed=3, autocast=True)
    assert expected.keys() == got.keys()
    # the same bfloat16 operations on the same values, again: equal up to float32 summation order
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("base", ["hubert.pt", "wavlm.pt"])
def test_checkpointing_keeps_fewer_tensors_for_backward(base_checkpoints, base):
    saved = {}
    for flag in (False, True):
        net = model(base_checkpoints / base, flag)
        source, mask, source_pert, mask_pert = views()
        total = [0]

        def pack(tensor):
            total[0] += tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(source, mask, source_pert, mask_pert)
        saved[flag] = total[0]
        (out["z"].sum() + out["z_pert"].sum()).backward()
    # the layers' activations (attention maps, FFN) are no longer kept, only each layer's input
    assert saved[True] < 0.6 * saved[False], saved


def test_evaluation_without_gradient_is_unchanged(base_checkpoints):
    plain = model(base_checkpoints / "wavlm.pt", False).eval()
    checkpointed = model(base_checkpoints / "wavlm.pt", True).eval()
    checkpointed.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b = plain(*views()), checkpointed(*views())
    torch.testing.assert_close(a["z"], b["z"], rtol=0, atol=0)


@pytest.mark.parametrize("base", ["hubert.pt", "wavlm.pt"])
def test_frozen_cnn_in_chunks_gives_the_same_features(base_checkpoints, base, monkeypatch):
    import fairseq_siamctc.models.wavlm as wavlm

    net = model(base_checkpoints / base, False).eval()
    assert net.cfg.freeze_feature_extractor
    calls = []
    net.encoder.feature_extractor.conv_layers[0][0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        whole = net(*views())
        monkeypatch.setattr(wavlm, "FROZEN_CNN_CHUNK_SAMPLES", 4800)  # one padded waveform at a time
        chunked = net(*views())
    assert calls == [2, 2, 1, 1, 1, 1]  # both utterances of each view at once, then one by one
    for key in ("z", "z_pert"):
        torch.testing.assert_close(chunked[key], whole[key], rtol=0, atol=1e-12)
