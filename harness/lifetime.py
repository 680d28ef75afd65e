"""Child processes that cannot outlive the harness (QEMU, host perf loads), waits on them without polling, how their
ends are named, and the phases of a guest's life.

``phase(name)`` announces where the harness is (logged at DEBUG). Observers are registered only by the self-tests'
fault-injection plugin (``tests/fault_plugin.py``, loaded explicitly with ``-p tests.fault_plugin`` and told which
fault to fire with ``--vpmu-inject-fault``); without it the announcement is a log line and nothing else.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import select
import signal
import subprocess
from collections.abc import Callable
from typing import Any

LOG = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h
#: libc's prctl(2), looked up once here: the lookup (a dlopen) must not run between fork and exec, where another
#: thread of the harness (paramiko, the console reader) may hold the loader's lock in the parent.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl

#: The phases the harness announces, in the order a run meets them (README "Bounds": the bound of each).
PHASES = (
    "boot",  # QEMU launched and QMP connected; the guest has not run yet
    "capability_probe",  # the paused guest's vCPU is asked over QMP what QEMU granted (qom-get)
    "ssh_ready",  # the console showed the readiness marker; the SSH handshake is next
    "probe_copy",  # a probe binary is about to be copied into the guest (SFTP)
    "probe_run",  # a probe command has started in the guest
    "load_start",  # a host perf load was started and is being waited for
    "load_stop",  # a host perf load is about to be stopped
    "reset",  # QMP system_reset was sent, or the guest was told to reboot; its next boot is awaited (suite.lifecycle)
    "save",  # the stopped guest's state is being written to a file (QMP migrate to exec:); machine = the source
    "restore",  # a new QEMU reads that file (QMP migrate-incoming); machine = the destination
    "migration",  # a live migration to a second QEMU has started; machine = the destination
    "migration_source",  # the same moment, announced with machine = the source
    "report",  # results.json and the reports are about to be written
    "shutdown",  # QEMU is about to be asked to quit
)

PhaseObserver = Callable[[str, dict[str, Any]], None]
_observers: list[PhaseObserver] = []


def dies_with_parent() -> Callable[[], None]:
    """The ``preexec_fn`` of a Popen whose child must not outlive the harness: it asks the kernel to SIGKILL the
    child when the launching thread dies, so it is gone even when the harness itself is SIGKILLed and no cleanup of
    ours can run. A parent that died before the request (the child was already re-parented) ends the child at once.
    Call it in the parent: it records the parent's pid."""
    parent = os.getpid()

    def preexec() -> None:  # pragma: no cover - runs in the child between fork and exec
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def wait_readable(fds: list[int], timeout_s: float | None) -> list[int]:
    """The descriptors of ``fds`` that are readable, waiting up to ``timeout_s`` seconds (None: forever) for one.
    poll(2), not select(2): select cannot take a descriptor numbered 1024 or higher (ValueError)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    # Rounded up: a wait that ends a fraction of a millisecond early would make its caller loop once more for nothing.
    timeout_ms = None if timeout_s is None else max(0, math.ceil(timeout_s * 1000))
    return [fd for fd, _events in poller.poll(timeout_ms)]


def stopped_text(state: str | None) -> str | None:
    """What a process state from :func:`process_state` says about a process that cannot run: ``T`` stopped by a
    signal (SIGSTOP, SIGTSTP), ``t`` stopped by a debugger (ptrace); None for any other state."""
    if state is None:
        return None
    if state.startswith("T"):
        return f"stopped (process state {state}: SIGSTOP?)"
    if state.startswith("t"):
        return f"stopped by a debugger (process state {state}: traced)"
    return None


def phase(name: str, **context: Any) -> None:
    """Announce that the harness enters phase ``name`` (one of PHASES); ``context`` names the objects involved
    (``machine``, ``session``, ``load``) for an observer."""
    LOG.debug("phase %s", name)
    for observer in list(_observers):
        observer(name, context)


def observe_phases(observer: PhaseObserver) -> Callable[[], None]:
    """Call ``observer(name, context)`` at every phase; return the function that removes it again."""
    _observers.append(observer)
    return lambda: _observers.remove(observer) if observer in _observers else None


def exit_text(returncode: int) -> str:
    """How a process ended, in words: ``killed by signal 9 (SIGKILL)`` or ``exited with code 1``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-returncode} ({name})"
    return f"exited with code {returncode}"


def process_state(pid: int) -> str | None:
    """The scheduler state of ``pid`` from /proc/PID/stat (proc(5) field 3), e.g. ``T (stopped)``; None when the
    process is gone."""
    names = {"R": "running", "S": "sleeping", "D": "disk sleep", "T": "stopped", "t": "tracing stop",
             "Z": "zombie", "X": "dead", "I": "idle"}  # fmt: skip
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return f"{state} ({names.get(state, 'unknown')})"


class ProcessWatch:
    """A pidfd (pidfd_open(2), Linux 5.3) of a child: readable once the child has exited, so waits can select on
    the child's end together with other events, and ``wait`` blocks without polling (Popen.wait with a timeout
    polls every 50 ms)."""

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self.proc = proc
        try:
            self._fd: int | None = os.pidfd_open(proc.pid)
        except OSError as exc:  # pragma: no cover - kernels before 5.3
            LOG.debug("pidfd_open(%d): %s; waits fall back to polling", proc.pid, exc)
            self._fd = None

    def fileno(self) -> int | None:
        """The pidfd (None where the kernel has none): readable once the child exited, also before it is reaped."""
        return self._fd

    def wait(self, timeout_s: float | None) -> int | None:
        """Wait up to ``timeout_s`` seconds (None: forever) for the child to exit; return its exit code (reaped), or
        None if it still runs."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        if self._fd is None:  # pragma: no cover - no pidfd
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return None
        wait_readable([self._fd], timeout_s)
        return self.proc.poll()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
