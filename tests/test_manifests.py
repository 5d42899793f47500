"""Manifest, label and speed-perturbation scripts on a small fake LibriSpeech tree in the real layout."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from siamctc_manifests import make_labels as labels_mod
from siamctc_manifests import make_manifest as manifest_mod
from siamctc_manifests import speed_perturb_testset as speed_mod
from siamctc_manifests.make_labels import LabelError, letter_label, load_lexicon, make_labels, normalize_words
from siamctc_manifests.make_manifest import ManifestError, make_manifest, read_tsv
from siamctc_manifests.speed_perturb_testset import speed_perturb_testset

SR = 16000

# speaker -> chapter -> [(utterance number, samples, transcript)]
FAKE_LIBRISPEECH = {
    "19": {"198": [(1, 4000, "NORTHANGER ABBEY"), (2, 5200, "THIS LITTLE WORK WAS FINISHED"),
                   (3, 3100, "O'ER THE COLD-HEARTED SEA")]},
    "26": {"495": [(4, 6400, "THE ABBEY WAS COLD"), (5, 2500, "WORK IS LITTLE")]},
    "103": {"1240": [(0, 4800, "THIS SEA IS COLD")]},
}

# original-CMUdict style: comments, stress digits, alternates; mixed case across formats
LEXICON = """;;; a tiny test lexicon
NORTHANGER  N AO1 R TH AE1 NG G ER0
abbey AE1 B IY0
abbey(2) AE1 B EY2
THIS DH IH1 S
this DH AH0 S
LITTLE L IH1 T AH0 L
WORK W ER1 K
WAS W AA1 Z
FINISHED F IH1 N IH0 SH T
O'ER OW1 ER0
THE DH AH0
COLD K OW1 L D
HEARTED HH AA1 R T IH0 D
SEA S IY1
IS IH1 Z
"""


def write_fake_librispeech(root: Path) -> dict[str, tuple[int, str]]:
    """Writes the fake tree (flac noise + trans.txt); returns utterance id -> (samples, text)."""
    rng = np.random.default_rng(0)
    truth = {}
    for speaker, chapters in FAKE_LIBRISPEECH.items():
        for chapter, utts in chapters.items():
            folder = root / speaker / chapter
            folder.mkdir(parents=True)
            lines = []
            for number, samples, text in utts:
                utt_id = f"{speaker}-{chapter}-{number:04d}"
                wav = (rng.standard_normal(samples) * 0.1).astype(np.float32)
                sf.write(str(folder / f"{utt_id}.flac"), wav, SR, subtype="PCM_16")
                lines.append(f"{utt_id} {text}\n")
                truth[utt_id] = (samples, text)
            (folder / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
    return truth


@pytest.fixture
def libri(tmp_path):
    root = tmp_path / "LibriSpeech" / "train-clean-100"
    truth = write_fake_librispeech(root)
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text(LEXICON)
    return root, truth, lexicon


def utt_id_of(rel: str) -> str:
    return Path(rel).name.split(".")[0]


# ---------------------------------------------------------------- make_manifest


def test_manifest_lists_every_file_with_its_length(libri, tmp_path):
    root, truth, _ = libri
    summary = make_manifest(root, tmp_path / "m", split="train")
    tsv_root, entries = read_tsv(tmp_path / "m" / "train.tsv")
    assert tsv_root == root.resolve()
    assert [rel for rel, _ in entries] == sorted(rel for rel, _ in entries)
    assert {utt_id_of(rel): n for rel, n in entries} == {u: n for u, (n, _) in truth.items()}
    for rel, n in entries:  # relative to the root, in the speaker/chapter layout
        assert rel.split("/")[:2] == utt_id_of(rel).split("-")[:2]
        assert sf.info(str(root / rel)).frames == n
    assert summary.counts == {"train": len(truth)}
    assert summary.samples["train"] == sum(n for n, _ in truth.values())


def test_manifest_valid_fraction_partitions_files_by_seed(libri, tmp_path):
    root, truth, _ = libri
    make_manifest(root, tmp_path / "a", valid_fraction=0.5, seed=3)
    make_manifest(root, tmp_path / "b", valid_fraction=0.5, seed=3)
    train = {rel for rel, _ in read_tsv(tmp_path / "a" / "train.tsv")[1]}
    valid = {rel for rel, _ in read_tsv(tmp_path / "a" / "valid.tsv")[1]}
    assert len(valid) == round(0.5 * len(truth)) and not train & valid
    assert {utt_id_of(r) for r in train | valid} == set(truth)
    assert (tmp_path / "a" / "valid.tsv").read_text() == (tmp_path / "b" / "valid.tsv").read_text()
    draws = set()
    for seed in range(8):
        make_manifest(root, tmp_path / f"s{seed}", valid_fraction=0.5, seed=seed)
        draws.add((tmp_path / f"s{seed}" / "valid.tsv").read_text())
    assert len(draws) > 1  # the seed matters


def test_manifest_reads_wav_and_filters_extensions(tmp_path):
    root = tmp_path / "corpus"
    (root / "a").mkdir(parents=True)
    sf.write(str(root / "a" / "x.wav"), np.zeros(1234, np.float32), SR)
    sf.write(str(root / "a" / "y.flac"), np.zeros(999, np.float32), SR)
    (root / "a" / "notes.txt").write_text("not audio")
    make_manifest(root, tmp_path / "m")
    assert read_tsv(tmp_path / "m" / "train.tsv")[1] == [("a/x.wav", 1234), ("a/y.flac", 999)]
    make_manifest(root, tmp_path / "w", extensions=("wav",))
    assert read_tsv(tmp_path / "w" / "train.tsv")[1] == [("a/x.wav", 1234)]


@pytest.mark.parametrize("rate,channels,message", [(8000, 1, "8000 Hz, 1 channel"),
                                                   (SR, 2, "16000 Hz, 2 channel")])
def test_manifest_rejects_wrong_format_naming_the_file(libri, tmp_path, rate, channels, message):
    root, truth, _ = libri
    bad = root / "19" / "198" / "19-198-0009.flac"
    sf.write(str(bad), np.zeros((800, channels), np.float32).squeeze(), rate)
    with pytest.raises(ManifestError, match=message) as err:
        make_manifest(root, tmp_path / "m")
    assert str(bad) in str(err.value)
    summary = make_manifest(root, tmp_path / "m", on_bad="skip")
    assert [path for path, _ in summary.skipped] == [bad]
    assert summary.counts["train"] == len(truth)


def test_manifest_rejects_empty_and_missing_directories(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ManifestError, match="no audio files"):
        make_manifest(tmp_path / "empty", tmp_path / "m")
    with pytest.raises(ManifestError, match="not a directory"):
        make_manifest(tmp_path / "absent", tmp_path / "m")


def test_manifest_cli(libri, tmp_path, capsys):
    root, truth, _ = libri
    manifest_mod.main([str(root), "--dest", str(tmp_path / "m"), "--split", "dev_clean"])
    assert len(read_tsv(tmp_path / "m" / "dev_clean.tsv")[1]) == len(truth)
    assert "dev_clean.tsv: 6 files" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no audio files"):
        manifest_mod.main([str(tmp_path / "m"), "--dest", str(tmp_path / "n")])


# ---------------------------------------------------------------- make_labels


def expected_phones(text: str) -> list[str]:
    """Independent reading of LEXICON: first entry per word, case-folded, stress removed."""
    table = {}
    for line in LEXICON.splitlines():
        if line.startswith(";;;"):
            continue
        word, *phones = line.split()
        if "(" in word:
            continue
        table.setdefault(word.upper(), ["".join(c for c in p if not c.isdigit()) for p in phones])
    return [p for w in normalize_words(text) for p in table[w]]


def test_normalize_words_and_letter_labels():
    assert normalize_words("O'er the cold-hearted sea, 'tis ' said.") == ["O'ER", "THE", "COLD", "HEARTED",
                                                                        "SEA", "'TIS", "SAID"]
    assert letter_label(["HE", "SAW"]) == "H E | S A W |"


def test_lexicon_first_pronunciation_without_stress(libri):
    lex = load_lexicon(libri[2])
    assert lex.phones("abbey") == ["AE", "B", "IY"]
    assert lex.phones("THIS") == ["DH", "IH", "S"]  # the later lower-case entry is an alternate
    assert "ABBEY(2)" not in lex
    assert load_lexicon(libri[2], keep_stress=True).phones("NORTHANGER") == ["N", "AO1", "R", "TH", "AE1",
                                                                              "NG", "G", "ER0"]


def test_lexicon_errors(tmp_path):
    with pytest.raises(LabelError, match="not found"):
        load_lexicon(tmp_path / "none.dict")
    bad = tmp_path / "bad.dict"
    bad.write_text("HELLO HH AH L OW\nLONELY\n")
    with pytest.raises(LabelError, match=r"bad.dict:2"):
        load_lexicon(bad)


def test_labels_line_up_with_manifest(libri, tmp_path):
    root, truth, lexicon = libri
    out = tmp_path / "m"
    make_manifest(root, out)
    summary = make_labels([out / "train.tsv"], lexicon_path=lexicon)
    entries = read_tsv(out / "train.tsv")[1]
    ids = [utt_id_of(rel) for rel, _ in entries]
    wrd = (out / "train.wrd").read_text().splitlines()
    ltr = (out / "train.ltr").read_text().splitlines()
    phn = (out / "train.phn").read_text().splitlines()
    # "NORTHANGER ABBEY" etc.: every word is in the lexicon, nothing dropped
    assert len(wrd) == len(ltr) == len(phn) == len(entries) == len(truth)
    for utt_id, w, l, p in zip(ids, wrd, ltr, phn):
        text = truth[utt_id][1]
        assert w == " ".join(text.replace("-", " ").split())
        assert l.endswith(" |") and l.count("|") == len(w.split())
        assert "".join(l.split()).replace("|", " ").strip() == w
        assert p.split() == expected_phones(text)
    assert summary.phone_inventory == len({p for ph in map(expected_phones, (t for _, t in truth.values()))
                                           for p in ph})


def test_dictionaries_count_dict_splits_only(libri, tmp_path):
    root, truth, lexicon = libri
    out = tmp_path / "m"
    make_manifest(root / "19", out, split="train")
    make_manifest(root / "26", out, split="test")
    make_labels([out / "train.tsv", out / "test.tsv"], lexicon_path=lexicon, dict_splits=["train"])

    def read_dict(name):
        rows = [line.split(" ") for line in (out / f"dict.{name}.txt").read_text().splitlines()]
        assert [int(c) for _, c in rows] == sorted((int(c) for _, c in rows), reverse=True)
        return {s: int(c) for s, c in rows}

    train_text = [t for u, (_, t) in truth.items() if u.startswith("19-")]
    assert read_dict("wrd") == Counter(w for t in train_text for w in normalize_words(t))
    assert read_dict("ltr") == Counter(c for t in train_text for w in normalize_words(t) for c in w + "|")
    phones = read_dict("phn")
    assert {p: c for p, c in phones.items() if c} == Counter(p for t in train_text for p in expected_phones(t))
    assert set(phones) == load_lexicon(lexicon).inventory  # unseen phonemes listed with count 0

    # fairseq reads the dictionaries and every test label maps to a known symbol
    from fairseq.data import Dictionary

    d = Dictionary.load(str(out / "dict.phn.txt"))
    for line in (out / "test.phn").read_text().splitlines():
        assert d.unk() not in d.encode_line(line, append_eos=False, add_if_not_exist=False).tolist()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_oov_words_stop_the_run_in_one_line_and_write_nothing(libri, tmp_path):
    root, truth, lexicon = libri
    short = tmp_path / "short.dict"
    short.write_text("\n".join(l for l in LEXICON.splitlines() if not l.startswith(("SEA", "NORTHANGER"))))
    out = tmp_path / "m"
    make_manifest(root, out)
    before = snapshot(out)
    with pytest.raises(LabelError) as error:
        make_labels([out / "train.tsv"], lexicon_path=short)  # on_oov="error" is the default
    message = str(error.value)
    assert "\n" not in message
    # every missing word with its count, most frequent first, and how many utterances hold them
    assert "2 word(s) missing" in message and "SEA (2), NORTHANGER (1)" in message
    assert "3 of 6 in train" in message and "Nothing was written" in message
    assert snapshot(out) == before


@pytest.mark.parametrize("out_name", [None, "m"])  # the default and the manifest's folder named explicitly
def test_a_manifest_that_would_lose_utterances_is_never_rewritten(libri, tmp_path, out_name):
    root, truth, lexicon = libri
    short = tmp_path / "short.dict"
    short.write_text("\n".join(l for l in LEXICON.splitlines() if not l.startswith("SEA")))
    out = tmp_path / "m"
    make_manifest(root, out)
    before = snapshot(out)
    with pytest.raises(LabelError, match=r"train.tsv: 2 of 6 utterances would be left out .*give --out-dir"):
        make_labels([out / "train.tsv"], tmp_path / out_name if out_name else None, lexicon_path=short,
                    on_oov="skip")
    assert snapshot(out) == before


def test_oov_utterances_are_left_out_of_a_new_manifest_and_counted(libri, tmp_path):
    root, truth, lexicon = libri
    short = tmp_path / "short.dict"
    short.write_text("\n".join(l for l in LEXICON.splitlines() if not l.startswith(("SEA", "NORTHANGER"))))
    lists, out = tmp_path / "lists", tmp_path / "m"
    make_manifest(root, lists)
    before = snapshot(lists)
    summary = make_labels([lists / "train.tsv"], out, lexicon_path=short, on_oov="skip")
    assert snapshot(lists) == before  # the input is untouched
    dropped = {u for u, (_, t) in truth.items() if {"SEA", "NORTHANGER"} & set(t.split())}
    kept = [utt_id_of(rel) for rel, _ in read_tsv(out / "train.tsv")[1]]
    assert set(kept) == set(truth) - dropped
    assert read_tsv(out / "train.tsv")[0] == read_tsv(lists / "train.tsv")[0]  # same audio root
    assert summary.splits[0].dropped_oov == len(dropped)
    assert (out / "train.oov.txt").read_text().split() == ["SEA", "2", "NORTHANGER", "1"]
    for ext in ("wrd", "ltr", "phn"):
        assert len((out / f"train.{ext}").read_text().splitlines()) == len(kept)
    # a later run without OOV words, allowed to replace the outputs, leaves no stale list behind
    make_labels([lists / "train.tsv"], out, lexicon_path=lexicon, force=True)
    assert not (out / "train.oov.txt").exists()
    assert len(read_tsv(out / "train.tsv")[1]) == len(truth)


def test_existing_outputs_are_refused_unless_forced(libri, tmp_path):
    root, truth, lexicon = libri
    out = tmp_path / "m"
    make_manifest(root, out)
    make_labels([out / "train.tsv"], lexicon_path=lexicon)
    (out / "train.wrd").write_text("edited by hand\n")
    before = snapshot(out)
    with pytest.raises(LabelError, match=r"train.wrd and 5 more output\(s\) exist already; pass --force"):
        make_labels([out / "train.tsv"], lexicon_path=lexicon)
    assert snapshot(out) == before
    make_labels([out / "train.tsv"], lexicon_path=lexicon, force=True)
    assert len((out / "train.wrd").read_text().splitlines()) == len(truth)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_a_folder_in_place_of_an_output_is_refused_before_any_work(libri, tmp_path):
    root, truth, lexicon = libri
    out = tmp_path / "m"
    make_manifest(root, out)
    (out / "dict.ltr.txt").mkdir()
    with pytest.raises(LabelError, match=r"dict.ltr.txt: is a directory"):
        make_labels([out / "train.tsv"], lexicon_path=lexicon, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["dict.ltr.txt", "train.tsv"]


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    from siamctc_manifests.make_manifest import write_atomically

    target = tmp_path / "train.wrd"
    target.write_text("old\n")

    class Interrupted(Exception):
        pass

    def fail(*args):
        raise Interrupted

    monkeypatch.setattr(manifest_mod.os, "replace", fail)  # the process dies before the file is moved
    with pytest.raises(Interrupted):
        write_atomically(target, "new\n" * 1000)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["train.wrd"]


def test_missing_transcript_is_an_error_or_a_counted_skip(libri, tmp_path):
    root, truth, lexicon = libri
    sf.write(str(root / "26" / "495" / "26-495-0099.flac"), np.zeros(1600, np.float32), SR)
    lists, out = tmp_path / "lists", tmp_path / "m"
    make_manifest(root, lists)
    with pytest.raises(LabelError, match=r"no transcript for .*26-495-0099.flac"):
        make_labels([lists / "train.tsv"])
    with pytest.raises(LabelError, match=r"1 of 7 utterances would be left out \(0 with OOV words, 1 without"):
        make_labels([lists / "train.tsv"], on_missing="skip")
    summary = make_labels([lists / "train.tsv"], out, on_missing="skip")
    assert summary.splits[0].dropped_missing == 1
    assert len(read_tsv(out / "train.tsv")[1]) == len((out / "train.wrd").read_text().splitlines()) == len(truth)


def test_empty_transcript_and_unknown_dict_split_are_errors(libri, tmp_path):
    root, _, _ = libri
    out = tmp_path / "m"
    make_manifest(root, out)
    with pytest.raises(LabelError, match="not among the manifests"):
        make_labels([out / "train.tsv"], dict_splits=["dev"])
    (root / "103" / "1240" / "103-1240.trans.txt").write_text("103-1240-0000 ...\n")
    with pytest.raises(LabelError, match="has no words"):
        make_labels([out / "train.tsv"])


def test_sentencepiece_targets_decode_to_the_words(libri, tmp_path):
    import sentencepiece as spm

    root, _, _ = libri
    out = tmp_path / "m"
    make_manifest(root, out)
    make_labels([out / "train.tsv"], spm_vocab=30)
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    dictionary = {line.split()[0] for line in (out / "dict.spm.txt").read_text().splitlines()}
    for pieces, words in zip((out / "train.spm").read_text().splitlines(),
                             (out / "train.wrd").read_text().splitlines()):
        assert sp.decode(pieces.split()) == words
        assert set(pieces.split()) <= dictionary


def test_labels_cli(libri, tmp_path, capsys):
    root, truth, lexicon = libri
    out = tmp_path / "m"
    make_manifest(root, out)
    labels_mod.main([str(out / "train.tsv"), "--lexicon", str(lexicon), "--out-dir", str(tmp_path / "o")])
    assert len((tmp_path / "o" / "train.phn").read_text().splitlines()) == len(truth)
    assert "phone inventory" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="lexicon file not found"):
        labels_mod.main([str(out / "train.tsv"), "--lexicon", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match=r"^siamctc-labels: error: .*absent.tsv: manifest not found$"):
        labels_mod.main([str(tmp_path / "absent.tsv"), "--out-dir", str(tmp_path / "x")])


@pytest.mark.parametrize("build_parser", [labels_mod.build_parser, manifest_mod.build_parser,
                                          speed_mod.build_parser])
def test_every_option_has_help(build_parser):
    for action in build_parser()._actions:
        assert action.help, action.option_strings or action.dest


# ---------------------------------------------------------------- speed_perturb_testset


def test_speed_copies_have_expected_lengths_and_same_labels(libri, tmp_path):
    root, truth, lexicon = libri
    out = tmp_path / "m"
    make_manifest(root, out, split="test")
    make_labels([out / "test.tsv"], lexicon_path=lexicon)
    written = speed_perturb_testset(out / "test.tsv", tmp_path / "audio", (0.8, 1.0, 1.2))
    assert written == {"test_sp0.8": len(truth), "test_sp1.2": len(truth)}
    _, original = read_tsv(out / "test.tsv")
    for speed in (0.8, 1.2):
        name = f"test_sp{speed:g}"
        sp_root, entries = read_tsv(out / f"{name}.tsv")
        assert sp_root == (tmp_path / "audio" / name).resolve()
        for (rel, n), (sp_rel, sp_n) in zip(original, entries):
            assert sp_rel == rel and sp_n == round(n / speed) == sf.info(str(sp_root / sp_rel)).frames
        for ext in ("wrd", "ltr", "phn"):
            assert (out / f"{name}.{ext}").read_text() == (out / f"test.{ext}").read_text()
    assert not (out / "test_sp1.tsv").exists()
    # the copy is a LibriSpeech tree of its own: its transcripts give the same labels again
    make_labels([out / "test_sp0.8.tsv"], tmp_path / "relabelled", lexicon_path=lexicon)
    for ext in ("wrd", "phn"):
        assert (tmp_path / "relabelled" / f"test_sp0.8.{ext}").read_text() == (out / f"test.{ext}").read_text()


def test_speed_perturbation_scales_frequency(tmp_path):
    root = tmp_path / "a"
    root.mkdir()
    t = np.arange(SR) / SR
    sf.write(str(root / "tone.wav"), 0.5 * np.sin(2 * np.pi * 500 * t), SR, subtype="PCM_16")
    make_manifest(root, tmp_path / "m", split="test")
    speed_perturb_testset(tmp_path / "m" / "test.tsv", tmp_path / "out", (0.8, 1.25))
    for speed in (0.8, 1.25):
        wav, _ = sf.read(str(tmp_path / "out" / f"test_sp{speed:g}" / "tone.flac"))
        peak_hz = np.argmax(np.abs(np.fft.rfft(wav))) * SR / len(wav)
        assert abs(peak_hz - 500 * speed) < 2


def test_speed_perturb_rejects_misaligned_labels(libri, tmp_path, capsys):
    root, _, _ = libri
    out = tmp_path / "m"
    make_manifest(root, out, split="test")
    (out / "test.wrd").write_text("ONE LINE\n")
    with pytest.raises(ManifestError, match="line count differs"):
        speed_perturb_testset(out / "test.tsv", tmp_path / "audio")
    with pytest.raises(ManifestError, match="label file not found"):
        speed_perturb_testset(out / "test.tsv", tmp_path / "audio", labels=("phn",))
    with pytest.raises(SystemExit, match="line count differs"):
        speed_mod.main([str(out / "test.tsv"), "--audio-out", str(tmp_path / "audio")])
    (out / "test.wrd").unlink()
    speed_mod.main([str(out / "test.tsv"), "--audio-out", str(tmp_path / "audio"), "--speeds", "0.9"])
    assert "test_sp0.9: 6 files" in capsys.readouterr().out


def test_malformed_manifest_and_duplicate_transcripts_are_errors(libri, tmp_path):
    root, _, _ = libri
    out = tmp_path / "m"
    make_manifest(root, out)
    trans = root / "26" / "495" / "26-495.trans.txt"
    trans.write_text(trans.read_text() + "26-495-0004 AGAIN\n")
    with pytest.raises(LabelError, match=r"26-495.trans.txt:3: utterance 26-495-0004 listed twice"):
        make_labels([out / "train.tsv"])
    bad = tmp_path / "bad.tsv"
    bad.write_text(f"{root}\n19/198/19-198-0001.flac 4000\n")
    with pytest.raises(ManifestError, match=r"bad.tsv:2: expected"):
        read_tsv(bad)


def test_speed_copies_refuse_earlier_outputs_and_bad_audio_before_writing(libri, tmp_path):
    root, truth, lexicon = libri
    out = tmp_path / "m"
    make_manifest(root, out, split="test")
    speed_perturb_testset(out / "test.tsv", tmp_path / "audio", (0.9,))
    before = snapshot(out)
    with pytest.raises(ManifestError, match=r"test_sp0.9.tsv exists already; pass --force"):
        speed_perturb_testset(out / "test.tsv", tmp_path / "audio", (0.9,))
    (out / "test_sp0.9.tsv").unlink()
    with pytest.raises(ManifestError, match=r"test_sp0.9: audio of an earlier run exists; pass --force"):
        speed_perturb_testset(out / "test.tsv", tmp_path / "audio", (0.9,))
    assert speed_perturb_testset(out / "test.tsv", tmp_path / "audio", (0.9,), force=True) == {"test_sp0.9": 6}
    assert snapshot(out) == before
    # an unreadable file is found before the first copy of a new speed is written
    (root / "26" / "495" / "26-495-0005.flac").write_bytes(b"not audio")
    with pytest.raises(SystemExit, match=r"^siamctc-speed-testsets: error: .*26-495-0005.flac: cannot read audio"):
        speed_mod.main([str(out / "test.tsv"), "--audio-out", str(tmp_path / "audio"), "--speeds", "1.1"])
    assert not (tmp_path / "audio" / "test_sp1.1").exists() and not (out / "test_sp1.1.tsv").exists()
    with pytest.raises(SystemExit, match=r"^siamctc-speed-testsets: error: .*absent.tsv: manifest not found$"):
        speed_mod.main([str(tmp_path / "absent.tsv"), "--audio-out", str(tmp_path / "audio")])


def test_manifest_refuses_to_replace_an_existing_one_unless_forced(libri, tmp_path):
    root, truth, _ = libri
    make_manifest(root, tmp_path / "m")
    (tmp_path / "m" / "train.tsv").write_text("kept\n")
    with pytest.raises(SystemExit, match=r"^siamctc-manifest: error: .*train.tsv exists already; pass --force"):
        manifest_mod.main([str(root), "--dest", str(tmp_path / "m")])
    assert (tmp_path / "m" / "train.tsv").read_text() == "kept\n"
    manifest_mod.main([str(root), "--dest", str(tmp_path / "m"), "--force"])
    assert len(read_tsv(tmp_path / "m" / "train.tsv")[1]) == len(truth)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"file: exists and is not a directory"):
        manifest_mod.main([str(root), "--dest", str(tmp_path / "file")])
