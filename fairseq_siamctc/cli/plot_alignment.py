"""Plot the attention-CTC alignment of one utterance and its perturbed view under a SiamCTC checkpoint.

    siamctc-plot-alignment --checkpoint checkpoints/checkpoint_last.pt \
        (--audio utt.flac | --manifest test.tsv --index 0) --speed 1.2 --semitones 0 --out alignment.png

The picture shows the log-probabilities that the objective trains (the CTC inputs along x, the
classes along y, the blank as the bottom row; colours span the key-frame classes, not the blank),
the Viterbi path over them (red dots, orange crosses on the blank), and the diagonal of the true time
warp (white, dashed): frame i of the perturbed view lies at i * speed in the original. A second
panel shows, for each input frame, the path's key frame minus the true warp's (a blank counts as the
last key frame emitted).
As in training, the inputs are the perturbed view's frames unless that view is shorter (a sped-up
copy); then the roles swap. The temperature, blank logit and similarity come from the checkpoint's
criterion settings unless given here: the paper warns that results hang on the temperature.
"""

import argparse
import pathlib
import sys

import numpy as np
import torch

from ..data.audio import SAMPLE_RATE, read_audio
from ..data.paired_audio_dataset import normalize_waveform, read_manifest
from ..data.perturb import perturb
from ..losses import alignment_log_probs, viterbi_alignment
from ..models.checkpoints import SIAMCTC, CheckpointError, read_checkpoint
from ..models.siamctc import SiamCTCModel
from .outputs import save_figure
from .plotting import pyplot


def criterion_setting(checkpoint, name, default):
    criterion = (checkpoint.cfg or {}).get("criterion") or {}
    value = criterion.get(name) if hasattr(criterion, "get") else None
    return default if value is None else value


@torch.no_grad()
def alignment(model: SiamCTCModel, wav: np.ndarray, wav_pert: np.ndarray, *, temperature: float,
              blank_logit: float, similarity: str):
    """Both views (N,), (N~,) -> (log_probs (T_in, 1 + T_cls), Viterbi path (T_in,), swapped)."""
    device = next(model.parameters()).device
    if model.normalize_audio:
        wav, wav_pert = normalize_waveform(wav), normalize_waveform(wav_pert)
    out = model(torch.as_tensor(wav, device=device)[None], None,
                torch.as_tensor(wav_pert, device=device)[None], None)
    z, z_pert = out["z"], out["z_pert"]
    query, keys, swapped = model.phi(z_pert), z, z_pert.shape[1] < z.shape[1]
    if swapped:
        query, keys = z, model.phi(z_pert)
    log_probs = alignment_log_probs(query, keys, temperature=temperature, blank_logit=blank_logit,
                                    similarity=similarity)
    lengths = torch.tensor([query.shape[1]], device=device), torch.tensor([keys.shape[1]], device=device)
    path = viterbi_alignment(log_probs, *lengths)
    return log_probs[0].float().cpu().numpy(), path[0].cpu().numpy(), swapped


def warp_ratio(speed: float, swapped: bool) -> float:
    """Class frames per input frame on the true time warp: perturbed frame i lies at original frame
    i * speed, so with the perturbed view as input the ratio is ``speed``, and ``1 / speed`` swapped."""
    return 1 / speed if swapped else speed


def path_offsets(path: np.ndarray, ratio: float) -> np.ndarray:
    """Viterbi path (T_in,) of class indices (0: blank, j: key frame j - 1) -> (T_in,) float offsets.

    Offset of input frame i: the key frame the path stands at (the last one emitted, as CTC reads a
    blank) minus i * ratio, the true warp's key frame; NaN before the path's first key frame."""
    emitted = np.where(path > 0, path - 1, -1).astype(np.float64)
    # forward fill: a blank keeps the last emitted key frame
    last = np.maximum.accumulate(np.where(emitted >= 0, np.arange(len(path)), -1))
    position = np.where(last >= 0, emitted[np.maximum(last, 0)], np.nan)
    return position - np.arange(len(path)) * ratio


def colour_limits(log_probs: np.ndarray) -> tuple:
    """(T_in, 1 + T_cls) -> (vmin, vmax) of the key-frame classes: 1st percentile to maximum. The blank,
    far likelier than any key frame after short training, would otherwise squeeze their differences
    into one colour."""
    key_frames = log_probs[:, 1:]
    return float(np.percentile(key_frames, 1)), float(key_frames.max())


def plot(log_probs, path, swapped, speed, title, out):
    """Two panels: the log-probabilities with the Viterbi path and the true warp, and the path's offset
    from the warp over time. Written through a temporary file, so ``out`` is never half a PNG."""
    plt = pyplot()
    inputs, classes = log_probs.shape[0], log_probs.shape[1] - 1
    ratio = warp_ratio(speed, swapped)
    fig, (ax, ax_offset) = plt.subplots(2, 1, figsize=(7, 8), dpi=120, sharex=True,
                                        gridspec_kw={"height_ratios": [3, 1]})
    vmin, vmax = colour_limits(log_probs)
    image = ax.imshow(log_probs.T, origin="lower", aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                      extent=(-0.5, inputs - 0.5, -1.5, classes - 0.5), interpolation="nearest")
    fig.colorbar(image, ax=[ax, ax_offset], label=f"log-probability (colours span the key-frame classes; "
                                                  f"blank row up to {log_probs[:, 0].max():.2f})", shrink=0.8)
    frames = np.arange(inputs)
    ax.plot(frames, frames * ratio, "--", color="white", lw=1.2, zorder=2,
            label=f"true time warp (speed {speed:g})")
    on_label = path > 0
    ax.plot(frames[on_label], path[on_label] - 1, "o", color="tab:red", mec="black", mew=0.4, ms=3.5,
            zorder=3, label="Viterbi path: key frame")
    ax.plot(frames[~on_label], np.full((~on_label).sum(), -1), "x", color="tab:orange", ms=3.5, zorder=3,
            label="Viterbi path: blank")
    original, perturbed = "original view frame", "perturbed view frame"
    ax.set_ylabel(f"CTC class: {perturbed if swapped else original} (-1: blank)")
    ax.set_xlim(-0.5, inputs - 0.5)
    ax.set_ylim(-1.5, classes - 0.5)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.8)

    offsets = path_offsets(path, ratio)
    ax_offset.axhline(0, color="gray", lw=0.8)
    ax_offset.plot(frames, offsets, "-", color="tab:red", lw=1, drawstyle="steps-mid")
    valid = ~np.isnan(offsets)
    mean_abs = np.abs(offsets[valid]).mean() if valid.any() else float("nan")
    ax_offset.set_ylabel("path - true warp\n(class frames)")
    ax_offset.set_xlabel(f"CTC input: {original if swapped else perturbed}")
    ax_offset.set_title(f"offset of the Viterbi path from the true warp (mean |offset| {mean_abs:.1f} frames)",
                        fontsize=9)
    save_figure(fig, out)
    return mean_abs


def fail(message) -> int:
    print(f"siamctc-plot-alignment: error: {message}", file=sys.stderr)
    return 1


def utterance_path(args) -> str:
    """The audio file to plot; ValueError or FileNotFoundError for a bad manifest or index."""
    if args.audio:
        return args.audio
    manifest = read_manifest(args.manifest)
    if not 0 <= args.index < len(manifest.files):
        raise ValueError(f"--index {args.index}: {args.manifest} has {len(manifest.files)} utterances")
    return str(pathlib.Path(manifest.root) / manifest.files[args.index])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="SiamCTC training checkpoint")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", help="a 16 kHz mono audio file")
    source.add_argument("--manifest", help="a wav2vec manifest (.tsv); with --index")
    parser.add_argument("--index", type=int, default=0, help="utterance of --manifest, from 0 (default 0)")
    parser.add_argument("--max-seconds", type=float, default=4.0,
                        help="plot the first seconds of the utterance only (default 4)")
    parser.add_argument("--speed", type=float, default=1.2, help="speed factor of the perturbed view (default 1.2)")
    parser.add_argument("--semitones", type=float, default=0.0, help="pitch shift of the perturbed view (default 0)")
    parser.add_argument("--mode", default="speed", choices=("speed", "tempo"),
                        help="speed: duration and pitch change together (default); tempo: pitch kept")
    parser.add_argument("--temperature", type=float, help="alignment temperature; default: the checkpoint's criterion's")
    parser.add_argument("--blank-logit", type=float, help="blank logit; default: the checkpoint's criterion's")
    parser.add_argument("--similarity", choices=("cosine", "dot"), help="default: the checkpoint's criterion's")
    parser.add_argument("--out", default="alignment.png", help="image file to write (default alignment.png)")
    args = parser.parse_args(argv)
    if not args.speed > 0:
        return fail(f"--speed must be positive, got {args.speed:g}")
    out = pathlib.Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        return fail(f"--out {out}: " + ("is a directory" if out.is_dir() else f"folder {out.parent} does not exist"))

    try:  # the audio first: it is the quicker to read
        audio_path = utterance_path(args)
        wav = read_audio(audio_path)[: int(args.max_seconds * SAMPLE_RATE)]
        checkpoint = read_checkpoint(args.checkpoint, allowed=(SIAMCTC,))
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        return fail(err)
    model = SiamCTCModel.from_checkpoint(checkpoint).eval()
    settings = dict(
        temperature=args.temperature or criterion_setting(checkpoint, "temperature", 2.0),
        blank_logit=args.blank_logit if args.blank_logit is not None else criterion_setting(checkpoint, "blank_logit", -1.0),
        similarity=args.similarity or str(criterion_setting(checkpoint, "similarity", "cosine")),
    )
    wav_pert = perturb(wav, SAMPLE_RATE, speed=args.speed, semitones=args.semitones, mode=args.mode)
    log_probs, path, swapped = alignment(model, wav, wav_pert, **settings)
    title = (f"{pathlib.Path(audio_path).name}: speed {args.speed:g} ({args.mode}), {args.semitones:+g} semitones, "
             f"temperature {settings['temperature']:g}")
    mean_abs = plot(log_probs, path, swapped, args.speed, title, out)
    print(f"siamctc-plot-alignment: wrote {out} ({log_probs.shape[0]} input frames, "
          f"{log_probs.shape[1] - 1} classes, {np.mean(path == 0):.0%} blank on the path, "
          f"mean |offset| from the true warp {mean_abs:.1f} frames)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
