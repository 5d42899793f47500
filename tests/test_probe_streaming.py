"""siamctc-probe's two modes: the frozen encoder in the head's training loop (streaming) against
the on-disk feature cache (cached), and the padding of a batch kept out of the hidden states.

Why the modes agree. Both give the head float16 hidden states and both extract valid and test
utterances in the same length-sorted batches of 16, so those inputs are identical bit for bit. The
training batches differ: the cache was filled in length-sorted batches, the streaming mode runs the
encoder on each random training batch, and batch padding changes float32 rounding (~1e-6), which
moves a value across a float16 rounding boundary now and then: by one float16 step (plus float32
rounding near zero), in a small fraction of the values (both asserted). The two heads then differ
by far less than the distance of any test frame's best class from its second best (asserted), so
greedy decoding, and with it the PER, cannot differ: the equal PERs are implied, not lucky."""

import numpy as np
import pytest
import torch

from conftest import needs_corpus_packages
from fairseq_siamctc.data.paired_audio_dataset import pad_waveforms
from fairseq_siamctc.models.encoders import encoder_features
from fairseq_siamctc.probe import (
    FeatureCache,
    HiddenStates,
    ProbeConfig,
    ProbeHead,
    StreamedSplit,
    cache_bytes,
    choose_mode,
    length_sorted_chunks,
    probe_checkpoint,
)
from tiny_checkpoints import tiny_hubert_checkpoint, tiny_wavlm_checkpoint

# 4 utterances an update, no accumulation: a few seconds of audio through the tiny encoder per update
CONFIG = ProbeConfig(batch_size=4, accumulate=1, total_steps=40, eval_step=10, seed=1)


@pytest.fixture(scope="module")
def hubert(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe_streaming") / "hubert.pt"
    tiny_hubert_checkpoint(path)
    return path


@pytest.mark.parametrize("kind", ["hubert", "wavlm"])
def test_a_padded_batch_gives_each_utterance_its_own_hidden_states(tmp_path, kind):
    """The batch's valid frames equal the utterance run alone to float32 rounding; its padded frames
    are exactly zero. Without the padding mask the short utterance's states move by far more than
    the tolerance, so the comparison does see padding that leaks in."""
    path = tmp_path / f"{kind}.pt"
    (tiny_hubert_checkpoint if kind == "hubert" else tiny_wavlm_checkpoint)(path)
    states = HiddenStates(path)
    rng = np.random.default_rng(3)
    wavs = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (19_000, 4_321, 11_111)]
    hidden, lengths = states.batch(wavs)
    assert hidden.shape == (3, states.num_states, max(lengths), states.dim)
    assert lengths.tolist() == [states.frames(len(w)) for w in wavs]
    for row, wav in enumerate(wavs):
        alone = torch.from_numpy(states(wav)).transpose(0, 1)  # (L + 1, T, D)
        n = int(lengths[row])
        torch.testing.assert_close(hidden[row, :, :n], alone, atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(hidden[row, :, n:]) == 0
    # the same padded batch without its mask: the short utterance sees the padding
    source, _ = pad_waveforms([torch.from_numpy(w) for w in wavs])
    with torch.no_grad():
        leaked, _ = encoder_features(states.encoder, source)
        alone, _ = encoder_features(states.encoder, torch.from_numpy(wavs[1])[None])
    assert (leaked[1, : int(lengths[1])] - alone[0]).abs().max() > 1e-3


def test_mode_is_chosen_by_the_estimated_cache_size():
    gb = 10 ** 9
    assert choose_mode("auto", 50 * gb, 50.0) == "cached"
    assert choose_mode("auto", 50 * gb + 1, 50.0) == "streaming"
    assert choose_mode("auto", 50 * gb + 1, 50.0, on_disk=True) == "cached"  # nothing left to write
    assert choose_mode("cached", 10 ** 15, 0.0) == "cached" and choose_mode("streaming", 0, 50.0) == "streaming"
    # train-clean-100 at 50 frames a second through a 12-layer, 768-dimensional encoder
    assert cache_bytes(round(100.6 * 3600 * 50), 13, 768) / gb == pytest.approx(361.5, abs=0.1)
    with pytest.raises(ValueError, match="one of auto, cached, streaming"):
        choose_mode("disk", 0, 50.0)


@needs_corpus_packages
def test_streaming_and_cached_modes_give_the_same_per(tiny_corpus, hubert, tmp_path):
    """The tiny corpus, one seed, 40 updates: the same dev PERs at every evaluation, the same chosen
    head (update and weights), the same test PER at every speed (see the module docstring)."""
    data = tiny_corpus[0] / "manifests"
    records, states = {}, {}
    for mode in ("streaming", "cached"):
        out = tmp_path / mode
        records[mode] = probe_checkpoint(hubert, data, tmp_path / "cache", test_splits=("test",), cfg=CONFIG,
                                         mode=mode, show_progress=False, out=out, log=None)
        states[mode] = torch.load(out / "probe_seed1.pt", weights_only=True)
        assert (tmp_path / "cache").exists() == (mode == "cached")  # streaming writes no features
    cached, streamed = records["cached"]["seeds"]["1"], records["streaming"]["seeds"]["1"]
    assert records["cached"]["mode"] == "cached" and records["streaming"]["mode"] == "streaming"
    # the dev PERs are not flat: an equal history is not an accident of a head that learnt nothing
    pers = [h["valid_per"] for h in cached["history"]]
    assert len(pers) == 4 and len(set(pers)) > 1 and 0 < min(pers) < 100
    assert [h["valid_per"] for h in streamed["history"]] == pers
    assert streamed["best_step"] == cached["best_step"]
    assert states["cached"]["best_step"] == states["streaming"]["best_step"] == cached["best_step"]
    assert streamed["test"] == cached["test"]  # PER and per-utterance error counts, every speed
    np.testing.assert_allclose(streamed["layer_weights"], cached["layer_weights"], atol=1e-4)

    # why they agree: the inputs ...
    hidden = HiddenStates(hubert)
    cache = FeatureCache(tmp_path / "cache", hubert, states=hidden)
    splits = {split: (cache.load(data / f"{split}.tsv"), StreamedSplit(hidden, data / f"{split}.tsv"))
              for split in ("train", "test")}
    for on_disk, stream in splits.values():
        for chunk in length_sorted_chunks(on_disk.lengths, 16):  # how evaluation batches: identical
            assert torch.equal(on_disk.batch(chunk, "cpu")[0], stream.batch(chunk, "cpu")[0])
    # a training batch of other lengths: each value is a float16 rounding of float32 states within
    # 1e-5 of each other (the padding test above), so the two are at most a float16 step and 1e-5
    # apart, and equal but for the few near a rounding boundary
    on_disk, stream = splits["train"]
    a, b = on_disk.batch([0, 5, 7, 11], "cpu")[0], stream.batch([0, 5, 7, 11], "cpu")[0]
    step = torch.from_numpy(np.spacing(a.abs().half().numpy()).astype(np.float32))
    assert torch.all((a - b).abs() <= step + 1e-5) and (a != b).float().mean() < 0.01
    # ... and the chosen heads: their log-probabilities on the test frames differ by less than half
    # of every frame's margin between its best and second best class, so no greedy choice can flip
    heads = {}
    for mode, state in states.items():
        heads[mode] = ProbeHead(hidden.num_states, hidden.dim, state["head"]["classifier.bias"].numel())
        heads[mode].load_state_dict(state["best_head"])
    test = cache.load(data / "test.tsv")
    x, n = test.batch(list(range(len(test))), "cpu")
    with torch.no_grad():
        a, b = heads["cached"](x), heads["streaming"](x)
    valid = torch.arange(x.shape[2])[None] < n[:, None]
    gap = (a - b).abs().amax(-1)[valid]
    top2 = a.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1])[valid]
    assert torch.all(2 * gap < margin), (gap.max(), margin.min())


@needs_corpus_packages
def test_cli_prints_the_mode_and_streams_over_the_budget(tiny_corpus, hubert, tmp_path, capsys):
    """One line before any work names the estimate and the mode; over the budget nothing is cached,
    within it the cache holds exactly the estimated bytes."""
    from fairseq_siamctc.cli import probe as probe_cli

    data = tiny_corpus[0] / "manifests"
    common = ["--checkpoint", str(hubert), "--data", str(data), "--steps", "2", "--batch-size", "4",
              "--accumulate", "1", "--device", "cpu"]
    cache = tmp_path / "cache"
    assert probe_cli.main(common + ["--out", str(tmp_path / "s"), "--cache", str(cache), "--cache-budget", "0"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("siamctc-probe: ")]
    assert len(lines) == 1 and "over --cache-budget 0 GB: streaming mode" in lines[0], lines
    assert not cache.exists()
    assert probe_cli.main(common + ["--out", str(tmp_path / "c"), "--cache", str(cache)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("siamctc-probe: ")]
    assert len(lines) == 1 and "within --cache-budget 50 GB: cached mode" in lines[0], lines
    frames = int(lines[0].split("(float16, ")[1].split(" frames")[0].replace(",", ""))
    arrays = [np.load(p, mmap_mode="r") for p in cache.rglob("*.npy")]
    assert len(arrays) == 7 and sum(a.shape[0] for a in arrays) == frames  # 7 splits: train, valid, test x 5 speeds
    assert sum(a.nbytes for a in arrays) == cache_bytes(frames, arrays[0].shape[1], arrays[0].shape[2])
    assert probe_cli.main(common + ["--out", str(tmp_path / "x"), "--cache-budget", "-1"]) == 1
    assert "--cache-budget must be at least 0 GB, got -1" in capsys.readouterr().err
