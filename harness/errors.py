"""The harness's exception tree and exit codes.

::

    HarnessError
     +-- UsageError          bad input from the user (file, field, allowed values): exit 2, one line
     |    +-- OutputError    an output cannot be written (full, read-only, not a directory): exit 2, one line
     +-- ToolMissingError    a host program the harness needs is not installed (the CLI: exit 2, one line)
     +-- ImageBuildError     the guest image could not be built
     +-- GuestError
          +-- LaunchError        QEMU did not start (exit code, argv, QEMU's own output)
          +-- BootError          the guest panicked, hung or QEMU died before it was ready (serial tail)
          +-- AbnormalShutdown   QEMU did not quit when asked and had to be killed
          +-- GuestCommandError  a command in the guest failed (command, exit code, stderr tail)
          +-- SshError           the SSH session could not be set up or broke
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of ``python -m harness``; DESIGN.md fixes 0, 1 and 2."""

    OK = 0
    #: A check failed or errored, or (doctor) the suite cannot run on this host at all.
    FAILED = 1
    #: Bad input: unknown profile or load, malformed data file, bad option value; an output that cannot be written
    #: (OutputError); a host program that is not installed (ToolMissingError). Nothing ran: the user fixes it.
    USAGE = 2
    #: Interrupted by the user (Ctrl-C); mirrors the shell's 128 + SIGINT.
    INTERRUPTED = 130


class HarnessError(Exception):
    """Root of every error the harness raises on purpose."""


class UsageError(HarnessError):
    """The user gave bad input; the message is one line naming the file, field and allowed values."""


class OutputError(UsageError):
    """An output (results, reports, logs, an image) cannot be written where the user asked: the file system is full
    or read-only, permission is denied, or a file stands where a directory must be. One line naming the path."""


class ToolMissingError(HarnessError):
    """A host program is missing; the message names the Debian package that provides it."""


class ImageBuildError(HarnessError):
    """Building the guest image failed; the message says which step and why."""


class GuestError(HarnessError):
    """Something went wrong with a guest: launch, boot, a command or the shutdown."""


def tail(text: str, lines: int = 25) -> str:
    """Return the last ``lines`` lines of ``text``: the part of a log a reader needs first."""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


class LaunchError(GuestError):
    """QEMU exited or could not be started before the guest ran.

    Carries the evidence a reader of a red CI run needs first: exit code, the full command line and QEMU's output.
    """

    def __init__(self, reason: str, exitcode: int | None, argv: list[str], output: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exitcode = exitcode
        self.argv = argv
        self.output = output

    def __str__(self) -> str:
        import shlex

        text = f"QEMU launch failed: {self.reason}"
        if self.exitcode is not None:
            text += f"\n  exit code: {self.exitcode}"
        text += f"\n  command: {shlex.join(self.argv)}"
        if self.output.strip():
            text += "\n  output:\n    " + tail(self.output, 15).replace("\n", "\n    ")
        return text


class BootError(GuestError):
    """The guest did not become ready: panic, hang (timeout) or QEMU death. Carries the serial-log tail."""

    def __init__(self, reason: str, serial_tail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.serial_tail = serial_tail

    def __str__(self) -> str:
        return f"{self.reason}\n--- serial log (tail) ---\n{self.serial_tail}"


class AbnormalShutdown(GuestError):
    """QEMU did not exit after ``quit`` within the deadline and was killed."""


class SshError(GuestError):
    """The SSH session to the guest could not be opened, or a transfer failed."""


class GuestCommandError(GuestError):
    """A command run in the guest exited non-zero or timed out."""

    def __init__(self, command: str, rc: int | None, stderr: str, reason: str = "") -> None:
        self.command = command
        self.rc = rc
        self.stderr = stderr
        self.reason = reason or (f"exit code {rc}" if rc is not None else "no exit status")
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"guest command failed ({self.reason}): {self.command}"
        if self.stderr.strip():
            text += "\n  stderr: " + tail(self.stderr, 10).replace("\n", "\n          ")
        return text


class LifecycleError(GuestError):
    """A step of the guest's life cycle (reset, save, restore, migration) failed. Names the step and carries the
    serial tails of both QEMUs (the source, and the destination where there was one)."""

    def __init__(self, step: str, reason: str, source_tail: str, destination_tail: str | None = None) -> None:
        super().__init__(reason)
        self.step = step
        self.reason = reason
        self.source_tail = source_tail
        self.destination_tail = destination_tail

    def __str__(self) -> str:
        text = (
            f"lifecycle step '{self.step}' failed: {self.reason}\n--- source serial log (tail) ---\n{self.source_tail}"
        )
        if self.destination_tail is not None:
            text += f"\n--- destination serial log (tail) ---\n{self.destination_tail}"
        return text
