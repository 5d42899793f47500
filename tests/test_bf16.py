"""fairseq's bf16 (``common.bf16=true``: bf16 weights and activations, fp32 master weights, no loss
scaler) with the plugin's SiamCTC and fine-tuning configs. The plugin lets it run on a CPU, where
torch has bf16 kernels, so these configs are checked here before a GPU run."""

import math
import re

import pytest
import torch

from conftest import CPU_OVERRIDES, PLUGIN_DIR, run_fairseq
from fairseq_siamctc.cli.export import export
from test_configs import finetuning_run

EXAMPLES = PLUGIN_DIR.parent / "examples"
BF16 = ["common.fp16=false", "common.bf16=true"]
TWO_UPDATES = ["optimization.max_update=2", "dataset.valid_subset=valid"]


def logged_losses(log: str) -> list:
    """The training losses fairseq logged, one per update (log_interval=1), in order."""
    return [float(v) for v in re.findall(r'"update": [\d.]+, "loss": "([^"]+)"', log)]


def siamctc_run(config, encoder, corpus, run_dir, *overrides):
    proc = run_fairseq("fairseq-hydra-train", [
        "--config-dir", EXAMPLES / "siamctc", "--config-name", config, f"task.data={corpus}",
        f"model.encoder_path={encoder}", f"hydra.run.dir={run_dir}", "dataset.batch_size=2",
        *CPU_OVERRIDES, *TWO_UPDATES, *overrides,
    ], cwd=run_dir.parent)
    return proc.stdout + proc.stderr


def float_dtypes(checkpoint) -> set:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return {v.dtype for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point()}


@pytest.mark.parametrize("config, base", [("hubert_base", "hubert.pt"), ("wavlm_base", "wavlm.pt")])
def test_siamctc_config_trains_two_bf16_updates_and_exports_float32(config, base, base_checkpoints,
                                                                     audio_corpus, tmp_path):
    log = siamctc_run(config, base_checkpoints / base, audio_corpus, tmp_path / "bf16", *BF16)
    assert '"num_updates": "2"' in log
    losses = logged_losses(log)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    # fairseq saves float32 copies of bf16 weights; the export must be float32 as the base checkpoints
    export(tmp_path / "bf16" / "checkpoints" / "checkpoint_last.pt", tmp_path / "exported.pt")
    assert float_dtypes(tmp_path / "exported.pt") == {torch.float32}


def test_bf16_loss_is_the_fp32_loss_to_bf16_rounding(base_checkpoints, audio_corpus, tmp_path):
    """Same seed, data and views: the first batch's loss (before any update) differs only by the
    precision. bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per operation); through a
    2-layer encoder, a 256-dim projection and sums over ~400 frames the errors stay far below 5 %,
    while a run that silently stayed in fp32 would print the same loss to every digit."""
    fp32 = logged_losses(siamctc_run("hubert_base", base_checkpoints / "hubert.pt", audio_corpus, tmp_path / "fp32"))
    bf16 = logged_losses(siamctc_run("hubert_base", base_checkpoints / "hubert.pt", audio_corpus, tmp_path / "bf16",
                                     *BF16))
    assert bf16[0] != fp32[0]
    assert bf16[0] == pytest.approx(fp32[0], rel=0.05)


@pytest.mark.parametrize("model, base", [("hubert_ctc", "hubert.pt"), ("wavlm_ctc", "wavlm.pt")])
def test_finetuning_config_trains_two_bf16_updates(model, base, base_checkpoints, audio_corpus, tmp_path):
    proc = finetuning_run(model, base_checkpoints / base, audio_corpus, tmp_path, *BF16)
    log = proc.stdout + proc.stderr
    assert '"num_updates": "2"' in log
    losses = logged_losses(log)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
