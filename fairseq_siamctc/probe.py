"""SUPERB's phoneme recognition (PR) protocol on a frozen encoder: the paper's evaluation.

The encoder is never trained. Its hidden states (the input to the first transformer layer and the
output of every layer) are computed once per (checkpoint, split) and cached on disk; a small head
is then trained on them with CTC over the phoneme dictionary:

    softmax-weighted sum of the L + 1 hidden states -> Linear(D, 256) -> Linear(256, V)

as s3prl's ``downstream/ctc`` expert with ``select: FrameLevel`` (its ``project_dim`` of 256 and a
linear frame-level model). Training follows s3prl's ``downstream/ctc/libriphone.yaml``: Adam at a
constant learning rate of 1e-2, batches of 16 utterances with 2 accumulated per update, gradient
norm clipped to 1, the dev PER measured every ``eval_step`` updates and the best head kept; only
the number of updates (100,000 there) is scaled to the data. Decoding is greedy CTC, and the PER
is summed over a split (edit distances over reference lengths), as SUPERB computes it.

The pure functions (weighted sum, head, greedy decoding, error counts) take tensors in and give
tensors out; ``train_probe`` is the training loop on in-memory or memory-mapped features, and
``FeatureCache`` the on-disk cache. ``fairseq_siamctc.cli.probe`` is the command-line shell.
"""

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import editdistance
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BLANK = 0  # the head's class 0 is CTC's blank; phoneme k of the dictionary is class k + 1


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


# -- data: features of a split and its phoneme labels ---------------------------------------------

@dataclass
class SplitFeatures:
    """Hidden states of one split: ``frames`` (total frames, L, D), utterance u at
    ``frames[offsets[u]:offsets[u] + lengths[u]]`` (a memory map when read from the cache)."""

    frames: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray

    def __len__(self):
        return len(self.lengths)

    @classmethod
    def from_list(cls, utterances: Sequence[np.ndarray]) -> "SplitFeatures":
        """From per-utterance (T_u, L, D) arrays (tests, small data)."""
        lengths = np.array([len(u) for u in utterances], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return cls(np.concatenate(utterances, axis=0), offsets, lengths)

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


# -- training and evaluation ----------------------------------------------------------------------

def batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> List[np.ndarray]:
    """One epoch of batches, s3prl's bucketing in spirit: utterances sorted by length in random
    chunks of ``batch_size``, the chunks in random order (less padding than a plain shuffle)."""
    order = rng.permutation(len(lengths))
    order = order[np.argsort(lengths[order], kind="stable")[::-1]]
    chunks = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    return [chunks[i] for i in rng.permutation(len(chunks))]


@torch.no_grad()
def decode_split(head: ProbeHead, features: SplitFeatures, device, batch_size: int = 16) -> List[List[int]]:
    """Greedy hypotheses (class indices) of every utterance of a split, in manifest order."""
    head.eval()
    hypotheses = []
    for start in range(0, len(features), batch_size):
        indices = list(range(start, min(start + batch_size, len(features))))
        hidden, lengths = features.batch(indices, device)
        log_probs = head(hidden)
        hypotheses += [greedy_decode(lp, int(n)) for lp, n in zip(log_probs, lengths)]
    return hypotheses


def evaluate(head: ProbeHead, features: SplitFeatures, labels: List[List[int]], device) -> Dict:
    """-> {"per", "errors" (N,), "lengths" (N,), "hypotheses"} of a split."""
    hypotheses = decode_split(head, features, device)
    errors, lengths = edit_errors(hypotheses, labels)
    return {"per": error_rate(errors, lengths), "errors": errors, "lengths": lengths, "hypotheses": hypotheses}


def train_probe(train: SplitFeatures, train_labels: List[List[int]], valid: SplitFeatures,
                valid_labels: List[List[int]], num_classes: int, cfg: ProbeConfig, device="cpu",
                progress: Optional[Callable[[int, float], None]] = None) -> Tuple[ProbeHead, Dict]:
    """Trains the head; returns the head of the best valid PER and a record of training.

    ``progress(step, loss)`` is called after every update (a progress bar)."""
    if len(train) != len(train_labels) or len(valid) != len(valid_labels):
        raise ValueError("features and labels disagree in the number of utterances")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    _, num_layers, dim = train.frames.shape
    head = ProbeHead(num_layers, dim, num_classes, cfg.project_dim).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    label_tensors = [torch.tensor(t, dtype=torch.long) for t in train_labels]
    best = {"per": math.inf, "step": 0, "state": copy.deepcopy(head.state_dict())}
    history, queue, step = [], [], 0
    while step < cfg.total_steps:
        if not queue:
            queue = batches(train.lengths, cfg.batch_size, rng)
        head.train()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for _ in range(cfg.accumulate):
            if not queue:
                queue = batches(train.lengths, cfg.batch_size, rng)
            indices = queue.pop()
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
                best = {"per": per, "step": step, "state": copy.deepcopy(head.state_dict())}
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


# -- hidden states of a frozen encoder, and their cache -------------------------------------------

class HiddenStates:
    """A frozen encoder of any kind ``siamctc-extract-features`` reads -> (T, L + 1, D) per utterance.

    Hidden state 0 is the input to the first transformer layer, state l the output of layer l (of
    pre-LN models without the final layer norm), as s3prl's ``hidden_states``. Captured by forward
    hooks during one pass, one utterance at a time (no batch padding)."""

    def __init__(self, checkpoint, device="cpu"):
        from fairseq_siamctc.features import FeatureExtractor

        self.extractor = FeatureExtractor(checkpoint, device=device)
        self.layers = self.extractor.encoder.encoder.layers
        self.num_states = len(self.layers) + 1

    @torch.inference_mode()
    def __call__(self, wav: np.ndarray) -> np.ndarray:
        captured: List[torch.Tensor] = []

        def keep(tensor):  # (T, 1, D) in fairseq's layers, (1, T, D) in WavLM's: one utterance either way
            captured.append(tensor.reshape(-1, tensor.shape[-1]))

        handles = [self.layers[0].register_forward_pre_hook(lambda m, args: keep(args[0]))]
        handles += [layer.register_forward_hook(lambda m, args, out: keep(out[0] if isinstance(out, tuple) else out))
                    for layer in self.layers]
        try:
            last = self.extractor(wav)  # (T, D): also fixes T (fairseq may pad to a multiple)
        finally:
            for handle in handles:
                handle.remove()
        if len(captured) != self.num_states:
            raise RuntimeError(f"captured {len(captured)} hidden states, expected {self.num_states}")
        return torch.stack([h[: len(last)] for h in captured], dim=1).float().cpu().numpy()

    def frames(self, num_samples: int) -> int:
        from fairseq_siamctc.models.encoders import frame_count

        return frame_count(self.extractor.encoder, num_samples)


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
    so a retrained checkpoint or an edited manifest never reuses stale features."""

    def __init__(self, root, checkpoint, device="cpu"):
        self.checkpoint = Path(checkpoint)
        self.folder = Path(root) / file_hash(self.checkpoint)[:16]
        self.device = device
        self._states: Optional[HiddenStates] = None

    def paths(self, manifest) -> Tuple[Path, Path]:
        split = Path(manifest).name.removesuffix(".tsv")
        stem = f"{split}-{file_hash(manifest)[:12]}"
        return self.folder / f"{stem}.npy", self.folder / f"{stem}.json"

    def load(self, manifest, progress: Optional[Callable] = None) -> SplitFeatures:
        npy, meta = self.paths(manifest)
        if not (npy.is_file() and meta.is_file()):
            self._extract(manifest, npy, meta, progress)
        index = json.loads(meta.read_text())
        return SplitFeatures(np.load(npy, mmap_mode="r"), np.array(index["offsets"], dtype=np.int64),
                             np.array(index["lengths"], dtype=np.int64))

    def _extract(self, manifest, npy: Path, meta: Path, progress):
        from fairseq_siamctc.data.audio import read_audio
        from fairseq_siamctc.data.paired_audio_dataset import read_manifest
        from fairseq_siamctc.models.encoders import encoder_dim

        if self._states is None:
            self._states = HiddenStates(self.checkpoint, self.device)
        states = self._states
        entries = read_manifest(str(manifest))
        lengths = np.array([states.frames(int(n)) for n in entries.num_samples], dtype=np.int64)
        for name, line, n in zip(entries.files, entries.line_numbers, lengths):
            if n < 1:
                raise ValueError(f"{manifest}:{line}: {name} is shorter than one frame of the encoder")
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.folder.mkdir(parents=True, exist_ok=True)
        dim = encoder_dim(states.extractor.encoder)
        tmp = npy.with_name(f".{npy.name}.{os.getpid()}.tmp")
        frames = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                           shape=(int(lengths.sum()), states.num_states, dim))
        try:
            for u, (name, line) in enumerate(zip(entries.files, entries.line_numbers)):
                path = Path(entries.root) / name
                try:
                    hidden = states(read_audio(path))
                except (ValueError, FileNotFoundError) as err:
                    raise ValueError(f"{manifest}:{line}: {err}") from err
                if len(hidden) != lengths[u]:
                    raise ValueError(f"{manifest}:{line}: {path} has {len(hidden)} frames, its listed "
                                     f"num_samples gives {lengths[u]}: the manifest is stale")
                hidden = hidden.astype(np.float16)
                if not np.isfinite(hidden).all():
                    raise ValueError(f"{manifest}:{line}: {path}: hidden states beyond float16's range")
                frames[offsets[u]: offsets[u] + lengths[u]] = hidden
                if progress is not None:
                    progress(1)
            frames.flush()
            del frames
            os.replace(tmp, npy)
        finally:
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


# -- one checkpoint, every seed, every test split and its speed copies ----------------------------

def probe_checkpoint(checkpoint, data, cache_root, train_split: str = "train", valid_split: str = "valid",
                     test_splits: Sequence[str] = ("test",), labels: str = "phn", seeds: Sequence[int] = (1,),
                     cfg: Optional[ProbeConfig] = None, epochs: float = SUPERB_EPOCHS, device="cpu",
                     show_progress: bool = True) -> Dict:
    """The protocol end to end; returns a JSON-ready record with per-utterance error counts.

    ``cfg.total_steps`` of 0 is scaled from ``epochs`` (see ``scaled_steps``), ``eval_step`` of 0
    is a hundredth of it. Features of every split are read from (or written to) the cache once."""
    from tqdm import tqdm

    data = Path(data)
    symbols = read_dictionary(data / f"dict.{labels}.txt")
    cache = FeatureCache(cache_root, checkpoint, device)
    splits = {train_split: None, valid_split: None}
    tests = {}
    for test in test_splits:
        tests[test] = speed_copies(data, test)
        for split in tests[test].values():
            splits[split] = None
    for split in splits:
        manifest = data / f"{split}.tsv"
        if not manifest.is_file():
            raise FileNotFoundError(f"manifest not found: {manifest}")
        npy, _ = cache.paths(manifest)
        if npy.is_file() or not show_progress:
            features = cache.load(manifest)
        else:
            utterances = sum(1 for line in manifest.read_text().splitlines()[1:] if line.strip())
            with tqdm(total=utterances, desc=f"hidden states {split}", unit="utt", leave=False, disable=None) as bar:
                features = cache.load(manifest, progress=bar.update)
        splits[split] = (features, read_labels(data / f"{split}.{labels}", symbols, len(features)))
    cfg = cfg or ProbeConfig()
    if cfg.total_steps <= 0:
        cfg = ProbeConfig(**{**cfg.__dict__, "total_steps": scaled_steps(len(splits[train_split][0]), cfg, epochs)[0]})
    if cfg.eval_step <= 0:
        cfg = ProbeConfig(**{**cfg.__dict__, "eval_step": max(1, cfg.total_steps // 100)})
    record = {"checkpoint": str(checkpoint), "data": str(data), "labels": labels, "train": train_split,
              "valid": valid_split, "config": {k: v for k, v in cfg.__dict__.items() if k != "seed"},
              "num_states": int(splits[train_split][0].frames.shape[1]), "seeds": {}}
    for seed in seeds:
        seed_cfg = ProbeConfig(**{**cfg.__dict__, "seed": int(seed)})
        # disable=None: bars on a terminal only, not in the log files of the study
        with tqdm(total=seed_cfg.total_steps, desc=f"probe seed {seed}", unit="upd", leave=False,
                  disable=None if show_progress else True) as bar:
            def progress(step, loss):
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{loss:.2f}")
            head, trained = train_probe(*splits[train_split], *splits[valid_split], len(symbols) + 1,
                                        seed_cfg, device, progress)
        results = {}
        for test, copies in tests.items():
            results[test] = {}
            for speed, split in copies.items():
                scored = evaluate(head, *splits[split], device)
                results[test][speed] = {"split": split, "per": scored["per"],
                                        "errors": scored["errors"].tolist(), "lengths": scored["lengths"].tolist()}
        record["seeds"][str(seed)] = {**trained, "test": results}
    return record
