"""Checks theorem 1 of sequence-level unsupervised training on random (pr, q) pairs.

Each draw: a label-sequence prior pr(c) ~ Dirichlet(1) over all |C|^N sequences, a true emission
matrix with Dirichlet(1) rows, and a model emission ``(1 - t) * true + t * random`` with t
log-uniform in [1e-3, 1], so that the draws cover distant and close models. For every draw the
exact error mismatch D_q is compared with the theorem-1 bound, the refined bound (the same
derivation before its last relaxations) and the Pinsker form. Writes ``bound_simulation.md`` (summary
table), ``bound_scatter.png`` (D_q against the bounds, with the diagonal), ``toy_training.md``
(the toy unsupervised training next to the bound, with and without condition 2) and, for a label file, ``label_lm_condition2.md``
(condition 2 and the bound's constant for its n-gram LM), and prints them.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from fairseq_siamctc.unsupervised import theory
from fairseq_siamctc.unsupervised.label_lm import NGramLabelLM, read_label_sequences
from fairseq_siamctc.cli.plotting import pyplot
from fairseq_siamctc.unsupervised.toy import DEFAULT_START, records_to_markdown, run_toy_experiment, stationary_start

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
    plt = pyplot()
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


def lm_condition2_markdown(label_text: str, order: int, length: int) -> str:
    """Condition 2 and the bound's constant for the n-gram LM of a label file (e.g. a ``.phn`` file).

    ``length`` 0 takes the median number of labels a line.
    """
    symbols, sequences = read_label_sequences(label_text)
    if length <= 0:
        length = int(statistics.median(len(s) for s in sequences))
    lm = NGramLabelLM.estimate(sequences, len(symbols), order=order)
    label_marginals = theory.lm_label_marginals(lm.log_init, lm.log_trans, lm.log_final, lm.state_label, len(symbols), length)
    heading = f"Condition 2 for the {order}-gram LM of {Path(label_text).name} ({len(symbols)} labels, N={length}): "
    try:
        singular_values = theory.check_identifiability(label_marginals)
    except ValueError as violation:
        return heading + f"{violation}\n"
    norm = theory.pinv_norm1(label_marginals).item()
    return heading + (
        f"smallest singular value of P_C {singular_values[-1].item():.3g}, norm(P_C^+)_1 = {norm:.4g}, "
        f"so D_q <= {length**2 * norm:.4g} * sum_x abs(pr(x) - q(x)) and D_q^2 <= {theory.pinsker_beta(label_marginals).item():.4g} * KL.\n"
    )


def toy_markdown(steps: int, seed: int, num_seeds: int) -> str:
    """The toy training with the default start (condition 2 holds) step by step, and the final state
    over several seeds with the default and with a stationary start (condition 2 violated)."""
    lines = [
        "Toy training (|C|=3, |X|=4, N=4, 2000 sequences), bigram LM with its default start (condition 2 holds):",
        "",
        records_to_markdown(run_toy_experiment(steps=steps, seed=seed)),
        f"After {steps} updates, by seed; the stationary start violates condition 2 (no bound):",
        "",
        "| start | seed | KL(pr(x)||q(x)) | mismatch D_q | theorem-1 bound |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, start in (("default", DEFAULT_START), ("stationary", stationary_start())):
        for run_seed in range(seed, seed + num_seeds):
            final = run_toy_experiment(steps=steps, eval_every=steps, seed=run_seed, start=start)[-1]
            lines.append(f"| {name} | {run_seed} | {final.kl_divergence:.2e} | {final.error_mismatch:.4f} | {final.theorem1_bound:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="results/bound_simulation", help="where the tables and the plot go")
    parser.add_argument("--draws", type=int, default=1000, help="number of random (pr, q) pairs")
    parser.add_argument("--labels", type=int, default=3, help="|C|, the number of labels (default 3)")
    parser.add_argument("--observations", type=int, default=4, help="|X|, the number of observation units (default 4)")
    parser.add_argument("--length", type=int, default=3, help="N, the sequence length (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draws (default 0)")
    parser.add_argument("--toy-steps", type=int, default=300, help="updates of the toy training; 0 skips it")
    parser.add_argument("--toy-seeds", type=int, default=5, help="seeds of the toy training's final-state table")
    parser.add_argument("--label-text", help="label file (e.g. train.phn): also check condition 2 for its n-gram LM")
    parser.add_argument("--lm-order", type=int, default=2, help="n of the n-gram LM of --label-text")
    parser.add_argument("--lm-length", type=int, default=0, help="N for --label-text; 0: the median labels a line")
    args = parser.parse_args(argv)
    if min(args.draws, args.labels, args.observations, args.length) < 1:
        parser.error("--draws, --labels, --observations and --length must be positive")
    if args.labels**args.length * args.observations**args.length > 10**7:
        parser.error("|C|^N * |X|^N above 1e7: the exact enumeration would not fit; use smaller sizes")
    if args.label_text and not Path(args.label_text).is_file():
        parser.error(f"--label-text {args.label_text}: file not found")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        parser.error(f"--output-dir {output_dir}: exists and is not a directory")
    torch.set_num_threads(1)
    output_dir.mkdir(parents=True, exist_ok=True)

    reports, skipped = simulate(args.draws, args.labels, args.observations, args.length, args.seed)
    if not reports:
        raise SystemExit(f"siamctc-bound-simulation: error: all {args.draws} draws violated condition 2 (N={args.length} < |C|={args.labels}?)")
    summary = summary_markdown(reports, skipped, args.labels, args.observations, args.length, args.seed)
    (output_dir / "bound_simulation.md").write_text(summary)
    if any(r.error_mismatch > 0 for r in reports):
        scatter_plot(reports, output_dir / "bound_scatter.png")
    print(summary)
    if args.toy_steps > 0:
        toy = toy_markdown(args.toy_steps, args.seed, args.toy_seeds)
        (output_dir / "toy_training.md").write_text(toy)
        print(toy, end="")
    if args.label_text:
        condition2 = lm_condition2_markdown(args.label_text, args.lm_order, args.lm_length)
        (output_dir / "label_lm_condition2.md").write_text(condition2)
        print(condition2, end="")
    broken = count_broken(reports)
    if broken:
        raise SystemExit(f"siamctc-bound-simulation: error: {broken} draws break the bound: a bug or a misreading of theorem 1")


if __name__ == "__main__":
    main()
