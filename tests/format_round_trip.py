"""Prints the largest feature differences of the format round trips on tiny random models:

    OMP_NUM_THREADS=1 .venv/bin/python tests/format_round_trip.py

(the tests in test_formats.py assert them below 1e-5)."""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_formats import LAYOUTS, hf_model, plugin_features, waveform, write_hf  # noqa: E402


def main():
    torch.set_num_threads(1)
    source = waveform()
    print(f"{'layout':14} {'fairseq->hf->plugin':>20} {'from_pretrained':>16}")
    for name, (make, overrides) in LAYOUTS.items():
        with tempfile.TemporaryDirectory() as work:
            base, out = Path(work) / "base.pt", Path(work) / "hf"
            torch.manual_seed(0)
            make(base, **overrides)
            write_hf(base, out)
            expected = plugin_features(base, source)
            round_trip = (plugin_features(out, source) - expected).abs().max().item()
            with torch.no_grad():
                hf = (hf_model(out)(source).last_hidden_state - expected).abs().max().item()
        print(f"{name:14} {round_trip:20.2e} {hf:16.2e}")


if __name__ == "__main__":
    main()
