"""Error types with the exit codes documented in docs/errors.md."""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class LongctxError(Exception):
    """Base class: a failure with a plain-words message and an exit code; the CLI prints no traceback."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(LongctxError):
    """Bad flags, option values, preset keys or method names."""

    exit_code = EXIT_USAGE


class InputError(LongctxError):
    """Unusable input document: missing, empty, binary, not UTF-8, a directory, unreadable."""

    exit_code = EXIT_USAGE


class ModelError(LongctxError):
    """The model cannot be loaded or is not supported (missing default model, unsupported architecture)."""

    exit_code = EXIT_USAGE


class LongctxWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as `warning: ...`."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """` (did you mean 'hmt'?)` for a near miss among `choices`, else empty."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def os_reason(e: OSError) -> str:
    """An OSError in plain words ("the disk is full" rather than "[Errno 28] ...")."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    return e.strerror or str(e)
