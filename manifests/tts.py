"""Debian text-to-speech engines (espeak-ng, flite, festival) as functions: texts in, 16 kHz audio out.

Each engine is called as a subprocess; its output is read with soundfile and resampled with soxr to
16 kHz mono float32. ``rate`` is a speaking-rate factor (> 1: faster), mapped to each engine's own
control: espeak-ng words per minute, flite's ``duration_stretch``, festival's ``Duration_Stretch``
(diphone voices) or the HTS engine's ``-r`` speed (HTS voices).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000

# binary -> Debian package that provides it, for the error message when it is missing
ENGINE_PACKAGES = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "festival"}
FESTIVAL_VOICE_PACKAGES = {
    "kal_diphone": "festvox-kallpc16k",
    "ked_diphone": "festvox-kdlpc16k",
    "cmu_us_slt_arctic_hts": "festvox-us-slt-hts",
}


class TTSError(RuntimeError):
    """A text-to-speech engine is missing or failed."""


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: engine, voice name, and for espeak-ng a base pitch and rate."""

    engine: str
    name: str
    pitch: int = 50  # espeak-ng -p, 0..99
    words_per_minute: int = 175  # espeak-ng -s at rate 1.0


@dataclass(frozen=True)
class Utterance:
    """Text to speak at a rate factor, and (espeak-ng) a pitch offset from the voice's base."""

    text: str
    rate: float = 1.0
    pitch_offset: int = 0


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise TTSError(f"{name} not found: install the Debian package {ENGINE_PACKAGES.get(name, name)}")
    return path


def _to_16k(wav: np.ndarray, sample_rate: int, source: str) -> np.ndarray:
    if wav.ndim != 1:
        raise TTSError(f"{source}: expected mono output, got shape {wav.shape}")
    if len(wav) == 0:
        raise TTSError(f"{source}: produced no audio")
    if sample_rate != SAMPLE_RATE:
        wav = soxr.resample(wav, sample_rate, SAMPLE_RATE)
    return np.asarray(wav, dtype=np.float32)


def _run(command: list[str], what: str, stdin: str | None = None) -> bytes:
    done = subprocess.run(command, input=None if stdin is None else stdin.encode(), capture_output=True)
    if done.returncode != 0:
        raise TTSError(f"{what} failed ({' '.join(command[:3])} ...): {done.stderr.decode(errors='replace')}")
    return done.stdout


def _espeak(voice: Voice, utterances: list[Utterance]) -> list[np.ndarray]:
    binary = require_binary("espeak-ng")
    out = []
    for utt in utterances:
        command = [binary, "-v", voice.name, "-p", str(min(99, max(0, voice.pitch + utt.pitch_offset))),
                   "-s", str(round(voice.words_per_minute * utt.rate)), "--stdout"]
        # the text goes through stdin so that no sentence can be read as an option
        wav, sample_rate = sf.read(io.BytesIO(_run(command, f"espeak-ng {voice.name}", utt.text)),
                                   dtype="float32")
        out.append(_to_16k(wav, sample_rate, f"espeak-ng {voice.name}"))
    return out


def _flite(voice: Voice, utterances: list[Utterance]) -> list[np.ndarray]:
    binary = require_binary("flite")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        text_file, wav_file = Path(tmp) / "text.txt", Path(tmp) / "out.wav"
        for utt in utterances:
            text_file.write_text(utt.text)
            _run([binary, "-voice", voice.name, "--setf", f"duration_stretch={1.0 / utt.rate:.4f}",
                  "-f", str(text_file), "-o", str(wav_file)], f"flite {voice.name}")
            wav, sample_rate = sf.read(str(wav_file), dtype="float32")
            out.append(_to_16k(wav, sample_rate, f"flite {voice.name}"))
    return out


def _festival_rate_command(voice: Voice, rate: float) -> str:
    if voice.name.endswith("_hts"):
        # HTS voices ignore Duration_Stretch; the HTS engine takes its own speed option
        return (f"(set! hts_engine_params (append {voice.name}::hts_engine_params "
                f"(list (list \"-r\" {rate:.4f}))))")
    return f"(Parameter.set 'Duration_Stretch {1.0 / rate:.4f})"


def _festival(voice: Voice, utterances: list[Utterance]) -> list[np.ndarray]:
    binary = require_binary("festival")
    if not voice.name.replace("_", "").isalnum():
        raise TTSError(f"festival voice name {voice.name!r} is not a plain identifier")
    with tempfile.TemporaryDirectory() as tmp:
        # one festival process for all utterances of a voice: its start-up costs more than a sentence
        script = [f"(voice_{voice.name})"]
        paths = [Path(tmp) / f"{i}.wav" for i in range(len(utterances))]
        for utt, path in zip(utterances, paths):
            text = utt.text.replace("\\", " ").replace('"', " ")
            script.append(_festival_rate_command(voice, utt.rate))
            script.append(f'(set! u (Utterance Text "{text}"))(utt.synth u)(utt.save.wave u "{path}" \'riff)')
        _run([binary, "--pipe"], f"festival {voice.name}", "\n".join(script) + "\n")
        out = []
        for path in paths:
            if not path.is_file():
                package = FESTIVAL_VOICE_PACKAGES.get(voice.name, "festvox-*")
                raise TTSError(f"festival voice {voice.name} wrote no audio: is the Debian package "
                               f"{package} installed?")
            wav, sample_rate = sf.read(str(path), dtype="float32")
            out.append(_to_16k(wav, sample_rate, f"festival {voice.name}"))
    return out


ENGINES = {"espeak-ng": _espeak, "flite": _flite, "festival": _festival}


def synthesize(voice: Voice, utterances: list[Utterance]) -> list[np.ndarray]:
    """Speaks ``utterances`` with ``voice``: a list of (N_i,) float32 arrays at 16 kHz."""
    if voice.engine not in ENGINES:
        raise TTSError(f"unknown engine {voice.engine!r}; known: {sorted(ENGINES)}")
    return ENGINES[voice.engine](voice, utterances)
