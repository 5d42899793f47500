"""Greedy CTC decoding and split-level scoring (siamctc-decode, siamctc-robustness)."""

import json
import shutil

import pytest
import soundfile as sf
import torch

from fairseq_siamctc.cli import robustness
from fairseq_siamctc.cli.decode import CtcRecognizer, decode_split, default_post_process, error_rate, metric_name


def naive_edit_distance(a, b):
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1,
                              table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[-1][-1]


def test_error_rate_sums_errors_over_the_split():
    hyps = ["AH B K", "", "S IH T S"]
    refs = ["AH B", "K AE T", "S IH T"]
    expected = sum(naive_edit_distance(h.split(), r.split()) for h, r in zip(hyps, refs))
    score = error_rate(hyps, refs)
    assert score["errors"] == expected == 1 + 3 + 1
    assert score["error_rate"] == pytest.approx(100 * expected / 8)  # not the mean of per-utterance rates
    with pytest.raises(ValueError, match="2 hypotheses for 3"):
        error_rate(hyps[:2], refs)


def test_greedy_decoding_collapses_repeats_and_drops_blanks(stock_hubert_runs, audio_corpus):
    recognizer = CtcRecognizer.load(str(stock_hubert_runs[1]))
    wav, _ = sf.read(audio_corpus / "wav" / "valid0.wav", dtype="float32")
    with torch.no_grad():
        logits = recognizer.model(source=torch.from_numpy(wav)[None], padding_mask=None)["encoder_out"][:, 0]
    expected, previous = [], None
    for index in logits.argmax(-1).tolist():
        if index != previous and index not in (recognizer.blank_index, recognizer.dictionary.pad(),
                                               recognizer.dictionary.eos()):
            expected.append(index)
        previous = index
    assert recognizer.decode(wav) == expected
    assert recognizer.blank_index == recognizer.dictionary.bos()  # fairseq's ctc criterion's blank


def test_decode_split_writes_aligned_hypotheses(stock_hubert_runs, audio_corpus, tmp_path):
    recognizer = CtcRecognizer.load(str(stock_hubert_runs[1]))
    score = decode_split(recognizer, str(audio_corpus), "valid", "ltr", str(tmp_path), "letter")
    refs = (tmp_path / "valid.ref").read_text().splitlines()
    hyps = (tmp_path / "valid.hyp").read_text().splitlines()
    assert len(refs) == len(hyps) == 2
    assert refs[0] == " ".join("".join(w.split()) for w in
                               (audio_corpus / "valid.ltr").read_text().splitlines()[0].split("|")).strip()
    assert {k: v for k, v in score.items() if k != "throughput"} == {
        **error_rate(hyps, refs), "metric": "WER", "split": "valid", "labels": "ltr"}
    assert score["throughput"]["audio_seconds"] == pytest.approx(
        sum(int(line.split("\t")[1]) for line in (audio_corpus / "valid.tsv").read_text().splitlines()[1:]) / 16000)
    assert json.loads((tmp_path / "valid.json").read_text())["error_rate"] == score["error_rate"]


def test_label_file_that_does_not_match_the_manifest_is_an_error(stock_hubert_runs, audio_corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(audio_corpus, data, ignore=shutil.ignore_patterns("wav"))
    (data / "valid.ltr").write_text("A |\n")
    recognizer = CtcRecognizer.load(str(stock_hubert_runs[1]))
    with pytest.raises(ValueError, match=r"valid\.ltr has 1 lines but the manifest has 2"):
        decode_split(recognizer, str(data), "valid", "ltr", str(tmp_path / "out"))


def test_robustness_table_json_and_plot(stock_hubert_runs, audio_corpus, tmp_path, monkeypatch):
    loads, load = [], CtcRecognizer.load.__func__
    monkeypatch.setattr(CtcRecognizer, "load", classmethod(lambda cls, *args: loads.append(args) or load(cls, *args)))
    data = tmp_path / "data"
    shutil.copytree(audio_corpus, data)
    for factor in (0.8, 1.2):  # stand-ins for the speed copies: the same files under other names
        for ext in ("tsv", "ltr"):
            shutil.copy(data / f"valid.{ext}", data / f"valid_sp{factor}.{ext}")
    out = tmp_path / "out"
    robustness.main(["--model", f"a={stock_hubert_runs[1]}", "--model", f"b={stock_hubert_runs[1]}",
                     "--data", str(data), "--test-set", "valid", "--labels", "ltr",
                     "--factors", "0.8", "1.0", "1.2", "--out", str(out)])
    assert len(loads) == 2  # each model loaded once for its three speed copies
    result = json.loads((out / "robustness.json").read_text())
    rates = result["error_rates"]
    assert result["metric"] == "WER" and set(rates) == {"a", "b"}
    assert list(rates["a"]) == ["0.8", "1.0", "1.2"]
    # identical audio under three names, decoded by the same model: identical rates
    assert len({*rates["a"].values(), *rates["b"].values()}) == 1
    # batches give what one at a time gives
    robustness.main(["--model", f"a={stock_hubert_runs[1]}", "--data", str(data), "--test-set", "valid",
                     "--labels", "ltr", "--factors", "1.0", "--batch-size", "1", "--out", str(tmp_path / "one")])
    assert (tmp_path / "one" / "a" / "valid.hyp").read_text() == (out / "a" / "valid.hyp").read_text()
    table = (out / "robustness.md").read_text().splitlines()
    assert table[0] == "| WER (%) | 0.8x | 1.0x | 1.2x |" and len(table) == 4
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoints_of_the_wrong_kind_are_clear_errors(stock_hubert_runs, audio_corpus, tmp_path, capsys):
    from fairseq_siamctc.cli import decode, plot_alignment

    pretrained = str(stock_hubert_runs[0])
    assert decode.main(["--checkpoint", pretrained, "--data", str(audio_corpus), "--split", "valid",
                        "--labels", "ltr", "--out", str(tmp_path)]) == 1
    assert "is not a fine-tuned CTC checkpoint" in capsys.readouterr().err
    assert decode.main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(audio_corpus),
                        "--out", str(tmp_path)]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert decode.main(["--checkpoint", str(stock_hubert_runs[1]), "--data", str(audio_corpus), "--out",
                        str(tmp_path), "--device", "nodevice"]) == 1
    assert "not a torch device: 'nodevice'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert decode.main(["--checkpoint", str(stock_hubert_runs[1]), "--data", str(audio_corpus), "--out",
                            str(tmp_path), "--device", "cuda"]) == 1
        assert "CUDA is not available" in capsys.readouterr().err
    assert plot_alignment.main(["--checkpoint", pretrained, "--audio", "x.wav", "--out", "x.png"]) == 1
    assert "siamctc" in capsys.readouterr().err


def test_metric_names_are_the_same_everywhere():
    assert metric_name("phn", "none") == "PER"
    assert metric_name("ltr", "letter") == metric_name("spm", "sentencepiece") == metric_name("wrd", "none") == "WER"
    assert metric_name("ltr", "none") == metric_name("km", "none") == "UER"
    assert default_post_process("ltr") == "letter" and default_post_process("spm") == "sentencepiece"
    assert default_post_process("phn") == "none"


def test_robustness_post_process_scores_letters_as_units(stock_hubert_runs, audio_corpus, tmp_path):
    out = tmp_path / "out"
    assert robustness.main(["--model", f"a={stock_hubert_runs[1]}", "--data", str(audio_corpus), "--test-set",
                            "valid", "--labels", "ltr", "--post-process", "none", "--factors", "1.0",
                            "--out", str(out)]) == 0
    result = json.loads((out / "robustness.json").read_text())
    refs = (out / "a" / "valid.ref").read_text().splitlines()
    hyps = (out / "a" / "valid.hyp").read_text().splitlines()
    assert result["metric"] == "UER" and "|" in refs[0]  # letters and boundaries, not words
    assert result["error_rates"]["a"]["1.0"] == pytest.approx(error_rate(hyps, refs)["error_rate"])


@pytest.mark.parametrize("tool", ["decode", "robustness"])
def test_every_option_has_help_text(tool):
    from fairseq_siamctc.cli import decode

    parser = (decode if tool == "decode" else robustness).build_parser()
    options = {action.dest: action.help for action in parser._actions}
    assert {"device", "batch_size", "max_tokens", "post_process", "labels"} <= set(options)
    assert [dest for dest, help_text in options.items() if not help_text] == []
    assert parser.get_default("device") == decode.default_device()


def test_earlier_results_are_replaced_only_with_force(stock_hubert_runs, audio_corpus, tmp_path, capsys):
    from fairseq_siamctc.cli import decode

    out = tmp_path / "out"
    args = ["--model", f"a={stock_hubert_runs[1]}", "--data", str(audio_corpus), "--test-set", "valid",
            "--labels", "ltr", "--factors", "1.0", "--out", str(out)]
    assert robustness.main(args) == 0
    capsys.readouterr()
    (out / "a" / "valid.hyp").write_text("an earlier result\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert robustness.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"siamctc-robustness: error: {out / 'robustness.md'} and 5 more output(s) exist already; "
                   "pass --force to replace them"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    assert robustness.main([*args, "--force"]) == 0
    assert (out / "a" / "valid.hyp").read_text() != "an earlier result\n"
    capsys.readouterr()

    decode_args = ["--checkpoint", str(stock_hubert_runs[1]), "--data", str(audio_corpus), "--split", "valid",
                   "--labels", "ltr", "--out", str(out / "a")]
    assert decode.main(decode_args) == 1
    assert capsys.readouterr().err.strip() == (f"siamctc-decode: error: {out / 'a' / 'valid.hyp'} and 2 more "
                                               "output(s) exist already; pass --force to replace them")
    assert decode.main([*decode_args, "--force"]) == 0
