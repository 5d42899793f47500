"""Compatibility fixes for fairseq 0.12 on Python 3.11 and current PyTorch (filled in by the foundation work)."""


def apply() -> None:
    pass
