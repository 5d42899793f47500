"""Tiny random base checkpoints in the published layouts.

HuBERT: saved the way fairseq's trainer saves ``hubert_base_ls960.pt``, built with fairseq's own
classes (HubertConfig, HubertPretrainingTask, Dictionary). WavLM: ``{"cfg": dict, "model": state dict}``
as ``wavlm_base.pt``.
"""

import dataclasses

import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary
from fairseq.models.hubert import HubertConfig, HubertModel
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig, HubertPretrainingTask
from omegaconf import OmegaConf

from fairseq_siamctc.models.wavlm import WavLM, WavLMConfig

TINY_CONV = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"
SAMPLE_RATE = 16_000


def tiny_hubert_model_cfg(**overrides) -> dict:
    cfg = dataclasses.asdict(HubertConfig())
    cfg.update(
        _name="hubert",
        label_rate=50.0,
        conv_feature_layers=TINY_CONV,
        encoder_layers=2,
        encoder_embed_dim=48,
        encoder_ffn_embed_dim=64,
        encoder_attention_heads=4,
        conv_pos=16,
        conv_pos_groups=4,
        final_dim=256,
        dropout=0.1,
        attention_dropout=0.1,
        encoder_layerdrop=0.0,
        dropout_input=0.1,
        dropout_features=0.1,
        feature_grad_mult=0.1,
    )
    cfg.update(overrides)
    return cfg


def km_dictionary(n_units: int) -> Dictionary:
    dictionary = Dictionary()
    for unit in range(n_units):
        dictionary.add_symbol(str(unit))
    return dictionary


def tiny_hubert_checkpoint(path, n_units: int = 20, seed: int = 0, **model_overrides) -> HubertModel:
    """Writes a fairseq HuBERT pre-training checkpoint to ``path`` and returns the model it holds."""
    torch.manual_seed(seed)
    model_cfg = tiny_hubert_model_cfg(**model_overrides)
    task_cfg = dataclasses.asdict(HubertPretrainingConfig(data="/unused", labels=["km"], label_rate=50.0))
    task_cfg["_name"] = "hubert_pretraining"
    task = HubertPretrainingTask(OmegaConf.structured(HubertPretrainingConfig(data="/unused", labels=["km"])))
    task.state.add_factory("dictionaries", lambda: [km_dictionary(n_units)])
    hubert_cfg = OmegaConf.merge(OmegaConf.structured(HubertConfig), {k: v for k, v in model_cfg.items() if k != "_name"})
    model = HubertModel(hubert_cfg, OmegaConf.create(task_cfg), task.dictionaries)
    # non-zero group-norm and layer-norm affine parameters so that a wrong normalisation shows
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.startswith("layer_norm"):
                param.add_(0.1 * torch.randn_like(param))
    model.eval()
    state = {
        "args": None,
        "cfg": {
            "_name": None,
            "common": {"_name": None, "seed": seed, "user_dir": None},
            "model": model_cfg,
            "task": task_cfg,
            "criterion": {"_name": "hubert", "pred_masked_weight": 1.0},
        },
        "model": model.state_dict(),
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "HubertCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": None},
                "num_updates": 10,
            }
        ],
        "task_state": task.state_dict(),
        "extra_state": {"metrics": {}, "previous_training_time": 1.0},
        "last_optimizer_state": None,
    }
    checkpoint_utils.torch_persistent_save(state, str(path))
    return model


def tiny_wavlm_checkpoint(path, seed: int = 0, **overrides) -> WavLM:
    """Writes a converted-format WavLM checkpoint to ``path`` and returns the model it holds."""
    torch.manual_seed(seed)
    values = dict(
        extractor_mode="default", encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=48,
        encoder_attention_heads=4, conv_feature_layers=TINY_CONV, conv_pos=8, conv_pos_groups=4,
        num_buckets=16, max_distance=40, dropout=0.1, attention_dropout=0.1, dropout_input=0.1,
        feature_grad_mult=0.1,
    )
    cfg = WavLMConfig.from_dict({**values, **overrides}).to_dict()
    model = WavLM(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "grep" in name:
                param.add_(0.1 * torch.randn_like(param))
    torch.save({"cfg": cfg, "model": model.state_dict()}, path)
    return model.eval()
