"""Console scripts."""

import torch

from .console import quiet

quiet()


def default_device() -> str:
    """The device every tool that runs a model uses unless told: CUDA when present."""
    return "cuda" if torch.cuda.is_available() else "cpu"
