"""fairseq's own HuBERT recipes run with the plugin loaded: pretraining, then hubert_ctc fine-tuning."""

import torch

import fairseq_siamctc  # noqa: F401
from conftest import CPU_OVERRIDES, FAIRSEQ_DIR, PLUGIN_DIR, TINY_HUBERT_OVERRIDES, run_fairseq
from fairseq import checkpoint_utils


def test_hubert_pretraining_then_ctc_finetuning_then_reload(audio_corpus, tmp_path):
    common = [f"common.user_dir={PLUGIN_DIR}", "dataset.max_tokens=100000",
              "optimization.max_update=2", *CPU_OVERRIDES]
    pretrain_dir, finetune_dir = tmp_path / "pretrain", tmp_path / "finetune"
    run_fairseq("fairseq-hydra-train", [
        "--config-dir", FAIRSEQ_DIR / "examples/hubert/config/pretrain",
        "--config-name", "hubert_base_librispeech",
        f"task.data={audio_corpus}", f"task.label_dir={audio_corpus}", "task.labels=[km]",
        "model.label_rate=50", "task.min_sample_size=8000", f"hydra.run.dir={pretrain_dir}",
        *common, *TINY_HUBERT_OVERRIDES,
    ], cwd=tmp_path)
    pretrained = pretrain_dir / "checkpoints" / "checkpoint_last.pt"

    proc = run_fairseq("fairseq-hydra-train", [
        "--config-dir", FAIRSEQ_DIR / "examples/hubert/config/finetune", "--config-name", "base_10h",
        f"task.data={audio_corpus}", f"task.label_dir={audio_corpus}", f"model.w2v_path={pretrained}",
        f"hydra.run.dir={finetune_dir}", "model.freeze_finetune_updates=0",
        "dataset.validate_after_updates=0", "model.mask_length=2", "model.mask_channel_length=4",
        *common,
    ], cwd=tmp_path)
    assert '"num_updates": "2"' in proc.stdout + proc.stderr

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(finetune_dir / "checkpoints" / "checkpoint_last.pt")],
        arg_overrides={"data": str(audio_corpus), "label_dir": str(audio_corpus)},
    )
    model = models[0].eval()
    assert cfg.model._name == "hubert_ctc"
    with torch.no_grad():
        out = model(source=torch.randn(1, 16000), padding_mask=None)
    # 1 s at 50 frames/s, one logit per letter of dict.ltr.txt plus fairseq's 4 specials
    assert out["encoder_out"].shape == (49, 1, len(task.target_dictionary))
    assert torch.isfinite(out["encoder_out"]).all()
