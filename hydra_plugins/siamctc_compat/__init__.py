"""Applies fairseq-siamctc's compatibility fixes inside ``fairseq-hydra-train`` itself.

Hydra imports every module under ``hydra_plugins`` when it starts, before fairseq reads
``common.user_dir``. The multi-process CPU fix has to be in place by then, because fairseq decides
how many processes to spawn before it imports the user directory. For the same reason the errors a
user causes are reported here: fairseq's training entry point is wrapped so that they end in one line
(see :mod:`fairseq_siamctc.errors`) instead of Hydra's traceback.
"""

import sys

import fairseq_siamctc  # noqa: F401
from fairseq_siamctc.errors import report_user_errors


def _report_user_errors_of_fairseq_hydra_train() -> None:
    # hydra_main looks _hydra_main up in its module at call time, so replacing it there is enough
    for name in ("fairseq_cli.hydra_train", "__main__"):
        module = sys.modules.get(name)
        main = getattr(module, "_hydra_main", None)
        if main is not None and not getattr(main, "reports_user_errors", False):
            module._hydra_main = report_user_errors(main)


_report_user_errors_of_fairseq_hydra_train()
