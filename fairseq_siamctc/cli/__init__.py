"""Console scripts."""

from .console import quiet

quiet()

# the library's, kept importable from here: the console scripts and their tests use this name
from fairseq_siamctc.features import default_device  # noqa: E402,F401
