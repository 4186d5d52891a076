"""The errors that stop a run with a message that says all the user needs; the CLI prints them without a traceback.

Everything else (a broadcast error, a broken import) is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave, or a stop the message fully explains."""


class ConfigError(UserError, ValueError):
    """A config file or flag that cannot be used; the message names the file and key."""


class DataError(UserError, ValueError):
    """Records that cannot be trained on; the message names the file, record and field."""


class RunFolderError(UserError, ValueError):
    """An output folder that is not this run's to write, or a checkpoint that cannot be resumed."""


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; training stopped and no checkpoint was written after it."""


class MissingDependencyError(UserError, ImportError):
    """An optional package that the chosen settings need is not installed; the message names the extra."""
