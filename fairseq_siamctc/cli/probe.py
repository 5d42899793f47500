"""siamctc-probe: SUPERB's phoneme recognition protocol on a frozen encoder (the paper's evaluation).

    siamctc-probe --checkpoint CKPT --data DIR --test test [--test test_real] --out OUT [--seeds 1 2 3]

trains a softmax-weighted sum of the encoder's hidden states and a linear CTC head on
``DIR/{train}.tsv`` (1.0x), keeps the head with the best PER on ``DIR/{valid}.tsv``, and decodes
every ``--test`` split and its speed copies ``DIR/{test}_sp{s}.tsv`` greedily. The checkpoint is any
kind ``siamctc-extract-features`` reads (HuBERT, WavLM, a SiamCTC training checkpoint, an export).

Two modes, the same PER: ``cached`` extracts every split's hidden states once into ``--cache``
(float16, keyed by content hash, so another seed costs only the head's training); ``streaming``
runs the frozen encoder inside the head's training loop on each batch and writes no features
(LibriSpeech: train-clean-100 alone would be a 361 GB cache for a Base encoder). ``--mode auto``
caches when the cache's estimated size is within ``--cache-budget`` GB (or is on disk already);
one line says which mode runs and why before any work.

Writes ``OUT/probe.json`` (PER per seed, test split and speed; per-utterance error counts; layer
weights), ``OUT/probe.md`` (the mean over seeds) and, after every evaluation, each seed's run state
``OUT/probe_seed{seed}.pt`` (head, optimizer, update, best dev PER and its head, random state): an
interrupted run resumes from it when run again with the same arguments. ``--force`` starts over.
One process, one device; for several GPUs run one probe per GPU (the head's updates are sequential).
"""
import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from fairseq_siamctc.models.checkpoints import CheckpointError
from fairseq_siamctc.probe import (
    DEFAULT_CACHE_BUDGET_GB,
    MODES,
    SUPERB_EPOCHS,
    ProbeConfig,
    probe_checkpoint,
)

from . import default_device
from .outputs import write_atomic


def summary_markdown(record) -> str:
    """Mean PER over the probe seeds, one row per test split, one column per speed."""
    seeds = list(record["seeds"].values())
    lines = [f"PER (%) of the probe on {record['checkpoint']}, mean of {len(seeds)} seed(s):", ""]
    for test, copies in seeds[0]["test"].items():
        speeds = list(copies)
        lines += [f"| {test} | " + " | ".join(f"{s}x" for s in speeds) + " | mean |", "|---|" + "---:|" * (len(speeds) + 1)]
        means = [float(np.mean([s["test"][test][speed]["per"] for s in seeds])) for speed in speeds]
        lines += ["| probe | " + " | ".join(f"{m:.1f}" for m in means) + f" | {np.mean(means):.1f} |", ""]
    weights = np.mean([s["layer_weights"] for s in seeds], axis=0)
    lines.append("layer weights (input, layer 1, ...): " + ", ".join(f"{w:.2f}" for w in weights))
    lines.append("valid PER: " + ", ".join(f"{s['valid_per']:.1f}" for s in seeds))
    return "\n".join(lines) + "\n"



def main(argv=None) -> int:
    defaults = ProbeConfig()
    parser = argparse.ArgumentParser(prog="siamctc-probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="HuBERT, WavLM or SiamCTC checkpoint (frozen)")
    parser.add_argument("--data", required=True, help="directory of {split}.tsv, {split}.{labels} and dict.{labels}.txt")
    parser.add_argument("--train", default="train", help="training split of the head, at 1.0x (default: train)")
    parser.add_argument("--valid", default="valid", help="split that selects the head (default: valid)")
    parser.add_argument("--test", action="append", help="test split, with its {test}_sp* copies (repeatable; default: test)")
    parser.add_argument("--labels", default="phn", help="label file extension (default: phn)")
    parser.add_argument("--out", required=True, help="output folder (probe.json, probe.md, run states probe_seed*.pt)")
    parser.add_argument("--cache", help="feature cache folder (default: OUT/../probe_cache)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="probe training seeds (default: 1)")
    parser.add_argument("--epochs", type=float, default=SUPERB_EPOCHS,
                        help=f"passes over the training split when --steps is not given (default: SUPERB's {SUPERB_EPOCHS:.1f})")
    parser.add_argument("--steps", type=int, default=0, help="updates (default: from --epochs)")
    parser.add_argument("--eval-step", type=int, default=0, help="updates between valid evaluations (default: steps / 100)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"Adam learning rate (default: SUPERB's {defaults.lr})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"utterances a batch (default: {defaults.batch_size})")
    parser.add_argument("--accumulate", type=int, default=defaults.accumulate, help=f"batches an update (default: {defaults.accumulate})")
    parser.add_argument("--mode", choices=MODES, default="auto",
                        help="cached: hidden states extracted once to --cache; streaming: the encoder runs in the "
                             "head's training loop, nothing cached; auto: cached when within --cache-budget "
                             "(default: auto)")
    parser.add_argument("--cache-budget", type=float, default=DEFAULT_CACHE_BUDGET_GB, metavar="GB",
                        help="--mode auto streams when the feature cache of all splits would pass this many GB "
                             f"(10^9 bytes) (default: {DEFAULT_CACHE_BUDGET_GB:g})")
    parser.add_argument("--device", default=default_device(),
                        help="torch device (default: cuda if available); one per run: with several GPUs, run one "
                             "probe per GPU (not data-parallel: the head's updates are sequential)")
    parser.add_argument("--force", action="store_true",
                        help="start over: replace an existing OUT/probe.json and its run states, and run states "
                             "of other settings (an unfinished run of the same arguments resumes either way)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    finished = (out / "probe.json").exists()
    if finished and not args.force:
        print(f"siamctc-probe: error: {out / 'probe.json'} exists (--force starts over)", file=sys.stderr)
        return 1
    for name in ("steps", "eval_step", "batch_size", "accumulate"):
        if getattr(args, name) < (0 if name in ("steps", "eval_step") else 1):
            print(f"siamctc-probe: error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}", file=sys.stderr)
            return 1
    if not args.cache_budget >= 0:
        print(f"siamctc-probe: error: --cache-budget must be at least 0 GB, got {args.cache_budget:g}", file=sys.stderr)
        return 1
    if out.exists() and not out.is_dir():
        print(f"siamctc-probe: error: --out {out} is a file; give a directory", file=sys.stderr)
        return 1
    cfg = ProbeConfig(lr=args.lr, batch_size=args.batch_size, accumulate=args.accumulate,
                      total_steps=args.steps, eval_step=args.eval_step)

    def start_over():
        """A forced rerun of a finished probe: its results and run states go once the inputs are
        checked, so that this run, if interrupted, resumes rather than starting over again."""
        if finished:
            states = [p for p in out.glob("probe_seed*.pt") if re.fullmatch(r"probe_seed-?\d+\.pt", p.name)]
            for path in [out / "probe.json", out / "probe.md", *states]:
                path.unlink(missing_ok=True)

    try:
        record = probe_checkpoint(args.checkpoint, args.data, args.cache or out.resolve().parent / "probe_cache",
                                  args.train, args.valid, args.test or ["test"], args.labels, args.seeds, cfg,
                                  args.epochs, args.device, mode=args.mode, cache_budget_gb=args.cache_budget,
                                  out=out, force=args.force, log=lambda line: print(f"siamctc-probe: {line}"),
                                  on_start=start_over)
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        print(f"siamctc-probe: error: {err}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "probe.json", json.dumps(record) + "\n")
    summary = summary_markdown(record)
    write_atomic(out / "probe.md", summary)
    print(summary, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
