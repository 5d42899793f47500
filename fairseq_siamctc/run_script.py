"""Runs one of fairseq's example scripts with the plugin's compatibility fixes applied.

    python -m fairseq_siamctc.run_script fairseq/examples/hubert/simple_kmeans/dump_mfcc_feature.py ARGS...

fairseq's example scripts import fairseq directly, so without the plugin they hit the failures that
``fairseq_siamctc.compat`` fixes (e.g. ``convert_waveform`` importing ``torchaudio.sox_effects``). A
path relative to the installed fairseq package (starting with ``fairseq/``) is resolved there. The
script's folder goes first on ``sys.path``, as when Python runs it, for its sibling imports.
"""

import pathlib
import runpy
import sys

import fairseq

import fairseq_siamctc  # noqa: F401


def resolve(script: str) -> pathlib.Path:
    path = pathlib.Path(script)
    if not path.exists() and path.parts[:1] == ("fairseq",):
        path = pathlib.Path(fairseq.__file__).parent.joinpath(*path.parts[1:])
    if not path.is_file():
        raise FileNotFoundError(f"no such script: {script}")
    return path


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    script = resolve(sys.argv[1])
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
