"""The plan of ``run_paper.py``: each stage's device time and disk, from the corpus size and a table of rates.

Pure arithmetic: ``plan_rows`` takes the corpus size (seconds and utterances per split), the two base
encoders' sizes, the stage settings read from the paper's configs, and a rate table; it returns one
``Row`` per stage. ``RATES`` holds both tables with where each number comes from. The figures are
estimates: the measured ones were taken on other data than the user's, and the probe's rests on an
assumption stated below.
"""

import dataclasses
import pathlib
from typing import Dict, List, Optional, Sequence

import yaml

SPEEDS = (0.8, 0.9, 1.1, 1.2)  # the speed copies of test-clean; 1.0 is test-clean itself
FRAMES_PER_SECOND = 50  # HuBERT's and WavLM's 320-sample hop at 16 kHz
SAMPLE_RATE = 16000
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Rate:
    value: float
    unit: str
    source: str


# One table per kind of run. "paper": the paper's models on GPUs, rates measured on one NVIDIA H200
# (fairseq-hydra-train with the paper's configs, and the step benchmark bench/step.py), CPU stages on
# this project's 2-core machine. "tiny": the --tiny chain on that 2-core machine, measured by running
# it (tests/test_paper.py's corpus and checkpoints) and reading each stage's seconds from its stamp.
RATES: Dict[str, Dict[str, Rate]] = {
    "paper": {
        "start_tool": Rate(0.5, "s per start of a light tool (manifests, labels)",
                           "measured: siamctc-manifest and siamctc-labels start in 0.1 to 0.5 s on 2 CPU cores"),
        "start_torch": Rate(3.0, "s per start of a tool that imports torch (speed copies)",
                            "measured: siamctc-speed-testsets starts in about 2.5 s"),
        "export": Rate(15.0, "s per export (a 1.1 GB checkpoint read, its encoder written)",
                       "assumed: the tiny export takes 4 to 7 s, mostly imports"),
        "start_gpu": Rate(60.0, "s per training, probe or decoding command (imports, CUDA, checkpoint, saves)",
                          "assumed: not measured apart from the steps"),
        "manifest_file": Rate(0.001, "CPU s per audio file",
                              "measured: siamctc-manifest, 100 FLAC files in 0.09 s (soundfile headers 0.13 ms)"),
        "labels_utt": Rate(0.005, "CPU s per utterance",
                           "measured: siamctc-labels, 100 utterances in 0.5 s with the CMU dictionary"),
        "speed_audio": Rate(0.0011, "CPU s per second of test audio, per speed",
                            "measured: siamctc-speed-testsets, 25 min of 16 kHz FLAC to 4 speeds in 7.6 s"),
        "siamctc_update": Rate(0.36, "GPU s per SiamCTC update of HuBERT Base (8 crops of 15.6 s, fp16)",
                               "measured on one NVIDIA H200: fairseq-hydra-train with hubert_base.yaml, 0.3 to "
                               "0.4 s per update (5,000 in about 30 min)"),
        "wavlm_factor": Rate(1.2, "x HuBERT Base's GPU time, for WavLM Base",
                             "measured on one NVIDIA H200: the paper's step 273 to 440 ms for WavLM Base "
                             "against 184 to 362 ms for HuBERT Base"),
        "forward": Rate(0.00036, "GPU s per second of audio: HuBERT Base forward, fp32, batched",
                        "derived from the step measured on one NVIDIA H200 (fp32, 362 ms, of which the "
                        "objective 56 ms, for 8 x (15.6 + 19.5) s of audio), assuming the backward pass "
                        "costs twice the forward: 306 / 3 ms per 281 s; batched decoding of HuBERT Base "
                        "there: 0.41 ms per second"),
        "forward_single": Rate(0.00083, "GPU s per second of audio: forward one utterance at a time",
                               "measured on one NVIDIA H200: HuBERT Base decoding one utterance at a time, "
                               "1,899 s of audio in 1.57 s (the probe's feature cache is written that way)"),
        "train_audio": Rate(0.00043, "GPU s per second of audio: forward and backward, fp16",
                            "derived from the bf16 step measured on one NVIDIA H200: (184 - 62 ms objective) "
                            "per 281 s of audio"),
        "probe_head_update": Rate(0.005, "GPU s per probe update on cached features, beyond reading them",
                                  "assumed: a weighted sum and two linear layers over 32 utterances"),
        "cache_read": Rate(2.0, "GB per s read from the probe's feature cache", "assumed: an NVMe disk"),
    },
    # measured on 2 cores by --tiny runs on the built-in tiny corpus with tests/tiny_checkpoints.py's
    # models, two jobs side by side where a stage has two or more, each stage's seconds from its record:
    # the stages took 23 s on the quiet machine and 46 s beside other work; the rates are the quiet
    # run's x 1.4, so that the plan (29 s) is within a factor of 2 of either
    "tiny": {
        "start_tool": Rate(0.3, "s per start of a light tool", "measured: manifests (3 commands) 0.6 s, labels 0.6 s"),
        "start_torch": Rate(3.5, "s per start of a tool that imports torch", "measured: speed copies 2.6 s"),
        "export": Rate(3.5, "s per export", "measured: 2.6 s each, two side by side"),
        "start_gpu": Rate(4.0, "s per training, probe or decoding command", "fitted to the three stages below"),
        "manifest_file": Rate(0.001, "s per audio file", "as for the paper's run"),
        "labels_utt": Rate(0.005, "s per utterance", "as for the paper's run"),
        "speed_audio": Rate(0.0011, "s per second of test audio, per speed", "as for the paper's run"),
        "siamctc_update": Rate(1.0, "s per SiamCTC update with the final validation and saves",
                               "measured: 4 updates in 5.6 to 5.8 s, two runs side by side"),
        "wavlm_factor": Rate(1.0, "x the tiny HuBERT's time", "measured: 5.6 s against 5.8 s"),
        "forward": Rate(0.002, "s per second of audio, a tiny encoder's forward",
                        "measured: decoding 4 models x 106 s of audio in 4 s, start included"),
        "forward_single": Rate(0.0125, "s per second of audio, a tiny encoder's features for the probe's cache",
                               "measured: probes of 152 s of audio and 20 updates in 4.2 to 4.6 s, two side by side"),
        "train_audio": Rate(0.01, "s per second of audio, forward and backward",
                            "measured: fine-tuning, 4 updates of 34 s of audio in 6 s, two side by side"),
        "probe_head_update": Rate(0.02, "s per probe update on cached features", "measured with the probe above"),
        "cache_read": Rate(1.0, "GB per s read from the feature cache", "the page cache: negligible here"),
    },
}


# -- what the plan reads ------------------------------------------------------------------------

@dataclasses.dataclass
class Split:
    utterances: int
    seconds: float

    @property
    def mean_seconds(self) -> float:
        return self.seconds / max(1, self.utterances)


@dataclasses.dataclass
class Encoder:
    """A base checkpoint's size: transformer layers, model dimension, parameters."""

    kind: str  # "hubert" or "wavlm"
    layers: int
    dim: int
    params: int


@dataclasses.dataclass
class Settings:
    """The stages' settings that the time and disk depend on, as the configs and options give them."""

    siamctc_updates: int = 5000
    siamctc_batch: int = 8
    siamctc_checkpoints: int = 3  # checkpoint_last, checkpoint_best and one kept interval checkpoint
    siamctc_valid_passes: int = 5
    probe_steps: int = 0  # 0: SUPERB's passes over the training split (probe_epochs)
    probe_epochs: float = 100000 * 32 / 28539
    probe_batch: int = 32  # 16 utterances, 2 accumulated
    probe_evals: int = 100
    probe_seeds: int = 1
    finetune: bool = False
    finetune_updates: int = 80000
    finetune_frozen: int = 10000
    finetune_batch_seconds: float = 8 * 3200000 / SAMPLE_RATE  # 8 GPUs of 3.2M samples
    finetune_checkpoints: int = 2
    finetune_valid_passes: int = 15


def split_from_manifest(path) -> Split:
    """A wav2vec manifest (root line, then ``path<TAB>num_samples``) -> its size."""
    lines = [line for line in pathlib.Path(path).read_text().splitlines()[1:] if line.strip()]
    samples = 0
    for number, line in enumerate(lines, start=2):
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{path}:{number}: expected 'relative/path<TAB>num_samples', got {line!r}")
        samples += int(parts[1])
    return Split(len(lines), samples / SAMPLE_RATE)


def split_from_audio(folder) -> Split:
    """The audio files under a folder, their durations read from their headers (soundfile.info:
    about 0.1 ms a file, no audio decoded)."""
    import soundfile as sf
    from siamctc_manifests.make_manifest import find_audio_files

    seconds, files = 0.0, find_audio_files(pathlib.Path(folder))
    for path in files:
        info = sf.info(str(path))
        seconds += info.frames / info.samplerate
    return Split(len(files), seconds)


def resolved_config(path, overrides: Sequence[str] = ()) -> dict:
    """A fairseq-hydra-train config as the run sees the settings the plan needs: the yaml file, then
    ``+cpu=check`` (the ``cpu/check.yaml`` next to it, global keys) and ``key.path=value`` overrides."""
    path = pathlib.Path(path)
    config = yaml.safe_load(path.read_text())
    for override in overrides:
        key, _, value = override.partition("=")
        if key.startswith("+"):  # a config group: the file's keys are global
            merge(config, yaml.safe_load((path.parent / key[1:] / f"{value}.yaml").read_text()))
            continue
        node, parts = config, key.lstrip("+").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return config


def merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


# -- the arithmetic -----------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    stage: str
    device: str  # "CPU" or "GPU"
    seconds: float  # on one device
    disk: float  # bytes the stage leaves behind
    basis: str
    group: str = ""  # stages of one group may run side by side
    wall: float = 0.0  # elapsed: a training on several GPUs takes less than its time on one
    status: str = ""
    transient: bool = False  # the disk is freed when the stage is done (the probe's feature cache)


def probe_steps(settings: Settings, train: Split) -> int:
    """The probe's updates: ``probe_steps``, or SUPERB's passes over the training split (as siamctc-probe)."""
    if settings.probe_steps > 0:
        return settings.probe_steps
    return max(1, round(settings.probe_epochs * train.utterances / settings.probe_batch))


def cache_bytes(encoder: Encoder, seconds: float) -> float:
    """The probe's feature cache for ``seconds`` of audio: float16 (frames, layers + 1, dim)."""
    return seconds * FRAMES_PER_SECOND * (encoder.layers + 1) * encoder.dim * 2


def checkpoint_bytes(encoder: Encoder) -> float:
    """A fairseq training checkpoint: float32 weights (fairseq saves fp16 and bf16 weights as float32)
    and Adam's two float32 moments."""
    return encoder.params * (4 + 8)


def parallel_wall(times: Sequence[float], workers: int) -> float:
    """Wall time of independent jobs on ``workers`` slots, each job to the least loaded slot in turn."""
    slots = [0.0] * max(1, workers)
    for t in times:
        slots[slots.index(min(slots))] += t
    return max(slots)


# bytes of manifest and label lines per second of audio (.tsv, .wrd, .ltr, .phn): about 15 characters
# of text and 12 phonemes a second of read speech; an estimate
LABEL_BYTES_PER_SECOND = 90.0


def plan_rows(splits: Dict[str, Split], encoders: Dict[str, Encoder], settings: Settings,
              rates: Dict[str, Rate], gpus: int = 1, cpu_jobs: int = 0,
              cache_budget_gb: Optional[float] = None, streaming: bool = True,
              flac_ratio: float = 0.56, audio_files: Optional[int] = None, keep_cache: bool = False) -> List[Row]:
    """One Row per stage, in the order they run.

    ``splits``: train, valid, test (test-clean at 1.0x). ``encoders``: hubert, wavlm (the base
    checkpoints; each has a SiamCTC variant of the same size). ``gpus``: training divides its time by
    it (linear scaling, an assumption) and the four probes run one per GPU. ``cpu_jobs`` > 0: the
    whole run is on the CPU (--tiny) with that many jobs of a group side by side. ``streaming``:
    siamctc-probe runs the encoder in its loop when the cache would pass ``cache_budget_gb``;
    without that option the cache is always written. ``flac_ratio``: FLAC bytes over 16-bit PCM
    bytes (LibriSpeech's test-clean: 5.4 h in 346 MB). ``audio_files``: files to list in the
    manifests (default: the utterances). ``keep_cache``: the probes' feature caches stay on disk."""
    r = {key: rate.value for key, rate in rates.items()}
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    device = "CPU" if cpu_jobs else "GPU"
    utterances = train.utterances + valid.utterances + test.utterances
    files = audio_files if audio_files is not None else utterances
    test_copies = sum(test.seconds / s for s in SPEEDS)  # seconds of the four speed copies
    test_all = test.seconds + test_copies
    factor = {"hubert": 1.0, "wavlm": r["wavlm_factor"]}
    rows = [
        Row("manifests", "CPU", 3 * r["start_tool"] + files * r["manifest_file"],
            50.0 * utterances, f"{files:,} audio files"),
        Row("labels", "CPU", r["start_tool"] + utterances * r["labels_utt"],
            LABEL_BYTES_PER_SECOND * (train.seconds + valid.seconds + test.seconds), f"{utterances:,} utterances"),
        Row("speed copies", "CPU", r["start_torch"] + test.seconds * len(SPEEDS) * r["speed_audio"],
            test_copies * (SAMPLE_RATE * 2 * flac_ratio + LABEL_BYTES_PER_SECOND),
            f"test {hours(test.seconds)} x {len(SPEEDS)} speeds: {sum(1 / s for s in SPEEDS):.2f} x its "
            f"duration in 16-bit FLAC"),
    ]
    for name, encoder in encoders.items():
        f = factor[encoder.kind]
        # the validation passes put both views of every valid utterance through the encoder
        seconds = r["start_gpu"] + f * (settings.siamctc_updates * r["siamctc_update"]
                                        + settings.siamctc_valid_passes * 2 * valid.seconds * r["forward"])
        rows.append(Row(f"siamctc {name}", device, seconds,
                        settings.siamctc_checkpoints * checkpoint_bytes(encoder),
                        f"{settings.siamctc_updates:,} updates x {f * r['siamctc_update']:.3g} s", "siamctc"))
    for name, encoder in encoders.items():
        rows.append(Row(f"export {name}", "CPU", r["export"], 4.0 * encoder.params,
                        "one checkpoint read, its encoder written", "export"))
    steps = probe_steps(settings, train)
    for name, encoder in encoders.items():
        f = factor[encoder.kind]
        cache = cache_bytes(encoder, train.seconds + valid.seconds + test_all)
        cached = not streaming or cache_budget_gb is None or cache <= cache_budget_gb * GB
        if cached:
            update_bytes = cache_bytes(encoder, settings.probe_batch * train.mean_seconds)
            read = (steps * update_bytes + settings.probe_evals * cache_bytes(encoder, valid.seconds)
                    + cache_bytes(encoder, test_all)) / (r["cache_read"] * GB)
            seconds = (r["start_gpu"] + f * (train.seconds + valid.seconds + test_all) * r["forward_single"]
                       + settings.probe_seeds * (steps * r["probe_head_update"] + read))
            removed = "" if keep_cache else ", removed when done"
            basis = (f"cached ({size(cache)}{removed}): features once, then {steps:,} updates "
                     f"x {settings.probe_seeds} seed(s) reading {size(update_bytes)} each")
        else:
            audio = steps * settings.probe_batch * train.mean_seconds + settings.probe_evals * valid.seconds + test_all
            seconds = r["start_gpu"] + settings.probe_seeds * f * audio * r["forward"]
            basis = (f"streamed (its cache, {size(cache)}, passes {cache_budget_gb:g} GB): {steps:,} updates x "
                     f"{settings.probe_batch} x {train.mean_seconds:.1f} s of audio x {1000 * f * r['forward']:.2g} "
                     f"ms/s + {settings.probe_evals} valid passes; an estimate")
            cache = 0.0
        for variant in (name, f"{name}_siamctc"):
            rows.append(Row(f"probe {variant}", device, seconds, cache, basis, "probe", transient=not keep_cache))
    if settings.finetune:
        batch = settings.finetune_batch_seconds
        for name, encoder in encoders.items():
            f = factor[encoder.kind]
            # frozen updates run the forward only: a third of forward and backward (the assumption above)
            audio = (settings.finetune_frozen / 3 + settings.finetune_updates - settings.finetune_frozen) * batch
            seconds = r["start_gpu"] + f * (audio * r["train_audio"]
                                            + settings.finetune_valid_passes * valid.seconds * r["forward"])
            checkpoints = settings.finetune_checkpoints * checkpoint_bytes(encoder)
            basis = (f"{settings.finetune_updates:,} updates x {batch:,.0f} s of audio x "
                     f"{1000 * f * r['train_audio']:.2g} ms/s, the first {settings.finetune_frozen:,} encoder frozen")
            # the base checkpoint is converted to fairseq's format first (an export)
            rows.append(Row(f"finetune {name}", device, seconds + r["export"], checkpoints + 4.0 * encoder.params,
                            basis + "; after an export", "finetune"))
            rows.append(Row(f"finetune {name}_siamctc", device, seconds, checkpoints, basis, "finetune"))
        decode = r["start_gpu"] + sum(2 * factor[e.kind] for e in encoders.values()) * test_all * r["forward"]
        rows.append(Row("decode", device, decode, 1e6, f"4 models x test at 5 speeds ({hours(test_all)})"))
    rows.append(Row("report", "CPU", r["start_tool"], 1e5, "tables and figure"))
    set_wall(rows, gpus, cpu_jobs)
    return rows


def set_wall(rows: Sequence[Row], gpus: int, cpu_jobs: int) -> None:
    """Each stage's elapsed time: a training on ``gpus`` GPUs takes its time divided by them (linear
    scaling, an assumption); every other stage runs on one device."""
    for row in rows:
        row.wall = row.seconds / gpus if not cpu_jobs and row.group in ("siamctc", "finetune") else row.seconds


def total_wall(rows: Sequence[Row], gpus: int, cpu_jobs: int) -> float:
    """Elapsed time of the rows' stages, group after group: on the CPU (``cpu_jobs`` > 0) the stages of
    a group run that many at a time; on GPUs the probes run one per GPU, everything else in turn."""
    groups: Dict[str, List[Row]] = {}
    for row in rows:
        groups.setdefault(row.group or row.stage, []).append(row)
    total = 0.0
    for group, members in groups.items():
        times = [row.wall for row in members]
        slots = cpu_jobs if cpu_jobs else (gpus if group == "probe" else 1)
        total += parallel_wall(times, slots)
    return total


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.3g} h" if seconds >= 360 else f"{seconds / 60:.3g} min"


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def size(num_bytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.3g} {unit}"
    return f"{num_bytes:.0f} B"


def peak_disk(rows: Sequence[Row], slots: int) -> float:
    """Disk at the fullest moment: what the stages leave, and the largest transient ones that run side by side."""
    kept = sum(row.disk for row in rows if not row.transient and row.status != "skipped")
    transient = sorted((row.disk for row in rows if row.transient and row.status not in ("done", "skipped")),
                       reverse=True)
    return kept + sum(transient[:slots])


def format_plan(rows: Sequence[Row], title: str, gpus: int, cpu_jobs: int = 0) -> str:
    """The plan as a text table with totals."""
    width = max(len(row.stage) for row in rows)
    status_width = max([len(row.status) for row in rows] + [6])
    lines = [title, "", f"{'stage':<{width}}  on   {'time':>8}  {'wall':>8}  {'disk':>8}  "
                        f"{'status':<{status_width}}  basis"]
    for row in rows:
        lines.append(f"{row.stage:<{width}}  {row.device}  {duration(row.seconds):>8}  {duration(row.wall):>8}  "
                     f"{size(row.disk):>8}  {row.status:<{status_width}}  {row.basis}")
    todo = [row for row in rows if row.status not in ("done", "skipped")]
    device_hours = sum(row.seconds for row in todo if row.device == "GPU") / 3600
    cpu_hours = sum(row.seconds for row in todo if row.device == "CPU") / 3600
    wall = total_wall(todo, gpus, cpu_jobs)
    disk = peak_disk(rows, cpu_jobs or gpus)
    left = " (left to do)" if len(todo) < len([row for row in rows if row.status != "skipped"]) else ""
    if cpu_jobs:
        lines.append(f"total{left}: {cpu_hours:.3f} CPU hours, {duration(wall)} wall; disk {size(disk)} at most")
    else:
        lines.append(f"total{left}: {device_hours:.1f} GPU hours ({duration(wall)} wall on {gpus} "
                     f"GPU{'s' * (gpus > 1)}, linear scaling assumed), {cpu_hours:.2f} CPU hours; disk "
                     f"{size(disk)} at most, beside the corpus")
    return "\n".join(lines) + "\n"


def format_rates(rates: Dict[str, Rate]) -> str:
    return "\n".join(f"  {key}: {rate.value:g} {rate.unit} ({rate.source})" for key, rate in rates.items()) + "\n"
