"""Exact resume: a run killed with SIGKILL and started again with the same command gives the
losses and weights of an uninterrupted run (SiamCTC), and the update count and schedule of one
(fine-tuning with fairseq's audio_finetuning)."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from fairseq.data import data_utils

import fairseq_siamctc  # noqa: F401  (compat: safe loading of fairseq checkpoints)
from conftest import CPU_OVERRIDES, PLUGIN_DIR, run_fairseq, write_audio_corpus
from fairseq_siamctc.data.paired_audio_dataset import PairedAudioDataset, ViewSettings
from tiny_checkpoints import tiny_hubert_checkpoint

EXAMPLES = PLUGIN_DIR.parent / "examples"
TRAIN = str(pathlib.Path(sys.executable).parent / "fairseq-hydra-train")
SAVE_AT = 5  # checkpoint.save_interval_updates: the killed run leaves a checkpoint at update 5
KILL_AFTER = 7  # ... and is killed after update 7, mid-epoch (4 batches an epoch)
MAX_UPDATE = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """8 training utterances of 1.5-2.5 s, all cropped to 1.5 s: every size ties."""
    root = write_audio_corpus(tmp_path_factory.mktemp("resume_corpus"), splits=(("train", 8), ("valid", 2)))
    for split in ("train", "valid"):  # phoneme labels for the fine-tuning recipe: the letters will do
        shutil.copy(root / f"{split}.ltr", root / f"{split}.phn")
    shutil.copy(root / "dict.ltr.txt", root / "dict.phn.txt")
    tiny_hubert_checkpoint(root / "hubert.pt")
    return root


def train_inner(log: str):
    """The json records of fairseq's per-update log lines."""
    return [json.loads(line.split(" - ", 1)[1]) for line in log.splitlines() if "][train_inner][" in line]


def run_killed(args, cwd, kill_after: int) -> int:
    """Runs fairseq-hydra-train and SIGKILLs it once it has logged update ``kill_after``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([TRAIN, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if "][train_inner][" in line and train_inner(line)[0]["num_updates"] == str(kill_after):
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(output)[-4000:]
    return proc.returncode


def weights(checkpoint):
    return {k: v for k, v in torch.load(checkpoint, weights_only=True)["model"].items() if torch.is_tensor(v)}


def interrupted_and_uninterrupted(args, tmp_path):
    """Returns (per-update records, final weights) of the uninterrupted run, then of the killed and
    restarted one (the restarted run's records only)."""
    runs = {}
    for name in ("whole", "resumed"):
        run_args = [*args, f"hydra.run.dir={tmp_path / name}"]
        if name == "resumed":
            run_killed(run_args, tmp_path, KILL_AFTER)
            assert list((tmp_path / name / "checkpoints").glob(f"checkpoint_*_{SAVE_AT}.pt"))
        proc = run_fairseq("fairseq-hydra-train", run_args, cwd=tmp_path)
        runs[name] = (train_inner(proc.stdout + proc.stderr),
                      weights(tmp_path / name / "checkpoints" / "checkpoint_last.pt"))
    return runs["whole"], runs["resumed"]


def test_tied_sizes_are_ordered_by_the_seed_alone(corpus):
    def order(seed, numpy_seed):
        dataset = PairedAudioDataset(corpus / "train.tsv", views=ViewSettings(), max_sample_size=24_000,
                                     min_sample_size=8_000, seed=seed)
        assert len(set(dataset.sizes)) == 1
        with data_utils.numpy_seed(numpy_seed):  # what fairseq does: seed + the epoch it builds batches at
            return dataset.ordered_indices().tolist()

    assert order(1, 2) == order(1, 5) == order(1, 2)
    assert sorted(order(1, 2)) == list(range(8))
    assert order(1, 2) != order(2, 2)  # ties are shuffled, by the task's seed


def test_siamctc_killed_mid_epoch_resumes_exactly(corpus, tmp_path):
    args = [
        "--config-dir", EXAMPLES / "siamctc", "--config-name", "tiny",  # as shipped: keeps the optimizer state
        f"task.data={corpus}", f"model.encoder_path={corpus / 'hubert.pt'}", *CPU_OVERRIDES,
        "dataset.batch_size=2", "task.max_sample_size=24000", f"optimization.max_update={MAX_UPDATE}",
        "lr_scheduler.warmup_updates=3", f"checkpoint.save_interval_updates={SAVE_AT}",
    ]
    (whole_log, whole_weights), (resumed_log, resumed_weights) = interrupted_and_uninterrupted(args, tmp_path)
    assert [r["num_updates"] for r in whole_log] == [str(u) for u in range(1, MAX_UPDATE + 1)]
    # the restarted run continues from the checkpoint of update 5, not from the start
    assert [r["num_updates"] for r in resumed_log] == [str(u) for u in range(SAVE_AT + 1, MAX_UPDATE + 1)]
    for key in ("loss", "ctc", "kld", "tince", "lr", "gnorm"):
        assert [r[key] for r in resumed_log] == [r[key] for r in whole_log[SAVE_AT:]], key
    assert whole_weights.keys() == resumed_weights.keys()
    for name, value in whole_weights.items():
        assert torch.equal(value, resumed_weights[name]), name


def test_finetuning_killed_mid_epoch_resumes_the_update_count_and_schedule(corpus, tmp_path):
    args = [
        "--config-dir", EXAMPLES / "finetune", "--config-name", "tiny_phn",
        f"task.data={corpus}", f"model.w2v_path={corpus / 'hubert.pt'}", *CPU_OVERRIDES,
        "dataset.max_tokens=60000", f"optimization.max_update={MAX_UPDATE}",
        f"checkpoint.save_interval_updates={SAVE_AT}", "model.mask_channel_prob=0", "model.mask_length=2",
    ]
    (whole_log, _), (resumed_log, _) = interrupted_and_uninterrupted(args, tmp_path)
    assert [r["num_updates"] for r in resumed_log] == [str(u) for u in range(SAVE_AT + 1, MAX_UPDATE + 1)]
    assert [r["lr"] for r in resumed_log] == [r["lr"] for r in whole_log[SAVE_AT:]]
    # Losses are not compared: hubert_ctc draws its time masks from numpy's global state, which
    # fairseq does not reseed per update (it does reseed torch: dropout resumes exactly).


def test_checkpoint_copies_are_atomic(tmp_path, monkeypatch):
    """A kill while fairseq copies checkpoint_N.pt to checkpoint_last.pt must leave the old
    checkpoint_last.pt whole (the copy is simulated failing halfway)."""
    import hydra_plugins.siamctc_compat  # noqa: F401  (what fairseq-hydra-train imports at start)
    from fairseq.file_io import PathManager

    src, dst = tmp_path / "checkpoint_2_5.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old" * 1000)
    copyfile = shutil.copyfile

    def killed_halfway(src_path, dst_path, **kwargs):
        with open(src_path, "rb") as fsrc, open(dst_path, "wb") as fdst:
            fdst.write(fsrc.read(1500))
        raise KeyboardInterrupt  # stands in for the process dying mid-copy

    monkeypatch.setattr(shutil, "copyfile", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"old" * 1000 and sorted(p.name for p in tmp_path.iterdir()) == [src.name, dst.name]
    monkeypatch.setattr(shutil, "copyfile", copyfile)
    assert PathManager.copy(str(src), str(dst), overwrite=True) is True  # fairseq asserts the result
    assert dst.read_bytes() == b"new" * 1000
