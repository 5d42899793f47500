"""siamctc-extract-features: fairseq simple_kmeans' shard layout read by fairseq's own scripts, safe
outputs (--force, atomic writes, no half-written files) and --skip-bad."""

import numpy as np
import pytest
import soundfile as sf

import fairseq_siamctc  # noqa: F401
from fairseq_siamctc.cli import extract_features
from fairseq_siamctc.data.kmeans_units import _stock_modules
from tiny_checkpoints import tiny_hubert_checkpoint


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Five utterances of distinct lengths, a manifest of them, and a tiny HuBERT checkpoint."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(7)
    lengths = [6_000, 9_000, 7_500, 12_000, 8_000]
    for i, n in enumerate(lengths):
        sf.write(root / f"u{i}.wav", (0.1 * rng.standard_normal(n)).astype(np.float32), 16_000)
    (root / "train.tsv").write_text(f"{root}\n" + "".join(f"u{i}.wav\t{n}\n" for i, n in enumerate(lengths)))
    tiny_hubert_checkpoint(root / "hubert.pt")
    return root


def run(*args):
    return extract_features.main([str(a) for a in args])


def test_kmeans_shards_read_by_fairseq_simple_kmeans(corpus, tmp_path):
    per_file = tmp_path / "npy"
    assert run("--checkpoint", corpus / "hubert.pt", "--out", per_file, corpus / "train.tsv") == 0
    shards = tmp_path / "shards"
    for rank in (0, 1):
        assert run("--checkpoint", corpus / "hubert.pt", "--out", shards, "--format", "kmeans",
                   "--nshard", 2, "--rank", rank, corpus / "train.tsv") == 0
    assert sorted(p.name for p in shards.iterdir()) == ["train_0_2.len", "train_0_2.npy", "train_1_2.len", "train_1_2.npy"]
    # fairseq's shard ranges: round(5 / 2 * r) -> lines 0-1 (rank 0) and 2-4 (rank 1)
    assert len((shards / "train_0_2.len").read_text().split()) == 2
    dump_mfcc, learn_kmeans, dump_km_label = _stock_modules()
    loaded = learn_kmeans.load_feature(str(shards), "train", 2, seed=0, percent=-1)
    expected = np.concatenate([np.load(per_file / f"u{i}.npy") for i in range(5)])
    assert loaded.dtype == np.float32 and np.array_equal(loaded, expected)
    # the rest of the recipe runs on them: k-means, then one label line per utterance of the shard
    km_path = tmp_path / "km.bin"
    learn_kmeans.learn_kmeans(str(shards), "train", 2, str(km_path), 3, 0, percent=-1, init="k-means++", max_iter=10,
                              batch_size=10000, tol=0.0, n_init=1, reassignment_ratio=0.0, max_no_improvement=100)
    dump_km_label.dump_label(str(shards), "train", str(km_path), 2, 1, str(tmp_path))
    labels = (tmp_path / "train_1_2.km").read_text().splitlines()
    assert [len(line.split()) for line in labels] == [len(np.load(per_file / f"u{i}.npy")) for i in (2, 3, 4)]


def test_existing_outputs_need_force(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--checkpoint", corpus / "hubert.pt", "--out", out, corpus / "u0.wav") == 0
    (out / "u0.npy").write_bytes(b"old")
    assert run("--checkpoint", corpus / "hubert.pt", "--out", out, corpus / "u0.wav") == 1
    assert "exist, e.g." in capsys.readouterr().err and (out / "u0.npy").read_bytes() == b"old"
    assert run("--checkpoint", corpus / "hubert.pt", "--out", out, "--force", corpus / "u0.wav") == 0
    assert np.load(out / "u0.npy").ndim == 2
    assert run("--checkpoint", corpus / "hubert.pt", "--out", out / "u0.npy", corpus / "u1.wav") == 1
    assert "is a file; give a directory" in capsys.readouterr().err


@pytest.fixture
def bad_corpus(corpus, tmp_path):
    """The corpus plus a git-lfs pointer named .wav (unreadable header) and a click too short for one frame."""
    (tmp_path / "lfs.wav").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    sf.write(tmp_path / "click.wav", np.ones(300, dtype=np.float32), 16_000)
    return [corpus / "u0.wav", tmp_path / "lfs.wav", corpus / "u1.wav", tmp_path / "click.wav", corpus / "u2.wav"]


def test_bad_files_stop_the_run_or_are_skipped_with_skip_bad(corpus, bad_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    # an unreadable header is found before anything is written
    assert run("--checkpoint", corpus / "hubert.pt", "--out", out, *bad_corpus) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lfs.wav: unreadable audio" in err and not out.exists()
    # a file that only fails on decoding stops the run naming it; what was written is whole, no temporary left
    assert run("--checkpoint", corpus / "hubert.pt", "--out", out, corpus / "u0.wav", bad_corpus[3], corpus / "u1.wav") == 1
    err = capsys.readouterr().err
    assert "click.wav: 300 samples is shorter than one frame" in err and "1 feature files written before it" in err
    assert sorted(p.name for p in out.iterdir()) == ["u0.npy"]
    # --skip-bad: the others are written, the bad ones counted and listed
    assert run("--checkpoint", corpus / "hubert.pt", "--out", out, "--force", "--skip-bad", *bad_corpus) == 0
    captured = capsys.readouterr()
    assert "wrote 3 feature files" in captured.out
    assert "skipped 2 bad file(s)" in captured.err and "lfs.wav" in captured.err and "click.wav" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["u0.npy", "u1.npy", "u2.npy"]


def test_kmeans_format_errors(corpus, tmp_path, capsys):
    common = ["--checkpoint", corpus / "hubert.pt", "--out", tmp_path / "k", "--format", "kmeans"]
    assert run(*common, "--skip-bad", corpus / "train.tsv") == 1
    assert "--skip-bad cannot be used with --format kmeans" in capsys.readouterr().err
    assert run(*common, corpus / "u0.wav") == 1
    assert "exactly one wav2vec manifest" in capsys.readouterr().err
    assert run(*common, "--nshard", 6, "--rank", 2, corpus / "train.tsv") == 1  # round(5/6*2) == round(5/6*3) == 2
    assert "shard 2 of 6 is empty" in capsys.readouterr().err
    assert run(*common, "--nshard", 2, "--rank", 2, corpus / "train.tsv") == 1
    assert "--rank must be between 0 and --nshard - 1 = 1" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_second_iteration_units_from_encoder_features(corpus, tmp_path):
    """HuBERT's second iteration: units of an encoder layer (50 a second), each the nearest of k centroids."""
    from fairseq_siamctc.data.kmeans_units import dump_kmeans_units

    written = dump_kmeans_units(corpus, tmp_path / "units", 4, splits=("train",), n_init=1,
                                checkpoint=corpus / "hubert.pt", layer=1)
    lines = written["train"].read_text().splitlines()
    features = [extract_features.FeatureExtractor(corpus / "hubert.pt", layer=1)(sf.read(corpus / f"u{i}.wav", dtype="float32")[0])
                for i in range(5)]
    assert [len(line.split()) for line in lines] == [len(f) for f in features]  # one unit a frame, not MFCC's 100 a second
    units = np.concatenate([np.array(line.split(), dtype=int) for line in lines])
    assert set(units) == set(range(4))
    # a k-means labelling: nearly every frame is nearest to the mean of its unit (mini-batch k-means
    # stops short of exact convergence, so a few frames near a boundary may not be)
    frames = np.concatenate(features).astype(np.float64)
    centroids = np.stack([frames[units == k].mean(0) for k in range(4)])
    distances = ((frames[:, None] - centroids[None]) ** 2).sum(-1)
    assert (distances[np.arange(len(units)), units] <= distances.min(1) + 1e-6 * distances.max()).mean() >= 0.95
    assert (tmp_path / "units" / "dict.km.txt").read_text() == "0 1\n1 1\n2 1\n3 1\n"
