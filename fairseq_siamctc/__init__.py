"""SiamCTC as a fairseq plugin.

Importing this package (``common.user_dir=<path to fairseq_siamctc>`` or ``import fairseq_siamctc``)
applies the compatibility fixes for the current PyTorch/Python stack and registers every task,
model and criterion of the project with fairseq.
"""

from . import compat  # noqa: F401  (first: the fixes must be in place before fairseq code runs)

compat.apply()

from . import criterions, models, tasks  # noqa: E402,F401

__version__ = "0.1.0"
