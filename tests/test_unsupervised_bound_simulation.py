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
