"""`make demo DEMO_SIZE=tiny`: the whole chain, corpus to robustness table, on the tiny corpus."""

import json
import math
import subprocess
import sys

import editdistance

from conftest import PLUGIN_DIR, needs_corpus_packages

pytestmark = needs_corpus_packages

DEMO = PLUGIN_DIR.parent / "examples" / "demo" / "run_demo.py"
SPEEDS = ["0.8", "0.9", "1.0", "1.1", "1.2"]


def test_tiny_demo_writes_complete_results(tiny_corpus, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    # the session's tiny corpus stands in for the demo's first stage (same builder, same seed)
    (data / "builtin_tiny").symlink_to(tiny_corpus[0], target_is_directory=True)
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(DEMO), "--size", "tiny", "--out", str(out),
                           "--data-root", str(data)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "== corpus: already done" in proc.stdout and "[seed] update" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["seconds"] > 0
    assert list(results["stage_seconds"]) == ["corpus", "units", "seed", "siamctc", "finetune", "evaluate"]
    table = (out / "results.md").read_text()
    for key, test_set in (("per", "test"), ("per_real", "test_real")):
        assert list(results[key]) == ["seed", "siamctc"]
        for model, rates in results[key].items():
            assert list(rates) == SPEEDS
            # PER may pass 100 % (insertions) after so few updates; it is a finite share of errors
            assert all(isinstance(r, float) and math.isfinite(r) and r >= 0 for r in rates.values())
            assert f"| {model} | " + " | ".join(f"{rates[s]:.1f}" for s in SPEEDS) in table
            # and it is the edit distance of the written hypotheses over the whole split
            decoded = data / "demo_tiny" / f"eval_{test_set}" / model
            for speed in SPEEDS:
                split = test_set if speed == "1.0" else f"{test_set}_sp{speed}"
                hyps = (decoded / f"{split}.hyp").read_text().splitlines()
                refs = (decoded / f"{split}.ref").read_text().splitlines()
                errors = sum(editdistance.eval(h.split(), r.split()) for h, r in zip(hyps, refs))
                assert rates[speed] == 100 * errors / sum(len(r.split()) for r in refs)
    for image in ("robustness.png", "robustness_real.png", "alignment.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
