"""Error rates of the demo's fine-tuned phoneme models without and with a lexicon and a word LM.

    python examples/lm/wer_table.py [--size small|tiny|study] [--data-root data] [--out results/lm_demo]

after ``make demo`` (or ``make demo DEMO_SIZE=tiny``, or ``make study`` for ``--size study``):
builds a bigram LM on the corpus's training sentences and a lexicon of its words (``make_lm.py``,
CMU dictionary), decodes ``test`` and ``test_real`` with every fine-tuned model three ways with
``siamctc-decode`` (greedy; lexicon-constrained beam search; lexicon and LM) and prints a markdown
table: greedy PER, and the WER of the two beam searches. A phoneme model has no greedy WER (nothing marks its word boundaries).
"""

import argparse
import json
import pathlib
import subprocess
import sys

from fairseq_siamctc.cli.outputs import write_atomic

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent
CMUDICT = "/usr/share/pocketsphinx/model/en-us/cmudict-en-us.dict"
# (corpus, folder of the fine-tuned models) under --data-root; "study": make study's models
WORK = {"small": ("builtin", "demo"), "tiny": ("builtin_tiny", "demo_tiny"), "study": ("builtin_study", "study")}
TEST_SETS = ("test", "test_real")


def run(command):
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"wer_table.py: {command[0]} failed: {done.stderr.strip().splitlines()[-1]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(WORK), default="small",
                        help="which demo's models (default: small; study: the fine-tuned models of make study)")
    parser.add_argument("--models", nargs="+", default=None,
                        help="names of the fine-tuned models to decode (finetune_NAME; default: all)")
    parser.add_argument("--data-root", type=pathlib.Path, default=REPO / "data", help="the demo's data root")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="output folder (default: results/lm_demo[_tiny])")
    parser.add_argument("--lm-weight", type=float, default=2.0, help="LM weight (default: 2)")
    parser.add_argument("--word-score", type=float, default=0.0, help="score per word (default: 0)")
    args = parser.parse_args(argv)
    corpus, work = (args.data_root / name for name in WORK[args.size])
    manifests = corpus / "manifests"
    out = args.out or REPO / ("results/lm_demo" if args.size == "small" else f"results/lm_demo_{args.size}")
    models = sorted(work.glob("finetune_*/checkpoints/checkpoint_last.pt"))
    if args.models is not None:
        missing = set(args.models) - {m.parents[1].name.removeprefix("finetune_") for m in models}
        if missing:
            sys.exit(f"wer_table.py: no fine-tuned model {', '.join(sorted(missing))} under {work}")
        models = [m for m in models if m.parents[1].name.removeprefix("finetune_") in args.models]
    if not models:
        sys.exit(f"wer_table.py: no fine-tuned model under {work} (run the demo first)")
    run([sys.executable, REPO / "examples/lm/make_lm.py", "--text", manifests / "train.wrd", "--words",
         *(manifests / f"{s}.wrd" for s in ("train", "valid", *TEST_SETS)), "--pronunciations", CMUDICT,
         "--out", out / "lm", "--force"])
    lexicon = ["--lexicon", out / "lm" / "lexicon.phn.txt"]
    rows = ["| model | test set | greedy PER | lexicon WER | lexicon + LM WER |", "|---|---|---:|---:|---:|"]
    for checkpoint in models:
        name = checkpoint.parents[1].name.removeprefix("finetune_")
        decode = [BIN / "siamctc-decode", "--checkpoint", checkpoint, "--data", manifests, "--split", *TEST_SETS,
                  "--labels", "phn", "--force"]
        run([*decode, *lexicon, "--out", out / name / "lexicon"])
        run([*decode, *lexicon, "--lm", out / "lm" / "lm.arpa", "--lm-weight", args.lm_weight,
             "--word-score", args.word_score, "--out", out / name / "lm"])
        for test_set in TEST_SETS:
            alone, with_lm = (json.loads((out / name / way / f"{test_set}.json").read_text()) for way in ("lexicon", "lm"))
            rows.append(f"| {name} | {test_set} | {alone['error_rate']:.1f} | {alone['lm']['error_rate']:.1f} | "
                        f"{with_lm['lm']['error_rate']:.1f} |")
    table = "\n".join(rows) + "\n"
    write_atomic(out / "wer.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
