"""Errors a user causes and can fix (bad data, a wrong path, a foreign run folder), reported in one line.

``fairseq-hydra-train`` ends such an error with its message and exit status 1 instead of a Hydra
traceback: the plugin's Hydra module wraps fairseq's entry point with :func:`report_user_errors`.
The message survives the ways fairseq moves an error between processes: a data-loader worker
re-raises it in the main process with the worker's traceback inside the message, and a spawned
training process reaches the launcher as ``ProcessRaisedException`` with the traceback as text.
"""

import functools
import re
import sys
from typing import Callable, Optional


class UserError(Exception):
    """A condition the user caused; the message names the file, line or setting to fix."""


class DataError(UserError, ValueError):
    """Training data that cannot be used: unreadable files above the limit, a batch with nothing readable."""


class RunFolderError(UserError):
    """A run folder whose checkpoint belongs to another run."""


class SetupError(UserError):
    """A task or model that cannot be built from the given paths and settings."""


def _user_error_names():
    names, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        names.add(f"{cls.__module__}.{cls.__qualname__}")
        names.add(cls.__qualname__)
        todo.extend(cls.__subclasses__())
    return names


_LAST_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$")
# A file that is missing or cannot be opened is the user's to fix wherever fairseq meets it (its
# own tasks open manifests, label files and dictionaries): its message names the file.
_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def user_error_message(error: BaseException) -> Optional[str]:
    """The one-line message of a user error, or None when ``error`` is no user error.

    Also finds it inside a re-raised error whose message carries the original traceback (the
    traceback's last line is ``module.Class: message``).
    """
    text = str(error).strip()
    if isinstance(error, UserError) and "Traceback (most recent call last)" not in text:
        return text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, _PATH_ERRORS) and error.filename:
        return f"{error.strerror or type(error).__name__}: {error.filename}"
    lines = [line for line in text.splitlines() if line.strip()]
    match = _LAST_LINE.match(lines[-1].strip()) if lines else None
    names = _user_error_names() | {cls.__name__ for cls in _PATH_ERRORS}
    if match and match.group(1) in names:
        return match.group(2)
    cause = error.__cause__ or error.__context__
    return user_error_message(cause) if cause is not None and cause is not error else None


def report_user_errors(main: Callable, program: str = "fairseq-hydra-train") -> Callable:
    """Wraps ``main``: a user error ends the program with ``program: error: message`` and status 1."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as error:  # noqa: BLE001  (anything else is re-raised unchanged)
            message = user_error_message(error)
            if message is None:
                raise
            sys.stderr.write(f"{program}: error: {message}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None

    wrapped.reports_user_errors = True
    return wrapped
