"""matplotlib for the console scripts: file output only (matplotlib's debug log is quieted with the
other messages in :mod:`.console`, which importing this package installs)."""


def pyplot():
    """Returns matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
