"""siamctc-plot-alignment: the alignment it draws is the one the objective trains."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fairseq_siamctc.cli.plot_alignment import alignment, plot
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
