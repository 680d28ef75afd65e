"""One QEMU process, owned by one object, ended by ``with``.

``QemuMachine`` launches QEMU with QMP on an inherited socket and the serial console drained to a log,
waits for the guest with deadlines, and shuts it down with ``quit``, falling back to SIGKILL. Cleanup is
idempotent and also runs after a failed launch; QEMU additionally gets PR_SET_PDEATHSIG so it dies with the
harness even if the harness is SIGKILLed. Modelled on QEMU's python/qemu/machine/machine.py.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from harness.console import ConsoleLog
from harness.errors import AbnormalShutdown, BootError, LaunchError, tail
from harness.image import READY_MARKER
from harness.lifetime import die_with_parent
from harness.qemu_argv import MachineConfig, build_argv, image_files

LOG = logging.getLogger(__name__)

#: Console lines that mean the guest kernel died; a boot wait ends at once on any of them.
PANIC_PATTERNS = (r"Kernel panic - not syncing[^\n]*", r"BUG: kernel NULL pointer[^\n]*", r"---\[ end trace[^\n]*")
DEFAULT_QMP_TIMEOUT_S = 30.0
DEFAULT_BOOT_TIMEOUT_S = 120.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0
KILL_WAIT_S = 60.0


TMPDIR_PREFIX = "vpmu-qemu-"


def sweep_stale_tmpdirs(root: Path | None = None) -> list[Path]:
    """Remove temp dirs of launchers that died without cleanup (SIGKILL); return what was removed.

    Each launcher's dir is named ``vpmu-qemu-<pid>-*``; a dir whose pid no longer exists is stale.
    """
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{TMPDIR_PREFIX}*"):
        pid = path.name[len(TMPDIR_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class QemuMachine:
    """A QEMU guest. Use as ``with QemuMachine(config) as vm:``; the process is gone when the block ends.

    :param log_dir: where ``serial.log`` and ``qemu.log`` are kept after shutdown; None keeps them only in a
        temporary directory that is removed at shutdown (the serial tail stays available in memory).
    """

    def __init__(self, config: MachineConfig, log_dir: Path | None = None, name: str = "vpmu") -> None:
        self.config = config
        self.name = name
        self._log_dir = Path(log_dir) if log_dir else None
        self._tmpdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._console: ConsoleLog | None = None
        self._qemu_log: Path | None = None
        self._final_serial = ""
        self.argv: list[str] = []
        self.launched_at = 0.0
        self._user_killed = False

    # --- lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> QemuMachine:
        self.launch()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown(raise_on_kill=exc_type is None)

    def launch(self) -> None:
        """Start QEMU and connect QMP.

        :raises LaunchError: QEMU could not be started or exited before QMP was up (its output attached).
        """
        for path in image_files(self.config):
            if not path.is_file():
                raise LaunchError(f"guest image file {path} is missing", None, [], "")
        try:
            self._launch()
        except BaseException as exc:
            output = self._read_qemu_log()
            exitcode = self._proc.poll() if self._proc else None
            self._hard_shutdown()
            self._post_shutdown()
            if not isinstance(exc, Exception) or isinstance(exc, LaunchError):
                raise  # don't downgrade KeyboardInterrupt/SystemExit, don't wrap our own error twice
            raise LaunchError(str(exc) or type(exc).__name__, exitcode, self.argv, output) from exc

    def _launch(self) -> None:
        sweep_stale_tmpdirs()
        self._tmpdir = Path(tempfile.mkdtemp(prefix=f"{TMPDIR_PREFIX}{os.getpid()}-"))
        logs = self._log_dir or self._tmpdir
        logs.mkdir(parents=True, exist_ok=True)
        self._qemu_log = logs / "qemu.log"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.argv = build_argv(self.config, theirs.fileno())
            LOG.debug("launching: %s", shlex.join(self.argv))
            with open(self._qemu_log, "wb") as qemu_log:
                self._proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=qemu_log,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,  # a terminal Ctrl-C reaches the harness, which shuts QEMU down
                    preexec_fn=die_with_parent,
                )
        finally:
            theirs.close()  # QEMU holds its end; ours sees EOF when QEMU exits
        assert self._proc.stdout is not None
        self.launched_at = time.monotonic()
        self._console = ConsoleLog(self._proc.stdout.fileno(), logs / "serial.log")
        self._qmp = QEMUMonitorProtocol(ours, nickname=self.name)
        self._qmp.settimeout(DEFAULT_QMP_TIMEOUT_S)
        try:
            self._qmp.connect(negotiate=True)
        except (QMPError, OSError, EOFError) as exc:
            self._proc.wait(5)
            raise LaunchError(f"QEMU exited before QMP was ready ({exc})", self._proc.returncode, self.argv,
                              self._read_qemu_log()) from exc  # fmt: skip

    def shutdown(self, timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S, raise_on_kill: bool = True) -> None:
        """Quit QEMU (QMP ``quit``), kill it if it does not exit in ``timeout_s`` seconds, and clean up.

        Safe to call twice and after a failed launch.

        :raises AbnormalShutdown: QEMU had to be killed (only when ``raise_on_kill``).
        """
        if self._proc is None:
            self._post_shutdown()
            return
        killed = False
        try:
            if self._proc.poll() is None:
                self._soft_shutdown(timeout_s)
        except subprocess.TimeoutExpired:
            killed = True
            self._hard_shutdown()
        finally:
            self._post_shutdown()
        if killed and raise_on_kill:
            raise AbnormalShutdown(f"QEMU did not exit within {timeout_s:.0f} s of 'quit' and was killed")

    def _soft_shutdown(self, timeout_s: float) -> None:
        assert self._proc is not None
        if self._qmp is not None:
            try:
                self._qmp.cmd("quit")
            except (QMPError, OSError, EOFError) as exc:
                LOG.debug("QMP quit: %s (QEMU may already be exiting)", exc)
        self._proc.wait(timeout_s)

    def _hard_shutdown(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._user_killed = True
            self._proc.kill()
            try:
                self._proc.wait(KILL_WAIT_S)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
                LOG.error("QEMU pid %d survived SIGKILL for %.0f s", self._proc.pid, KILL_WAIT_S)

    def _post_shutdown(self) -> None:
        """Close QMP and the console, reap QEMU, remove the temp dir. May also run after a failed launch."""
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception as exc:  # EOF after 'quit' is expected; nothing to do about anything else
                LOG.debug("QMP close: %s", exc)
            self._qmp = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._hard_shutdown()
            if self._console is not None:
                self._console.close()
                self._final_serial = self._console.text()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            rc = self._proc.returncode
            if rc is not None and rc < 0 and not self._user_killed:
                LOG.warning("qemu received signal %d; command: %s", -rc, shlex.join(self.argv))
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # --- queries -------------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def wait(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` seconds for QEMU to exit; return its exit code, or None if still running."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def serial_text(self) -> str:
        """The console output so far (after shutdown: all of it, up to the in-memory cap)."""
        return self._console.text() if self._console and self._proc else self._final_serial

    def serial_tail(self, lines: int = 30) -> str:
        return tail(self.serial_text(), lines)

    def _read_qemu_log(self) -> str:
        try:
            return self._qemu_log.read_text(errors="replace") if self._qemu_log else ""
        except OSError:
            return ""

    def qemu_log(self) -> str:
        """QEMU's own stderr (warnings such as 'TCG doesn't support requested feature')."""
        return self._read_qemu_log()

    def qmp(self, command: str, **args: Any) -> Any:
        """Run a QMP command and return its ``return`` value.

        :raises qemu.qmp.ExecuteError: QEMU answered with an error (its ``desc`` is the message).
        :raises BootError: QEMU is not running.
        """
        if self._qmp is None or not self.is_running():
            raise BootError(f"QMP {command}: QEMU is not running (exit code {self.exitcode})", self.serial_tail())
        return self._qmp.cmd(command, **args)

    def ssh_port(self) -> int:
        """Return the host port slirp bound for the guest's port 22 (read from ``info usernet``)."""
        text = self.qmp("human-monitor-command", **{"command-line": "info usernet"})
        match = re.search(r"HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+22\b", text)
        if match is None:
            raise BootError(f"no SSH port forward in QEMU's 'info usernet':\n{text}", self.serial_tail())
        return int(match.group(1))

    def wait_for_console(self, pattern: str, timeout_s: float, failures: tuple[str, ...] = PANIC_PATTERNS) -> str:
        """Wait for ``pattern`` on the console; return the matched text.

        :param timeout_s: seconds; the wait also ends at once on a failure pattern or when QEMU exits.
        :raises BootError: panic, QEMU exit, or timeout; the serial tail is attached.
        """
        assert self._console is not None, "launch() first"
        result = self._console.wait_for(pattern, failures, timeout_s)
        if result.outcome == "match":
            return result.text
        if result.outcome == "failure":
            # Give the kernel a moment to print the rest of the panic (call trace) before we quote it.
            self._console.wait_for(r"end Kernel panic[^\n]*\n", (), 2.0)
            reason = f"guest kernel panicked: {result.text.strip()}"
        elif result.outcome == "eof":
            code = self._proc.wait(5) if self._proc else None
            reason = f"QEMU exited (code {code}) before '{pattern}' appeared on the console"
            qemu_output = self._read_qemu_log().strip()
            if qemu_output:
                reason += f"; QEMU said: {tail(qemu_output, 3)}"
        else:
            reason = f"timeout after {timeout_s:.0f} s waiting for '{pattern}' on the console (guest hung?)"
        raise BootError(reason, self.serial_tail())

    def wait_ready(self, timeout_s: float = DEFAULT_BOOT_TIMEOUT_S) -> float:
        """Wait for the image's readiness marker; return seconds since launch."""
        self.wait_for_console(READY_MARKER, timeout_s)
        return time.monotonic() - self.launched_at

    def kill(self) -> None:
        """SIGKILL QEMU without cleanup (tests use it to simulate a crash); shutdown() still cleans up."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
