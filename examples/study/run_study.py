"""Does SiamCTC help? Seed vs SiamCTC vs time-matched continued pretraining, many seeds, intervals.

    make study                                  # python examples/study/run_study.py --size study
    python examples/study/run_study.py --ablation --temperatures 0.5 0.1 --dot-temperatures 2

Stages (each cached under ``--data-root`` and skipped when its output exists; ``--force`` reruns):

1. corpus, units         ``examples/demo/run_demo.py``'s stages (shared with ``make demo``);
2. seed                  one training chain per ``--seeds`` seed s: the seed encoder, the demo's HuBERT
                         pretraining with seed s (every model of chain s starts from it and trains
                         with seed s, so the intervals cover the seed encoder's variance too);
3. siamctc               SiamCTC continued training of each chain's seed encoder, for each variant
                         (``all`` terms; with ``--ablation`` also CTC only, CTC + KLD,
                         CTC + TINCE: the paper's table 2; ``--temperatures`` adds ``all`` at other
                         alignment temperatures, ``--dot-temperatures`` with dot-product
                         attention scores), each exported to a HuBERT checkpoint;
4. control               each chain's seed encoder after as many more HuBERT pretraining updates as
                         SiamCTC's run takes in time;
5. probe                 ``siamctc-probe`` (SUPERB's PR protocol, frozen encoder) on every encoder,
                         ``--probe-seeds`` heads each, on ``test`` and ``test_real`` and their speed copies;
6. finetune              the demo's fine-tuning and greedy decoding of every encoder (``--no-finetune``
                         skips it);
7. report                per evaluation, test set and speed: the PER of each kind of encoder (mean
                         over chains and probe seeds) and the paired differences SiamCTC - seed and
                         SiamCTC - control with 95 % bootstrap intervals over test utterances and
                         whole chains (``fairseq_siamctc.bootstrap``, ``paired_seeds``).

Writes ``study.json``, ``study.md`` and ``study.png`` (PER against speed, 95 % intervals) to ``--out``
(default ``results/study``), with every stage's log in ``--out/logs``.
"""

import argparse
import itertools
import json
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples" / "demo"))
from run_demo import BIN, SPEEDS, Demo, check_recipe, recipe_record  # noqa: E402  (the demo's stages)

from fairseq_siamctc.cli.outputs import save_figure, write_atomic  # noqa: E402

TEST_SETS = ("test", "test_real")
# the paper's table 2: which terms each variant keeps
ABLATION = {
    "ctc": ["criterion.alpha=0", "criterion.beta=0"],
    "ctc_kld": ["criterion.beta=0"],
    "ctc_tince": ["criterion.alpha=0"],
}


def variants(ablation: bool, temperatures, dot_temperatures=()) -> dict:
    """{variant name: criterion overrides}: ``all`` (the paper's objective) first."""
    found = {"all": []}
    if ablation:
        found.update(ABLATION)
    for t in temperatures or ():
        found[f"all_t{t:g}"] = [f"criterion.temperature={t}"]
    for t in dot_temperatures or ():
        found[f"all_dot_t{t:g}"] = ["criterion.similarity=dot", f"criterion.temperature={t}"]
    return found


class Study:
    def __init__(self, args):
        self.args = args
        self.demo = Demo(args.size, args.out, args.data_root, args.force, control=False)
        self.settings = self.demo.settings = dict(self.demo.settings)
        for key in ("seed_updates", "siamctc_updates", "control_updates"):
            if getattr(args, key) is not None:
                self.settings[key] = getattr(args, key)
        self.work = args.data_root / ("study" if args.size == "study" else f"study_{args.size}")
        self.work.mkdir(parents=True, exist_ok=True)
        self.variants = variants(args.ablation, args.temperatures, args.dot_temperatures)
        self.seconds = {}

    # -- encoders ----------------------------------------------------------------------------
    def seed_checkpoint(self, seed) -> pathlib.Path:
        return self.work / f"seed_s{seed}" / "checkpoints" / "checkpoint_last.pt"

    def encoders(self) -> dict:
        """{name: (group, chain seed, checkpoint)}, each group's models in the order of ``--seeds``."""
        found = {f"seed_s{seed}": ("seed", seed, self.seed_checkpoint(seed)) for seed in self.args.seeds}
        for variant in self.variants:
            for seed in self.args.seeds:
                found[f"siamctc_{variant}_s{seed}"] = (f"siamctc_{variant}", seed, self.work / f"siamctc_{variant}_s{seed}.pt")
        if not self.args.no_control:
            for seed in self.args.seeds:
                found[f"control_s{seed}"] = ("control", seed, self.work / f"control_s{seed}" / "checkpoints" / "checkpoint_last.pt")
        return found

    def in_pairs(self, jobs):
        """Runs (name, start) jobs two at a time, one thread each: the 2-core machine's best."""
        for i in range(0, len(jobs), 2):
            procs = [start() for _, start in jobs[i: i + 2]]
            for proc in procs:
                self.demo.wait(proc)
            print(f"   done: {', '.join(name for name, _ in jobs[i: i + 2])}", flush=True)

    def train_seeds(self):
        jobs = [(f"seed_s{seed}", lambda seed=seed: self.demo.hydra_train(
                    f"seed_s{seed}", "examples/demo", "seed_hubert", self.work / f"seed_s{seed}",
                    [*self.demo.seed_overrides(), f"common.seed={seed}"], threads=1, background=True))
                for seed in self.args.seeds if not self.seed_checkpoint(seed).exists() or self.args.force]
        self.in_pairs(jobs)

    def train_siamctc(self):
        jobs = []
        for variant, overrides in self.variants.items():
            for seed in self.args.seeds:
                name = f"siamctc_{variant}_s{seed}"
                if (self.work / f"{name}.pt").exists() and not self.args.force:
                    continue
                jobs.append((name, lambda name=name, seed=seed, overrides=overrides: self.demo.hydra_train(
                    name, "examples/siamctc", "tiny", self.work / name, [
                        f"task.data={self.demo.manifests}", f"model.encoder_path={self.seed_checkpoint(seed)}",
                        f"optimization.max_update={self.settings['siamctc_updates']}",
                        f"dataset.batch_size={self.settings['batch_size']}",
                        f"lr_scheduler.warmup_updates={max(1, self.settings['siamctc_updates'] // 5)}",
                        f"common.seed={seed}", "dataset.num_workers=0", *self.args.siamctc_override, *overrides,
                    ], threads=1, background=True)))
        self.in_pairs(jobs)
        for name, _ in jobs:
            self.demo.run(f"export_{name}", [BIN / "siamctc-export", self.work / name / "checkpoints" / "checkpoint_last.pt",
                                             self.work / f"{name}.pt"])

    def train_control(self):
        updates = self.settings["control_updates"]
        jobs = []
        for seed in self.args.seeds:
            name = f"control_s{seed}"
            if (self.work / name / "checkpoints" / "checkpoint_last.pt").exists() and not self.args.force:
                continue
            jobs.append((name, lambda name=name, seed=seed: self.demo.hydra_train(
                name, "examples/demo", "seed_hubert", self.work / name,
                [*self.demo.control_overrides(updates, self.seed_checkpoint(seed)), f"common.seed={seed}"],
                threads=1, background=True)))
        self.in_pairs(jobs)

    # -- evaluations ---------------------------------------------------------------------------
    def probe(self):
        import torch

        from fairseq_siamctc.probe import ProbeConfig, probe_checkpoint

        torch.set_num_threads(2)
        folder = self.args.out / "probe"
        folder.mkdir(parents=True, exist_ok=True)
        for name, (_, _, checkpoint) in self.encoders().items():
            target = folder / f"{name}.json"
            if target.exists() and not self.args.force:
                continue
            start = time.time()
            record = probe_checkpoint(checkpoint, self.demo.manifests, self.args.data_root / "probe_cache",
                                      test_splits=TEST_SETS, seeds=self.args.probe_seeds,
                                      cfg=ProbeConfig(total_steps=0, eval_step=0), epochs=self.args.probe_epochs)
            write_atomic(target, json.dumps(record) + "\n")
            means = {t: np.mean([s["test"][t]["1.0"]["per"] for s in record["seeds"].values()]) for t in TEST_SETS}
            print(f"   probe {name}: PER at 1.0x " + ", ".join(f"{t} {v:.1f}" for t, v in means.items())
                  + f" ({time.time() - start:.0f} s)", flush=True)

    def finetuned(self, name):
        return self.work / f"finetune_{name}" / "checkpoints" / "checkpoint_last.pt"

    def finetune(self):
        jobs = []
        for name, (_, _, encoder) in self.encoders().items():
            if self.finetuned(name).exists() and not self.args.force:
                continue
            jobs.append((name, lambda name=name, encoder=encoder: self.demo.hydra_train(
                f"finetune_{name}", "examples/finetune", "tiny_phn", self.work / f"finetune_{name}", [
                    f"task.data={self.demo.manifests}", f"model.w2v_path={encoder}",
                    f"optimization.max_update={self.settings['finetune_updates']}",
                    f"dataset.max_tokens={self.settings['max_tokens']}", "common.seed=1",
                ], threads=1, background=True)))
        self.in_pairs(jobs)
        for name in self.encoders():
            for test_set in TEST_SETS:
                out = self.work / f"eval_{name}" / test_set
                if (out / "robustness.json").exists() and not self.args.force:
                    continue
                self.demo.run(f"decode_{name}_{test_set}", [
                    BIN / "siamctc-robustness", "--model", f"{name}={self.finetuned(name)}", "--data",
                    self.demo.manifests, "--test-set", test_set, "--labels", "phn", "--out", out, "--force"])

    # -- per-utterance errors ----------------------------------------------------------------
    def probe_errors(self, name, test_set, speed):
        """(U,) errors averaged over probe seeds, (U,) reference lengths."""
        record = json.loads((self.args.out / "probe" / f"{name}.json").read_text())
        scored = [s["test"][test_set][speed] for s in record["seeds"].values()]
        return np.mean([s["errors"] for s in scored], axis=0), np.array(scored[0]["lengths"])

    def finetune_errors(self, name, test_set, speed):
        import editdistance

        split = test_set if speed == "1.0" else f"{test_set}_sp{float(speed):g}"
        folder = self.work / f"eval_{name}" / test_set / name
        hyps = (folder / f"{split}.hyp").read_text(encoding="utf-8").split("\n")
        refs = (folder / f"{split}.ref").read_text(encoding="utf-8").rstrip("\n").split("\n")
        errors = [editdistance.eval(h.split(), r.split()) for h, r in zip(hyps, refs)]
        return np.array(errors, dtype=np.float64), np.array([len(r.split()) for r in refs])

    def report(self, started):
        results = {"settings": {**self.settings, "seeds": self.args.seeds, "probe_seeds": self.args.probe_seeds,
                                "probe_epochs": self.args.probe_epochs, "variants": self.variants,
                                "size": self.args.size, "siamctc_override": self.args.siamctc_override},
                   "evaluations": {}}
        methods = {"probe": self.probe_errors}
        if not self.args.no_finetune:
            methods["finetune"] = self.finetune_errors
        for method, errors_of in methods.items():
            results["evaluations"][method] = {t: summarise(self.encoders(), errors_of, t) for t in TEST_SETS}
        # the number recipes are chosen on: the probe's valid PER, never a test set's
        valid = {}
        for name, (group, _, _) in self.encoders().items():
            record = json.loads((self.args.out / "probe" / f"{name}.json").read_text())
            valid.setdefault(group, []).extend(s["valid_per"] for s in record["seeds"].values())
        results["probe_valid_per"] = {group: float(np.mean(v)) for group, v in valid.items()}
        self.seconds["total"] = round(time.time() - started, 1)
        results["stage_seconds"] = self.seconds
        write_atomic(self.args.out / "study.json", json.dumps(results, indent=2) + "\n")
        text = study_markdown(results)
        write_atomic(self.args.out / "study.md", text)
        plot_study(results, self.args.out / "study.png")
        print(text)

    def stage(self, name, function):
        start = time.time()
        print(f"== {name}", flush=True)
        function()
        self.seconds[name] = round(time.time() - start, 1)
        print(f"   {name}: {self.seconds[name]:.0f} s", flush=True)


def summarise(encoders, errors_of, test_set):
    """Per speed (and over all speeds): each group's PER with its interval, the differences."""
    from fairseq_siamctc.bootstrap import group_error_rate, paired_difference

    groups = {}
    for name, (group, _, _) in encoders.items():
        groups.setdefault(group, []).append(name)
    table = {}
    pooled = {g: 0 for g in groups}
    pooled_lengths = 0
    for speed in SPEEDS:
        errors, lengths = {}, None
        for group, names in groups.items():
            rows = [errors_of(n, test_set, speed) for n in names]
            errors[group] = np.stack([r[0] for r in rows])
            lengths = rows[0][1]
            pooled[group] = pooled[group] + errors[group]
        pooled_lengths = pooled_lengths + lengths
        table[speed] = compare(errors, lengths, group_error_rate, paired_difference)
    # the same utterances at every speed: summed errors over summed lengths = the mean of the 5 PERs
    table["mean"] = compare(pooled, pooled_lengths, group_error_rate, paired_difference)
    return table


def compare(errors, lengths, group_error_rate, paired_difference):
    zero = np.zeros((1, len(lengths)))
    row = {"per": {}, "diff": {}, "utterances": int(len(lengths))}
    for group, e in errors.items():
        interval = paired_difference(e, zero, lengths)  # the group's own PER with its interval
        row["per"][group] = {"per": group_error_rate(e, lengths), "low": interval["low"], "high": interval["high"],
                             "models": int(e.shape[0])}
    for group in errors:
        if not group.startswith("siamctc"):
            continue
        for other in ("seed", "control"):
            if other in errors:
                # row s of every group is chain s: drawn together
                diff = paired_difference(errors[group], errors[other], lengths, paired_seeds=True)
                diff["chains"] = [group_error_rate(a, lengths) - group_error_rate(b, lengths)
                                  for a, b in zip(errors[group], errors[other])]
                row["diff"][f"{group} - {other}"] = diff
    return row


def study_markdown(results) -> str:
    s = results["settings"]
    lines = [f"SiamCTC study ({s['size']} built-in corpus): PER (%), mean over {len(s['seeds'])} training chains "
             f"(seeds {' '.join(map(str, s['seeds']))}: each a seed encoder and the models trained from it) and "
             f"{len(s['probe_seeds'])} probe seeds; [95 % bootstrap interval over test utterances and chains]", ""]
    columns = list(SPEEDS) + ["mean"]
    for method, tests in results["evaluations"].items():
        for test_set, table in tests.items():
            n = table["1.0"]["utterances"]
            lines += [f"### {method}, {test_set} ({n} utterances)", "",
                      "| | " + " | ".join(f"{c}x" if c != "mean" else c for c in columns) + " |",
                      "|---|" + "---:|" * len(columns)]
            for group in table["1.0"]["per"]:
                lines.append(f"| {group} | " + " | ".join(f"{table[c]['per'][group]['per']:.1f}" for c in columns) + " |")
            for diff in table["1.0"]["diff"]:
                cells = [table[c]["diff"][diff] for c in columns]
                lines.append(f"| {diff} | " + " | ".join(f"{d['diff']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]" for d in cells) + " |")
            chains = [f"{diff} " + ", ".join(f"{d:+.1f} (s{seed})" for d, seed in zip(v["chains"], s["seeds"]))
                      for diff, v in table["mean"]["diff"].items() if "chains" in v]
            if chains:
                lines.append("\nPer chain, mean over speeds: " + "; ".join(chains))
            seed_mean = table["mean"]["per"].get("seed", {}).get("per")
            for group, v in table["mean"]["per"].items():
                if group.startswith("siamctc") and seed_mean:
                    lines.append(f"\n{group}: mean PER {v['per'] / seed_mean:.2f} x the seed's")
            lines.append("")
    if "probe_valid_per" in results:
        lines.append("Probe PER on valid (for choosing recipes): "
                     + ", ".join(f"{g} {v:.1f}" for g, v in results["probe_valid_per"].items()) + "\n")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in results["stage_seconds"].items())
    lines.append(f"Wall time: {stages}.")
    return "\n".join(lines) + "\n"


def plot_study(results, path):
    from fairseq_siamctc.cli.plotting import pyplot

    plt = pyplot()
    panels = [(m, t) for m, tests in results["evaluations"].items() for t in tests]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=120, squeeze=False)
    speeds = [float(s) for s in SPEEDS]
    for ax, (method, test_set) in zip(axes[0], panels):
        table = results["evaluations"][method][test_set]
        for group, marker in zip(table["1.0"]["per"], itertools.cycle("osD^v<>p*")):
            per = np.array([table[s]["per"][group]["per"] for s in SPEEDS])
            low = np.array([table[s]["per"][group]["low"] for s in SPEEDS])
            high = np.array([table[s]["per"][group]["high"] for s in SPEEDS])
            ax.errorbar(speeds, per, yerr=[per - low, high - per], marker=marker, capsize=3, label=group)
        ax.set_title(f"{method}, {test_set}")
        ax.set_xlabel("speed factor")
        ax.set_ylabel("PER (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "small", "study"), default="study",
                        help="built-in corpus size (default: study, the small corpus with 300 test utterances)")
    parser.add_argument("--out", type=pathlib.Path, help="results folder (default results/study[_tiny])")
    parser.add_argument("--data-root", type=pathlib.Path, default=REPO / "data",
                        help="where the corpus, the models and the feature cache go (default: data/)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2],
                        help="training chains, one per seed s: the seed encoder pretrained with seed s, and "
                             "SiamCTC and the control trained from it with seed s (default 1 2; a second "
                             "independent run takes others, e.g. 3 4)")
    parser.add_argument("--probe-seeds", type=int, nargs="+", default=[1, 2, 3], help="probe head seeds per encoder")
    parser.add_argument("--probe-epochs", type=float, default=30.0,
                        help="passes of the probe over the training split (SUPERB: 112; default 30 to fit 2 hours)")
    parser.add_argument("--ablation", action="store_true", help="also CTC only, CTC + KLD, CTC + TINCE (paper table 2)")
    parser.add_argument("--temperatures", type=float, nargs="*", help="also the full objective at these alignment temperatures")
    parser.add_argument("--dot-temperatures", type=float, nargs="*",
                        help="also the full objective with dot-product attention scores (the other reading of the "
                             "paper) at these temperatures")
    parser.add_argument("--seed-updates", type=int,
                        help="HuBERT pretraining updates of the seed encoder (default: the demo's; a data root "
                             "keeps the recipe it was trained with, so a new value needs a new --data-root)")
    parser.add_argument("--siamctc-updates", type=int, help="SiamCTC updates per run (default: the demo's)")
    parser.add_argument("--control-updates", type=int,
                        help="control updates per run (default: the demo's, time-matched to its SiamCTC updates)")
    parser.add_argument("--siamctc-override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more Hydra overrides of every SiamCTC run (e.g. optimization.lr=[5e-5]); "
                             "choose them on the probe's valid PER, never on test")
    parser.add_argument("--no-control", action="store_true", help="skip the continued-pretraining control")
    parser.add_argument("--no-finetune", action="store_true", help="probe only, skip fine-tuning")
    parser.add_argument("--force", action="store_true",
                        help="rerun stages whose output exists (models are cached by name, and a data root "
                             "refuses another recipe: after changing one, use --force or another --data-root)")
    args = parser.parse_args(argv)
    args.data_root = args.data_root.resolve()
    args.out = (args.out or REPO / ("results/study" if args.size == "study" else f"results/study_{args.size}")).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    study = Study(args)
    check_recipe(study.work / "recipe.json",
                 # "chains": SiamCTC and the control start from their chain's own seed encoder, not the
                 # demo's one seed as before, so a data root of the old design is refused
                 recipe_record(study.settings, {"siamctc_override": args.siamctc_override, "design": "chains"}),
                 args.force)
    demo = study.demo
    demo.stage("corpus", demo.corpus / "corpus.json", demo.build_corpus)
    demo.stage("units", demo.work / "units" / "dict.km.txt", demo.units)
    study.seconds.update(demo.seconds)
    study.stage("seed", study.train_seeds)
    study.stage("siamctc", study.train_siamctc)
    if not args.no_control:
        study.stage("control", study.train_control)
    study.stage("probe", study.probe)
    if not args.no_finetune:
        study.stage("finetune", study.finetune)
    study.report(started)


if __name__ == "__main__":
    main()
