"""Reading one utterance for the console scripts: mono, 16 kHz, float32."""

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000


def read_audio(path) -> np.ndarray:
    """An audio file -> (N,) float32 at 16 kHz (other rates resampled with soxr); unreadable or
    multi-channel audio is a ValueError naming the file."""
    try:
        wav, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except sf.SoundFileError as err:
        raise ValueError(f"{path}: unreadable audio ({err})") from err
    if wav.shape[1] != 1:
        raise ValueError(f"{path}: {wav.shape[1]} channels; the encoders take mono audio")
    wav = wav[:, 0]
    return soxr.resample(wav, rate, SAMPLE_RATE) if rate != SAMPLE_RATE else wav
