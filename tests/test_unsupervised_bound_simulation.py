"""The bound simulation script: its tables, its plot, and that it would notice a broken bound."""

import dataclasses

import pytest

from fairseq_siamctc.cli import bound_simulation
from fairseq_siamctc.unsupervised.theory import BoundReport


def test_simulation_writes_table_and_plot_with_no_broken_draw(tmp_path, capsys):
    bound_simulation.main(["--output-dir", str(tmp_path), "--draws", "120", "--toy-steps", "0", "--seed", "3"])
    table = (tmp_path / "bound_simulation.md").read_text()
    assert "Theorem 1 on 120 random pairs (|C|=3, |X|=4, N=3, seed 3" in table
    for bound in ("theorem 1", "refined", "Pinsker form"):
        assert f"| {bound} | 0 |" in table
    assert (tmp_path / "bound_scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table in capsys.readouterr().out


def test_broken_draws_are_counted():
    report = BoundReport(
        error_mismatch=0.2, bayes_error=0.1, model_error=0.3, l1_distance=0.01, kl_divergence=1e-4,
        pinv_norm1=2.0, smallest_singular_value=0.1, theorem1_bound=0.5, refined_bound=0.05, pinsker_bound=0.6,
    )
    assert bound_simulation.count_broken([report]) == 1
    assert bound_simulation.count_broken([dataclasses.replace(report, refined_bound=0.25)]) == 0


def test_too_few_positions_skip_every_draw(tmp_path):
    with pytest.raises(SystemExit, match="violated condition 2"):
        bound_simulation.main(["--output-dir", str(tmp_path), "--draws", "3", "--length", "2", "--toy-steps", "0"])


def test_condition_2_of_a_label_file(tmp_path):
    labels = tmp_path / "train.phn"
    # position 1 is always "a", the rest cycles: the position-wise marginals differ
    labels.write_text("a b c a\na b c a b\na c b a\na b a c\n")
    bound_simulation.main(["--output-dir", str(tmp_path), "--draws", "5", "--toy-steps", "0", "--label-text", str(labels)])
    text = (tmp_path / "label_lm_condition2.md").read_text()
    assert text.startswith("Condition 2 for the 2-gram LM of train.phn (3 labels, N=4): smallest singular value")
    # symmetric text: both positions have the same label distribution
    labels.write_text("a b\nb a\n")
    bound_simulation.main(["--output-dir", str(tmp_path), "--draws", "5", "--toy-steps", "0", "--label-text", str(labels)])
    text = (tmp_path / "label_lm_condition2.md").read_text()
    assert "(2 labels, N=2): condition 2 (identifiability) violated" in text and "linearly dependent" in text


def test_toy_table_has_every_seed_of_both_starts():
    text = bound_simulation.toy_markdown(steps=4, seed=7, num_seeds=2)
    rows = [line for line in text.splitlines() if line.startswith(("| default |", "| stationary |"))]
    assert [row.split(" | ")[:2] for row in rows] == [["| default", "7"], ["| default", "8"], ["| stationary", "7"], ["| stationary", "8"]]
    assert rows[-1].endswith("| nan |")
