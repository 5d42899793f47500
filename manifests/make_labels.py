"""Write fairseq label files (``.wrd``, ``.ltr``, ``.phn``, optional ``.spm``) and dictionaries for manifests.

Usage::

    siamctc-labels MANIFEST.tsv [MANIFEST.tsv ...] [--out-dir DIR]
                   [--lexicon LEXICON [--keep-stress] [--on-oov error|skip]]
                   [--on-missing error|skip] [--dict-splits train]
                   [--spm-vocab N [--spm-type unigram|bpe]] [--force]
    # equivalently: python -m siamctc_manifests.make_labels ...

    # LibriSpeech with the CMU dictionary of Debian's pocketsphinx-en-us (39 phonemes, no stress)
    siamctc-labels audio_lists/train.tsv audio_lists/valid.tsv audio_lists/test_clean.tsv \\
        --lexicon /usr/share/pocketsphinx/model/en-us/cmudict-en-us.dict --on-oov skip --out-dir manifests

Transcripts are read in the LibriSpeech layout: the audio file ``.../19/198/19-198-0001.flac`` is looked
up by its name without extension (``19-198-0001``) in the ``*.trans.txt`` files of its own directory,
whose lines read ``UTTERANCE-ID TEXT``. Text is normalised to upper case; every character other than
A-Z and the apostrophe separates words (so ``cold-hearted`` becomes ``COLD HEARTED``).

For each manifest ``{split}.tsv`` this writes, into ``--out-dir`` (default: the first manifest's folder):

* ``{split}.wrd``: the words, space separated (one line per manifest line);
* ``{split}.ltr``: the letters, space separated, ``|`` after every word: ``H E | S A W |`` (fairseq's
  convention for letter CTC);
* ``{split}.phn`` (with ``--lexicon``): the phonemes of each word's first pronunciation, space separated;
* ``{split}.spm`` (with ``--spm-vocab N``): sentencepiece pieces of a model trained on the words of
  ``--dict-splits`` (``spm.model``/``spm.vocab`` are saved next to it); use ``post_process=sentencepiece``;
* ``{split}.tsv`` (when ``--out-dir`` is not the manifest's own folder): the manifest of the kept
  utterances (see below), so that every label file lines up 1:1 with it, as fairseq's
  ``audio_finetuning`` task requires. An input manifest is never rewritten: when utterances would
  be left out of a manifest in ``--out-dir`` itself, the run stops before writing anything;

and ``dict.wrd.txt``, ``dict.ltr.txt``, ``dict.phn.txt`` (``dict.spm.txt``) in fairseq's format, one
``SYMBOL COUNT`` a line, most frequent first. Counts come from the splits named by ``--dict-splits``
(default: the first manifest's split). ``dict.phn.txt`` also lists, with count 0, the lexicon's
phonemes that those splits never use, so it always holds the lexicon's whole phone inventory.

Lexicons: any file with ``WORD PH1 PH2 ...`` lines (whitespace separated): Debian's
``cmudict-en-us.dict`` (lower case, alternates written ``word(2)``), the original CMUdict (``;;;``
comments, stressed vowels), LibriSpeech's ``librispeech-lexicon.txt`` (upper case, repeated words for
alternates). Words are matched case-insensitively, the first pronunciation of a word is used,
and stress digits are stripped (``AH0`` -> ``AH``) unless ``--keep-stress``.

Bad input, and how it is counted:

* out-of-vocabulary words (``.phn`` only): by default (``--on-oov error``) the run stops before
  writing anything, with one line listing the missing words (most frequent first, with counts) and
  how many utterances of each split hold them. With ``--on-oov skip`` an utterance holding such a
  word is left out of the split (manifest and every label file); the run prints how many utterances
  were left out and how many OOV word tokens/types caused it, and writes ``{split}.oov.txt``
  (``WORD COUNT`` per OOV word).
* a missing transcript (no line for the utterance in its directory's ``*.trans.txt``): an error
  naming the audio file and directory by default; ``--on-missing skip`` drops and counts the utterance.
* an utterance whose transcript has no word (after normalisation) is an error.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .make_manifest import ManifestError, check_outputs, read_tsv, write_atomically, write_tsv

NON_WORD_CHARS = re.compile(r"[^A-Z']+")
STRESS_DIGITS = re.compile(r"\d+$")
ALTERNATE_SUFFIX = re.compile(r"\(\d+\)$")


class LabelError(ValueError):
    """Bad input for labels: missing transcript, OOV word, malformed lexicon or transcript file."""


def normalize_words(text: str) -> list[str]:
    """Upper-case words of A-Z and apostrophes; other characters separate words."""
    # apostrophes stay inside and at the edges of words ('TIS, O'ER); a lone one is no word
    return [w for w in NON_WORD_CHARS.sub(" ", text.upper()).split() if w.strip("'")]


def letter_label(words: list[str]) -> str:
    """fairseq letter targets: ``["HE", "SAW"]`` -> ``"H E | S A W |"``."""
    return " ".join(" ".join(word) + " |" for word in words)


@dataclass
class Lexicon:
    """Word -> phonemes (first pronunciation); words in upper case."""

    pronunciations: dict[str, list[str]]
    path: Path

    @property
    def inventory(self) -> set[str]:
        return {ph for phones in self.pronunciations.values() for ph in phones}

    def __contains__(self, word: str) -> bool:
        return word.upper() in self.pronunciations

    def phones(self, word: str) -> list[str]:
        return self.pronunciations[word.upper()]


def load_lexicon(path: Path, keep_stress: bool = False) -> Lexicon:
    """Read a ``WORD PH1 PH2 ...`` lexicon; the first pronunciation of each word wins."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: lexicon file not found")
    pronunciations: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", errors="strict") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip() or line.startswith((";;;", "#")):
                continue
            fields = line.split()
            if len(fields) < 2:
                raise LabelError(f"{path}:{number}: expected 'WORD PHONE ...', got {line.strip()!r}")
            word = ALTERNATE_SUFFIX.sub("", fields[0]).upper()
            phones = fields[1:] if keep_stress else [STRESS_DIGITS.sub("", ph) for ph in fields[1:]]
            pronunciations.setdefault(word, phones)
    if not pronunciations:
        raise LabelError(f"{path}: lexicon holds no entries")
    return Lexicon(pronunciations, path)


class TranscriptIndex:
    """Utterance id -> text, read lazily from the ``*.trans.txt`` files of each audio directory."""

    def __init__(self) -> None:
        self._by_directory: dict[Path, dict[str, str]] = {}

    def _load(self, directory: Path) -> dict[str, str]:
        texts: dict[str, str] = {}
        for trans in sorted(directory.glob("*.trans.txt")):
            for number, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                utt_id, _, text = line.strip().partition(" ")
                if utt_id in texts:
                    raise LabelError(f"{trans}:{number}: utterance {utt_id} listed twice")
                texts[utt_id] = text
        return texts

    def lookup(self, audio_path: Path) -> str | None:
        directory = audio_path.parent
        if directory not in self._by_directory:
            self._by_directory[directory] = self._load(directory)
        return self._by_directory[directory].get(audio_path.name.split(".")[0])


@dataclass
class SplitLabels:
    """Labels of one split, aligned with its kept manifest entries."""

    name: str
    root: Path
    entries: list[tuple[str, int]] = field(default_factory=list)
    words: list[list[str]] = field(default_factory=list)
    phones: list[list[str]] = field(default_factory=list)
    dropped_missing: int = 0
    dropped_oov: int = 0
    oov_words: Counter = field(default_factory=Counter)


def split_name(tsv: Path) -> str:
    return Path(tsv).name.removesuffix(".tsv")


def collect_labels(
    tsv: Path,
    transcripts: TranscriptIndex,
    lexicon: Lexicon | None = None,
    on_oov: str = "skip",
    on_missing: str = "error",
) -> SplitLabels:
    """Words (and phonemes) for each manifest line, dropping OOV/missing utterances when told to."""
    root, entries = read_tsv(tsv)
    labels = SplitLabels(split_name(tsv), root)
    for number, (rel, num_samples) in enumerate(entries, start=2):
        audio = root / rel
        text = transcripts.lookup(audio)
        if text is None:
            if on_missing == "error":
                raise LabelError(f"{tsv}:{number}: no transcript for {audio} in {audio.parent}/*.trans.txt")
            labels.dropped_missing += 1
            continue
        words = normalize_words(text)
        if not words:
            raise LabelError(f"{tsv}:{number}: transcript of {audio} has no words: {text!r}")
        phones: list[str] = []
        if lexicon is not None:
            oov = [w for w in words if w not in lexicon]
            if oov:  # counted here; make_labels stops or drops once every split is read
                labels.dropped_oov += 1
                labels.oov_words.update(oov)
                continue
            phones = [ph for w in words for ph in lexicon.phones(w)]
        labels.entries.append((rel, num_samples))
        labels.words.append(words)
        labels.phones.append(phones)
    if not labels.entries and not (lexicon is not None and on_oov == "error" and labels.oov_words):
        raise LabelError(f"{tsv}: every utterance was dropped ({labels.dropped_missing} without transcript, "
                         f"{labels.dropped_oov} with OOV words)")
    return labels


def write_dict(path: Path, counts: Counter, extra_symbols: set[str] = frozenset()) -> None:
    """fairseq dictionary: ``SYMBOL COUNT`` lines, most frequent first; ``extra_symbols`` with count 0."""
    for symbol in extra_symbols:
        counts.setdefault(symbol, 0)
    write_lines(path, [f"{symbol} {count}" for symbol, count in
                       sorted(counts.items(), key=lambda item: (-item[1], item[0]))])


def write_lines(path: Path, lines: list[str]) -> None:
    write_atomically(path, "".join(line + "\n" for line in lines))


def oov_report(splits: list[SplitLabels], lexicon: Lexicon, shown: int = 20) -> str:
    """One line: the missing words, most frequent first, with counts, and where they occur."""
    words = sum((s.oov_words for s in splits), Counter())
    listed = ", ".join(f"{w} ({c})" for w, c in words.most_common(shown))
    more = f" and {len(words) - shown} more" if len(words) > shown else ""
    where = ", ".join(f"{s.dropped_oov} of {s.dropped_oov + len(s.entries)} in {s.name}" for s in splits if s.oov_words)
    return (f"{len(words)} word(s) missing from lexicon {lexicon.path}: {listed}{more}; utterances holding "
            f"them: {where}")


def train_sentencepiece(sentences: list[str], model_prefix: Path, vocab_size: int, model_type: str):
    """Train a sentencepiece model on ``sentences``; returns the loaded processor."""
    import sentencepiece as spm

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_prefix=str(model_prefix), vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, bos_id=-1, eos_id=-1,
            # a tiny corpus may hold fewer pieces than asked for: take what there is
            hard_vocab_limit=False, num_threads=1, minloglevel=2,
        )
    except RuntimeError as err:
        raise LabelError(f"sentencepiece training failed (vocab {vocab_size}, {model_type}): {err}") from err
    return spm.SentencePieceProcessor(model_file=f"{model_prefix}.model")


def train_sentencepiece_into(sentences, out_dir: Path, vocab_size: int, model_type: str):
    """``train_sentencepiece`` to ``out_dir/spm.{model,vocab}``, each file moved there when complete."""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".spm.") as tmp:
        sp = train_sentencepiece(sentences, Path(tmp) / "spm", vocab_size, model_type)
        for ext in ("model", "vocab"):
            os.replace(Path(tmp) / f"spm.{ext}", out_dir / f"spm.{ext}")
    return sp


@dataclass
class LabelSummary:
    splits: list[SplitLabels]
    phone_inventory: int | None


def make_labels(
    tsv_paths: list[Path],
    out_dir: Path | None = None,
    lexicon_path: Path | None = None,
    keep_stress: bool = False,
    on_oov: str = "error",
    on_missing: str = "error",
    dict_splits: list[str] | None = None,
    spm_vocab: int = 0,
    spm_type: str = "unigram",
    force: bool = False,
) -> LabelSummary:
    """Write labels and dictionaries for ``tsv_paths`` into ``out_dir`` (default: the first manifest's
    folder), and, when ``out_dir`` is another folder, each manifest of the kept utterances.

    Nothing is written when an output exists already (unless ``force``), when an OOV word is met
    with ``on_oov="error"``, or when utterances would be left out of a manifest in ``out_dir``
    itself: input manifests are never rewritten. Every file is written atomically."""
    if not tsv_paths:
        raise LabelError("no manifest given")
    if on_oov not in ("skip", "error") or on_missing not in ("skip", "error"):
        raise LabelError(f"on_oov/on_missing must be 'skip' or 'error', got {on_oov!r}/{on_missing!r}")
    tsv_paths = [Path(t) for t in tsv_paths]
    names = [split_name(t) for t in tsv_paths]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LabelError(f"two manifests of the same split name {repeated}: their labels would overwrite each other")
    out_dir = Path(out_dir) if out_dir is not None else tsv_paths[0].parent
    if out_dir.exists() and not out_dir.is_dir():
        raise LabelError(f"{out_dir}: exists and is not a directory")
    in_place = {t: out_dir.resolve() == t.parent.resolve() for t in tsv_paths}
    dict_splits = dict_splits or [names[0]]
    unknown = set(dict_splits) - set(names)
    if unknown:
        raise LabelError(f"dictionary split(s) {sorted(unknown)} are not among the manifests given")
    exts = ["wrd", "ltr"] + (["phn"] if lexicon_path is not None else []) + (["spm"] if spm_vocab > 0 else [])
    outputs = [out_dir / f"{n}.{ext}" for n in names for ext in [*exts, "oov.txt"]]
    outputs += [out_dir / f"{split_name(t)}.tsv" for t in tsv_paths if not in_place[t]]
    outputs += [out_dir / f"dict.{ext}.txt" for ext in exts]
    outputs += [out_dir / f"spm.{ext}" for ext in ("model", "vocab") if spm_vocab > 0]
    try:
        check_outputs(outputs, force)
    except ManifestError as err:
        raise LabelError(str(err)) from None
    lexicon = load_lexicon(lexicon_path, keep_stress) if lexicon_path is not None else None

    transcripts = TranscriptIndex()
    splits = [collect_labels(t, transcripts, lexicon, on_oov, on_missing) for t in tsv_paths]
    if lexicon is not None and on_oov == "error" and any(s.oov_words for s in splits):
        raise LabelError(f"{oov_report(splits, lexicon)}. Nothing was written: add the words to the "
                         f"lexicon, or leave those utterances out with --on-oov skip --out-dir DIR")
    for tsv, labels in zip(tsv_paths, splits):
        dropped = labels.dropped_oov + labels.dropped_missing
        if dropped and in_place[tsv]:
            raise LabelError(
                f"{tsv}: {dropped} of {dropped + len(labels.entries)} utterances would be left out "
                f"({labels.dropped_oov} with OOV words, {labels.dropped_missing} without transcript), and an "
                f"input manifest is never rewritten: give --out-dir, a folder other than {tsv.parent}, for the "
                f"manifest of the kept utterances and its labels. Nothing was written")

    out_dir.mkdir(parents=True, exist_ok=True)
    for tsv, labels in zip(tsv_paths, splits):
        if not in_place[tsv]:
            write_tsv(out_dir / f"{labels.name}.tsv", labels.root, labels.entries)
        write_lines(out_dir / f"{labels.name}.wrd", [" ".join(w) for w in labels.words])
        write_lines(out_dir / f"{labels.name}.ltr", [letter_label(w) for w in labels.words])
        if lexicon is not None:
            write_lines(out_dir / f"{labels.name}.phn", [" ".join(p) for p in labels.phones])
        oov_file = out_dir / f"{labels.name}.oov.txt"
        if labels.oov_words:
            write_lines(oov_file, [f"{w} {c}" for w, c in labels.oov_words.most_common()])
        elif oov_file.exists():
            oov_file.unlink()  # a stale list from an earlier run (replaced with --force) would misreport this one

    counted = [s for s in splits if s.name in dict_splits]
    write_dict(out_dir / "dict.wrd.txt", Counter(w for s in counted for ws in s.words for w in ws))
    write_dict(out_dir / "dict.ltr.txt",
               Counter(ch for s in counted for ws in s.words for ch in letter_label(ws).split()))
    if lexicon is not None:
        write_dict(out_dir / "dict.phn.txt", Counter(p for s in counted for ps in s.phones for p in ps),
                   lexicon.inventory)
    if spm_vocab > 0:
        sp = train_sentencepiece_into([" ".join(ws) for s in counted for ws in s.words], out_dir,
                                      spm_vocab, spm_type)
        pieces = {s.name: [sp.encode(" ".join(ws), out_type=str) for ws in s.words] for s in splits}
        for name, encoded in pieces.items():
            write_lines(out_dir / f"{name}.spm", [" ".join(p) for p in encoded])
        vocabulary = {sp.id_to_piece(i) for i in range(sp.get_piece_size())
                      if not (sp.is_unknown(i) or sp.is_control(i))}
        write_dict(out_dir / "dict.spm.txt",
                   Counter(p for s in counted for line in pieces[s.name] for p in line), vocabulary)
    return LabelSummary(splits, len(lexicon.inventory) if lexicon is not None else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifests", nargs="+", type=Path, help="{split}.tsv files")
    parser.add_argument("--out-dir", type=Path, help="output folder (default: the first manifest's)")
    parser.add_argument("--lexicon", type=Path, help="pronunciation lexicon for .phn labels")
    parser.add_argument("--keep-stress", action="store_true", help="keep stress digits on vowels")
    parser.add_argument("--on-oov", choices=("error", "skip"), default="error",
                        help="a word missing from the lexicon: stop, listing the missing words (default), or "
                             "leave its utterances out (counted; needs an --out-dir other than the manifests')")
    parser.add_argument("--on-missing", choices=("error", "skip"), default="error",
                        help="utterance without transcript: stop (default), or leave it out (counted; needs an "
                             "--out-dir other than the manifests')")
    parser.add_argument("--dict-splits", nargs="+", help="splits whose symbols are counted (default: first)")
    parser.add_argument("--spm-vocab", type=int, default=0, help="sentencepiece vocabulary size (0: none)")
    parser.add_argument("--spm-type", choices=("unigram", "bpe"), default="unigram",
                        help="sentencepiece model type (default: unigram)")
    parser.add_argument("--force", action="store_true", help="replace label and dictionary files that exist")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        summary = make_labels(args.manifests, args.out_dir, args.lexicon, args.keep_stress, args.on_oov,
                              args.on_missing, args.dict_splits, args.spm_vocab, args.spm_type, args.force)
    except (LabelError, ManifestError) as err:
        sys.exit(f"siamctc-labels: error: {err}")
    for s in summary.splits:
        print(f"{s.name}: {len(s.entries)} utterances labelled; dropped {s.dropped_oov} with OOV words "
              f"({sum(s.oov_words.values())} tokens, {len(s.oov_words)} types), "
              f"{s.dropped_missing} without transcript")
    if summary.phone_inventory is not None:
        print(f"phone inventory: {summary.phone_inventory} phonemes")


if __name__ == "__main__":
    main()
