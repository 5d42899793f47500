"""Applies fairseq-siamctc's compatibility fixes inside ``fairseq-hydra-train`` itself.

Hydra imports every module under ``hydra_plugins`` when it starts, before fairseq reads
``common.user_dir``. The multi-process CPU fix has to be in place by then, because fairseq decides
how many processes to spawn before it imports the user directory. For the same reason the errors a
user causes are reported here: fairseq's training entry point is wrapped so that they end in one line
(see :mod:`fairseq_siamctc.errors`) instead of Hydra's traceback. And so that a run killed at any
moment can be resumed by the same command, fairseq's copies of a saved checkpoint (to
``checkpoint_last.pt``, ``checkpoint_best.pt``) are made atomic: fairseq writes the first file through
a temporary name, but copies it to the others in place, so a kill during the copy left a truncated
``checkpoint_last.pt`` that the next run could not load. And the deprecation notices of Hydra and
torch that every run prints about fairseq's own code are filtered, one message each.
"""

import os
import shutil
import sys
import warnings

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

import fairseq_siamctc  # noqa: F401
from fairseq_siamctc.compat import WEIGHT_NORM_NOTICE
from fairseq_siamctc.errors import report_user_errors


def _report_user_errors_of_fairseq_hydra_train() -> None:
    # hydra_main looks _hydra_main up in its module at call time, so replacing it there is enough
    for name in ("fairseq_cli.hydra_train", "__main__"):
        module = sys.modules.get(name)
        main = getattr(module, "_hydra_main", None)
        if main is not None and not getattr(main, "reports_user_errors", False):
            module._hydra_main = report_user_errors(main)


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    """Copies a local file through a temporary file in the destination's folder: the destination is
    the old file or the whole new one, never a part. Returns True, as fairseq's ``PathManager.copy``."""
    if os.path.exists(dst_path) and not overwrite:
        raise FileExistsError(f"{dst_path} exists")
    tmp = f"{dst_path}.tmp{os.getpid()}"
    try:
        shutil.copyfile(src_path, tmp)
        os.replace(tmp, dst_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return True


def _atomic_checkpoint_copies() -> None:
    from fairseq.file_io import PathManager

    copy = PathManager.copy
    if getattr(copy, "atomic", False):
        return

    def copy_atomically(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if "://" in str(src_path) or "://" in str(dst_path):  # remote storage: fairseq's own copy
            return copy(src_path, dst_path, overwrite)
        return atomic_copy(src_path, dst_path, overwrite)

    copy_atomically.atomic = True
    PathManager.copy = staticmethod(copy_atomically)


# Deprecation notices that every fairseq-hydra-train run prints, about fairseq's own use of Hydra and
# torch (its `# @package _group_` config headers, its schema-matched config names, its autocast
# calls): nothing a user of the recipe can act on. Each filter names one message. Two more come
# before Hydra imports this module and cannot be filtered here (torch.jit.script's deprecation when
# fairseq is imported, Hydra's version_base notice when its entry point is defined).
TRAINING_NOTICES = (
    (UserWarning, r"In '[^']*': Usage of deprecated keyword in package header '# @package _group_'"),
    (UserWarning, r"\s*'[^']*' is validated against ConfigStore schema with the same name"),
    (UserWarning, r"Future Hydra versions will no longer change working directory at job runtime"),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
    (FutureWarning, r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated"),
    WEIGHT_NORM_NOTICE,
)


def _quiet_training_notices() -> None:
    for category, message in TRAINING_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category)


class QuietTrainingNotices(SearchPathPlugin):
    """Adds nothing to the search path. Hydra calls it after its plugin scan, which imports this
    module inside ``warnings.catch_warnings`` and so drops any filter set at import, and before it
    composes the config, where the first of the notices come from."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        _quiet_training_notices()


_report_user_errors_of_fairseq_hydra_train()
_atomic_checkpoint_copies()
