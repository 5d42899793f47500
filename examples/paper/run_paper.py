"""The paper's table 1 and figure 2 from LibriSpeech and the two public checkpoints, in one resumable command.

    python examples/paper/run_paper.py --librispeech LibriSpeech --hubert hubert_base_ls960.pt --wavlm wavlm_base.pt
    make paper LIBRISPEECH=LibriSpeech HUBERT=hubert_base_ls960.pt WAVLM=wavlm_base.pt

Stages, the README's recipe ("The paper's recipe with real data") as one chain:

1. manifests       train-clean-100 -> train, dev-clean -> valid, test-clean -> test_clean (siamctc-manifest);
2. labels          phonemes from the CMU dictionary, utterances with words it lacks left out (siamctc-labels);
3. speed copies    test-clean at 0.8, 0.9, 1.1 and 1.2 (siamctc-speed-testsets);
4. siamctc         SiamCTC on HuBERT Base and on WavLM Base with the paper's configs
                   (examples/siamctc/{hubert_base,wavlm_base}.yaml, fairseq-hydra-train);
5. export          each trained encoder in its base model's format (siamctc-export);
6. probe           SUPERB's phoneme recognition on the frozen encoder, the paper's evaluation, for HuBERT,
                   HuBERT+SiamCTC, WavLM and WavLM+SiamCTC at every speed (siamctc-probe);
7. finetune        with --finetune: fairseq's CTC fine-tuning of the four (examples/finetune/phn_100h.yaml)
                   and greedy decoding at every speed (siamctc-robustness);
8. report          table 1 and figure 2 with the paper's numbers beside: OUT/paper.md, paper.json, figure2.png.

Before any work the plan is printed: each stage's estimated device time and disk from the corpus
size and the rates of examples/paper/paper_plan.py. Each stage records its inputs (content hashes
of the files it reads, its settings) in WORK/stamps/ when it starts and again when it is done: a
rerun skips finished stages, resumes an unfinished one (fairseq-hydra-train from its
checkpoint_last.pt), and refuses, before any work, a stage whose recorded inputs differ from this
run's, or whose outputs exist without a record, unless --force.
"""

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Callable, Dict, List, Optional

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "examples" / "demo"))
sys.path.insert(0, str(HERE))
from run_demo import BIN, Demo, flatten  # noqa: E402  (the demo's logged, echoing command runner)

import paper_plan as planning  # noqa: E402
import paper_report as report  # noqa: E402

LEXICON = pathlib.Path("/usr/share/pocketsphinx/model/en-us/cmudict-en-us.dict")
# our split name -> LibriSpeech's folder, and the built-in corpus's (make corpus) for --tiny
SPLITS = {"train": "train-clean-100", "valid": "dev-clean", "test_clean": "test-clean"}
BUILTIN_SPLITS = {"train": "train", "valid": "dev", "test_clean": "test"}
ENCODERS = {"hubert": "hubert_base", "wavlm": "wavlm_base"}  # base encoder -> its SiamCTC config
VARIANTS = ("hubert", "hubert_siamctc", "wavlm", "wavlm_siamctc")
SPEED_FACTORS = ("0.8", "0.9", "1.1", "1.2")
CPU_JOBS = 2  # --tiny: stages of a group two at a time, one thread each (the 2-core machine's best)
PAPER_BATCH = 8  # utterances a SiamCTC batch (hubert_base.yaml), GPUs of the fine-tuning batch (phn_100h.yaml)

# --tiny: the chain on a CPU in minutes; the settings shrink the schedules only
TINY = {
    # +cpu=check: fp32, one process; validation and saves only at the end
    "siamctc": ["+cpu=check", "optimization.max_update=4", "lr_scheduler.warmup_updates=1",
                "dataset.validate_interval=1000", "checkpoint.save_interval=1000"],
    "finetune": ["+cpu=check", "optimization.max_update=4", "model.freeze_finetune_updates=1",
                 "dataset.validate_interval=1000", "checkpoint.save_interval=1000",
                 "model.mask_length=2", "model.mask_channel_length=4"],  # masks that fit tiny utterances and models
    "probe_steps": 20,
    "probe_eval_step": 10,
}


class NotReady(Exception):
    """A stage's inputs do not exist yet (an earlier stage has not run)."""


class InputError(Exception):
    """Bad input or a refused action: one line for the user."""


# -- inputs: content hashes, cached by size and modification time ---------------------------------

class Hashes:
    """sha256 of files, remembered in ``path`` by (size, mtime) so that a rerun does not read
    gigabytes of checkpoints again."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.known = json.loads(path.read_text()) if path.is_file() else {}
        self.dirty = False

    def file(self, path) -> str:
        path = pathlib.Path(path)
        if not path.is_file():
            raise NotReady(str(path))
        stat = path.stat()
        key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
        if self.known.get(key, [None])[:2] != stamp:
            from fairseq_siamctc.probe import file_hash

            self.known[key] = stamp + [file_hash(path)]
            self.dirty = True
        return self.known[key][2]

    def save(self) -> None:
        if self.dirty and self.path.parent.parent.is_dir():  # never creates the work folder (a plan alone)
            from fairseq_siamctc.cli.outputs import write_atomic

            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(self.known, indent=0) + "\n")
            self.dirty = False


def folder_listing(folder: pathlib.Path) -> dict:
    """A corpus folder's identity without reading its audio: its files' names and sizes."""
    digest, count = hashlib.sha256(), 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\t{path.stat().st_size}\n".encode())
        count += 1
    return {"path": str(folder.resolve()), "files": count, "listing": digest.hexdigest()}


# -- stages ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Stage:
    name: str
    group: str  # stages of one group may run side by side
    outputs: List[pathlib.Path]
    inputs: Callable[[], dict]
    commands: Callable[[bool], List[list]] = None  # (replace) -> commands, run in turn
    function: Callable[[], None] = None
    run_dir: Optional[pathlib.Path] = None  # a training folder: resumed, or removed before a fresh run
    max_update: int = 0  # a training's last update
    derived: bool = False  # recomputed whenever its inputs change (a summary of stages that are protected)
    gpu: bool = False
    conflict: Callable[[], Optional[str]] = None  # a reason to refuse that the records cannot show


class Paper(Demo):
    """The stages and their records. Commands run through the demo's runner (``Demo.run``): a log per
    command in WORK/logs, fairseq's update lines echoed."""

    def __init__(self, args):  # not the demo's: it would make the demo's folders
        self.args = args
        self.work, self.out = args.work, args.out
        self.logs = self.work / "logs"
        self.stamps = self.work / "stamps"
        self.manifests = self.work / "manifests"
        self.force = args.force
        self.seconds = {}
        self.hashes = Hashes(self.stamps / "hashes.json")
        self.stages = self._stages()

    # -- paths ------------------------------------------------------------------------------------
    def base(self, encoder: str) -> pathlib.Path:
        return getattr(self.args, encoder)

    def siamctc_dir(self, encoder: str) -> pathlib.Path:
        return self.work / f"siamctc_{encoder}"

    def checkpoint(self, variant: str) -> pathlib.Path:
        """The encoder checkpoint of a variant: the base file or the SiamCTC export."""
        return self.base(variant) if variant in ENCODERS else self.work / f"{variant}.pt"

    def finetuned(self, variant: str) -> pathlib.Path:
        return self.work / "finetune" / variant / "checkpoints" / "checkpoint_best.pt"

    def probe_json(self, variant: str) -> pathlib.Path:
        return self.work / "probe" / variant / "probe.json"

    def probe_cache(self, variant: str) -> pathlib.Path:
        """A feature cache per encoder, removed once its probe is done (all its seeds ran in one command)."""
        return self.work / "probe_cache" / variant

    # -- inputs -----------------------------------------------------------------------------------
    def data(self, splits, labels=("tsv", "phn")) -> dict:
        found = {f"{split}.{ext}": self.hashes.file(self.manifests / f"{split}.{ext}")
                 for split in splits for ext in labels}
        found["dict.phn.txt"] = self.hashes.file(self.manifests / "dict.phn.txt")
        return found

    def test_splits(self) -> List[str]:
        return ["test_clean"] + [f"test_clean_sp{s}" for s in SPEED_FACTORS]

    def training_overrides(self, kind: str) -> List[str]:
        """Overrides that change what is trained (recorded); the GPU count's are not (same total batch)."""
        overrides = list(TINY[kind]) if self.args.tiny else []
        # fairseq's bf16: bf16 weights and activations, float32 master weights, no loss scaler
        return overrides + (["common.fp16=false", "common.bf16=true"] if self.args.bf16 else [])

    def gpu_overrides(self, kind: str) -> List[str]:
        gpus = self.args.gpus
        if self.args.tiny or gpus == 1 and kind == "siamctc":
            return []
        if kind == "siamctc":
            return [f"distributed_training.distributed_world_size={gpus}", f"dataset.batch_size={PAPER_BATCH // gpus}"]
        return [f"distributed_training.distributed_world_size={gpus}",
                f"optimization.update_freq=[{PAPER_BATCH // gpus}]"]

    def max_update(self, kind: str, name: str) -> int:
        return int(self.config(kind, name)["optimization"]["max_update"])

    def config(self, kind: str, name: str) -> dict:
        folder = "siamctc" if kind == "siamctc" else "finetune"
        return planning.resolved_config(REPO / "examples" / folder / f"{name}.yaml", self.training_overrides(kind))

    # -- the stage list ---------------------------------------------------------------------------
    def _stages(self) -> List[Stage]:
        args, work, m = self.args, self.work, self.manifests
        lists = work / "audio_lists"
        stages = [
            Stage("manifests", "manifests", [lists / f"{s}.tsv" for s in SPLITS],
                  lambda: {"folders": {s: folder_listing(f) for s, f in self.split_folders().items()}},
                  lambda replace: [[BIN / "siamctc-manifest", folder, "--dest", lists, "--split", split,
                                    *(["--force"] if replace else [])]
                                   for split, folder in self.split_folders().items()]),
            Stage("labels", "labels",
                  [m / f"{s}.{ext}" for s in SPLITS for ext in ("tsv", "phn")] + [m / "dict.phn.txt"],
                  lambda: {"audio_lists": {s: self.hashes.file(lists / f"{s}.tsv") for s in SPLITS},
                           "lexicon": self.hashes.file(args.lexicon), "on_oov": "skip"},
                  lambda replace: [[BIN / "siamctc-labels", *[lists / f"{s}.tsv" for s in SPLITS], "--lexicon",
                                    args.lexicon, "--on-oov", "skip", "--out-dir", m,
                                    *(["--force"] if replace else [])]]),
            Stage("speed copies", "speed", [m / f"{s}.{ext}" for s in self.test_splits()[1:] for ext in ("tsv", "phn")],
                  lambda: {"test_clean": {ext: self.hashes.file(m / f"test_clean.{ext}")
                                          for ext in ("tsv", "wrd", "ltr", "phn")},
                           "speeds": SPEED_FACTORS},
                  lambda replace: [[BIN / "siamctc-speed-testsets", m / "test_clean.tsv", "--audio-out",
                                    work / "test_clean_speed", "--speeds", *SPEED_FACTORS,
                                    *(["--force"] if replace else [])]]),
        ]
        for encoder, config in ENCODERS.items():
            stages.append(Stage(
                f"siamctc {encoder}", "siamctc", [self.siamctc_dir(encoder) / "checkpoints" / "checkpoint_last.pt"],
                lambda encoder=encoder, config=config: {
                    "config": self.config("siamctc", config), "encoder": self.hashes.file(self.base(encoder)),
                    "data": self.data(["train", "valid"])},
                lambda replace, encoder=encoder, config=config: [[
                    BIN / "fairseq-hydra-train", "--config-dir", REPO / "examples" / "siamctc", "--config-name", config,
                    f"task.data={m}", f"model.encoder_path={self.base(encoder)}",
                    f"hydra.run.dir={self.siamctc_dir(encoder)}", *self.gpu_overrides("siamctc"),
                    *self.training_overrides("siamctc")]],
                run_dir=self.siamctc_dir(encoder), max_update=self.max_update("siamctc", config), gpu=True))
        for encoder in ENCODERS:
            last = self.siamctc_dir(encoder) / "checkpoints" / "checkpoint_last.pt"
            stages.append(Stage(
                f"export {encoder}", "export", [self.checkpoint(f"{encoder}_siamctc")],
                lambda last=last: {"checkpoint": self.hashes.file(last)},
                lambda replace, encoder=encoder, last=last: [[
                    BIN / "siamctc-export", last, self.checkpoint(f"{encoder}_siamctc"),
                    *(["--force"] if replace else [])]]))
        for variant in VARIANTS:
            stages.append(Stage(
                f"probe {variant}", "probe", [self.probe_json(variant)],
                lambda variant=variant: {"checkpoint": self.hashes.file(self.checkpoint(variant)),
                                         "data": self.data(["train", "valid", *self.test_splits()]),
                                         "settings": self.probe_settings()},
                lambda replace, variant=variant: [self.probe_command(variant, replace)], gpu=True))
        if args.finetune:
            for variant in VARIANTS:
                stages.append(Stage(
                    f"finetune {variant}", "finetune", [self.finetuned(variant)],
                    lambda variant=variant: {"config": self.config("finetune", "phn_100h"),
                                             "model": "wavlm_ctc" if variant.startswith("wavlm") else "hubert_ctc",
                                             "encoder": self.hashes.file(self.checkpoint(variant)),
                                             "data": self.data(["train", "valid"])},
                    lambda replace, variant=variant: self.finetune_commands(variant),
                    run_dir=self.finetuned(variant).parents[1], max_update=self.max_update("finetune", "phn_100h"),
                    gpu=True))
            stages.append(Stage(
                "decode", "decode", [work / "eval_finetune" / "robustness.json"],
                lambda: {"models": {v: self.hashes.file(self.finetuned(v)) for v in VARIANTS},
                         "data": self.data(self.test_splits())},
                lambda replace: [[BIN / "siamctc-robustness",
                                  *[a for v in VARIANTS for a in ("--model", f"{v}={self.finetuned(v)}")],
                                  "--data", m, "--test-set", "test_clean", "--labels", "phn",
                                  "--out", work / "eval_finetune", *(["--force"] if replace else [])]], gpu=True))
        stages.append(Stage("report", "report", [self.out / "paper.json"], self.report_inputs,
                            function=self.write_report, derived=True, conflict=self.report_conflict))
        return stages

    def split_folders(self) -> Dict[str, pathlib.Path]:
        return resolve_splits(self.args.librispeech)

    def probe_settings(self) -> dict:
        settings = {"seeds": self.args.probe_seeds}
        if self.args.tiny:
            settings.update(steps=TINY["probe_steps"], eval_step=TINY["probe_eval_step"])
        return settings

    def probe_command(self, variant: str, replace: bool) -> list:
        command = [BIN / "siamctc-probe", "--checkpoint", self.checkpoint(variant), "--data", self.manifests,
                   "--train", "train", "--valid", "valid", "--test", "test_clean", "--labels", "phn",
                   "--out", self.probe_json(variant).parent, "--cache", self.probe_cache(variant),
                   "--seeds", *self.args.probe_seeds]
        if self.args.tiny:
            command += ["--steps", TINY["probe_steps"], "--eval-step", TINY["probe_eval_step"], "--device", "cpu"]
        command += ["--cache-budget", self.args.cache_budget]
        return command + (["--force"] if replace else [])

    def finetune_commands(self, variant: str) -> List[list]:
        """A base checkpoint goes through siamctc-export first, as the SiamCTC encoders did: fairseq's
        fine-tuning then reads both in fairseq's format, whatever layout the base file had (s3prl's)."""
        commands, encoder = [], self.checkpoint(variant)
        if variant in ENCODERS:
            encoder = self.work / "finetune" / f"{variant}.pt"
            commands.append([BIN / "siamctc-export", "--force", self.checkpoint(variant), encoder])
        return commands + [[
            BIN / "fairseq-hydra-train", "--config-dir", REPO / "examples" / "finetune", "--config-name", "phn_100h",
            f"task.data={self.manifests}", f"model.w2v_path={encoder}",
            f"hydra.run.dir={self.finetuned(variant).parents[1]}",
            *(["model._name=wavlm_ctc"] if variant.startswith("wavlm") else []),
            *self.gpu_overrides("finetune"), *self.training_overrides("finetune")]]

    def report_inputs(self) -> dict:
        found = {"work": str(self.work), "probe": {v: self.hashes.file(self.probe_json(v)) for v in VARIANTS}}
        if self.args.finetune:
            found["finetune"] = self.hashes.file(self.work / "eval_finetune" / "robustness.json")
        return found

    def report_conflict(self) -> Optional[str]:
        """OUT/paper.json of another work folder is another run's result."""
        path = self.out / "paper.json"
        if not path.is_file():
            return None
        work = json.loads(path.read_text()).get("inputs", {}).get("work")
        if work != str(self.work):
            return f"{path} holds the results of {work}, not of {self.work}; --force replaces it"
        return None

    def write_report(self) -> None:
        probe = {v: json.loads(self.probe_json(v).read_text()) for v in VARIANTS}
        finetune = None
        if self.args.finetune:
            finetune = json.loads((self.work / "eval_finetune" / "robustness.json").read_text())
        seconds = {}
        for stage in self.stages:
            stamp = self.read_stamp(stage.name)
            if stamp and "seconds" in stamp:
                seconds[stage.name] = stamp["seconds"]
        record = report.results(probe, finetune, {
            "inputs": self.report_inputs(), "tiny": self.args.tiny, "gpus": self.args.gpus,
            "probe_seeds": self.args.probe_seeds, "stage_seconds": seconds})
        self.out.mkdir(parents=True, exist_ok=True)
        report.write(record, self.out)

    # -- records ----------------------------------------------------------------------------------
    def stamp_path(self, name: str) -> pathlib.Path:
        return self.stamps / f"{name.replace(' ', '_')}.json"

    def read_stamp(self, name: str) -> Optional[dict]:
        path = self.stamp_path(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def write_stamp(self, name: str, inputs: dict, state: str, seconds: Optional[float] = None) -> None:
        from fairseq_siamctc.cli.outputs import write_atomic

        self.stamps.mkdir(parents=True, exist_ok=True)
        record = {"state": state, "inputs": inputs}
        if seconds is not None:
            record["seconds"] = round(seconds, 1)
        write_atomic(self.stamp_path(name), json.dumps(record, indent=1, sort_keys=True) + "\n")
        self.hashes.save()

    def status(self, stage: Stage):
        """(status, inputs): done, todo, partial (started, resumes), changed (other inputs), foreign
        (outputs without a record), waiting (an earlier stage's outputs are missing)."""
        if stage.conflict is not None and stage.conflict():
            return "foreign", None
        try:
            inputs = json.loads(json.dumps(stage.inputs(), default=str))
        except NotReady:
            return "waiting", None
        stamp = self.read_stamp(stage.name)
        if stamp is None:
            existing = [p for p in stage.outputs + ([stage.run_dir] if stage.run_dir else []) if p.exists()]
            return ("foreign" if existing else "todo"), inputs
        if stamp["inputs"] != inputs:
            return ("todo" if stage.derived else "changed"), inputs
        if stamp["state"] == "done" and all(p.exists() for p in stage.outputs):
            return "done", inputs
        return "partial", inputs

    def refusal(self, stage: Stage, status: str) -> str:
        if status == "foreign" and stage.conflict is not None and stage.conflict():
            return stage.conflict()
        if status == "foreign":
            existing = [p for p in stage.outputs + ([stage.run_dir] if stage.run_dir else []) if p.exists()]
            return (f"{existing[0]} exists but no record of stage '{stage.name}' is in {self.stamps}; "
                    "--force replaces it")
        recorded, current = flatten(self.read_stamp(stage.name)["inputs"]), flatten(self.status(stage)[1])
        differs = sorted(k for k in recorded.keys() | current.keys() if recorded.get(k) != current.get(k))
        shown = ", ".join(f"{k}: {_short(recorded.get(k))} -> {_short(current.get(k))}" for k in differs[:2])
        more = f" and {len(differs) - 2} more" if len(differs) > 2 else ""
        return f"stage '{stage.name}' in {self.work} was run with other inputs ({shown}{more}); --force reruns it"

    # -- running ----------------------------------------------------------------------------------
    def run_stages(self, estimates: Dict[str, float]) -> None:
        """Runs every stage that is not done, wave by wave (a group at a time), side by side where the
        group allows: on the CPU two jobs; on GPUs the probes one per GPU."""
        order = []
        for stage in self.stages:
            if not order or order[-1][0].group != stage.group:
                order.append([])
            order[-1].append(stage)
        for wave in order:
            todo = []
            for stage in wave:
                status, inputs = self.status(stage)
                if status == "done":
                    continue
                if status in ("changed", "foreign") and not self.force:
                    raise InputError(self.refusal(stage, status))
                if status == "waiting":
                    raise InputError(f"stage '{stage.name}': an input is missing after the earlier stages ran")
                todo.append((stage, status, inputs))
            if todo:
                self.run_wave(todo, self.slots(wave[0].group), estimates)

    def slots(self, group: str) -> int:
        if self.args.tiny:
            return CPU_JOBS
        return min(self.args.gpus, 4) if group == "probe" else 1

    def run_wave(self, todo, slots: int, estimates: Dict[str, float]) -> None:
        pending = list(todo)
        running = {}  # slot -> [stage, inputs, commands left, proc, start]
        threads = 1 if slots > 1 and self.args.tiny else max(1, (os.cpu_count() or 2) // slots)
        try:
            while pending or running:
                for slot in range(slots):
                    if slot in running or not pending:
                        continue
                    stage, status, inputs = pending.pop(0)
                    replace = status != "todo"
                    if status in ("changed", "foreign") and stage.run_dir and stage.run_dir.exists():
                        shutil.rmtree(stage.run_dir)  # another run's checkpoints: start afresh (--force)
                    if status == "partial" and stage.run_dir:
                        updates = trained_updates(stage.run_dir / "checkpoints" / "checkpoint_last.pt")
                        if updates is not None and updates >= stage.max_update:
                            # finished before its record was written: fairseq would take one more update
                            print(f"== {stage.name}: finished earlier ({updates:,} updates)", flush=True)
                            self.finish(stage, inputs, time.time())
                            continue
                        print(f"== {stage.name}: resuming from {stage.run_dir} ({updates or 0:,} updates)", flush=True)
                    else:
                        estimate = planning.duration(estimates.get(stage.name, 0))
                        print(f"== {stage.name} (estimate {estimate})", flush=True)
                    self.write_stamp(stage.name, inputs, "started")
                    start = time.time()
                    if stage.function is not None:
                        stage.function()
                        self.finish(stage, inputs, start)
                        continue
                    entry = [stage, inputs, stage.commands(replace), None, start]
                    running[slot] = entry
                    self.start_next(entry, slot, threads, stage.gpu and slots > 1)
                for slot, entry in list(running.items()):
                    if entry[3].poll() is None:
                        continue
                    self.wait(entry[3])
                    if entry[2]:
                        self.start_next(entry, slot, threads, entry[0].gpu and slots > 1)
                    else:
                        del running[slot]
                        self.finish(entry[0], entry[1], entry[4])
                time.sleep(0.2)
        except BaseException:
            for entry in running.values():
                if entry[3].poll() is None:
                    entry[3].terminate()
                    entry[3].wait()
            raise

    def start_next(self, entry, slot: int, threads: int, pin_gpu: bool) -> None:
        stage, command = entry[0], entry[2].pop(0)
        name = stage.name.replace(" ", "_")
        if "--split" in command:  # the manifests stage: a log per split
            name += f"_{command[command.index('--split') + 1]}"
        elif stage.group == "finetune" and pathlib.Path(command[0]).name == "siamctc-export":
            name += "_export"
        log = self.logs / f"{name}.log"
        self.logs.mkdir(parents=True, exist_ok=True)
        if log.exists():  # keep an earlier attempt's log
            log.rename(log.with_name(f"{name}.{int(log.stat().st_mtime)}.log"))
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if pin_gpu and not self.args.tiny:  # a probe per GPU, among those the user made visible
            visible = saved.split(",") if saved else [str(i) for i in range(self.args.gpus)]
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[slot]
        try:
            entry[3] = self.run(name, command, threads=threads, background=True)
        finally:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved

    def wait(self, proc):
        try:
            return super().wait(proc)
        except SystemExit as err:  # the demo's message, with this command's name
            raise SystemExit(str(err).replace("demo: stage", "run_paper: stage", 1)) from None

    def finish(self, stage: Stage, inputs: dict, start: float) -> None:
        seconds = time.time() - start
        missing = [p for p in stage.outputs if not p.exists()]
        if missing:
            raise InputError(f"stage '{stage.name}' finished without writing {missing[0]}")
        self.write_stamp(stage.name, inputs, "done", seconds)
        if stage.group == "probe" and not self.args.keep_probe_cache:
            shutil.rmtree(self.probe_cache(stage.name.split()[-1]), ignore_errors=True)
        self.seconds[stage.name] = seconds
        print(f"   {stage.name}: {planning.duration(seconds)}", flush=True)


def trained_updates(checkpoint: pathlib.Path) -> Optional[int]:
    """The updates a fairseq training checkpoint was saved after, or None (no readable checkpoint)."""
    import torch

    if not checkpoint.is_file():
        return None
    try:  # memory-mapped: only the small history is read
        state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
        return int(state["optimizer_history"][-1]["num_updates"])
    except Exception:  # a checkpoint cut short: fairseq's own resume will say what is wrong
        return None


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:12] + "..." if len(text) > 15 else text


def resolve_splits(librispeech: pathlib.Path) -> Dict[str, pathlib.Path]:
    """{split: folder} of a LibriSpeech folder (train-clean-100, dev-clean, test-clean), or of the
    built-in corpus's audio folder (train, dev, test); an error names the first folder missing."""
    if not librispeech.is_dir():
        raise InputError(f"--librispeech {librispeech}: not a folder")
    for layout in (SPLITS, BUILTIN_SPLITS):
        folders = {split: librispeech / name for split, name in layout.items()}
        if all(f.is_dir() for f in folders.values()):
            return folders
    missing = next(librispeech / name for name in SPLITS.values() if not (librispeech / name).is_dir())
    raise InputError(f"--librispeech {librispeech}: no folder {missing.name} (expected {', '.join(SPLITS.values())})")


# -- the plan -------------------------------------------------------------------------------------

def corpus_size(paper: Paper, manifests_dir: Optional[pathlib.Path]):
    """({train, valid, test}: Split, audio files, where the sizes came from): from manifests when
    there are (``--plan-from-manifests``, the run's labelled or plain lists), else from the audio
    files' headers."""
    names = {"train": "train", "valid": "valid", "test": "test_clean"}
    for folder, source in ((manifests_dir, "the manifests in"), (paper.manifests, "the labelled manifests in"),
                           (paper.work / "audio_lists", "the manifests in")):
        if folder is not None and all((folder / f"{n}.tsv").is_file() for n in names.values()):
            splits = {k: planning.split_from_manifest(folder / f"{n}.tsv") for k, n in names.items()}
            return splits, None, f"{source} {folder}"
        if folder is not None and folder == manifests_dir:
            missing = next(folder / f"{n}.tsv" for n in names.values() if not (folder / f"{n}.tsv").is_file())
            raise InputError(f"--plan-from-manifests: {missing} not found")
    folders = paper.split_folders()
    splits = {k: planning.split_from_audio(folders[n]) for k, n in names.items()}
    return splits, sum(s.utterances for s in splits.values()), f"the audio headers under {paper.args.librispeech}"


def encoder_size(paper: Paper, encoder: str) -> planning.Encoder:
    """Layers, dimension and parameters of a base checkpoint (read once, then remembered by its hash)."""
    path = paper.base(encoder)
    cache = paper.stamps / "encoders.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    key = paper.hashes.file(path)
    if key not in known:
        from fairseq_siamctc.models.checkpoints import CheckpointError, read_checkpoint

        try:
            checkpoint = read_checkpoint(path, allowed=(encoder,))
        except (CheckpointError, FileNotFoundError) as err:
            raise InputError(f"--{encoder}: {err}") from None
        cfg = checkpoint.cfg if encoder == "wavlm" else checkpoint.cfg.model
        params = sum(v.numel() for v in checkpoint.model.values() if hasattr(v, "numel"))
        known[key] = {"layers": int(cfg["encoder_layers"]), "dim": int(cfg["encoder_embed_dim"]), "params": int(params)}
        from fairseq_siamctc.cli.outputs import write_atomic

        if paper.work.is_dir():  # remembered for the next plan; a plan alone creates nothing
            paper.stamps.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, json.dumps(known, indent=1) + "\n")
            paper.hashes.save()
    return planning.Encoder(encoder, **known[key])


def plan_settings(paper: Paper) -> planning.Settings:
    """The settings of the plan, read from the configs as this run overrides them."""
    siam = paper.config("siamctc", "hubert_base")
    updates = int(siam["optimization"]["max_update"])
    checkpoint = siam.get("checkpoint", {})
    interval = int(checkpoint.get("save_interval_updates", 0) or 0)
    keep_interval = interval and int(checkpoint.get("keep_interval_updates", -1)) != 0 and updates >= interval
    validate = int(siam["dataset"].get("validate_interval_updates", 0) or 0)
    settings = planning.Settings(
        siamctc_updates=updates, siamctc_batch=int(siam["dataset"]["batch_size"]),
        siamctc_checkpoints=2 + bool(keep_interval),
        siamctc_valid_passes=max(1, updates // validate) if validate and not paper.args.tiny else 1,
        probe_seeds=len(paper.args.probe_seeds), finetune=paper.args.finetune)
    if paper.args.tiny:
        settings.probe_steps = TINY["probe_steps"]
        settings.probe_evals = TINY["probe_steps"] // TINY["probe_eval_step"]
    ft = paper.config("finetune", "phn_100h")
    ft_updates = int(ft["optimization"]["max_update"])
    world = int(ft["distributed_training"]["distributed_world_size"])
    update_freq = ft["optimization"].get("update_freq", [1])
    after = int(ft["dataset"].get("validate_after_updates", 0) or 0)
    every = int(ft["dataset"].get("validate_interval_updates", 0) or 0)
    settings.finetune_updates = ft_updates
    settings.finetune_frozen = min(ft_updates, int(ft["model"].get("freeze_finetune_updates", 0)))
    settings.finetune_batch_seconds = (int(ft["dataset"]["max_tokens"]) / planning.SAMPLE_RATE
                                       * world * int(update_freq[0]))
    settings.finetune_valid_passes = (ft_updates - after) // every + 1 if every and not paper.args.tiny else 1
    return settings


def make_plan(paper: Paper, manifests_dir: Optional[pathlib.Path] = None):
    """(rows, title): the plan of this run, each row with its stage's status."""
    args = paper.args
    splits, files, source = corpus_size(paper, manifests_dir)
    encoders = {e: encoder_size(paper, e) for e in ENCODERS}
    settings = plan_settings(paper)
    if args.tiny:
        settings.finetune_batch_seconds = min(settings.finetune_batch_seconds, splits["train"].seconds)
    rows = planning.plan_rows(splits, encoders, settings, planning.RATES["tiny" if args.tiny else "paper"],
                              gpus=1 if args.tiny else args.gpus, cpu_jobs=CPU_JOBS if args.tiny else 0,
                              cache_budget_gb=args.cache_budget,
                              audio_files=files, keep_cache=args.keep_probe_cache)
    statuses = {}
    if manifests_dir is None:
        for stage in paper.stages:
            status = paper.status(stage)[0]
            statuses[stage.name] = "todo" if status == "waiting" else status
    for row in rows:
        row.status = statuses.get(row.stage, "")
    if not args.finetune:
        rows.insert(len(rows) - 1, planning.Row("finetune, decode", "CPU" if args.tiny else "GPU", 0.0, 0.0,
                                                         "with --finetune", status="skipped"))
    described = "; ".join(f"{k} {planning.hours(s.seconds)} ({s.utterances:,} utterances)" for k, s in splits.items())
    where = "the tiny models on this CPU (2 jobs side by side)" if args.tiny else \
        f"the paper's models on {args.gpus} GPU{'s' * (args.gpus > 1)}, rates measured on one NVIDIA H200"
    title = f"Plan: {where}.\nCorpus: {described}; from {source}."
    return rows, title


# -- the command line ---------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--librispeech", type=pathlib.Path,
                        help="LibriSpeech folder holding train-clean-100, dev-clean and test-clean (with --tiny, also "
                             "the built-in corpus's audio folder: train, dev, test)")
    parser.add_argument("--hubert", type=pathlib.Path, required=True,
                        help="HuBERT Base checkpoint (hubert_base_ls960.pt)")
    parser.add_argument("--wavlm", type=pathlib.Path, required=True, help="WavLM Base checkpoint (wavlm_base.pt)")
    parser.add_argument("--out", type=pathlib.Path,
                        help="folder of the tables and figure (default: results/paper, with --tiny results/paper_tiny)")
    parser.add_argument("--work", type=pathlib.Path,
                        help="folder of the manifests, models, logs and stage records (default: data/paper, with "
                             "--tiny data/paper_tiny)")
    parser.add_argument("--gpus", type=int, default=1,
                        help="GPUs of this machine to use: training runs on all of them, probes one per GPU "
                             "(1, 2, 4 or 8: the paper's 8 utterances a batch split evenly; default 1)")
    parser.add_argument("--finetune", action="store_true",
                        help="also fine-tune the four encoders with fairseq's CTC recipe (phn_100h) and decode "
                             "every speed")
    parser.add_argument("--bf16", action="store_true",
                        help="train and fine-tune in bf16 instead of the paper configs' fp16 (GPUs with bf16: "
                             "A100, H100, H200; no loss scaler)")
    parser.add_argument("--tiny", action="store_true",
                        help="the chain on a CPU with tiny settings (the built-in corpus and tiny checkpoints): "
                             "a check in minutes")
    parser.add_argument("--plan-only", action="store_true", help="print the plan (with the rates it uses) and stop")
    parser.add_argument("--plan-from-manifests", type=pathlib.Path, metavar="DIR",
                        help="plan from the durations in DIR/{train,valid,test_clean}.tsv instead of the corpus "
                             "(implies --plan-only; --librispeech is then not needed)")
    parser.add_argument("--yes", action="store_true", help="start without asking after the plan")
    parser.add_argument("--cache-budget", type=float, metavar="GB", default=50.0,
                        help="passed to siamctc-probe: above it the probe streams the encoder instead of caching "
                             "features (default: 50)")
    parser.add_argument("--keep-probe-cache", action="store_true",
                        help="keep each encoder's probe features (hundreds of GB on LibriSpeech) after its probe")
    parser.add_argument("--probe-seeds", type=int, nargs="+", default=[1],
                        help="probe head seeds per encoder (default: 1)")
    parser.add_argument("--lexicon", type=pathlib.Path, default=LEXICON,
                        help=f"pronunciation lexicon of the phoneme labels (default: {LEXICON}, Debian's "
                             "pocketsphinx-en-us)")
    parser.add_argument("--force", action="store_true",
                        help="rerun stages whose recorded inputs differ from this run's, and replace outputs found "
                             "without a record (finished stages with the same inputs are kept)")
    args = parser.parse_args(argv)
    if args.plan_from_manifests:
        args.plan_only = True
    elif args.librispeech is None:
        parser.error("--librispeech is required (or --plan-from-manifests DIR for a plan alone)")
    if args.gpus not in (1, 2, 4, 8):
        parser.error(f"--gpus {args.gpus}: the paper's batch of {PAPER_BATCH} must split evenly over the GPUs "
                     "(1, 2, 4 or 8)")
    if args.tiny and args.gpus != 1:
        parser.error("--tiny runs on the CPU; --gpus does not apply")
    suffix = "_tiny" if args.tiny else ""
    args.out = (args.out or REPO / "results" / f"paper{suffix}").resolve()
    args.work = (args.work or REPO / "data" / f"paper{suffix}").resolve()
    for name in ("hubert", "wavlm", "lexicon"):
        path = getattr(args, name)
        if not path.is_file():
            parser.error(f"--{name} {path}: file not found")
        setattr(args, name, path.resolve())
    if args.librispeech is not None:
        args.librispeech = args.librispeech.resolve()
    return args


def confirm(args) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise InputError("add --yes to start without a terminal to confirm the plan")
    answer = input("Start? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise SystemExit(0)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if not args.plan_only:
            args.work.mkdir(parents=True, exist_ok=True)
            lock = open(args.work / ".run_paper.lock", "w")  # held until the process ends
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"another run_paper.py is working in {args.work}") from None
        paper = Paper(args)
        rows, title = make_plan(paper, args.plan_from_manifests)
        paper.hashes.save()
        print(planning.format_plan(rows, title, args.gpus, CPU_JOBS if args.tiny else 0), flush=True)
        if args.plan_only:
            rates = planning.RATES["tiny" if args.tiny else "paper"]
            print("Rates (examples/paper/paper_plan.py):\n" + planning.format_rates(rates))
            return 0
        refused = [(s, st) for s in paper.stages for st in [paper.status(s)[0]] if st in ("changed", "foreign")]
        if refused and not args.force:
            more = f" ({len(refused) - 1} more stage(s) likewise)" if len(refused) > 1 else ""
            raise InputError(paper.refusal(*refused[0]) + more)
        todo = [row for row in rows if row.status not in ("done", "skipped")]
        if todo:
            if not args.tiny and any(row.device == "GPU" for row in todo):
                import torch

                if torch.cuda.device_count() < args.gpus:
                    raise InputError(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA "
                                     "device(s); --tiny runs the chain on a CPU, --plan-only prints the plan")
            if any(row.status != "done" and not row.stage.startswith("report") for row in todo):
                confirm(args)
            started = time.time()
            paper.run_stages({row.stage: row.wall for row in rows})
            print(f"All stages done in {planning.duration(time.time() - started)}.", flush=True)
        print((args.out / "paper.md").read_text(), end="")
        print(f"Wrote {args.out / 'paper.md'}, paper.json and figure2.png.")
        return 0
    except InputError as err:
        print(f"run_paper: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("run_paper: interrupted; the same command resumes where this run stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
