"""A writer for a descriptor that a parent process left non-blocking (``O_NONBLOCK``), shared by the command line
(stdout, stderr) and ``evaluate`` (``--run /dev/stderr``): standard library only, so either can import it."""

from __future__ import annotations

import io
import os
import select
from typing import Any


class PatientWriter(io.RawIOBase):
    """A descriptor that a parent left non-blocking (O_NONBLOCK, on the pipe or terminal it shares with us): a
    write that would block waits until the reader makes room, as on a blocking descriptor. Through Python's own
    buffers, EAGAIN on a full pipe dropped the rest of the output without an error (exit 0), or failed the write.
    ``closefd``: closing it closes the descriptor (a duplicate made for it), else leaves it open (stdout's own)."""

    def __init__(self, fd: int, closefd: bool = False) -> None:
        super().__init__()
        self.fd = fd
        self.closefd = closefd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def write(self, data: Any) -> int:
        while True:
            try:
                return os.write(self.fd, data)
            except BlockingIOError:
                select.select([], [self.fd], [])  # until the reader has made room

    def close(self) -> None:
        if not self.closed and self.closefd:
            os.close(self.fd)
        super().close()


def patient_text(
    fd: int, errors: str = "strict", line_buffering: bool = False, closefd: bool = False
) -> io.TextIOWrapper:
    """A UTF-8 text stream on ``fd`` whose writes wait when the descriptor is non-blocking."""
    buffered = io.BufferedWriter(PatientWriter(fd, closefd))
    return io.TextIOWrapper(buffered, encoding="utf-8", errors=errors, line_buffering=line_buffering)
