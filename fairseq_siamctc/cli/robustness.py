"""Error rates of fine-tuned CTC models across speaking rates (paper figure 2).

    siamctc-robustness --model hubert=ft_hubert.pt --model siamctc=ft_siamctc.pt \
        --data DIR --test-set test --labels phn --out OUT

decodes ``DIR/{test_set}.tsv`` (speed 1.0) and its speed-perturbed copies
``DIR/{test_set}_sp{factor}.tsv`` (as ``siamctc-speed-testsets`` writes them) with every model, and
writes ``OUT/robustness.md`` (a markdown table), ``OUT/robustness.json`` and ``OUT/robustness.png``
(error rate against speed factor, one line per model). Hypotheses go to ``OUT/<model>/``. Each
model is loaded once and decodes every speed copy in batches, as ``siamctc-decode`` does; the
metric (PER, WER or UER) is named as there.
"""

import argparse
import json
import os
import pathlib
import sys
from typing import Dict, Sequence

from .decode import (BATCH_SIZE, MAX_TOKENS, CtcRecognizer, add_decoding_options, decode_outputs, decode_split,
                     default_post_process, metric_name)
from .outputs import refuse_to_replace, save_figure, write_atomic
from .plotting import pyplot

SPEED_FACTORS = (0.8, 0.9, 1.0, 1.1, 1.2)


def speed_split(test_set: str, factor: float) -> str:
    return test_set if factor == 1.0 else f"{test_set}_sp{factor:g}"


def markdown_table(error_rates: Dict[str, Dict[str, float]], metric: str) -> str:
    """{model: {factor: rate}} -> a markdown table, one row per model, one column per factor."""
    factors = sorted({f for rates in error_rates.values() for f in rates}, key=float)
    lines = [f"| {metric} (%) | " + " | ".join(f"{f}x" for f in factors) + " |",
             "|---|" + "---:|" * len(factors)]
    for model, rates in error_rates.items():
        lines.append(f"| {model} | " + " | ".join(f"{rates[f]:.2f}" for f in factors) + " |")
    return "\n".join(lines) + "\n"


def plot(error_rates: Dict[str, Dict[str, float]], metric: str, title: str, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for (model, rates), marker in zip(error_rates.items(), "osD^v<>"):
        factors = sorted(rates, key=float)
        ax.plot([float(f) for f in factors], [rates[f] for f in factors], marker=marker, label=model)
    ax.set_xlabel("speed factor of the test audio (<1 slower, >1 faster)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def evaluate(models: Dict[str, str], data: str, test_set: str, labels: str, out_dir: str,
             factors: Sequence[float] = SPEED_FACTORS, post_process_symbol: str = "none",
             device: str = None, batch_size: int = BATCH_SIZE, max_tokens: int = MAX_TOKENS,
             progress: bool = True) -> Dict[str, Dict[str, float]]:
    """Decodes every speed copy with every model (each loaded once); returns {model: {"0.8": rate, ...}}."""
    error_rates = {}
    for name, checkpoint in models.items():
        recognizer = CtcRecognizer.load(checkpoint, device)
        scores = [decode_split(recognizer, data, speed_split(test_set, factor), labels,
                               os.path.join(out_dir, name), post_process_symbol, batch_size, max_tokens,
                               progress=progress)
                  for factor in factors]
        error_rates[name] = {str(float(f)): score["error_rate"] for f, score in zip(factors, scores)}
        if progress:
            seconds = sum(s["throughput"]["seconds"] for s in scores)
            audio = sum(s["throughput"]["audio_seconds"] for s in scores)
            utterances = sum(s["utterances"] for s in scores)
            print(f"{name}: {utterances} utterances ({audio:.1f} s of audio) in {seconds:.1f} s: "
                  f"{utterances / max(seconds, 1e-9):.1f} utt/s, real-time factor {seconds / max(audio, 1e-9):.3f}",
                  file=sys.stderr)
        del recognizer
    return error_rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT",
                        help="a fine-tuned CTC checkpoint and its name in the table; repeat")
    parser.add_argument("--data", required=True, help="directory of the manifests and label files")
    parser.add_argument("--test-set", default="test",
                        help="split at speed 1.0; its copies are {test_set}_sp{factor} (default: test)")
    parser.add_argument("--factors", type=float, nargs="+", default=list(SPEED_FACTORS),
                        help="speed factors to decode, 1.0 being the test set itself (default: 0.8 0.9 1.0 1.1 1.2)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="replace the results of an earlier run in --out")
    add_decoding_options(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    models = {}
    for item in args.model:
        name, sep, checkpoint = item.partition("=")
        if not sep or not name or not checkpoint:
            parser.error(f"--model takes NAME=CHECKPOINT, got {item!r}")
        if name in models:
            parser.error(f"--model: the name {name!r} is given twice")
        models[name] = checkpoint
    if args.batch_size < 1 or args.max_tokens < 1:
        parser.error("--batch-size and --max-tokens must be positive")
    symbol = args.post_process or default_post_process(args.labels)
    metric = metric_name(args.labels, symbol)
    out = pathlib.Path(args.out)
    outputs = [out / f"robustness.{suffix}" for suffix in ("md", "json", "png")]
    for name in models:
        outputs += decode_outputs(out / name, [speed_split(args.test_set, f) for f in args.factors], False)
    try:
        refuse_to_replace(outputs, args.force)
        rates = evaluate(models, args.data, args.test_set, args.labels, args.out, args.factors, symbol,
                         args.device, args.batch_size, args.max_tokens)
    except (OSError, ValueError) as err:
        print(f"siamctc-robustness: error: {err}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rates, metric)
    write_atomic(out / "robustness.md", table)
    write_atomic(out / "robustness.json", json.dumps({"metric": metric, "test_set": args.test_set,
                                                      "error_rates": rates}, indent=2) + "\n")
    plot(rates, metric, f"{metric} on {args.test_set} across speaking rates", str(out / "robustness.png"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
