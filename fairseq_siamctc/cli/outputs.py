"""Result files of the console scripts, written whole or not at all: a temporary file in the same
folder, then ``os.replace``, so an interrupted run never leaves a half-written table or plot."""

import os
import pathlib


def _temporary(path: pathlib.Path) -> pathlib.Path:
    # keeps the suffix, from which matplotlib takes the image format
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def write_atomic(path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path``."""
    path = pathlib.Path(path)
    tmp = _temporary(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_figure(fig, path) -> None:
    """Saves a matplotlib figure to ``path`` (format from its suffix, png without one) and closes it."""
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    tmp = _temporary(path)
    try:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def refuse_to_replace(paths, force: bool) -> None:
    """Raises FileExistsError naming the first of ``paths`` that exists, unless ``force``: a tool
    replaces earlier results only when asked, and says so before doing any work."""
    existing = [pathlib.Path(p) for p in paths if pathlib.Path(p).exists()]
    if existing and not force:
        if len(existing) == 1:
            raise FileExistsError(f"{existing[0]} exists already; pass --force to replace it")
        raise FileExistsError(f"{existing[0]} and {len(existing) - 1} more output(s) exist already; "
                              "pass --force to replace them")
