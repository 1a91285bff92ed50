"""Typed errors that carry the one-line message a user needs and the exit code the shell sees.

A message that names an option says it the way its reader passes it: ``--max-remove 200`` to a ``dsearch``
user, ``max_remove=200`` to a Python caller of the same library function. The library writes the option with
``option()`` (or other wording that differs, with ``spell()``); ``str(err)`` reads as the Python API, and the
command line prints ``err.for_cli()``.

This module must stay free of heavy imports: the CLI imports it on every run.
"""

from __future__ import annotations

import re
from typing import Any

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


# The parts of a message that differ between the command line and the API, kept in the message text itself so
# that messages built in pieces (f-strings, InputError's where/problem/fix) keep them: SEP cli ALT api SEP.
_SEP, _ALT = "\x1e", "\x1f"
_SPELLED = re.compile(f"{_SEP}([^{_SEP}{_ALT}]*){_ALT}([^{_SEP}{_ALT}]*){_SEP}")
_NO_VALUE: Any = object()
# API parameter → CLI flag, where the flag is not the parameter with dashes.
_FLAGS = {"fmt": "format", "k": "top-k"}


def spell(cli: str, api: str) -> str:
    """Words of an error message that differ by reader: ``cli`` for ``dsearch`` users, ``api`` for Python callers."""
    strip = str.maketrans("", "", _SEP + _ALT)
    return f"{_SEP}{cli.translate(strip)}{_ALT}{api.translate(strip)}{_SEP}"


def option(name: str, value: Any = _NO_VALUE) -> str:
    """An option, named in an error message by the API parameter ``name``: ``option("max_remove", 200)`` reads
    ``--max-remove 200`` on the command line and ``max_remove=200`` in Python; a bool reads ``--split`` /
    ``--no-split`` and ``split=True`` / ``split=False``; no value, ``--where`` and ``where=``."""
    flag = _FLAGS.get(name, name.replace("_", "-"))
    if value is _NO_VALUE:
        return spell(f"--{flag}", f"{name}=")
    if isinstance(value, bool):
        return spell(f"--{flag}" if value else f"--no-{flag}", f"{name}={value}")
    return spell(f"--{flag} {value}", f"{name}={value!r}")


def render(message: str, cli: bool = False) -> str:
    """``message`` with its ``spell()``/``option()`` parts as the command line (``cli``) or the API says them."""
    return _SPELLED.sub(lambda m: m.group(1 if cli else 2), message)


class DsearchError(Exception):
    """Base class: an error the user can act on. ``str(err)`` is the one-line message, as the Python API names
    options (``where=``); ``err.for_cli()`` is the same line as the command line names them (``--where``)."""

    exit_code = EXIT_ERROR

    def __str__(self) -> str:
        return render(super().__str__())

    def for_cli(self) -> str:
        """The message with options named as ``dsearch``'s flags."""
        return render(super().__str__(), cli=True)

    @property
    def template(self) -> str:
        """The message with both spellings kept: what an error that wraps this one should embed."""
        return super().__str__()


class UsageError(DsearchError):
    """A bad argument: an unknown option value or format, options that do not go together (exit 2)."""

    exit_code = EXIT_USAGE


class InputError(DsearchError):
    """Bad corpus, query or qrels input; the message names ``file:line``."""

    def __init__(self, where: str, problem: str, fix: str = "") -> None:
        self.where = render(where)
        self.problem = render(problem)
        message = f"{where}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle rebuilds an exception as cls(*args), which is not this __init__'s signature: from the message as
        # made (both spellings) and the attributes instead, so that a worker process's error reaches its caller.
        return (_rebuilt, (type(self), self.args), self.__dict__)


def _rebuilt(cls: type[BaseException], args: tuple[Any, ...]) -> BaseException:
    """An exception of ``cls`` with ``args``, without calling its ``__init__`` (``InputError.__reduce__``)."""
    return cls.__new__(cls, *args)


class IndexDirError(DsearchError):
    """A missing, incomplete, corrupt or incompatible index directory."""


class NewerIndexError(IndexDirError):
    """An index written by a newer dsearch, in a format this one cannot read: it must not replace it either.
    ``reason``: the message without what to do."""

    reason = ""


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


class OutputError(DsearchError):
    """stdout cannot take the results: a full disk, a closed stdout (exit 1). A closed pipe is not one: that ends
    quietly with success."""
