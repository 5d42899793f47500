"""The paper's SiamCTC step on a GPU: peak memory, step time and the objective's share per precision,
and where the objective's time goes.

    python bench/gpu.py --device cuda                      # HuBERT Base
    python bench/gpu.py --device cuda --model wavlm        # WavLM Base
    python bench/gpu.py --device cuda --viterbi torchaudio # the objective with torchaudio's aligner
    python bench/gpu.py --device cpu --size tiny           # a quick check that it runs (times mean nothing)

The step is bench/step.py's: the loader (read, crop, the 0.8x view, collate), both views through
the encoder (``SiamCTCModel``, random weights, CNN frozen as the paper trains it, no layer drop),
``siamctc_loss`` with all terms, the backward pass, gradient clipping and AdamW; at the paper's
batch, 8 crops of 15.6 s with every perturbed view a 0.8x copy (976 frames), the worst case.
Configurations: float32, bfloat16 or float16 autocast, ``+ckpt`` with activation checkpointing
(float16 under autocast without loss scaling: fairseq's fp16 trainer keeps half-precision weights
instead, which this does not reproduce).

Per configuration, in one process: peak allocated memory over two warm-up steps
(``torch.cuda.max_memory_allocated``, after AdamW's moments exist), the median over ``--steps``
of the step time and of the objective's (forward and backward of ``siamctc_loss`` on the encoder's
detached outputs, timed with CUDA events), and the objective's share of the step. Then one
objective call of the first configuration under torch.profiler: its top operators by GPU time
and the number of kernels it launched. On a CPU the same runs with wall-clock times and no memory.
"""

import argparse
import functools
import json
import logging
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import step as step_bench  # noqa: E402  (bench/step.py: the base HuBERT record, the audio corpus)

import fairseq_siamctc  # noqa: E402,F401  (compatibility fixes)
from fairseq_siamctc import losses  # noqa: E402
from fairseq_siamctc.data.paired_audio_dataset import PairedAudioDataset, ViewSettings  # noqa: E402
from fairseq_siamctc.models.encoders import build_encoder  # noqa: E402
from fairseq_siamctc.models.siamctc import SiamCTCModel, SiamCTCModelConfig, _encoder_overrides  # noqa: E402

CONFIGS = ("fp32", "fp32+ckpt", "bf16", "bf16+ckpt", "fp16+ckpt")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TINY_CONV = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"  # the same 320x downsampling as Base
TINY = dict(conv_feature_layers=TINY_CONV, encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
            encoder_attention_heads=2, conv_pos=16, conv_pos_groups=4)
SIZES = {"base": dict(batch=8, seconds=15.625), "tiny": dict(batch=2, seconds=2.0)}


def encoder_record(model: str, size: str) -> dict:
    """The encoder record SiamCTCModel is built from: HuBERT Base or WavLM Base, or a tiny one."""
    if model == "hubert":
        record = step_bench.base_hubert_record()
        if size == "tiny":
            record["cfg"]["model"].update(TINY, final_dim=32)
        return record
    return {"kind": "wavlm", "cfg": dict(TINY) if size == "tiny" else {}, "label_set_sizes": None}


class WallClock:
    """CUDA events' interface on a CPU."""

    def record(self):
        self.time = time.perf_counter()

    def elapsed_time(self, end):
        return 1000 * (end.time - self.time)


def run(config, args, manifest, device, profile):
    """One configuration: a dict of its figures, and the profiler's table and kernel count if asked."""
    options = config.split("+")
    dtype, checkpointed = DTYPES[options[0]], "ckpt" in options
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    event = functools.partial(torch.cuda.Event, enable_timing=True) if cuda else WallClock
    torch.manual_seed(args.seed)
    cfg = SiamCTCModelConfig(encoder_path="unused", checkpoint_activations=checkpointed)
    record = encoder_record(args.model, args.size)
    model = SiamCTCModel(cfg, record, build_encoder(record, _encoder_overrides(cfg))).train().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01)
    for p in params:  # AdamW's moments exist from a run's first step on: in every measured step
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dataset = PairedAudioDataset(manifest, views=ViewSettings(speeds=(0.8,), semitones=(0.0,)),
                                 max_sample_size=int(args.seconds * step_bench.SAMPLE_RATE), seed=args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def objective(out):
        z, z_pert = out["z"].detach().requires_grad_(), out["z_pert"].detach().requires_grad_()
        with autocast():
            terms = losses.siamctc_loss(z, z_pert, out["z_padding_mask"], out["z_pert_padding_mask"],
                                        model.phi, model.psi, generator=generator)
        terms["loss"].backward()
        return terms, z.grad, z_pert.grad

    def one_step():
        """Times (ms) of the step and of its objective; the step's outputs."""
        marks = [event() for _ in range(4)]
        marks[0].record()
        batch = dataset.collater([dataset[i] for i in range(args.batch)])["net_input"]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast():
            out = model(**batch)
        marks[1].record()
        terms, z_grad, z_pert_grad = objective(out)
        marks[2].record()
        torch.autograd.backward([out["z"], out["z_pert"]], [z_grad, z_pert_grad])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks[3].record()
        sync()
        return marks[0].elapsed_time(marks[3]), marks[1].elapsed_time(marks[2]), terms, out

    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        one_step()
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    times = sorted(one_step()[:2] for _ in range(args.steps))
    step_ms, objective_ms = times[len(times) // 2]
    _, _, terms, out = one_step()
    result = dict(model=args.model, size=args.size, config=config, batch=args.batch,
                  pert_frames=int(out["z_pert"].shape[1]), peak_gb=peak_gb, step_ms=step_ms,
                  objective_ms=objective_ms, objective_share_pct=100 * objective_ms / step_ms,
                  loss=float(terms["loss"]), finite=bool(torch.isfinite(terms["loss"])))
    if profile:
        result["profile"] = profile_objective(lambda: objective(out), cuda, args.top)
    return result


def profile_objective(call, cuda, rows):
    """torch.profiler's table of one objective call (forward and backward) and its kernel launches."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        call()
        sync()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    device_events = [e for e in prof.events() if "CUDA" in str(getattr(e, "device_type", ""))]
    copies = sum(e.name.startswith(("Memcpy", "Memset")) for e in device_events)
    operators = sum(e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))
                    for e in prof.events())
    return dict(table=table, kernels=len(device_events) - copies, copies=copies, top_level_aten_operators=operators)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=("hubert", "wavlm"), default="hubert", help="the Base model of either")
    parser.add_argument("--size", choices=sorted(SIZES), default="base",
                        help="base: the paper's model and batch; tiny: 2 layers, 64 dims, 2 x 2 s (a quick check)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--batch", type=int, help="utterances per step (base: 8, tiny: 2)")
    parser.add_argument("--seconds", type=float, help="crop length in seconds (base: 15.625, tiny: 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (the median is kept)")
    parser.add_argument("--viterbi", choices=losses.VITERBI_BACKENDS, default="auto",
                        help="viterbi_alignment's backend in the objective (auto: Triton on CUDA)")
    parser.add_argument("--top", type=int, default=15, help="rows of the objective's profile")
    parser.add_argument("--seed", type=int, default=0, help="seed of the audio, the weights and the negatives")
    args = parser.parse_args()
    for name, value in SIZES[args.size].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.batch < 1 or args.seconds <= 0 or args.steps < 1:
        parser.error(f"--batch, --seconds and --steps must be positive, got {args.batch}, {args.seconds}, {args.steps}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    losses.viterbi_alignment = functools.partial(losses.viterbi_alignment, backend=args.viterbi)
    logging.disable(logging.INFO)  # fairseq's model and dataset summaries, once per configuration

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (times are wall clock, no memory)"
    print(f"{args.model} {args.size}, {args.batch} x {args.seconds} s crops with 0.8x views, Viterbi {args.viterbi}; "
          f"{name}, torch {torch.__version__}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        manifest = step_bench.write_corpus(folder, args.batch, args.seconds, args.seed)
        for index, config in enumerate(args.configs):
            started = time.time()
            try:
                result = run(config, args, manifest, device, profile=index == 0)
            except torch.cuda.OutOfMemoryError as err:
                result = dict(config=config, error=f"out of memory: {str(err).splitlines()[0]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result["wall_s"] = round(time.time() - started, 1)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "profile"}), file=sys.stderr, flush=True)

    print(f"\n{'config':12s} {'peak GB':>8s} {'step ms':>9s} {'objective ms':>13s} {'objective %':>12s}")
    for r in results:
        if "error" in r:
            print(f"{r['config']:12s} failed: {r['error']}")
            continue
        note = "" if r["finite"] else "  (non-finite loss)"
        print(f"{r['config']:12s} {r['peak_gb']:8.2f} {r['step_ms']:9.1f} {r['objective_ms']:13.1f} "
              f"{r['objective_share_pct']:12.1f}{note}")
    profiled = next((r["profile"] for r in results if "profile" in r), None)
    if profiled:
        launches = (f"{profiled['kernels']} kernel launches, {profiled['copies']} copies, "
                    if device.type == "cuda" else "")
        print(f"\none objective call (forward + backward, {args.configs[0]}, B = {args.batch}, "
              f"{results[0]['pert_frames']} perturbed frames): {launches}"
              f"{profiled['top_level_aten_operators']} aten operator calls")
        print(profiled["table"])


if __name__ == "__main__":
    main()
