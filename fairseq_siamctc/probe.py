"""SUPERB's phoneme recognition (PR) protocol on a frozen encoder: the paper's evaluation.

The encoder is never trained. A small head is trained with CTC over the phoneme dictionary on its
hidden states (the input to the first transformer layer and the output of every layer):

    softmax-weighted sum of the L + 1 hidden states -> Linear(D, 256) -> Linear(256, V)

as s3prl's ``downstream/ctc`` expert with ``select: FrameLevel`` (its ``project_dim`` of 256 and a
linear frame-level model). Training follows s3prl's ``downstream/ctc/libriphone.yaml``: Adam at a
constant learning rate of 1e-2, batches of 16 utterances with 2 accumulated per update, gradient
norm clipped to 1, the dev PER measured every ``eval_step`` updates and the best head kept; only
the number of updates (100,000 there) is scaled to the data. Decoding is greedy CTC, and the PER
is summed over a split (edit distances over reference lengths), as SUPERB computes it.

Two modes, one PER: both give the head the hidden states rounded to float16, those of the dev and
test utterances bit for bit alike (the same batches of extraction), those of training batches to
a float16 step in a few values (batch padding moves float32 rounding). Under CUDA's bf16 autocast
padding moves bf16 rounding instead, and the modes' PERs are close rather than equal (on an H200,
HuBERT Base with random weights, 60 updates: test PER 94.68 streaming, 95.14 cached):

* cached: every split's hidden states are extracted once per (checkpoint, split), in batches,
  into an on-disk cache (``FeatureCache``, float16 (frames, L + 1, D)), and the head trains on
  the memory-mapped cache; another seed costs only the head's training. For small sets.
* streaming: the frozen encoder runs inside the head's training loop on each batch of utterances
  (``StreamedSplit``), as s3prl runs its upstream; dev selection and the test PER extract on the
  fly too. Nothing is written to disk: for LibriSpeech, whose train-clean-100 alone would be a
  361 GB cache for a 12-layer, 768-dimensional encoder.

``probe_checkpoint`` picks the mode from the cache's estimated size (``cache_bytes``, exact from the
manifests' lengths) against a budget (``choose_mode``). In a batch, the utterances are padded and
the encoder gets the padding mask (its features of an utterance equal, to float rounding, those of
the utterance alone; see ``fairseq_siamctc.models.encoders``); the padded frames of every hidden
state are set to zero and lie beyond each utterance's frame count, which is all the CTC loss and the
decoding read, so padding never reaches the head's loss. On CUDA the encoder runs under autocast
(bf16 where supported, else fp16); the head always trains in float32.

Resuming: with an output folder, each seed's run state (head, optimizer, update, best dev PER and
its head, the batch order's random state) is saved after every evaluation to
``OUT/probe_seed{seed}.pt`` (a temporary file renamed into place, read back with weights_only), and
a run of the same settings (encoder, training and dev data, dictionary, ``ProbeConfig``) resumes from
it, giving the same updates, bit for bit, as a run never stopped. The mode is not one of those
settings: a run may resume in the other one (then equal to float16 rounding, not bit for bit).

One process, one device: several GPUs run several probes (one encoder each) side by side; the head's
updates are sequential, so the probe itself is not data-parallel.

The pure functions (weighted sum, head, greedy decoding, error counts, cache size, mode) take
values in and give values out; ``train_probe`` is the training loop on any split source (cached or
streamed); ``fairseq_siamctc.cli.probe`` is the command-line shell.
"""

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import editdistance
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BLANK = 0  # the head's class 0 is CTC's blank; phoneme k of the dictionary is class k + 1
MODES = ("auto", "cached", "streaming")
DEFAULT_CACHE_BUDGET_GB = 50.0
GB = 1e9
EXTRACT_BATCH = 16  # utterances per encoder pass when filling the cache or evaluating


@dataclass
class ProbeConfig:
    """s3prl's libriphone.yaml, except ``total_steps`` and ``eval_step`` (scaled to the data)."""

    lr: float = 1e-2
    batch_size: int = 16
    accumulate: int = 2
    clip_norm: float = 1.0
    total_steps: int = 100000
    eval_step: int = 1000
    project_dim: int = 256
    seed: int = 1


# -- the math -------------------------------------------------------------------------------------

def weighted_layer_sum(hidden: torch.Tensor, layer_logits: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, T, D), layer_logits (L,) -> (B, T, D): sum_l softmax(layer_logits)_l * hidden[:, l]."""
    weights = torch.softmax(layer_logits, dim=0).to(hidden.dtype)
    return torch.einsum("bltd,l->btd", hidden, weights)


class ProbeHead(nn.Module):
    """The trainable part: layer weights (zeros: a uniform average at the start) and two linears."""

    def __init__(self, num_layers: int, dim: int, num_classes: int, project_dim: int = 256):
        super().__init__()
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))
        self.projector = nn.Linear(dim, project_dim)
        self.classifier = nn.Linear(project_dim, num_classes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, T, D) -> log-probabilities (B, T, V)."""
        x = weighted_layer_sum(hidden, self.layer_logits)
        return F.log_softmax(self.classifier(self.projector(x)), dim=-1)

    def layer_weights(self) -> List[float]:
        return torch.softmax(self.layer_logits.detach(), dim=0).tolist()


def ctc_loss(log_probs: torch.Tensor, frame_lengths: torch.Tensor, targets: torch.Tensor,
             target_lengths: torch.Tensor) -> torch.Tensor:
    """log_probs (B, T, V), frame_lengths (B,), targets (B, U) padded, target_lengths (B,) -> scalar.

    PyTorch's CTC with the reduction s3prl uses (each utterance's loss over its target length,
    averaged over the batch) and ``zero_infinity`` (a target longer than its frames gives 0)."""
    return F.ctc_loss(log_probs.transpose(0, 1), targets, frame_lengths, target_lengths,
                      blank=BLANK, reduction="mean", zero_infinity=True)


def greedy_decode(log_probs: torch.Tensor, length: Optional[int] = None) -> List[int]:
    """log_probs (T, V) of one utterance -> class indices of the best path, repeats merged, blanks dropped."""
    path = log_probs[:length].argmax(dim=-1).unique_consecutive()
    return path[path != BLANK].tolist()


def edit_errors(hypotheses: Sequence[Sequence], references: Sequence[Sequence]) -> Tuple[np.ndarray, np.ndarray]:
    """Per utterance: (edit distance, reference length), both (N,) int64."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    errors = np.array([editdistance.eval(list(h), list(r)) for h, r in zip(hypotheses, references)], dtype=np.int64)
    lengths = np.array([len(r) for r in references], dtype=np.int64)
    return errors, lengths


def error_rate(errors: np.ndarray, lengths: np.ndarray) -> float:
    """100 * summed edit distance / summed reference length (SUPERB's and fairseq's PER)."""
    total = int(np.sum(lengths))
    if total == 0:
        raise ValueError("the references are empty: no error rate")
    return 100.0 * float(np.sum(errors)) / total


# -- the cache's size and the mode -----------------------------------------------------------------

def cache_bytes(num_frames: int, num_states: int, dim: int) -> int:
    """Bytes of the float16 hidden states of ``num_frames`` frames: (frames, L + 1, D), 2 bytes each."""
    return int(num_frames) * int(num_states) * int(dim) * 2


def choose_mode(mode: str, estimate: int, budget_gb: float, on_disk: bool = False) -> str:
    """``cached`` or ``streaming``: ``auto`` caches when the cache is on disk already or its
    estimated size (bytes) is within ``budget_gb`` (10^9 bytes), and streams otherwise."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if budget_gb < 0:
        raise ValueError(f"the cache budget must be at least 0 GB, got {budget_gb:g}")
    if mode != "auto":
        return mode
    return "cached" if on_disk or estimate <= budget_gb * GB else "streaming"


def length_sorted_chunks(lengths: np.ndarray, size: int) -> List[np.ndarray]:
    """Utterance indices, longest first (ties in manifest order), in chunks of ``size``: the batches
    of extraction and evaluation, the same in both modes (so their valid and test inputs agree)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i: i + size] for i in range(0, len(order), size)]


# -- hidden states of a frozen encoder --------------------------------------------------------------

class HiddenStates:
    """A frozen encoder of any kind ``siamctc-extract-features`` reads -> its L + 1 hidden states.

    Hidden state 0 is the input to the first transformer layer, state l the output of layer l (of
    pre-LN models without the final layer norm), as s3prl's ``hidden_states``. Captured by forward
    hooks during one pass over a padded batch with its padding mask."""

    def __init__(self, checkpoint, device="cpu"):
        from fairseq_siamctc.features import FeatureExtractor
        from fairseq_siamctc.models.encoders import encoder_dim
        from fairseq_siamctc.models.wavlm import WavLM

        self.extractor = FeatureExtractor(checkpoint, device=device)
        self.encoder = self.extractor.encoder
        self.layers = self.encoder.encoder.layers
        self.num_states = len(self.layers) + 1
        self.dim = encoder_dim(self.encoder)
        self.device = torch.device(device)
        self.batch_first = isinstance(self.encoder, WavLM)  # fairseq's layers take (T, B, D), WavLM's (B, T, D)

    def frames(self, num_samples: int) -> int:
        from fairseq_siamctc.models.encoders import frame_count

        return frame_count(self.encoder, num_samples)

    @torch.no_grad()  # not inference_mode: streamed states go on into the head's autograd graph
    def batch(self, wavs: Sequence[np.ndarray],
              dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """B waveforms (S_b,) at 16 kHz -> hidden (B, L + 1, T, D) of ``dtype`` on the encoder's
        device, zero at each utterance's padded frames, and frame counts (B,) int64 (T their maximum)."""
        from fairseq_siamctc.data.paired_audio_dataset import normalize_waveform, pad_waveforms
        from fairseq_siamctc.features import inference_autocast
        from fairseq_siamctc.models.encoders import encoder_features

        frames = [self.frames(len(wav)) for wav in wavs]
        for wav, n in zip(wavs, frames):
            if n < 1:
                raise ValueError(f"{len(wav)} samples is shorter than one frame of the encoder")
        if self.extractor.normalize:  # per utterance, before padding
            wavs = [normalize_waveform(wav) for wav in wavs]
        source, padding_mask = pad_waveforms([torch.from_numpy(np.asarray(w, dtype=np.float32)) for w in wavs])
        source, padding_mask = source.to(self.device), padding_mask.to(self.device)
        captured: List[torch.Tensor] = []

        def keep(x):  # -> (B, T', D); fairseq pads T' to a multiple of its required_seq_len_multiple
            captured.append((x if self.batch_first else x.transpose(0, 1)).to(dtype))

        handles = [self.layers[0].register_forward_pre_hook(lambda m, args: keep(args[0]))]
        handles += [layer.register_forward_hook(lambda m, args, out: keep(out[0] if isinstance(out, tuple) else out))
                    for layer in self.layers]
        try:
            with inference_autocast(self.device):
                encoder_features(self.encoder, source, padding_mask)
        finally:
            for handle in handles:
                handle.remove()
        if len(captured) != self.num_states:
            raise RuntimeError(f"captured {len(captured)} hidden states, expected {self.num_states}")
        longest = max(frames)
        hidden = torch.stack([h[:, :longest] for h in captured], dim=1)
        del captured
        lengths = torch.tensor(frames, dtype=torch.int64, device=self.device)
        padded = torch.arange(longest, device=self.device)[None, :] >= lengths[:, None]  # (B, T)
        return hidden.masked_fill_(padded[:, None, :, None], 0), lengths

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        """One utterance (S,) -> (T, L + 1, D) float32 on the host."""
        hidden, _ = self.batch([wav])
        return hidden[0].transpose(0, 1).float().cpu().numpy()


class AudioReader:
    """Reads utterances on background threads, so that the next batch's audio is decoded while the
    encoder runs on this one (libsndfile and soxr release the GIL)."""

    def __init__(self, workers: int = 4, keep: int = 2):
        self.workers, self.keep = workers, keep
        self.pool: Optional[ThreadPoolExecutor] = None
        self.pending: Dict[tuple, list] = {}

    def _submit(self, paths):
        from fairseq_siamctc.data.audio import read_audio

        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="probe-audio")
        return [self.pool.submit(read_audio, path) for path in paths]

    def prefetch(self, paths: Sequence[Path]) -> None:
        key = tuple(paths)
        if key not in self.pending:
            while len(self.pending) >= self.keep:  # a batch never asked for (the run stopped): drop it
                self.pending.pop(next(iter(self.pending)))
            self.pending[key] = self._submit(paths)

    def read(self, paths: Sequence[Path], where: Optional[Sequence[str]] = None) -> List[np.ndarray]:
        """The waveforms of ``paths``; an error is prefixed with the file's ``where`` (a manifest line)."""
        futures = self.pending.pop(tuple(paths), None) or self._submit(paths)
        wavs = []
        for i, future in enumerate(futures):
            try:
                wavs.append(future.result())
            except (ValueError, OSError) as err:
                raise ValueError(f"{where[i]}: {err}" if where else str(err)) from err
        return wavs

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool, self.pending = None, {}


# -- the splits: cached features or audio streamed through the encoder ------------------------------

@dataclass
class SplitFeatures:
    """Hidden states of one split: ``frames`` (total frames, L, D), utterance u at
    ``frames[offsets[u]:offsets[u] + lengths[u]]`` (a memory map when read from the cache)."""

    frames: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray

    def __len__(self):
        return len(self.lengths)

    @property
    def num_states(self) -> int:
        return int(self.frames.shape[1])

    @property
    def dim(self) -> int:
        return int(self.frames.shape[2])

    @classmethod
    def from_list(cls, utterances: Sequence[np.ndarray]) -> "SplitFeatures":
        """From per-utterance (T_u, L, D) arrays (tests, small data)."""
        lengths = np.array([len(u) for u in utterances], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return cls(np.concatenate(utterances, axis=0), offsets, lengths)

    def prefetch(self, indices: Sequence[int]) -> None:
        """Nothing to do: the page cache reads ahead."""

    def batch(self, indices: Sequence[int], device) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> hidden (B, L, T_max, D) float32 zero-padded, frame lengths (B,)."""
        lengths = self.lengths[list(indices)]
        _, num_layers, dim = self.frames.shape
        out = np.zeros((len(indices), int(lengths.max()), num_layers, dim), dtype=np.float32)
        for row, u in enumerate(indices):
            start = self.offsets[u]
            out[row, : self.lengths[u]] = self.frames[start: start + self.lengths[u]]
        hidden = torch.from_numpy(out).to(device).transpose(1, 2)
        return hidden, torch.from_numpy(lengths).to(device)


class StreamedSplit:
    """The utterances of a manifest, whose hidden states the encoder computes when a batch asks for
    them: ``SplitFeatures``' interface (``len``, ``lengths``, ``num_states``, ``dim``, ``batch``,
    ``prefetch``) without the disk. ``lengths`` are frame counts from the manifest's sample counts."""

    def __init__(self, states: HiddenStates, manifest, reader: Optional[AudioReader] = None):
        from fairseq_siamctc.data.paired_audio_dataset import read_manifest

        entries = read_manifest(str(manifest))
        self.manifest, self.states = Path(manifest), states
        self.reader = reader or AudioReader()
        self.paths = [Path(entries.root) / name for name in entries.files]
        self.line_numbers = list(entries.line_numbers)
        self.lengths = np.array([states.frames(int(n)) for n in entries.num_samples], dtype=np.int64)
        for path, line, n in zip(self.paths, self.line_numbers, self.lengths):
            if n < 1:
                raise ValueError(f"{manifest}:{line}: {path.name} is shorter than one frame of the encoder")
        self.num_states, self.dim = states.num_states, states.dim

    def __len__(self):
        return len(self.lengths)

    def prefetch(self, indices: Sequence[int]) -> None:
        self.reader.prefetch([self.paths[u] for u in indices])

    def hidden16(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> hidden (B, L + 1, T_max, D) float16 on the encoder's device (as the cache stores them;
        zero at padded frames), frame lengths (B,). Errors name the manifest line and file."""
        wavs = self.reader.read([self.paths[u] for u in indices],
                                [f"{self.manifest}:{self.line_numbers[u]}" for u in indices])
        for u, wav in zip(indices, wavs):
            if self.states.frames(len(wav)) != self.lengths[u]:
                raise ValueError(f"{self.manifest}:{self.line_numbers[u]}: {self.paths[u]} has "
                                 f"{self.states.frames(len(wav))} frames, its listed num_samples gives "
                                 f"{self.lengths[u]}: the manifest is stale")
        hidden, lengths = self.states.batch(wavs, torch.float16)
        finite = torch.isfinite(hidden).flatten(1).all(dim=1)
        if not bool(finite.all()):
            u = indices[int((~finite).nonzero()[0, 0])]
            raise ValueError(f"{self.manifest}:{self.line_numbers[u]}: {self.paths[u]}: hidden states beyond "
                             "float16's range")
        return hidden, lengths

    def batch(self, indices: Sequence[int], device) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> hidden (B, L + 1, T_max, D) float32 (float16 values), frame lengths (B,), on ``device``."""
        hidden, lengths = self.hidden16(indices)
        return hidden.to(device).float(), lengths.to(device)


# -- labels, and the on-disk cache --------------------------------------------------------------

def read_dictionary(path) -> List[str]:
    """A fairseq ``dict.*.txt`` (``symbol count`` per line) -> its symbols in order."""
    symbols = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) < 1 or parts[0] in symbols:
            raise ValueError(f"{path}:{number}: expected a new 'symbol count' line, got {line!r}")
        symbols.append(parts[0])
    if not symbols:
        raise ValueError(f"{path}: the dictionary is empty")
    return symbols


def read_labels(path, symbols: Sequence[str], expected: int) -> List[List[int]]:
    """A label file (one utterance a line, space-separated symbols) -> class indices (symbol k -> k + 1)."""
    index = {s: k + 1 for k, s in enumerate(symbols)}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) != expected:
        raise ValueError(f"{path} has {len(lines)} lines but the manifest has {expected} utterances")
    labels = []
    for number, line in enumerate(lines, start=1):
        try:
            labels.append([index[s] for s in line.split()])
        except KeyError as err:
            raise ValueError(f"{path}:{number}: symbol {err.args[0]!r} is not in the dictionary") from None
    return labels


def file_hash(path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes; of a folder (a Hugging Face checkpoint): of its files' names and bytes."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


class FeatureCache:
    """``root/<checkpoint hash>/<split>-<manifest hash>.npy`` (float16 (frames, L + 1, D)) with
    ``.json`` (offsets, lengths): written once, then memory-mapped. The keys are content hashes,
    so a retrained checkpoint or an edited manifest never reuses stale features. Extraction runs
    in batches of ``EXTRACT_BATCH`` utterances of similar lengths."""

    def __init__(self, root, checkpoint, device="cpu", states: Optional[HiddenStates] = None,
                 checkpoint_hash: Optional[str] = None):
        self.checkpoint = Path(checkpoint)
        self.folder = Path(root) / (checkpoint_hash or file_hash(self.checkpoint))[:16]
        self.device = device
        self._states = states

    def paths(self, manifest) -> Tuple[Path, Path]:
        split = Path(manifest).name.removesuffix(".tsv")
        stem = f"{split}-{file_hash(manifest)[:12]}"
        return self.folder / f"{stem}.npy", self.folder / f"{stem}.json"

    def exists(self, manifest) -> bool:
        return all(path.is_file() for path in self.paths(manifest))

    def load(self, manifest, progress: Optional[Callable] = None,
             streamed: Optional[StreamedSplit] = None) -> SplitFeatures:
        """The split's cached features, extracted first if missing (from ``streamed``, the
        manifest's StreamedSplit on this cache's encoder, when the caller has one)."""
        npy, meta = self.paths(manifest)
        if not (npy.is_file() and meta.is_file()):
            self._extract(manifest, npy, meta, progress, streamed)
        index = json.loads(meta.read_text())
        return SplitFeatures(np.load(npy, mmap_mode="r"), np.array(index["offsets"], dtype=np.int64),
                             np.array(index["lengths"], dtype=np.int64))

    def _extract(self, manifest, npy: Path, meta: Path, progress, split: Optional[StreamedSplit]):
        if split is None:
            if self._states is None:
                self._states = HiddenStates(self.checkpoint, self.device)
            split = StreamedSplit(self._states, manifest)
        lengths = split.lengths
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = npy.with_name(f".{npy.name}.{os.getpid()}.tmp")
        frames = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                           shape=(int(lengths.sum()), split.num_states, split.dim))
        try:
            chunks = length_sorted_chunks(lengths, EXTRACT_BATCH)
            for i, chunk in enumerate(chunks):
                if i + 1 < len(chunks):
                    split.prefetch(chunks[i + 1])
                hidden, _ = split.hidden16(chunk)
                hidden = hidden.cpu().numpy()  # (B, L + 1, T, D)
                for row, u in enumerate(chunk):
                    frames[offsets[u]: offsets[u] + lengths[u]] = hidden[row, :, : lengths[u]].transpose(1, 0, 2)
                if progress is not None:
                    progress(len(chunk))
            frames.flush()
            del frames
            os.replace(tmp, npy)
        finally:
            split.reader.close()
            if tmp.exists():
                tmp.unlink()
        meta_tmp = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
        meta_tmp.write_text(json.dumps({"manifest": str(manifest), "checkpoint": str(self.checkpoint),
                                        "offsets": offsets.tolist(), "lengths": lengths.tolist()}))
        os.replace(meta_tmp, meta)


def speed_copies(data: Path, test_split: str) -> Dict[str, str]:
    """{speed label: split} for a test split and its ``{split}_sp{s}`` copies next to it (1.0 = itself)."""
    found = {"1.0": test_split}
    prefix = f"{test_split}_sp"
    for tsv in sorted(Path(data).glob(f"{prefix}*.tsv")):
        speed = tsv.name[len(prefix): -len(".tsv")]
        try:
            found[str(float(speed))] = tsv.name[:-4]
        except ValueError:  # another split that shares the prefix
            continue
    return dict(sorted(found.items(), key=lambda kv: float(kv[0])))


# -- training and evaluation ----------------------------------------------------------------------

def batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> List[np.ndarray]:
    """One epoch of batches, s3prl's bucketing in spirit: utterances sorted by length in random
    chunks of ``batch_size``, the chunks in random order (less padding than a plain shuffle)."""
    order = rng.permutation(len(lengths))
    order = order[np.argsort(lengths[order], kind="stable")[::-1]]
    chunks = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    return [chunks[i] for i in rng.permutation(len(chunks))]


@torch.no_grad()
def decode_split(head: ProbeHead, features, device, batch_size: int = EXTRACT_BATCH) -> List[List[int]]:
    """Greedy hypotheses (class indices) of every utterance of a split (cached or streamed), in
    manifest order; the batches are ``length_sorted_chunks``."""
    head.eval()
    hypotheses: List[Optional[List[int]]] = [None] * len(features)
    chunks = length_sorted_chunks(features.lengths, batch_size)
    for i, chunk in enumerate(chunks):
        if i + 1 < len(chunks):
            features.prefetch(chunks[i + 1])
        hidden, lengths = features.batch(chunk, device)
        log_probs = head(hidden).cpu()  # one transfer a batch, not a host sync per utterance
        for u, lp, n in zip(chunk, log_probs, lengths.tolist()):
            hypotheses[u] = greedy_decode(lp, n)
    return hypotheses


def evaluate(head: ProbeHead, features, labels: List[List[int]], device) -> Dict:
    """-> {"per", "errors" (N,), "lengths" (N,), "hypotheses"} of a split."""
    hypotheses = decode_split(head, features, device)
    errors, lengths = edit_errors(hypotheses, labels)
    return {"per": error_rate(errors, lengths), "errors": errors, "lengths": lengths, "hypotheses": hypotheses}


CHECKPOINT_FORMAT = "siamctc-probe-run"


def _cpu_state(module_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module_state.items()}


def save_atomically(obj, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, renamed into place when complete."""
    from fairseq_siamctc.models.formats import write_file_atomically

    write_file_atomically(path, lambda tmp: torch.save(obj, tmp), force=True)


def _flat(settings: Dict, prefix: str = "") -> Dict:
    """{"config": {"lr": 0.01}} -> {"config.lr": 0.01}: the settings a mismatch names."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_run_state(path: Path, settings: Dict) -> Optional[Dict]:
    """A saved run state of the same ``settings``; None if there is none. Read with weights_only."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a foreign or damaged file: one line naming it
        raise ValueError(f"{path}: not a probe run state ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a probe run state")
    if state["settings"] != settings:
        ours, theirs = _flat(settings), _flat(state["settings"])
        keys = sorted(k for k in {*ours, *theirs} if ours.get(k) != theirs.get(k))
        raise ValueError(f"{path} was written with other settings ({', '.join(keys)} differ); --force starts over")
    return state


def train_probe(train, train_labels: List[List[int]], valid, valid_labels: List[List[int]], num_classes: int,
                cfg: ProbeConfig, device="cpu", progress: Optional[Callable[[int, float], None]] = None,
                checkpoint=None, settings: Optional[Dict] = None, force: bool = False,
                log: Optional[Callable[[str], None]] = None) -> Tuple[ProbeHead, Dict]:
    """Trains the head; returns the head of the best valid PER and a record of training.

    ``train`` and ``valid`` are ``SplitFeatures`` (cached) or ``StreamedSplit`` (the encoder in
    the loop). ``progress(step, loss)`` is called after every update (a progress bar).
    ``checkpoint``: a file the run's state is saved to after every evaluation; when it exists the
    run resumes from it, provided it was saved with the same settings (``settings``, a JSON-ready
    record of what the run depends on, with ``cfg`` and the head's shape added); one of other
    settings is a ValueError, or with ``force`` started over. ``log`` gets a line on resuming."""
    if len(train) != len(train_labels) or len(valid) != len(valid_labels):
        raise ValueError("features and labels disagree in the number of utterances")
    settings = {**(settings or {}), "config": dict(cfg.__dict__), "num_classes": int(num_classes),
                "num_states": int(train.num_states), "dim": int(train.dim)}
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    head = ProbeHead(train.num_states, train.dim, num_classes, cfg.project_dim).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    label_tensors = [torch.tensor(t, dtype=torch.long) for t in train_labels]
    best = {"per": math.inf, "step": 0, "state": _cpu_state(head.state_dict())}
    history, queue, step = [], [], 0
    state = None
    if checkpoint is not None:
        try:
            state = read_run_state(checkpoint, settings)
        except ValueError:
            if not force:
                raise
    if state is not None:
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        best = {"per": state["best_per"], "step": state["best_step"], "state": state["best_head"]}
        history, step = state["history"], state["step"]
        queue = [np.array(b, dtype=np.int64) for b in state["queue"]]
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        if log is not None:
            log(f"seed {cfg.seed}: resumed from {checkpoint} at update {step:,} of {cfg.total_steps:,}")
        if progress is not None and step:
            progress(step, history[-1]["loss"] if history else math.nan)
    while step < cfg.total_steps:
        head.train()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for _ in range(cfg.accumulate):
            if not queue:
                queue = batches(train.lengths, cfg.batch_size, rng)
            indices = queue.pop()
            if queue:
                train.prefetch(queue[-1])
            hidden, frame_lengths = train.batch(indices, device)
            targets = nn.utils.rnn.pad_sequence([label_tensors[u] for u in indices], batch_first=True).to(device)
            target_lengths = torch.tensor([len(label_tensors[u]) for u in indices], device=device)
            loss = ctc_loss(head(hidden), frame_lengths, targets, target_lengths) / cfg.accumulate
            loss.backward()
            loss_sum += loss.detach()
        nn.utils.clip_grad_norm_(head.parameters(), cfg.clip_norm)
        optimizer.step()
        step += 1
        if progress is not None:
            progress(step, float(loss_sum))  # the bar's one host sync per update
        if step % cfg.eval_step == 0 or step == cfg.total_steps:
            per = evaluate(head, valid, valid_labels, device)["per"]
            history.append({"step": step, "loss": float(loss_sum), "valid_per": per})
            if per < best["per"]:
                best = {"per": per, "step": step, "state": _cpu_state(head.state_dict())}
            if checkpoint is not None:
                save_atomically({
                    "format": CHECKPOINT_FORMAT, "settings": settings, "step": step,
                    "head": _cpu_state(head.state_dict()), "optimizer": optimizer.state_dict(),
                    "best_per": best["per"], "best_step": best["step"], "best_head": best["state"],
                    "history": history, "queue": [[int(u) for u in b] for b in queue],
                    "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                }, checkpoint)
    head.load_state_dict(best["state"])
    head.eval()
    return head, {"valid_per": best["per"], "best_step": best["step"], "history": history,
                  "layer_weights": head.layer_weights()}


# SUPERB's 100,000 updates of 32 utterances are 112 passes over train-clean-100 (28,539 utterances)
SUPERB_EPOCHS = 100000 * 32 / 28539


def scaled_steps(num_train_utterances: int, cfg: ProbeConfig, epochs: float = SUPERB_EPOCHS) -> Tuple[int, int]:
    """(total_steps, eval_step): SUPERB's passes over the training split, and its 100 evaluations
    in a run (on train-clean-100: exactly libriphone.yaml's 100,000 and 1,000)."""
    per_update = cfg.batch_size * cfg.accumulate
    total = max(1, round(epochs * num_train_utterances / per_update))
    return total, max(1, total // 100)


# -- one checkpoint, every seed, every test split and its speed copies ----------------------------

def head_checkpoint(out, seed: int) -> Path:
    """Where ``probe_checkpoint`` keeps a seed's run state (and so its chosen head) in ``out``."""
    return Path(out) / f"probe_seed{seed}.pt"


def mode_line(mode: str, chosen: str, estimate: int, frames: int, num_states: int, dim: int,
              num_splits: int, budget_gb: float, on_disk: bool, cache_folder: Path) -> str:
    """The one line that says which mode runs and why, before any work."""
    amount = f"{estimate / GB:,.1f} GB" if estimate >= 0.1 * GB else f"{estimate / 1e6:,.1f} MB"
    size = (f"feature cache of {num_splits} splits: {amount} estimated (float16, {frames:,} frames "
            f"x {num_states} states x {dim} dims)")
    if mode != "auto":
        why = f"--mode {mode}"
    elif on_disk:
        why = "on disk already"
    else:
        why = f"{'within' if chosen == 'cached' else 'over'} --cache-budget {budget_gb:g} GB"
    if chosen == "cached":
        return f"{size}, {why}: cached mode, features in {cache_folder}"
    return f"{size}, {why}: streaming mode, the encoder runs in the head's training loop"


def probe_checkpoint(checkpoint, data, cache_root, train_split: str = "train", valid_split: str = "valid",
                     test_splits: Sequence[str] = ("test",), labels: str = "phn", seeds: Sequence[int] = (1,),
                     cfg: Optional[ProbeConfig] = None, epochs: float = SUPERB_EPOCHS, device="cpu",
                     show_progress: bool = True, mode: str = "auto",
                     cache_budget_gb: float = DEFAULT_CACHE_BUDGET_GB, out=None, force: bool = False,
                     log: Optional[Callable[[str], None]] = print,
                     on_start: Optional[Callable[[], None]] = None) -> Dict:
    """The protocol end to end; returns a JSON-ready record with per-utterance error counts.

    ``cfg.total_steps`` of 0 is scaled from ``epochs`` (see ``scaled_steps``), ``eval_step`` of 0
    is a hundredth of it. ``mode``: ``cached`` (every split's features read from, or written
    once to, the cache under ``cache_root``), ``streaming`` (the encoder runs on every batch), or
    ``auto`` (``choose_mode`` with ``cache_budget_gb``); ``log`` gets the line that says which
    and why. ``out``: each seed's run state goes to ``head_checkpoint(out, seed)`` after every
    evaluation, and a run of the same settings resumes from it (``force``: one of other settings
    is started over instead of refused). ``on_start`` is called once the inputs have been checked,
    before any extraction or training."""
    from tqdm import tqdm

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    data = Path(data)
    dictionary = data / f"dict.{labels}.txt"
    symbols = read_dictionary(dictionary)
    names = [train_split, valid_split]
    tests = {}
    for test in test_splits:
        tests[test] = speed_copies(data, test)
        names += list(tests[test].values())
    names = list(dict.fromkeys(names))
    manifests = {split: data / f"{split}.tsv" for split in names}
    for manifest in manifests.values():
        if not manifest.is_file():
            raise FileNotFoundError(f"manifest not found: {manifest}")
    checkpoint_hash = file_hash(checkpoint)
    states = HiddenStates(checkpoint, device)
    reader = AudioReader()
    streamed = {split: StreamedSplit(states, manifest, reader) for split, manifest in manifests.items()}
    split_labels = {split: read_labels(data / f"{split}.{labels}", symbols, len(streamed[split])) for split in names}
    cache = FeatureCache(cache_root, checkpoint, device, states, checkpoint_hash)
    frames = int(sum(split.lengths.sum() for split in streamed.values()))
    estimate = cache_bytes(frames, states.num_states, states.dim)
    on_disk = all(cache.exists(manifest) for manifest in manifests.values())
    chosen = choose_mode(mode, estimate, cache_budget_gb, on_disk)
    if log is not None:
        log(mode_line(mode, chosen, estimate, frames, states.num_states, states.dim, len(names), cache_budget_gb,
                      on_disk, cache.folder))
    cfg = cfg or ProbeConfig()
    if cfg.total_steps <= 0:
        cfg = ProbeConfig(**{**cfg.__dict__, "total_steps": scaled_steps(len(streamed[train_split]), cfg, epochs)[0]})
    if cfg.eval_step <= 0:
        cfg = ProbeConfig(**{**cfg.__dict__, "eval_step": max(1, cfg.total_steps // 100)})
    # what a saved run state depends on besides cfg: the encoder, the training and selection data
    settings = {"checkpoint": checkpoint_hash, "dictionary": file_hash(dictionary),
                **{f"{role}_{kind}": file_hash(data / f"{split}.{ext}") for role, split in (("train", train_split),
                   ("valid", valid_split)) for kind, ext in (("manifest", "tsv"), ("labels", labels))}}
    if on_start is not None:
        on_start()
    try:
        sources = {}
        for split, manifest in manifests.items():
            if chosen == "streaming":
                sources[split] = streamed[split]
            elif cache.exists(manifest) or not show_progress:
                sources[split] = cache.load(manifest, streamed=streamed[split])
            else:
                with tqdm(total=len(streamed[split]), desc=f"hidden states {split}", unit="utt", leave=False,
                          disable=None) as bar:
                    sources[split] = cache.load(manifest, progress=bar.update, streamed=streamed[split])
        record = {"checkpoint": str(checkpoint), "data": str(data), "labels": labels, "train": train_split,
                  "valid": valid_split, "config": {k: v for k, v in cfg.__dict__.items() if k != "seed"},
                  "num_states": int(states.num_states), "mode": chosen, "seeds": {}}
        for seed in seeds:
            seed_cfg = ProbeConfig(**{**cfg.__dict__, "seed": int(seed)})
            # disable=None: bars on a terminal only, not in the log files of the study
            with tqdm(total=seed_cfg.total_steps, desc=f"probe seed {seed}", unit="upd", leave=False,
                      disable=None if show_progress else True) as bar:
                def progress(step, loss):
                    bar.update(step - bar.n)
                    if step % 50 == 0:
                        bar.set_postfix(loss=f"{loss:.2f}")
                head, trained = train_probe(sources[train_split], split_labels[train_split], sources[valid_split],
                                            split_labels[valid_split], len(symbols) + 1, seed_cfg, device, progress,
                                            None if out is None else head_checkpoint(out, seed), settings, force, log)
            results = {}
            for test, copies in tests.items():
                results[test] = {}
                for speed, split in copies.items():
                    scored = evaluate(head, sources[split], split_labels[split], device)
                    results[test][speed] = {"split": split, "per": scored["per"],
                                            "errors": scored["errors"].tolist(), "lengths": scored["lengths"].tolist()}
            record["seeds"][str(seed)] = {**trained, "test": results}
    finally:
        reader.close()
    return record
