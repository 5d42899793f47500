"""siamctc-probe: the SUPERB phoneme-recognition protocol on a frozen encoder.

The central test plants structure: a fake encoder whose one layer is a one-hot of the frame's
phoneme and whose other layers are noise must give a PER near 0 with the layer weights on that
layer, and an encoder of noise only a PER near 100 %: a probe that cannot tell the two apart is
broken."""

import json

import numpy as np
import pytest
import torch

from fairseq_siamctc.cli import probe as probe_cli
from fairseq_siamctc.features import FeatureExtractor
from fairseq_siamctc.probe import (
    BLANK,
    FeatureCache,
    HiddenStates,
    ProbeConfig,
    SplitFeatures,
    edit_errors,
    error_rate,
    greedy_decode,
    scaled_steps,
    speed_copies,
    train_probe,
    weighted_layer_sum,
)
from tiny_checkpoints import tiny_hubert_checkpoint, tiny_wavlm_checkpoint

NUM_PHONEMES = 8


def planted_split(rng, count, informative_layer, num_layers=3, dim=16, noise=1.0):
    """Utterances of random phoneme runs (3 to 6 frames each, no phoneme twice in a row): features
    (T, num_layers, dim), noise everywhere, plus on ``informative_layer`` (None: none) a one-hot of
    the frame's phoneme scaled to 8 noise standard deviations (after the initial uniform average of 3 layers: 8/3 against 1/sqrt(3)); labels are classes 1..NUM_PHONEMES."""
    utterances, labels = [], []
    for _ in range(count):
        phonemes = [int(rng.integers(1, NUM_PHONEMES + 1))]
        while len(phonemes) < rng.integers(4, 9):
            nxt = int(rng.integers(1, NUM_PHONEMES + 1))
            if nxt != phonemes[-1]:
                phonemes.append(nxt)
        frames = np.repeat(phonemes, rng.integers(3, 7, size=len(phonemes)))
        x = noise * rng.standard_normal((len(frames), num_layers, dim)).astype(np.float32)
        if informative_layer is not None:
            x[np.arange(len(frames)), informative_layer, frames - 1] += 8.0 * noise
        utterances.append(x)
        labels.append(phonemes)
    return SplitFeatures.from_list(utterances), labels


def planted_run(informative_layer, seed=0):
    rng = np.random.default_rng(seed)
    train = planted_split(rng, 256, informative_layer)  # fewer: the head memorises the noise
    valid = planted_split(rng, 16, informative_layer)
    test = planted_split(rng, 32, informative_layer)
    cfg = ProbeConfig(total_steps=150, eval_step=50, seed=1)
    head, record = train_probe(*train, *valid, NUM_PHONEMES + 1, cfg)
    hypotheses = [greedy_decode(lp[0]) for lp in (head(torch.from_numpy(np.array(
        test[0].frames[o:o + n]))[None].transpose(1, 2)) for o, n in zip(test[0].offsets, test[0].lengths))]
    return error_rate(*edit_errors(hypotheses, test[1])), record


def test_probe_finds_the_layer_that_carries_the_labels():
    per, record = planted_run(informative_layer=1)
    assert per < 5.0, per
    weights = record["layer_weights"]
    # the loss reaches ~0 before the weights move far from uniform (1/3): they lean to the layer
    assert np.argmax(weights) == 1 and weights[1] > 0.4 > max(weights[0], weights[2]), weights
    assert record["valid_per"] < 5.0


def test_probe_of_noise_only_is_near_chance():
    per, record = planted_run(informative_layer=None)
    # nothing to learn but the label prior: most phonemes are wrong or missing
    assert per > 60.0, per
    assert record["valid_per"] > 60.0


def test_weighted_layer_sum_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64)
    logits = torch.randn(4, generator=g, dtype=torch.float64)
    weights = [float(np.exp(v)) for v in logits.tolist()]
    expected = sum(w / sum(weights) * hidden[:, l] for l, w in enumerate(weights))
    torch.testing.assert_close(weighted_layer_sum(hidden, logits), expected)


def test_greedy_decode_merges_repeats_and_drops_blanks():
    path = [BLANK, 3, 3, BLANK, 3, 2, 2, 5, BLANK, BLANK, 1]
    log_probs = torch.full((len(path), 6), -5.0)
    log_probs[torch.arange(len(path)), torch.tensor(path)] = 0.0
    assert greedy_decode(log_probs) == [3, 3, 2, 5, 1]
    assert greedy_decode(log_probs, length=4) == [3]


def test_error_rate_is_summed_over_the_split():
    errors, lengths = edit_errors([[1, 2, 3], [4], []], [[1, 3], [4, 4, 4], [2]])
    assert errors.tolist() == [1, 2, 1] and lengths.tolist() == [2, 3, 1]
    assert error_rate(errors, lengths) == pytest.approx(100.0 * 4 / 6)


def test_scaled_steps_give_superb_values_on_train_clean_100():
    assert scaled_steps(28539, ProbeConfig()) == (100000, 1000)


@pytest.mark.parametrize("kind", ["hubert", "wavlm"])
def test_hidden_states_are_the_layer_outputs_of_extract_features(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    (tiny_hubert_checkpoint if kind == "hubert" else tiny_wavlm_checkpoint)(path)
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(16000 + 123)).astype(np.float32)
    states = HiddenStates(path)(wav)
    layers = states.shape[1] - 1
    for layer in range(1, layers + 1):
        expected = FeatureExtractor(path, layer=layer)(wav)
        np.testing.assert_allclose(states[:, layer], expected, atol=1e-5, rtol=1e-5)
    assert states.shape[0] == len(FeatureExtractor(path)(wav))


def write_split(folder, split, count, rng, seconds=0.5):
    import soundfile as sf

    (folder / "wav").mkdir(exist_ok=True)
    lines = [str(folder / "wav")]
    for i in range(count):
        wav = (0.1 * rng.standard_normal(int(16000 * seconds) + 37 * i)).astype(np.float32)
        sf.write(folder / "wav" / f"{split}{i}.wav", wav, 16000)
        lines.append(f"{split}{i}.wav\t{len(wav)}")
    (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    (folder / f"{split}.phn").write_text("\n".join("AA B" for _ in range(count)) + "\n")


def test_feature_cache_extracts_once_and_keys_on_content(tmp_path, monkeypatch):
    checkpoint = tmp_path / "h.pt"
    tiny_hubert_checkpoint(checkpoint)
    write_split(tmp_path, "valid", 3, np.random.default_rng(1))
    utterances = []
    original = HiddenStates.batch
    monkeypatch.setattr(HiddenStates, "batch",
                        lambda self, wavs, *a: utterances.append(len(wavs)) or original(self, wavs, *a))
    first = FeatureCache(tmp_path / "cache", checkpoint).load(tmp_path / "valid.tsv")
    assert utterances == [3]  # one batch of the three
    again = FeatureCache(tmp_path / "cache", checkpoint).load(tmp_path / "valid.tsv")
    assert utterances == [3]  # read from disk
    np.testing.assert_array_equal(np.asarray(first.frames), np.asarray(again.frames))
    wav = __import__("fairseq_siamctc.data.audio", fromlist=["read_audio"]).read_audio(tmp_path / "wav" / "valid1.wav")
    alone = HiddenStates(checkpoint)(wav)
    cached = np.asarray(first.frames[first.offsets[1]: first.offsets[1] + first.lengths[1]]).astype(np.float32)
    # the cache holds float16 of the batched states: half a float16 step from them, and those are
    # within float32 rounding (1e-5, as extract_features' test above) of the states of the utterance alone
    step = np.spacing(np.abs(alone).astype(np.float16)).astype(np.float32)
    assert cached.shape == alone.shape and np.all(np.abs(cached - alone) <= 0.5 * step + 1e-5)
    assert np.mean(cached == alone.astype(np.float16).astype(np.float32)) > 0.99
    # a different checkpoint (other weights) gets its own folder
    tiny_hubert_checkpoint(tmp_path / "h2.pt", seed=1)
    assert FeatureCache(tmp_path / "cache", tmp_path / "h2.pt").folder != FeatureCache(tmp_path / "cache", checkpoint).folder
    # an edited manifest gets its own file
    before = FeatureCache(tmp_path / "cache", checkpoint).paths(tmp_path / "valid.tsv")[0]
    (tmp_path / "valid.tsv").write_text((tmp_path / "valid.tsv").read_text().rsplit("\n", 2)[0] + "\n")
    assert FeatureCache(tmp_path / "cache", checkpoint).paths(tmp_path / "valid.tsv")[0] != before


def test_speed_copies_found_next_to_the_test_split(tmp_path):
    for name in ("test", "test_sp0.8", "test_sp1.2", "test_real", "test_real_sp0.8"):
        (tmp_path / f"{name}.tsv").write_text("/\n")
    assert speed_copies(tmp_path, "test") == {"0.8": "test_sp0.8", "1.0": "test", "1.2": "test_sp1.2"}


def test_cli_end_to_end_and_its_errors(tmp_path, capsys):
    checkpoint = tmp_path / "h.pt"
    tiny_hubert_checkpoint(checkpoint)
    rng = np.random.default_rng(2)
    for split, count in (("train", 4), ("valid", 2), ("test", 2), ("test_sp1.2", 2)):
        write_split(tmp_path, split, count, rng)
    (tmp_path / "dict.phn.txt").write_text("AA 1\nB 1\n")
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--data", str(tmp_path), "--out", str(out), "--steps", "3",
            "--seeds", "1", "2", "--cache", str(tmp_path / "cache")]
    assert probe_cli.main(args) == 0
    record = json.loads((out / "probe.json").read_text())
    assert set(record["seeds"]) == {"1", "2"}
    for seed in record["seeds"].values():
        test = seed["test"]["test"]
        assert set(test) == {"1.0", "1.2"}
        for scored in test.values():  # PER recomputed from the stored per-utterance counts
            assert scored["per"] == pytest.approx(100.0 * sum(scored["errors"]) / sum(scored["lengths"]))
    assert probe_cli.main(args) == 1  # no overwrite without --force
    assert "exists" in capsys.readouterr().err
    (tmp_path / "dict.phn.txt").write_text("AA 1\n")
    assert probe_cli.main(args + ["--force"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symbol 'B' is not in the dictionary" in err[0] and "train.phn:1" in err[0]


@pytest.mark.parametrize("fmt", ["hf", "s3prl"])
def test_hidden_states_of_converted_checkpoints_are_the_same(tmp_path, fmt):
    """Every checkpoint format the plugin reads gives the probe the same hidden states; a Hugging
    Face folder gets a cache key from its files."""
    from fairseq_siamctc.cli import export

    base = tmp_path / "h.pt"
    tiny_hubert_checkpoint(base)
    converted = tmp_path / ("hf" if fmt == "hf" else "s3prl.pt")
    assert export.main([str(base), str(converted), "--format", fmt]) == 0
    wav = (0.1 * np.random.default_rng(0).standard_normal(12000)).astype(np.float32)
    np.testing.assert_allclose(HiddenStates(converted)(wav), HiddenStates(base)(wav), atol=1e-5, rtol=1e-5)
    cache = FeatureCache(tmp_path / "cache", converted)
    assert cache.folder != FeatureCache(tmp_path / "cache", base).folder


def test_hidden_states_of_a_siamctc_training_checkpoint_equal_its_export(tmp_path, audio_corpus):
    """A SiamCTC training checkpoint is probed as the encoder it trained: its export (an ordinary
    HuBERT checkpoint) gives the same hidden states, and those differ from the base encoder's."""
    from fairseq_siamctc.cli import export
    from test_export import train_siamctc

    base = tmp_path / "base.pt"
    tiny_hubert_checkpoint(base)
    trained = train_siamctc(audio_corpus, base, tmp_path / "siamctc", updates=2)
    assert export.main([str(trained), str(tmp_path / "exported.pt")]) == 0
    wav = (0.1 * np.random.default_rng(0).standard_normal(12000)).astype(np.float32)
    states = HiddenStates(trained)(wav)
    np.testing.assert_allclose(states, HiddenStates(tmp_path / "exported.pt")(wav), atol=1e-6, rtol=1e-6)
    assert np.abs(states[:, -1] - HiddenStates(base)(wav)[:, -1]).max() > 1e-4  # it did train


def test_an_interrupted_run_resumes_to_the_same_head_bit_for_bit(tmp_path):
    """Stopped after update 8, saved at the evaluation of update 6 (mid-epoch: 5 batches an epoch,
    2 an update), run again: the same record and the same weights and optimizer state as a run
    never stopped; only the 6 remaining updates run. Settings that differ are refused by name, or
    started over with ``force``."""
    rng = np.random.default_rng(4)
    train, valid = planted_split(rng, 40, 1), planted_split(rng, 8, 1)
    cfg = ProbeConfig(batch_size=8, accumulate=2, total_steps=12, eval_step=3, seed=2)
    head, record = train_probe(*train, *valid, NUM_PHONEMES + 1, cfg, checkpoint=tmp_path / "whole.pt")

    def stop_after(limit, seen):
        def progress(step, loss):
            seen.append(step)
            if step == limit:
                raise KeyboardInterrupt
        return progress

    with pytest.raises(KeyboardInterrupt):
        train_probe(*train, *valid, NUM_PHONEMES + 1, cfg, progress=stop_after(8, []), checkpoint=tmp_path / "part.pt")
    saved = torch.load(tmp_path / "part.pt", weights_only=True)
    assert saved["step"] == 6 and len(saved["queue"]) == 3  # 12 batches popped: 3 of the third epoch left
    seen, lines = [], []
    resumed, again = train_probe(*train, *valid, NUM_PHONEMES + 1, cfg, progress=stop_after(None, seen),
                                 checkpoint=tmp_path / "part.pt", log=lines.append)
    assert seen == [6, 7, 8, 9, 10, 11, 12]  # the bar set to update 6, then the 6 updates left
    assert lines == [f"seed 2: resumed from {tmp_path / 'part.pt'} at update 6 of 12"]
    assert again == record
    for key, value in head.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    whole, part = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("whole", "part"))
    assert whole["step"] == part["step"] == 12 and whole["numpy_rng"] == part["numpy_rng"]
    for a, b in zip(whole["optimizer"]["state"].values(), part["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.pt", "whole.pt"]  # no temporary left
    # another learning rate: refused by name, or with force a new run (as one without a saved state)
    other = ProbeConfig(**{**cfg.__dict__, "lr": 0.02})
    with pytest.raises(ValueError, match=r"part\.pt was written with other settings \(config\.lr differ\)"):
        train_probe(*train, *valid, NUM_PHONEMES + 1, other, checkpoint=tmp_path / "part.pt")
    _, forced = train_probe(*train, *valid, NUM_PHONEMES + 1, other, checkpoint=tmp_path / "part.pt", force=True)
    assert forced == train_probe(*train, *valid, NUM_PHONEMES + 1, other)[1] != record


def test_cli_resumes_an_interrupted_run_and_force_starts_over(tmp_path, monkeypatch, capsys):
    """Run again with the same arguments, an interrupted probe resumes and writes the probe.json of
    a run never stopped. A finished one is refused; ``--force`` removes it and its run states once
    the inputs are checked, so a forced run that is interrupted resumes when forced again."""
    from fairseq_siamctc import probe

    checkpoint = tmp_path / "h.pt"
    tiny_hubert_checkpoint(checkpoint)
    rng = np.random.default_rng(5)
    for split, count in (("train", 6), ("valid", 2), ("test", 2)):
        write_split(tmp_path, split, count, rng)
    (tmp_path / "dict.phn.txt").write_text("AA 1\nB 1\n")
    common = ["--checkpoint", str(checkpoint), "--data", str(tmp_path), "--steps", "6", "--eval-step", "2",
              "--batch-size", "2", "--accumulate", "1", "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert probe_cli.main(common + ["--out", str(whole)]) == 0
    expected = json.loads((whole / "probe.json").read_text())

    def interrupted(*extra):
        """The run stops at its second evaluation (update 4), its state of update 2 saved."""
        calls, evaluate = [], probe.evaluate

        def stop(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return evaluate(*args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(probe, "evaluate", stop)
            with pytest.raises(KeyboardInterrupt):
                probe_cli.main(common + ["--out", str(part), *extra])
        assert not (part / "probe.json").exists()
        assert torch.load(part / "probe_seed1.pt", weights_only=True)["step"] == 2
        capsys.readouterr()

    def finished(*extra, resumed: bool):
        assert probe_cli.main(common + ["--out", str(part), *extra]) == 0
        assert ("resumed from" in capsys.readouterr().out) == resumed
        assert json.loads((part / "probe.json").read_text()) == expected

    interrupted()
    finished(resumed=True)
    assert probe_cli.main(common + ["--out", str(part)]) == 1  # finished: no overwrite without --force
    assert "probe.json exists (--force starts over)" in capsys.readouterr().err
    interrupted("--force")  # its state of update 2 replaced the finished one's of update 6
    finished("--force", resumed=True)
    finished("--force", resumed=False)
    # an unfinished run of other settings: refused by name, started over with --force
    (part / "probe.json").unlink()
    assert probe_cli.main(common + ["--out", str(part), "--lr", "0.02"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "probe_seed1.pt was written with other settings (config.lr differ)" in err[0]
    assert probe_cli.main(common + ["--out", str(part), "--lr", "0.02", "--force"]) == 0
    assert "resumed from" not in capsys.readouterr().out
    assert json.loads((part / "probe.json").read_text())["seeds"] != expected["seeds"]
    assert not [p.name for p in part.iterdir() if p.name.startswith(".")]  # no temporary left
