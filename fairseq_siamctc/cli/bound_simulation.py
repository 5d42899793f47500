"""Checks theorem 1 of sequence-level unsupervised training on random (pr, q) pairs.

Each draw: a label-sequence prior pr(c) ~ Dirichlet(1) over all |C|^N sequences, a true emission
matrix with Dirichlet(1) rows, and a model emission ``(1 - t) * true + t * random`` with t
log-uniform in [1e-3, 1], so that the draws cover distant and close models. For every draw the
exact error mismatch D_q is compared with the theorem-1 bound, the refined bound (the same
derivation before its last relaxations) and the Pinsker form. Writes ``bound_simulation.md`` (summary
table), ``bound_scatter.png`` (D_q against the bounds, with the diagonal) and ``toy_training.md``
(the toy unsupervised training next to the bound), and prints the tables.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from fairseq_siamctc.unsupervised import theory
from fairseq_siamctc.unsupervised.toy import records_to_markdown, run_toy_experiment

BOUNDS = {"theorem1_bound": "theorem 1", "refined_bound": "refined", "pinsker_bound": "Pinsker form"}


def draw_pair(num_labels: int, num_obs: int, length: int, generator: torch.Generator):
    """One random (prior, true emission, model emission) triple, float64."""

    def dirichlet(shape):
        # -log(uniform) is Exp(1) = Gamma(1): normalised, a Dirichlet(1) sample
        sample = -torch.rand(shape, generator=generator, dtype=torch.float64).clamp_min(1e-300).log()
        return sample / sample.sum(-1, keepdim=True)

    prior = dirichlet((num_labels**length,))
    true_emission = dirichlet((num_labels, num_obs))
    mix = 10 ** (-3 * torch.rand((), generator=generator, dtype=torch.float64))
    model_emission = (1 - mix) * true_emission + mix * dirichlet((num_labels, num_obs))
    return prior, true_emission, model_emission


def simulate(num_draws: int, num_labels: int, num_obs: int, length: int, seed: int):
    """Evaluates theorem 1 on ``num_draws`` random pairs; returns the reports and the count of
    draws skipped because condition 2 failed."""
    generator = torch.Generator().manual_seed(seed)
    reports, skipped = [], 0
    for _ in range(num_draws):
        try:
            reports.append(theory.evaluate_pair(*draw_pair(num_labels, num_obs, length, generator), length))
        except ValueError as error:
            if "condition 2" not in str(error):
                raise
            skipped += 1
    return reports, skipped


def _quantiles(values: torch.Tensor) -> str:
    points = torch.quantile(values, torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0], dtype=values.dtype))
    return " | ".join(f"{v:.3g}" for v in points.tolist())


def summary_markdown(reports, skipped: int, num_labels: int, num_obs: int, length: int, seed: int) -> str:
    """The summary table of a simulation."""
    column = {name: torch.tensor([getattr(r, name) for r in reports], dtype=torch.float64) for name in reports[0].__dataclass_fields__}
    mismatch = column["error_mismatch"]
    lines = [
        f"Theorem 1 on {len(reports)} random pairs (|C|={num_labels}, |X|={num_obs}, N={length}, seed {seed}; "
        f"{skipped} draws skipped for violating condition 2). "
        f"{int((mismatch > 0).sum())} draws have a nonzero error mismatch.",
        "",
        "| quantity | min | 5% | median | 95% | max |",
        "|---|---:|---:|---:|---:|---:|",
        f"| error mismatch D_q | {_quantiles(mismatch)} |",
        f"| sum_x abs(pr(x) - q(x)) | {_quantiles(column['l1_distance'])} |",
        f"| smallest singular value of P_C | {_quantiles(column['smallest_singular_value'])} |",
        f"| norm(P_C^+)_1 | {_quantiles(column['pinv_norm1'])} |",
    ]
    for name, label in BOUNDS.items():
        lines.append(f"| {label} bound | {_quantiles(column[name])} |")
    for name, label in BOUNDS.items():
        positive = column[name] > 0
        lines.append(f"| D_q / {label} bound (bound > 0) | {_quantiles(mismatch[positive] / column[name][positive])} |")
    lines += ["", "| bound | broken draws (D_q > bound) | vacuous draws (bound >= 1) |", "|---|---:|---:|"]
    for name, label in BOUNDS.items():
        broken = int((mismatch > column[name] * (1 + 1e-9) + 1e-12).sum())
        lines.append(f"| {label} | {broken} | {int((column[name] >= 1).sum())} |")
    return "\n".join(lines) + "\n"


def count_broken(reports) -> int:
    """Draws where D_q exceeds any of the bounds (beyond rounding)."""
    return sum(
        any(r.error_mismatch > getattr(r, name) * (1 + 1e-9) + 1e-12 for name in BOUNDS) for r in reports
    )


def scatter_plot(reports, path: Path) -> None:
    """D_q against the theorem-1 and refined bounds (log-log), with the diagonal D_q = bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in reports if r.error_mismatch > 0]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for axis, name in zip(axes, ("theorem1_bound", "refined_bound")):
        bounds = [getattr(r, name) for r in shown]
        axis.scatter(bounds, [r.error_mismatch for r in shown], s=6, alpha=0.5)
        low = min(min(bounds), min(r.error_mismatch for r in shown))
        high = max(bounds)
        axis.plot([low, high], [low, high], color="black", linewidth=1, label="D_q = bound")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel(f"{BOUNDS[name]} bound")
        axis.legend(loc="upper left")
    axes[0].set_ylabel("classification-error mismatch D_q")
    figure.suptitle(
        f"{len(shown)} of {len(reports)} random draws with D_q > 0 (all points must lie below the diagonal)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="results/bound_simulation", help="where the tables and the plot go")
    parser.add_argument("--draws", type=int, default=1000, help="number of random (pr, q) pairs")
    parser.add_argument("--labels", type=int, default=3, help="|C|")
    parser.add_argument("--observations", type=int, default=4, help="|X|")
    parser.add_argument("--length", type=int, default=3, help="N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--toy-steps", type=int, default=300, help="updates of the toy training; 0 skips it")
    args = parser.parse_args(argv)
    if min(args.draws, args.labels, args.observations, args.length) < 1:
        parser.error("--draws, --labels, --observations and --length must be positive")
    if args.labels**args.length * args.observations**args.length > 10**7:
        parser.error("|C|^N * |X|^N above 1e7: the exact enumeration would not fit; use smaller sizes")
    torch.set_num_threads(1)
    # fairseq's text_to_speech task sets the root logger to DEBUG on import; keep matplotlib quiet
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    reports, skipped = simulate(args.draws, args.labels, args.observations, args.length, args.seed)
    if not reports:
        raise SystemExit(f"all {args.draws} draws violated condition 2 (N={args.length} < |C|={args.labels}?)")
    summary = summary_markdown(reports, skipped, args.labels, args.observations, args.length, args.seed)
    (output_dir / "bound_simulation.md").write_text(summary)
    if any(r.error_mismatch > 0 for r in reports):
        scatter_plot(reports, output_dir / "bound_scatter.png")
    print(summary)
    if args.toy_steps > 0:
        toy = records_to_markdown(run_toy_experiment(steps=args.toy_steps, seed=args.seed))
        (output_dir / "toy_training.md").write_text(toy)
        print(toy, end="")
    broken = count_broken(reports)
    if broken:
        raise SystemExit(f"{broken} draws break the bound: a bug or a misreading of theorem 1")


if __name__ == "__main__":
    main()
