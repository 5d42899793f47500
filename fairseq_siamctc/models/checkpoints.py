"""Reading, recognising and writing the checkpoints SiamCTC starts from and exports to.

Three kinds are recognised from a file's contents, never from its name:

- ``hubert``: a fairseq checkpoint whose config names the model ``hubert`` (``cfg.model._name``, or
  ``args.arch`` in checkpoints written before fairseq moved to hydra), weights under ``model``, the
  label dictionaries of the pre-training task under ``task_state`` (as in ``hubert_base_ls960.pt``);
- ``wavlm``: the converted WavLM checkpoint (``wavlm_base.pt``): a dict with ``cfg``, a plain dict of
  WavLM's settings, and ``model``, a state dict holding WavLM's gated relative position bias;
- ``siamctc``: a fairseq training checkpoint of this plugin's ``siamctc`` model.

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
from fairseq import checkpoint_utils
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from omegaconf import DictConfig, OmegaConf

from .wavlm import is_wavlm_state

HUBERT = "hubert"
WAVLM = "wavlm"
SIAMCTC = "siamctc"

# where a SiamCTC state dict holds the record of its base checkpoint (nn.Module extra state of the root)
ENCODER_RECORD_KEY = "_extra_state"


_EXPECTED = {
    HUBERT: "a fairseq HuBERT checkpoint",
    WAVLM: "a WavLM checkpoint ({'cfg', 'model'})",
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


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu")
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
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = _torch_load(path)
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
    return Checkpoint(kind=kind, path=str(path), cfg=cfg, model=state["model"], state=state)


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
    dictionaries = (checkpoint.state.get("task_state") or {}).get("dictionaries")
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
                            label_set_sizes: Optional[List[int]], optimizer_history: List[Dict[str, Any]]) -> None:
    """Writes a fairseq HuBERT checkpoint in the layout of ``hubert_base_ls960.pt``.

    ``task_state`` carries the label dictionaries, which fairseq's ``hubert_ctc`` needs to rebuild the
    pre-training model before it loads the weights (it would otherwise look for ``dict.km.txt`` in the
    fine-tuning data directory).
    """
    task_state = {} if label_set_sizes is None else {"dictionaries": [label_dictionary(n) for n in label_set_sizes]}
    state = {
        "args": None,
        "cfg": cfg,
        "model": model_state,
        "criterion": None,
        "optimizer_history": optimizer_history,
        "task_state": task_state,
        "extra_state": {"metrics": {}, "previous_training_time": 0.0},
        "last_optimizer_state": None,
    }
    checkpoint_utils.torch_persistent_save(state, str(path))


def write_wavlm_checkpoint(path, cfg: Dict[str, Any], model_state: Dict[str, torch.Tensor]) -> None:
    """Writes the converted WavLM checkpoint layout: ``{"cfg": settings dict, "model": state dict}``."""
    checkpoint_utils.torch_persistent_save({"cfg": cfg, "model": model_state}, str(path))
