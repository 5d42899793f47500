"""Each fix of fairseq_siamctc.compat, shown through the fairseq code path it repairs."""

import argparse
import pickle
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import fairseq_siamctc  # noqa: F401  (applies the fixes)
from conftest import hubert_pretrain_args, run_fairseq
from fairseq import checkpoint_utils
from fairseq.data import data_utils
from fairseq.data.audio import audio_utils
from fairseq.data.dictionary import Dictionary


def test_checkpoint_with_dictionary_loads_through_fairseq(tmp_path):
    dictionary = Dictionary()
    dictionary.add_symbol("A")
    path = tmp_path / "checkpoint.pt"
    torch.save({
        "args": None,
        "cfg": {"model": {"_name": "hubert"}, "task": {"_name": "hubert_pretraining"}},
        "model": {"w": torch.ones(2)},
        "task_state": {"dictionaries": [dictionary]},
        "optimizer_history": [{"criterion_name": "HubertCriterion", "optimizer_name": "Adam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 2}],
        "extra_state": {},
    }, path)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert state["task_state"]["dictionaries"][0].index("A") == 4
    assert torch.equal(state["model"]["w"], torch.ones(2))


def test_old_checkpoint_with_namespace_args_loads(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"args": argparse.Namespace(arch="hubert", encoder_layers=2), "model": {}}, path)
    assert torch.load(path)["args"].encoder_layers == 2  # weights_only=True, fairseq's default path


class _RunsCodeWhenUnpickled:
    """Unpickling calls ``pathlib.Path.touch`` on a marker: any call would do as harm."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_checkpoint_whose_pickle_runs_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "malicious.pt"
    torch.save({"model": {}, "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert not marker.exists()


def test_hubert_ctc_config_declares_autoregressive():
    from fairseq.models import MODEL_DATACLASS_REGISTRY

    assert MODEL_DATACLASS_REGISTRY["hubert_ctc"]().autoregressive is False


@pytest.mark.parametrize("mask_type", ["static", "uniform"])
def test_span_masking_without_overlap(mask_type):
    mask = data_utils.compute_mask_indices(
        (3, 200), None, mask_prob=0.4, mask_length=5, mask_type=mask_type, mask_other=2,
        no_overlap=True, min_space=1, seed=1, epoch=1, indices=torch.arange(3),
    )
    assert mask.shape == (3, 200) and mask.dtype == bool
    assert 0.1 < mask.mean() < 0.6
    for row in mask:
        runs = [len(m.group()) for m in re.finditer("1+", "".join(map(str, row.astype(int))))]
        # min_space=1 keeps at least one unmasked frame between spans: no run exceeds a span
        assert max(runs) <= (5 if mask_type == "static" else 10)


def test_convert_waveform_resamples_downmixes_and_normalises():
    sr, seconds, freq = 44100, 0.5, 440.0
    t = np.arange(int(sr * seconds)) / sr
    stereo = np.stack([0.25 * np.sin(2 * np.pi * freq * t)] * 2).astype(np.float32)
    out, out_sr = audio_utils.convert_waveform(stereo, sr, normalize_volume=True, to_mono=True,
                                               to_sample_rate=16000)
    assert out_sr == 16000 and out.shape == (1, 8000) and isinstance(out, np.ndarray)
    assert abs(np.abs(out).max() - 1.0) < 0.02
    spectrum = np.abs(np.fft.rfft(out[0]))
    assert abs(np.argmax(spectrum) * 16000 / out.shape[1] - freq) <= 2.0


def test_two_process_cpu_training(audio_corpus, tmp_path):
    """Stock HuBERT pretraining with world size 2 over gloo: two ranks, one checkpoint."""
    proc = run_fairseq("fairseq-hydra-train", hubert_pretrain_args(
        audio_corpus, tmp_path,
        "distributed_training.distributed_world_size=2", "distributed_training.distributed_port=-1",
        "distributed_training.distributed_backend=gloo",
        "distributed_training.ddp_backend=legacy_ddp",
    ), cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert "as rank 0" in log and "as rank 1" in log
    assert '"num_updates": "2"' in log
    assert (tmp_path / "checkpoints" / "checkpoint_last.pt").exists()


def test_applying_the_fixes_again_changes_nothing():
    from fairseq.distributed import utils as distributed_utils
    from fairseq.models import MODEL_DATACLASS_REGISTRY

    from fairseq_siamctc import compat

    before = (distributed_utils.call_main, distributed_utils.all_gather_list,
              MODEL_DATACLASS_REGISTRY["hubert_ctc"], data_utils.np, audio_utils.convert_waveform)
    compat.apply()
    assert (distributed_utils.call_main, distributed_utils.all_gather_list,
            MODEL_DATACLASS_REGISTRY["hubert_ctc"], data_utils.np, audio_utils.convert_waveform) == before


def _launch_cfg(**overrides):
    from fairseq.dataclass.configs import FairseqConfig

    cfg = OmegaConf.structured(FairseqConfig)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check applies to machines without CUDA")
def test_gpu_only_settings_are_named_on_a_cpu():
    from fairseq_siamctc.compat import gpu_only_settings

    assert gpu_only_settings(_launch_cfg()) == []
    assert gpu_only_settings(_launch_cfg(**{"distributed_training.distributed_world_size": 2,
                                            "distributed_training.distributed_backend": "gloo"})) == []
    named = gpu_only_settings(_launch_cfg(**{"common.fp16": True,
                                             "distributed_training.distributed_world_size": 8}))
    assert [setting for setting, _ in named] == ["common.fp16=true", "distributed_world_size=8 over nccl"]
    assert [fix for _, fix in named] == ["common.fp16=false", "distributed_training.distributed_world_size=1"]


def test_relative_input_paths_are_read_from_the_launch_folder(tmp_path):
    from fairseq_siamctc.compat import resolve_input_paths

    cfg = _launch_cfg(**{"task.data": "manifests"})
    OmegaConf.update(cfg, "model", {"encoder_path": "../ckpt/base.pt", "w2v_path": "/abs/ft.pt"}, force_add=True)
    resolve_input_paths(cfg, str(tmp_path / "launch"))
    assert cfg.task.data == str(tmp_path / "launch" / "manifests")
    assert cfg.model.encoder_path == str(tmp_path / "ckpt" / "base.pt")
    assert cfg.model.w2v_path == "/abs/ft.pt"  # absolute paths stay as given


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check applies to machines without CUDA")
@pytest.mark.parametrize("overrides, named", [
    (["distributed_training.distributed_world_size=2", "distributed_training.distributed_port=-1"],
     "distributed_world_size=2 over nccl"),
    (["common.fp16=true"], "common.fp16=true"),
])
def test_cpu_run_that_needs_a_gpu_stops_in_one_line(audio_corpus, tmp_path, overrides, named):
    """Without CUDA, fairseq's default NCCL backend (or fp16) is refused before any process starts."""
    import os
    import pathlib
    import subprocess
    import sys

    args = [str(a) for a in hubert_pretrain_args(audio_corpus, tmp_path, *overrides)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(pathlib.Path(sys.executable).parent / "fairseq-hydra-train"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fairseq-hydra-train: error: this machine has no GPU") and named in last
    assert "Traceback" not in proc.stderr and "ProcessGroupNCCL" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_finetuned_hubert_loads_without_its_pretraining_label_folder(stock_hubert_runs, tmp_path):
    """As the public fine-tuned checkpoints: the saved label folder is a path of the authors' machines."""
    pretrained, finetuned, _ = stock_hubert_runs
    state = torch.load(finetuned, weights_only=False)
    # the public fine-tuned checkpoints carry their pre-training configuration (w2v_args)
    w2v_args = torch.load(pretrained, weights_only=False)["cfg"]
    w2v_args["task"]["label_dir"] = str(tmp_path / "absent")
    state["cfg"]["model"]["w2v_args"] = w2v_args
    state["cfg"]["model"]["w2v_path"] = str(tmp_path / "absent" / "pretrained.pt")
    moved = tmp_path / "finetuned.pt"
    torch.save(state, moved)
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(moved)])
    reference, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(finetuned)])
    audio = torch.from_numpy(np.random.default_rng(0).standard_normal(16000).astype(np.float32))[None]
    with torch.no_grad():
        got = models[0].eval()(source=audio, padding_mask=None)["encoder_out"]
        expected = reference[0].eval()(source=audio, padding_mask=None)["encoder_out"]
    assert torch.equal(got, expected)
    # pre-training itself still needs its dictionaries
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig, HubertPretrainingTask

    task = HubertPretrainingTask(HubertPretrainingConfig(data=str(tmp_path), labels=["km"]))
    with pytest.raises(FileNotFoundError):
        task.dictionaries
