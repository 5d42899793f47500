"""The seq_level_ce criterion, unit_sequence task and emission_table model under fairseq-hydra-train."""

import json
import pathlib

import numpy as np
import pytest
import torch

from conftest import CPU_OVERRIDES, PLUGIN_DIR, run_fairseq
from fairseq_siamctc.data.unit_sequence_dataset import UnitSequenceDataset, read_unit_file

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "examples" / "seq_level_ce"
LABELS = ["aa", "b", "k"]
START = np.array([0.6, 0.3, 0.1])
TRANSITION = np.array([[0.1, 0.65, 0.15], [0.15, 0.1, 0.65], [0.6, 0.2, 0.1]])  # each row + END sums to 1
END = np.array([0.1, 0.1, 0.1])
EMISSION = np.array([[0.85, 0.05, 0.05, 0.05, 0.0], [0.05, 0.8, 0.1, 0.0, 0.05], [0.0, 0.05, 0.05, 0.1, 0.8]])


def sample_labels(rng, count, min_length=3):
    """Label sequences from the bigram chain (START, TRANSITION, END), at least min_length long."""
    sequences = []
    while len(sequences) < count:
        labels = [rng.choice(3, p=START)]
        while True:
            step = rng.choice(4, p=np.append(TRANSITION[labels[-1]], END[labels[-1]]))
            if step == 3:
                break
            labels.append(step)
        if len(labels) >= min_length:
            sequences.append(labels)
    return sequences


def write_unit_corpus(root, seed=0):
    """train/valid .km units emitted from sampled labels, and a .phn label text from other draws."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", 400), ("valid", 60)):
        lines = [" ".join(str(rng.choice(5, p=EMISSION[c])) for c in labels) for labels in sample_labels(rng, count)]
        (root / f"{split}.km").write_text("\n".join(lines) + "\n")
    text = [" ".join(LABELS[c] for c in labels) for labels in sample_labels(rng, 2000, min_length=1)]
    (root / "text.phn").write_text("\n".join(text) + "\n")


def json_logs(output, key):
    return [json.loads(line[line.index("{"):]) for line in output.splitlines() if f'"{key}"' in line and "{" in line]


def test_hydra_train_learns_the_emission_table(tmp_path):
    write_unit_corpus(tmp_path)
    proc = run_fairseq("fairseq-hydra-train", [
        "--config-dir", CONFIG_DIR, "--config-name", "unit_sequence",
        f"common.user_dir={PLUGIN_DIR}", f"task.data={tmp_path}", f"task.label_text={tmp_path / 'text.phn'}",
        "task.num_units=5", f"hydra.run.dir={tmp_path / 'run'}", "optimization.max_update=60",
        "optimization.lr=[0.1]", "dataset.max_tokens=2000", "common.log_interval=5", "common.seed=3",
        *CPU_OVERRIDES,
    ], cwd=tmp_path, timeout=300)
    output = proc.stdout + proc.stderr
    valid = [float(log["valid_loss"]) for log in json_logs(output, "valid_loss")]
    assert len(valid) >= 3
    assert valid[-1] < valid[0] - 0.5
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    emission = checkpoint["model"]["logits"].softmax(-1).numpy()
    # the label order is the sorted label inventory, which is the order of LABELS here
    np.testing.assert_array_equal(emission.argmax(1), EMISSION.argmax(1))
    assert np.abs(emission - EMISSION).sum(1).max() < 0.5


def test_unit_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "train.km"
    path.write_text("1 2 3\n4 x\n")
    with pytest.raises(ValueError, match=r"train.km:2: unit ids must be integers"):
        read_unit_file(path, 10)
    path.write_text("1 2 3\n\n")
    with pytest.raises(ValueError, match=r"train.km:2: empty"):
        read_unit_file(path, 10)
    path.write_text("1 2 3\n4 12\n")
    with pytest.raises(ValueError, match=r"train.km:2: unit id 12 outside \[0, 10\)"):
        read_unit_file(path, 10)


def test_dataset_batches_with_padding_and_dedup(tmp_path):
    path = tmp_path / "train.km"
    path.write_text("1 1 2 2 2 3\n4\n5 5\n")
    sequences = read_unit_file(path, 10, dedup=True)
    assert [s.tolist() for s in sequences] == [[1, 2, 3], [4], [5]]
    dataset = UnitSequenceDataset(read_unit_file(path, 10), shuffle=False)
    order = dataset.ordered_indices().tolist()
    assert order == [1, 2, 0]
    batch = dataset.collater([dataset[i] for i in order])
    assert batch["net_input"]["lengths"].tolist() == [1, 2, 6]
    assert batch["net_input"]["units"].tolist() == [[4, 0, 0, 0, 0, 0], [5, 5, 0, 0, 0, 0], [1, 1, 2, 2, 2, 3]]
    assert batch["ntokens"] == 9 and batch["nsentences"] == 3 and batch["id"].tolist() == [1, 2, 0]
