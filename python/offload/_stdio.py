"""Keeping a worker's stdout for the protocol: task output goes to stderr, job by job.

The server reads the worker's stdout as protocol messages, one per line, and kills a worker
that writes anything else there. So `run()` takes the real stdout (and stdin) file
descriptors for itself and points fd 1 at stderr, then puts a `JobLines` writer in
`sys.stdout` and `sys.stderr` that starts each line written during a job with `[job <id>] `
(the server logs those lines with the job id).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from typing import Callable


class JobLines(io.TextIOBase):
    """A text stream that writes whole lines to a file descriptor, prefixed with the job id.

    `current` names the job the calling code runs for (None outside a job). A line is written
    once its newline is: each job's partial line is held apart, so two io jobs printing at once
    cannot splice their lines together. `end_job` writes out what a job left without a newline.
    """

    def __init__(self, fd: int, current: Callable[[], str | None]) -> None:
        super().__init__()
        self._fd = fd
        self._current = current
        self._lock = threading.Lock()
        self._partial: dict[str | None, str] = {}
        self.buffer = _Bytes(self)

    @property
    def encoding(self) -> str:
        return "utf-8"

    @property
    def errors(self) -> str:
        return "backslashreplace"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd

    def write(self, text: str) -> int:
        job = self._current()
        with self._lock:
            *lines, rest = (self._partial.pop(job, "") + text).split("\n")
            if rest:
                self._partial[job] = rest
            if lines:
                self._emit(job, lines)
        return len(text)

    def flush(self) -> None:
        # A partial line stays held until its newline (or the job's end), so that the
        # `[job <id>] ` prefix starts every line; there is nothing else to flush.
        pass

    def end_job(self, job: str | None) -> None:
        with self._lock:
            rest = self._partial.pop(job, None)
            if rest:
                self._emit(job, [rest])

    def end_all(self) -> None:
        with self._lock:
            for job, rest in list(self._partial.items()):
                self._emit(job, [rest])
            self._partial.clear()

    def _emit(self, job: str | None, lines: list[str]) -> None:
        prefix = f"[job {job}] " if job is not None else ""
        data = "".join(f"{prefix}{line}\n" for line in lines).encode("utf-8", "backslashreplace")
        while data:
            try:
                written = os.write(self._fd, data)
            except InterruptedError:
                continue
            except OSError:
                return  # stderr is gone: nowhere left to say anything
            data = data[written:]


class _Bytes(io.RawIOBase):
    """`sys.stdout.buffer` for code that writes bytes: decoded, then prefixed like text."""

    def __init__(self, lines: JobLines) -> None:
        super().__init__()
        self._lines = lines

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        data = bytes(data)
        self._lines.write(data.decode("utf-8", "replace"))
        return len(data)


_TAKEN: tuple[int, int] | None = None


def take_stdio() -> tuple[int, int]:
    """Takes fds 0 and 1 for the protocol and returns them as (input, output); once per
    process, later calls answer the same pair.

    Afterwards fd 0 reads /dev/null and fd 1 is a copy of fd 2, so neither a task's own writes
    to fd 1 (a C library's printf, a subprocess it starts) nor a subprocess reading its stdin
    can touch the protocol. What `sys.stdout` still buffers (a `print` at import time) goes to
    stderr too: fd 1 is moved before that buffer is flushed.
    """
    global _TAKEN
    if _TAKEN is not None:
        return _TAKEN
    protocol_in = os.dup(0)
    protocol_out = os.dup(1)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    _TAKEN = (protocol_in, protocol_out)
    return _TAKEN
