"""slimlm's error base classes: the failures a user can fix, told apart from bugs.

`SlimlmError` is a user-facing failure: the CLI prints its message as one line (`slimlm <command>: error: ...`) and
exits with its `exit_code`. Anything else that escapes a command (a bad unpack, a wrong call, a plain ValueError
from an internal check) is a bug and keeps its traceback.

This module imports nothing from slimlm: it sits at the bottom of the import graph, so every layer can use it.
"""

from __future__ import annotations

import sys


class SlimlmError(Exception):
    """A failure the user must fix outside the command (a server cannot listen, a peer rank died, a download or
    disk failure). The CLI prints the message as one line and exits with status `exit_code` (1: runtime failure)."""

    exit_code = 1


class InputError(SlimlmError, ValueError):
    """Bad input: a flag, config, recipe, data file, checkpoint or request the user gave. The CLI exits with 2.

    It is also a ValueError on purpose: code and tests written before this class existed catch bad input as
    ValueError (`except ValueError`, `pytest.raises(ValueError)`, the HTTP server's 400 mapping), and keep working.
    """

    exit_code = 2


class CheckpointError(InputError):
    """A checkpoint file or folder that cannot be loaded; the message says what is wrong and what to do."""


# A missing or unreadable path the user typed: bad input too (the OS raises these, not slimlm).
PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
# What a command line prints as one line instead of a traceback.
USER_ERRORS = (SlimlmError, *PATH_ERRORS)


def report_error(command: str, error: BaseException) -> int:
    """Print `slimlm <command>: error: <message>` on stderr; returns the exit status (2 for bad input, 1 for a
    runtime failure). For errors in USER_ERRORS; anything else should propagate with its traceback."""
    print(f"slimlm {command}: error: {error}", file=sys.stderr)
    return error.exit_code if isinstance(error, SlimlmError) else InputError.exit_code
