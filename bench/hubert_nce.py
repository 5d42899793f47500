"""What HuBERT's masked-prediction logits cost with fairseq's broadcast and with the plugin's product.

fairseq's ``HubertModel.compute_nce`` scores S frames against the C class embeddings and each
frame's target through a (C + 1, S, D) broadcast; ``fairseq_siamctc.hubert_nce`` computes the same
logits as one (S, D) x (D, C) product. Timed, forward + backward, one torch thread, CPU seconds
of the process (minimum over ``--repeats``):
- the logits alone at HuBERT Base's second iteration: 500 clusters plus the dictionary's 4
  symbols, ``--frames`` frames, D = 256;
- one step (forward, HuBERT's loss, backward) of the demo's seed HuBERT
  (``examples/demo/seed_hubert.yaml``: 4 layers of 256, 100 clusters) on the demo's batch, two
  crops of 4 s.

    python bench/hubert_nce.py [--frames 3000] [--repeats 3]
"""

import argparse
import contextlib
import pathlib

import torch
import yaml
from omegaconf import OmegaConf

from fairseq_siamctc import hubert_nce  # importing the plugin routes compute_nce to the product
from losses import best_time  # bench/losses.py: CPU seconds of the process, minimum of the repeats

REPO = pathlib.Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def fairseq_logits(enabled: bool):
    from fairseq.models.hubert.hubert import HubertModel

    routed = HubertModel.compute_nce
    if enabled:
        HubertModel.compute_nce = hubert_nce.FAIRSEQ_COMPUTE_NCE
    try:
        yield
    finally:
        HubertModel.compute_nce = routed


def logits_alone(frames, classes=504, dims=256):
    from fairseq.models.hubert.hubert import HubertModel

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(frames, dims, generator=generator, requires_grad=True)
    label_embs = torch.randn(classes, dims, generator=generator, requires_grad=True)
    targets = torch.randint(4, classes, (frames,), generator=generator)
    model = argparse.Namespace(logit_temp=0.1)

    def run():
        negs = label_embs.unsqueeze(1).expand(-1, frames, -1)
        logits = HubertModel.compute_nce(model, x, label_embs[targets], negs)
        torch.nn.functional.cross_entropy(logits, torch.zeros(frames, dtype=torch.long)).backward()

    return run


def demo_seed_step():
    from fairseq.criterions.hubert_criterion import HubertCriterion
    from fairseq.data import Dictionary
    from fairseq.models.hubert import HubertConfig, HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

    recipe = yaml.safe_load((REPO / "examples/demo/seed_hubert.yaml").read_text())
    model_cfg = {k: v for k, v in recipe["model"].items() if k != "_name"}
    task_cfg = OmegaConf.structured(HubertPretrainingConfig(data="unused", labels=["km"], label_rate=100))
    dictionary = Dictionary()
    for unit in range(100):
        dictionary.add_symbol(str(unit))
    torch.manual_seed(0)
    model = HubertModel(OmegaConf.merge(OmegaConf.structured(HubertConfig), model_cfg), task_cfg, [dictionary])
    model.train()
    criterion = HubertCriterion(None, **{k: v for k, v in recipe["criterion"].items() if k != "_name"})
    generator = torch.Generator().manual_seed(1)
    source = torch.randn(2, recipe["task"]["max_sample_size"], generator=generator)
    labels = torch.randint(4, len(dictionary), (2, source.shape[1] // 160), generator=generator)
    sample = {"net_input": {"source": source, "padding_mask": torch.zeros_like(source, dtype=torch.bool)},
              "target_list": [labels], "id": torch.arange(2)}

    def run():
        loss, _, _ = criterion(model, sample)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=3000, help="frames of the logits-alone row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (the minimum is shown)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [(f"logits alone, C = 504, S = {args.frames}, D = 256", logits_alone(args.frames)),
            ("demo seed step, 2 x 4 s, C = 104", demo_seed_step())]
    print("forward + backward, CPU s (1 thread)   fairseq   product   product / fairseq")
    for name, run in rows:
        seconds = {}
        for broadcast in (True, False):
            with fairseq_logits(broadcast):
                run()  # warm-up
                seconds[broadcast] = best_time(run, args.repeats)
        print(f"{name:38s} {seconds[True]:8.3f}  {seconds[False]:8.3f}  {seconds[False] / seconds[True]:8.2f}")


if __name__ == "__main__":
    main()
