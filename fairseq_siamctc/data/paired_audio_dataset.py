"""Utterances from a wav2vec-style manifest, each returned with its perturbed view.

A manifest ``{split}.tsv`` has the audio root on its first line, then one line per utterance:
``relative/path<TAB>num_samples``. Audio must be 16 kHz mono; with ``resample`` another rate is
converted to 16 kHz on reading (sizes for batching then come from the files' headers).

Each item is a crop of at most ``max_sample_size`` samples (random in training, the centre in
validation) and the same crop perturbed by a speed factor and a pitch shift drawn from the view
settings (see :mod:`fairseq_siamctc.data.perturb`). Every random draw comes from
``numpy.random.default_rng([seed, epoch, index])`` (validation uses epoch 0 throughout), so the
views depend neither on the number of loader workers nor on the order of loading, and a resumed
run sees the views it would have seen. The epoch lives in shared memory so that persistent loader
workers follow ``set_epoch``. Batching by ``max_tokens`` counts the samples of the original crops;
the perturbed views add up to ``1 / min(speeds)`` times as many.

Bad input. What can be checked from the manifest fails before training starts; what shows only when
a file is read mid-run is skipped (and logged with a count) when it concerns a few damaged files, and
fails when it means the corpus is in the wrong format or too much of it is unreadable:

=====================================================  ==========================================
manifest missing, empty, or a line that does not parse  error naming the manifest and line number
audio file missing                                      error at loading, naming file and line
``num_samples`` below ``min_sample_size`` (also 0)      skipped at loading, the count logged
file unreadable (corrupt, not audio)                    skipped on reading, logged with a count
file length disagrees with ``num_samples``              skipped on reading, logged with a count
more than ``max_unreadable_share`` of the files skipped  error naming the skipped files
a batch in which every file was skipped                 error naming its files
sample rate other than 16 kHz (without ``resample``)    error naming file and line
more than one channel                                   error naming file and line
=====================================================  ==========================================

With ``resample`` the headers are read at loading, and a file whose header cannot be read is an
error there. A skipped item leaves its batch one utterance short. A batch with nothing left is an
error, not an empty batch: fairseq would run a placeholder batch with its loss multiplied by 0, so a
corpus of unreadable files (git-lfs pointers, a stale mount) would "train" without changing a weight.
The skipped files are counted in shared memory, so the limit holds for all loader workers together.
"""

import logging
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
import soxr
import torch
from fairseq.data import FairseqDataset

from ..errors import DataError
from .audio import SAMPLE_RATE
from .perturb import MODES, perturb

logger = logging.getLogger(__name__)


class BadAudioError(DataError):
    """Audio that the whole corpus probably shares (wrong rate, channels): training cannot go on."""


@dataclass(frozen=True)
class Manifest:
    path: str
    root: str
    files: List[str]
    line_numbers: List[int]
    num_samples: np.ndarray  # (U,) int64


@dataclass(frozen=True)
class ViewSettings:
    """The perturbation of the second view: factors and their probabilities (None: uniform)."""

    speeds: Tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.2)
    speed_probs: Optional[Tuple[float, ...]] = None
    semitones: Tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0)
    semitone_probs: Optional[Tuple[float, ...]] = None
    mode: str = "speed"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"perturbation mode must be one of {MODES}, got {self.mode!r}")
        _check_choices("speeds", self.speeds, self.speed_probs)
        _check_choices("semitones", self.semitones, self.semitone_probs)
        if min(self.speeds) <= 0:
            raise ValueError(f"speed factors must be positive, got {list(self.speeds)}")


def _check_choices(name: str, values: Sequence[float], probs: Optional[Sequence[float]]) -> None:
    if len(values) == 0:
        raise ValueError(f"{name} must list at least one value")
    if probs is None:
        return
    if len(probs) != len(values) or min(probs) < 0 or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"{name} probabilities must be {len(values)} non-negative numbers summing to 1, got {list(probs)}"
        )


def draw_view(rng: np.random.Generator, views: ViewSettings) -> Tuple[float, float]:
    """Draws (speed factor, semitones) for one utterance."""
    speed = float(views.speeds[rng.choice(len(views.speeds), p=views.speed_probs)])
    semitones = float(views.semitones[rng.choice(len(views.semitones), p=views.semitone_probs)])
    return speed, semitones


def read_manifest(path: str) -> Manifest:
    """Parses a wav2vec manifest; a malformed line is an error naming ``path:line``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}:1: the first line must be the audio root directory")
    files, line_numbers, num_samples = [], [], []
    for line_number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0] or not fields[1].strip().isdigit():
            raise ValueError(
                f"{path}:{line_number}: expected 'relative/path<TAB>num_samples' "
                f"(num_samples a non-negative integer), got {line!r}"
            )
        files.append(fields[0])
        line_numbers.append(line_number)
        num_samples.append(int(fields[1]))
    return Manifest(path, lines[0].strip(), files, line_numbers, np.array(num_samples, dtype=np.int64))


def normalize_waveform(wav: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the utterance, as fairseq's ``normalize`` (layer norm, eps 1e-5)."""
    return ((wav - wav.mean()) / np.sqrt(wav.var() + 1e-5)).astype(np.float32)


def pad_waveforms(waves: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pads with zeros: B tensors (N_b,) -> source (B, max N_b) float, padding_mask (B, max N_b) bool, True = pad."""
    lengths = torch.tensor([len(w) for w in waves])
    source = torch.zeros(len(waves), int(lengths.max()), dtype=torch.float32)
    for row, wav in zip(source, waves):
        row[: len(wav)] = wav
    padding_mask = torch.arange(source.shape[1])[None, :] >= lengths[:, None]
    return source, padding_mask


class PairedAudioDataset(FairseqDataset):
    """Crops of the manifest's utterances with their perturbed views; see the module docstring."""

    def __init__(
        self,
        manifest_path: str,
        *,
        views: ViewSettings,
        max_sample_size: int = 250000,
        min_sample_size: int = 32000,
        normalize: bool = False,
        resample: bool = False,
        seed: int = 1,
        train: bool = True,
        max_unreadable_share: float = 0.01,
    ):
        super().__init__()
        if max_sample_size < 1 or min_sample_size < 0:
            raise ValueError(
                f"need max_sample_size >= 1 and min_sample_size >= 0, got {max_sample_size}, {min_sample_size}"
            )
        if not 0 <= max_unreadable_share <= 1:
            raise ValueError(f"max_unreadable_share must be between 0 and 1, got {max_unreadable_share}")
        self.max_unreadable_share = max_unreadable_share
        self.views = views
        self.max_sample_size = max_sample_size
        self.normalize = normalize
        self.resample = resample
        self.seed = seed
        self.train = train
        # Shared memory: persistent loader workers see the epoch that set_epoch writes.
        self._epoch = torch.ones(1, dtype=torch.int64).share_memory_()
        self._skipped = 0

        manifest = read_manifest(manifest_path)
        self.manifest_path = manifest_path
        self.root = manifest.root
        self._check_files_exist(manifest)
        self.rates = self._read_rates(manifest) if resample else np.full(len(manifest.files), SAMPLE_RATE)
        lengths_16k = np.round(manifest.num_samples * SAMPLE_RATE / self.rates).astype(np.int64)
        keep = np.flatnonzero(lengths_16k >= max(min_sample_size, 1))
        skipped = len(manifest.files) - len(keep)
        if skipped:
            logger.info(
                f"{manifest_path}: skipped {skipped} of {len(manifest.files)} utterances shorter than "
                f"min_sample_size={min_sample_size} samples"
            )
        if len(keep) == 0:
            raise ValueError(f"{manifest_path}: no utterance of at least min_sample_size={min_sample_size} samples")
        self.files = [manifest.files[i] for i in keep]
        self.line_numbers = [manifest.line_numbers[i] for i in keep]
        self.num_samples = manifest.num_samples[keep]
        self.rates = self.rates[keep]
        self.full_sizes = lengths_16k[keep]
        self.sizes = np.minimum(self.full_sizes, max_sample_size)
        # Which files were skipped, shared like the epoch so that the limit counts every worker's skips.
        self._unreadable = torch.zeros(len(self.files), dtype=torch.bool).share_memory_()
        logger.info(f"{manifest_path}: {len(self.files)} utterances, views {views}")

    def _path(self, index: int) -> str:
        return os.path.join(self.root, self.files[index])

    def _where(self, index: int) -> str:
        return f"{self._path(index)} ({self.manifest_path}:{self.line_numbers[index]})"

    def _check_files_exist(self, manifest: Manifest) -> None:
        missing = [
            f"{os.path.join(manifest.root, name)} ({manifest.path}:{line})"
            for name, line in zip(manifest.files, manifest.line_numbers)
            if not os.path.isfile(os.path.join(manifest.root, name))
        ]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} audio file(s) of the manifest not found, e.g. " + "; ".join(missing[:5])
            )

    def _read_rates(self, manifest: Manifest) -> np.ndarray:
        rates = []
        for name, line in zip(manifest.files, manifest.line_numbers):
            path = os.path.join(manifest.root, name)
            try:
                rates.append(sf.info(path).samplerate)
            except sf.SoundFileError as e:
                raise ValueError(f"cannot read the header of {path} ({manifest.path}:{line}): {e}") from e
        return np.array(rates, dtype=np.int64)

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        # Batches depend only on sizes; the per-epoch views follow the shared epoch.
        return True

    def __len__(self) -> int:
        return len(self.files)

    def num_tokens(self, index: int) -> int:
        return int(self.sizes[index])

    def num_tokens_vec(self, indices: np.ndarray) -> np.ndarray:
        return self.sizes[indices]

    def size(self, index: int) -> int:
        return int(self.sizes[index])

    def ordered_indices(self) -> np.ndarray:
        # Longest first, ties in an order drawn from the seed alone: fairseq seeds numpy here with
        # seed + the epoch at which it builds the batches, which a resumed run does at a later epoch,
        # so drawing from numpy's global state would give a resumed run other batches.
        if self.train:
            tie_break = np.random.default_rng(self.seed).permutation(len(self))
            return np.lexsort((tie_break, self.sizes))[::-1].copy()
        return np.argsort(self.sizes, kind="stable")[::-1].copy()

    def _crop_start(self, rng: np.random.Generator, index: int) -> int:
        excess = int(self.full_sizes[index] - self.sizes[index])
        if excess <= 0:
            return 0
        return int(rng.integers(0, excess + 1)) if self.train else excess // 2

    def _skip(self, index: int, reason: str) -> dict:
        self._skipped += 1
        self._unreadable[index] = True
        unreadable = torch.nonzero(self._unreadable).flatten().tolist()
        if len(unreadable) > self.max_unreadable_share * len(self):
            others = [self._where(i) for i in unreadable if i != index][:4]
            raise DataError(
                f"{len(unreadable)} of the {len(self)} files of {self.manifest_path} cannot be used, more than "
                f"max_unreadable_share={self.max_unreadable_share}: {self._where(index)}: {reason}"
                + (f"; also {', '.join(others)}" if others else "")
                + " (fix or remove them from the manifest, or raise it with ++task.max_unreadable_share=...)"
            )
        logger.warning(f"skipping {self._where(index)}: {reason} ({self._skipped} skipped so far in this process)")
        return {"id": index, "source": None}

    def _read_crop(self, index: int, start_16k: int):
        """Returns the crop (sizes[index],) at 16 kHz and None, or None and why the file is skipped."""
        rate = int(self.rates[index])
        try:
            with sf.SoundFile(self._path(index)) as f:
                if f.channels != 1:
                    raise BadAudioError(f"{self._where(index)} has {f.channels} channels; mono audio is expected")
                if f.samplerate != SAMPLE_RATE and not self.resample:
                    raise BadAudioError(
                        f"{self._where(index)} is sampled at {f.samplerate} Hz, {SAMPLE_RATE} Hz expected "
                        "(convert the corpus, or set task.resample=true)"
                    )
                if f.samplerate != rate:
                    return None, f"sample rate {f.samplerate} Hz changed since loading ({rate} Hz)"
                if f.frames != self.num_samples[index]:
                    return None, f"the file has {f.frames} samples, the manifest says {self.num_samples[index]}"
                start = round(start_16k * rate / SAMPLE_RATE)
                f.seek(start)
                # A few extra samples so that resampling cannot come out short.
                wav = f.read(math.ceil(self.sizes[index] * rate / SAMPLE_RATE) + 1, dtype="float32")
        except sf.SoundFileError as e:
            return None, f"unreadable ({e})"
        if rate != SAMPLE_RATE:
            # Rounding of the converted length can leave the last crop a sample short.
            wav = soxr.resample(wav, rate, SAMPLE_RATE)
            wav = np.pad(wav, (0, max(0, int(self.sizes[index]) - len(wav))))
        return wav[: self.sizes[index]], None

    def __getitem__(self, index: int) -> dict:
        epoch = self.epoch if self.train else 0
        rng = np.random.default_rng([self.seed, epoch, index])
        start = self._crop_start(rng, index)
        speed, semitones = draw_view(rng, self.views)
        wav, reason = self._read_crop(index, start)
        if wav is None:
            return self._skip(index, reason)
        wav_pert = perturb(wav, SAMPLE_RATE, speed=speed, semitones=semitones, mode=self.views.mode)
        if self.normalize:
            wav, wav_pert = normalize_waveform(wav), normalize_waveform(wav_pert)
        return {
            "id": index,
            "source": torch.from_numpy(wav),
            "source_pert": torch.from_numpy(wav_pert),
            "speed": speed,
            "semitones": semitones,
        }

    def collater(self, samples: List[dict]) -> dict:
        kept = [s for s in samples if s["source"] is not None]
        if samples and not kept:
            files = ", ".join(self._where(s["id"]) for s in samples[:5])
            raise DataError(
                f"every file of a batch was skipped as unreadable ({len(samples)}: {files}); "
                "fix or remove them from the manifest"
            )
        samples = kept
        if not samples:
            return {}
        source, padding_mask = pad_waveforms([s["source"] for s in samples])
        source_pert, padding_mask_pert = pad_waveforms([s["source_pert"] for s in samples])
        return {
            "id": torch.tensor([s["id"] for s in samples], dtype=torch.int64),
            "net_input": {
                "source": source,
                "padding_mask": padding_mask,
                "source_pert": source_pert,
                "padding_mask_pert": padding_mask_pert,
            },
            "speed": torch.tensor([s["speed"] for s in samples], dtype=torch.float32),
            "semitones": torch.tensor([s["semitones"] for s in samples], dtype=torch.float32),
        }
