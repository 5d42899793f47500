"""Greedy CTC decoding throughput: length-sorted batches against one utterance at a time, one test set.

    python bench/decode.py [--data data/builtin/manifests] [--split test] [--size demo|base]
                           [--checkpoint FINETUNED.pt] [--batch-size 16] [--max-padding 0.1]
                           [--threads 1] [--repeats 3]

Both ways decode the same utterances in the same process, alternately, ``--repeats`` times; each
way's time is its fastest repeat, so a load the shared machine puts on one repeat does not count.
The audio is read into memory first: only the model, the argmax and the collapse are timed.

- one at a time: the fine-tuned model's own forward on each utterance alone (what siamctc-decode
  did before it batched, and the reference for its results);
- batched: ``CtcRecognizer.decode_batch`` on the batches siamctc-decode forms (length-sorted, at
  most ``--batch-size`` utterances and ``--max-tokens`` padded samples).

Printed: utterances per second and real-time factor of each, their ratio, and whether every
utterance's label sequence is identical. Without ``--checkpoint`` the model is fairseq's
``hubert_ctc`` with random weights around a HuBERT of the demo seed's size (4 layers, 256 dims,
128-channel CNN) or of HuBERT Base's (``--size base``), with the data's phoneme dictionary: the
time does not depend on the weights.
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
from fairseq.models.hubert import HubertConfig, HubertModel, hubert_asr
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig, HubertPretrainingTask
from omegaconf import OmegaConf

import fairseq_siamctc  # noqa: F401  (compatibility fixes)
from fairseq_siamctc.cli.decode import BATCH_SIZE, MAX_TOKENS, CtcRecognizer
from fairseq_siamctc.data.audio import read_audio
from fairseq_siamctc.data.paired_audio_dataset import read_manifest
from fairseq_siamctc.decoding import MAX_PADDING, length_sorted_batches

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO / "data/builtin/manifests"),
                        help="folder of {split}.tsv and dict.phn.txt (default: the built-in corpus, `make corpus`)")
    parser.add_argument("--split", default="test", help="split to decode (default: test)")
    parser.add_argument("--size", choices=sorted(SIZES), default="demo",
                        help="size of the random-weight model without --checkpoint (default: demo)")
    parser.add_argument("--checkpoint", default=None, help="a fine-tuned CTC checkpoint to time instead")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"(default: {BATCH_SIZE})")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help=f"(default: {MAX_TOKENS})")
    parser.add_argument("--max-padding", type=float, default=MAX_PADDING,
                        help=f"largest share of padding in a batch (default: {MAX_PADDING})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each way (default: 3)")
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)
    torch.set_num_threads(args.threads)
    manifest_path = os.path.join(args.data, f"{args.split}.tsv")
    if not os.path.isfile(manifest_path):
        sys.exit(f"bench/decode.py: error: {manifest_path} not found (build the corpus with `make corpus`)")
    manifest = read_manifest(manifest_path)
    wavs = [read_audio(os.path.join(manifest.root, f)) for f in manifest.files]
    if args.checkpoint:
        recognizer = CtcRecognizer.load(args.checkpoint, args.device)
        label = args.checkpoint
    else:
        dictionary = Dictionary.load(os.path.join(args.data, "dict.phn.txt"))
        model = random_hubert_ctc(args.size, dictionary).to(args.device)
        recognizer = CtcRecognizer(model, dictionary, False, dictionary.bos())
        label = f"hubert_ctc, {args.size} size, random weights"
    parameters = sum(p.numel() for p in recognizer.model.parameters())
    audio_seconds = sum(map(len, wavs)) / 16000
    batches = length_sorted_batches([len(w) for w in wavs], args.batch_size, args.max_tokens, args.max_padding)
    padded = sum(len(b) * max(len(wavs[i]) for i in b) for b in batches) / 16000

    def one_at_a_time():
        return [recognizer.decode(w) for w in wavs]

    def batched():
        hyps = [None] * len(wavs)
        for batch in batches:
            for index, hyp in zip(batch, recognizer.decode_batch([wavs[i] for i in batch])):
                hyps[index] = hyp
        return hyps

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
    identical = results["one at a time"] == results["batched"]
    differing = sum(a != b for a, b in zip(results["one at a time"], results["batched"]))
    print(f"{label}: {parameters / 1e6:.1f} M parameters, device {recognizer.device}, {args.threads} thread(s)")
    print(f"{args.split}: {len(wavs)} utterances, {audio_seconds:.1f} s of audio; {len(batches)} batches of at most "
          f"{args.batch_size} ({padded:.1f} s padded, {100 * (padded / audio_seconds - 1):.1f} % padding)")
    print(f"{'':16}{'seconds':>9}{'utt/s':>9}{'RTF':>9}   (fastest of {args.repeats})")
    for name, seconds in best.items():
        print(f"{name:16}{seconds:9.3f}{len(wavs) / seconds:9.1f}{seconds / audio_seconds:9.4f}")
    print(f"batched / one at a time: {best['one at a time'] / best['batched']:.2f}x faster; hypotheses "
          f"{'identical' if identical else f'DIFFER for {differing} of {len(wavs)} utterances'}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
