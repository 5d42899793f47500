"""Speed-perturbed copies of a test set (audio, manifest and labels), for error rate against speaking rate.

Usage::

    siamctc-speed-testsets MANIFEST_DIR/test_clean.tsv --audio-out AUDIO_DIR
                           [--speeds 0.8 0.9 1.1 1.2] [--out-dir MANIFEST_DIR] [--labels wrd ltr phn]
    # equivalently: python -m siamctc_manifests.speed_perturb_testset ...

For every speed factor ``s`` and manifest ``{split}.tsv`` this writes

* ``AUDIO_DIR/{split}_sp{s}/<same relative path>.flac``: each file played ``s`` times faster by
  resampling (the perturbation of the SiamCTC views, ``fairseq_siamctc.data.perturb`` in mode
  ``speed``: duration and pitch change together, as in the paper's figure 2), 16-bit FLAC at the
  original sample rate, ``round(N / s)`` samples long;
* ``{out-dir}/{split}_sp{s}.tsv``: its manifest (root ``AUDIO_DIR/{split}_sp{s}``);
* ``{out-dir}/{split}_sp{s}.{label}``: a copy of each label file ``{split}.{label}`` found next to the
  manifest (``--labels``, default: whichever of wrd, ltr, phn, spm exist): speed does not change
  the transcript;
* the ``*.trans.txt`` transcript files of the source folders, copied alongside the audio, so that
  each copy is a complete LibriSpeech-layout tree of its own.

Outputs of an earlier run (manifests, labels, audio folders) are refused unless ``--force``; every
audio file of the set is checked before the first copy is written, and each file is written through
a temporary file. Speed 1.0 is the original set and is not copied. Samples pushed past full scale by the resampler's
ringing are clipped to [-1, 1] before 16-bit quantisation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from .make_manifest import ManifestError, check_outputs, read_tsv, write_atomically, write_tsv

DEFAULT_SPEEDS = (0.8, 0.9, 1.1, 1.2)
DEFAULT_LABELS = ("wrd", "ltr", "phn", "spm")


def speed_split_name(split: str, speed: float) -> str:
    """``test``, 0.8 -> ``test_sp0.8``."""
    return f"{split}_sp{speed:g}"


def speed_perturb_file(source: Path, target: Path, speed: float) -> int:
    """Writes ``source`` played ``speed`` times faster to ``target`` (FLAC); returns its length."""
    from fairseq_siamctc.data.perturb import perturb  # imports fairseq: only when audio is made

    wav, sample_rate = sf.read(str(source), dtype="float32", always_2d=False)
    if wav.ndim != 1:
        raise ManifestError(f"{source}: {wav.shape[1]} channels; speed perturbation expects mono audio")
    out = np.clip(perturb(wav, sample_rate, speed=speed, mode="speed"), -1.0, 1.0)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        sf.write(tmp, out, sample_rate, subtype="PCM_16", format="FLAC")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(out)


def read_audio_checked(source: Path) -> None:
    """Raises ManifestError unless ``source`` is a readable audio file (header only)."""
    try:
        sf.info(str(source))
    except (RuntimeError, OSError) as err:  # soundfile reports unreadable files as RuntimeError
        raise ManifestError(f"{source}: cannot read audio ({err})") from None


def speed_perturb_testset(
    tsv: Path,
    audio_out: Path,
    speeds: tuple[float, ...] = DEFAULT_SPEEDS,
    out_dir: Path | None = None,
    labels: tuple[str, ...] | None = None,
    force: bool = False,
) -> dict[str, int]:
    """Writes the perturbed copies of the set ``tsv``; returns {new split: number of files}. Existing
    outputs (manifests, labels, audio folders) are refused unless ``force``; every input is checked
    before the first file is written."""
    tsv = Path(tsv)
    split = tsv.name.removesuffix(".tsv")
    out_dir = Path(out_dir) if out_dir is not None else tsv.parent
    root, entries = read_tsv(tsv)
    if not entries:
        raise ManifestError(f"{tsv}: manifest lists no audio")
    bad_speeds = [s for s in speeds if not s > 0]
    if bad_speeds:
        raise ManifestError(f"speed factors must be positive, got {bad_speeds}")
    if labels is None:
        labels = tuple(ext for ext in DEFAULT_LABELS if (tsv.parent / f"{split}.{ext}").is_file())
    for ext in labels:
        label_file = tsv.parent / f"{split}.{ext}"
        if not label_file.is_file():
            raise ManifestError(f"{label_file}: label file not found")
        if len(label_file.read_text().splitlines()) != len(entries):
            raise ManifestError(f"{label_file}: line count differs from {len(entries)} entries of {tsv}")
    for rel, _ in entries:
        if not (root / rel).is_file():
            raise ManifestError(f"{root / rel}: audio file of {tsv} not found")
        read_audio_checked(root / rel)
    new_splits = [speed_split_name(split, s) for s in speeds if s != 1.0]
    check_outputs([out_dir / f"{name}.{ext}" for name in new_splits for ext in ("tsv", *labels)], force)
    earlier_audio = [Path(audio_out) / name for name in new_splits if (Path(audio_out) / name).exists()]
    if earlier_audio and not force:
        raise ManifestError(f"{earlier_audio[0]}: audio of an earlier run exists; pass --force to replace it")

    written = {}
    for speed in (s for s in speeds if s != 1.0):
        name = speed_split_name(split, speed)
        speed_root = Path(audio_out) / name
        rows = []
        for rel, _ in entries:
            rel_flac = Path(rel).with_suffix(".flac").as_posix()
            rows.append((rel_flac, speed_perturb_file(root / rel, speed_root / rel_flac, speed)))
        write_tsv(out_dir / f"{name}.tsv", speed_root, rows)
        for folder in sorted({Path(rel).parent for rel, _ in entries}):
            for trans in (root / folder).glob("*.trans.txt"):
                write_atomically(speed_root / folder / trans.name, trans.read_text())
        for ext in labels:
            write_atomically(out_dir / f"{name}.{ext}", (tsv.parent / f"{split}.{ext}").read_text())
        written[name] = len(rows)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path, help="{split}.tsv of the test set")
    parser.add_argument("--audio-out", type=Path, required=True, help="folder for the perturbed audio")
    parser.add_argument("--speeds", type=float, nargs="+", default=list(DEFAULT_SPEEDS), help="speed factors")
    parser.add_argument("--out-dir", type=Path, help="folder for manifests and labels (default: the manifest's)")
    parser.add_argument("--labels", nargs="*", help="label extensions to copy (default: those found)")
    parser.add_argument("--force", action="store_true",
                        help="replace manifests, labels and audio folders of earlier runs")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        written = speed_perturb_testset(args.manifest, args.audio_out, tuple(args.speeds), args.out_dir,
                                        tuple(args.labels) if args.labels is not None else None, args.force)
    except ManifestError as err:
        sys.exit(f"siamctc-speed-testsets: error: {err}")
    for name, count in written.items():
        print(f"{name}: {count} files")


if __name__ == "__main__":
    main()
