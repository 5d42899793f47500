"""siamctc-extract-features: dump encoder features, one float32 ``.npy`` of shape (T, D) per utterance.

Accepts a HuBERT (fairseq) checkpoint, a WavLM checkpoint or a SiamCTC training checkpoint. Without
``--layer`` the output of the last transformer layer; ``--layer L`` the output of layer L (from 1),
which is what fairseq's ``HubertModel.extract_features(source, padding_mask=None, mask=False,
output_layer=L)`` and WavLM's ``extract_features(source, output_layer=L)`` return for the utterance.
``--projected``: the ``projection_dim`` (256) features SiamCTC trains (a SiamCTC checkpoint, or a
HuBERT checkpoint whose ``final_proj`` maps to 256 dimensions, taken from the last layer).

Each utterance runs on its own (no batch padding), at 16 kHz (other rates are resampled), normalised
to zero mean and unit variance when the encoder was trained so. Output files are named after the
audio files: ``OUT/<stem>.npy``.
"""

import argparse
import sys
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

from fairseq_siamctc.data.audio import read_audio
from fairseq_siamctc.data.paired_audio_dataset import normalize_waveform, read_manifest
from fairseq_siamctc.models.checkpoints import SIAMCTC, CheckpointError, read_checkpoint
from fairseq_siamctc.models.encoders import (
    encoder_features,
    frame_count,
    hubert_projection,
    load_encoder,
    normalizes_audio,
    num_layers,
)
from fairseq_siamctc.models.siamctc import SiamCTCModel, SiamCTCModelConfig

PROJECTION_DIM = SiamCTCModelConfig.projection_dim


class FeatureExtractor:
    """One utterance (S,) waveform at 16 kHz -> (T, D) features of the chosen layer (or projected)."""

    def __init__(self, checkpoint_path, layer: Optional[int] = None, projected: bool = False, device: str = "cpu"):
        checkpoint = read_checkpoint(checkpoint_path)
        projection: Optional[Callable] = None
        if checkpoint.kind == SIAMCTC:
            model = SiamCTCModel.from_checkpoint(checkpoint)
            record, encoder = model.record, model.encoder
            if projected:
                trained_layer = model.cfg.feature_layer
                if layer is not None and layer != (trained_layer or num_layers(encoder)):
                    raise ValueError(
                        f"--projected: the projection of {checkpoint_path} was trained on layer "
                        f"{trained_layer or num_layers(encoder)}, not --layer {layer}"
                    )
                layer, projection = trained_layer, model.project
        else:
            record, encoder = load_encoder(checkpoint)
            if projected:
                own = hubert_projection(encoder, PROJECTION_DIM)
                if own is None:
                    raise ValueError(
                        f"--projected: {checkpoint_path} ({checkpoint.kind}) has no {PROJECTION_DIM}-dimensional "
                        "projection of its own; use a SiamCTC checkpoint"
                    )
                if layer is not None and layer != num_layers(encoder):
                    raise ValueError(f"--projected: HuBERT's final_proj applies to the last layer ({num_layers(encoder)}), not --layer {layer}")
                projection = own
        if layer is not None and not 1 <= layer <= num_layers(encoder):
            raise ValueError(f"--layer must be between 1 and {num_layers(encoder)} for {checkpoint_path}, got {layer}")
        self.kind = checkpoint.kind
        self.encoder = encoder.to(device).eval()
        self.projection = projection
        self.layer = layer
        self.normalize = normalizes_audio(record)
        self.device = device

    @torch.inference_mode()
    def __call__(self, wav: np.ndarray) -> np.ndarray:
        if self.normalize:
            wav = normalize_waveform(wav)
        if frame_count(self.encoder, len(wav)) < 1:
            raise ValueError(f"{len(wav)} samples is shorter than one frame of the encoder")
        source = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)).to(self.device)[None]
        x, _ = encoder_features(self.encoder, source, None, output_layer=self.layer)
        if self.projection is not None:
            x = self.projection(x)
        return x[0].float().cpu().numpy()


def audio_files(inputs: List[str]) -> List[Path]:
    """Audio paths from audio files and wav2vec ``.tsv`` manifests; an error names a missing file."""
    files = []
    for item in inputs:
        if item.endswith(".tsv"):
            manifest = read_manifest(item)
            for name, line in zip(manifest.files, manifest.line_numbers):
                path = Path(manifest.root) / name
                if not path.is_file():
                    raise FileNotFoundError(f"{item}:{line}: audio file not found: {path}")
                files.append(path)
        elif not Path(item).is_file():
            raise FileNotFoundError(f"audio file not found: {item}")
        else:
            files.append(Path(item))
    return files


def output_names(files: List[Path]) -> List[str]:
    """``<stem>.npy`` per file; two inputs with the same stem are an error (one would overwrite the other)."""
    seen = {}
    for path in files:
        if path.stem in seen and seen[path.stem] != path:
            raise ValueError(f"two inputs would both be written to {path.stem}.npy: {seen[path.stem]} and {path}")
        seen[path.stem] = path
    return [f"{path.stem}.npy" for path in files]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="siamctc-extract-features",
        description="Write one float32 (T, D) .npy of encoder features per utterance.",
    )
    parser.add_argument("--checkpoint", required=True, help="HuBERT, WavLM or SiamCTC training checkpoint")
    parser.add_argument("--layer", type=int, default=None, help="transformer layer from 1 (default: the last)")
    parser.add_argument("--projected", action="store_true", help=f"the {PROJECTION_DIM}-dimensional features SiamCTC trains")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: cuda if available)")
    parser.add_argument("inputs", nargs="+", metavar="AUDIO_OR_MANIFEST", help="audio files and/or wav2vec .tsv manifests")
    args = parser.parse_args(argv)
    try:
        files = audio_files(args.inputs)
        names = output_names(files)
        extractor = FeatureExtractor(args.checkpoint, args.layer, args.projected, args.device)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for path, name in zip(files, names):
            wav = read_audio(path)
            try:
                features = extractor(wav)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from err
            np.save(out / name, features.astype(np.float32))
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        print(f"siamctc-extract-features: error: {err}", file=sys.stderr)
        return 1
    print(f"siamctc-extract-features: wrote {len(files)} feature files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
