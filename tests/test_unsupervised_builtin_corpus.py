"""seq_level_ce on k-means units of the built-in corpus (fairseq's stock MFCC + k-means recipe) with a
phone bigram LM from its .phn labels, trained for a few updates by fairseq-hydra-train."""

import math

import pytest

from conftest import CPU_OVERRIDES, PLUGIN_DIR, needs_corpus_packages, run_fairseq
from test_unsupervised_fairseq import CONFIG_DIR, json_logs

pytestmark = needs_corpus_packages

NUM_UNITS = 20


@pytest.fixture(scope="module")
def corpus_units(tmp_path_factory, tiny_corpus):
    from fairseq_siamctc.data.kmeans_units import dump_kmeans_units

    root = tmp_path_factory.mktemp("builtin_units")
    manifests = tiny_corpus[0] / "manifests"
    dump_kmeans_units(manifests, root / "units", NUM_UNITS, splits=("train", "valid"), seed=0)
    return manifests, root / "units"


def test_units_line_up_with_the_manifest(corpus_units):
    manifests, units = corpus_units
    for split in ("train", "valid"):
        lines = (units / f"{split}.km").read_text().splitlines()
        lengths = [int(line.split("\t")[1]) for line in (manifests / f"{split}.tsv").read_text().splitlines()[1:]]
        assert len(lines) == len(lengths)
        for line, samples in zip(lines, lengths):
            ids = [int(u) for u in line.split()]
            assert all(0 <= u < NUM_UNITS for u in ids)
            assert abs(len(ids) - samples / 160) <= 3  # MFCC at 100 frames a second
        assert len({u for line in lines for u in line.split()}) > NUM_UNITS // 2


def test_hydra_train_on_builtin_corpus_units(corpus_units, tmp_path):
    manifests, units = corpus_units
    proc = run_fairseq("fairseq-hydra-train", [
        "--config-dir", CONFIG_DIR, "--config-name", "unit_sequence",
        f"common.user_dir={PLUGIN_DIR}", f"task.data={units}", f"task.label_text={manifests / 'train.phn'}",
        f"task.label_dict={manifests / 'dict.phn.txt'}", f"task.num_units={NUM_UNITS}",
        "task.dedup_units=true", "task.label_loop_prob=0.5", f"hydra.run.dir={tmp_path / 'run'}",
        "optimization.max_update=5", "common.log_interval=1", *CPU_OVERRIDES,
    ], cwd=tmp_path, timeout=300)
    output = proc.stdout + proc.stderr
    phones = len([line for line in (manifests / "dict.phn.txt").read_text().splitlines() if line.strip()])
    assert f"2-gram over {phones} labels" in output
    valid = [float(log["valid_loss"]) for log in json_logs(output, "valid_loss")]
    assert len(valid) == 5  # the whole tiny train split is one batch: one update an epoch
    assert all(later < earlier for earlier, later in zip(valid, valid[1:]))
    assert all(math.isfinite(v) for v in valid)
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_last.pt").is_file()
