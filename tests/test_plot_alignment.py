"""siamctc-plot-alignment: the alignment it draws is the one the objective trains."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fairseq_siamctc.cli.plot_alignment import alignment, colour_limits, path_offsets, plot, warp_ratio
from fairseq_siamctc.data.perturb import perturb
from fairseq_siamctc.losses import siamctc_loss
from fairseq_siamctc.models.siamctc import SiamCTCModel, SiamCTCModelConfig
from tiny_checkpoints import tiny_hubert_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("hubert") / "hubert.pt"
    tiny_hubert_checkpoint(path)
    cfg = OmegaConf.structured(SiamCTCModelConfig(encoder_path=str(path)))
    return SiamCTCModel.build_model(cfg).eval()


@pytest.mark.parametrize("speed", [0.8, 1.2])
def test_alignment_matches_the_training_objective(model, speed, tmp_path):
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(24000)).astype(np.float32)
    wav_pert = perturb(wav, 16000, speed=speed)
    log_probs, path, swapped = alignment(model, wav, wav_pert, temperature=2.0, blank_logit=-1.0,
                                         similarity="cosine")
    assert swapped == (speed > 1)  # a sped-up view is shorter: the roles swap, as in training
    inputs, classes = log_probs.shape[0], log_probs.shape[1] - 1
    assert inputs >= classes
    assert np.allclose(np.exp(log_probs).sum(1), 1, atol=1e-5)
    labels = path[path > 0]
    emitted = labels[np.r_[True, labels[1:] != labels[:-1]]]
    assert emitted.tolist() == list(range(1, classes + 1))  # every key frame once, in order

    # the KL term of the objective is minus the mean log-probability along this very path
    with torch.no_grad():
        out = model(torch.from_numpy(wav)[None], None, torch.from_numpy(wav_pert)[None], None)
        terms = siamctc_loss(out["z"], out["z_pert"], None, None, model.phi, model.psi)
    kld = -log_probs[np.arange(inputs), path].mean()
    assert terms["kld"].item() == pytest.approx(kld, rel=1e-4)

    png = tmp_path / "alignment.png"
    plot(log_probs, path, swapped, speed, "test", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def brute_force_offsets(path, ratio):
    """Frame by frame: the last key frame emitted up to frame i, minus i * ratio."""
    offsets, current = [], None
    for i, cls in enumerate(path):
        if cls > 0:
            current = cls - 1
        offsets.append(float("nan") if current is None else current - i * ratio)
    return np.array(offsets)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ratio", [0.8, 1.25])
def test_path_offsets_match_a_frame_by_frame_reading(seed, ratio):
    rng = np.random.default_rng(seed)
    path = rng.integers(0, 30, 50)
    path[: seed] = 0  # leading blanks: no key frame yet
    expected = brute_force_offsets(path, ratio)
    got = path_offsets(path, ratio)
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    assert np.allclose(got[~np.isnan(got)], expected[~np.isnan(expected)], rtol=0, atol=1e-12)


def test_a_path_on_the_true_warp_has_no_offset():
    # inputs are the perturbed view at speed 0.8 (longer): input frame i lies at key frame 0.8 i;
    # CTC emits each key frame once and blanks in between
    speed, inputs = 0.8, 40
    on_warp = np.floor(np.arange(inputs) * speed).astype(int) + 1
    path = np.where(np.r_[True, on_warp[1:] != on_warp[:-1]], on_warp, 0)
    offsets = path_offsets(path, warp_ratio(speed, swapped=False))
    assert np.all(offsets <= 0) and np.all(offsets > -1)  # within one frame, behind by the rounding
    # swapped (a sped-up view is shorter): the original view's frames are the inputs, ratio 1 / speed
    assert warp_ratio(1.25, swapped=True) == pytest.approx(0.8)


def test_colour_scale_is_set_by_the_key_frames_not_the_blank():
    rng = np.random.default_rng(0)
    log_probs = rng.uniform(-6.0, -4.4, (30, 21))
    with_likely_blank = log_probs.copy()
    with_likely_blank[:, 0] = -0.01
    assert colour_limits(with_likely_blank) == colour_limits(log_probs)
    vmin, vmax = colour_limits(log_probs)
    assert vmax == log_probs[:, 1:].max() and -6.0 <= vmin < -5.9


def test_plot_cli_errors_are_one_line(model, tmp_path, capsys):
    from fairseq_siamctc.cli import plot_alignment

    import soundfile as sf

    checkpoint = tmp_path / "none.pt"
    bad = tmp_path / "bad.tsv"
    bad.write_text(f"{tmp_path}\nutt.wav 16000\n")  # a space where the tab belongs
    sf.write(tmp_path / "utt.wav", np.zeros(16000, np.float32), 16000)
    for args, message in [
        (["--checkpoint", str(checkpoint), "--manifest", str(bad)], "bad.tsv:2: expected"),
        (["--checkpoint", str(checkpoint), "--manifest", str(tmp_path / "absent.tsv")], "manifest not found"),
        (["--checkpoint", str(checkpoint), "--audio", str(tmp_path / "utt.wav")], "checkpoint not found"),
        (["--checkpoint", str(checkpoint), "--manifest", str(tmp_path / "x.tsv"), "--out", str(tmp_path)],
         "is a directory"),
        (["--checkpoint", str(checkpoint), "--audio", "x.wav", "--speed", "0"], "--speed must be positive"),
    ]:
        assert plot_alignment.main(args) == 1
        err = capsys.readouterr().err
        assert err.startswith("siamctc-plot-alignment: error: ") and message in err and err.count("\n") == 1
