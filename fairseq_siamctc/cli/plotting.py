"""matplotlib for the console scripts: file output only, and quiet."""

import logging


def pyplot():
    """Returns matplotlib.pyplot on the Agg backend (no display needed). fairseq sets the root
    logger to DEBUG on import, which would print matplotlib's font search line by line."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    return plt
