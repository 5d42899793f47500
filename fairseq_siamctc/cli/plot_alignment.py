"""Plot the attention-CTC alignment of one utterance and its perturbed view under a SiamCTC checkpoint.

    siamctc-plot-alignment --checkpoint checkpoints/checkpoint_last.pt \
        (--audio utt.flac | --manifest test.tsv --index 0) --speed 1.2 --semitones 0 --out alignment.png

The picture shows the log-probabilities that the objective trains (the CTC inputs along x, the
classes along y, the blank as the bottom row), the Viterbi path over them (white), and the diagonal
of the true time warp (dashed): frame i of the perturbed view lies at i * speed in the original.
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


def plot(log_probs, path, swapped, speed, title, out):
    plt = pyplot()
    inputs, classes = log_probs.shape[0], log_probs.shape[1] - 1
    fig, ax = plt.subplots(figsize=(7, 6), dpi=120)
    image = ax.imshow(np.maximum(log_probs.T, -20), origin="lower", aspect="auto", cmap="viridis",
                      extent=(-0.5, inputs - 0.5, -1.5, classes - 0.5))
    fig.colorbar(image, ax=ax, label="log-probability (clipped at -20)")
    frames = np.arange(inputs)
    on_label = path > 0
    ax.plot(frames[on_label], path[on_label] - 1, "w.", ms=3, label="Viterbi path (key frame)")
    ax.plot(frames[path == 0], np.full((path == 0).sum(), -1), "wx", ms=3, label="Viterbi path (blank)")
    # perturbed frame i <-> original frame i * speed
    ratio = 1 / speed if swapped else speed
    ax.plot(frames, frames * ratio, "--", color="tab:red", lw=1, label=f"true time warp (speed {speed:g})")
    original, perturbed = "original view frame", "perturbed view frame"
    ax.set_xlabel(f"CTC input: {original if swapped else perturbed}")
    ax.set_ylabel(f"CTC class: {perturbed if swapped else original} (-1: blank)")
    ax.set_xlim(-0.5, inputs - 0.5)
    ax.set_ylim(-1.5, classes - 0.5)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def utterance_path(args) -> str:
    if args.audio:
        return args.audio
    manifest = read_manifest(args.manifest)
    if not 0 <= args.index < len(manifest.files):
        raise SystemExit(f"--index {args.index}: {args.manifest} has {len(manifest.files)} utterances")
    return str(pathlib.Path(manifest.root) / manifest.files[args.index])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="SiamCTC training checkpoint")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", help="a 16 kHz mono audio file")
    source.add_argument("--manifest", help="a wav2vec manifest (.tsv); with --index")
    parser.add_argument("--index", type=int, default=0, help="utterance of --manifest, from 0")
    parser.add_argument("--max-seconds", type=float, default=4.0, help="plot the first seconds only")
    parser.add_argument("--speed", type=float, default=1.2)
    parser.add_argument("--semitones", type=float, default=0.0)
    parser.add_argument("--mode", default="speed", choices=("speed", "tempo"))
    parser.add_argument("--temperature", type=float, help="default: the checkpoint's criterion's")
    parser.add_argument("--blank-logit", type=float, help="default: the checkpoint's criterion's")
    parser.add_argument("--similarity", choices=("cosine", "dot"), help="default: the checkpoint's")
    parser.add_argument("--out", default="alignment.png")
    args = parser.parse_args(argv)

    try:
        checkpoint = read_checkpoint(args.checkpoint, allowed=(SIAMCTC,))
    except (FileNotFoundError, CheckpointError) as err:
        print(f"siamctc-plot-alignment: error: {err}", file=sys.stderr)
        return 1
    model = SiamCTCModel.from_checkpoint(checkpoint).eval()
    settings = dict(
        temperature=args.temperature or criterion_setting(checkpoint, "temperature", 2.0),
        blank_logit=args.blank_logit if args.blank_logit is not None else criterion_setting(checkpoint, "blank_logit", -1.0),
        similarity=args.similarity or str(criterion_setting(checkpoint, "similarity", "cosine")),
    )
    audio_path = utterance_path(args)
    try:
        wav = read_audio(audio_path)[: int(args.max_seconds * SAMPLE_RATE)]
    except ValueError as err:
        print(f"siamctc-plot-alignment: error: {err}", file=sys.stderr)
        return 1
    wav_pert = perturb(wav, SAMPLE_RATE, speed=args.speed, semitones=args.semitones, mode=args.mode)
    log_probs, path, swapped = alignment(model, wav, wav_pert, **settings)
    title = (f"{pathlib.Path(audio_path).name}: speed {args.speed:g} ({args.mode}), {args.semitones:+g} semitones, "
             f"temperature {settings['temperature']:g}")
    plot(log_probs, path, swapped, args.speed, title, args.out)
    print(f"siamctc-plot-alignment: wrote {args.out} ({log_probs.shape[0]} input frames, "
          f"{log_probs.shape[1] - 1} classes, {np.mean(path == 0):.0%} blank on the path)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
