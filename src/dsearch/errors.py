"""Typed errors that carry the one-line message a user needs and the exit code the shell sees.

This module must stay free of heavy imports: the CLI imports it on every run.
"""

from __future__ import annotations

# Exit codes are a documented contract (README, "Exit codes").
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3
EXIT_LOCKED = 4
# `dsearch status` only: what is wrong with the index, for monitoring scripts.
EXIT_STATUS_MISSING = 5
EXIT_STATUS_BROKEN = 6  # an interrupted run was never finished, or a file is corrupt
EXIT_STATUS_TOO_OLD = 7
EXIT_STATUS_CORPUS_CHANGED = 8
# `dsearch index`: refused because the run would remove more passages than --max-remove allows.
EXIT_TOO_MANY_REMOVED = 9


class DsearchError(Exception):
    """Base class: an error the user can act on. ``str(err)`` is the one-line message."""

    exit_code = EXIT_ERROR


class UsageError(DsearchError):
    """The command line itself is wrong (bad flag combination, unknown format)."""

    exit_code = EXIT_USAGE


class InputError(DsearchError):
    """Bad corpus, query or qrels input; the message names ``file:line``."""

    def __init__(self, where: str, problem: str, fix: str = "") -> None:
        self.where = where
        self.problem = problem
        message = f"{where}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


class IndexDirError(DsearchError):
    """A missing, incomplete, corrupt or incompatible index directory."""


class ModelError(DsearchError):
    """A model that cannot be loaded, or that does not match the index."""


class LockedError(DsearchError):
    """Another dsearch run holds the lock on the index directory."""

    exit_code = EXIT_LOCKED


class IncompleteError(DsearchError):
    """The run was interrupted or could not finish; nothing was published."""

    exit_code = EXIT_INCOMPLETE


class TooManyRemovedError(DsearchError):
    """A run would remove more of the index's passages than allowed (an empty or unmounted corpus, say)."""

    exit_code = EXIT_TOO_MANY_REMOVED
