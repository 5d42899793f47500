"""SiamCTC learns an alignment: a few dozen updates of a tiny trainable encoder on pairs with a known
uniform time warp lower ``ctc`` and ``kld`` and bring the Viterbi path towards the true warp
(``path_offset``, the mean distance of the path from the warp's diagonal, towards 0).

The signals: sequences of segments (3 to 7 frames each) of 12 random class templates plus noise,
and 16 nuisance channels (a strong offset per view and frame noise) that carry no timing: a random
encoder mixes them into every feature, so that its frames are alike and its alignment poor; the
objective must teach it to keep the templates. The perturbed view is the same segments played 0.8 or
1.25 times as fast, sampled at the frame centres, so its true alignment is the diagonal."""

import torch
import torch.nn as nn

from fairseq_siamctc.losses import siamctc_loss

IN_DIM, NUISANCE, DIM = 16, 16, 32
SPEEDS = (0.8, 1.25)


def warped_pairs(g, batch, speed, templates, noise=0.3, nuisance_scale=3.0):
    """-> ((z (B, T, C), mask), (z~ (B, T~, C), mask)): z~ is z played ``speed`` times faster."""
    originals, perturbed = [], []
    for _ in range(batch):
        n = int(torch.randint(8, 13, (1,), generator=g))
        labels = torch.randint(0, len(templates), (n,), generator=g)
        bounds = torch.cumsum(torch.randint(3, 8, (n,), generator=g), 0).double()
        frames = int(bounds[-1])

        def view(times):  # the segment playing at each time, its template, noise, nuisance
            segment = torch.searchsorted(bounds, times, right=True).clamp(max=n - 1)
            x = templates[labels[segment]] + noise * torch.randn(len(times), IN_DIM, generator=g, dtype=torch.float64)
            junk = torch.randn(1, NUISANCE, generator=g, dtype=torch.float64) \
                + 0.5 * torch.randn(len(times), NUISANCE, generator=g, dtype=torch.float64)
            return torch.cat([x, nuisance_scale * junk], 1).float()

        originals.append(view(torch.arange(frames).double() + 0.5))
        perturbed.append(view((torch.arange(round(frames / speed)).double() + 0.5) * speed))

    def pad(views):
        lengths = torch.tensor([len(v) for v in views])
        return nn.utils.rnn.pad_sequence(views, batch_first=True), torch.arange(int(lengths.max()))[None] >= lengths[:, None]

    return pad(originals), pad(perturbed)


def test_siamctc_learns_the_time_warp():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(12, IN_DIM, generator=g, dtype=torch.float64)
    encoder = nn.Sequential(nn.Linear(IN_DIM + NUISANCE, DIM), nn.GELU(), nn.Linear(DIM, DIM))
    phi, psi = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
    parameters = [*encoder.parameters(), *phi.parameters(), *psi.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=3e-3)
    held_out = [warped_pairs(torch.Generator().manual_seed(123), 16, s, templates) for s in SPEEDS]

    @torch.no_grad()
    def measure():  # on held-out pairs, the same TINCE negatives each time
        totals = {"ctc": 0.0, "kld": 0.0, "path_offset": 0.0}
        for (z, mask), (z_pert, mask_pert) in held_out:
            terms = siamctc_loss(encoder(z), encoder(z_pert), mask, mask_pert, phi, psi,
                                 generator=torch.Generator().manual_seed(5))
            for name in totals:
                totals[name] += float(terms[name]) / len(held_out)
        return totals

    before = measure()
    for step in range(60):
        (z, mask), (z_pert, mask_pert) = warped_pairs(g, 8, SPEEDS[step % 2], templates)
        terms = siamctc_loss(encoder(z), encoder(z_pert), mask, mask_pert, phi, psi,
                             generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    after = measure()
    # measured: ctc 4.10 -> 3.72, kld 3.77 -> 3.41 nats, path_offset 2.18 -> 0.43 frames; the margins
    # leave room for other BLAS rounding, not for a run that learns nothing
    assert after["ctc"] < before["ctc"] - 0.15, (before, after)
    assert after["kld"] < before["kld"] - 0.15, (before, after)
    assert before["path_offset"] > 1.0, before
    assert after["path_offset"] < 0.5 * before["path_offset"], (before, after)
