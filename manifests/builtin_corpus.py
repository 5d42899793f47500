"""Build the built-in corpus: synthetic speech from Debian TTS engines plus real test speech, in LibriSpeech layout.

Usage::

    python -m siamctc_manifests.builtin_corpus [--size tiny|small|study] [--out data/builtin] [--seed 1] [--workers 2]
                                       [--lexicon LEXICON] [--testdata POCKETSPHINX_TEST_DATA]
    # or: siamctc-builtin-corpus ...; `make corpus CORPUS_SIZE=small` runs it with --out data/builtin

Debian packages needed: espeak-ng, flite, festival, festvox-kallpc16k, festvox-kdlpc16k,
festvox-us-slt-hts, bible-kjv (the ``bible`` program and its text), pocketsphinx-en-us (the CMU
dictionary), pocketsphinx-testdata (the real recordings).

What it builds (deterministic from ``--seed``; the same seed and size give the same files):

* Sentences: clauses of the King James Bible (public domain, Debian's ``bible-kjv``), cut at
  ``. ; : ? !``, of 5 to 14 words, without digits or brackets, every word in the lexicon; each
  utterance of the corpus speaks a different sentence, so no text is shared between splits.
* Speakers: espeak-ng voices (8 English accents x 13 voice variants, each speaker with its own base
  pitch and rate), flite ``awb`` and ``rms``, and festival ``kal_diphone``, ``ked_diphone``,
  ``cmu_us_slt_arctic_hts``. Festival is the engine held out: its voices are in ``test`` only.
  flite's ``kal16`` and ``slt`` are not used, being the same people as festival's kal and slt.
  No speaker is in two splits. The speaking rate of every utterance is drawn
  from 0.85x to 1.18x of its speaker's rate (log-uniform), and espeak-ng's pitch moves by up to
  4 steps around the speaker's, so rates vary within each speaker. Every utterance is scaled to
  the same peak level and gets a seeded noise floor at about -70 dBFS (the engines' pauses are
  exact digital zeros otherwise).
* ``--size tiny`` (about a minute of audio, for the tests): train 3 espeak-ng voices + flite awb,
  3 utterances each; valid 1 espeak-ng voice + flite rms, 2 each; test 1 espeak-ng voice + festival
  kal and slt, 2 each. ``--size small`` (about 15 minutes of training audio, for the demo): train 24
  espeak-ng voices + flite awb, 12 utterances each; valid 3 espeak-ng voices + flite rms, 8 each;
  test 4 espeak-ng voices + the 3 festival voices, 10 each.
  ``--size study`` (for ``make study``): small's train and valid, and a test set of 12 espeak-ng
  voices + the 3 festival voices, 20 utterances each (300).
* Real speech, ``test_real``: Debian's ``pocketsphinx-testdata``: five LibriVox clips of *Sense and
  Sensibility* (speaker 9001), five card-name recordings (``cards/``, speaker 9002) and
  ``goforward.raw`` ("go forward ten meters", raw 16-bit 16 kHz, speaker 9003), all 16 kHz mono;
  their transcripts go through the same label pipeline (so OOV words would be counted and skipped).

Output (``--out``, default ``data/builtin``; its ``audio/`` and ``manifests/`` are replaced)::

    audio/{train,dev,test,test_real}/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac (16 kHz mono FLAC)
    audio/{split}/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt, audio/SPEAKERS.TXT
    audio/{test,test_real}_sp{0.8,0.9,1.1,1.2}/...            speed-perturbed copies
    manifests/{train,valid,test,test_real}.{tsv,wrd,ltr,phn}
    manifests/{test,test_real}_sp{0.8,0.9,1.1,1.2}.{tsv,wrd,ltr,phn}
    manifests/dict.{wrd,ltr,phn}.txt                      (counts from train; phn: whole inventory)
    corpus.json                                           (sizes, speakers, build time)

At the end it prints a summary: build time, hours of audio, speakers and utterances per split,
and the phone inventory size. The manifests and labels come from ``siamctc_manifests.make_manifest``,
``siamctc_manifests.make_labels`` and ``siamctc_manifests.speed_perturb_testset``, exactly as for LibriSpeech.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from .make_labels import LabelError, Lexicon, load_lexicon, make_labels, normalize_words
from .make_manifest import ManifestError, make_manifest
from .speed_perturb_testset import DEFAULT_SPEEDS, speed_perturb_testset
from .tts import SAMPLE_RATE, TTSError, Utterance, Voice, synthesize

DEBIAN_LEXICON = Path("/usr/share/pocketsphinx/model/en-us/cmudict-en-us.dict")
DEBIAN_TESTDATA = Path("/usr/share/pocketsphinx/test/data")

ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                  "en-029", "en-us-nyc")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5")
RATE_RANGE = (0.85, 1.18)
PITCH_JITTER = 4
SENTENCE_WORDS = (5, 14)
PEAK_LEVEL = 0.9
NOISE_FLOOR = 3e-4  # about -70 dBFS: engines write pauses as exact zeros, which no microphone does

# audio folder of each split -> manifest name (fairseq's default validation subset is "valid")
SPLIT_DIRS = {"train": "train", "dev": "valid", "test": "test"}
REAL_SPLIT = "test_real"


class CorpusError(RuntimeError):
    """The corpus cannot be built: missing package, bad output folder, too few sentences."""


@dataclass(frozen=True)
class Size:
    """Speakers and utterances per speaker for each split of a corpus size."""

    espeak_speakers: dict[str, int]
    flite_voices: dict[str, tuple[str, ...]]
    festival_voices: dict[str, tuple[str, ...]]
    utterances_per_speaker: dict[str, int]


SIZES = {
    "tiny": Size({"train": 3, "dev": 1, "test": 1}, {"train": ("awb",), "dev": ("rms",)},
                 {"test": ("kal_diphone", "cmu_us_slt_arctic_hts")}, {"train": 3, "dev": 2, "test": 2}),
    "small": Size({"train": 24, "dev": 3, "test": 4}, {"train": ("awb",), "dev": ("rms",)},
                  {"test": ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")},
                  {"train": 12, "dev": 8, "test": 10}),
    # small's train and valid (drawn first, so the same voices and sentences) and a test set of 300
    # utterances from 15 held-out voices, so that a study's intervals are narrow
    "study": Size({"train": 24, "dev": 3, "test": 12}, {"train": ("awb",), "dev": ("rms",)},
                  {"test": ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")},
                  {"train": 12, "dev": 8, "test": 20}),
}


@dataclass
class Speaker:
    speaker_id: int
    split: str
    voice: Voice
    chapter_id: int = 1
    utterances: list[Utterance] = field(default_factory=list)
    seconds: float = 0.0


def kjv_sentences(lexicon: Lexicon) -> list[str]:
    """Distinct KJV clauses of SENTENCE_WORDS words, all in ``lexicon``, as text for the TTS engines."""
    if shutil.which("bible") is None:
        raise CorpusError("the `bible` program is missing: install the Debian package bible-kjv")
    text = subprocess.run(["bible", "-l100000", "gen1:1-rev22:21"], capture_output=True, text=True,
                          check=True).stdout
    seen, sentences = set(), []
    for line in text.splitlines():
        verse = re.match(r"^\s+\d+ (.*)$", line)
        if verse is None:
            continue
        for clause in re.split(r"[.;:?!]", verse.group(1)):
            clause = clause.strip(" ,")
            if not clause or re.search(r"[^A-Za-z ,']", clause):
                continue
            words = normalize_words(clause)
            key = " ".join(words)
            if (not SENTENCE_WORDS[0] <= len(words) <= SENTENCE_WORDS[1] or key in seen
                    or any(w not in lexicon for w in words)):
                continue
            seen.add(key)
            # all-capital words (LORD) would be spelt out letter by letter by some engines
            sentences.append(re.sub(r"\b[A-Z]{2,}\b", lambda m: m.group(0).capitalize(), clause) + ".")
    return sentences


def plan_speakers(size: Size, sentences: list[str], seed: int) -> list[Speaker]:
    """Voices, splits, sentences, rates and pitches of every utterance, drawn from ``seed``."""
    rng = random.Random(seed)
    espeak_voices = [f"{accent}+{variant}" for accent in ESPEAK_ACCENTS for variant in ESPEAK_VARIANTS]
    rng.shuffle(espeak_voices)
    order = list(range(len(sentences)))
    rng.shuffle(order)
    next_sentence = iter(order)

    speakers: list[Speaker] = []
    for split in SPLIT_DIRS:
        voices = [Voice("espeak-ng", espeak_voices.pop(), rng.randint(30, 70), rng.randint(150, 190))
                  for _ in range(size.espeak_speakers.get(split, 0))]
        voices += [Voice("flite", name) for name in size.flite_voices.get(split, ())]
        voices += [Voice("festival", name) for name in size.festival_voices.get(split, ())]
        for voice in voices:
            speaker = Speaker(101 + len(speakers), split, voice)
            for _ in range(size.utterances_per_speaker[split]):
                index = next(next_sentence, None)
                if index is None:
                    raise CorpusError(f"only {len(sentences)} sentences for the corpus: too few")
                rate = math.exp(rng.uniform(math.log(RATE_RANGE[0]), math.log(RATE_RANGE[1])))
                pitch = rng.randint(-PITCH_JITTER, PITCH_JITTER) if voice.engine == "espeak-ng" else 0
                speaker.utterances.append(Utterance(sentences[index], round(rate, 3), pitch))
            speakers.append(speaker)
    return speakers


def utterance_id(speaker: Speaker, index: int) -> str:
    return f"{speaker.speaker_id}-{speaker.chapter_id}-{index:04d}"


def write_speaker(audio_root: Path, speaker: Speaker, waves: list[np.ndarray], words: list[list[str]],
                  ids: list[str]) -> float:
    """Writes FLAC files and the ``trans.txt`` of one speaker-chapter; returns seconds of audio."""
    folder = audio_root / str(speaker.speaker_id) / str(speaker.chapter_id)
    folder.mkdir(parents=True, exist_ok=True)
    for wav, utt_id in zip(waves, ids):
        sf.write(str(folder / f"{utt_id}.flac"), wav, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    with open(folder / f"{speaker.speaker_id}-{speaker.chapter_id}.trans.txt", "w") as trans:
        for utt_id, ws in zip(ids, words):
            print(utt_id, " ".join(ws), file=trans)
    return sum(len(w) for w in waves) / SAMPLE_RATE


def synthesize_speaker(audio_root: Path, speaker: Speaker, seed: int) -> float:
    waves = []
    for index, wav in enumerate(synthesize(speaker.voice, speaker.utterances)):
        # one peak level for every engine, so that loudness says nothing about the engine
        wav = wav * (PEAK_LEVEL / max(float(np.abs(wav).max()), 1e-6))
        noise = np.random.default_rng([seed, speaker.speaker_id, index]).standard_normal(len(wav))
        waves.append((wav + NOISE_FLOOR * noise).astype(np.float32))
    ids = [utterance_id(speaker, i) for i in range(len(waves))]
    return write_speaker(audio_root / speaker.split, speaker, waves,
                         [normalize_words(u.text) for u in speaker.utterances], ids)


def copy_real_speech(testdata: Path, audio_root: Path) -> list[Speaker]:
    """pocketsphinx-testdata's real recordings, checked 16 kHz mono, into LibriSpeech layout."""
    def transcripts(path: Path) -> dict[str, list[str]]:
        # sphinx format: "<s> text </s> (utterance-id)"
        entries = {}
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            found = re.match(r"^(.*)\(([^()]+)\)\s*$", line)
            if found is None:
                raise CorpusError(f"{path}:{number}: expected '<s> text </s> (id)', got {line!r}")
            entries[found.group(2)] = normalize_words(re.sub(r"</?s>", " ", found.group(1)))
        return entries

    def read(path: Path, raw: bool = False) -> np.ndarray:
        if not path.is_file():
            raise CorpusError(f"{path}: missing; install the Debian package pocketsphinx-testdata")
        if raw:
            return sf.read(str(path), samplerate=SAMPLE_RATE, channels=1, subtype="PCM_16", format="RAW",
                           endian="LITTLE", dtype="float32")[0]
        wav, rate = sf.read(str(path), dtype="float32")
        if rate != SAMPLE_RATE or wav.ndim != 1:
            raise CorpusError(f"{path}: {rate} Hz, shape {wav.shape}; expected {SAMPLE_RATE} Hz mono")
        return wav

    librivox = transcripts(testdata / "librivox" / "transcription")
    cards = transcripts(testdata / "cards" / "cards.transcription")
    sources = [  # speaker id, name, [(utterance number, audio, words)]
        (9001, "LibriVox reader, Sense and Sensibility",
         [(int(key.rsplit("-", 1)[1]), read(testdata / "librivox" / f"{key}.wav"), words)
          for key, words in sorted(librivox.items())]),
        (9002, "cards recordings",
         [(int(key), read(testdata / "cards" / f"{key}.wav"), words) for key, words in sorted(cards.items())]),
        (9003, "goforward recording",
         [(1, read(testdata / "goforward.raw", raw=True), normalize_words("go forward ten meters"))]),
    ]
    speakers = []
    for speaker_id, name, items in sources:
        speaker = Speaker(speaker_id, REAL_SPLIT, Voice("real", name))
        speaker.seconds = write_speaker(audio_root / REAL_SPLIT, speaker, [wav for _, wav, _ in items],
                                        [words for _, _, words in items],
                                        [utterance_id(speaker, n) for n, _, _ in items])
        speaker.utterances = [Utterance(" ".join(words)) for _, _, words in items]
        speakers.append(speaker)
    return speakers


def prepare_output(out: Path) -> None:
    """Clears a previous build in ``out``; refuses to touch a folder this script did not make."""
    marker = out / "corpus.json"
    for sub in ("audio", "manifests"):
        if (out / sub).exists() and not marker.exists():
            raise CorpusError(f"{out / sub} exists but {marker} does not: not a built-in corpus folder, "
                              "refusing to overwrite it")
    for sub in ("audio", "manifests"):
        shutil.rmtree(out / sub, ignore_errors=True)
    marker.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def write_speakers_txt(path: Path, speakers: list[Speaker]) -> None:
    with open(path, "w") as out:
        print("; ID | SPLIT | ENGINE | VOICE | PITCH | WORDS/MIN | MINUTES", file=out)
        for s in speakers:
            pitch, wpm = (s.voice.pitch, s.voice.words_per_minute) if s.voice.engine == "espeak-ng" else ("-", "-")
            print(f"{s.speaker_id} | {s.split} | {s.voice.engine} | {s.voice.name} | {pitch} | {wpm} | "
                  f"{s.seconds / 60:.2f}", file=out)


def build_corpus(out: Path, size_name: str = "tiny", seed: int = 1, workers: int = 2,
                 lexicon_path: Path = DEBIAN_LEXICON, testdata: Path = DEBIAN_TESTDATA) -> dict:
    """Builds the corpus into ``out``; returns the summary also written to ``out/corpus.json``."""
    if size_name not in SIZES:
        raise CorpusError(f"unknown size {size_name!r}; choose one of {sorted(SIZES)}")
    if not 1 <= workers <= 2:
        raise CorpusError(f"workers must be 1 or 2 (the corpus is built on small machines), got {workers}")
    if not Path(lexicon_path).is_file():
        raise CorpusError(f"{lexicon_path}: lexicon missing; install the Debian package pocketsphinx-en-us")
    start = time.monotonic()
    out = Path(out)
    prepare_output(out)
    audio_root, manifest_dir = out / "audio", out / "manifests"

    stages = {}
    lexicon = load_lexicon(lexicon_path)
    speakers = plan_speakers(SIZES[size_name], kjv_sentences(lexicon), seed)
    stages["sentences"] = time.monotonic() - start
    with ThreadPoolExecutor(max_workers=workers) as pool:  # engines run as subprocesses: threads suffice
        for speaker, seconds in zip(speakers, pool.map(lambda s: synthesize_speaker(audio_root, s, seed), speakers)):
            speaker.seconds = seconds
    speakers += copy_real_speech(Path(testdata), audio_root)
    write_speakers_txt(audio_root / "SPEAKERS.TXT", speakers)
    stages["synthesis"] = time.monotonic() - start - sum(stages.values())

    for folder, split in [*SPLIT_DIRS.items(), (REAL_SPLIT, REAL_SPLIT)]:
        make_manifest(audio_root / folder, manifest_dir, split=split)
    tsvs = [manifest_dir / f"{split}.tsv" for split in [*SPLIT_DIRS.values(), REAL_SPLIT]]
    labels = make_labels(tsvs, manifest_dir, lexicon_path, dict_splits=["train"])
    stages["manifests and labels"] = time.monotonic() - start - sum(stages.values())
    for split in ("test", REAL_SPLIT):
        speed_perturb_testset(manifest_dir / f"{split}.tsv", audio_root, DEFAULT_SPEEDS)
    stages["speed copies"] = time.monotonic() - start - sum(stages.values())

    summary = {
        "size": size_name, "seed": seed, "build_seconds": round(time.monotonic() - start, 1),
        "stage_seconds": {name: round(seconds, 1) for name, seconds in stages.items()},
        "phone_inventory": labels.phone_inventory,
        "dropped_utterances": {s.name: s.dropped_oov + s.dropped_missing for s in labels.splits},
        "splits": {}, "speakers": [],
    }
    for folder, split in [*SPLIT_DIRS.items(), (REAL_SPLIT, REAL_SPLIT)]:
        members = [s for s in speakers if s.split == folder]
        seconds = sum(s.seconds for s in members)
        summary["splits"][split] = {
            "speakers": len(members), "utterances": sum(len(s.utterances) for s in members),
            "minutes": round(seconds / 60, 2), "hours": round(seconds / 3600, 4),
            "engines": sorted({s.voice.engine for s in members}),
        }
    summary["speakers"] = [{"id": s.speaker_id, "split": s.split, **asdict(s.voice), "seconds": round(s.seconds, 2)}
                           for s in speakers]
    (out / "corpus.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def print_summary(summary: dict, out: Path) -> None:
    splits = summary["splits"]
    print(f"built-in corpus '{summary['size']}' (seed {summary['seed']}) in {out}: "
          f"{summary['build_seconds']:.1f} s to build ("
          + ", ".join(f"{name} {sec:.1f} s" for name, sec in summary["stage_seconds"].items()) + ")")
    print(f"{'split':<10} {'speakers':>8} {'utts':>6} {'minutes':>8} {'hours':>7}  engines")
    for name, s in splits.items():
        print(f"{name:<10} {s['speakers']:>8} {s['utterances']:>6} {s['minutes']:>8.2f} {s['hours']:>7.4f}  "
              f"{', '.join(s['engines'])}")
    total_hours = sum(s["hours"] for s in splits.values())
    print(f"total {total_hours:.4f} h of original audio (+ speed-perturbed copies of test and test_real "
          f"at {', '.join(f'{v:g}' for v in DEFAULT_SPEEDS)})")
    print(f"phone inventory: {summary['phone_inventory']} phonemes; utterances dropped by the label "
          f"pipeline: {summary['dropped_utterances']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="corpus size")
    parser.add_argument("--out", type=Path, default=Path("data/builtin"), help="output folder")
    parser.add_argument("--seed", type=int, default=1, help="seed of speakers, sentences, rates")
    parser.add_argument("--workers", type=int, default=2, help="parallel synthesis processes (1 or 2)")
    parser.add_argument("--lexicon", type=Path, default=DEBIAN_LEXICON, help="pronunciation lexicon")
    parser.add_argument("--testdata", type=Path, default=DEBIAN_TESTDATA,
                        help="pocketsphinx-testdata folder with the real recordings")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        summary = build_corpus(args.out, args.size, args.seed, args.workers, args.lexicon, args.testdata)
    except (CorpusError, TTSError, LabelError, ManifestError) as err:
        sys.exit(f"builtin_corpus: error: {err}")
    print_summary(summary, args.out)


if __name__ == "__main__":
    main()
