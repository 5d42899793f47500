"""Fixes that let fairseq 0.12 run on Python 3.11, NumPy 2, torchaudio 2.11 and PyTorch >= 2.6.

Everything here patches fairseq objects at import time (``apply()``, called when the plugin is
imported); no file in site-packages is edited. Each fix names the failure it removes and has a
test in ``tests/test_compat.py`` that fails without it.
"""

import argparse
import dataclasses
import logging
import random
import types

import numpy as np
import torch

logger = logging.getLogger(__name__)

# the deprecation notice fairseq's convolutional position embedding prints (built with weight_norm):
# filtered by the console scripts and by fairseq-hydra-train runs alike
WEIGHT_NORM_NOTICE = (FutureWarning, r"`torch\.nn\.utils\.weight_norm` is deprecated")


def apply() -> None:
    """Applies every fix; each is idempotent, so calling again changes nothing."""
    _allow_fairseq_checkpoint_classes()
    _add_autoregressive_to_hubert_ctc_config()
    _numpy2_mask_sampling()
    _convert_waveform_without_sox()
    _cpu_distributed_training()
    _finetuned_hubert_without_label_dictionaries()


# Fix 1. PyTorch >= 2.6 loads with weights_only=True, which refuses every fairseq checkpoint:
# "WeightsUnpickler error: Unsupported global: GLOBAL fairseq.data.dictionary.Dictionary".
# Allow exactly the plain-data classes that real checkpoints hold; weights_only stays on, so a
# checkpoint whose pickle would call anything else is still refused.
def fairseq_checkpoint_safe_globals() -> list:
    from fairseq.data.dictionary import Dictionary

    return [
        Dictionary,  # task_state["dictionaries"] of HuBERT and every fine-tuned model
        argparse.Namespace,  # state["args"] of checkpoints written before fairseq's hydra port
    ]


def _allow_fairseq_checkpoint_classes() -> None:
    torch.serialization.add_safe_globals(fairseq_checkpoint_safe_globals())


# Fix 2. HubertEncoder reads ``cfg.autoregressive``, a field that HubertCtcConfig lacks:
# "ConfigAttributeError: Key 'autoregressive' not in 'HubertCtcConfig'". Declare it (False: CTC).
def _add_autoregressive_to_hubert_ctc_config() -> None:
    from hydra.core.config_store import ConfigStore

    from fairseq.models import MODEL_DATACLASS_REGISTRY
    from fairseq.models.hubert import hubert_asr

    if "autoregressive" in hubert_asr.HubertCtcConfig.__dataclass_fields__:
        return
    config_cls = dataclasses.make_dataclass(
        "HubertCtcConfig",
        [
            (
                "autoregressive",
                bool,
                dataclasses.field(
                    default=False,
                    metadata={"help": "read by HubertEncoder; always False for CTC"},
                ),
            )
        ],
        bases=(hubert_asr.HubertCtcConfig,),
    )
    config_cls.__module__ = hubert_asr.__name__
    hubert_asr.HubertCtcConfig = config_cls
    MODEL_DATACLASS_REGISTRY["hubert_ctc"] = config_cls
    setattr(hubert_asr.HubertCtc, "__dataclass", config_cls)
    node = config_cls()
    node._name = "hubert_ctc"
    ConfigStore.instance().store(name="hubert_ctc", group="model", node=node, provider="fairseq")


# Fix 3. fairseq's span masking uses ``np.int`` (removed in NumPy 1.24) with
# ``no_mask_overlap=True`` and ``Generator.randint`` (never existed; it is ``integers``) with
# ``mask_selection=uniform``. Give fairseq.data.data_utils a NumPy view with both names, leaving
# NumPy itself untouched.
class _MaskingGenerator:
    """numpy.random.Generator with the legacy ``randint`` name fairseq calls."""

    def __init__(self, generator: np.random.Generator):
        self._generator = generator

    def randint(self, low, high=None, size=None):
        return self._generator.integers(low, high, size=size)

    def __getattr__(self, name):
        return getattr(self._generator, name)


def _numpy_for_fairseq_masking() -> types.ModuleType:
    random_view = types.ModuleType("numpy.random")
    random_view.__dict__.update(np.random.__dict__)
    random_view.default_rng = lambda seed=None: _MaskingGenerator(np.random.default_rng(seed))
    numpy_view = types.ModuleType("numpy")
    numpy_view.__dict__.update(np.__dict__)
    numpy_view.int = int
    numpy_view.random = random_view
    return numpy_view


def _numpy2_mask_sampling() -> None:
    from fairseq.data import data_utils

    if not hasattr(data_utils.np, "int"):
        data_utils.np = _numpy_for_fairseq_masking()


# Fix 4. ``fairseq.data.audio.audio_utils.convert_waveform`` imports ``torchaudio.sox_effects``,
# which torchaudio 2.9 removed, so reading any audio through fairseq's speech-to-text path
# fails. The same conversions (peak normalisation, down-mix, resampling) with torchaudio.functional.
def convert_waveform(waveform, sample_rate, normalize_volume=False, to_mono=False, to_sample_rate=None):
    """Drop-in replacement for fairseq's ``convert_waveform`` (channels x length in and out)."""
    import torchaudio.functional as F

    is_numpy = isinstance(waveform, np.ndarray)
    converted = torch.from_numpy(waveform) if is_numpy else waveform
    if normalize_volume:
        # sox's "gain -n": peak at 0 dBFS
        peak = converted.abs().max()
        if peak > 0:
            converted = converted / peak
    if to_mono and converted.shape[0] > 1:
        converted = converted.mean(dim=0, keepdim=True)
    if to_sample_rate is not None and to_sample_rate != sample_rate:
        converted = F.resample(converted, sample_rate, to_sample_rate)
        sample_rate = to_sample_rate
    return (converted.numpy() if is_numpy else converted), sample_rate


def _convert_waveform_without_sox() -> None:
    from fairseq.data.audio import audio_utils

    audio_utils.convert_waveform = convert_waveform


# Fix 5. Several training processes on CPU (gloo) fail, because fairseq sizes its process pool
# by ``torch.cuda.device_count()``: "world size is 2 but have 0 available devices", then
# ``torch.cuda.ByteTensor`` in ``all_gather_list``. Without CUDA and with the gloo backend, spawn
# one process per rank on this host and gather with ``all_gather_object``; with CUDA nothing
# changes. Without CUDA, settings that need a GPU (fairseq's default NCCL backend, fp16, AMP) are
# refused in one line, instead of every spawned process failing with "ProcessGroupNCCL is only
# supported with GPUs" or a traceback ending in "Found no NVIDIA driver on your system". bf16 is
# not refused: torch runs it on CPUs, so a bf16 config can be checked on a laptop before a GPU run.
class LaunchError(SystemExit):
    """A training configuration that cannot run on this machine; exits with its message."""


def gpu_only_settings(cfg) -> list:
    """(setting, CPU override) for each setting of ``cfg`` that needs a GPU; empty with CUDA or a TPU."""
    if torch.cuda.is_available() or cfg.common.tpu:
        return []
    dt = cfg.distributed_training
    needs_gpu = [(f"common.{key}=true", f"common.{key}=false")
                 for key in ("fp16", "amp") if cfg.common.get(key)]
    if dt.distributed_world_size > 1 and dt.distributed_backend != "gloo":
        needs_gpu.append((f"distributed_world_size={dt.distributed_world_size} over "
                          f"{dt.distributed_backend}", "distributed_training.distributed_world_size=1"))
    return needs_gpu


def check_cpu_launch(cfg) -> None:
    """Raises LaunchError, naming the settings, when ``cfg`` needs a GPU that this machine lacks."""
    needs_gpu = gpu_only_settings(cfg)
    if needs_gpu:
        raise LaunchError(
            f"fairseq-hydra-train: error: this machine has no GPU, but the config asks for one "
            f"({', '.join(setting for setting, _ in needs_gpu)}): add +cpu=check to the plugin's configs, "
            f"or override {' '.join(fix for _, fix in needs_gpu)} (several CPU processes: "
            f"distributed_training.distributed_backend=gloo distributed_training.ddp_backend=legacy_ddp)"
        )


# Hydra runs the job in its output folder, so a relative path on the command line would be read
# from there. These are the options that name inputs; they are made absolute against the folder
# fairseq-hydra-train was started in. Outputs (``tensorboard_logdir``, ``save_dir``) stay relative
# to the run folder, as in fairseq.
# ``model.data`` is hubert_ctc's copy of ``task.data``, already interpolated at this point.
INPUT_PATH_OPTIONS = (("task", "data"), ("task", "label_dir"), ("model", "encoder_path"),
                      ("model", "w2v_path"), ("model", "data"))


def resolve_input_paths(cfg, launch_dir: str) -> None:
    """Makes the relative input paths of ``cfg`` (INPUT_PATH_OPTIONS) absolute against ``launch_dir``."""
    import os

    from omegaconf import open_dict

    for group, key in INPUT_PATH_OPTIONS:
        section = cfg.get(group)
        value = section.get(key) if section is not None else None
        if isinstance(value, str) and value and value != "???" and not os.path.isabs(value):
            with open_dict(section):
                section[key] = os.path.normpath(os.path.join(launch_dir, os.path.expanduser(value)))


def _launch_dir():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else None


def _cpu_distributed_training() -> None:
    from fairseq.distributed import utils as distributed_utils

    if getattr(distributed_utils.call_main, "_siamctc_cpu", False):
        return
    gpu_call_main = distributed_utils.call_main
    gpu_all_gather_list = distributed_utils.all_gather_list

    def call_main(cfg, main, **kwargs):
        launch_dir = _launch_dir()
        if launch_dir is not None:
            resolve_input_paths(cfg, launch_dir)
        check_cpu_launch(cfg)
        dt = cfg.distributed_training
        if (
            torch.cuda.is_available()
            or cfg.common.tpu
            or dt.distributed_world_size <= 1
            or dt.distributed_init_method is not None
            or dt.distributed_no_spawn
        ):
            return gpu_call_main(cfg, main, **kwargs)
        port = dt.distributed_port if dt.distributed_port > 0 else random.randint(10000, 60000)
        dt.distributed_init_method = f"tcp://localhost:{port}"
        kwargs["start_rank"] = dt.distributed_rank
        dt.distributed_rank = None  # each spawned process takes start_rank + its index
        torch.multiprocessing.spawn(
            fn=distributed_utils.distributed_main,
            args=(main, cfg, kwargs),
            nprocs=dt.distributed_world_size,
            join=True,
        )

    def all_gather_list(data, group=None, max_size=16384):
        if torch.cuda.is_available():
            return gpu_all_gather_list(data, group=group, max_size=max_size)
        from fairseq import utils

        if group is None:
            group = distributed_utils.get_global_group()
        gathered = [None] * distributed_utils.get_world_size(group=group)
        torch.distributed.all_gather_object(gathered, utils.move_to_cpu(data), group=group)
        return gathered

    call_main._siamctc_cpu = True
    distributed_utils.call_main = call_main
    distributed_utils.all_gather_list = all_gather_list


# Fix 6. Loading a fine-tuned ``hubert_ctc`` checkpoint (to decode it) rebuilds the pre-training
# model from the configuration saved in it, and fairseq then reads the pre-training label
# dictionaries from the label folder of that configuration: for the public checkpoints a path on
# the authors' cluster, "No such file or directory: '/checkpoint/.../dict.km.txt'" (fairseq issue
# 4003). The labels only size HuBERT's pre-training head, which fine-tuning leaves unused. While
# a fine-tuned encoder is rebuilt, a missing dictionary file therefore builds the model without
# that head (fairseq's own behaviour without dictionaries), and the head's saved weights are
# dropped when the checkpoint is loaded. Pre-training still fails on a missing dictionary.
_rebuilding_finetuned_hubert = [0]


def _finetuned_hubert_without_label_dictionaries() -> None:
    from fairseq.models.hubert import hubert_asr
    from fairseq.tasks import hubert_pretraining

    encoder = hubert_asr.HubertEncoder
    if getattr(encoder.__init__, "_siamctc", False):
        return
    encoder_init = encoder.__init__
    encoder_upgrade = encoder.upgrade_state_dict_named
    task_cls = hubert_pretraining.HubertPretrainingTask
    load_dictionaries = task_cls.load_dictionaries

    def __init__(self, cfg, task):
        rebuilding = cfg.w2v_args is not None  # from a fine-tuned checkpoint, not from w2v_path
        _rebuilding_finetuned_hubert[0] += rebuilding
        try:
            encoder_init(self, cfg, task)
        finally:
            _rebuilding_finetuned_hubert[0] -= rebuilding

    def upgrade_state_dict_named(self, state_dict, name):
        head = f"{name}.w2v_model.label_embs_concat" if name else "w2v_model.label_embs_concat"
        if head in state_dict and getattr(self.w2v_model, "label_embs_concat", None) is None:
            del state_dict[head]
        return encoder_upgrade(self, state_dict, name)

    def dictionaries_or_none(self):
        try:
            return load_dictionaries(self)
        except FileNotFoundError as err:
            if not _rebuilding_finetuned_hubert[0]:
                raise
            logger.info("rebuilding a fine-tuned HuBERT without its pre-training labels (%s)", err)
            return None if self.cfg.fine_tuning else [None] * len(self.cfg.labels)

    __init__._siamctc = True
    encoder.__init__ = __init__
    encoder.upgrade_state_dict_named = upgrade_state_dict_named
    task_cls.load_dictionaries = dictionaries_or_none
