"""``wavlm_ctc``: CTC fine-tuning of a WavLM checkpoint with fairseq's stock recipe.

The counterpart of fairseq's ``hubert_ctc`` for the converted WavLM checkpoints (``{"cfg", "model"}``):
same configuration fields, same outputs, so that the ``audio_finetuning`` task with the ``ctc``
criterion trains it, e.g. fairseq's ``examples/wav2vec/config/finetuning/base_10h.yaml`` with
``model._name=wavlm_ctc model.w2v_path=wavlm_base.pt`` (fields that yaml does not list, such as
``mask_length``, are set with hydra's ``++model.mask_length=...``). ``w2v_path`` is read once; the
checkpoint's ``cfg`` is kept in ``model.w2v_args``, so that a fine-tuned checkpoint reloads
without the pre-trained file.
"""

import contextlib
from dataclasses import dataclass

import torch
from fairseq import utils
from fairseq.models import FairseqEncoder, register_model
from fairseq.models.hubert.hubert_asr import HubertAsrConfig, HubertCtc
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .wavlm import WavLM, WavLMConfig, build_wavlm_from_state, read_wavlm_checkpoint


@dataclass
class WavLMCtcConfig(HubertAsrConfig):
    """``hubert_ctc``'s fields; ``w2v_path`` is a WavLM checkpoint, ``w2v_args`` its ``cfg`` dict."""


def wavlm_overrides(cfg: WavLMCtcConfig) -> dict:
    """The fine-tuning values that replace the checkpoint's dropout, masking and layer drop."""
    names = {
        "dropout": "dropout", "activation_dropout": "activation_dropout", "dropout_input": "dropout_input",
        "attention_dropout": "attention_dropout", "mask_length": "mask_length", "mask_prob": "mask_prob",
        "mask_selection": "mask_selection", "mask_other": "mask_other", "no_mask_overlap": "no_mask_overlap",
        "mask_channel_length": "mask_channel_length", "mask_channel_prob": "mask_channel_prob",
        "mask_channel_selection": "mask_channel_selection", "mask_channel_other": "mask_channel_other",
        "no_mask_channel_overlap": "no_mask_channel_overlap", "encoder_layerdrop": "layerdrop",
        "feature_grad_mult": "feature_grad_mult",
    }
    # ChoiceEnum values (mask_selection) become plain strings for the WavLM config
    return {wavlm: getattr(getattr(cfg, ours), "value", getattr(cfg, ours)) for wavlm, ours in names.items()}


class WavLMCtcEncoder(FairseqEncoder):
    """WavLM followed by a linear layer to the target dictionary; outputs are time-major like HubertEncoder."""

    def __init__(self, cfg: WavLMCtcConfig, task):
        overrides = wavlm_overrides(cfg)
        if cfg.w2v_args is None:
            state = read_wavlm_checkpoint(cfg.w2v_path)
            _check_normalize(cfg.normalize, state["cfg"], cfg.w2v_path)
            model, _ = build_wavlm_from_state(
                state, cfg.w2v_path, overrides=overrides, load_weights=not cfg.no_pretrained_weights
            )
            cfg.w2v_args = dict(state["cfg"])
        else:  # a fine-tuned checkpoint being reloaded: its own weights follow
            w2v_cfg = _plain(cfg.w2v_args)
            _check_normalize(cfg.normalize, w2v_cfg, "model.w2v_args")
            model = WavLM(WavLMConfig.from_dict({**w2v_cfg, **overrides}, source="model.w2v_args"))
        super().__init__(task.source_dictionary)
        self.w2v_model = model
        self.apply_mask = cfg.apply_mask
        self.final_dropout = nn.Dropout(cfg.final_dropout)
        self.freeze_finetune_updates = cfg.freeze_finetune_updates
        self.num_updates = 0
        if task.target_dictionary is None:
            raise ValueError("wavlm_ctc needs a task with a target dictionary (e.g. audio_finetuning with labels)")
        self.proj = nn.Linear(model.cfg.encoder_embed_dim, len(task.target_dictionary))
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def set_num_updates(self, num_updates):
        super().set_num_updates(num_updates)
        self.num_updates = num_updates

    def forward(self, source, padding_mask=None, **kwargs):
        """source (B, S), padding_mask (B, S) -> encoder_out (T, B, V) logits, padding masks (B, T)."""
        fine_tune = self.freeze_finetune_updates <= self.num_updates
        with contextlib.nullcontext() if fine_tune else torch.no_grad():
            x, padding_mask = self.w2v_model.extract_features(
                source, padding_mask=padding_mask, mask=self.apply_mask and self.training
            )
        x = self.proj(self.final_dropout(x.transpose(0, 1)))
        return {"encoder_out": x, "encoder_padding_mask": padding_mask, "padding_mask": padding_mask}

    def reorder_encoder_out(self, encoder_out, new_order):
        encoder_out["encoder_out"] = encoder_out["encoder_out"].index_select(1, new_order)
        for key in ("encoder_padding_mask", "padding_mask"):
            if encoder_out[key] is not None:
                encoder_out[key] = encoder_out[key].index_select(0, new_order)
        return encoder_out

    def max_positions(self):
        return None


def _check_normalize(normalize: bool, w2v_cfg: dict, source: str) -> None:
    if bool(normalize) != bool(w2v_cfg.get("normalize", False)):
        raise ValueError(
            f"task.normalize={normalize} but the WavLM checkpoint {source} expects "
            f"normalize={w2v_cfg.get('normalize', False)}; set task.normalize to match"
        )


def _plain(cfg) -> dict:
    """w2v_args as a plain dict (it comes back from a saved checkpoint as an omegaconf node)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


@register_model("wavlm_ctc", dataclass=WavLMCtcConfig)
class WavLMCtc(HubertCtc):
    """HubertCtc around a WavLM encoder; padded frames are forced to blank in the outputs."""

    @classmethod
    def build_model(cls, cfg: WavLMCtcConfig, task):
        return cls(cfg, WavLMCtcEncoder(cfg, task))

    def get_logits(self, net_output):
        """(T, B, V) logits; padded frames get logit 0 for the blank (index 0) and -inf for the rest,
        so that decoders reading whole batches see silence there (HubertCtc's version leaves them as is)."""
        return blank_padded_frames(net_output["encoder_out"], net_output["padding_mask"])

    def get_normalized_probs(self, net_output, log_probs):
        logits = self.get_logits(net_output).float()
        return utils.log_softmax(logits, dim=-1) if log_probs else utils.softmax(logits, dim=-1)


def blank_padded_frames(logits: torch.Tensor, padding_mask) -> torch.Tensor:
    """logits (T, B, V), padding_mask (B, T) or None -> logits with padded frames set to certain blank."""
    if padding_mask is None:
        return logits
    blank_only = torch.full_like(logits[:1, :1], float("-inf"))
    blank_only[..., 0] = 0.0
    return torch.where(padding_mask.T.unsqueeze(-1), blank_only, logits)
