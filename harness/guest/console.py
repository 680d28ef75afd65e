"""Drain a guest's serial console to a log file and let callers wait for patterns in it.

QEMU writes the console to a pipe; a reader thread copies it to ``serial.log`` as it arrives (an undrained pipe
would stall the guest) and wakes waiters. Waits end on an event: a success pattern, a failure pattern, the end
of the stream (QEMU exited), or the deadline.
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from harness import outputs

#: Read size; the console is slow, this only bounds one copy.
CHUNK = 65536
#: Keep at most this much console text in memory for pattern matching; the log file has all of it.
MAX_BUFFER = 8 << 20


@dataclass(frozen=True)
class ConsoleMatch:
    """Result of :meth:`ConsoleLog.wait_for`: which pattern matched (None on EOF or timeout) and why it ended."""

    outcome: str  # "match", "failure", "eof", "timeout"; QemuMachine adds "frozen" (text: why)
    text: str = ""


class ConsoleLog:
    """Owns the reader thread for one console stream."""

    def __init__(self, fd: int, log_path: Path) -> None:
        self._fd = fd
        self.log_path = log_path
        self._buffer = bytearray()
        #: Bytes dropped from the front of the buffer (MAX_BUFFER): offsets (position, wait_for, text) are absolute.
        self._dropped = 0
        self._eof = False
        self._cond = threading.Condition()
        self._log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - closed by the reader thread at EOF
        #: Why serial.log stopped growing (a failed write), and how much reached it / did not.
        self.write_error: str | None = None
        self.written_bytes = 0
        self.lost_bytes = 0
        self._thread = threading.Thread(target=self._drain, name=f"console:{log_path.name}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            while True:
                try:
                    chunk = os.read(self._fd, CHUNK)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                self._write_log(chunk)
                with self._cond:
                    self._buffer += chunk
                    if len(self._buffer) > MAX_BUFFER:
                        self._dropped += len(self._buffer) - MAX_BUFFER
                        del self._buffer[: len(self._buffer) - MAX_BUFFER]
                    self._cond.notify_all()
        finally:
            self._log.close()
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _write_log(self, chunk: bytes) -> None:
        """Append to serial.log. A failed write (ENOSPC, EIO) must not stop the drain (an undrained pipe stalls the
        guest, a dead reader looks like QEMU's EOF): the loss is recorded for results.json (harness.outputs
        ``logs_incomplete``) and the rest is kept only in memory, where the serial tail still comes from."""
        if self.write_error is not None:
            self.lost_bytes += len(chunk)
            return
        view = memoryview(chunk)
        try:
            while view:  # a raw write may be short (a nearly full disk); the next one raises the error
                written = self._log.write(view)
                if not written:  # no progress (0 or None): give up rather than spin
                    raise OSError(errno.EIO, "write to the serial log made no progress")
                view = view[written:]
            self.written_bytes += len(chunk)
        except OSError as exc:
            self.lost_bytes += len(view)
            self.written_bytes += len(chunk) - len(view)
            self.write_error = f"{outputs.reason(exc)} after {self.written_bytes} bytes; the rest was not written"
            outputs.record_incomplete(self.log_path, f"serial console: {self.write_error}")

    def text(self, since: int = 0) -> str:
        """The console text kept in memory; with ``since`` (a :meth:`position`), only what came after it."""
        with self._cond:
            start = max(0, since - self._dropped)
            return self._buffer[start:].decode(errors="replace")

    def position(self) -> int:
        """The absolute offset of the next console byte: a mark for a later :meth:`text` ``since`` or
        ``wait_for(start=...)``, which see only what follows."""
        with self._cond:
            return self._dropped + len(self._buffer)

    def wait_for(
        self, pattern: str, failures: Iterable[str] = (), timeout_s: float = 60.0, start: int = 0
    ) -> ConsoleMatch:
        """Wait until ``pattern`` (a regex) or one of ``failures`` appears in the console after absolute offset
        ``start`` (:meth:`position`).

        :param timeout_s: seconds to wait at most; the wait also ends when the stream ends (QEMU exited).
        """
        want = re.compile(pattern)
        bad = [re.compile(f) for f in failures]
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                text = self._buffer[max(0, start - self._dropped) :].decode(errors="replace")
                for regex in bad:
                    found = regex.search(text)
                    if found:
                        return ConsoleMatch("failure", found.group(0))
                found = want.search(text)
                if found:
                    return ConsoleMatch("match", found.group(0))
                if self._eof:
                    return ConsoleMatch("eof")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return ConsoleMatch("timeout")
                self._cond.wait(remaining)

    def close(self, timeout_s: float = 5.0) -> None:
        """Wait for the reader to reach EOF (the writer must be gone), at most ``timeout_s`` seconds."""
        self._thread.join(timeout_s)
