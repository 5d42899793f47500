"""Reading, recognising and writing the checkpoints SiamCTC starts from and exports to.

Three kinds are recognised from a file's contents, never from its name:

- ``hubert``: a fairseq checkpoint whose config names the model ``hubert`` (``cfg.model._name``, or
  ``args.arch`` in checkpoints written before fairseq moved to hydra), weights under ``model``, the
  label dictionaries of the pre-training task under ``task_state`` (as in ``hubert_base_ls960.pt``);
  also s3prl's converted HuBERT (``{task_cfg, model_cfg, model_weight, dictionaries_symbols}``, the
  files of ``s3prl/converted_ckpts``) and a Hugging Face ``HubertModel`` directory;
- ``wavlm``: the converted WavLM checkpoint (``wavlm_base.pt``): a dict with ``cfg``, a plain dict of
  WavLM's settings, and ``model``, a state dict holding WavLM's gated relative position bias; also a
  Hugging Face ``WavLMModel`` directory;
- ``siamctc``: a fairseq training checkpoint of this plugin's ``siamctc`` model.

The foreign layouts are mapped to the first two by ``formats``; ``Checkpoint.format`` says which
layout the file had. Every file is loaded with ``weights_only`` or safetensors.

A SiamCTC model keeps a record of the checkpoint its encoder came from (kind, the base model's whole
config and the sizes of HuBERT's label sets) in its own state dict, under ``_extra_state``. Export and
feature extraction rebuild the encoder from that record, so the original file is not needed again.
"""

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from omegaconf import DictConfig, OmegaConf

from .formats import (
    FormatError,
    fairseq_state_from_s3prl,
    is_hf_directory,
    is_s3prl_state,
    read_hf_directory,
    s3prl_state_from_fairseq,
    write_file_atomically,
)
from .wavlm import is_wavlm_state

HUBERT = "hubert"
WAVLM = "wavlm"
SIAMCTC = "siamctc"
# the layouts a checkpoint is read from (and siamctc-export writes)
FAIRSEQ, S3PRL, HF = "fairseq", "s3prl", "hf"

# where a SiamCTC state dict holds the record of its base checkpoint (nn.Module extra state of the root)
ENCODER_RECORD_KEY = "_extra_state"


_EXPECTED = {
    HUBERT: "a HuBERT checkpoint (fairseq, s3prl-converted or a Hugging Face directory)",
    WAVLM: "a WavLM checkpoint ({'cfg', 'model'} or a Hugging Face directory)",
    SIAMCTC: "a SiamCTC training checkpoint",
}
_FOUND = {HUBERT: "a HuBERT checkpoint", WAVLM: "a WavLM checkpoint", SIAMCTC: "a SiamCTC training checkpoint"}


class CheckpointError(ValueError):
    """A file that is not a checkpoint this plugin can use; the message says what was found."""


@dataclass
class Checkpoint:
    kind: str
    path: str
    cfg: Any  # hubert, siamctc: the fairseq run's DictConfig; wavlm: the plain settings dict
    model: Dict[str, Any]
    state: Dict[str, Any]
    format: str = FAIRSEQ


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler fails in many ways on foreign bytes (KeyError, EOFError, ...)
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if refused:
            raise CheckpointError(
                f"{path}: the checkpoint holds a Python object that safe loading (weights_only) refuses: "
                f"{refused.group(1)}; import fairseq_siamctc first (it allows the classes fairseq checkpoints hold)"
            ) from err
        text = str(err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__
        raise CheckpointError(f"{path}: not a checkpoint: truncated or corrupt file ({reason})") from err


def fairseq_model_name(state: Any) -> Optional[str]:
    """The model name a fairseq checkpoint was trained with, or None if ``state`` is not one."""
    if not isinstance(state, dict) or "model" not in state:
        return None
    cfg = state.get("cfg")
    if cfg is not None and "model" in cfg and cfg["model"] is not None:
        model_cfg = cfg["model"]
        name = model_cfg.get("_name") if hasattr(model_cfg, "get") else getattr(model_cfg, "_name", None)
        if name is None and hasattr(model_cfg, "get"):
            name = model_cfg.get("arch")
        return None if name is None else str(name)
    args = state.get("args")
    if isinstance(args, argparse.Namespace):
        return getattr(args, "arch", None) or getattr(args, "_name", None)
    return None


def describe(state: Any) -> str:
    """A short description of what a loaded file holds, for error messages."""
    name = fairseq_model_name(state)
    if name is not None:
        return f"a fairseq checkpoint of model '{name}'"
    if isinstance(state, dict):
        keys = ", ".join(repr(k) for k in list(state)[:8])
        if isinstance(state.get("cfg"), dict) and isinstance(state.get("model"), dict):
            return f"a dict with 'cfg' and 'model' that is no WavLM checkpoint (cfg keys: {', '.join(list(state['cfg'])[:8])})"
        return f"a dict with keys {keys}" if keys else "an empty dict"
    return f"a pickled {type(state).__name__}"


def read_checkpoint(path, allowed=(HUBERT, WAVLM, SIAMCTC)) -> Checkpoint:
    """Loads ``path`` and recognises its kind; raises FileNotFoundError / CheckpointError with what was found."""
    path = Path(path)
    if path.is_dir():
        return _read_hf_checkpoint(path, allowed)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = _torch_load(path)
    layout = FAIRSEQ
    if is_s3prl_state(state):
        state, layout = _from_s3prl(state, path), S3PRL
    name = fairseq_model_name(state)
    if name in (HUBERT, SIAMCTC):
        kind = name
        cfg = state.get("cfg")
        if cfg is None:
            cfg = convert_namespace_to_omegaconf(state["args"])
        elif not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(cfg, flags={"allow_objects": True})
        state["cfg"] = cfg
    elif is_wavlm_state(state):
        kind, cfg = WAVLM, state["cfg"]
    else:
        kind = None
    if kind not in allowed:
        expected = " or ".join(_EXPECTED[k] for k in allowed)
        found = describe(state) if kind is None else _FOUND[kind]
        raise CheckpointError(f"{path}: expected {expected}, found {found}")
    return Checkpoint(kind=kind, path=str(path), cfg=cfg, model=state["model"], state=state, format=layout)


def _from_s3prl(state: Dict[str, Any], path: Path) -> Dict[str, Any]:
    try:
        converted = fairseq_state_from_s3prl(state, f"{path}: ")
    except FormatError as err:
        raise CheckpointError(str(err)) from err
    converted["task_state"] = {"dictionaries": [label_dictionary(n) for n in converted.pop("label_set_sizes")]}
    return converted


def _read_hf_checkpoint(path: Path, allowed) -> Checkpoint:
    """A Hugging Face model directory as a ``hubert`` or ``wavlm`` checkpoint."""
    if not is_hf_directory(path):
        raise CheckpointError(f"{path}: a directory without config.json, not a Hugging Face model directory")
    try:
        read = read_hf_directory(path)
    except FormatError as err:
        raise CheckpointError(str(err)) from err
    kind = read["kind"]
    if kind not in allowed:
        expected = " or ".join(_EXPECTED[k] for k in allowed)
        raise CheckpointError(f"{path}: expected {expected}, found a Hugging Face {kind} directory")
    sizes = read["label_set_sizes"]
    state = {"cfg": read["cfg"], "model": read["model"], "hf_heads": read["heads"], "hf_metadata": read["metadata"],
             "task_state": {} if sizes is None else {"dictionaries": [label_dictionary(n) for n in sizes]}}
    cfg = OmegaConf.create(read["cfg"]) if kind == HUBERT else read["cfg"]
    state["cfg"] = cfg
    return Checkpoint(kind=kind, path=str(path), cfg=cfg, model=read["model"], state=state, format=HF)


def plain(cfg: Any) -> Any:
    """A config as plain Python containers (what safe loading accepts inside a state dict)."""
    if isinstance(cfg, argparse.Namespace):
        cfg = convert_namespace_to_omegaconf(cfg)
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return cfg


def hubert_label_set_sizes(checkpoint: Checkpoint) -> Optional[List[int]]:
    """Sizes of HuBERT's pre-training label sets (fixes ``label_embs_concat``), or None if it has none.

    Taken from the stored task dictionaries where the checkpoint has them, else from the shape of
    ``label_embs_concat`` (possible for a single label set only), so that no data directory is needed.
    """
    dictionaries = [d for d in (checkpoint.state.get("task_state") or {}).get("dictionaries") or [] if d is not None]
    if dictionaries:
        return [len(d) for d in dictionaries]
    if "label_embs_concat" not in checkpoint.model:
        return None
    total = int(checkpoint.model["label_embs_concat"].shape[0])
    labels = list(checkpoint.cfg.task.get("labels", [None]))
    if len(labels) != 1:
        raise CheckpointError(
            f"{checkpoint.path}: {len(labels)} label sets ({labels}) share label_embs_concat ({total} rows) "
            "and the checkpoint has no task_state with their dictionaries to split it"
        )
    return [total]


def label_dictionary(size: int) -> Dictionary:
    """A fairseq Dictionary of ``size`` entries: the 4 special symbols, then units "0", "1", ...

    This is exactly the dictionary of a k-means label set (``dict.km.txt`` lists 0..K-1).
    """
    dictionary = Dictionary()
    if size < dictionary.nspecial:
        raise CheckpointError(f"a label set of {size} entries is smaller than fairseq's {dictionary.nspecial} special symbols")
    for unit in range(size - dictionary.nspecial):
        dictionary.add_symbol(str(unit))
    return dictionary


def write_hubert_checkpoint(path, cfg: Dict[str, Any], model_state: Dict[str, torch.Tensor],
                            label_set_sizes: Optional[List[int]], optimizer_history: List[Dict[str, Any]],
                            force: bool = False) -> None:
    """Writes a fairseq HuBERT checkpoint in the layout of ``hubert_base_ls960.pt`` (atomically; an
    existing file only with ``force``).

    ``task_state`` carries the label dictionaries, which fairseq's ``hubert_ctc`` needs to rebuild the
    pre-training model before it loads the weights (it would otherwise look for ``dict.km.txt`` in the
    fine-tuning data directory). An encoder without label sets (read from Hugging Face) gets
    ``[None]``: fairseq then builds no label embeddings, as for fine-tuning.
    """
    dictionaries = [None] if label_set_sizes is None else [label_dictionary(n) for n in label_set_sizes]
    state = {
        "args": None,
        "cfg": cfg,
        "model": model_state,
        "criterion": None,
        # fairseq's loader reads the last entry; a file converted from elsewhere gets an empty one
        "optimizer_history": optimizer_history or [
            {"criterion_name": "HubertCriterion", "optimizer_name": None, "lr_scheduler_state": {}, "num_updates": 0}
        ],
        "task_state": {"dictionaries": dictionaries},
        "extra_state": {"metrics": {}, "previous_training_time": 0.0},
        "last_optimizer_state": None,
    }
    write_file_atomically(path, lambda temporary: torch.save(state, temporary), force=force)


def write_wavlm_checkpoint(path, cfg: Dict[str, Any], model_state: Dict[str, torch.Tensor], force: bool = False) -> None:
    """Writes the converted WavLM checkpoint layout: ``{"cfg": settings dict, "model": state dict}``
    (also what s3prl's ``wavlm_local`` reads)."""
    write_file_atomically(path, lambda temporary: torch.save({"cfg": cfg, "model": model_state}, temporary), force=force)


def write_s3prl_checkpoint(path, cfg: Dict[str, Any], model_state: Dict[str, torch.Tensor],
                           label_set_sizes: Optional[List[int]], force: bool = False) -> None:
    """Writes s3prl's converted HuBERT layout (plain python: no fairseq class is pickled)."""
    symbols = None if label_set_sizes is None else [list(label_dictionary(n).symbols) for n in label_set_sizes]
    try:
        state = s3prl_state_from_fairseq(plain(cfg), model_state, symbols)
    except FormatError as err:
        raise CheckpointError(str(err)) from err
    write_file_atomically(path, lambda temporary: torch.save(state, temporary), force=force)
