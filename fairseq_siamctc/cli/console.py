"""What the console scripts leave out of their output: messages that no user of the tools can act on.

Each filter names one message, so warnings and log lines of anything else still show.
"""

import logging
import warnings

from ..compat import WEIGHT_NORM_NOTICE

# fairseq logs whole configurations (1,000 to 1,500 characters each) and its working directory
# whenever it builds a HuBERT model or its pre-training task, e.g. to load a fine-tuned checkpoint.
_FAIRSEQ_DUMPS = {
    "fairseq.models.hubert.hubert": ("HubertModel Config:",),
    "fairseq.tasks.hubert_pretraining": ("HubertPretrainingTask Config", "current directory is"),
}


class _DropDumps(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet() -> None:
    """Installs the filters; calling it again adds nothing."""
    category, message = WEIGHT_NORM_NOTICE
    warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in _FAIRSEQ_DUMPS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropDumps) for f in logger.filters):
            logger.addFilter(_DropDumps(prefixes))
    # fairseq sets the root logger to DEBUG, which would print matplotlib's font search line by line
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
