"""Errors that reach the user: one clear line naming the problem, plus a hint with the fix."""

from __future__ import annotations

import os


class UserError(Exception):
    """A problem the user can fix. ``str(err)`` is the message; ``err.hint`` says how to fix it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class CheckpointError(UserError):
    """A checkpoint file or folder that cannot be read, is unsafe, or is not a model we know."""


class ConfigError(UserError):
    """A config value of the wrong type, out of range, or unknown."""


class StoreError(UserError):
    """A bad model name, a missing or existing model dir, a locked model."""


def import_failure(err: ImportError) -> str:
    """The real reason a module of ours could not be imported, as one line: the exception, its text, and the file
    and line of ours where it was raised, e.g. ``ModuleNotFoundError: No module named 'resource' (at
    dreambooth/train/status.py, line 12)``. So a message never blames a missing file for what was an import inside
    it (a Unix-only module on Windows, a library that failed to load)."""
    package = os.path.dirname(os.path.abspath(__file__))
    where = None
    tb = err.__traceback__
    while tb is not None:  # the innermost frame in our package (importlib's own frames are not files)
        filename = tb.tb_frame.f_code.co_filename
        if os.path.isabs(filename) and os.path.abspath(filename).startswith(package + os.sep):
            where = (os.path.relpath(filename, os.path.dirname(package)).replace(os.sep, "/"), tb.tb_lineno)
        tb = tb.tb_next
    text = f"{type(err).__name__}: {err}"
    return f"{text} (at {where[0]}, line {where[1]})" if where else text
