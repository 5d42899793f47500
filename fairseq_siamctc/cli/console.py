"""What the console scripts leave out of their output: messages that no user of the tools can act on.

Each filter names one message, so warnings and log lines of anything else still show.
"""

import logging
import warnings

# fairseq's HubertModel logs its whole configuration (about 1,500 characters) when it is built.
_HUBERT_CONFIG_LOG = "HubertModel Config:"


def _not_a_config_dump(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_HUBERT_CONFIG_LOG)


def quiet() -> None:
    """Installs the filters; calling it again adds nothing."""
    # fairseq's convolutional position embedding is built with the deprecated weight_norm
    warnings.filterwarnings("ignore", message=r"`torch\.nn\.utils\.weight_norm` is deprecated",
                            category=FutureWarning)
    hubert_logger = logging.getLogger("fairseq.models.hubert.hubert")
    if _not_a_config_dump not in hubert_logger.filters:
        hubert_logger.addFilter(_not_a_config_dump)
    # fairseq sets the root logger to DEBUG, which would print matplotlib's font search line by line
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
