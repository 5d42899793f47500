"""Data-parallel training averages gradients right: 2 CPU processes (gloo) with 4 utterances each end
with the weights of 1 process with all 8, once nothing random depends on the process (no dropout, no
TINCE negatives)."""

import torch

import fairseq_siamctc  # noqa: F401  (compat: safe loading of fairseq checkpoints)
from conftest import CPU_OVERRIDES, PLUGIN_DIR, run_fairseq, write_audio_corpus
from tiny_checkpoints import tiny_hubert_checkpoint

EXAMPLES = PLUGIN_DIR.parent / "examples"

# Plain SGD: Adam's first steps are lr * sign(gradient), blind to how the gradient was scaled, so a
# wrong average would go unseen. Every crop is 1.5 s (max_sample_size), so the two views are the only
# padding; the views depend on (seed, epoch, utterance) only.
DETERMINISTIC = [
    "task.max_sample_size=24000", "optimization.max_update=3", "lr_scheduler.warmup_updates=1",
    "dataset.disable_validation=true", "criterion.beta=0",
    "++model.dropout=0", "++model.attention_dropout=0", "++model.activation_dropout=0",
    "++model.dropout_input=0", "++model.encoder_layerdrop=0",
    "optimizer._name=sgd", "~optimizer.adam_betas", "~optimizer.adam_eps", "optimizer.weight_decay=0",
    "++optimizer.momentum=0.0", "optimization.lr=[0.1]", "++optimizer.lr=[0.1]",
]


def weights(checkpoint):
    state = torch.load(checkpoint, weights_only=True)["model"]
    return {k: v.double() for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}


def test_two_processes_of_4_utterances_equal_one_process_of_8(tmp_path):
    corpus = write_audio_corpus(tmp_path / "corpus", splits=(("train", 8), ("valid", 2)))
    base = tmp_path / "hubert.pt"
    tiny_hubert_checkpoint(base)
    common = ["--config-dir", EXAMPLES / "siamctc", "--config-name", "tiny", f"task.data={corpus}",
              f"model.encoder_path={base}", *CPU_OVERRIDES, *DETERMINISTIC]
    run_fairseq("fairseq-hydra-train", [*common, f"hydra.run.dir={tmp_path / 'one'}", "dataset.batch_size=8"],
                cwd=tmp_path)
    proc = run_fairseq("fairseq-hydra-train", [
        *common, f"hydra.run.dir={tmp_path / 'two'}", "dataset.batch_size=4",
        "distributed_training.distributed_world_size=2", "distributed_training.distributed_backend=gloo",
        "distributed_training.ddp_backend=legacy_ddp",
    ], cwd=tmp_path)
    assert '"bsz": "8"' in proc.stdout  # 4 per process, 8 an update
    one, two = (weights(tmp_path / run / "checkpoints" / "checkpoint_last.pt") for run in ("one", "two"))
    assert one.keys() == two.keys()
    # Each SGD step moves a weight by lr * (its share of a gradient clipped to norm 1): at most 0.1.
    # The two runs sum the same float32 terms in another order (two partial sums and an all-reduce,
    # other padded lengths), a few ulps of the gradient, ~1e-8 after the lr; what is left is the
    # weights' own rounding (one ulp at |w| ~ 1 is 6e-8, the largest difference measured). 1e-6 is
    # far below what a wrong average moves: half a step, about 1e-4 on the encoder weights that move most.
    difference = max((one[k] - two[k]).abs().max().item() for k in one)
    assert difference < 1e-6
    base_state = torch.load(base, weights_only=True)["model"]
    moved = max((one[f"encoder.{k}"] - v.double()).abs().max().item() for k, v in base_state.items()
                if f"encoder.{k}" in one and v.is_floating_point())
    assert moved > 100 * 1e-6  # the encoder trained (6e-4 measured): not a comparison of two untouched copies
