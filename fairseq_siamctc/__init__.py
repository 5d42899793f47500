"""SiamCTC as a fairseq plugin.

Importing this package (``common.user_dir=<path to fairseq_siamctc>`` or ``import fairseq_siamctc``)
applies the compatibility fixes for the current PyTorch/Python stack, computes HuBERT's
masked-prediction logits as one matrix product (``hubert_nce``: same logits, less time and memory)
and registers every task, model and criterion of the project with fairseq.
"""

import warnings

# fairseq's modules decorate functions with torch.jit.script when they are imported, and each
# decoration is a FutureWarning on PyTorch >= 2.10: noise that no user of the plugin can act on.
# Only these imports are silenced; warnings of the user's own code are left alone.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

    from . import compat  # noqa: F401  (first: the fixes must be in place before fairseq code runs)

    compat.apply()

    from . import hubert_nce  # noqa: E402

    hubert_nce.apply()

    from . import criterions, models, tasks  # noqa: E402,F401


def _register_user_dir_resolver() -> None:
    """``${siamctc_user_dir:}`` in a yaml file is this package's folder, for ``common.user_dir``:
    fairseq needs an existing path there, and Hydra's working directory is the run directory."""
    import pathlib

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("siamctc_user_dir"):
        OmegaConf.register_new_resolver("siamctc_user_dir", lambda: str(pathlib.Path(__file__).parent))


_register_user_dir_resolver()

__version__ = "0.1.0"
