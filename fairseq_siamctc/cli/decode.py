"""Greedy (Viterbi) CTC decoding of a manifest split with a fine-tuned fairseq model, and scoring.

    siamctc-decode --checkpoint ft/checkpoint_best.pt --data DIR --split test --labels phn --out OUT

reads ``DIR/{split}.tsv`` and ``DIR/{split}.{labels}``, decodes every utterance on its own (a
batch of one: with a group-norm CNN, padding changes the features, so the result must not depend on
how utterances are batched), and writes ``OUT/{split}.hyp``, ``OUT/{split}.ref`` (one line per
utterance, in manifest order) and ``OUT/{split}.json`` with the error rate.

The error rate is as fairseq's ``ctc`` criterion and SUPERB compute it: the edit distance summed
over the split divided by the summed reference length, in per cent. Tokens are the label file's
symbols (phonemes for ``.phn``: PER); with ``--post-process letter`` (``.ltr`` labels) they are the
words after joining letters at ``|`` (WER).

Any fine-tuned CTC model that fairseq loads works: ``hubert_ctc``, ``wav2vec_ctc`` and the plugin's
``wavlm_ctc``. The target dictionary comes from the checkpoint's task state.
"""

import argparse
import json
import logging
import os
import pathlib
import sys
from dataclasses import dataclass
from typing import List, Sequence

import editdistance
import torch

import fairseq_siamctc  # noqa: F401  (registers wavlm_ctc, applies the compatibility fixes)
from fairseq import checkpoint_utils
from fairseq.data.data_utils import post_process

from ..data.audio import read_audio
from ..data.paired_audio_dataset import normalize_waveform, read_manifest

logger = logging.getLogger("siamctc.decode")


@dataclass
class CtcRecognizer:
    """A fine-tuned CTC model with what decoding needs to know about its training task."""

    model: torch.nn.Module
    dictionary: object  # fairseq.data.Dictionary
    normalize: bool
    blank_index: int

    @classmethod
    def load(cls, checkpoint: str, device: str = "cpu") -> "CtcRecognizer":
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint])
        try:
            dictionary = task.target_dictionary
        except AttributeError:  # fairseq's task state raises where a task has no such dictionary
            dictionary = None
        if dictionary is None:
            raise ValueError(f"{checkpoint} is not a fine-tuned CTC checkpoint (its task has no target dictionary)")
        blank_symbol = getattr(task, "blank_symbol", None)
        blank_index = dictionary.index(blank_symbol) if blank_symbol else dictionary.bos()
        model = models[0].to(device).eval()
        return cls(model, dictionary, bool(cfg.task.get("normalize", False)), blank_index)

    @torch.no_grad()
    def decode(self, wav) -> List[int]:
        """Mono float waveform (N,) at 16 kHz -> label indices of the greedy CTC path."""
        if self.normalize:
            wav = normalize_waveform(wav)
        device = next(self.model.parameters()).device
        source = torch.as_tensor(wav, dtype=torch.float32, device=device)[None]
        net_output = self.model(source=source, padding_mask=None)
        logits = net_output["encoder_out"][:, 0]  # (T, V)
        path = logits.argmax(dim=-1).unique_consecutive()
        drop = torch.tensor([self.blank_index, self.dictionary.pad(), self.dictionary.eos()], device=device)
        return path[~torch.isin(path, drop)].tolist()

    def to_text(self, indices: Sequence[int], post_process_symbol: str) -> str:
        return post_process(self.dictionary.string(indices), post_process_symbol)


def error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Whitespace-token error rate over a whole split: 100 * sum(edit distance) / sum(ref length)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    errors = sum(editdistance.eval(h.split(), r.split()) for h, r in zip(hypotheses, references))
    length = sum(len(r.split()) for r in references)
    if length == 0:
        raise ValueError("the references are empty: no error rate")
    return {"errors": errors, "ref_tokens": length, "error_rate": 100.0 * errors / length,
            "utterances": len(references)}


def read_lines(path: pathlib.Path, expected: int) -> List[str]:
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) != expected:
        raise ValueError(f"{path} has {len(lines)} lines but the manifest has {expected} utterances")
    return lines


def decode_split(recognizer: CtcRecognizer, data: str, split: str, labels: str, out_dir: str,
                 post_process_symbol: str = "none") -> dict:
    """Decodes ``data/{split}.tsv``, writes ``.hyp``/``.ref``/``.json`` under out_dir, returns the score."""
    manifest = read_manifest(os.path.join(data, f"{split}.tsv"))
    label_lines = read_lines(pathlib.Path(data) / f"{split}.{labels}", len(manifest.files))
    hypotheses, references = [], []
    for rel_path, line_number, label in zip(manifest.files, manifest.line_numbers, label_lines):
        try:
            wav = read_audio(os.path.join(manifest.root, rel_path))
        except ValueError as err:
            raise ValueError(f"{manifest.path}:{line_number}: {err}") from err
        hypotheses.append(recognizer.to_text(recognizer.decode(wav), post_process_symbol))
        references.append(post_process(label, post_process_symbol))
    score = error_rate(hypotheses, references)
    score.update(split=split, labels=labels)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{split}.hyp").write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
    (out / f"{split}.ref").write_text("\n".join(references) + "\n", encoding="utf-8")
    (out / f"{split}.json").write_text(json.dumps(score, indent=2) + "\n")
    return score


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="fine-tuned CTC checkpoint")
    parser.add_argument("--data", required=True, help="directory of {split}.tsv and label files")
    parser.add_argument("--split", nargs="+", default=["test"], help="one or more splits")
    parser.add_argument("--labels", default="phn", help="label file extension (phn, ltr, ...)")
    parser.add_argument("--post-process", default=None,
                        help="fairseq post_process symbol; default: 'letter' for ltr, else 'none'")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    symbol = args.post_process or ("letter" if args.labels == "ltr" else "none")
    try:
        recognizer = CtcRecognizer.load(args.checkpoint, args.device)
        for split in args.split:
            score = decode_split(recognizer, args.data, split, args.labels, args.out, symbol)
            metric = "WER" if symbol == "letter" else "error rate"
            print(f"{split}: {metric} {score['error_rate']:.2f}% "
                  f"({score['errors']}/{score['ref_tokens']}, {score['utterances']} utterances)")
    except (OSError, ValueError) as err:
        print(f"siamctc-decode: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
