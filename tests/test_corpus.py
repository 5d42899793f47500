"""The built-in corpus (size tiny), built once per test session into a temporary folder.

Needs the Debian packages that `make test` installs (see manifests/builtin_corpus.py); without them
the corpus tests are skipped with the list of what is missing.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import needs_corpus_packages
from siamctc_manifests import builtin_corpus as bc
from siamctc_manifests.make_labels import load_lexicon, normalize_words
from siamctc_manifests.make_manifest import read_tsv
from siamctc_manifests.tts import Utterance, Voice, synthesize

pytestmark = needs_corpus_packages

SPLITS = ("train", "valid", "test", "test_real")
SPEEDS = (0.8, 0.9, 1.1, 1.2)
ALL_MANIFESTS = SPLITS + tuple(f"{s}_sp{v:g}" for s in ("test", "test_real") for v in SPEEDS)


@pytest.fixture(scope="session")
def corpus(tiny_corpus):
    return tiny_corpus


@pytest.fixture(scope="module")
def lexicon():
    return load_lexicon(bc.DEBIAN_LEXICON)


def speakers_of(manifest_dir: Path, split: str) -> set[str]:
    return {rel.split("/")[0] for rel, _ in read_tsv(manifest_dir / f"{split}.tsv")[1]}


def test_every_manifest_length_is_the_file_length(corpus):
    out, _ = corpus
    for split in ALL_MANIFESTS:
        root, entries = read_tsv(out / "manifests" / f"{split}.tsv")
        assert entries, split
        for rel, n in entries:
            info = sf.info(str(root / rel))
            assert (info.frames, info.samplerate, info.channels) == (n, 16000, 1), rel


def test_label_files_line_up_with_manifests_and_transcripts(corpus):
    out, _ = corpus
    for split in ALL_MANIFESTS:
        root, entries = read_tsv(out / "manifests" / f"{split}.tsv")
        wrd = (out / "manifests" / f"{split}.wrd").read_text().splitlines()
        ltr = (out / "manifests" / f"{split}.ltr").read_text().splitlines()
        phn = (out / "manifests" / f"{split}.phn").read_text().splitlines()
        assert len(wrd) == len(ltr) == len(phn) == len(entries), split
        for (rel, _), words, letters in zip(entries, wrd, ltr):
            utt_id = Path(rel).name.split(".")[0]
            speaker, chapter, _ = utt_id.split("-")
            trans = (root / speaker / chapter / f"{speaker}-{chapter}.trans.txt").read_text()
            assert f"{utt_id} {words}\n" in trans
            assert letters == " ".join(" ".join(w) + " |" for w in words.split())


def test_phonemes_match_lexicon_and_dictionary(corpus, lexicon):
    out, summary = corpus
    dictionary = {line.split()[0] for line in (out / "manifests" / "dict.phn.txt").read_text().splitlines()}
    assert dictionary == lexicon.inventory and summary["phone_inventory"] == len(dictionary) == 39
    for split in ALL_MANIFESTS:
        for words, phones in zip((out / "manifests" / f"{split}.wrd").read_text().splitlines(),
                                 (out / "manifests" / f"{split}.phn").read_text().splitlines()):
            assert phones.split() == [p for w in words.split() for p in lexicon.phones(w)]
            assert set(phones.split()) <= dictionary


def test_no_speaker_or_sentence_in_two_splits(corpus):
    out, summary = corpus
    speakers = {split: speakers_of(out / "manifests", split) for split in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not speakers[a] & speakers[b], (a, b)
    sentences = {split: set((out / "manifests" / f"{split}.wrd").read_text().splitlines()) for split in SPLITS[:3]}
    assert sum(map(len, sentences.values())) == len(set.union(*sentences.values()))
    # festival, the held-out engine, speaks in test only; every split has several speakers
    engines = {s["id"]: s["engine"] for s in json.loads((out / "corpus.json").read_text())["speakers"]}
    for split in SPLITS:
        split_engines = {engines[int(spk)] for spk in speakers[split]}
        assert ("festival" in split_engines) == (split == "test"), split
        assert len(speakers[split]) >= 2 and summary["splits"][split]["speakers"] == len(speakers[split])


def test_speed_copies_have_expected_lengths(corpus):
    out, _ = corpus
    for split in ("test", "test_real"):
        _, original = read_tsv(out / "manifests" / f"{split}.tsv")
        for speed in SPEEDS:
            _, copy = read_tsv(out / "manifests" / f"{split}_sp{speed:g}.tsv")
            assert [rel for rel, _ in copy] == [str(Path(rel).with_suffix(".flac")) for rel, _ in original]
            assert [n for _, n in copy] == [round(n / speed) for _, n in original]


def test_real_speech_and_its_transcripts(corpus):
    out, _ = corpus
    root, entries = read_tsv(out / "manifests" / "test_real.tsv")
    words = dict(zip((Path(rel).name.split(".")[0] for rel, _ in entries),
                     (out / "manifests" / "test_real.wrd").read_text().splitlines()))
    assert len(words) == 11
    assert words["9003-1-0001"] == "GO FORWARD TEN METERS"
    assert words["9002-1-0002"] == "FOUR QUEEN OF CLUBS"
    assert words["9001-1-0880"] == "HE WAS NOT AN ILL DISPOSED YOUNG MAN"
    # the raw recording was read as 16-bit little-endian 16 kHz: same samples as the package's file
    wav, _ = sf.read(str(root / "9003" / "1" / "9003-1-0001.flac"), dtype="int16")
    raw = np.fromfile(bc.DEBIAN_TESTDATA / "goforward.raw", dtype="<i2")
    np.testing.assert_array_equal(wav, raw)


def test_speaking_rates_vary_within_each_speaker_and_plan_is_deterministic():
    sentences = [f"sentence number {i} here." for i in range(500)]
    plan = bc.plan_speakers(bc.SIZES["small"], sentences, seed=5)
    assert plan == bc.plan_speakers(bc.SIZES["small"], sentences, seed=5)
    assert plan != bc.plan_speakers(bc.SIZES["small"], sentences, seed=6)
    for speaker in plan:
        rates = [u.rate for u in speaker.utterances]
        assert bc.RATE_RANGE[0] <= min(rates) < max(rates) <= bc.RATE_RANGE[1]
    texts = [u.text for s in plan for u in s.utterances]
    assert len(texts) == len(set(texts))
    with pytest.raises(bc.CorpusError, match="too few"):
        bc.plan_speakers(bc.SIZES["small"], sentences[:300], seed=5)


@pytest.mark.parametrize("voice", [Voice("espeak-ng", "en-us+f2"), Voice("flite", "awb"),
                                   Voice("festival", "kal_diphone"), Voice("festival", "cmu_us_slt_arctic_hts")])
def test_every_engine_slows_down_and_speeds_up(voice):
    text = "The grace of our Lord be with you all."
    slow, fast, again = synthesize(voice, [Utterance(text, 0.8), Utterance(text, 1.25), Utterance(text, 0.8)])
    assert len(slow) > 1.3 * len(fast)
    np.testing.assert_array_equal(slow, again)  # deterministic
    assert np.abs(slow).max() > 0.05


def test_kjv_sentences_are_in_lexicon_and_distinct(lexicon):
    sentences = bc.kjv_sentences(lexicon)
    assert len(sentences) > 5000
    keys = [" ".join(normalize_words(s)) for s in sentences]
    assert len(keys) == len(set(keys))
    for sentence, key in zip(sentences, keys):
        words = key.split()
        assert bc.SENTENCE_WORDS[0] <= len(words) <= bc.SENTENCE_WORDS[1]
        assert all(w in lexicon for w in words) and "LORD" not in sentence


def test_builder_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "precious.flac").write_bytes(b"x")
    with pytest.raises(bc.CorpusError, match="refusing to overwrite"):
        bc.build_corpus(tmp_path, "tiny")
    assert (tmp_path / "audio" / "precious.flac").exists()
    with pytest.raises(bc.CorpusError, match="unknown size"):
        bc.build_corpus(tmp_path / "new", "huge")


def test_study_size_has_300_held_out_test_utterances_and_small_training_data():
    sentences = [f"sentence {i}" for i in range(2000)]
    study = bc.plan_speakers(bc.SIZES["study"], sentences, seed=1)
    small = bc.plan_speakers(bc.SIZES["small"], sentences, seed=1)
    test = [s for s in study if s.split == "test"]
    assert sum(len(s.utterances) for s in test) >= 300
    voices = {split: {(s.voice.engine, s.voice.name) for s in study if s.split == split} for split in ("train", "dev", "test")}
    assert not voices["test"] & (voices["train"] | voices["dev"])  # speaker-disjoint
    # train and valid are small's: a seed trained on one is the seed of the other
    for split in ("train", "dev"):
        assert [s for s in study if s.split == split] == [s for s in small if s.split == split]
