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
