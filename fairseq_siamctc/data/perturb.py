"""Speed, tempo and pitch perturbation of a mono waveform: the second SiamCTC view.

Every perturbation is at most one resampling (soxr) followed by at most one pitch-keeping
time-stretch (Signalsmith Stretch, from the ``python-stretch`` package):

* speed ``s`` (mode ``"speed"``): resample by ``s``; duration and pitch change together.
* tempo ``s`` (mode ``"tempo"``): time-stretch only; duration changes, pitch is kept.
* ``k`` semitones: resample by ``2 ** (k / 12)`` (pitch and duration change), then time-stretch
  back to the wanted duration.

Speed and pitch together therefore cost one resampling by ``s * 2 ** (k / 12)`` plus one
time-stretch, instead of the two spectral passes a separate pitch shifter would need. The output
is ``round(N / s)`` samples long in both modes (exactly: the stretcher's last sample is trimmed
or padded), so a pitch shift alone keeps the length ``N``.
"""

import math

import numpy as np
import python_stretch
import soxr

MODES = ("speed", "tempo")

# soxr "HQ": 20-bit precision; its cost is a small part of the time-stretch's.
_RESAMPLE_QUALITY = "HQ"
# A fixed seed makes the stretcher (which randomises phases) a pure function of its input.
_STRETCH_SEED = 0
# Stretcher window and hop: 48 ms windows resolve the harmonics of low voices (about 4 periods at
# 85 Hz) and follow formant transitions better than the library's presets (100-120 ms), at less
# CPU: bench/views.py measures both.
_STRETCH_WINDOW_SECONDS = 0.048


def _resample(wav: np.ndarray, sample_rate: int, ratio: float) -> np.ndarray:
    """Plays ``wav`` ``ratio`` times faster: (N,) -> (about N / ratio,)."""
    return soxr.resample(wav, sample_rate, sample_rate / ratio, quality=_RESAMPLE_QUALITY)


def _time_stretch(wav: np.ndarray, sample_rate: int, out_len: int) -> np.ndarray:
    """Changes the duration keeping the pitch: (N,) -> (about out_len,)."""
    stretcher = python_stretch.Signalsmith.Stretch(_STRETCH_SEED)
    window = round(_STRETCH_WINDOW_SECONDS * sample_rate)
    stretcher.configure(1, window, window // 2)
    stretcher.setTimeFactor(len(wav) / out_len)
    return stretcher.process(wav[None, :])[0]


def _fit_length(wav: np.ndarray, length: int) -> np.ndarray:
    if len(wav) >= length:
        return wav[:length]
    return np.pad(wav, (0, length - len(wav)))


def perturb(
    wav: np.ndarray,
    sample_rate: int,
    *,
    speed: float = 1.0,
    semitones: float = 0.0,
    mode: str = "speed",
) -> np.ndarray:
    """Returns the perturbed copy of a mono waveform, float32, at the same sample rate.

    wav: (N,) float. speed: > 0; > 1 is faster (shorter). semitones: pitch shift, duration kept.
    mode: "speed" (resampling: pitch follows the speed) or "tempo" (pitch kept).
    Output: (round(N / speed),) float32.
    """
    if mode not in MODES:
        raise ValueError(f"perturbation mode must be one of {MODES}, got {mode!r}")
    if not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed factor must be a positive number, got {speed!r}")
    if not math.isfinite(semitones):
        raise ValueError(f"semitones must be a finite number, got {semitones!r}")
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"perturb takes a mono waveform of shape (N,), got shape {wav.shape}")

    out_len = round(len(wav) / speed)
    if len(wav) == 0 or out_len == 0:
        return np.zeros(out_len, dtype=np.float32)
    resample_ratio = 2.0 ** (semitones / 12.0) * (speed if mode == "speed" else 1.0)
    needs_stretch = semitones != 0 or (mode == "tempo" and speed != 1)

    out = _resample(wav, sample_rate, resample_ratio) if resample_ratio != 1 else wav
    if needs_stretch and len(out) > 0:
        out = _time_stretch(out, sample_rate, out_len)
    if out is wav:
        out = wav.copy()  # never hand back the caller's buffer
    return _fit_length(out, out_len)
