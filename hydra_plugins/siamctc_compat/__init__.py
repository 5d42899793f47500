"""Applies fairseq-siamctc's compatibility fixes inside ``fairseq-hydra-train`` itself.

Hydra imports every module under ``hydra_plugins`` when it starts, before fairseq reads
``common.user_dir``. The multi-process CPU fix has to be in place by then, because fairseq decides
how many processes to spawn before it imports the user directory.
"""

import fairseq_siamctc  # noqa: F401
