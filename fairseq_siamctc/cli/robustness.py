"""Error rates of fine-tuned CTC models across speaking rates (paper figure 2).

    siamctc-robustness --model hubert=ft_hubert.pt --model siamctc=ft_siamctc.pt \
        --data DIR --test-set test --labels phn --out OUT

decodes ``DIR/{test_set}.tsv`` (speed 1.0) and its speed-perturbed copies
``DIR/{test_set}_sp{factor}.tsv`` (as ``siamctc-speed-testsets`` writes them) with every model, and
writes ``OUT/robustness.md`` (a markdown table), ``OUT/robustness.json`` and ``OUT/robustness.png``
(error rate against speed factor, one line per model). Hypotheses go to ``OUT/<model>/``.
"""

import argparse
import json
import os
import pathlib
import sys
from typing import Dict, Sequence

from .decode import CtcRecognizer, decode_split
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
    fig.savefig(path)
    plt.close(fig)


def evaluate(models: Dict[str, str], data: str, test_set: str, labels: str, out_dir: str,
             factors: Sequence[float] = SPEED_FACTORS, post_process_symbol: str = "none",
             device: str = "cpu") -> Dict[str, Dict[str, float]]:
    """Decodes every speed copy with every model; returns {model: {"0.8": rate, ...}}."""
    error_rates = {}
    for name, checkpoint in models.items():
        recognizer = CtcRecognizer.load(checkpoint, device)
        error_rates[name] = {
            str(float(factor)): decode_split(
                recognizer, data, speed_split(test_set, factor), labels,
                os.path.join(out_dir, name), post_process_symbol)["error_rate"]
            for factor in factors
        }
    return error_rates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT",
                        help="a fine-tuned CTC checkpoint and its name in the table; repeat")
    parser.add_argument("--data", required=True)
    parser.add_argument("--test-set", default="test")
    parser.add_argument("--labels", default="phn")
    parser.add_argument("--factors", type=float, nargs="+", default=list(SPEED_FACTORS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    models = {}
    for item in args.model:
        name, sep, checkpoint = item.partition("=")
        if not sep or not name or not checkpoint:
            parser.error(f"--model takes NAME=CHECKPOINT, got {item!r}")
        models[name] = checkpoint
    symbol = "letter" if args.labels == "ltr" else "none"
    metric = "WER" if symbol == "letter" else ("PER" if args.labels == "phn" else "error rate")
    try:
        rates = evaluate(models, args.data, args.test_set, args.labels, args.out, args.factors, symbol,
                         args.device)
    except (OSError, ValueError) as err:
        print(f"siamctc-robustness: error: {err}", file=sys.stderr)
        return 1
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rates, metric)
    (out / "robustness.md").write_text(table)
    (out / "robustness.json").write_text(json.dumps({"metric": metric, "test_set": args.test_set,
                                                     "error_rates": rates}, indent=2) + "\n")
    plot(rates, metric, f"{metric} on {args.test_set} across speaking rates", str(out / "robustness.png"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
