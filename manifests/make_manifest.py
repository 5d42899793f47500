"""Write fairseq wav2vec-style manifests (``{split}.tsv``) for a directory of audio files.

Usage::

    siamctc-manifest AUDIO_ROOT --dest MANIFEST_DIR [--split train] [--ext flac wav]
                     [--valid-fraction 0.01 --valid-split valid --seed 1]
                     [--sample-rate 16000] [--on-bad error|skip]
    # equivalently: python -m siamctc_manifests.make_manifest ...

    # LibriSpeech: one manifest per subset, named as fairseq's recipes expect
    siamctc-manifest LibriSpeech/train-clean-100 --dest manifests --split train
    siamctc-manifest LibriSpeech/dev-clean --dest manifests --split dev_clean
    siamctc-manifest LibriSpeech/test-clean --dest manifests --split test_clean

Every file under AUDIO_ROOT (recursively) whose name ends in one of ``--ext`` is listed. The
manifest's first line is the absolute AUDIO_ROOT; each further line is
``relative/path<TAB>num_samples``, sorted by path, so the same directory always gives the same file.
``num_samples`` is the number of frames in the file header (soundfile), not an estimate.

With ``--valid-fraction F`` a fraction F of the files (``round(F * n)``, chosen with ``--seed``) goes
to ``{valid-split}.tsv`` instead. The draw is per file, as in fairseq's ``wav2vec_manifest.py``: a
speaker can then appear in both lists; for speaker-disjoint sets, run this script on
separate directories (LibriSpeech's dev/test subsets, or the built-in corpus's split folders).

Existing manifests are never replaced without ``--force``; each is written through a temporary
file, so a manifest is either complete or absent.

Bad input: an empty directory (no file with the extensions) is an error. A file that is not
``--sample-rate`` Hz mono (or cannot be read) is an error naming the file, its rate and channel count;
with ``--on-bad skip`` such files are left out, counted, and listed on stderr instead.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

AUDIO_EXTENSIONS = ("flac", "wav")


class ManifestError(ValueError):
    """Bad input for a manifest: empty directory, unreadable or wrongly formatted audio."""


@dataclass
class ManifestSummary:
    """What a manifest run wrote and what it left out."""

    counts: dict[str, int] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def hours(self, split: str, sample_rate: int) -> float:
        return self.samples.get(split, 0) / sample_rate / 3600.0


def find_audio_files(root: Path, extensions: tuple[str, ...] = AUDIO_EXTENSIONS) -> list[Path]:
    """All files under ``root`` ending in one of ``extensions``, sorted (deterministic manifests)."""
    if not root.is_dir():
        raise ManifestError(f"{root}: not a directory")
    suffixes = tuple("." + ext.lower().lstrip(".") for ext in extensions)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    if not files:
        raise ManifestError(f"{root}: no audio files ending in {', '.join(suffixes)} found")
    return files


def audio_num_samples(path: Path, sample_rate: int) -> int:
    """Frames in ``path``; raises ManifestError unless it is readable, ``sample_rate`` Hz and mono."""
    try:
        info = sf.info(str(path))
    except RuntimeError as err:  # soundfile reports unreadable files as RuntimeError
        raise ManifestError(f"{path}: cannot read audio ({err})") from err
    if info.samplerate != sample_rate or info.channels != 1:
        raise ManifestError(
            f"{path}: {info.samplerate} Hz, {info.channels} channel(s); expected {sample_rate} Hz mono "
            f"(convert first, e.g. `sox IN -r {sample_rate} -c 1 OUT.flac`)"
        )
    if info.frames == 0:
        raise ManifestError(f"{path}: empty audio file")
    return info.frames


def write_atomically(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same folder, so that ``path``
    never holds half a file, even when the process is killed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_outputs(paths: list[Path], force: bool = False) -> None:
    """Before any work: a folder where a file is to be written is an error; so is an existing file,
    unless ``force``."""
    paths = [Path(p) for p in paths]
    folders = [p for p in paths if p.is_dir()]
    if folders:
        raise ManifestError(f"{folders[0]}: is a directory; cannot write a file there")
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        which = f"{existing[0]} and {len(existing) - 1} more output(s) exist" if len(existing) > 1 else f"{existing[0]} exists"
        raise ManifestError(f"{which} already; pass --force to replace them")


def write_tsv(path: Path, root: Path, entries: list[tuple[str, int]]) -> None:
    """fairseq wav2vec manifest: root line, then ``relpath<TAB>num_samples`` per file (atomic)."""
    write_atomically(Path(path), "".join([f"{Path(root).resolve()}\n", *(f"{rel}\t{n}\n" for rel, n in entries)]))


def read_tsv(path: Path) -> tuple[Path, list[tuple[str, int]]]:
    """Inverse of ``write_tsv``: (root, [(relpath, num_samples)]), with line numbers in errors."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot read manifest ({err})") from None
    if not lines:
        raise ManifestError(f"{path}: empty manifest (expected a root line)")
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].isdigit():
            raise ManifestError(f"{path}:{number}: expected 'relative/path<TAB>num_samples', got {line!r}")
        entries.append((parts[0], int(parts[1])))
    return Path(lines[0]), entries


def make_manifest(
    root: Path,
    dest: Path,
    split: str = "train",
    extensions: tuple[str, ...] = AUDIO_EXTENSIONS,
    valid_fraction: float = 0.0,
    valid_split: str = "valid",
    seed: int = 1,
    sample_rate: int = 16000,
    on_bad: str = "error",
    force: bool = False,
) -> ManifestSummary:
    """Write ``dest/{split}.tsv`` (and ``dest/{valid_split}.tsv`` when ``valid_fraction > 0``); an
    existing one is refused unless ``force``."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ManifestError(f"valid fraction must be in [0, 1), got {valid_fraction}")
    if on_bad not in ("error", "skip"):
        raise ManifestError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    if valid_fraction > 0 and valid_split == split:
        raise ManifestError(f"--valid-split {valid_split!r} is the name of the main split")
    if Path(dest).exists() and not Path(dest).is_dir():
        raise ManifestError(f"{dest}: exists and is not a directory")
    check_outputs([Path(dest) / f"{name}.tsv" for name in ([split, valid_split] if valid_fraction > 0 else [split])],
                  force)
    root = Path(root)
    summary = ManifestSummary()
    entries = []
    for path in find_audio_files(root, extensions):
        try:
            entries.append((path.relative_to(root).as_posix(), audio_num_samples(path, sample_rate)))
        except ManifestError as err:
            if on_bad == "error":
                raise
            summary.skipped.append((path, str(err)))
    if not entries:
        raise ManifestError(f"{root}: every audio file was skipped as bad input")

    valid_indices: set[int] = set()
    if valid_fraction > 0:
        order = list(range(len(entries)))
        random.Random(seed).shuffle(order)
        valid_indices = set(order[: round(valid_fraction * len(entries))])
    splits = {split: [e for i, e in enumerate(entries) if i not in valid_indices]}
    if valid_fraction > 0:
        splits[valid_split] = [e for i, e in enumerate(entries) if i in valid_indices]
    for name, rows in splits.items():
        write_tsv(Path(dest) / f"{name}.tsv", root, rows)
        summary.counts[name] = len(rows)
        summary.samples[name] = sum(n for _, n in rows)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="audio directory, searched recursively")
    parser.add_argument("--dest", type=Path, required=True, help="directory for the .tsv files")
    parser.add_argument("--split", default="train", help="name of the main manifest (default: train)")
    parser.add_argument("--ext", nargs="+", default=list(AUDIO_EXTENSIONS), help="audio file extensions")
    parser.add_argument("--valid-fraction", type=float, default=0.0, help="fraction of files held out")
    parser.add_argument("--valid-split", default="valid", help="name of the held-out manifest")
    parser.add_argument("--seed", type=int, default=1, help="seed of the held-out draw")
    parser.add_argument("--sample-rate", type=int, default=16000, help="required sample rate in Hz")
    parser.add_argument("--on-bad", choices=("error", "skip"), default="error",
                        help="what to do with audio that is unreadable or not SAMPLE_RATE mono")
    parser.add_argument("--force", action="store_true", help="replace manifests that exist already")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        summary = make_manifest(args.root, args.dest, args.split, tuple(args.ext), args.valid_fraction,
                                args.valid_split, args.seed, args.sample_rate, args.on_bad, args.force)
    except ManifestError as err:
        sys.exit(f"siamctc-manifest: error: {err}")
    for _, reason in summary.skipped:
        print(f"skipped {reason}", file=sys.stderr)
    for name, count in summary.counts.items():
        print(f"{args.dest / (name + '.tsv')}: {count} files, {summary.hours(name, args.sample_rate):.3f} h")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} bad file(s)")


if __name__ == "__main__":
    main()
