"""Features of a frozen speech encoder, for the tools and the library alike.

``FeatureExtractor`` reads any checkpoint the plugin knows (a HuBERT checkpoint of fairseq, s3prl or
a Hugging Face directory; a WavLM checkpoint; a SiamCTC training checkpoint) and gives one
utterance's features of a chosen layer, or SiamCTC's 256-dimensional projection of them.
``write_kmeans_shard`` writes them in the layout of fairseq's HuBERT ``simple_kmeans`` recipe.
``siamctc-extract-features`` (``fairseq_siamctc.cli.extract_features``) is the command-line shell;
the probe (``fairseq_siamctc.probe``) and the k-means units (``fairseq_siamctc.data.kmeans_units``)
use this module directly.
"""

import os
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from fairseq_siamctc.data.audio import read_audio
from fairseq_siamctc.data.paired_audio_dataset import normalize_waveform, read_manifest
from fairseq_siamctc.decoding import autocast
from fairseq_siamctc.models.checkpoints import SIAMCTC, read_checkpoint
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


def default_device() -> str:
    """The device every tool that runs a model uses unless told: CUDA when present."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_autocast(device):
    """The mixed precision a frozen encoder runs in on ``device``: bf16 where the GPU supports it,
    else fp16, on CUDA only (a CPU runs float32: its bf16 matmuls are slower than float32's)."""
    dtype = None
    if torch.device(device).type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return autocast(device, dtype)


class FeatureExtractor:
    """One utterance (S,) waveform at 16 kHz -> (T, D) features of the chosen layer (or projected)."""

    def __init__(self, checkpoint_path, layer: Optional[int] = None, projected: bool = False, device: str = "cpu"):
        checkpoint = read_checkpoint(checkpoint_path)
        projection: Optional[Callable] = None
        if checkpoint.kind == SIAMCTC:
            model = SiamCTCModel.from_checkpoint(checkpoint).to(device)  # its own projection too
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
            if projected and "projection.weight" in checkpoint.state.get("hf_heads", {}):
                # a Hugging Face export of a SiamCTC run: its trained projection is in the side file
                layer, projection = _side_file_projection(checkpoint, layer, num_layers(encoder))
            elif projected:
                own = hubert_projection(encoder, PROJECTION_DIM)
                if own is None:
                    raise ValueError(
                        f"--projected: {checkpoint_path} ({checkpoint.kind}, {checkpoint.format}) has no "
                        f"{PROJECTION_DIM}-dimensional projection of its own; use a SiamCTC checkpoint"
                    )
                if layer is not None and layer != num_layers(encoder):
                    raise ValueError(f"--projected: HuBERT's final_proj applies to the last layer ({num_layers(encoder)}), not --layer {layer}")
                projection = own
        if layer is not None and not 1 <= layer <= num_layers(encoder):
            raise ValueError(f"--layer must be between 1 and {num_layers(encoder)} for {checkpoint_path}, got {layer}")
        self.kind = checkpoint.kind
        self.encoder = encoder.to(device).eval()
        self.projection = projection if not isinstance(projection, torch.nn.Module) else projection.to(device)
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


def _side_file_projection(checkpoint, layer: Optional[int], n_layers: int):
    """(layer, projection) of the SiamCTC projection kept beside a Hugging Face export."""
    heads, metadata = checkpoint.state["hf_heads"], checkpoint.state.get("hf_metadata", {})
    trained_layer = metadata.get("feature_layer")
    if layer is not None and layer != (trained_layer or n_layers):
        raise ValueError(f"--projected: the projection of {checkpoint.path} was trained on layer {trained_layer or n_layers}, not --layer {layer}")
    weight, bias = heads["projection.weight"], heads["projection.bias"]
    projection = torch.nn.Linear(weight.size(1), weight.size(0))
    projection.load_state_dict({"weight": weight, "bias": bias})
    return trained_layer, projection.eval()


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


def features_of(extractor: FeatureExtractor, path: Path) -> np.ndarray:
    """The float32 (T, D) features of one audio file; a ValueError names the file."""
    wav = read_audio(path)
    try:
        return extractor(wav).astype(np.float32)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def write_kmeans_shard(extractor, files: List[Path], feat_path: Path, len_path: Path) -> int:
    """fairseq simple_kmeans' ``.npy`` + ``.len`` of ``files``, renamed into place only when complete."""
    from npy_append_array import NpyAppendArray

    temporaries = []
    try:
        for path in (feat_path, len_path):
            handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(handle)
            temporaries.append(name)
        os.unlink(temporaries[0])  # NpyAppendArray creates the array file itself
        lengths = []
        with NpyAppendArray(temporaries[0]) as array:
            for path in tqdm(files, desc="features", unit="file", disable=None):
                features = features_of(extractor, path)
                array.append(np.ascontiguousarray(features))
                lengths.append(len(features))
        Path(temporaries[1]).write_text("".join(f"{n}\n" for n in lengths))
        os.replace(temporaries[0], feat_path)
        os.replace(temporaries[1], len_path)
        return sum(lengths)
    finally:
        for name in temporaries:
            if os.path.exists(name):
                os.unlink(name)
