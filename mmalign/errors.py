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


class BadRow(DataError):
    """One record that cannot be loaded (an image that does not decode, a row that does not fit): names its file,
    record index and field, and why; `--bad-rows` decides whether training skips it or stops."""

    def __init__(self, source: str, index: int, field: str, reason: str):
        super().__init__(f"{source}: record {index}, field '{field}': {reason}")
        self.source, self.index, self.field, self.reason = source, index, field, reason

    def __reduce__(self):
        return BadRow, (self.source, self.index, self.field, self.reason)

    def to_dict(self) -> dict[str, object]:
        """The report line of the row: file, index, field, reason."""
        return {"file": self.source, "index": self.index, "field": self.field, "reason": self.reason}
