import numpy as np
import pytest
from scipy import signal

from fairseq_siamctc.data.perturb import perturb

SR = 16000
SPEEDS = [0.8, 0.9, 1.0, 1.1, 1.2]
SEMITONES = [-2, -1, 0, 1, 2]


def tone(freq, seconds=1.0, amplitude=0.5):
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(wav):
    """Frequency of the largest peak of the Hann-windowed, 16x zero-padded spectrum."""
    n = 16 * len(wav)
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav)), n))
    return np.argmax(spectrum) * SR / n


def onset(wav):
    """First sample where the smoothed envelope reaches half its maximum."""
    envelope = np.convolve(np.abs(wav), np.ones(80) / 80, mode="same")
    return int(np.argmax(envelope > 0.5 * envelope.max()))


@pytest.mark.parametrize("mode", ["speed", "tempo"])
@pytest.mark.parametrize("speed", SPEEDS)
@pytest.mark.parametrize("semitones", SEMITONES)
def test_length_dtype_and_pitch_for_every_factor(mode, speed, semitones):
    wav = tone(220.0)
    out = perturb(wav, SR, speed=speed, semitones=semitones, mode=mode)
    assert out.dtype == np.float32 and out.ndim == 1
    assert len(out) == round(len(wav) / speed)
    expected_ratio = 2 ** (semitones / 12) * (speed if mode == "speed" else 1.0)
    # Trim the edges, where the stretcher's window ramps.
    core = out[len(out) // 8 : -len(out) // 8]
    assert peak_frequency(core) / 220.0 == pytest.approx(expected_ratio, rel=2e-3)
    level = np.sqrt(np.mean(core**2)) / np.sqrt(np.mean(wav**2))
    assert level == pytest.approx(1.0, abs=0.08)


@pytest.mark.parametrize(
    "kwargs, ratio",
    [
        (dict(speed=1.2), 1.2),
        (dict(speed=1.2, mode="tempo"), 1.0),
        (dict(semitones=2), 2 ** (2 / 12)),
        (dict(speed=0.8, semitones=-2), 0.8 * 2 ** (-2 / 12)),
    ],
)
def test_pitch_of_a_tone_moves_by_the_requested_ratio(kwargs, ratio):
    out = perturb(tone(300.0), SR, **kwargs)
    assert peak_frequency(out[2000:-2000]) / 300.0 == pytest.approx(ratio, rel=2e-3)


@pytest.mark.parametrize("mode", ["speed", "tempo"])
@pytest.mark.parametrize("speed", SPEEDS)
@pytest.mark.parametrize("semitones", SEMITONES)
def test_events_move_to_their_scaled_time(mode, speed, semitones):
    """A tone burst starting at t starts at t / speed (within 3 ms): no latency from the stretcher."""
    wav = np.zeros(2 * SR, dtype=np.float32)
    wav[12000:20000] = tone(250.0, seconds=0.5)
    out = perturb(wav, SR, speed=speed, semitones=semitones, mode=mode)
    assert abs(onset(out) - 12000 / speed) < 0.003 * SR


def test_speed_matches_an_independent_polyphase_resampler():
    rng = np.random.default_rng(0)
    # Band-limited noise, so that the two resamplers' anti-aliasing filters agree.
    b, a = signal.butter(8, 4000, fs=SR)
    wav = signal.lfilter(b, a, rng.standard_normal(SR)).astype(np.float32)
    out = perturb(wav, SR, speed=0.8)
    reference = signal.resample_poly(wav, 5, 4)[: len(out)]
    inner = slice(200, len(out) - 200)
    correlation = np.corrcoef(out[inner], reference[inner])[0, 1]
    assert correlation > 0.999


def test_identity_returns_a_copy():
    wav = tone(200.0)
    out = perturb(wav, SR)
    np.testing.assert_array_equal(out, wav)
    out[:] = 0
    assert np.abs(wav).max() > 0


def test_deterministic():
    wav = np.random.default_rng(1).standard_normal(SR).astype(np.float32)
    first = perturb(wav, SR, speed=1.1, semitones=2)
    np.testing.assert_array_equal(first, perturb(wav, SR, speed=1.1, semitones=2))


@pytest.mark.parametrize("n", [0, 1, 7, 300])
def test_very_short_input_keeps_the_length_rule(n):
    wav = np.full(n, 0.1, dtype=np.float32)
    assert len(perturb(wav, SR, speed=0.9, semitones=1)) == round(n / 0.9)


@pytest.mark.parametrize(
    "wav, kwargs, message",
    [
        (np.zeros(100), dict(mode="pitch"), "mode"),
        (np.zeros(100), dict(speed=0.0), "speed"),
        (np.zeros(100), dict(speed=float("nan")), "speed"),
        (np.zeros(100), dict(semitones=float("inf")), "semitones"),
        (np.zeros((2, 100)), dict(), "mono"),
    ],
)
def test_bad_arguments_are_named(wav, kwargs, message):
    with pytest.raises(ValueError, match=message):
        perturb(wav, SR, **kwargs)
