"""Console scripts."""

from .console import quiet

quiet()
