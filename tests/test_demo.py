"""`make demo DEMO_SIZE=tiny`: the whole chain, corpus to robustness table, on the tiny corpus."""

import json
import math
import subprocess
import sys

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
    for key in ("per", "per_real"):
        assert list(results[key]) == ["seed", "siamctc"]
        for model, rates in results[key].items():
            assert list(rates) == SPEEDS
            assert all(isinstance(r, float) and math.isfinite(r) and 0 <= r <= 100 for r in rates.values())
            assert f"| {model} | " + " | ".join(f"{rates[s]:.1f}" for s in SPEEDS) in table
    for image in ("robustness.png", "robustness_real.png", "alignment.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
