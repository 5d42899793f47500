"""The ``siamctc`` task: wav2vec manifests in, batches of original and perturbed views out."""

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from ..data.paired_audio_dataset import PairedAudioDataset, ViewSettings
from ..data.perturb import MODES


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


def _floats(values: Optional[List[float]]) -> Optional[Tuple[float, ...]]:
    return None if values is None else tuple(float(v) for v in values)


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
        self.datasets[split] = PairedAudioDataset(
            os.path.join(self.cfg.data, f"{split}.tsv"),
            views=self.view_settings(),
            max_sample_size=self.cfg.max_sample_size,
            min_sample_size=self.cfg.min_sample_size,
            normalize=self.cfg.normalize,
            resample=self.cfg.resample,
            seed=self.cfg.seed,
            train=split == self.cfg.train_subset,
        )

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
