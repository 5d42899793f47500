"""The whole SiamCTC chain on the built-in corpus, on a CPU: ``make demo`` (``DEMO_SIZE=tiny|small``).

1. corpus     build the built-in corpus (text-to-speech voices, real test speech, speed copies);
2. units      MFCC k-means units with fairseq's ``simple_kmeans`` scripts (HuBERT's first iteration);
3. seed       pretrain a small HuBERT on them with fairseq's stock ``hubert_pretraining``: the stand-in
              for ``hubert_base_ls960.pt``;
4. siamctc    continue training it with SiamCTC (``examples/siamctc/tiny.yaml``), then export it as
              an ordinary HuBERT checkpoint (``siamctc-export``);
5. finetune   fine-tune the seed and the SiamCTC encoder for phoneme recognition with identical
              settings and seeds (``examples/finetune/tiny_phn.yaml``, fairseq's stock CTC recipe);
6. evaluate   decode ``test`` and ``test_real`` and their speed copies (0.8x to 1.2x) greedily, and
              plot the error rates and one SiamCTC alignment.

With ``--control`` a third encoder, ``continued``, goes through steps 5 and 6: the seed after as
many more HuBERT pretraining updates as SiamCTC's run takes in time, with SiamCTC's learning rate
and schedule; it tells what training longer alone gives (about 4 minutes more for ``small``).

Writes ``results.json``, ``results.md``, ``robustness.png``, ``robustness_real.png`` and
``alignment.png`` to ``--out`` (default ``results/demo``, or ``results/demo_tiny``), and keeps the
logs of every stage in ``--out/logs``. Stages whose output exists are not run again (``--force``
reruns everything); the corpus is shared with ``make corpus`` under ``data/``.
"""

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1].parent
PYTHON = sys.executable
BIN = pathlib.Path(PYTHON).parent
SPEEDS = ("0.8", "0.9", "1.0", "1.1", "1.2")

# Sized so that `small` fits 20 minutes on 2 cores; `tiny` only checks the chain, in a few minutes.
SIZES = {
    "tiny": dict(corpus="builtin_tiny", work="demo_tiny", clusters=20, seed_updates=20,
                 siamctc_updates=6, control_updates=14, finetune_updates=50, warmup=2,
                 max_tokens=100000, batch_size=4),
    # seed_updates: 1200, not 800: the longer seed probes better on valid (docs/study.md, "A stronger seed");
    # control_updates: about as many seed updates as fit in the time of SiamCTC's updates on 2 cores
    # (fresh-clone demos: 1,200 seed updates trained in 374 to 405 s, SiamCTC's 150 in 162 to 198 s;
    # 550 take 171 to 186 s, within about 6 % of SiamCTC's time either way)
    "small": dict(corpus="builtin", work="demo", clusters=100, seed_updates=1200,
                  siamctc_updates=150, control_updates=550, finetune_updates=700, warmup=80,
                  max_tokens=160000, batch_size=8),
}
# the study's testbed: the small corpus with 300 held-out test utterances, the same recipe
SIZES["study"] = dict(SIZES["small"], corpus="builtin_study", work="demo_study")
# the training configs of the stages, part of the recipe that cached models were trained with
RECIPE_CONFIGS = ("examples/demo/seed_hubert.yaml", "examples/siamctc/tiny.yaml", "examples/finetune/tiny_phn.yaml")


def recipe_record(settings: dict, extra: dict = None) -> dict:
    """The recipe of a work folder's models: the size's settings, ``extra`` options and the parsed
    training configs (parsed, so that an edited comment is no change)."""
    import yaml

    configs = {pathlib.Path(name).name: yaml.safe_load((REPO / name).read_text()) for name in RECIPE_CONFIGS}
    return json.loads(json.dumps({"settings": settings, **(extra or {}), "configs": configs}))


def flatten(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def check_recipe(path: pathlib.Path, recipe: dict, force: bool) -> None:
    """Stages are cached by file name only, so models trained with another recipe would be reused as
    if they were this one's: refuse in one line naming what differs. Records the recipe when there is
    none yet, and after ``force`` (which retrains every stage)."""
    if path.exists() and not force:
        recorded, current = flatten(json.loads(path.read_text())), flatten(recipe)
        differs = sorted(key for key in recorded.keys() | current.keys() if recorded.get(key) != current.get(key))
        if differs:
            shown = ", ".join(f"{key}: {recorded.get(key)} -> {current.get(key)}" for key in differs[:4])
            more = f" and {len(differs) - 4} more" if len(differs) > 4 else ""
            raise SystemExit(f"{path}: the models there were trained with another recipe ({shown}{more}); "
                             "use another --data-root, or --force to train them again")
        return
    from fairseq_siamctc.cli.outputs import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(recipe, indent=1, sort_keys=True) + "\n")


class Demo:
    def __init__(self, size: str, out: pathlib.Path, data_root: pathlib.Path, force: bool, control: bool):
        self.size, self.settings, self.force, self.control = size, SIZES[size], force, control
        self.corpus = data_root / self.settings["corpus"]
        self.manifests = self.corpus / "manifests"
        self.work = data_root / self.settings["work"]
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.seconds = {}

    # -- running commands -------------------------------------------------------------------
    def run(self, name, args, threads=2, background=False, echo=False):
        """Runs a command with its output in logs/<name>.log; prints fairseq's progress lines
        (every line with ``echo``). A reader thread per command, so that commands running side
        by side never block on a full pipe."""
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="1")
        proc = subprocess.Popen([str(a) for a in args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        proc.demo_name, proc.demo_log_path = name, self.logs / f"{name}.log"
        proc.demo_reader = threading.Thread(target=self._pump, args=(proc, echo))
        proc.demo_reader.start()
        return proc if background else self.wait(proc)

    @staticmethod
    def _pump(proc, echo):
        with open(proc.demo_log_path, "w") as log:
            for line in proc.stdout:
                log.write(line)
                update = re.search(r'"(?:train_)?num_updates": "(\d+)"', line)
                if update and ("[train_inner]" in line or "[train]" in line):
                    loss = re.search(r'"(?:train_)?loss": "([\d.]+)"', line)
                    print(f"  [{proc.demo_name}] update {update.group(1)}"
                          + (f", loss {loss.group(1)}" if loss else ""), flush=True)
                elif echo or line.startswith("siamctc-"):
                    print(f"  [{proc.demo_name}] {line.rstrip()}", flush=True)

    def wait(self, proc):
        proc.wait()
        proc.demo_reader.join()
        if proc.returncode != 0:
            tail = proc.demo_log_path.read_text().splitlines()[-30:]
            sys.exit(f"demo: stage {proc.demo_name} failed ({proc.returncode}); "
                     f"log: {proc.demo_log_path}\n" + "\n".join(tail))
        return proc

    def stage(self, name, done: pathlib.Path, function):
        start = time.time()
        if done.exists() and not self.force:
            print(f"== {name}: already done ({done})", flush=True)
        else:
            print(f"== {name}", flush=True)
            function()
        self.seconds[name] = round(time.time() - start, 1)
        print(f"   {name}: {self.seconds[name]:.0f} s", flush=True)

    def hydra_train(self, name, config_dir, config_name, run_dir, overrides, threads=2, background=False):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        return self.run(name, [BIN / "fairseq-hydra-train", "--config-dir", REPO / config_dir,
                               "--config-name", config_name, f"hydra.run.dir={run_dir}", *overrides],
                        threads=threads, background=background)

    # -- stages ------------------------------------------------------------------------------
    def build_corpus(self):
        self.run("corpus", [PYTHON, "-m", "siamctc_manifests.builtin_corpus", "--size", self.size,
                            "--out", self.corpus], echo=True)

    def units(self):
        self.run("units", [PYTHON, "-m", "fairseq_siamctc.data.kmeans_units", self.manifests,
                           self.work / "units", "--clusters", self.settings["clusters"]])

    def seed(self):
        self.hydra_train("seed", "examples/demo", "seed_hubert", self.work / "seed", self.seed_overrides())

    def seed_overrides(self):
        """HuBERT pretraining of the seed encoder on the units (``seed_hubert.yaml``'s seed unless
        another ``common.seed=`` follows)."""
        return [f"task.data={self.manifests}", f"task.label_dir={self.work / 'units'}",
                f"optimization.max_update={self.settings['seed_updates']}",
                f"dataset.max_tokens={self.settings['max_tokens']}",
                f"lr_scheduler.warmup_updates={self.settings['warmup']}"]

    def siamctc(self):
        self.hydra_train("siamctc", "examples/siamctc", "tiny", self.work / "siamctc", [
            f"task.data={self.manifests}", f"model.encoder_path={self.seed_checkpoint}",
            f"optimization.max_update={self.settings['siamctc_updates']}",
            f"dataset.batch_size={self.settings['batch_size']}",
            f"lr_scheduler.warmup_updates={max(1, self.settings['siamctc_updates'] // 5)}",
        ])
        self.run("export", [BIN / "siamctc-export", "--force", self.siamctc_checkpoint, self.siamctc_export])

    def continued(self):
        self.hydra_train("control", "examples/demo", "seed_hubert", self.work / "control",
                         self.control_overrides(self.settings["control_updates"]))

    def control_overrides(self, updates, seed_checkpoint=None):
        """The time-matched control: the seed (``seed_checkpoint``, default the demo's) after
        ``updates`` more pretraining updates on its own targets, with SiamCTC's learning rate and
        schedule."""
        return [f"task.data={self.manifests}", f"task.label_dir={self.work / 'units'}",
                f"checkpoint.finetune_from_model={seed_checkpoint or self.seed_checkpoint}",
                f"optimization.max_update={updates}",
                "optimization.lr=[0.0001]", f"lr_scheduler.warmup_updates={max(1, updates // 5)}",
                f"dataset.max_tokens={self.settings['max_tokens']}"]

    def finetune(self):
        # all at once, one thread each: same settings and seed, only the encoder differs
        procs = [
            self.hydra_train(f"finetune_{name}", "examples/finetune", "tiny_phn",
                             self.work / f"finetune_{name}", [
                                 f"task.data={self.manifests}", f"model.w2v_path={encoder}",
                                 f"optimization.max_update={self.settings['finetune_updates']}",
                                 f"dataset.max_tokens={self.settings['max_tokens']}",
                                 "common.seed=1"], threads=1, background=True)
            for name, encoder in self.encoders.items()
            if not self.finetuned(name).exists() or self.force
        ]
        for proc in procs:
            self.wait(proc)

    def evaluate(self):
        models = []
        for name in self.encoders:
            models += ["--model", f"{name}={self.finetuned(name)}"]
        for test_set in ("test", "test_real"):
            self.run(f"decode_{test_set}", [BIN / "siamctc-robustness", *models, "--data", self.manifests,
                                            "--test-set", test_set, "--labels", "phn",
                                            "--out", self.work / f"eval_{test_set}", "--force"])
        self.run("alignment", [BIN / "siamctc-plot-alignment", "--checkpoint", self.siamctc_checkpoint,
                               "--manifest", self.manifests / "test.tsv", "--index", 0, "--speed", 1.2,
                               "--out", self.out / "alignment.png"])

    # -- paths -------------------------------------------------------------------------------
    @property
    def seed_checkpoint(self):
        return self.work / "seed" / "checkpoints" / "checkpoint_last.pt"

    @property
    def siamctc_checkpoint(self):
        return self.work / "siamctc" / "checkpoints" / "checkpoint_last.pt"

    @property
    def siamctc_export(self):
        return self.work / "siamctc_hubert.pt"

    @property
    def control_checkpoint(self):
        return self.work / "control" / "checkpoints" / "checkpoint_last.pt"

    @property
    def encoders(self):
        encoders = {"seed": self.seed_checkpoint, "siamctc": self.siamctc_export}
        if self.control:
            encoders["continued"] = self.control_checkpoint
        return encoders

    def finetuned(self, name):
        return self.work / f"finetune_{name}" / "checkpoints" / "checkpoint_last.pt"

    # -- results -----------------------------------------------------------------------------
    def write_results(self, started):
        results = {"size": self.size}
        for key, test_set in (("per", "test"), ("per_real", "test_real")):
            evaluation = json.loads((self.work / f"eval_{test_set}" / "robustness.json").read_text())
            results[key] = evaluation["error_rates"]
            shutil.copy(self.work / f"eval_{test_set}" / "robustness.png",
                        self.out / ("robustness.png" if test_set == "test" else "robustness_real.png"))
        corpus = json.loads((self.corpus / "corpus.json").read_text())
        results["corpus"] = {k: corpus[k] for k in ("hours", "speakers", "utterances") if k in corpus}
        results["settings"] = self.settings
        results["stage_seconds"] = self.seconds
        results["seconds"] = round(time.time() - started, 1)
        (self.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (self.out / "results.md").write_text(results_markdown(results))
        print(results_markdown(results))


def results_markdown(results) -> str:
    lines = [f"SiamCTC demo ({results['size']} built-in corpus), phoneme error rate (%) by speed factor:", ""]
    for key, title in (("per", "synthetic test speakers (held-out voices)"),
                       ("per_real", "real speech (test_real)")):
        lines += [f"{title}:", "", "| encoder | " + " | ".join(f"{s}x" for s in SPEEDS) + " | mean |",
                  "|---|" + "---:|" * (len(SPEEDS) + 1)]
        for model, rates in results[key].items():
            values = [rates[s] for s in SPEEDS]
            lines.append(f"| {model} | " + " | ".join(f"{v:.1f}" for v in values)
                         + f" | {sum(values) / len(values):.1f} |")
        lines.append("")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in results["stage_seconds"].items())
    lines.append(f"Total {results['seconds'] / 60:.1f} min ({stages}).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--out", type=pathlib.Path, help="results folder (default results/demo[_tiny])")
    parser.add_argument("--data-root", type=pathlib.Path, default=REPO / "data",
                        help="where the corpus and the demo's models go (default: data/)")
    parser.add_argument("--force", action="store_true", help="rerun stages whose output exists")
    parser.add_argument("--control", action="store_true",
                        help="also fine-tune and evaluate the seed pretrained for longer (time-matched)")
    args = parser.parse_args(argv)
    out = (args.out or REPO / ("results/demo" if args.size == "small" else f"results/demo_{args.size}")).resolve()
    started = time.time()
    demo = Demo(args.size, out, args.data_root.resolve(), args.force, args.control)
    check_recipe(demo.work / "recipe.json", recipe_record(demo.settings), args.force)
    demo.stage("corpus", demo.corpus / "corpus.json", demo.build_corpus)
    demo.stage("units", demo.work / "units" / "dict.km.txt", demo.units)
    demo.stage("seed", demo.seed_checkpoint, demo.seed)
    demo.stage("siamctc", demo.siamctc_export, demo.siamctc)
    if args.control:
        demo.stage("control", demo.control_checkpoint, demo.continued)
    demo.stage("finetune", demo.finetuned(list(demo.encoders)[-1]), demo.finetune)
    demo.stage("evaluate", out / "results.json", demo.evaluate)
    demo.write_results(started)


if __name__ == "__main__":
    main()
