"""examples/paper/run_paper.py: the plan's arithmetic by hand, and the whole chain with --tiny, twice."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import PLUGIN_DIR, needs_corpus_packages
from tiny_checkpoints import tiny_hubert_checkpoint, tiny_wavlm_checkpoint

REPO = PLUGIN_DIR.parent
sys.path.insert(0, str(REPO / "examples" / "paper"))
import paper_plan as plan  # noqa: E402
import run_paper  # noqa: E402

# simple rates, so that every figure below can be followed by hand
RATES = {key: plan.Rate(value, "", "") for key, value in dict(
    start_tool=1.0, start_torch=2.0, export=3.0, start_gpu=10.0, manifest_file=0.5, labels_utt=0.25,
    speed_audio=0.1, siamctc_update=2.0, wavlm_factor=1.5, forward=0.01, forward_single=0.02,
    train_audio=0.001, probe_head_update=0.1, cache_read=1.0).items()}


def write_manifest(path, seconds):
    path.write_text("/corpus\n" + "".join(f"u{i}.flac\t{round(s * 16000)}\n" for i, s in enumerate(seconds)))


def synthetic_plan(tmp_path, **options):
    for name, seconds in (("train", [10] * 4), ("valid", [5] * 2), ("test", [10] * 2)):
        write_manifest(tmp_path / f"{name}.tsv", seconds)
    splits = {name: plan.split_from_manifest(tmp_path / f"{name}.tsv") for name in ("train", "valid", "test")}
    encoders = {"hubert": plan.Encoder("hubert", layers=2, dim=4, params=1000),
                "wavlm": plan.Encoder("wavlm", layers=2, dim=4, params=2000)}
    settings = plan.Settings(siamctc_updates=10, siamctc_valid_passes=2, siamctc_checkpoints=3,
                             probe_evals=5, probe_seeds=1, finetune=True, finetune_updates=100, finetune_frozen=10,
                             finetune_batch_seconds=20, finetune_checkpoints=2,
                             finetune_valid_passes=3)
    rows = plan.plan_rows(splits, encoders, settings, RATES, **options)
    return splits, {row.stage: row for row in rows}


def test_the_plan_is_the_hand_computation_on_a_synthetic_manifest(tmp_path):
    splits, rows = synthetic_plan(tmp_path, gpus=2, cache_budget_gb=None)
    assert (splits["train"].utterances, splits["train"].seconds) == (4, 40.0)
    # 3 starts + 8 files x 0.5 s; 1 start + 8 utterances x 0.25 s; 2 + 20 s x 4 speeds x 0.1 s
    assert rows["manifests"].seconds == pytest.approx(7.0)
    assert rows["labels"].seconds == pytest.approx(3.0)
    assert rows["speed copies"].seconds == pytest.approx(10.0)
    # the copies last 20/0.8 + 20/0.9 + 20/1.1 + 20/1.2 = 82.0707 s: 16-bit FLAC at 0.56 of 32,000 B/s,
    # and 90 B/s of labels
    assert rows["speed copies"].disk == pytest.approx(82.0707 * (32000 * 0.56 + 90), rel=1e-5)
    # SiamCTC: start + 10 updates x 2 s + 2 valid passes x 2 views x 10 s x 0.01 s/s; WavLM 1.5 x the work
    assert rows["siamctc hubert"].seconds == pytest.approx(30.4)
    assert rows["siamctc wavlm"].seconds == pytest.approx(10 + 1.5 * 20.4)
    # 3 checkpoints of 1,000 parameters at 4 (weights, saved as float32 even in fp16) + 8 (Adam) bytes;
    # an export of 4-byte weights
    assert rows["siamctc hubert"].disk == 36000
    assert rows["export wavlm"].disk == 8000
    # on 2 GPUs the two trainings take half their sum
    assert rows["siamctc hubert"].wall + rows["siamctc wavlm"].wall == pytest.approx((30.4 + 40.6) / 2)
    # probe, cached: 50 frames x 3 states x 4 dims x 2 bytes = 1,200 B per second of audio, over
    # 40 + 10 + 20 + 82.0707 s; SUPERB's 112.128 passes over 4 utterances in updates of 32: 14 updates
    # of 32 x 10 s (384,000 B each), 5 valid passes (12,000 B) and the tests (122,484.8 B) read at 1 GB/s
    probe = rows["probe hubert"]
    assert probe.disk == pytest.approx(1200 * 152.0707, rel=1e-5) and probe.transient
    read = (14 * 384000 + 5 * 12000 + 122484.8) / 1e9
    assert probe.seconds == pytest.approx(10 + 152.0707 * 0.02 + 14 * 0.1 + read, rel=1e-6)
    # fine-tuning: (10 frozen / 3 + 90) updates x 20 s x 0.001 s/s + 3 valid passes x 10 s x 0.01 s/s,
    # a base encoder after an export (3 s) to fairseq's format
    assert rows["finetune hubert_siamctc"].seconds == pytest.approx(10 + 1866.6667 * 0.001 + 0.3, rel=1e-6)
    assert rows["finetune hubert"].seconds == pytest.approx(3 + 10 + 1866.6667 * 0.001 + 0.3, rel=1e-6)
    assert rows["finetune wavlm_siamctc"].seconds == pytest.approx(10 + 1.5 * (1.8666667 + 0.3), rel=1e-6)
    assert rows["finetune hubert_siamctc"].disk == 2 * 1000 * 12  # 2 checkpoints of fp32 weights + Adam
    assert rows["finetune hubert"].disk == 2 * 1000 * 12 + 4 * 1000  # and the exported base
    # decoding: 2 HuBERT models and 2 WavLM models (1.5 x) over the 102.0707 s of the five speeds
    assert rows["decode"].seconds == pytest.approx(10 + 5 * 102.0707 * 0.01, rel=1e-6)


def test_a_probe_over_the_cache_budget_streams_and_the_four_share_the_gpus(tmp_path):
    _, rows = synthetic_plan(tmp_path, gpus=2, cache_budget_gb=1e-6)  # 1,000 B: less than any cache
    # 14 updates x 32 x 10 s + 5 valid passes x 10 s + 102.0707 s of tests, through the encoder at 0.01 s/s
    hubert, wavlm = rows["probe hubert"], rows["probe wavlm_siamctc"]
    assert hubert.seconds == pytest.approx(10 + 4632.0707 * 0.01, rel=1e-6)
    assert wavlm.seconds == pytest.approx(10 + 1.5 * 46.320707, rel=1e-6)
    assert hubert.disk == 0
    # four probes on two GPUs: a HuBERT and a WavLM probe on each, each on one GPU for its whole time
    probes = [rows[f"probe {v}"] for v in run_paper.VARIANTS]
    assert [p.wall for p in probes] == [p.seconds for p in probes]
    assert plan.total_wall(probes, gpus=2, cpu_jobs=0) == pytest.approx(hubert.seconds + wavlm.seconds, rel=1e-6)
    # the whole plan on 2 GPUs: manifests, labels, speed copies, exports, decoding and report in turn;
    # SiamCTC (30.4 + 40.6 s) and fine-tuning (15.1667 + 12.1667 + 16.25 + 13.25 s) halved; the probes
    # 56.3207 + 79.4811 s on each GPU
    expected = (7 + 3 + 10 + 2 * 3 + 15.103535 + 1) + (30.4 + 40.6) / 2 + 56.833333 / 2 + 135.801768
    assert plan.total_wall(list(rows.values()), gpus=2, cpu_jobs=0) == pytest.approx(expected, rel=1e-6)
    # peak disk: what stays (checkpoints, copies, labels), the probes' caches never at once
    assert plan.peak_disk(list(rows.values()), 2) == pytest.approx(
        sum(r.disk for r in rows.values() if not r.transient))


def test_librispeech_and_builtin_layouts_and_a_missing_split(tmp_path):
    for name in ("train-clean-100", "dev-clean", "test-clean"):
        (tmp_path / "ls" / name).mkdir(parents=True)
    assert run_paper.resolve_splits(tmp_path / "ls")["valid"] == tmp_path / "ls" / "dev-clean"
    for name in ("train", "dev", "test"):
        (tmp_path / "builtin" / name).mkdir(parents=True)
    assert run_paper.resolve_splits(tmp_path / "builtin")["test_clean"] == tmp_path / "builtin" / "test"
    (tmp_path / "ls" / "dev-clean").rmdir()
    with pytest.raises(run_paper.InputError, match="no folder dev-clean"):
        run_paper.resolve_splits(tmp_path / "ls")


def run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    start = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "paper" / "run_paper.py"), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return proc, time.time() - start


@needs_corpus_packages
def test_tiny_chain_writes_table_and_figure_then_skips_every_stage(tiny_corpus, tmp_path):
    corpus, _ = tiny_corpus
    librispeech = tmp_path / "LibriSpeech"  # the built-in corpus under LibriSpeech's folder names
    librispeech.mkdir()
    for name, split in (("train-clean-100", "train"), ("dev-clean", "dev"), ("test-clean", "test")):
        (librispeech / name).symlink_to(corpus / "audio" / split)
    tiny_hubert_checkpoint(tmp_path / "hubert.pt")
    tiny_wavlm_checkpoint(tmp_path / "wavlm.pt")
    work, out = tmp_path / "work", tmp_path / "out"
    # --bf16: fairseq's bf16 runs on CPUs too, so the chain is checked in the precision GPUs use
    args = ["--tiny", "--bf16", "--yes", "--librispeech", librispeech, "--hubert", tmp_path / "hubert.pt",
            "--wavlm", tmp_path / "wavlm.pt", "--work", work, "--out", out]

    first, _ = run(args, tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    # the plan comes before the first stage starts
    assert first.stdout.index("total:") < first.stdout.index("== manifests")
    record = json.loads((out / "paper.json").read_text())
    variants = ["hubert", "hubert_siamctc", "wavlm", "wavlm_siamctc"]
    assert list(record["table1"]) == variants
    assert list(record["figure2"]["probe"]) == variants
    for name in variants:
        rates = record["figure2"]["probe"][name]
        assert sorted(rates, key=float) == ["0.8", "0.9", "1.0", "1.1", "1.2"]
        assert all(0 <= per < 1000 for per in rates.values())  # insertions can pass 100 %
        assert record["table1"][name]["per"] == rates["1.0"]
    assert record["table1"]["hubert_siamctc"]["change"] == pytest.approx(
        record["table1"]["hubert_siamctc"]["per"] - record["table1"]["hubert"]["per"])
    # the paper's numbers beside: table 1, and figure 2 as its text states it
    assert [record["table1"][v]["paper_per"] for v in variants] == [5.41, 4.32, 4.84, 3.96]
    text = (out / "paper.md").read_text()
    for row in ("| HuBERT |", "| HuBERT+SiamCTC |", "| WavLM |", "| WavLM+SiamCTC |"):
        assert text.count(row) == 2, row  # table 1 and figure 2
    assert "| HuBERT, paper | 6.52 | > 5.60 | 5.41 |  | 6.28 |" in text
    assert "| 4.32 | -1.09 |" in text and "| 3.96 | -0.88 |" in text
    assert (out / "figure2.png").read_bytes()[:4] == b"\x89PNG"
    stage_stamps = [p for p in (work / "stamps").glob("*.json") if p.name not in ("hashes.json", "encoders.json")]
    assert len(stage_stamps) == 12 and all(json.loads(p.read_text())["state"] == "done" for p in stage_stamps)
    # the SiamCTC stages recorded (and so trained with) the config in bf16
    trainings = [json.loads(p.read_text())["inputs"]["config"]["common"] for p in stage_stamps
                 if p.name.startswith("siamctc")]
    assert len(trainings) == 2 and all(c["bf16"] is True and c["fp16"] is False for c in trainings)
    assert not list((work / "probe_cache").glob("*/*"))  # each probe's features removed once it was done

    before = {p: p.stat().st_mtime_ns for p in [*stage_stamps, out / "paper.json"]}
    second, _ = run(args, tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    statuses = re.findall(r"^(?:\S+(?: \S+)?)\s+CPU .*?\s(done|todo|partial|changed|foreign|skipped)\s",
                          second.stdout, re.M)
    assert len(statuses) == 13 and set(statuses) == {"done", "skipped"}  # 12 stages, fine-tuning skipped
    assert "== " not in second.stdout  # no stage started
    assert {p: p.stat().st_mtime_ns for p in before} == before

    # another WavLM checkpoint: refused before any work, in one line naming the stage
    tiny_wavlm_checkpoint(tmp_path / "wavlm2.pt", seed=1)
    third, _ = run([*args[:-6], "--wavlm", tmp_path / "wavlm2.pt", "--work", work, "--out", out], tmp_path)
    assert third.returncode == 1
    assert third.stderr.strip().count("\n") == 0
    assert "stage 'siamctc wavlm'" in third.stderr and "--force" in third.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before
