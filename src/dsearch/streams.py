"""Descriptors that a parent process left non-blocking (``O_NONBLOCK``, on a pipe or terminal it shares with us:
Node.js, some CI runners). Python's own streams fail there (EAGAIN) or read nothing; these wait, as on a blocking
descriptor. Shared by the command line (stdin, stdout, stderr), ``search.PipeLines`` (queries on stdin) and
``evaluate`` (``--run /dev/stderr``): standard library only, so any of them can import it."""

from __future__ import annotations

import io
import os
import select
from typing import IO, Any


def nonblocking_fd(stream: Any) -> int | None:
    """The descriptor of ``stream`` when it is non-blocking; None when it blocks or has no descriptor."""
    try:
        fd = stream.fileno()
        return None if os.get_blocking(fd) else fd
    except (OSError, ValueError, AttributeError):  # closed, or a test's capture
        return None


def read_waiting(fd: int, size: int) -> bytes:
    """``os.read`` that, on a non-blocking descriptor, waits for input (or its end) instead of failing."""
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            select.select([fd], [], [])


class _PatientDescriptor(io.RawIOBase):
    """A raw stream on ``fd``; ``closefd``: closing it closes the descriptor (a duplicate made for it), else
    leaves it open (stdin's, stdout's own)."""

    def __init__(self, fd: int, closefd: bool = False) -> None:
        super().__init__()
        self.fd = fd
        self.closefd = closefd

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def close(self) -> None:
        if not self.closed and self.closefd:
            os.close(self.fd)
        super().close()


class PatientWriter(_PatientDescriptor):
    """A write that would block waits until the reader makes room. Through Python's own buffers, EAGAIN on a full
    pipe dropped the rest of the output without an error (exit 0), or failed the write."""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        while True:
            try:
                return os.write(self.fd, data)
            except BlockingIOError:
                select.select([], [self.fd], [])  # until the reader has made room


class PatientReader(_PatientDescriptor):
    """A read waits for input. Python's own read() gave None or b"" there, which read as an empty queries file
    or corpus."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = read_waiting(self.fd, len(buffer))
        buffer[: len(data)] = data
        return len(data)


def patient_text(
    fd: int, errors: str = "strict", line_buffering: bool = False, closefd: bool = False
) -> io.TextIOWrapper:
    """A UTF-8 text stream on ``fd`` whose writes wait when the descriptor is non-blocking."""
    buffered = io.BufferedWriter(PatientWriter(fd, closefd))
    return io.TextIOWrapper(buffered, encoding="utf-8", errors=errors, line_buffering=line_buffering)


def patient_reader(stream: IO[bytes]) -> IO[bytes]:
    """``stream`` (bytes), or one that waits on its descriptor instead of failing when that is non-blocking."""
    fd = nonblocking_fd(stream)
    return stream if fd is None else io.BufferedReader(PatientReader(fd))
