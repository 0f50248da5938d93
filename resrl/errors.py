"""The one kind of exception that is the user's mistake, not a bug.

`resrl` (the command line) prints a `UserError` as one line, `resrl: error: <message>`, and exits
with code 2; any other exception is a bug and keeps its traceback. `--debug` shows the traceback of
a `UserError` too. `resrl.config.ConfigError` is handled the same way.

Subclasses also derive from the built-in exception a caller would otherwise expect
(`ValueError`, `FileNotFoundError`, `ImportError`), so `except ValueError` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a file, an argument, a setting, a missing package); the message
    names the input and what would be accepted."""


class InputError(UserError, ValueError):
    """An argument or a named choice that cannot be used (an unknown reward or variant, a bad
    summary file to plot)."""


class ModelFolderError(UserError, ValueError):
    """A model or tokenizer folder that is missing, incomplete or unreadable."""


class MissingPackageError(UserError, ImportError):
    """An optional package that the chosen setting needs is not installed."""
