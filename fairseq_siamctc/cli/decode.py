"""CTC decoding of a manifest split with a fine-tuned fairseq model, and scoring.

    siamctc-decode --checkpoint ft/checkpoint_best.pt --data DIR --split test --labels phn --out OUT
    siamctc-decode ... --lexicon LEX --lm LM.arpa [--beam 50 --lm-weight 2 --word-score 0]

reads ``DIR/{split}.tsv`` and ``DIR/{split}.{labels}``, decodes every utterance greedily (best
path), and writes ``OUT/{split}.hyp``, ``OUT/{split}.ref`` (one line per utterance, in manifest
order) and ``OUT/{split}.json`` with the error rate and the throughput.

Batches. Utterances are decoded in length-sorted batches (the outputs are in manifest order), and
each utterance's result is the one it gets alone: the group-norm statistics of the first
convolution come from its own frames (on a CPU the convolutions run per utterance, the transformer
on the batch) and padded frames are blank before the argmax (``fairseq_siamctc.decoding``); only
float rounding differs, which can swap two labels whose logits are within it (a near tie). A
model that is not known to allow that is decoded one utterance at a time. A batch holds at most
``--max-tokens`` padded samples and a tenth of padding; on a CPU also at most ``--batch-size``
utterances (16), while on a GPU by default only the samples count, as a batch of short utterances
costs no more launches than one of long ones.

Precision. ``--autocast bf16`` or ``fp16`` runs the encoder under torch.autocast (tensor cores on
a GPU); the logits go back to float32 for the argmax. The hypotheses may then differ from float32
ones at frames whose two best logits are within the dtype's rounding (``bench/decode.py``
counts them).

Language model. With ``--lexicon`` (and usually ``--lm``, an ARPA or binary KenLM model), a
lexicon-constrained beam search (flashlight's, through torchaudio; ``fairseq_siamctc.lm_decoding``)
runs next to the greedy decoding and its words go to ``OUT/{split}.lm.hyp`` and ``.lm.ref``, its
WER to the json's ``lm`` entry. The word references are the labels themselves when they score as
words (``ltr``, ``wrd``, sentencepiece), else ``DIR/{split}.wrd``.

Scores are as fairseq's ``ctc`` criterion and SUPERB compute them: the edit distance summed over
the split divided by the summed reference length, in per cent. Tokens are the label file's symbols
after ``--post-process``: PER for ``.phn``, WER where the post-processing gives words (``letter``
for ``.ltr`` at ``|``, ``sentencepiece``, ...), UER (unit error rate) otherwise.

Any fine-tuned CTC model that fairseq loads works: ``hubert_ctc``, ``wav2vec_ctc`` and the plugin's
``wavlm_ctc``. The target dictionary comes from the checkpoint's task state.
"""

import argparse
import concurrent.futures
import json
import logging
import os
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import editdistance
import numpy as np
import torch
import tqdm

import fairseq_siamctc  # noqa: F401  (registers wavlm_ctc, applies the compatibility fixes)
from fairseq import checkpoint_utils
from fairseq.data.data_utils import post_process

from ..data.audio import read_audio
from ..data.paired_audio_dataset import normalize_waveform, read_manifest
from ..decoding import (AUTOCAST_DTYPES, autocast, autocast_dtype, greedy_ctc, host_to_device, length_sorted_batches,
                        padded_batch_logits, padding_independent)
from ..lm_decoding import WORD_BOUNDARY, LMDecoderOptions, build_lm_decoder, lm_decode
from . import default_device
from .outputs import refuse_to_replace, write_atomic

logger = logging.getLogger("siamctc.decode")

SAMPLE_RATE = 16_000
BATCH_SIZE = 16  # on a CPU; on a GPU --max-tokens alone bounds a batch by default
MAX_TOKENS = 1_600_000  # samples in a padded batch: 100 s of audio
# fairseq post_process symbols whose output is words
WORD_POST_PROCESS = ("letter", "sentencepiece", "wordpiece", "_EOW", "subword_nmt", "@@ ", "@@")
# label file extensions with their own post-processing
DEFAULT_POST_PROCESS = {"ltr": "letter", "spm": "sentencepiece"}


def check_device(device: str) -> torch.device:
    """The torch device named by ``device``; one that this machine lacks is a ValueError saying so."""
    try:
        checked = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"not a torch device: {device!r}") from err
    if checked.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine (use --device cpu)")
    return checked


def default_batch_size(device) -> Optional[int]:
    """Most utterances in a batch when not told: BATCH_SIZE on a CPU, where a batch saves little
    (its cost is arithmetic); no count limit on a GPU, which launches the same kernels for a batch
    of any size, so that batches filled up to ``--max-tokens`` launch the fewest."""
    return BATCH_SIZE if torch.device(device).type == "cpu" else None


def default_post_process(labels: str) -> str:
    return DEFAULT_POST_PROCESS.get(labels, "none")


def metric_name(labels: str, post_process_symbol: str) -> str:
    """WER where the scored tokens are words, PER for phonemes, else UER (unit error rate)."""
    if post_process_symbol in WORD_POST_PROCESS or labels == "wrd":
        return "WER"
    return "PER" if labels == "phn" else "UER"


@dataclass
class CtcRecognizer:
    """A fine-tuned CTC model with what decoding needs to know about its training task."""

    model: torch.nn.Module
    dictionary: object  # fairseq.data.Dictionary
    normalize: bool
    blank_index: int
    autocast: Optional[torch.dtype] = None  # the encoder's dtype under torch.autocast; None: float32

    @classmethod
    def load(cls, checkpoint: str, device: Optional[str] = None, autocast: str = "none") -> "CtcRecognizer":
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        device = check_device(device or default_device())
        dtype = autocast_dtype(autocast, device)
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
        return cls(model, dictionary, bool(cfg.task.get("normalize", False)), blank_index, dtype)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def batched(self) -> bool:
        """Whether padded batches give each utterance's batch-of-one result (else batch size 1)."""
        return padding_independent(self.model)

    @property
    def removed(self) -> Tuple[int, int]:
        """Indices that are never output: padding and end of sentence (the blank is removed anyway)."""
        return self.dictionary.pad(), self.dictionary.eos()

    @property
    def silence_index(self) -> int:
        """The beam search's silence: the word boundary ``|`` of letter units, else ``</s>``."""
        return self.dictionary.index(WORD_BOUNDARY) if WORD_BOUNDARY in self.dictionary.indices else self.dictionary.eos()

    def alone_logits(self, wav) -> torch.Tensor:
        """One utterance through the model's own forward: mono float waveform (N,) at 16 kHz ->
        float32 logits (T, V). The one-at-a-time reference for ``logits``."""
        if self.normalize:
            wav = normalize_waveform(wav)
        source = torch.as_tensor(np.asarray(wav, dtype=np.float32)).to(self.device)[None]
        with torch.inference_mode(), autocast(self.device, self.autocast):
            logits = self.model.get_logits(self.model(source=source, padding_mask=None))  # (T, 1, V)
        return logits[:, 0].float()

    def decode(self, wav) -> List[int]:
        """One utterance alone -> label indices of the greedy CTC path (the reference for ``decode_batch``)."""
        logits = self.alone_logits(wav)[None]
        lengths = torch.tensor([logits.size(1)], device=logits.device)
        return greedy_ctc(logits, lengths, self.blank_index, self.removed)[0]

    def logits(self, wavs: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        """B waveforms -> float32 logits (B, T, V) and valid frames (B,), each utterance's as if alone.

        The batch is padded on the host and copied to the device at once (not one copy, and on a
        GPU one wait, per utterance).
        """
        if not self.batched:
            if len(wavs) != 1:
                raise ValueError(f"{type(self.model).__name__} is decoded one utterance at a time")
            logits = self.alone_logits(wavs[0])[None]
            return logits, torch.tensor([logits.size(1)], device=logits.device)
        if self.normalize:
            wavs = [normalize_waveform(wav) for wav in wavs]
        num_samples = [len(wav) for wav in wavs]
        padded = np.zeros((len(wavs), max(num_samples)), dtype=np.float32)
        for row, wav in zip(padded, wavs):
            row[:len(wav)] = wav
        source = host_to_device(torch.from_numpy(padded), self.device)
        with torch.inference_mode(), autocast(self.device, self.autocast):
            logits, lengths = padded_batch_logits(self.model, source, num_samples)
        return logits.float(), lengths

    def decode_batch(self, wavs: Sequence[np.ndarray]) -> List[List[int]]:
        """B waveforms -> B greedy label sequences, each as ``decode`` gives it (to near ties)."""
        logits, lengths = self.logits(wavs)
        return greedy_ctc(logits, lengths, self.blank_index, self.removed)

    def lm_decoder(self, options: LMDecoderOptions):
        return build_lm_decoder(self.dictionary.symbols, self.blank_index, self.silence_index, options)

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


@dataclass
class LanguageModel:
    """A built beam-search decoder with the options it was built from (for the json)."""

    decoder: object
    options: LMDecoderOptions

    @classmethod
    def load(cls, recognizer: CtcRecognizer, options: LMDecoderOptions) -> "LanguageModel":
        return cls(recognizer.lm_decoder(options), options)


def decode_outputs(out_dir, splits, beam_search: bool) -> List[pathlib.Path]:
    """The files ``decode_split`` writes for ``splits`` into ``out_dir``."""
    suffixes = ["hyp", "ref", "json"] + (["lm.hyp", "lm.ref"] if beam_search else [])
    return [pathlib.Path(out_dir) / f"{split}.{suffix}" for split in splits for suffix in suffixes]


def decode_split(recognizer: CtcRecognizer, data: str, split: str, labels: str, out_dir: str,
                 post_process_symbol: str = "none", batch_size: Optional[int] = None,
                 max_tokens: int = MAX_TOKENS, language_model: Optional[LanguageModel] = None,
                 progress: bool = True) -> dict:
    """Decodes ``data/{split}.tsv``, writes ``.hyp``/``.ref``/``.json`` under out_dir, returns the score.

    batch_size: most utterances in a batch (None: ``default_batch_size`` of the recognizer's device).
    """
    manifest = read_manifest(os.path.join(data, f"{split}.tsv"))
    count = len(manifest.files)
    label_lines = read_lines(pathlib.Path(data) / f"{split}.{labels}", count)
    metric = metric_name(labels, post_process_symbol)
    references = [post_process(label, post_process_symbol) for label in label_lines]
    if language_model is not None:  # the LM's output is words: word references
        word_references = (references if metric == "WER" else
                           [" ".join(line.split()) for line in read_lines(pathlib.Path(data) / f"{split}.wrd", count)])

    def load(batch: List[int]) -> List[np.ndarray]:
        wavs = []
        for index in batch:
            try:
                wavs.append(read_audio(os.path.join(manifest.root, manifest.files[index])))
            except ValueError as err:
                raise ValueError(f"{manifest.path}:{manifest.line_numbers[index]}: {err}") from err
        return wavs

    if batch_size is None:
        batch_size = default_batch_size(recognizer.device)
    batches = length_sorted_batches(manifest.num_samples, batch_size if recognizer.batched else 1, max_tokens)
    hypotheses: List[Optional[str]] = [None] * count
    lm_words: List[Optional[str]] = [None] * count
    lm_units: List[Optional[str]] = [None] * count
    audio_samples = 0
    start = time.perf_counter()
    # reading the next batch's audio overlaps with decoding this one
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader, \
            tqdm.tqdm(total=count, desc=split, unit="utt", disable=None if progress else True,
                      leave=False) as bar:
        pending = reader.submit(load, batches[0]) if batches else None
        for number, batch in enumerate(batches):
            wavs = pending.result()
            if number + 1 < len(batches):
                pending = reader.submit(load, batches[number + 1])
            audio_samples += sum(len(w) for w in wavs)
            with torch.inference_mode():
                logits, lengths = recognizer.logits(wavs)
                paths = greedy_ctc(logits, lengths, recognizer.blank_index, recognizer.removed)
                if language_model is not None:
                    searched = lm_decode(language_model.decoder, torch.log_softmax(logits, dim=-1), lengths)
            for i, index in enumerate(batch):
                hypotheses[index] = recognizer.to_text(paths[i], post_process_symbol)
                if language_model is not None:
                    words, units = searched[i]
                    lm_words[index] = " ".join(words)
                    lm_units[index] = recognizer.to_text(units, post_process_symbol)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    score = {"metric": metric, **error_rate(hypotheses, references), "split": split, "labels": labels}
    hyp_path, ref_path, score_path, *lm_paths = decode_outputs(out_dir, [split], language_model is not None)
    hyp_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(hyp_path, "\n".join(hypotheses) + "\n")
    write_atomic(ref_path, "\n".join(references) + "\n")
    if language_model is not None:
        options = language_model.options
        score["lm"] = {"metric": "WER", **error_rate(lm_words, word_references),
                       "units": {"metric": metric, **error_rate(lm_units, references)},
                       "lexicon": options.lexicon, "lm": options.lm, "beam": options.beam,
                       "beam_threshold": options.beam_threshold, "lm_weight": options.lm_weight,
                       "word_score": options.word_score, "sil_score": options.sil_score}
        write_atomic(lm_paths[0], "\n".join(lm_words) + "\n")
        write_atomic(lm_paths[1], "\n".join(word_references) + "\n")
    audio_seconds = audio_samples / SAMPLE_RATE
    score["throughput"] = {
        "seconds": seconds, "audio_seconds": audio_seconds, "utterances_per_second": count / max(seconds, 1e-9),
        "real_time_factor": seconds / max(audio_seconds, 1e-9), "batches": len(batches),
        "device": str(recognizer.device), "autocast": str(recognizer.autocast or torch.float32).replace("torch.", ""),
    }
    write_atomic(score_path, json.dumps(score, indent=2) + "\n")
    return score


def summary(score: dict) -> str:
    """One line: the error rate(s) and the throughput of a decoded split."""
    line = (f"{score['split']}: {score['metric']} {score['error_rate']:.2f}% "
            f"({score['errors']}/{score['ref_tokens']}, {score['utterances']} utterances)")
    if "lm" in score:
        lm = score["lm"]
        search = "the lexicon and the LM" if lm["lm"] else "the lexicon alone"
        line += f"; with {search}: WER {lm['error_rate']:.2f}% ({lm['errors']}/{lm['ref_tokens']})"
        if lm["units"]["metric"] != "WER":
            line += f", {lm['units']['metric']} {lm['units']['error_rate']:.2f}%"
    speed = score["throughput"]
    precision = "" if speed.get("autocast", "float32") == "float32" else f" under {speed['autocast']} autocast"
    return (line + f"; {speed['audio_seconds']:.1f} s of audio in {speed['seconds']:.1f} s on "
            f"{speed['device']}{precision}: {speed['utterances_per_second']:.1f} utt/s, real-time factor "
            f"{speed['real_time_factor']:.3f}")


def add_decoding_options(parser: argparse.ArgumentParser, batch_size_by_device: bool = False) -> None:
    """Options that siamctc-decode and siamctc-robustness share; ``batch_size_by_device``: --batch-size
    defaults to None, ``default_batch_size`` of the device."""
    parser.add_argument("--labels", default="phn",
                        help="label file extension: phn (scored as PER), ltr (WER), wrd, spm, ... (default: phn)")
    parser.add_argument("--post-process", default=None,
                        help="fairseq post_process symbol applied to hypotheses and references "
                             "(letter, sentencepiece, none, ...); default: letter for ltr, sentencepiece for "
                             "spm, else none")
    parser.add_argument("--device", default=default_device(),
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=None if batch_size_by_device else BATCH_SIZE,
                        help="most utterances in a batch; 1 decodes one at a time (default: "
                             + (f"{BATCH_SIZE} on a CPU, no limit on a GPU, where --max-tokens bounds a batch)"
                                if batch_size_by_device else f"{BATCH_SIZE})"))
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                        help=f"most audio samples in a padded batch (default: {MAX_TOKENS}, 100 s at 16 kHz)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="fine-tuned CTC checkpoint")
    parser.add_argument("--data", required=True, help="directory of {split}.tsv and label files")
    parser.add_argument("--split", nargs="+", default=["test"], help="one or more splits (default: test)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="replace the results of an earlier run in --out")
    add_decoding_options(parser, batch_size_by_device=True)
    parser.add_argument("--autocast", choices=list(AUTOCAST_DTYPES), default="none",
                        help="run the encoder under torch.autocast in float16 or bfloat16 (for tensor cores on a "
                             "GPU; bf16 also works on a CPU), the argmax on float32 logits; hypotheses may then "
                             "change at frames whose two best logits are within the dtype's rounding "
                             "(default: none, float32)")
    beam = parser.add_argument_group("beam search with a lexicon and a language model")
    beam.add_argument("--lexicon", default=None,
                      help="lexicon file, a word and its units per line (letters: 'HELLO H E L L O', the "
                           "'|' boundary is added; phonemes: 'HELLO HH AH L OW'); turns the beam search on")
    beam.add_argument("--lm", default=None, help="n-gram word LM, ARPA (.arpa) or binary KenLM (.bin); "
                                                 "without it the lexicon alone constrains the search")
    beam.add_argument("--beam", type=int, default=50, help="hypotheses kept after each frame (default: 50)")
    beam.add_argument("--beam-threshold", type=float, default=25.0,
                      help="prune hypotheses this far below the best score (default: 25)")
    beam.add_argument("--lm-weight", type=float, default=2.0, help="weight of the LM score (default: 2)")
    beam.add_argument("--word-score", type=float, default=0.0,
                      help="score added per word, against too short or too long outputs (default: 0)")
    beam.add_argument("--sil-score", type=float, default=0.0,
                      help="score added per silence (word boundary) token (default: 0)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lm is not None and args.lexicon is None:
        parser.error("--lm needs --lexicon (the beam search is lexicon-constrained)")
    if (args.batch_size is not None and args.batch_size < 1) or args.max_tokens < 1:
        parser.error(f"--batch-size and --max-tokens must be positive, got {args.batch_size} and {args.max_tokens}")
    symbol = args.post_process or default_post_process(args.labels)
    try:
        refuse_to_replace(decode_outputs(args.out, args.split, args.lexicon is not None), args.force)
        recognizer = CtcRecognizer.load(args.checkpoint, args.device, args.autocast)
        language_model = None
        if args.lexicon is not None:
            language_model = LanguageModel.load(recognizer, LMDecoderOptions(
                args.lexicon, args.lm, args.beam, args.beam_threshold, args.lm_weight, args.word_score,
                args.sil_score))
        for split in args.split:
            score = decode_split(recognizer, args.data, split, args.labels, args.out, symbol, args.batch_size,
                                 args.max_tokens, language_model)
            print(summary(score))
    except (OSError, ValueError) as err:
        print(f"siamctc-decode: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
