"""Errors that reach the user: one clear line naming the problem, plus a hint with the fix."""

from __future__ import annotations


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
