"""The console scripts' quiet output leaves the user's own warnings alone."""

import os
import pathlib
import subprocess
import sys

SCRIPT = """
import warnings
import fairseq_siamctc
assert not [f for f in warnings.filters if f[1] is not None and "jit" in f[1].pattern]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    warnings.warn("the user's own warning", FutureWarning)
    import fairseq_siamctc.cli  # the console scripts' filters
    warnings.warn("the user's own warning", FutureWarning)
assert [str(w.message) for w in caught] == ["the user's own warning"] * 2, caught
print("ok")
"""


def test_plugin_import_keeps_the_users_warnings():
    # a fresh interpreter: the import-time filters are what is checked
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=pathlib.Path(__file__).parent)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    # importing the plugin does not print fairseq's torch.jit.script deprecations
    assert "torch.jit.script" not in proc.stderr
