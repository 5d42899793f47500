"""The study's statistics: group error rates and paired bootstrap intervals, against naive loops."""

import numpy as np
import pytest

from fairseq_siamctc.bootstrap import (
    bootstrap_draws,
    group_error_rate,
    paired_difference,
    replicated_differences,
)


def naive_difference(errors_a, errors_b, lengths, utt, seeds_a, seeds_b):
    """One replicate, the slow way: build the resampled test set and seed sets, score each group."""
    def rate(errors, seeds):
        total = 0.0
        for u in utt:
            total += sum(errors[s][u] for s in seeds) / len(seeds)
        return 100.0 * total / sum(lengths[u] for u in utt)
    return rate(errors_a, seeds_a) - rate(errors_b, seeds_b)


def test_replicated_differences_match_a_naive_loop():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 30, 40)
    errors_a = rng.integers(0, 20, (3, 40))
    errors_b = rng.integers(0, 20, (1, 40))  # e.g. the seed encoder: one model
    draws = bootstrap_draws(np.random.default_rng(1), 50, 40, 3, 1)
    fast = replicated_differences(errors_a, errors_b, lengths, draws)
    slow = [naive_difference(errors_a, errors_b, lengths, u, sa, sb) for u, sa, sb in zip(*draws)]
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12)


def test_paired_seeds_draw_whole_chains():
    """paired_seeds: one seed draw for both groups (rows are chains), equal to the naive loop given the
    same draw twice; groups of different sizes cannot be paired."""
    rng = np.random.default_rng(4)
    lengths = rng.integers(5, 30, 40)
    errors_a, errors_b = rng.integers(0, 20, (2, 2, 40))
    draws = bootstrap_draws(np.random.default_rng(5), 60, 40, 2, 2, paired_seeds=True)
    assert draws[1] is draws[2]
    fast = replicated_differences(errors_a, errors_b, lengths, draws)
    slow = [naive_difference(errors_a, errors_b, lengths, u, s, s) for u, s, _ in zip(*draws)]
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="2 and 1"):
        bootstrap_draws(rng, 10, 40, 2, 1, paired_seeds=True)
    # a chain's shift common to both groups cancels when chains are drawn together: a constant
    # 5-point gap in every utterance and chain gives an interval of width 0, which independent
    # draws of two far-apart chains (a seed-encoder effect) would widen
    chain_shift = np.array([[0], [8]])
    base = rng.integers(0, 10, (1, 40)) + chain_shift
    lengths = np.full(40, 20)
    paired = paired_difference(base + 1, base, lengths, replicates=2000, paired_seeds=True)
    assert paired == {"diff": pytest.approx(5.0), "low": pytest.approx(5.0), "high": pytest.approx(5.0)}
    independent = paired_difference(base + 1, base, lengths, replicates=2000)
    assert independent["low"] < 0 < 10 < independent["high"]


def test_group_error_rate_and_interval():
    lengths = np.array([10, 20, 30])
    errors = np.array([[1, 2, 3], [3, 2, 1]])
    assert group_error_rate(errors, lengths) == pytest.approx(100.0 * (2 + 2 + 2) / 60)
    # one model against itself: nothing varies
    assert paired_difference(errors[:1], errors[:1], lengths, replicates=200) == {"diff": 0.0, "low": 0.0, "high": 0.0}
    # two training seeds resampled independently per group: the interval covers their spread
    spread = paired_difference(errors, errors, lengths, replicates=2000)
    assert spread["diff"] == 0.0 and spread["low"] < 0 < spread["high"]
    rng = np.random.default_rng(2)
    lengths = rng.integers(10, 40, 300)
    base = rng.binomial(lengths, 0.3, (3, 300))
    better = rng.binomial(lengths, 0.2, (3, 300))  # 10 points fewer errors
    result = paired_difference(better, base, lengths, replicates=2000)
    assert result["low"] < result["diff"] < result["high"] < 0
    assert -14 < result["low"] and result["high"] < -6


def load_example(relative_path):
    """A script under examples/ as a module."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_tables_from_per_utterance_errors(tmp_path):
    """summarise() on planted per-utterance errors of 3 chains: group PERs recomputed by hand,
    differences with intervals for every SiamCTC variant, the 'mean' column equal to the mean of the
    five speeds."""
    runner = load_example("examples/study/run_study.py")
    rng = np.random.default_rng(3)
    lengths = rng.integers(10, 30, 50)
    rates = {"seed": 0.4, "siamctc_all": 0.3, "siamctc_ctc": 0.35, "control": 0.38}
    encoders = {}
    for group in ("seed", "siamctc_all", "siamctc_ctc", "control"):
        encoders.update({f"{group}_s{s}": (group, s, None) for s in (1, 2, 3)})
    errors = {(name, speed): rng.binomial(lengths, rates[group] + (0.05 if speed != "1.0" else 0.0)).astype(float)
              for name, (group, _, _) in encoders.items() for speed in runner.SPEEDS}
    table = runner.summarise(encoders, lambda name, test, speed: (errors[name, speed], lengths), "test")
    for speed in runner.SPEEDS:
        expected = 100 * np.mean([errors[f"siamctc_all_s{s}", speed] for s in (1, 2, 3)], axis=0).sum() / lengths.sum()
        assert table[speed]["per"]["siamctc_all"]["per"] == pytest.approx(expected)
        assert set(table[speed]["diff"]) == {"siamctc_all - seed", "siamctc_all - control",
                                             "siamctc_ctc - seed", "siamctc_ctc - control"}
        d = table[speed]["diff"]["siamctc_all - seed"]
        assert d["low"] < d["diff"] < d["high"] < 0  # 10 points better, 50 utterances: clearly below 0
        # chain s's SiamCTC against chain s's seed encoder; their mean is the groups' difference
        by_hand = [100 * (errors[f"siamctc_all_s{s}", speed] - errors[f"seed_s{s}", speed]).sum() / lengths.sum()
                   for s in (1, 2, 3)]
        assert d["chains"] == pytest.approx(by_hand) and np.mean(by_hand) == pytest.approx(d["diff"])
    for group in rates:
        mean = np.mean([table[s]["per"][group]["per"] for s in runner.SPEEDS])
        assert table["mean"]["per"][group]["per"] == pytest.approx(mean)
    results = {"settings": {"size": "tiny", "seeds": [1, 2, 3], "probe_seeds": [1]},
               "evaluations": {"probe": {"test": table}}, "stage_seconds": {"total": 1.0}}
    text = runner.study_markdown(results)
    assert "| siamctc_all - control |" in text and "x the seed's" in text
    chains = table["mean"]["diff"]["siamctc_all - seed"]["chains"]
    assert "siamctc_all - seed " + ", ".join(f"{d:+.1f} (s{s})" for d, s in zip(chains, (1, 2, 3))) in text
    runner.plot_study(results, tmp_path / "study.png")
    assert (tmp_path / "study.png").stat().st_size > 0


def test_study_variants_are_the_papers_ablation():
    runner = load_example("examples/study/run_study.py")
    found = runner.variants(ablation=True, temperatures=[0.5], dot_temperatures=[2.0])
    assert found["all"] == [] and found["ctc"] == ["criterion.alpha=0", "criterion.beta=0"]
    assert found["ctc_kld"] == ["criterion.beta=0"] and found["ctc_tince"] == ["criterion.alpha=0"]
    assert found["all_t0.5"] == ["criterion.temperature=0.5"]
    assert found["all_dot_t2"] == ["criterion.similarity=dot", "criterion.temperature=2.0"]
    assert list(found)[0] == "all"


def test_a_data_root_refuses_models_of_another_recipe(tmp_path):
    """Stages are cached by file name: a data root records its recipe on first use and then refuses a
    different one, naming what differs, unless forced (which retrains and records the new one)."""
    import json

    import yaml

    demo = load_example("examples/demo/run_demo.py")
    path = tmp_path / "study" / "recipe.json"
    recipe = demo.recipe_record(dict(demo.SIZES["study"]), {"siamctc_override": []})
    # the configs are recorded parsed, as the files give them
    tiny = demo.REPO / "examples" / "siamctc" / "tiny.yaml"
    assert recipe["configs"]["tiny.yaml"] == yaml.safe_load(tiny.read_text())

    demo.check_recipe(path, recipe, force=False)
    assert json.loads(path.read_text()) == recipe
    demo.check_recipe(path, json.loads(json.dumps(recipe)), force=False)  # the same recipe: accepted

    longer_seed = json.loads(json.dumps(recipe))
    longer_seed["settings"]["seed_updates"] += 400
    longer_seed["configs"]["tiny.yaml"]["criterion"]["temperature"] = 7.0
    with pytest.raises(SystemExit) as refused:
        demo.check_recipe(path, longer_seed, force=False)
    message = str(refused.value)
    assert str(path) in message and "settings.seed_updates" in message
    assert "tiny.yaml.criterion.temperature" in message and "\n" not in message
    assert json.loads(path.read_text()) == recipe  # the record is untouched

    demo.check_recipe(path, longer_seed, force=True)
    assert json.loads(path.read_text()) == longer_seed
