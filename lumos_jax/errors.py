"""The error class for bad user input: the CLI shows it as one line, never a traceback.

Raise `UserError` (or a subclass: config.ConfigError, ...) where the message alone tells the
user what to fix and where. Anything else that escapes a command, a JAX error above all, is
a bug or an internal failure and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (a flag, a gin binding, a file): one line naming what and where."""
