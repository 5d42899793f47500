"""The ``siamctc`` task: wav2vec manifests in, batches of original and perturbed views out.

Errors the user causes while the task and model are built (a missing manifest, an unreadable
``model.encoder_path``, a bad setting) are raised as :class:`~fairseq_siamctc.errors.SetupError`,
which ``fairseq-hydra-train`` reports in one line. A run folder whose checkpoint was trained from
another model configuration is refused unless ``task.resume_other_run`` (fairseq would otherwise
load the old weights over the new encoder and continue the old run without a word).
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..data.paired_audio_dataset import PairedAudioDataset, ViewSettings
from ..data.perturb import MODES
from ..errors import RunFolderError, SetupError, UserError

logger = logging.getLogger(__name__)


@dataclass
class SiamCTCConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "directory with the {split}.tsv manifests"})
    max_sample_size: int = field(
        default=250000, metadata={"help": "longer utterances are cropped to this many 16 kHz samples"}
    )
    min_sample_size: int = field(
        default=32000, metadata={"help": "utterances with fewer 16 kHz samples are skipped (the count is logged)"}
    )
    normalize: bool = field(
        default=False,
        metadata={"help": "zero-mean unit-variance waveforms; must match the base checkpoint (HuBERT/WavLM Base: false)"},
    )
    resample: bool = field(
        default=False, metadata={"help": "convert audio at other sample rates to 16 kHz instead of failing"}
    )
    speeds: List[float] = field(
        default_factory=lambda: [0.8, 0.9, 1.0, 1.1, 1.2],
        metadata={"help": "speed factors of the perturbed view (> 1: faster, shorter)"},
    )
    speed_probs: Optional[List[float]] = field(
        default=None, metadata={"help": "probability of each speed factor; default uniform"}
    )
    semitones: List[float] = field(
        default_factory=lambda: [-2.0, -1.0, 0.0, 1.0, 2.0],
        metadata={"help": "pitch shifts of the perturbed view in semitones (duration kept)"},
    )
    semitone_probs: Optional[List[float]] = field(
        default=None, metadata={"help": "probability of each pitch shift; default uniform"}
    )
    perturb_mode: ChoiceEnum(MODES) = field(
        default="speed",
        metadata={"help": "speed: resampling, pitch follows the speed factor; tempo: pitch kept"},
    )
    train_subset: str = field(
        default=II("dataset.train_subset"),
        metadata={"help": "the split that gets random crops and new views every epoch; others are fixed"},
    )
    seed: int = field(
        default=II("common.seed"), metadata={"help": "views and crops are drawn from (seed, epoch, utterance)"}
    )
    max_unreadable_share: float = field(
        default=0.01,
        metadata={
            "help": "share of a split's files that may turn out unreadable while training (corrupt, not audio, "
            "a length other than the manifest's); they are skipped and logged, and one more stops training "
            "with an error naming them. 0: stop at the first"
        },
    )
    resume_other_run: bool = field(
        default=False,
        metadata={
            "help": "continue the checkpoint found in checkpoint.save_dir (or checkpoint.restore_file) even when "
            "it was trained from another model.encoder_path or model settings; refused by default"
        },
    )
    save_dir: Optional[str] = field(
        default=II("checkpoint.save_dir"), metadata={"help": "where fairseq looks for the checkpoint to resume"}
    )
    restore_file: Optional[str] = field(
        default=II("checkpoint.restore_file"), metadata={"help": "the checkpoint fairseq resumes"}
    )


def _floats(values: Optional[List[float]]) -> Optional[Tuple[float, ...]]:
    return None if values is None else tuple(float(v) for v in values)


def _plain(cfg: Any) -> Dict[str, Any]:
    if cfg is None:
        return {}
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return dict(cfg)


# Settings that change how a step is computed, not what is trained.
RESUMABLE_WITH_CHANGES = ("checkpoint_activations",)


def model_config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """``model.key: saved -> current`` for each model setting both configurations have and that differs
    (a setting added to the plugin since the checkpoint was written is not a difference)."""
    keys = (set(saved) & set(current)) - set(RESUMABLE_WITH_CHANGES)
    keys = sorted(keys, key=lambda k: (k != "encoder_path", k))
    return [f"model.{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


@register_task("siamctc", dataclass=SiamCTCConfig)
class SiamCTCTask(FairseqTask):
    cfg: SiamCTCConfig

    @classmethod
    def setup_task(cls, cfg: SiamCTCConfig, **kwargs):
        return cls(cfg)

    def view_settings(self) -> ViewSettings:
        return ViewSettings(
            speeds=_floats(self.cfg.speeds),
            speed_probs=_floats(self.cfg.speed_probs),
            semitones=_floats(self.cfg.semitones),
            semitone_probs=_floats(self.cfg.semitone_probs),
            mode=str(self.cfg.perturb_mode),
        )

    def load_dataset(self, split: str, **kwargs):
        try:
            self.datasets[split] = PairedAudioDataset(
                os.path.join(self.cfg.data, f"{split}.tsv"),
                views=self.view_settings(),
                max_sample_size=self.cfg.max_sample_size,
                min_sample_size=self.cfg.min_sample_size,
                normalize=self.cfg.normalize,
                resample=self.cfg.resample,
                seed=self.cfg.seed,
                train=split == self.cfg.train_subset,
                max_unreadable_share=self.cfg.max_unreadable_share,
            )
        except UserError:
            raise
        except (OSError, ValueError) as e:  # the messages name the manifest, line or setting
            raise SetupError(f"task siamctc, split {split}: {e}") from e

    def build_model(self, cfg, from_checkpoint=False):
        self.check_run_folder(cfg)
        try:
            return super().build_model(cfg, from_checkpoint)
        except UserError:
            raise
        except (OSError, ValueError) as e:  # CheckpointError is a ValueError; the messages name the file
            raise SetupError(f"model {getattr(cfg, '_name', '')}: {e}") from e

    def resume_checkpoint(self) -> Optional[str]:
        """The checkpoint fairseq will resume (as in ``checkpoint_utils.load_checkpoint``), when it exists."""
        try:
            save_dir, restore_file = self.cfg.save_dir, self.cfg.restore_file
        except OmegaConfBaseException:  # built outside fairseq's training configuration
            return None
        if restore_file is None or save_dir is None:
            return None
        path = os.path.join(save_dir, restore_file) if restore_file == "checkpoint_last.pt" else restore_file
        return os.path.abspath(path) if os.path.isfile(path) else None

    def check_run_folder(self, model_cfg) -> None:
        """Refuses to resume a checkpoint of another model configuration, unless ``resume_other_run``."""
        path = self.resume_checkpoint()
        if path is None or self.cfg.resume_other_run:
            return
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("cfg") or {}
        except Exception as e:  # noqa: BLE001  (fairseq reports an unreadable checkpoint itself)
            logger.warning(f"cannot read the configuration of {path} to compare it with this run's: {e}")
            return
        differences = model_config_differences(_plain(saved.get("model")), _plain(model_cfg))
        if differences:
            raise RunFolderError(
                f"{path} holds a run of another model configuration ({'; '.join(differences)}): "
                "choose another hydra.run.dir or checkpoint.save_dir, or add ++task.resume_other_run=true "
                "to continue that run (its weights replace the new encoder's)"
            )

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
