"""The shipped recipes (examples/siamctc, examples/finetune) run as documented, shrunk to one update."""

import pytest

from conftest import CPU_OVERRIDES, PLUGIN_DIR, run_fairseq

EXAMPLES = PLUGIN_DIR.parent / "examples"
ONE_CPU_UPDATE = [*CPU_OVERRIDES, "optimization.max_update=1", "dataset.valid_subset=valid"]


@pytest.mark.parametrize("config, base", [("hubert_base", "hubert.pt"), ("wavlm_base", "wavlm.pt")])
def test_paper_siamctc_config_trains_and_logs_to_tensorboard(config, base, base_checkpoints, audio_corpus, tmp_path):
    proc = run_fairseq("fairseq-hydra-train", [
        "--config-dir", EXAMPLES / "siamctc", "--config-name", config,
        f"task.data={audio_corpus}", f"model.encoder_path={base_checkpoints / base}",
        f"hydra.run.dir={tmp_path}", "dataset.batch_size=2", "criterion.temperature=0.5",
        *ONE_CPU_UPDATE, f"common.tensorboard_logdir={tmp_path / 'tb'}",
    ], cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert '"num_updates": "1"' in log and '"ctc": ' in log
    assert "'temperature': 0.5" in log  # the named settings can be overridden
    assert list((tmp_path / "tb" / "train").glob("events.out.tfevents.*"))


def finetuning_run(model, encoder, corpus, run_dir, *overrides):
    """The fine-tuning config ``ltr_100h`` with ``model`` on ``encoder``, shrunk to two CPU updates."""
    return run_fairseq("fairseq-hydra-train", [
        "--config-dir", EXAMPLES / "finetune", "--config-name", "ltr_100h",
        f"task.data={corpus}", f"model.w2v_path={encoder}", f"model._name={model}",
        f"hydra.run.dir={run_dir}", "model.freeze_finetune_updates=0", "model.mask_channel_prob=0",
        "model.mask_length=2", "dataset.validate_after_updates=0", *ONE_CPU_UPDATE,
        "optimization.max_update=2",  # tri_stage needs at least one update in one of its stages
        *overrides,
    ], cwd=run_dir)


@pytest.mark.parametrize("model, base", [("hubert_ctc", "hubert.pt"), ("wavlm_ctc", "wavlm.pt")])
def test_finetuning_config_trains(model, base, base_checkpoints, audio_corpus, tmp_path):
    proc = finetuning_run(model, base_checkpoints / base, audio_corpus, tmp_path)
    assert '"num_updates": "2"' in proc.stdout + proc.stderr
    assert (tmp_path / "checkpoints" / "checkpoint_last.pt").exists()
