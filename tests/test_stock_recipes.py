"""fairseq's own HuBERT recipes run with the plugin loaded: pretraining, then hubert_ctc fine-tuning."""

import torch

import fairseq_siamctc  # noqa: F401
from fairseq import checkpoint_utils


def test_hubert_pretraining_then_ctc_finetuning_then_reload(stock_hubert_runs):
    pretrained, finetuned, log = stock_hubert_runs
    assert pretrained.exists()
    assert '"num_updates": "2"' in log

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(finetuned)])
    model = models[0].eval()
    assert cfg.model._name == "hubert_ctc"
    with torch.no_grad():
        out = model(source=torch.randn(1, 16000), padding_mask=None)
    # 1 s at 50 frames/s, one logit per letter of dict.ltr.txt plus fairseq's 4 specials
    assert out["encoder_out"].shape == (49, 1, len(task.target_dictionary))
    assert len(task.target_dictionary) == 4 + 5
    assert torch.isfinite(out["encoder_out"]).all()
