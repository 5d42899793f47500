"""fairseq-hydra-train with the plugin when something goes wrong: non-finite batches under fp16 and
fp32, unreadable training data, a run folder of another run, and the errors a user causes, each
ending in one line that names the file or setting."""

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import CPU_OVERRIDES, PLUGIN_DIR, write_audio_corpus
from tiny_checkpoints import tiny_hubert_checkpoint

EXAMPLES = PLUGIN_DIR.parent / "examples"
BIN = pathlib.Path(sys.executable).parent

# fp16 on a CPU, for the test only: fairseq's memory-efficient fp16 optimizer runs on a CPU, but the
# plugin refuses fp16 without a GPU, and fairseq's overflow handler moves a zero to the GPU
# (``torch.tensor(0.0).cuda()``). Both are bypassed here; the step with the injected inf is the
# third training step.
DRIVER = '''
import sys, torch
import fairseq_siamctc
from fairseq_siamctc import compat
from fairseq_siamctc.criterions import siamctc as criterion

if not torch.cuda.is_available():
    compat.check_cpu_launch = lambda cfg: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

loss = criterion.siamctc_loss
calls = []

def injected(*args, **kwargs):
    terms = loss(*args, **kwargs)
    calls.append(1)
    if len(calls) == 3:
        terms["tince"] = terms["tince"] * float("inf")
        terms["loss"] = terms["loss"] + terms["tince"]
    return terms

criterion.siamctc_loss = injected
from fairseq_cli.hydra_train import cli_main
sys.argv = ["fairseq-hydra-train", *sys.argv[1:]]
cli_main()
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = write_audio_corpus(tmp_path_factory.mktemp("failures_corpus"), splits=(("train", 8), ("valid", 2)))
    tiny_hubert_checkpoint(root / "hubert.pt")
    return root


def run(args, cwd, program=None):
    """Runs fairseq-hydra-train (or ``python program``) without failing the test; returns the process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("HYDRA_FULL_ERROR", None)  # what a user sees
    command = [str(BIN / "python"), str(program)] if program else [str(BIN / "fairseq-hydra-train")]
    return subprocess.run([*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def siamctc_args(data, run_dir, encoder, *extra):
    return [
        "--config-dir", EXAMPLES / "siamctc", "--config-name", "tiny", f"task.data={data}",
        f"model.encoder_path={encoder}", f"hydra.run.dir={run_dir}", *CPU_OVERRIDES,
        "dataset.batch_size=2", "task.max_sample_size=24000", "optimization.max_update=4",
        "lr_scheduler.warmup_updates=2", *extra,
    ]


def one_line_error(proc) -> str:
    """The error a user sees: exit status 1, no traceback, the last line of stderr."""
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fairseq-hydra-train: error: "), proc.stderr[-3000:]
    return last


def test_fp16_overflow_skips_the_batch_and_lowers_the_loss_scale(corpus, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    fp16 = ["common.fp16=true", "common.memory_efficient_fp16=true"]
    proc = run(siamctc_args(corpus, tmp_path / "fp16", corpus / "hubert.pt", *fp16), tmp_path, driver)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "criterion siamctc: non-finite tince=inf in this batch" in log
    assert "gradient overflow detected, ignoring gradient, setting loss scale to: 64.0" in log
    # the skipped batch is not an update: 5 batches for 4 updates, the run goes on to the end
    assert '"num_updates": "4"' in log and '"loss_scale": "64"' in log
    assert (tmp_path / "fp16" / "checkpoints" / "checkpoint_last.pt").exists()


def test_fp32_non_finite_term_stops_naming_it(corpus, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = run(siamctc_args(corpus, tmp_path / "fp32", corpus / "hubert.pt"), tmp_path, driver)
    assert proc.returncode != 0
    assert "FloatingPointError: criterion siamctc: non-finite tince=inf" in proc.stderr


def test_git_lfs_pointers_instead_of_audio_stop_training_naming_the_files(corpus, tmp_path):
    data = tmp_path / "data"
    (data / "wav").mkdir(parents=True)
    for split in ("train", "valid"):
        lines = (corpus / f"{split}.tsv").read_text().splitlines()
        (data / f"{split}.tsv").write_text("\n".join([str(data / "wav"), *lines[1:]]) + "\n")
        for line in lines[1:]:  # what a clone without git-lfs has: small pointer text files
            name = line.split("\t")[0]
            (data / "wav" / name).write_text(
                "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 81234\n")
    # one loader worker: the error crosses from the worker process with its traceback in the message
    proc = run(siamctc_args(data, tmp_path / "run", corpus / "hubert.pt", "dataset.num_workers=1"), tmp_path)
    last = one_line_error(proc)
    assert "of the 8 files of" in last and "train.tsv cannot be used" in last and "max_unreadable_share=0.01" in last
    assert str(data / "wav" / "train") in last and "unreadable" in last
    assert "train_inner" not in proc.stdout  # not one step
    assert not (tmp_path / "run" / "checkpoints" / "checkpoint_best.pt").exists()


def test_a_run_folder_of_another_encoder_is_refused_unless_asked(corpus, tmp_path):
    other = tmp_path / "other.pt"
    tiny_hubert_checkpoint(other, seed=1)  # same architecture, other weights
    first = run(siamctc_args(corpus, tmp_path / "run", corpus / "hubert.pt", "optimization.max_update=1"), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run(siamctc_args(corpus, tmp_path / "run", other), tmp_path)
    last = one_line_error(again)
    assert str(tmp_path / "run" / "checkpoints" / "checkpoint_last.pt") in last
    assert f"model.encoder_path: '{corpus / 'hubert.pt'}' -> '{other}'" in last and "++task.resume_other_run=true" in last
    resumed = run(siamctc_args(corpus, tmp_path / "run", other, "++task.resume_other_run=true"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Loaded checkpoint" in resumed.stdout and '"num_updates": "4"' in resumed.stdout
    # (the same command resumes its own run: tests/test_resume.py)


def test_user_errors_end_in_one_line_naming_the_file(corpus, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    last = one_line_error(run(siamctc_args(empty, tmp_path / "a", corpus / "hubert.pt"), tmp_path))
    assert f"manifest not found: {empty / 'valid.tsv'}" in last  # fairseq loads the valid split first

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((corpus / "hubert.pt").read_bytes()[:5000])
    last = one_line_error(run(siamctc_args(corpus, tmp_path / "b", truncated), tmp_path))
    assert str(truncated) in last

    # fairseq's own fine-tuning task, phoneme labels without their dictionary
    for split in ("train", "valid"):
        (tmp_path / f"{split}.phn").write_text((corpus / f"{split}.ltr").read_text())
        (tmp_path / f"{split}.tsv").write_text((corpus / f"{split}.tsv").read_text())
    last = one_line_error(run([
        "--config-dir", EXAMPLES / "finetune", "--config-name", "tiny_phn", f"task.data={tmp_path}",
        f"model.w2v_path={corpus / 'hubert.pt'}", f"hydra.run.dir={tmp_path / 'c'}", *CPU_OVERRIDES,
    ], tmp_path))
    assert str(tmp_path / "dict.phn.txt") in last


def test_user_error_messages_survive_the_ways_fairseq_moves_errors():
    from torch.multiprocessing import ProcessRaisedException

    from fairseq_siamctc.errors import DataError, SetupError, user_error_message

    assert user_error_message(SetupError("model siamctc: checkpoint not found: x.pt")) == \
        "model siamctc: checkpoint not found: x.pt"
    # a DataLoader worker re-raises the same class with the worker's traceback as the message
    worker = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                       "last):\n  File \"x.py\", line 1, in f\nfairseq_siamctc.errors.DataError: 2 of the 8 files\n")
    assert user_error_message(worker) == "2 of the 8 files"
    # a spawned training process reaches the launcher as text
    spawned = ProcessRaisedException("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent "
                                     "call last):\n  File \"x.py\", line 1\nfairseq_siamctc.errors.RunFolderError: "
                                     "run.pt holds a run of another model configuration\n", 1, 123)
    assert user_error_message(spawned) == "run.pt holds a run of another model configuration"
    assert user_error_message(FileNotFoundError(2, "No such file or directory", "dict.phn.txt")) == \
        "No such file or directory: dict.phn.txt"
    # anything else keeps its traceback
    assert user_error_message(RuntimeError("CUDA out of memory")) is None
    assert user_error_message(ValueError("Traceback (most recent call last):\nValueError: x")) is None
    assert user_error_message(FileNotFoundError("no filename")) is None
