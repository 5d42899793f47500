"""The paper's training step on a base-size HuBERT: peak memory and time, with and without
activation checkpointing, in float32 and under bfloat16 autocast, with the views encoded one pass
each (the model's default) or in one padded pass (``+1pass``, ``model.views_in_one_pass``).

One step is the whole SiamCTC update: the loader (read, crop to 15.6 s, the 0.8x view, collate),
both views through the encoder (``SiamCTCModel``, CNN frozen as the paper trains it), the
objective (``siamctc_loss``, all terms), the backward pass, gradient clipping and AdamW.
The views are the paper's worst case: every perturbed view a 0.8x copy (19.5 s), which one padded
pass makes the originals pay for as well.

Each configuration runs in a fresh process, one torch thread, and takes steps of one utterance,
then of two. Peak memory is measured two ways after each step: the process's maximum resident set
(``getrusage``, an upper bound: the C allocator keeps freed blocks) and the peak of the bytes of the
tensors alive at once (weights, gradients, AdamW's moments and everything the step creates, followed
by a dispatch mode: what a GPU's allocator would hold), each size stepped twice: once followed for
memory, once timed without the dispatch mode. The second size minus the first is what one
more utterance costs, from which the paper's batch of 8 is extrapolated linearly (activations grow
linearly with the batch at a fixed crop). Times are CPU
seconds of the two-utterance step, split into its parts; ratios between configurations are taken
within one invocation, so that a shared machine slows all of them alike.

    python bench/step.py                       # fp32, fp32+ckpt, bf16+ckpt, bf16
    python bench/step.py --configs fp32+1pass fp32 fp32+ckpt+1pass fp32+ckpt
    python bench/step.py --configs fp32 fp32+ckpt --seconds 15.6
"""

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

CONFIGS = ("fp32", "fp32+ckpt", "bf16+ckpt", "bf16", "fp32+1pass", "fp32+ckpt+1pass")
SAMPLE_RATE = 16000


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def live_tensor_peak(existing):
    """A dispatch mode that follows the bytes of every tensor storage alive from its start (``existing``
    tensors and everything an operator creates) and keeps the peak: what CUDA's caching allocator
    reports as ``max_memory_allocated`` for the same step, without the allocator's slack. The
    resident set cannot show it, because the C allocator keeps freed blocks."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    class LiveTensorPeak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.seen = WeakIdKeyDictionary()
            for tensor in existing:
                self.track(tensor)

        def freed(self, nbytes):
            self.live -= nbytes

        def track(self, tensor):
            storage = tensor.untyped_storage()
            if storage in self.seen:
                return
            nbytes = storage.nbytes()
            self.seen[storage] = nbytes
            weakref.finalize(storage, self.freed, nbytes)  # storages keep their Python object while alive
            self.live += nbytes
            self.peak = max(self.peak, self.live)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in tree_flatten(out)[0]:
                if isinstance(value, torch.Tensor) and not value.is_meta:
                    self.track(value)
            return out

    return LiveTensorPeak()


def optimizer_tensors(optimizer):
    return [value for state in optimizer.state.values() for value in state.values() if hasattr(value, "untyped_storage")]


def base_hubert_record():
    """A SiamCTC encoder record of HuBERT Base (fairseq's defaults are the base config), one label set."""
    from fairseq.models.hubert import HubertConfig
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

    model = dataclasses.asdict(HubertConfig())
    model.update(_name="hubert", label_rate=50.0, encoder_layerdrop=0.0)  # no layer drop: steps of equal work
    task = dataclasses.asdict(HubertPretrainingConfig(data="unused", labels=["km"], label_rate=50.0))
    task["_name"] = "hubert_pretraining"
    return {"kind": "hubert", "cfg": {"model": model, "task": task}, "label_set_sizes": [504]}


def write_corpus(folder, count, seconds, seed):
    import soundfile as sf

    rng = np.random.default_rng(seed)
    lines = [folder]
    for i in range(count):
        samples = int(seconds * SAMPLE_RATE) + SAMPLE_RATE  # longer than the crop: it is cut as in training
        sf.write(os.path.join(folder, f"{i}.wav"), (0.1 * rng.standard_normal(samples)).astype(np.float32), SAMPLE_RATE)
        lines.append(f"{i}.wav\t{samples}")
    path = os.path.join(folder, "train.tsv")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def worker(args):
    import torch

    import fairseq_siamctc  # noqa: F401
    from fairseq_siamctc.data.paired_audio_dataset import PairedAudioDataset, ViewSettings
    from fairseq_siamctc.losses import siamctc_loss
    from fairseq_siamctc.models.encoders import build_encoder
    from fairseq_siamctc.models.siamctc import SiamCTCModel, SiamCTCModelConfig, _encoder_overrides

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    options = args.config.split("+")
    bf16, ckpt, one_pass = options[0] == "bf16", "ckpt" in options, "1pass" in options
    cfg = SiamCTCModelConfig(encoder_path="unused", checkpoint_activations=ckpt, views_in_one_pass=one_pass)
    record = base_hubert_record()
    model = SiamCTCModel(cfg, record, build_encoder(record, _encoder_overrides(cfg))).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01)
    # AdamW's moments exist from the first step of a run on, so that both measured steps hold them
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    crop = int(args.seconds * SAMPLE_RATE)
    result = {"config": args.config, "params_m": sum(p.numel() for p in params) / 1e6, "steps": []}

    with tempfile.TemporaryDirectory() as folder:
        manifest = write_corpus(folder, max(args.utterances), args.seconds, args.seed)
        dataset = PairedAudioDataset(
            manifest, views=ViewSettings(speeds=(0.8,), semitones=(0.0,)), max_sample_size=crop, seed=args.seed
        )
        result["rss_model_gb"] = peak_rss_gb()

        def take_step(count, parts):
            clock = time.process_time()

            def lap(name):
                nonlocal clock
                now = time.process_time()
                parts[name] = parts.get(name, 0.0) + now - clock
                clock = now

            batch = dataset.collater([dataset[i] for i in range(count)])["net_input"]
            lap("loader")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(**batch)
            lap("encoder forward")
            # the objective on detached features, so that its forward and backward are timed on their own
            z = out["z"].detach().requires_grad_()
            z_pert = out["z_pert"].detach().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                terms = siamctc_loss(
                    z, z_pert, out["z_padding_mask"], out["z_pert_padding_mask"], model.phi, model.psi,
                    generator=torch.Generator().manual_seed(args.seed),
                )
            terms["loss"].backward()
            finite = bool(torch.isfinite(terms["loss"]))
            lap("objective")
            torch.autograd.backward([out["z"], out["z_pert"]], [z.grad, z_pert.grad])
            lap("encoder backward")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lap("optimizer")
            return int(batch["source_pert"].shape[1]) // 320, finite

        for count in args.utterances:
            # memory and time in two steps of the same size: the dispatch mode that follows the tensors
            # costs a Python call per operator, which would weigh on the objective's many small ones
            tracker = live_tensor_peak(list(model.parameters()) + optimizer_tensors(optimizer))
            with tracker:
                frames, finite = take_step(count, {})
            peak_rss = peak_rss_gb()
            parts = {}
            take_step(count, parts)
            result["steps"].append({
                "utterances": count, "frames": frames, "peak_rss_gb": peak_rss, "peak_live_gb": tracker.peak / 2**30,
                "parts": parts, "loss_finite": finite,
            })
    print(json.dumps(result))


def run_config(config, args):
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", "--config", config, "--seconds", str(args.seconds),
        "--seed", str(args.seed), "--utterances", *map(str, args.utterances),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"config": config, "error": f"exit status {proc.returncode}: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS[:4]),
                        help="configurations, each in its own process (ratios are to the first)")
    parser.add_argument("--seconds", type=float, default=15.625, help="crop length (the paper's configs: 250,000 samples)")
    parser.add_argument("--utterances", type=int, nargs=2, default=[1, 2],
                        help="batch sizes of the two steps; memory per utterance from their difference, time from the second")
    parser.add_argument("--batch", type=int, default=8, help="batch size to extrapolate peak memory to (the paper's: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the audio, the weights and the negatives")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.utterances[0] >= args.utterances[1]:
        parser.error("--utterances: the second batch must be larger than the first")

    first, second = args.utterances
    print(f"HuBERT Base, CNN frozen; crops of {args.seconds} s with 0.8x views ({args.seconds / 0.8:.2f} s); "
          f"steps of {first} then {second} utterances; one torch thread per configuration")
    results = []
    for config in args.configs:
        started = time.time()
        results.append(run_config(config, args))
        print(f"  {config}: {time.time() - started:.0f} s wall: {json.dumps(results[-1])}", file=sys.stderr, flush=True)

    reference = None
    header = (f"{'config':15s} {'model GB':>8s} {f'peak {first} utt':>10s} {f'peak {second} utt':>10s} "
              f"{'per utt':>8s} {f'peak {args.batch} utt':>10s} {f'live {second} utt':>10s} {f'live {args.batch} utt':>10s} "
              f"{f'CPU s ({second} utt)':>14s} {'x first':>7s}")
    print(header)
    for r in results:
        if "error" in r:
            print(f"{r['config']:15s} failed: {r['error']}")
            continue
        small, large = r["steps"]
        if not (small["loss_finite"] and large["loss_finite"]):
            print(f"{r['config']:15s} non-finite loss")
        per_utt = (large["peak_rss_gb"] - small["peak_rss_gb"]) / (second - first)
        extrapolated = large["peak_rss_gb"] + per_utt * (args.batch - second)
        live_per_utt = (large["peak_live_gb"] - small["peak_live_gb"]) / (second - first)
        live = large["peak_live_gb"] + live_per_utt * (args.batch - second)
        total = sum(large["parts"].values())
        reference = reference or total
        print(f"{r['config']:15s} {r['rss_model_gb']:8.2f} {small['peak_rss_gb']:10.2f} {large['peak_rss_gb']:10.2f} "
              f"{per_utt:8.2f} {extrapolated:10.1f} {large['peak_live_gb']:10.2f} {live:10.1f} {total:14.1f} "
              f"{total / reference:7.2f}")
    print(f"\nshare of the {second}-utterance step (% of CPU time)")
    names = ["loader", "encoder forward", "objective", "encoder backward", "optimizer"]
    print(f"{'config':15s} " + " ".join(f"{n:>16s}" for n in names))
    for r in results:
        if "error" not in r:
            parts = r["steps"][1]["parts"]
            total = sum(parts.values())
            print(f"{r['config']:15s} " + " ".join(f"{100 * parts[n] / total:16.2f}" for n in names))


if __name__ == "__main__":
    main()
