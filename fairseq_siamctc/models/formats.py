"""Checkpoint formats other than fairseq's: Hugging Face ``transformers`` directories and s3prl's
converted HuBERT file, mapped to and from the layouts the plugin runs.

The plugin runs fairseq's ``HubertModel`` (state dict and config of ``hubert_base_ls960.pt``) and its
own ``WavLM`` (the ``{cfg, model}`` layout of ``wavlm_base.pt``). This module owns the name tables
between those and ``transformers``' ``HubertModel`` / ``WavLMModel``, in both directions, and the
config mappings; it needs neither ``transformers`` nor its conversion scripts. Everything here is a
pure function of dicts and tensors except the directory reader and writer at the end.

What does not map one to one:
- weight norm: fairseq stores ``weight_g``/``weight_v``, current ``transformers`` the
  parametrization names ``parametrizations.weight.original0/1`` (older HF files the old names;
  both are read, the new ones are written, and ``from_pretrained`` accepts either);
- fairseq has no ``post_extract_proj`` when the CNN and the transformer have the same width, HF
  always has ``feature_projection.projection``: written as the identity, read back only if it is one;
- ``masked_spec_embed`` exists in HF only when masking is configured: the plugin's exports then
  keep ``mask_emb`` in the side file; a directory without either gets fairseq's own initialisation
  (seeded; ``mask_emb`` is used only with ``model.apply_mask``);
- HF has no ``final_proj`` and no label embeddings: an encoder read from HF has none (never an
  invented one), and the plugin's SiamCTC model then trains its own projection;
- ``normalize`` lives in ``preprocessor_config.json`` as ``do_normalize``.

A configuration one side cannot represent raises ``FormatError`` naming the field.
"""

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

HF_CONFIG = "config.json"
HF_PREPROCESSOR = "preprocessor_config.json"
HF_SAFETENSORS = "model.safetensors"
HF_BIN = "pytorch_model.bin"
# the SiamCTC parts transformers has no place for (projection, phi, psi) and HuBERT's pre-training heads
HF_SIDE_FILE = "siamctc_heads.safetensors"
SAMPLE_RATE = 16_000
HF_ACTIVATIONS = ("gelu", "relu")  # the feed-forward activations both sides compute identically
LAYER_NORM_EPS = 1e-5  # fairseq's LayerNorm and the plugin's WavLM

S3PRL_KEYS = ("task_cfg", "model_cfg", "model_weight", "dictionaries_symbols")


class FormatError(ValueError):
    """A checkpoint whose format or configuration cannot be mapped; the message names the field."""


# ---------------------------------------------------------------------------------------------------
# name tables: (fairseq / plugin name pattern, transformers name pattern), full matches, both directions


def name_table(kind: str, extractor_mode: str) -> List[Tuple[str, str]]:
    """The renaming rules of an encoder of ``kind`` ("hubert" or "wavlm"); the group-norm CNN
    ("default") holds its norm at index 2 of the first block, the layer-norm CNN at 2.1 of every block."""
    conv = r"feature_extractor\.conv_layers\.(\d+)"
    norm = (
        [(r"feature_extractor\.conv_layers\.(0)\.2\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2")]
        if extractor_mode == "default"
        else [(conv + r"\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2")]
    )
    layer = r"encoder\.layers\.(\d+)"
    rules = [
        (conv + r"\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
        *norm,
        (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
        (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
        (r"mask_emb", r"masked_spec_embed"),
        (r"encoder\.pos_conv\.0\.bias", r"encoder.pos_conv_embed.conv.bias"),
        (r"encoder\.pos_conv\.0\.weight_g", r"encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
        (r"encoder\.pos_conv\.0\.weight_v", r"encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
        (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
        (layer + r"\.self_attn\.(k|v|q|out)_proj\.(weight|bias)", r"encoder.layers.\1.attention.\2_proj.\3"),
        (layer + r"\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
        (layer + r"\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
        (layer + r"\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
        (layer + r"\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    ]
    if kind == "wavlm":
        rules += [
            (layer + r"\.self_attn\.relative_attention_bias\.weight", r"encoder.layers.\1.attention.rel_attn_embed.weight"),
            (layer + r"\.self_attn\.grep_linear\.(weight|bias)", r"encoder.layers.\1.attention.gru_rel_pos_linear.\2"),
            (layer + r"\.self_attn\.grep_a", r"encoder.layers.\1.attention.gru_rel_pos_const"),
        ]
    return rules


def _pattern_to_template(pattern: str) -> str:
    """``r"a\\.(\\d+)\\.b"`` -> ``r"a.\\1.b"``: a rule's left side as the replacement of the reverse rule."""
    groups = iter(range(1, 100))
    template = re.sub(r"\((?:[^()]*)\)", lambda _: f"\\{next(groups)}", pattern)
    return template.replace("\\.", ".")


def _template_to_pattern(template: str, pattern: str) -> str:
    """The reverse rule's pattern: the template with each ``\\k`` replaced by the k-th group of ``pattern``."""
    groups = re.findall(r"\((?:[^()]*)\)", pattern)
    escaped = re.escape(template)
    return re.sub(r"\\\\(\d)", lambda m: groups[int(m.group(1)) - 1], escaped)


def rename(state: Dict[str, Any], rules: List[Tuple[str, str]], reverse: bool = False, source: str = "") -> Dict[str, Any]:
    """Renames every key of ``state`` by the first matching rule (fairseq -> HF, or HF -> fairseq with
    ``reverse``); a key no rule matches is an error naming it."""
    compiled = []
    for left, right in rules:
        if reverse:
            compiled.append((re.compile(_template_to_pattern(right, left)), _pattern_to_template(left)))
        else:
            compiled.append((re.compile(left), right))
    out = {}
    for key, value in state.items():
        for pattern, template in compiled:
            match = pattern.fullmatch(key)
            if match:
                out[match.expand(template)] = value
                break
        else:
            raise FormatError(f"{source}weight {key!r} has no counterpart in the {'fairseq' if reverse else 'transformers'} model")
    return out


# ---------------------------------------------------------------------------------------------------
# configs


def conv_layers_string(dims, kernels, strides) -> str:
    """HF's three lists -> fairseq's ``conv_feature_layers`` expression."""
    if not len(dims) == len(kernels) == len(strides):
        raise FormatError(f"conv_dim, conv_kernel and conv_stride differ in length ({len(dims)}, {len(kernels)}, {len(strides)})")
    return "[" + ", ".join(f"({int(d)}, {int(k)}, {int(s)})" for d, k, s in zip(dims, kernels, strides)) + "]"


def _check_hf_config(config: Dict[str, Any]) -> None:
    checks = {
        "feat_extract_activation": (config.get("feat_extract_activation", "gelu"), "gelu"),
        "layer_norm_eps": (float(config.get("layer_norm_eps", LAYER_NORM_EPS)), LAYER_NORM_EPS),
        "conv_pos_batch_norm": (bool(config.get("conv_pos_batch_norm", False)), False),
    }
    if config["model_type"] == "hubert":
        checks["feat_proj_layer_norm"] = (bool(config.get("feat_proj_layer_norm", True)), True)
    for field, (value, needed) in checks.items():
        if value != needed:
            raise FormatError(f"{field}={value!r}: only {needed!r} has a counterpart in the plugin's encoders")
    if config.get("hidden_act", "gelu") not in HF_ACTIVATIONS:
        raise FormatError(f"hidden_act={config.get('hidden_act')!r}: only {HF_ACTIVATIONS} map to fairseq's activation_fn")
    if config.get("feat_extract_norm", "group") not in ("group", "layer"):
        raise FormatError(f"feat_extract_norm={config.get('feat_extract_norm')!r}: expected 'group' or 'layer'")


def _shared_from_hf(config: Dict[str, Any]) -> Dict[str, Any]:
    """The settings HuBERT and WavLM share, in fairseq's names."""
    _check_hf_config(config)
    return dict(
        extractor_mode="default" if config.get("feat_extract_norm", "group") == "group" else "layer_norm",
        encoder_layers=int(config["num_hidden_layers"]),
        encoder_embed_dim=int(config["hidden_size"]),
        encoder_ffn_embed_dim=int(config["intermediate_size"]),
        encoder_attention_heads=int(config["num_attention_heads"]),
        activation_fn=config.get("hidden_act", "gelu"),
        layer_norm_first=bool(config.get("do_stable_layer_norm", False)),
        conv_feature_layers=conv_layers_string(config["conv_dim"], config["conv_kernel"], config["conv_stride"]),
        conv_bias=bool(config.get("conv_bias", False)),
        dropout=float(config.get("hidden_dropout", 0.1)),
        attention_dropout=float(config.get("attention_dropout", 0.1)),
        activation_dropout=float(config.get("activation_dropout", 0.0)),
        encoder_layerdrop=float(config.get("layerdrop", 0.0)),
        dropout_input=float(config.get("feat_proj_dropout", 0.0)),
        mask_prob=float(config.get("mask_time_prob", 0.0)) if config.get("apply_spec_augment", True) else 0.0,
        mask_length=int(config.get("mask_time_length", 10)),
        mask_channel_prob=float(config.get("mask_feature_prob", 0.0)) if config.get("apply_spec_augment", True) else 0.0,
        mask_channel_length=int(config.get("mask_feature_length", 10)),
        conv_pos=int(config["num_conv_pos_embeddings"]),
        conv_pos_groups=int(config["num_conv_pos_embedding_groups"]),
    )


def _shared_to_hf(cfg: Dict[str, Any], kind: str) -> Dict[str, Any]:
    from .wavlm import parse_conv_layers  # the safe parser of conv_feature_layers

    activation = cfg.get("activation_fn", "gelu")
    if activation not in HF_ACTIVATIONS:
        raise FormatError(f"activation_fn={activation!r}: transformers' {kind} computes only {HF_ACTIVATIONS} identically")
    conv = parse_conv_layers(cfg["conv_feature_layers"])
    mask_prob, channel_prob = float(cfg.get("mask_prob", 0.0)), float(cfg.get("mask_channel_prob", 0.0))
    extractor_mode = str(cfg.get("extractor_mode", "default"))
    if extractor_mode not in ("default", "layer_norm"):
        raise FormatError(f"extractor_mode={extractor_mode!r}: transformers has only group- and layer-norm CNNs")
    return dict(
        model_type=kind,
        architectures=["HubertModel" if kind == "hubert" else "WavLMModel"],
        hidden_size=int(cfg["encoder_embed_dim"]),
        num_hidden_layers=int(cfg["encoder_layers"]),
        num_attention_heads=int(cfg["encoder_attention_heads"]),
        intermediate_size=int(cfg["encoder_ffn_embed_dim"]),
        hidden_act=activation,
        hidden_dropout=float(cfg.get("dropout", 0.1)),
        attention_dropout=float(cfg.get("attention_dropout", 0.1)),
        activation_dropout=float(cfg.get("activation_dropout", 0.0)),
        feat_proj_dropout=float(cfg.get("dropout_input", 0.0)),
        layerdrop=float(cfg.get("encoder_layerdrop", 0.0)),
        layer_norm_eps=LAYER_NORM_EPS,
        feat_extract_norm="group" if extractor_mode == "default" else "layer",
        feat_extract_activation="gelu",
        conv_dim=[d for d, _, _ in conv],
        conv_kernel=[k for _, k, _ in conv],
        conv_stride=[s for _, _, s in conv],
        num_feat_extract_layers=len(conv),
        conv_bias=bool(cfg.get("conv_bias", False)),
        num_conv_pos_embeddings=int(cfg["conv_pos"]),
        num_conv_pos_embedding_groups=int(cfg["conv_pos_groups"]),
        do_stable_layer_norm=bool(cfg.get("layer_norm_first", False)),
        apply_spec_augment=mask_prob > 0 or channel_prob > 0,
        mask_time_prob=mask_prob,
        mask_time_length=int(cfg.get("mask_length", 10)),
        mask_feature_prob=channel_prob,
        mask_feature_length=int(cfg.get("mask_channel_length", 10)),
        dtype="float32",
    )


def hf_preprocessor_config(normalize: bool, extractor_mode: str) -> Dict[str, Any]:
    """``preprocessor_config.json`` of a ``Wav2Vec2FeatureExtractor``; attention masks only for the
    layer-norm CNN, as HF's own HuBERT/WavLM Large (its group-norm models expect none)."""
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": SAMPLE_RATE,
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": bool(normalize),
        "return_attention_mask": extractor_mode == "layer_norm",
    }


def _plain_dataclass(cls, **values) -> Dict[str, Any]:
    """A fairseq config dataclass's defaults as plain python (enums as strings), updated with ``values``."""
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out[f.name] = str(default) if isinstance(default, str) else default  # StrEnum -> str
    out.update(values)
    return out


def hubert_cfg_from_hf(config: Dict[str, Any], normalize: bool) -> Dict[str, Any]:
    """A HF ``HubertConfig`` dict -> the whole fairseq run config of a HuBERT checkpoint (model and
    task as in ``hubert_base_ls960.pt``), as plain python."""
    from fairseq.models.hubert import HubertConfig
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

    model = _plain_dataclass(HubertConfig, _name="hubert", final_dim=0, **_shared_from_hf(config))
    task = _plain_dataclass(HubertPretrainingConfig, _name="hubert_pretraining", data="", labels=["km"],
                            normalize=bool(normalize), sample_rate=SAMPLE_RATE)
    model["label_rate"] = task["label_rate"]
    return {"_name": None, "common": {"_name": None}, "model": model, "task": task}


def wavlm_cfg_from_hf(config: Dict[str, Any], normalize: bool) -> Dict[str, Any]:
    """A HF ``WavLMConfig`` dict -> the ``cfg`` dict of a converted WavLM checkpoint."""
    from .wavlm import WavLMConfig

    return WavLMConfig(
        **_shared_from_hf(config),
        normalize=bool(normalize),
        num_buckets=int(config.get("num_buckets", 320)),
        max_distance=int(config.get("max_bucket_distance", 800)),
        relative_position_embedding=True,
        gru_rel_pos=True,
    ).to_dict()


def hf_config_from_hubert(cfg: Dict[str, Any]) -> Tuple[Dict[str, Any], bool]:
    """A fairseq HuBERT run config (plain dict) -> (HF ``HubertConfig`` dict, do_normalize)."""
    model = cfg["model"]
    for field, supported in (("layer_type", "transformer"), ("pos_conv_depth", 1)):
        if field in model and model[field] not in (supported, None):
            raise FormatError(f"model.{field}={model[field]!r}: transformers' HubertModel supports only {supported!r}")
    return {**_shared_to_hf(model, "hubert"), "feat_proj_layer_norm": True}, bool(cfg["task"].get("normalize", False))


def hf_config_from_wavlm(cfg: Dict[str, Any]) -> Tuple[Dict[str, Any], bool]:
    """A WavLM ``cfg`` dict -> (HF ``WavLMConfig`` dict, do_normalize)."""
    for field in ("relative_position_embedding", "gru_rel_pos"):
        if not cfg.get(field, True):
            raise FormatError(f"{field}=False: transformers' WavLMModel always has the gated relative position bias")
    config = {**_shared_to_hf(cfg, "wavlm"), "num_buckets": int(cfg.get("num_buckets", 320)),
              "max_bucket_distance": int(cfg.get("max_distance", 800))}
    return config, bool(cfg.get("normalize", False))


# ---------------------------------------------------------------------------------------------------
# weights


def _encoder_rules(kind: str, cfg_model: Dict[str, Any]) -> List[Tuple[str, str]]:
    return name_table(kind, str(cfg_model.get("extractor_mode", "default")))


def hf_state_from_encoder(kind: str, cfg_model: Dict[str, Any], state: Dict[str, torch.Tensor],
                          hf_config: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The plugin's HuBERT/WavLM state dict -> a ``transformers`` state dict of the same model.

    HuBERT's pre-training parts (``final_proj``, ``label_embs_concat``, ``target_glu``) are not part
    of it; ``split_pretraining_heads`` returns them for the side file."""
    encoder_state, _ = split_pretraining_heads(state)
    if "post_extract_proj.weight" not in encoder_state:  # HF always projects: the identity here
        dim = int(hf_config["hidden_size"])
        encoder_state["post_extract_proj.weight"] = torch.eye(dim)
        encoder_state["post_extract_proj.bias"] = torch.zeros(dim)
    if not hf_config["apply_spec_augment"]:
        encoder_state.pop("mask_emb", None)  # HF builds masked_spec_embed only when masking is on
    return {k: v.contiguous() for k, v in rename(encoder_state, _encoder_rules(kind, cfg_model)).items()}


PRETRAINING_HEADS = ("final_proj.", "label_embs_concat", "target_glu.")


def split_pretraining_heads(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(encoder weights, HuBERT's pre-training heads) of a fairseq HuBERT state dict."""
    heads = {k: v for k, v in state.items() if k.startswith(PRETRAINING_HEADS)}
    return {k: v for k, v in state.items() if k not in heads}, heads


def encoder_state_from_hf(kind: str, cfg_model: Dict[str, Any], hf_state: Dict[str, torch.Tensor],
                          source: str = "") -> Dict[str, torch.Tensor]:
    """A ``transformers`` HubertModel/WavLMModel state dict -> the plugin's state dict of the same
    encoder (fairseq names; without pre-training heads)."""
    hf_state = {
        key.replace("conv.weight_g", "conv.parametrizations.weight.original0")
           .replace("conv.weight_v", "conv.parametrizations.weight.original1"): value
        for key, value in hf_state.items()
    }
    prefix = f"{kind}."  # a HubertForCTC & co. directory holds the encoder under ``hubert.``
    if any(k.startswith(prefix) for k in hf_state):
        others = sorted(k for k in hf_state if not k.startswith(prefix))
        raise FormatError(f"{source}holds a model with a head ({', '.join(others[:3])}), not a bare "
                          f"{'HubertModel' if kind == 'hubert' else 'WavLMModel'}")
    state = rename(hf_state, _encoder_rules(kind, cfg_model), reverse=True, source=source)
    conv_dim = int(re.findall(r"\((\d+)", cfg_model["conv_feature_layers"])[-1])
    if conv_dim == int(cfg_model["encoder_embed_dim"]):
        weight, bias = state.pop("post_extract_proj.weight"), state.pop("post_extract_proj.bias")
        if not (torch.equal(weight, torch.eye(conv_dim, dtype=weight.dtype)) and not bias.any()):
            raise FormatError(f"{source}feature_projection.projection is not the identity, and fairseq's model has no "
                              "projection when conv_dim[-1] equals hidden_size")
    if "mask_emb" not in state:
        # used only when SiamCTC trains with model.apply_mask; fairseq's own initialisation, seeded
        generator = torch.Generator().manual_seed(0)
        state["mask_emb"] = torch.rand(int(cfg_model["encoder_embed_dim"]), generator=generator)
    return state


# ---------------------------------------------------------------------------------------------------
# s3prl's converted HuBERT


def is_s3prl_state(state: Any) -> bool:
    return isinstance(state, dict) and all(key in state for key in S3PRL_KEYS)


def fairseq_state_from_s3prl(state: Dict[str, Any], source: str = "") -> Dict[str, Any]:
    """s3prl's converted HuBERT ``{task_cfg, model_cfg, model_weight, dictionaries_symbols}`` -> the
    parts of a fairseq HuBERT checkpoint the plugin reads (``cfg``, ``model``, label-set sizes)."""
    model_cfg, task_cfg = dict(state["model_cfg"]), dict(state["task_cfg"])
    model_cfg.setdefault("_name", "hubert")
    task_cfg.setdefault("_name", "hubert_pretraining")
    if model_cfg["_name"] != "hubert":
        raise FormatError(f"{source}model_cfg._name={model_cfg['_name']!r}: expected a converted HuBERT")
    symbols = state["dictionaries_symbols"]
    if not isinstance(symbols, (list, tuple)) or not all(isinstance(s, (list, tuple)) for s in symbols):
        raise FormatError(f"{source}dictionaries_symbols is not a list of symbol lists")
    return {
        "cfg": {"_name": None, "common": {"_name": None}, "model": model_cfg, "task": task_cfg},
        "model": state["model_weight"],
        "label_set_sizes": [len(s) for s in symbols],
    }


def s3prl_state_from_fairseq(cfg: Dict[str, Any], model_state: Dict[str, torch.Tensor],
                             label_symbols: Optional[List[List[str]]]) -> Dict[str, Any]:
    """A fairseq HuBERT (plain-python config, state dict, label symbols) -> s3prl's converted layout,
    which s3prl's ``hubert_local`` loads without fairseq: plain dicts and lists only."""
    if label_symbols is None or "final_proj.weight" not in model_state:
        raise FormatError("final_proj: the encoder has no HuBERT pre-training head (it came from a Hugging Face "
                          "directory), which s3prl's HubertModel always builds and loads strictly")
    return {
        "task_cfg": dict(cfg["task"]),
        "model_cfg": dict(cfg["model"]),
        "model_weight": model_state,
        "dictionaries_symbols": [list(s) for s in label_symbols],
    }


# ---------------------------------------------------------------------------------------------------
# Hugging Face directories on disk


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(value, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return value


def _load_weight_file(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise FormatError(f"{path}: weight file not found")
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and the unpickler raise many kinds on foreign bytes
        text = str(err).strip().splitlines()
        raise FormatError(f"{path}: not a readable weight file ({text[0] if text else type(err).__name__})") from err


def is_hf_directory(path) -> bool:
    return Path(path).is_dir() and (Path(path) / HF_CONFIG).is_file()


def read_hf_weights(directory: Path) -> Dict[str, torch.Tensor]:
    """The state dict of a HF model directory: ``model.safetensors``, ``pytorch_model.bin`` or their
    sharded ``*.index.json`` forms (in that order of preference)."""
    for name in (HF_SAFETENSORS, HF_BIN):
        if (directory / name).is_file():
            return _load_weight_file(directory / name)
        index = directory / f"{name}.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise FormatError(f"{index}: no weight_map")
            state = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_load_weight_file(directory / shard))
            missing = sorted(set(weight_map) - set(state))
            if missing:
                raise FormatError(f"{index}: weights listed but not in their shards: {missing[:3]}")
            return state
    raise FormatError(f"{directory}: no {HF_SAFETENSORS}, {HF_BIN} or sharded index")


def read_side_file(directory: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The side file of a directory ``siamctc-export --format hf`` wrote: (tensors, metadata), or empty."""
    path = directory / HF_SIDE_FILE
    if not path.is_file():
        return {}, {}
    from safetensors import safe_open

    tensors = _load_weight_file(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return tensors, {k: json.loads(v) for k, v in metadata.items()}


def read_hf_directory(directory) -> Dict[str, Any]:
    """A HF HubertModel / WavLMModel directory -> ``{"kind", "cfg", "model", "label_set_sizes"}`` in the
    plugin's layouts (a fairseq HuBERT run config or a WavLM cfg dict; fairseq/plugin weight names).

    HuBERT's pre-training heads come back from the side file when the directory was written by
    ``siamctc-export``; otherwise the encoder has none."""
    directory = Path(directory)
    source = f"{directory}: "
    config = _read_json(directory / HF_CONFIG)
    kind = config.get("model_type")
    if kind not in ("hubert", "wavlm"):
        raise FormatError(f"{source}model_type={kind!r}: only Hugging Face 'hubert' and 'wavlm' models are read")
    preprocessor = _read_json(directory / HF_PREPROCESSOR) if (directory / HF_PREPROCESSOR).is_file() else {}
    normalize = bool(preprocessor.get("do_normalize", False))
    try:
        if kind == "hubert":
            cfg = hubert_cfg_from_hf(config, normalize)
            cfg_model = cfg["model"]
        else:
            cfg = cfg_model = wavlm_cfg_from_hf(config, normalize)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, FormatError):
            raise FormatError(f"{source}{err}") from err
        raise FormatError(f"{source}config.json lacks or mistypes a field the model needs ({err!r})") from err
    state = encoder_state_from_hf(kind, cfg_model, read_hf_weights(directory), source)
    side, metadata = read_side_file(directory)
    label_set_sizes = None
    heads = {k[len("encoder."):]: v for k, v in side.items() if k.startswith("encoder.")}
    if heads:
        state.update(heads)
        label_set_sizes = metadata.get("label_set_sizes")
        if "final_dim" in metadata:
            cfg["model"]["final_dim"] = metadata["final_dim"]
    return {"kind": kind, "cfg": cfg, "model": state, "label_set_sizes": label_set_sizes,
            "heads": {k: v for k, v in side.items() if not k.startswith("encoder.")}, "metadata": metadata}


def hf_directory_files(kind: str, cfg: Dict[str, Any], state: Dict[str, torch.Tensor],
                       heads: Optional[Dict[str, torch.Tensor]] = None,
                       metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Callable[[Path], None]]:
    """What a HF directory of the plugin's encoder holds: file name -> writer of that file.

    ``cfg``: a fairseq HuBERT run config or a WavLM cfg dict (plain python); ``heads``: SiamCTC's
    projection and heads (fairseq names), kept with HuBERT's pre-training heads in the side file."""
    from safetensors.torch import save_file

    if kind == "hubert":
        hf_config, normalize = hf_config_from_hubert(cfg)
        cfg_model = cfg["model"]
    else:
        hf_config, normalize = hf_config_from_wavlm(cfg)
        cfg_model = cfg
    hf_state = hf_state_from_encoder(kind, cfg_model, state, hf_config)
    _, pretraining = split_pretraining_heads(state)
    if not hf_config["apply_spec_augment"] and "mask_emb" in state:
        pretraining["mask_emb"] = state["mask_emb"]  # no place in HF without masking: kept beside it
    side = {**{f"encoder.{k}": v for k, v in pretraining.items()}, **(heads or {})}
    side_metadata = dict(metadata or {})
    if kind == "hubert" and pretraining:
        side_metadata["final_dim"] = cfg_model.get("final_dim", 0)
    files: Dict[str, Callable[[Path], None]] = {
        HF_CONFIG: lambda p: p.write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n"),
        HF_PREPROCESSOR: lambda p: p.write_text(
            json.dumps(hf_preprocessor_config(normalize, str(cfg_model.get("extractor_mode", "default"))), indent=2) + "\n"),
        HF_SAFETENSORS: lambda p: save_file(hf_state, str(p), metadata={"format": "pt"}),
    }
    if side:
        files[HF_SIDE_FILE] = lambda p: save_file(
            {k: v.contiguous() for k, v in side.items()}, str(p),
            metadata={k: json.dumps(v) for k, v in side_metadata.items()})
    return files


def write_directory_atomically(out_dir, files: Dict[str, Callable[[Path], None]], force: bool = False) -> None:
    """Writes ``files`` into a new directory next to ``out_dir`` and renames it into place, so that
    ``out_dir`` is never half-written; an existing ``out_dir`` is replaced only with ``force``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (force and out_dir.is_dir()):
        raise FileExistsError(f"{out_dir} exists" + ("" if out_dir.is_dir() else " and is not a directory")
                              + ("; use --force to replace it" if out_dir.is_dir() else ""))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        for name, write in files.items():
            write(staging / name)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
            os.replace(out_dir, old / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_file_atomically(path, write: Callable[[Path], None], force: bool = False) -> None:
    """Writes one file through a temporary file in the same folder and ``os.replace``; no temporary
    file is left behind on failure; an existing ``path`` is replaced only with ``force``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name")
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; use --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
