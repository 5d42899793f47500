"""Greedy CTC decoding throughput: length-sorted batches against one utterance at a time, one test set.

    python bench/decode.py [--data data/builtin/manifests] [--split test] [--size demo|base]
                           [--checkpoint FINETUNED.pt] [--labels phn] [--autocast none|fp16|bf16]
                           [--batch-size N] [--max-tokens N] [--max-padding 0.1]
                           [--tie-atol 1e-3] [--tie-rtol R] [--threads 1] [--repeats 3]

Both ways decode the same utterances in the same process, alternately, ``--repeats`` times; each
way's time is its fastest repeat, so a load the shared machine puts on one repeat does not count.
The audio is read into memory first: only the model, the argmax and the collapse are timed. Both
ways run in the same precision (``--autocast``).

- one at a time: the fine-tuned model's own forward on each utterance alone (what siamctc-decode
  did before it batched, and the reference for its results);
- batched: ``CtcRecognizer.logits`` and the greedy path on the batches siamctc-decode forms
  (length-sorted, at most ``--max-tokens`` padded samples, ``--batch-size`` utterances on a CPU).

Printed: utterances per second and real-time factor of each and their ratio; how many frames are
near ties (best two logits within ``--tie-atol`` + ``--tie-rtol`` times the frame's largest
|logit|, in the one-at-a-time logits); for how many utterances the label sequences differ and
whether every frame whose label differs is a near tie (else the utterances where one is not are
named, and the exit status is 1); and the error rate of both ways where ``DIR/{split}.{labels}``
exists. Without ``--checkpoint`` the model is fairseq's ``hubert_ctc`` with random weights around
a HuBERT of the demo seed's size (4 layers, 256 dims, 128-channel CNN) or of HuBERT Base's
(``--size base``), with the data's dictionary: the time does not depend on the weights (its
error rate is that of random labels).
"""

import argparse
import logging
import os
import pathlib
import sys
import tempfile
import time
import types

import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary
from fairseq.data.data_utils import post_process
from fairseq.models.hubert import HubertConfig, HubertModel, hubert_asr
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig, HubertPretrainingTask
from omegaconf import OmegaConf

import fairseq_siamctc  # noqa: F401  (compatibility fixes)
from fairseq_siamctc.cli.decode import (MAX_TOKENS, CtcRecognizer, check_device, default_batch_size,
                                        default_post_process, error_rate, metric_name)
from fairseq_siamctc.data.audio import read_audio
from fairseq_siamctc.data.paired_audio_dataset import read_manifest
from fairseq_siamctc.decoding import (AUTOCAST_DTYPES, MAX_PADDING, autocast_dtype, flips_beyond_ties, greedy_ctc,
                                      length_sorted_batches, near_tie_frames, tie_rtol)

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZES = {
    "demo": dict(conv_feature_layers="[(128,10,5)] + [(128,3,2)] * 4 + [(128,2,2)] * 2", encoder_layers=4,
                 encoder_embed_dim=256, encoder_ffn_embed_dim=1024, encoder_attention_heads=4, conv_pos=64,
                 conv_pos_groups=16, final_dim=256),
    "base": dict(),  # fairseq's defaults are HuBERT Base
}


def random_hubert_ctc(size: str, dictionary: Dictionary) -> torch.nn.Module:
    """fairseq's hubert_ctc (random weights) around a HuBERT of the given size, built through a
    pretraining checkpoint as fine-tuning builds it."""
    torch.manual_seed(0)
    model_cfg = OmegaConf.merge(OmegaConf.structured(HubertConfig), {"label_rate": 50.0, **SIZES[size]})
    task_cfg = HubertPretrainingConfig(data="unused", labels=["km"], label_rate=50.0)
    task = HubertPretrainingTask(OmegaConf.structured(task_cfg))
    units = Dictionary()
    for unit in range(100):
        units.add_symbol(str(unit))
    task.state.add_factory("dictionaries", lambda: [units])
    pretrained = HubertModel(model_cfg, task_cfg, task.dictionaries)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "hubert.pt")
        checkpoint_utils.torch_persistent_save({
            "cfg": {"model": {**OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True), "_name": "hubert"},
                    "task": {**OmegaConf.to_container(OmegaConf.structured(task_cfg), enum_to_str=True),
                             "_name": "hubert_pretraining"}},
            "model": pretrained.state_dict(), "task_state": task.state_dict(), "args": None,
            "optimizer_history": [{"criterion_name": "HubertCriterion", "optimizer_name": "FairseqAdam",
                                   "lr_scheduler_state": {"best": None}, "num_updates": 0}],
            "extra_state": {}, "criterion": None, "last_optimizer_state": None}, path)
        cfg = OmegaConf.structured(hubert_asr.HubertCtcConfig(w2v_path=path, data="unused", normalize=False))
        target = types.SimpleNamespace(source_dictionary=None, target_dictionary=dictionary)
        return hubert_asr.HubertCtc.build_model(cfg, target).eval()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def margin_text(atol: float, rtol: float) -> str:
    """The near-tie margin in words: '1e-3', '0.0625 x the frame's largest |logit|', or both summed."""
    parts = ([f"{atol:g}"] if atol or not rtol else []) + ([f"{rtol:g} x the frame's largest |logit|"] if rtol else [])
    return " + ".join(parts)


def compare(names, alone, batched, atol: float, rtol: float):
    """The two ways' hypotheses and logits, utterance by utterance.

    alone: per utterance (labels, logits (T, V)); batched: the same from the batches. Returns
    (near-tie frames, frames, frames whose label differs, indices of the differing utterances, and
    for each differing utterance not explained by near ties its name and why).
    """
    ties = frames = changed = 0
    differing, unexplained = [], []
    for index, (name, (hyp, logits), (batched_hyp, batched_logits)) in enumerate(zip(names, alone, batched)):
        ties += int(near_tie_frames(logits, atol, rtol).sum())
        frames += logits.size(0)
        same_frames = logits.shape == batched_logits.shape
        if same_frames:
            changed += int((logits.argmax(-1) != batched_logits.argmax(-1)).sum())
        if hyp == batched_hyp:
            continue
        differing.append(index)
        if not same_frames:
            unexplained.append(f"{name} ({logits.size(0)} frames alone, {batched_logits.size(0)} batched)")
        else:
            beyond = int(flips_beyond_ties(logits, batched_logits, atol, rtol).sum())
            if beyond:
                unexplained.append(f"{name} ({beyond} frame(s) whose label differs are not near ties)")
    return ties, frames, changed, differing, unexplained


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO / "data/builtin/manifests"),
                        help="folder of {split}.tsv, label files and (without --checkpoint) dict.{labels}.txt "
                             "(default: the built-in corpus, `make corpus`)")
    parser.add_argument("--split", default="test", help="split to decode (default: test)")
    parser.add_argument("--labels", default="phn",
                        help="label file extension for the error rate and the random model's dictionary (default: phn)")
    parser.add_argument("--post-process", default=None,
                        help="fairseq post_process symbol for scoring (default: as siamctc-decode's for --labels)")
    parser.add_argument("--size", choices=sorted(SIZES), default="demo",
                        help="size of the random-weight model without --checkpoint (default: demo)")
    parser.add_argument("--checkpoint", default=None, help="a fine-tuned CTC checkpoint to time instead")
    parser.add_argument("--autocast", choices=list(AUTOCAST_DTYPES), default="none",
                        help="encoder precision of both ways, as siamctc-decode's --autocast (default: none)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="most utterances in a batch (default: as siamctc-decode: 16 on a CPU, no limit on a GPU)")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                        help=f"most padded samples in a batch (default: {MAX_TOKENS})")
    parser.add_argument("--max-padding", type=float, default=MAX_PADDING,
                        help=f"largest share of padding in a batch (default: {MAX_PADDING})")
    parser.add_argument("--tie-atol", type=float, default=1e-3,
                        help="a frame is a near tie where its best two logits are within this (plus --tie-rtol's "
                             "share; default: 1e-3)")
    parser.add_argument("--tie-rtol", type=float, default=None,
                        help="... plus this times the frame's largest |logit| (default: 16 units of the rounding "
                             "the encoder runs in: 2^-7 for fp16 and for float32 on CUDA with TF32 allowed, 2^-4 "
                             "for bf16, 0 for float32 on a CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each way (default: 3)")
    args = parser.parse_args(argv)
    if (args.batch_size is not None and args.batch_size < 1) or args.max_tokens < 1 or args.repeats < 1:
        parser.error(f"--batch-size, --max-tokens and --repeats must be positive, got {args.batch_size}, "
                     f"{args.max_tokens} and {args.repeats}")
    logging.disable(logging.INFO)
    torch.set_num_threads(args.threads)
    manifest_path = os.path.join(args.data, f"{args.split}.tsv")
    if not os.path.isfile(manifest_path):
        sys.exit(f"bench/decode.py: error: {manifest_path} not found (build the corpus with `make corpus`)")
    try:
        device = check_device(args.device)
        if args.checkpoint:
            recognizer = CtcRecognizer.load(args.checkpoint, args.device, args.autocast)
            label = args.checkpoint
        else:
            dictionary = Dictionary.load(os.path.join(args.data, f"dict.{args.labels}.txt"))
            model = random_hubert_ctc(args.size, dictionary).to(device)
            dtype = autocast_dtype(args.autocast, device)
            recognizer = CtcRecognizer(model, dictionary, False, dictionary.bos(), dtype)
            label = f"hubert_ctc, {args.size} size, random weights"
        manifest = read_manifest(manifest_path)
        wavs = [read_audio(os.path.join(manifest.root, f)) for f in manifest.files]
    except (OSError, ValueError) as err:
        sys.exit(f"bench/decode.py: error: {err}")
    atol = args.tie_atol
    rtol = tie_rtol(recognizer.autocast, recognizer.device) if args.tie_rtol is None else args.tie_rtol
    parameters = sum(p.numel() for p in recognizer.model.parameters())
    audio_seconds = sum(map(len, wavs)) / 16000
    batch_size = args.batch_size or default_batch_size(recognizer.device)
    if not recognizer.batched:
        batch_size = 1  # as siamctc-decode: a model not known to be padding-independent
    batches = length_sorted_batches([len(w) for w in wavs], batch_size, args.max_tokens, args.max_padding)
    padded = sum(len(b) * max(len(wavs[i]) for i in b) for b in batches) / 16000

    def one_at_a_time():  # recognizer.decode, with its logits kept for the comparison
        results = []
        for wav in wavs:
            logits = recognizer.alone_logits(wav)
            lengths = torch.tensor([logits.size(0)], device=logits.device)
            results.append((greedy_ctc(logits[None], lengths, recognizer.blank_index, recognizer.removed)[0], logits))
        return results

    def batched():  # recognizer.decode_batch on each batch, results in manifest order with their logits
        results = [None] * len(wavs)
        for batch in batches:
            logits, lengths = recognizer.logits([wavs[i] for i in batch])
            hyps = greedy_ctc(logits, lengths, recognizer.blank_index, recognizer.removed)
            for row, (index, hyp) in enumerate(zip(batch, hyps)):
                results[index] = (hyp, logits[row], lengths[row])
        return results

    def sync():
        if recognizer.device.type == "cuda":
            torch.cuda.synchronize()

    batched(), one_at_a_time()  # warm-up: allocator, kernels
    sync()
    times = {"one at a time": [], "batched": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("one at a time", one_at_a_time), ("batched", batched)):
            seconds, results[name] = timed(lambda: (fn(), sync())[0])
            times[name].append(seconds)
    best = {name: min(values) for name, values in times.items()}
    alone = results["one at a time"]
    batched_trimmed = [(hyp, logits[:int(length)]) for hyp, logits, length in results["batched"]]
    ties, frames, changed, differing, unexplained = compare(manifest.files, alone, batched_trimmed, atol, rtol)
    precision = "float32" if recognizer.autocast is None else f"{args.autocast} autocast"
    print(f"{label}: {parameters / 1e6:.1f} M parameters, device {recognizer.device}, {precision}, "
          f"{args.threads} thread(s)")
    print(f"{args.split}: {len(wavs)} utterances, {audio_seconds:.1f} s of audio; {len(batches)} batches of at most "
          f"{batch_size or 'any number of'} utterances and {args.max_tokens} samples "
          f"({padded:.1f} s padded, {100 * (padded / audio_seconds - 1):.1f} % padding)")
    print(f"{'':16}{'seconds':>9}{'utt/s':>9}{'RTF':>9}   (fastest of {args.repeats})")
    for name, seconds in best.items():
        print(f"{name:16}{seconds:9.3f}{len(wavs) / seconds:9.1f}{seconds / audio_seconds:9.4f}")
    print(f"batched / one at a time: {best['one at a time'] / best['batched']:.2f}x faster")
    margin = margin_text(atol, rtol)
    print(f"near ties: {ties} of {frames} frames have their top two logits within {margin} (one at a time); "
          f"the label differs between the two ways at {changed} frame{'' if changed == 1 else 's'}")
    line = f"hypotheses differ for {len(differing)} of {len(wavs)} utterances"
    if differing and not unexplained:
        line += f", all at frames whose top two logits are within {margin}"
    elif unexplained:
        line += f"; {len(unexplained)} of them not only at near ties: " + ", ".join(unexplained)
    print(line)
    label_path = os.path.join(args.data, f"{args.split}.{args.labels}")
    if os.path.isfile(label_path):
        symbol = args.post_process or default_post_process(args.labels)
        with open(label_path, encoding="utf-8") as f:
            references = [post_process(line, symbol) for line in f.read().splitlines()]
        if len(references) == len(wavs):
            scores = {name: error_rate([recognizer.to_text(hyp, symbol) for hyp, *_ in results[name]], references)
                      for name in ("one at a time", "batched")}
            metric = metric_name(args.labels, symbol)
            print(", ".join(f"{metric} {name} {score['error_rate']:.2f} % ({score['errors']}/{score['ref_tokens']})"
                            for name, score in scores.items()))
        else:
            print(f"{label_path} has {len(references)} lines for {len(wavs)} utterances: no error rate")
    else:
        print(f"no {label_path}: no error rate")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
