"""siamctc-extract-features: dump encoder features, one float32 ``.npy`` of shape (T, D) per utterance,
or the shards of fairseq's ``simple_kmeans`` recipe.

Accepts a HuBERT checkpoint (fairseq, s3prl-converted or a Hugging Face directory), a WavLM checkpoint
(``{cfg, model}`` or a Hugging Face directory) or a SiamCTC training checkpoint. Without
``--layer`` the output of the last transformer layer; ``--layer L`` the output of layer L (from 1),
which is what fairseq's ``HubertModel.extract_features(source, padding_mask=None, mask=False,
output_layer=L)`` and WavLM's ``extract_features(source, output_layer=L)`` return for the utterance.
``--projected``: the ``projection_dim`` (256) features SiamCTC trains (a SiamCTC checkpoint, or a
HuBERT checkpoint whose ``final_proj`` maps to 256 dimensions, taken from the last layer); refused for
an encoder without a trained projection (WavLM, a Hugging Face HubertModel).

Each utterance runs on its own (no batch padding), at 16 kHz (other rates are resampled), normalised
to zero mean and unit variance when the encoder was trained so.

Outputs. ``--format npy`` (default): ``OUT/<stem>.npy`` per audio file. ``--format kmeans --nshard N
--rank R`` with one manifest ``SPLIT.tsv``: the layout of fairseq's ``dump_hubert_feature.py``, which
its ``learn_kmeans.py`` and ``dump_km_label.py`` read: ``OUT/SPLIT_R_N.npy``, all frames of shard R's
utterances concatenated (float32, (sum T, D)), and ``OUT/SPLIT_R_N.len``, their frame counts, one a
line, for manifest lines ``round(n / N * R)`` to ``round(n / N * (R + 1))``.

Every output is written to a temporary file beside it and renamed when complete; existing outputs
are refused before any work unless ``--force``. An unreadable or too short audio file stops the run
with one line naming it (files whose header cannot be read are found before anything is written);
``--skip-bad`` skips such files instead and lists them at the end (not with ``--format kmeans``, whose
labels are matched to the manifest by line).
"""

import argparse
import sys
from pathlib import Path
from typing import List, Tuple

import numpy as np
import soundfile as sf
from tqdm import tqdm

# the extractor lives in the library; its names stay importable from here
from fairseq_siamctc.features import (  # noqa: F401
    PROJECTION_DIM,
    FeatureExtractor,
    audio_files,
    default_device,
    features_of,
    write_kmeans_shard,
)
from fairseq_siamctc.models.checkpoints import CheckpointError
from fairseq_siamctc.models.formats import write_file_atomically


def output_names(files: List[Path]) -> List[str]:
    """``<stem>.npy`` per file; two inputs with the same stem are an error (one would overwrite the other)."""
    seen = {}
    for path in files:
        if path.stem in seen and seen[path.stem] != path:
            raise ValueError(f"two inputs would both be written to {path.stem}.npy: {seen[path.stem]} and {path}")
        seen[path.stem] = path
    return [f"{path.stem}.npy" for path in files]


def shard_range(total: int, nshard: int, rank: int) -> Tuple[int, int]:
    """Lines [start, end) of shard ``rank`` of ``nshard`` over ``total`` lines, as fairseq's simple_kmeans splits them."""
    if not 0 <= rank < nshard:
        raise ValueError(f"--rank must be between 0 and --nshard - 1 = {nshard - 1}, got {rank}")
    start, end = round(total / nshard * rank), round(total / nshard * (rank + 1))
    if start >= end:
        raise ValueError(f"shard {rank} of {nshard} is empty: the manifest has {total} utterances")
    return start, end


def unreadable(files: List[Path]) -> List[Tuple[Path, str]]:
    """The files whose audio header cannot be read (git-lfs pointers, text, truncated headers)."""
    bad = []
    for path in files:
        try:
            sf.info(str(path))
        except (sf.SoundFileError, RuntimeError) as err:
            bad.append((path, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__))
    return bad


def save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # through a handle: np.save would append .npy to the temporary's name
        np.save(f, array)


def write_npy_files(extractor, files: List[Path], names: List[str], out: Path, force: bool, skip_bad: bool):
    """One ``.npy`` per file, each written atomically; returns (written count, skipped [(path, reason)])."""
    written, skipped = 0, []
    for path, name in tqdm(list(zip(files, names)), desc="features", unit="file", disable=None):
        try:
            features = features_of(extractor, path)
        except ValueError as err:
            if not skip_bad:
                raise ValueError(f"{err} ({written} feature files written before it)") from err
            skipped.append((path, str(err)))
            continue
        write_file_atomically(out / name, lambda temporary: save_npy(temporary, features), force=True)
        written += 1
    return written, skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="siamctc-extract-features",
        description="Write encoder features: one float32 (T, D) .npy per utterance, or fairseq simple_kmeans shards.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="HuBERT (fairseq, s3prl or Hugging Face directory), WavLM or SiamCTC training checkpoint")
    parser.add_argument("--layer", type=int, default=None, help="transformer layer from 1 (default: the last)")
    parser.add_argument("--projected", action="store_true", help=f"the {PROJECTION_DIM}-dimensional features SiamCTC trains")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", choices=("npy", "kmeans"), default="npy",
                        help="npy: OUT/<stem>.npy per file; kmeans: OUT/SPLIT_RANK_NSHARD.npy + .len of one SPLIT.tsv manifest")
    parser.add_argument("--nshard", type=int, default=1, help="--format kmeans: number of shards of the manifest")
    parser.add_argument("--rank", type=int, default=0, help="--format kmeans: which shard to write (from 0)")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable or too short audio files (counted and listed) instead of stopping")
    parser.add_argument("--device", default=default_device(), help="torch device (default: cuda if available)")
    parser.add_argument("inputs", nargs="+", metavar="AUDIO_OR_MANIFEST", help="audio files and/or wav2vec .tsv manifests")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; give a directory")
        if args.format == "kmeans":
            if len(args.inputs) != 1 or not args.inputs[0].endswith(".tsv"):
                raise ValueError("--format kmeans takes exactly one wav2vec manifest SPLIT.tsv")
            if args.skip_bad:
                raise ValueError("--skip-bad cannot be used with --format kmeans: the .km labels are matched to the manifest by line")
            files = audio_files(args.inputs)
            start, end = shard_range(len(files), args.nshard, args.rank)
            files = files[start:end]
            stem = f"{Path(args.inputs[0]).stem}_{args.rank}_{args.nshard}"
            targets = [out / f"{stem}.npy", out / f"{stem}.len"]
        else:
            files = audio_files(args.inputs)
            names = output_names(files)
            targets = [out / name for name in names]
        existing = [str(t) for t in targets if t.exists()]
        if existing and not args.force:
            raise ValueError(f"{len(existing)} output file(s) exist, e.g. {existing[0]}; use --force to replace them")
        bad = unreadable(files)
        if bad and not args.skip_bad:
            raise ValueError(f"{bad[0][0]}: unreadable audio ({bad[0][1]})" + (f"; and {len(bad) - 1} more" if len(bad) > 1 else ""))
        extractor = FeatureExtractor(args.checkpoint, args.layer, args.projected, args.device)
        out.mkdir(parents=True, exist_ok=True)
        if args.format == "kmeans":
            frames = write_kmeans_shard(extractor, files, *targets)
            print(f"siamctc-extract-features: wrote {len(files)} utterances ({frames} frames) to {targets[0]} and {targets[1]}")
            return 0
        skipped = [(path, f"{path}: unreadable audio ({reason})") for path, reason in bad]
        keep = [i for i, path in enumerate(files) if path not in {p for p, _ in bad}]
        written, more = write_npy_files(extractor, [files[i] for i in keep], [names[i] for i in keep], out, args.force, args.skip_bad)
        skipped += more
    except (FileNotFoundError, CheckpointError, ValueError, OSError) as err:
        print(f"siamctc-extract-features: error: {err}", file=sys.stderr)
        return 1
    print(f"siamctc-extract-features: wrote {written} feature files to {args.out}")
    if skipped:
        print(f"siamctc-extract-features: skipped {len(skipped)} bad file(s):", file=sys.stderr)
        for _, reason in skipped:
            print(f"  {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
