"""CPU cost and quality of the perturbed view, per second of 16 kHz audio, on one thread.

    python bench/views.py [--seconds 10] [--views 40]

Timing: process CPU time (all threads counted) of views with a speed factor and a pitch shift
drawn uniformly from the paper's grids, on a speech-like signal (harmonic source with a moving
fundamental, three moving formants, syllable envelope, pauses with noise).

Quality of a pitch shift (+-1, +-2 semitones): log-spectral distance in dB (40 mel bands, voiced
frames) to the same signal synthesised with every frequency scaled by 2^(k/12) (what resampling
plus an ideal time-stretch would give), and the output level relative to that target. The unshifted input is the scale's
reference: a method no better than it has not shifted the spectrum.

Libraries other than the project's dependencies (pedalboard, audiostretchy, pytsmod, audiotsm) are
measured when installed and listed as missing otherwise.
"""

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import python_stretch  # noqa: E402
import soxr  # noqa: E402
import torch  # noqa: E402
import torchaudio  # noqa: E402
from scipy import signal  # noqa: E402

from fairseq_siamctc.data.perturb import perturb  # noqa: E402

SR = 16000
SPEEDS = (0.8, 0.9, 1.0, 1.1, 1.2)
SEMITONES = (-2, -1, 0, 1, 2)
SHIFTS = (-2, -1, 1, 2)
FORMANT_SETS = ((700, 1200, 2500), (300, 2300, 3000), (500, 900, 2400))


def syllable_envelope(t):
    """Voicing amplitude at times t (s): four syllables a second, a pause every two seconds."""
    return np.sqrt(np.clip(np.sin(2 * np.pi * 4 * t), 0, None)) * (np.sin(2 * np.pi * 0.5 * t) > -0.7)


def speech_like(seconds, scale=1.0, seed=0):
    """(seconds * SR,) float32; scale multiplies the fundamental and the formants."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = scale * (120 + 30 * np.sin(2 * np.pi * 0.7 * t) + 10 * np.sin(2 * np.pi * 3.1 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    source = sum(np.sin(k * phase) / k * (k * f0 < 0.45 * SR) for k in range(1, 30))
    envelope = syllable_envelope(t)
    excitation = source * envelope + 0.05 * rng.standard_normal(n) * (1 - envelope)
    out = np.zeros(n)
    block = SR // 50
    for start in range(0, n, block):
        segment = excitation[start : start + block]
        for formant in FORMANT_SETS[(start // (SR // 5)) % len(FORMANT_SETS)]:
            b, a = signal.iirpeak(formant * scale, 8, fs=SR)
            out[start : start + block] += signal.lfilter(b, a, segment)
    return (out / 3.0).astype(np.float32)


MEL_BANKS = torchaudio.functional.melscale_fbanks(201, 0.0, SR / 2, 40, SR).numpy()  # (201 bins, 40 bands)


def log_spectral_distance(out, target):
    """RMS difference in dB of 40-band mel spectra (25 ms windows, 10 ms hop), mean over voiced frames."""
    n = min(len(out), len(target))
    mel_db = [
        10 * np.log10(MEL_BANKS.T @ np.abs(signal.stft(x[:n], SR, nperseg=400, noverlap=240)[2]) ** 2 + 1e-7)
        for x in (out, target)
    ]
    per_frame = np.sqrt(((mel_db[0] - mel_db[1]) ** 2).mean(axis=0))
    voiced = syllable_envelope(np.arange(len(per_frame)) * 0.01) > 0.5
    return float(per_frame[voiced].mean())


def cpu_ms_per_second(make_view, clip, draws):
    """Mean CPU milliseconds per second of input over the (speed, semitones) draws."""
    make_view(clip, *draws[0])  # warm-up: imports, caches
    start = time.process_time()
    for speed, semitones in draws:
        make_view(clip, speed, semitones)
    return (time.process_time() - start) * 1000 / (len(draws) * len(clip) / SR)


def pitch_quality(shift_pitch, clip_seconds=4.0):
    """Mean log-spectral distance (dB) to the ideal and mean level ratio over the shifts."""
    clip = speech_like(clip_seconds)
    distances, levels = [], []
    for semitones in SHIFTS:
        target = speech_like(clip_seconds, scale=2 ** (semitones / 12))
        out = np.asarray(shift_pitch(clip, semitones), dtype=np.float32)
        distances.append(log_spectral_distance(out, target))
        levels.append(np.sqrt(np.mean(out**2) / np.mean(target**2)))
    return float(np.mean(distances)), float(np.mean(levels))


# Time-stretchers: (wav, length factor) -> about len(wav) * factor samples, pitch kept.
def signalsmith(preset):
    """preset: "default", "cheaper" (the library's), or a window in seconds with half-window hops."""

    def stretch(wav, factor):
        stretcher = python_stretch.Signalsmith.Stretch(0)
        if isinstance(preset, float):
            stretcher.configure(1, round(preset * SR), round(preset * SR) // 2)
        else:
            stretcher.preset(1, SR, preset == "cheaper")
        stretcher.setTimeFactor(1 / factor)
        return stretcher.process(wav[None, :])[0]

    return stretch


def pedalboard_stretch(high_quality):
    import pedalboard

    return lambda wav, factor: pedalboard.time_stretch(wav[None, :], SR, 1 / factor, high_quality=high_quality)[0]


def tdhs(fast):
    from audiostretchy.interface.tdhs import TDHSAudioStretch

    def stretch(wav, factor):
        peak = max(float(np.abs(wav).max()), 1e-9)
        pcm = np.round(wav / peak * 32767).astype(np.int16)  # the library works on 16-bit PCM
        flags = TDHSAudioStretch.STRETCH_FAST_FLAG if fast else 0
        stretcher = TDHSAudioStretch(SR // 333, SR // 55, 1, flags)
        out = np.zeros(stretcher.output_capacity(len(pcm), factor), dtype=np.int16)
        n = stretcher.process_samples(pcm, len(pcm), out, factor)
        n += stretcher.flush(out[n:])
        stretcher.deinit()
        return out[:n].astype(np.float32) * (peak / 32767)

    return stretch


def pytsmod_wsola():
    import pytsmod

    return lambda wav, factor: pytsmod.wsola(wav, factor)


def audiotsm_wsola():
    from audiotsm import wsola
    from audiotsm.io.array import ArrayReader, ArrayWriter

    def stretch(wav, factor):
        writer = ArrayWriter(1)
        wsola(1, speed=1 / factor).run(ArrayReader(wav[None, :].astype(np.float64)), writer)
        return writer.data[0]

    return stretch


STRETCHERS = [
    ("Signalsmith Stretch (python-stretch), 48 ms windows [used]", lambda: signalsmith(0.048)),
    ("Signalsmith Stretch (python-stretch), cheaper preset (100 ms)", lambda: signalsmith("cheaper")),
    ("Signalsmith Stretch (python-stretch), default preset (120 ms)", lambda: signalsmith("default")),
    ("Rubber Band (pedalboard.time_stretch), high_quality=False", lambda: pedalboard_stretch(False)),
    ("Rubber Band (pedalboard.time_stretch), high_quality=True", lambda: pedalboard_stretch(True)),
    ("TDHS (audiostretchy), fast period detection", lambda: tdhs(True)),
    ("TDHS (audiostretchy)", lambda: tdhs(False)),
    ("WSOLA (pytsmod)", pytsmod_wsola),
    ("WSOLA (audiotsm)", audiotsm_wsola),
]


def resample_then_stretch(stretch):
    """Speed s and k semitones: one soxr resampling by s * 2^(k/12), one stretch to N / s."""

    def view(wav, speed, semitones):
        ratio = speed * 2 ** (semitones / 12)
        out = soxr.resample(wav, SR, SR / ratio, quality="HQ")
        return stretch(out, ratio / speed) if semitones else out

    return view


def torchaudio_speed():
    resamplers = {}

    def view(wav, speed, semitones):
        # Speed s: read the samples as if taken at s * 16 kHz; the grid's ratios reduce to small ones.
        key = int(round(SR * speed))
        if key not in resamplers:
            resamplers[key] = torchaudio.transforms.Resample(key, SR)
        with torch.no_grad():
            return resamplers[key](torch.from_numpy(wav)).numpy()

    return view


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the timed clip")
    parser.add_argument("--views", type=int, default=40, help="random (speed, pitch) draws timed per row")
    parser.add_argument("--peer-seconds", type=float, default=2.0, help="clip length for the slow peers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    draws = [(float(rng.choice(SPEEDS)), int(rng.choice(SEMITONES))) for _ in range(args.views)]
    shifted_draws = [(s, k) for s, k in draws if k != 0]
    speed_only = [(s, 0) for s, _ in draws]
    clip = speech_like(args.seconds)
    short_clip = speech_like(args.peer_seconds)

    rows = []  # (what, which draws, how many, CPU ms per second, quality)

    def add(what, view, kind, which, quality=None, timed_clip=clip):
        rows.append((what, kind, len(which), cpu_ms_per_second(view, timed_clip, which), quality))

    ours = lambda wav, speed, semitones: perturb(wav, SR, speed=speed, semitones=semitones)  # noqa: E731
    ours_tempo = lambda wav, speed, semitones: perturb(wav, SR, speed=speed, semitones=semitones, mode="tempo")  # noqa: E731
    ours_quality = pitch_quality(lambda wav, k: perturb(wav, SR, semitones=k))
    add("perturb(), mode speed: speed x pitch, paper grids", ours, "all", draws, ours_quality)
    add("perturb(), mode speed: draws with a pitch shift only", ours, "pitch != 0", shifted_draws, ours_quality)
    add("perturb(), mode tempo: tempo x pitch, paper grids", ours_tempo, "all", draws)

    add("soxr HQ resampling (speed only) [used]", lambda w, s, k: soxr.resample(w, SR, SR / s, "HQ"), "speed", speed_only)
    add("soxr QQ resampling (speed only)", lambda w, s, k: soxr.resample(w, SR, SR / s, "QQ"), "speed", speed_only)
    add("torchaudio Resample, cached kernels (speed only)", torchaudio_speed(), "speed", speed_only)

    for name, factory in STRETCHERS:
        try:
            stretch = factory()
        except ImportError as e:
            rows.append((f"soxr + {name}", "all", len(draws), None, f"not installed ({e.name})"))
            continue
        quality = pitch_quality(lambda wav, k: resample_then_stretch(stretch)(wav, 1.0, k))
        add(f"soxr + {name}", resample_then_stretch(stretch), "all", draws, quality)

    def signalsmith_one_pass(wav, speed, semitones):
        stretcher = python_stretch.Signalsmith.Stretch(0)
        stretcher.configure(1, round(0.048 * SR), round(0.048 * SR) // 2)
        stretcher.setTimeFactor(speed)
        stretcher.setTransposeFactor(speed * 2 ** (semitones / 12))
        return stretcher.process(wav[None, :])[0]

    add(
        "Signalsmith alone (48 ms windows): time factor + transposition, one pass",
        signalsmith_one_pass,
        "all",
        draws,
        pitch_quality(lambda wav, k: signalsmith_one_pass(wav, 1.0, k)),
    )
    try:
        import pedalboard

        def pedalboard_pitch(wav, speed, semitones):
            out = soxr.resample(wav, SR, SR / speed, "HQ")
            return pedalboard.PitchShift(semitones=semitones)(out, SR) if semitones else out

        add(
            "soxr + pedalboard PitchShift (Rubber Band)",
            pedalboard_pitch,
            "all",
            draws,
            pitch_quality(lambda wav, k: pedalboard_pitch(wav, 1.0, k)),
        )
    except ImportError:
        rows.append(("soxr + pedalboard PitchShift (Rubber Band)", "all", len(draws), None, "not installed (pedalboard)"))

    speed_view = torchaudio_speed()

    def torchaudio_peer(wav, speed, semitones):
        # The peer's recipe (LASER): speed by resampling, then torchaudio's pitch_shift.
        out = speed_view(wav, speed, 0)
        if not semitones:
            return out
        with torch.no_grad():
            return torchaudio.functional.pitch_shift(torch.from_numpy(out)[None], SR, semitones)[0].numpy()

    add(
        f"torchaudio speed + functional.pitch_shift (peer), {args.peer_seconds:g} s clip",
        torchaudio_peer,
        "pitch != 0",
        shifted_draws[:4],
        pitch_quality(lambda wav, k: torchaudio_peer(wav, 1.0, k), clip_seconds=args.peer_seconds),
        timed_clip=short_clip,
    )

    reference = np.mean([log_spectral_distance(speech_like(4.0), speech_like(4.0, scale=2 ** (k / 12))) for k in SHIFTS])
    print(f"clip {args.seconds:g} s speech-like, 16 kHz, one thread; {args.views} random draws per row")
    print(f"pitch quality: log-spectral distance (dB) to the ideal shift; the unshifted input scores {reference:.2f}")
    print()
    print("| method | draws | CPU ms per s of audio | LSD dB | level |")
    print("|---|---|---:|---:|---:|")
    for what, kind, count, ms, quality in rows:
        timing = "-" if ms is None else f"{ms:.2f}"
        if isinstance(quality, str):
            lsd, level = quality, ""
        elif quality is None:
            lsd, level = "", ""
        else:
            lsd, level = f"{quality[0]:.2f}", f"{quality[1]:.2f}"
        print(f"| {what} | {kind} ({count}) | {timing} | {lsd} | {level} |")

if __name__ == "__main__":
    main()
