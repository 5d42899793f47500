"""Batched greedy decoding gives the one-at-a-time result (fairseq_siamctc.decoding), in float32
exactly and under autocast up to near ties."""

import types

import numpy as np
import pytest
import soundfile as sf
import torch
from fairseq.data import Dictionary
from fairseq.models.hubert import hubert_asr
from fairseq.models.wav2vec import Wav2Vec2Config, Wav2Vec2Model
from omegaconf import OmegaConf

import fairseq_siamctc  # noqa: F401  (compatibility fixes: hubert_ctc's config)
from fairseq_siamctc.cli import decode as decode_cli
from fairseq_siamctc.cli.decode import CtcRecognizer, decode_split
from fairseq_siamctc.decoding import (AUTOCAST_TIE_RTOL, autocast_dtype, cnn_then_batched_encoder, flips_beyond_ties,
                                      greedy_ctc, length_sorted_batches, mask_padded_frames, near_tie_frames,
                                      padding_independent, padding_independent_logits, tie_rtol)
from fairseq_siamctc.models.encoders import hubert_features
from fairseq_siamctc.models.wavlm_ctc import WavLMCtc, WavLMCtcConfig
from tiny_checkpoints import TINY_CONV, tiny_hubert_checkpoint, tiny_wavlm_checkpoint

torch.set_num_threads(1)


def letters_task():
    dictionary = Dictionary()
    for letter in "|ABCD":
        dictionary.add_symbol(letter)
    return types.SimpleNamespace(source_dictionary=None, target_dictionary=dictionary)


def tiny_hubert_ctc(tmp_path, **overrides):
    tiny_hubert_checkpoint(tmp_path / "hubert.pt", **overrides)
    cfg = OmegaConf.structured(hubert_asr.HubertCtcConfig(w2v_path=str(tmp_path / "hubert.pt"), data="unused",
                                                                normalize=False))
    return hubert_asr.HubertCtc.build_model(cfg, letters_task()).eval()


def tiny_wavlm_ctc(tmp_path, **overrides):
    tiny_wavlm_checkpoint(tmp_path / "wavlm.pt", **overrides)
    cfg = OmegaConf.structured(WavLMCtcConfig(w2v_path=str(tmp_path / "wavlm.pt"), data="unused", normalize=False))
    return WavLMCtc.build_model(cfg, letters_task()).eval()


def waveforms(seed=0, seconds=(0.4, 0.55, 0.7, 1.0, 1.3)):
    """Harmonic tones of different lengths and loudness, so that per-utterance statistics differ."""
    rng = np.random.default_rng(seed)
    wavs = []
    for s in seconds:
        t = np.arange(int(16000 * s)) / 16000
        f0 = rng.uniform(90, 260)
        wav = rng.uniform(0.05, 0.8) * np.sin(2 * np.pi * f0 * t) + 0.05 * rng.standard_normal(t.size)
        wavs.append(wav.astype(np.float32))
    return wavs


def naive_greedy(logits, blank, drop):
    out, previous = [], None
    for index in logits.argmax(-1).tolist():
        if index != previous and index != blank and index not in drop:
            out.append(index)
        previous = index
    return out


def test_greedy_ctc_equals_a_loop_over_each_utterances_own_frames():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 12, 1, 0, 12])
    logits = torch.randn(5, 12, 6, generator=g)
    logits[:, :, 0] += 0.5  # enough blanks to collapse around
    logits[1, 3:6] = logits[1, 3]  # a repeated label
    padded_argmax = logits.clone()
    padded_argmax[0, 7:, 4] = 100.0  # garbage after the end that an unmasked argmax would read
    expected = [naive_greedy(logits[b, :n], 0, {2}) for b, n in enumerate(lengths.tolist())]
    assert greedy_ctc(padded_argmax, lengths, blank=0, drop=(2,)) == expected
    assert expected[3] == [] and len(expected[1]) > 0
    masked = mask_padded_frames(padded_argmax, lengths, blank=3)
    assert torch.equal(masked[0, :7], padded_argmax[0, :7])
    assert (masked[0, 7:, 3] == 0).all() and torch.isinf(masked[0, 7:, [0, 1, 2, 4, 5]]).all()


def test_length_sorted_batches_cover_every_utterance_within_the_limits():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1000, 50000, size=57)
    sizes[5] = 200000  # longer than max_tokens: a batch of its own
    batches = length_sorted_batches(sizes, batch_size=8, max_tokens=120000)
    assert sorted(i for batch in batches for i in batch) == list(range(57))
    flat = [sizes[i] for batch in batches for i in batch]
    assert flat == sorted(flat, reverse=True)  # longest first, neighbours in length together
    for batch in batches:
        padded = len(batch) * max(sizes[i] for i in batch)
        assert len(batch) <= 8
        assert len(batch) == 1 or (padded <= 120000 and padded - sum(sizes[i] for i in batch) <= 0.1 * padded)
    assert [5] in batches
    assert length_sorted_batches(sizes, 1, 10**9) == [[i] for i in np.argsort(-sizes, kind="stable")]
    # without the padding limit, consecutive utterances fill each batch to the utterance or token limit
    loose = length_sorted_batches(sizes, 8, 120000, max_padding=1.0)
    assert len(loose) < len(batches)
    for batch, following in zip(loose, loose[1:]):
        assert len(batch) == 8 or (len(batch) + 1) * sizes[batch[0]] > 120000
    with pytest.raises(ValueError, match="positive"):
        length_sorted_batches(sizes, 0, 100)


@pytest.mark.parametrize("kind", ["hubert_ctc", "wavlm_ctc"])
def test_batched_decoding_gives_the_one_at_a_time_hypotheses(kind, tmp_path):
    model = tiny_hubert_ctc(tmp_path) if kind == "hubert_ctc" else tiny_wavlm_ctc(tmp_path)
    dictionary = letters_task().target_dictionary
    assert padding_independent(model)
    wavs = waveforms()
    for normalize in (False, True):
        recognizer = CtcRecognizer(model, dictionary, normalize, dictionary.bos())
        alone = [recognizer.decode(w) for w in wavs]  # the model's own forward, batch of one
        assert recognizer.decode_batch(wavs) == alone
        assert recognizer.decode_batch(wavs[::-1]) == alone[::-1]
        assert sum(map(len, alone)) > 0
    # the logits themselves: each utterance's valid frames as alone, the frame counts as alone
    waves = [torch.from_numpy(w) for w in wavs]
    source = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    padding_mask = torch.arange(source.size(1))[None] >= torch.tensor([len(w) for w in wavs])[:, None]
    with torch.no_grad():
        stock = model(source=source, padding_mask=padding_mask)["encoder_out"].transpose(0, 1)
        for batch_convolutions in (False, True):  # the CPU's way and the GPU's way
            logits, lengths = padding_independent_logits(model, waves, batch_convolutions)
            for b, wave in enumerate(waves):
                single = model(source=wave[None], padding_mask=None)["encoder_out"][:, 0]
                assert lengths[b] == single.size(0)
                torch.testing.assert_close(logits[b, :lengths[b]], single, atol=2e-5, rtol=1e-5)
                if kind == "hubert_ctc" and b == 0:  # stock fairseq: the padding changes the shortest one
                    assert (stock[b, :lengths[b]] - single).abs().max() > 1e-2
            recognizer = CtcRecognizer(model, dictionary, False, dictionary.bos())
            assert greedy_ctc(logits, lengths, recognizer.blank_index, recognizer.removed) == [
                recognizer.decode(w) for w in wavs]


def test_wav2vec2_backbone_is_batched_the_same_way():
    """cnn_then_batched_encoder reads only what Wav2Vec2Model shares with HubertModel."""
    torch.manual_seed(0)
    model = Wav2Vec2Model(Wav2Vec2Config(
        encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=48, encoder_attention_heads=4,
        conv_feature_layers=TINY_CONV, conv_pos=8, conv_pos_groups=4, final_dim=16)).eval()
    with torch.no_grad():  # a non-trivial group norm so that wrong statistics show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    waves = [torch.from_numpy(w) for w in waveforms(seed=1, seconds=(0.5, 0.9, 0.6))]
    source = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    padding_mask = torch.arange(source.size(1))[None] >= torch.tensor([len(w) for w in waves])[:, None]
    with torch.no_grad():
        x, lengths = cnn_then_batched_encoder(model, waves)
        x_gpu_way, frame_padding = hubert_features(model, source, padding_mask)
        for b, wave in enumerate(waves):
            single = model.extract_features(wave[None], padding_mask=None)["x"][0]
            assert lengths[b] == single.size(0) == (~frame_padding[b]).sum()
            torch.testing.assert_close(x[b, :lengths[b]], single, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(x_gpu_way[b, :lengths[b]], single, atol=2e-5, rtol=1e-5)
    wrapped = types.SimpleNamespace(w2v_encoder=types.SimpleNamespace(w2v_model=model, is_d2v_multi=False))
    assert padding_independent(wrapped)
    model.crop_seq_to_multiple = 2  # crops the batch's frames: not padding-independent
    assert not padding_independent(wrapped)
    assert not padding_independent(torch.nn.Linear(2, 2))


def naive_near_ties(logits, atol, rtol):
    """One frame at a time: sorted logits, the gap of the best two against atol + rtol * largest finite |logit|."""
    out = torch.zeros(logits.shape[:-1], dtype=torch.bool)
    for index in np.ndindex(*logits.shape[:-1]):
        values = sorted(logits[index].tolist(), reverse=True)
        scale = max(abs(v) for v in values if np.isfinite(v))
        out[index] = values[0] - values[1] <= atol + rtol * scale
    return out


def test_near_tie_frames_and_flips_equal_a_loop_over_frames():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, 7, generator=g) * 3
    second = logits.topk(2, dim=-1).indices[..., 1]
    planted = torch.rand(3, 40, generator=g) < 0.3  # best two within 0 to 2e-3: on both sides of 1e-3
    gap = torch.rand(3, 40, generator=g) * 2e-3
    best = logits.amax(-1)
    runner_up = torch.where(planted, best - gap, logits.gather(-1, second[..., None])[..., 0])
    logits.scatter_(-1, second[..., None], runner_up[..., None])
    logits[2, 5, 3] = float("-inf")  # a masked class: not part of the scale
    for atol, rtol in ((1e-3, 0.0), (0.0, 2.0 ** -4), (1e-3, 2.0 ** -8)):
        expected = naive_near_ties(logits, atol, rtol)
        assert torch.equal(near_tie_frames(logits, atol, rtol), expected)
        assert 0 < expected.sum() < expected.numel()
    # another computation that swaps the best two at every planted frame and changes nothing elsewhere
    other = logits.clone()
    top = logits.topk(2, dim=-1)
    swapped = top.values.flip(-1)
    other.scatter_(-1, top.indices, torch.where(planted[..., None], swapped, top.values))
    changed = logits.argmax(-1) != other.argmax(-1)
    ties = naive_near_ties(logits, 1e-3, 0.0)
    assert torch.equal(flips_beyond_ties(logits, other, 1e-3), changed & ~ties)
    assert (changed & ties).any() and (changed & ~ties).any()  # planted gaps above 1e-3 are not ties
    assert not flips_beyond_ties(logits, other, 2.1e-3).any()
    with pytest.raises(ValueError, match="not the same frames"):
        flips_beyond_ties(logits, other[:, :-1])


@pytest.mark.parametrize("kind", ["hubert_ctc", "wavlm_ctc"])
def test_bf16_autocast_changes_labels_only_at_near_ties(kind, tmp_path):
    """bfloat16 keeps 8 significant bits: every rounding changes a value by up to u = 2^-8 of it.
    The logits come out of ~10 layers in sequence (7 convolutions, 2 transformer layers, the output
    projection), each rounding its output, so their error is a few u of the frame's largest |logit|,
    and two logits can swap only where their float32 gap is below about twice that:
    AUTOCAST_TIE_RTOL's 16u. Frames with a wider gap (most of them) must keep their label.

    The positional convolutions have 16 channels per group: with 8 or 12 (the other tests' tiny
    models) this torch's oneDNN bfloat16 grouped convolution on a CPU is wrong, not rounded
    (errors as large as the outputs), which this test would report as flips beyond the ties.
    """
    model = (tiny_hubert_ctc(tmp_path, conv_pos_groups=3) if kind == "hubert_ctc"
             else tiny_wavlm_ctc(tmp_path, conv_pos_groups=2))
    dictionary = letters_task().target_dictionary
    wavs = waveforms(seconds=(0.4, 0.55, 0.7, 1.0, 1.3, 2.0, 0.9, 1.7))
    full = CtcRecognizer(model, dictionary, False, dictionary.bos())
    half = CtcRecognizer(model, dictionary, False, dictionary.bos(), autocast_dtype("bf16", "cpu"))
    rtol = AUTOCAST_TIE_RTOL[torch.bfloat16]
    logits, lengths = full.logits(wavs)
    half_logits, half_lengths = half.logits(wavs)
    assert half_logits.dtype == torch.float32 and torch.equal(half_lengths, lengths)
    valid = torch.arange(logits.size(1))[None] < lengths[:, None]
    assert (half_logits - logits).abs()[valid].max() > 1e-2  # bfloat16 did run (float32 ways agree to 2e-5)
    ties = near_tie_frames(logits, 0.0, rtol)[valid]
    assert ties.float().mean() < 0.3  # the check below binds at most frames
    assert not flips_beyond_ties(logits, half_logits, 0.0, rtol)[valid].any()
    # the hypotheses: batched under bf16, padding kept out, as float32's where no frame's label changed
    hyps, half_hyps = full.decode_batch(wavs), half.decode_batch(wavs)
    for b, wav in enumerate(wavs):
        n = lengths[b]
        if torch.equal(logits[b, :n].argmax(-1), half_logits[b, :n].argmax(-1)):
            assert half_hyps[b] == hyps[b]
        alone = half.alone_logits(wav)  # a batch of one under bf16: the same frames, the same rule
        assert alone.size(0) == n
        assert not flips_beyond_ties(logits[b, :n], alone, 0.0, rtol).any()
    assert sum(map(len, half_hyps)) > 0


def test_autocast_names_what_it_cannot_do(tmp_path, monkeypatch, capsys):
    assert autocast_dtype("none", "cpu") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown autocast 'fp32'"):
        autocast_dtype("fp32", "cpu")

    def no_half(*args, **kwargs):  # a torch whose CPU has no float16 convolution
        raise RuntimeError("\"slow_conv2d_cpu\" not implemented for 'Half'")

    monkeypatch.setattr(torch.nn.functional, "conv1d", no_half)
    with pytest.raises(ValueError, match=r"autocast fp16: .* to torch.float16 on cpu .*not implemented"):
        autocast_dtype("fp16", "cpu")
    checkpoint = tmp_path / "ft.pt"
    checkpoint.write_bytes(b"")  # refused before it is read
    assert decode_cli.main(["--checkpoint", str(checkpoint), "--data", str(tmp_path), "--out", str(tmp_path / "out"),
                            "--device", "cpu", "--autocast", "fp16"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("siamctc-decode: error: autocast fp16:")


def test_decode_split_sorts_by_length_and_writes_in_manifest_order(tmp_path):
    model = tiny_hubert_ctc(tmp_path)
    dictionary = letters_task().target_dictionary
    recognizer = CtcRecognizer(model, dictionary, False, dictionary.bos())
    seconds = (0.55, 1.3, 0.4, 1.0, 0.7, 1.25, 0.42)  # neither sorted nor reversed
    wavs = waveforms(seed=2, seconds=seconds)
    data = tmp_path / "data"
    (data / "wav").mkdir(parents=True)
    rows = []
    for i, wav in enumerate(wavs):
        sf.write(data / "wav" / f"u{i}.wav", wav, 16000, subtype="FLOAT")
        rows.append(f"wav/u{i}.wav\t{len(wav)}")
    (data / "test.tsv").write_text(f"{data}\n" + "\n".join(rows) + "\n")
    (data / "test.ltr").write_text("A B |\n" * len(wavs))
    batches = length_sorted_batches([len(w) for w in wavs], 3, 10**9)
    assert max(map(len, batches)) > 1 and [i for b in batches for i in b] != list(range(len(wavs)))
    score = decode_split(recognizer, str(data), "test", "ltr", str(tmp_path / "out"), "letter", batch_size=3,
                         max_tokens=10**9, progress=False)
    assert score["throughput"]["batches"] == len(batches)
    expected = [recognizer.to_text(recognizer.decode(w), "letter") for w in wavs]  # each alone, manifest order
    assert (tmp_path / "out" / "test.hyp").read_text().splitlines() == expected
    assert len(set(expected)) > 1  # the order is visible in the output


def test_float32_on_cuda_allows_tf32_rounding(monkeypatch):
    """float32 without autocast: exact on a CPU, float16's margin on CUDA while cuDNN or matrix
    products may use TF32 (on an H200, 3 of 200 utterances changed a label at a frame whose top two
    logits were more than 1e-3 apart, batched against one at a time), none once both are off."""
    assert tie_rtol(None, "cpu") == 0.0
    assert tie_rtol(torch.bfloat16, "cuda") == AUTOCAST_TIE_RTOL[torch.bfloat16]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert tie_rtol(None, "cuda:0") == AUTOCAST_TIE_RTOL[torch.float16] == 16 * 2.0 ** -11
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert torch.get_float32_matmul_precision() == "highest"  # torch's default: no TF32 products
    assert tie_rtol(None, torch.device("cuda")) == 0.0
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert tie_rtol(None, "cuda") == AUTOCAST_TIE_RTOL[torch.float16]
