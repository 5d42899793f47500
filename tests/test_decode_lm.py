"""Lexicon-constrained beam search with an n-gram LM (fairseq_siamctc.lm_decoding, siamctc-decode --lm)."""

import itertools
import json
import math

import pytest
import torch

from fairseq_siamctc.cli import decode
from fairseq_siamctc.cli.decode import CtcRecognizer, error_rate
from fairseq_siamctc.lm_decoding import LMDecoderOptions, build_lm_decoder, lm_decode, read_lexicon

LETTERS = ["<s>", "<pad>", "</s>", "<unk>", "|", "A", "B", "C", "D"]  # fairseq's order: blank is <s>
PHONES = ["<s>", "<pad>", "</s>", "<unk>", "K", "AE", "AO", "T", "D", "G"]


def write_arpa(path, unigrams, bigrams=()):
    """An ARPA file: unigrams {word: log10 p}, bigrams [(w1, w2, log10 p)]; back-off weights 0."""
    unigrams = {"<s>": -99.0, "</s>": -1.0, "<unk>": -3.0, **unigrams}
    lines = ["\\data\\", f"ngram 1={len(unigrams)}", f"ngram 2={len(bigrams)}", "", "\\1-grams:"]
    lines += [f"{p}\t{w}\t0" if w != "</s>" else f"{p}\t{w}" for w, p in unigrams.items()]
    lines += ["", "\\2-grams:"] + [f"{p}\t{a} {b}" for a, b, p in bigrams] + ["", "\\end\\", ""]
    path.write_text("\n".join(lines))
    return str(path)


def emissions(symbols, frames):
    """frames: one {symbol: probability} per frame, the rest of the mass spread thinly -> (1, T, V) log-probs."""
    rows = []
    for frame in frames:
        row = torch.full((len(symbols),), 1e-4, dtype=torch.float64)
        for symbol, p in frame.items():
            row[symbols.index(symbol)] = p
        rows.append((row / row.sum()).log())
    return torch.stack(rows)[None].float()


# "A|C B|D |": acoustically AB (0.55 * 0.55) beats CD (0.45 * 0.45) by 2 ln(0.55/0.45) = 0.40 nats
AMBIGUOUS = [{"A": 0.55, "C": 0.45}, {"<s>": 1.0}, {"B": 0.55, "D": 0.45}, {"|": 1.0}]


def decoder(tmp_path, symbols, lexicon_lines, lm=None, **options):
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("".join(f"{line}\n" for line in lexicon_lines))
    silence = symbols.index("|") if "|" in symbols else symbols.index("</s>")
    return build_lm_decoder(symbols, 0, silence, LMDecoderOptions(str(lexicon), lm, **options))


def test_read_lexicon_appends_the_word_boundary_and_checks_units(tmp_path):
    path = tmp_path / "lex.txt"
    path.write_text("AB A B\nAB A B |\n\nBA B A |\nCA C A\n")
    assert read_lexicon(str(path), LETTERS, "|") == {"AB": [["A", "B", "|"]], "BA": [["B", "A", "|"]],
                                                     "CA": [["C", "A", "|"]]}
    path.write_text("CAT K AE T\nCAT K AO T\n")
    assert read_lexicon(str(path), PHONES, None) == {"CAT": [["K", "AE", "T"], ["K", "AO", "T"]]}
    path.write_text("AB A B\nAX A X\n")
    with pytest.raises(ValueError, match=r"lex\.txt:2: unit 'X' of 'AX' is not in the model's dictionary"):
        read_lexicon(str(path), LETTERS, "|")
    path.write_text("AB\n")
    with pytest.raises(ValueError, match=r"lex\.txt:1: the word 'AB' has no units"):
        read_lexicon(str(path), LETTERS, "|")
    with pytest.raises(FileNotFoundError, match="lexicon not found"):
        read_lexicon(str(tmp_path / "missing.txt"), LETTERS, "|")


def test_the_language_model_flips_an_acoustically_close_hypothesis(tmp_path):
    # log10 p(CD) - log10 p(AB) = 2.9, at least 2.9 nats in either log base the decoder uses:
    # against the 0.40 nats of acoustic advantage, weight 0.01 keeps AB (< 0.07) and weight 2 flips it
    lm = write_arpa(tmp_path / "lm.arpa", {"AB": -3.0, "CD": -0.1}, [("<s>", "CD", -0.1)])
    lexicon = ["AB A B", "CD C D"]
    x, lengths = emissions(LETTERS, AMBIGUOUS), torch.tensor([4])
    assert lm_decode(decoder(tmp_path, LETTERS, lexicon, lm, lm_weight=0.0), x, lengths)[0][0] == ["AB"]
    assert lm_decode(decoder(tmp_path, LETTERS, lexicon, lm, lm_weight=0.01), x, lengths)[0][0] == ["AB"]
    words, units = lm_decode(decoder(tmp_path, LETTERS, lexicon, lm, lm_weight=2.0), x, lengths)[0]
    assert words == ["CD"]
    assert [LETTERS[u] for u in units if LETTERS[u] != "|"] == ["C", "D"]


def test_the_lexicon_constrains_the_output_to_its_words(tmp_path):
    # greedy reads "A D", not a word; of the lexicon's words AB scores 0.9 * 0.2 = 0.18 against
    # CD's 0.1 * 0.8 = 0.08 (the other words use a unit at probability 1e-4 somewhere)
    frames = [{"A": 0.9, "C": 0.1}, {"<s>": 1.0}, {"D": 0.8, "B": 0.2}, {"|": 1.0}]
    x = emissions(LETTERS, frames)
    greedy = x[0].argmax(-1).tolist()
    assert [LETTERS[i] for i in greedy] == ["A", "<s>", "D", "|"]
    lexicon = ["AB A B", "CD C D", "BA B A"]
    assert lm_decode(decoder(tmp_path, LETTERS, lexicon), x, torch.tensor([4]))[0][0] == ["AB"]
    # brute force over the lexicon: the best word is the one with the largest product over its frames
    scores = {w: x[0, 0, LETTERS.index(w[0])] + x[0, 2, LETTERS.index(w[1])] for w in ("AB", "CD", "BA")}
    assert max(scores, key=scores.get) == "AB"
    # two utterances in one padded batch, each with its own length
    both = torch.cat([torch.cat([x, x], 1), torch.cat([x, torch.zeros_like(x)], 1)])
    assert [w for w, _ in lm_decode(decoder(tmp_path, LETTERS, lexicon), both, torch.tensor([8, 4]))] == [
        ["AB", "AB"], ["AB"]]


def test_phoneme_units_need_no_word_boundary(tmp_path):
    # K AE|AO T, then D AO G: two words in a row, no boundary unit between them
    frames = [{"K": 1.0}, {"<s>": 1.0}, {"AE": 0.55, "AO": 0.45}, {"T": 1.0}, {"<s>": 1.0},
              {"D": 1.0}, {"AO": 1.0}, {"<s>": 1.0}, {"G": 1.0}]
    x, lengths = emissions(PHONES, frames), torch.tensor([len(frames)])
    lexicon = ["CAT K AE T", "COT K AO T", "DOG D AO G"]
    assert lm_decode(decoder(tmp_path, PHONES, lexicon), x, lengths)[0][0] == ["CAT", "DOG"]
    lm = write_arpa(tmp_path / "lm.arpa", {"CAT": -3.0, "COT": -0.5, "DOG": -0.5}, [("COT", "DOG", -0.1)])
    words, units = lm_decode(decoder(tmp_path, PHONES, lexicon, lm, lm_weight=2.0), x, lengths)[0]
    assert words == ["COT", "DOG"]
    assert [PHONES[u] for u in units if u != PHONES.index("</s>")] == ["K", "AO", "T", "D", "AO", "G"]


def test_unreadable_language_model_is_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.arpa"
    bad.write_text("not an arpa file\n")
    with pytest.raises(ValueError, match=r"bad\.arpa: not a language model KenLM reads"):
        decoder(tmp_path, LETTERS, ["AB A B"], str(bad))
    with pytest.raises(FileNotFoundError, match="language model not found"):
        decoder(tmp_path, LETTERS, ["AB A B"], str(tmp_path / "missing.arpa"))


def test_decode_with_lexicon_and_lm_writes_both_word_error_rates(stock_hubert_runs, audio_corpus, tmp_path, capfd):
    words = ["".join(pair) for pair in itertools.product("ABCD", repeat=2)]
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("".join(f"{w} {' '.join(w)}\n" for w in words))  # the '|' is appended
    lm = write_arpa(tmp_path / "lm.arpa", {w: math.log10(1 / 16) for w in words}, [("<s>", "AB", -0.5)])
    args = ["--checkpoint", str(stock_hubert_runs[1]), "--data", str(audio_corpus), "--split", "valid",
            "--labels", "ltr", "--lexicon", str(lexicon), "--lm", lm, "--device", "cpu"]
    assert decode.main([*args, "--out", str(tmp_path / "batched")]) == 0
    printed = capfd.readouterr()
    assert "valid: WER" in printed.out and "with the lexicon and the LM: WER" in printed.out and "utt/s" in printed.out
    assert "Reading" not in printed.err and "Loading the LM" not in printed.err  # KenLM's progress kept out
    out = tmp_path / "batched"
    score = json.loads((out / "valid.json").read_text())
    assert score["metric"] == "WER" and score["lm"]["metric"] == "WER"
    lm_hyps = (out / "valid.lm.hyp").read_text().splitlines()
    lm_refs = (out / "valid.lm.ref").read_text().splitlines()
    assert lm_refs == (out / "valid.ref").read_text().splitlines()  # letters joined at '|': the words
    assert {k: score["lm"][k] for k in ("errors", "ref_tokens", "error_rate")} == {
        k: v for k, v in error_rate(lm_hyps, lm_refs).items() if k != "utterances"}
    assert all(w in words for line in lm_hyps for w in line.split())  # only lexicon words
    assert score["lm"]["lm"] == lm and score["lm"]["beam"] == 50
    # one at a time gives the same greedy and beam-search output
    assert decode.main([*args, "--batch-size", "1", "--out", str(tmp_path / "single")]) == 0
    for name in ("valid.hyp", "valid.lm.hyp"):
        assert (tmp_path / "single" / name).read_text() == (out / name).read_text()
    recognizer = CtcRecognizer.load(str(stock_hubert_runs[1]), "cpu")
    assert recognizer.silence_index == recognizer.dictionary.index("|")


def test_decode_lm_errors_are_one_line(stock_hubert_runs, audio_corpus, tmp_path, capsys):
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("AB A B\nAE A E\n")
    base = ["--checkpoint", str(stock_hubert_runs[1]), "--data", str(audio_corpus), "--split", "valid",
            "--labels", "ltr", "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert decode.main([*base, "--lexicon", str(lexicon)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lexicon.txt:2: unit 'E' of 'AE'" in err
    lexicon.write_text("AB A B\n")
    assert decode.main([*base, "--lexicon", str(lexicon), "--lm", str(tmp_path / "none.arpa")]) == 1
    assert "language model not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        decode.main([*base, "--lm", str(tmp_path / "none.arpa")])
    assert exit_info.value.code == 2 and "--lm needs --lexicon" in capsys.readouterr().err


def test_make_lm_bigram_sums_to_one_in_every_context_as_kenlm_reads_it(tmp_path):
    import importlib.util
    import pathlib

    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    script = pathlib.Path(__file__).parents[1] / "examples" / "lm" / "make_lm.py"
    spec = importlib.util.spec_from_file_location("make_lm", script)
    make_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_lm)
    sentences = [["A", "B"], ["A", "C", "A"], ["B"], ["A", "B"]]
    (tmp_path / "lm.arpa").write_text(make_lm.bigram_arpa(sentences, ["A", "B", "C", "D"]))
    words = ["A", "B", "C", "D", "</s>", "<unk>"]
    lm = KenLM(str(tmp_path / "lm.arpa"), Dictionary(words))
    start = lm.start(False)
    for context in ("<s>", "A", "B", "C", "D"):
        state = start if context == "<s>" else lm.score(start, words.index(context))[0]
        log10 = [lm.score(state, i)[1] for i in range(len(words) - 2)]
        log10 += [lm.finish(state)[1], lm.score(state, words.index("<unk>"))[1]]
        assert sum(10 ** x for x in log10) == pytest.approx(1.0, abs=1e-5), context
    # a seen bigram: (c(A, B) - 0.5) / c(A) = (2 - 0.5) / 4; an unseen word has the add-one unigram's share
    state = lm.score(start, 0)[0]
    assert 10 ** lm.score(state, 1)[1] == pytest.approx(1.5 / 4, abs=1e-5)
    assert 10 ** lm.score(state, 2)[1] == pytest.approx(0.5 / 4, abs=1e-5)  # C after A: once
    assert lm.score(state, 3)[1] < lm.score(state, 2)[1]  # D never seen: backed off
