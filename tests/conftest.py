"""Shared fixtures: generated audio corpora and a runner for fairseq's command-line tools."""

import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import fairseq
import fairseq_siamctc

PLUGIN_DIR = pathlib.Path(fairseq_siamctc.__file__).parent
FAIRSEQ_DIR = pathlib.Path(fairseq.__file__).parent
SAMPLE_RATE = 16000

# A HuBERT small enough for CPU tests: 2 layers, 64 dims, 32-channel CNN (same 320x downsampling).
TINY_HUBERT_OVERRIDES = [
    "++model.encoder_layers=2",
    "++model.encoder_embed_dim=64",
    "++model.encoder_ffn_embed_dim=128",
    "++model.encoder_attention_heads=2",
    "++model.final_dim=16",
    "++model.conv_pos=16",
    "++model.conv_pos_groups=4",
    "model.conv_feature_layers='[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2'",
]

# CPU, one process, no fp16, tiny batches, validation sets never emptied by batch rounding.
CPU_OVERRIDES = [
    "common.fp16=false",
    "common.log_interval=1",
    "common.tensorboard_logdir=null",
    "distributed_training.distributed_world_size=1",
    "distributed_training.nprocs_per_node=1",
    "dataset.num_workers=0",
    "dataset.required_batch_size_multiple=1",
]


@pytest.fixture(scope="session")
def base_checkpoints(tmp_path_factory):
    """A tiny fairseq HuBERT (``hubert.pt``) and WavLM (``wavlm.pt``) checkpoint in one folder. Read only."""
    from tiny_checkpoints import tiny_hubert_checkpoint, tiny_wavlm_checkpoint

    folder = tmp_path_factory.mktemp("base")
    tiny_hubert_checkpoint(folder / "hubert.pt")
    tiny_wavlm_checkpoint(folder / "wavlm.pt")
    return folder


@pytest.fixture(autouse=True)
def seeded_random_state():
    """Every test starts from the same global random state: torch's start seed differs per process,
    so a test that draws from it without a generator would otherwise see new numbers each run."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def write_audio_corpus(root, splits=(("train", 6), ("valid", 2)), seconds=(1.5, 2.5), seed=0,
                       letters="ABCD", num_units=10):
    """Writes harmonic tones with noise and, per split, `.tsv` manifest, `.km` units at 50 Hz,
    `.ltr` letters, plus `dict.km.txt` and `dict.ltr.txt`. Returns the root as a Path."""
    root = pathlib.Path(root)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in splits:
        manifest, units, letter_lines = [str(root / "wav")], [], []
        for i in range(count):
            num_samples = int(SAMPLE_RATE * rng.uniform(*seconds))
            t = np.arange(num_samples) / SAMPLE_RATE
            f0 = rng.uniform(100, 250)
            wav = sum(0.2 / k * np.sin(2 * np.pi * k * f0 * t) for k in (1, 2, 3))
            wav = (wav + 0.02 * rng.standard_normal(num_samples)).astype(np.float32)
            name = f"{split}{i}.wav"
            sf.write(root / "wav" / name, wav, SAMPLE_RATE)
            manifest.append(f"{name}\t{num_samples}")
            units.append(" ".join(map(str, rng.integers(0, num_units, num_samples // 320))))
            words = ["".join(rng.choice(list(letters), 2)) for _ in range(3)]
            letter_lines.append(" | ".join(" ".join(w) for w in words) + " |")
        (root / f"{split}.tsv").write_text("\n".join(manifest) + "\n")
        (root / f"{split}.km").write_text("\n".join(units) + "\n")
        (root / f"{split}.ltr").write_text("\n".join(letter_lines) + "\n")
    (root / "dict.km.txt").write_text("".join(f"{i} 1\n" for i in range(num_units)))
    (root / "dict.ltr.txt").write_text("".join(f"{c} 1\n" for c in "|" + letters))
    return root


@pytest.fixture(scope="session")
def audio_corpus(tmp_path_factory):
    return write_audio_corpus(tmp_path_factory.mktemp("audio_corpus"))


def run_fairseq(tool, args, cwd, timeout=600):
    """Runs a fairseq console script (e.g. ``fairseq-hydra-train``) of this interpreter's
    environment and returns the completed process; fails the test with its output on error."""
    exe = pathlib.Path(sys.executable).parent / tool
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([str(exe), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{tool} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def hubert_pretrain_args(corpus, run_dir, *extra):
    """fairseq's stock HuBERT pretraining recipe, shrunk to the tiny model, for 2 updates."""
    return [
        "--config-dir", FAIRSEQ_DIR / "examples/hubert/config/pretrain",
        "--config-name", "hubert_base_librispeech",
        f"task.data={corpus}", f"task.label_dir={corpus}", "task.labels=[km]",
        "model.label_rate=50", "task.min_sample_size=8000", f"hydra.run.dir={run_dir}",
        f"common.user_dir={PLUGIN_DIR}", "dataset.max_tokens=100000", "optimization.max_update=2",
        *CPU_OVERRIDES, *TINY_HUBERT_OVERRIDES, *extra,
    ]


@pytest.fixture(scope="session")
def stock_hubert_runs(audio_corpus, tmp_path_factory):
    """Stock HuBERT pretraining, then stock hubert_ctc fine-tuning (letters) from its checkpoint.

    Returns (pretrained checkpoint, fine-tuned checkpoint, fine-tuning log)."""
    work = tmp_path_factory.mktemp("stock_hubert")
    run_fairseq("fairseq-hydra-train", hubert_pretrain_args(audio_corpus, work / "pretrain"), cwd=work)
    pretrained = work / "pretrain" / "checkpoints" / "checkpoint_last.pt"
    proc = run_fairseq("fairseq-hydra-train", [
        "--config-dir", FAIRSEQ_DIR / "examples/hubert/config/finetune", "--config-name", "base_10h",
        f"task.data={audio_corpus}", f"task.label_dir={audio_corpus}", f"model.w2v_path={pretrained}",
        f"hydra.run.dir={work / 'finetune'}", "model.freeze_finetune_updates=0",
        "dataset.validate_after_updates=0", "model.mask_length=2", "model.mask_channel_length=4",
        f"common.user_dir={PLUGIN_DIR}", "dataset.max_tokens=100000", "optimization.max_update=2",
        *CPU_OVERRIDES,
    ], cwd=work)
    return pretrained, work / "finetune" / "checkpoints" / "checkpoint_last.pt", proc.stdout + proc.stderr


def missing_debian_packages():
    """The Debian packages of the built-in corpus that this machine lacks (``make test`` installs them)."""
    import shutil

    from siamctc_manifests import builtin_corpus

    return [name for name, present in [
        ("espeak-ng", shutil.which("espeak-ng")), ("flite", shutil.which("flite")),
        ("festival", shutil.which("festival")), ("bible-kjv", shutil.which("bible")),
        ("pocketsphinx-en-us", builtin_corpus.DEBIAN_LEXICON.is_file()),
        ("pocketsphinx-testdata", (builtin_corpus.DEBIAN_TESTDATA / "librivox").is_dir()),
    ] if not present]


needs_corpus_packages = pytest.mark.skipif(
    bool(missing_debian_packages()), reason=f"Debian packages missing: {missing_debian_packages()}")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """The built-in corpus, size tiny, built once per session: (folder, build summary). Read only."""
    from siamctc_manifests import builtin_corpus

    out = tmp_path_factory.mktemp("builtin_tiny")
    return out, builtin_corpus.build_corpus(out, "tiny", seed=1, workers=2)
