"""k-means units of a corpus with fairseq's stock HuBERT recipe: ``{split}.km`` and ``dict.km.txt``.

The targets of HuBERT's first pretraining iteration (MFCC units) and of its second (units of an
encoder's layer, ``--checkpoint``): the demo's seed encoder, and the unit sequences of the
``unit_sequence`` task.

Runs the functions of fairseq's ``examples/hubert/simple_kmeans`` scripts in this process, with the
plugin's fairseq fixes applied (MFCC + deltas at 100 frames a second, ``dump_mfcc_feature.py``;
scikit-learn mini-batch k-means fitted on one split, ``learn_kmeans.py``; ``dump_km_label.py``) on
wav2vec-style manifests, and renames their ``{split}_0_1.km`` outputs::

    python -m fairseq_siamctc.data.kmeans_units MANIFEST_DIR OUT_DIR --clusters 50 --splits train valid

With ``--checkpoint CKPT --layer L`` the features are layer L of that encoder (any checkpoint
``siamctc-extract-features`` reads, written in ``dump_hubert_feature.py``'s layout by it) instead of
MFCC; the k-means and labelling steps are the same.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import fairseq


def simple_kmeans_dir() -> Path:
    """fairseq's ``examples/hubert/simple_kmeans`` folder of the installed fairseq."""
    folder = Path(fairseq.__file__).parent / "examples" / "hubert" / "simple_kmeans"
    if not (folder / "learn_kmeans.py").is_file():
        raise FileNotFoundError(f"fairseq's HuBERT k-means scripts are not installed (looked in {folder})")
    return folder


def _stock_modules():
    """The three stock scripts as modules (their folder on sys.path only while they import each other)."""
    folder = str(simple_kmeans_dir())
    sys.path.insert(0, folder)
    try:
        return tuple(importlib.import_module(name) for name in ("dump_mfcc_feature", "learn_kmeans", "dump_km_label"))
    finally:
        sys.path.remove(folder)


def dump_kmeans_units(
    manifest_dir: str | Path,
    out_dir: str | Path,
    num_clusters: int,
    splits: Sequence[str] = ("train", "valid"),
    fit_split: str = "train",
    seed: int = 0,
    n_init: int = 3,
    checkpoint: str | Path | None = None,
    layer: int | None = None,
) -> dict[str, Path]:
    """Fits k-means on the features of ``fit_split`` and writes ``out_dir/{split}.km`` for every split,
    and ``out_dir/dict.km.txt`` (the units 0..k-1, as fairseq's ``hubert_pretraining`` reads them).

    ``manifest_dir/{split}.tsv`` are wav2vec manifests. The features are MFCC + deltas, or with
    ``checkpoint`` the output of its transformer layer ``layer`` (from 1; None: the last).
    Returns the written paths by split.
    """
    manifest_dir, out_dir = Path(manifest_dir), Path(out_dir)
    for split in {fit_split, *splits}:
        if not (manifest_dir / f"{split}.tsv").is_file():
            raise FileNotFoundError(f"no manifest {manifest_dir / f'{split}.tsv'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    mfcc, kmeans, labels = _stock_modules()
    written = {}
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        features = f"{work}/features"
        if checkpoint is not None:
            from fairseq_siamctc.features import FeatureExtractor, audio_files, default_device, write_kmeans_shard

            extractor = FeatureExtractor(checkpoint, layer, device=default_device())
            Path(features).mkdir()
        for split in dict.fromkeys([fit_split, *splits]):
            if checkpoint is None:
                mfcc.main(str(manifest_dir), split, 1, 0, features, 16000)
            else:  # dump_hubert_feature.py's layout, which learn_kmeans and dump_km_label read
                write_kmeans_shard(extractor, audio_files([str(manifest_dir / f"{split}.tsv")]),
                                   Path(features) / f"{split}_0_1.npy", Path(features) / f"{split}_0_1.len")
        model = f"{work}/kmeans.bin"
        # learn_kmeans.py's command-line defaults, with n_init lowered from 20: the fit is the slow part
        kmeans.learn_kmeans(
            features, fit_split, 1, model, num_clusters, seed, percent=-1, init="k-means++", max_iter=100,
            batch_size=10000, tol=0.0, n_init=n_init, reassignment_ratio=0.0, max_no_improvement=100,
        )
        for split in splits:
            labels.dump_label(features, split, model, 1, 0, work)
            written[split] = Path(shutil.move(f"{work}/{split}_0_1.km", out_dir / f"{split}.km"))
    (out_dir / "dict.km.txt").write_text("".join(f"{unit} 1\n" for unit in range(num_clusters)))
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest_dir", help="folder with the {split}.tsv wav2vec manifests")
    parser.add_argument("out_dir", help="where {split}.km go")
    parser.add_argument("--clusters", type=int, default=100, help="k (HuBERT's first iteration: 100)")
    parser.add_argument("--splits", nargs="+", default=["train", "valid"])
    parser.add_argument("--fit-split", default="train", help="split whose features the k-means is fitted on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-init", type=int, default=3, help="k-means restarts (learn_kmeans.py's default: 20)")
    parser.add_argument("--checkpoint", help="units of this encoder's features instead of MFCC (HuBERT's second iteration)")
    parser.add_argument("--layer", type=int, help="with --checkpoint: transformer layer from 1 (default: the last)")
    args = parser.parse_args(argv)
    if args.layer is not None and args.checkpoint is None:
        parser.error("--layer needs --checkpoint")
    written = dump_kmeans_units(args.manifest_dir, args.out_dir, args.clusters, args.splits, args.fit_split, args.seed,
                                args.n_init, args.checkpoint, args.layer)
    for split, path in written.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
