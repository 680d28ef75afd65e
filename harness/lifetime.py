"""Child processes that cannot outlive the harness (QEMU, host perf loads)."""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGKILL the child when the launching thread dies (``preexec_fn`` of Popen), so it is
    gone even when the harness itself is SIGKILLed and no cleanup of ours can run."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
