"""One QEMU process, owned by one object, ended by ``with``.

``QemuMachine`` launches QEMU with QMP on an inherited socket and the serial console drained to a log,
waits for the guest with deadlines, and shuts it down with ``quit``, falling back to SIGKILL. Cleanup is
idempotent and also runs after a failed launch; QEMU additionally gets PR_SET_PDEATHSIG so it dies with the
harness even if the harness is SIGKILLed. Modelled on QEMU's python/qemu/machine/machine.py.

Every wait ends on an event or a deadline, and also as soon as QEMU is gone: QEMU's exit is a pidfd the waits
select on (``exit_fd``), a QEMU the kernel holds stopped is seen in /proc at once, and every QMP command has a
deadline. A command that goes unanswered is followed by one ``query-status``: a QEMU that answers that was merely
slow; one that does not counts as frozen (``gone`` then says so and later QMP calls fail at once) until it answers
again (:meth:`QemuMachine.check` still asks). Best-effort reads (VM exits, vCPU threads) never mark QEMU frozen. The
guest's SSH session (ssh.GuestSession) asks the machine the same questions through ``exit_fd``, ``gone`` and
``check``.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from harness.errors import AbnormalShutdown, BootError, LaunchError, tail
from harness.guest.console import ConsoleLog, ConsoleMatch
from harness.guest.image import READY_MARKER
from harness.guest.qemu_argv import MachineConfig, build_argv, image_files
from harness.lifetime import ProcessWatch, dies_with_parent, exit_text, phase, process_state, stopped_text

LOG = logging.getLogger(__name__)
# qemu.qmp logs a connection that broke under it (QEMU killed) at ERROR as well as raising it; the harness reports
# what it raises, with QEMU's exit status.
logging.getLogger("qemu.qmp.protocol").setLevel(logging.CRITICAL)

#: The console line of a guest kernel that died (kernel/panic.c panic()); a boot wait ends at once on it. An oops or
#: a WARN splat is not a death: with panic_on_oops=0 the kernel kills the task and goes on (see TROUBLE_RE).
PANIC_PATTERNS = (r"Kernel panic - not syncing[^\n]*",)
#: Console lines of a guest kernel in trouble that goes on running: quoted as evidence, never as the cause of an end.
TROUBLE_RE = re.compile(r"^[^\n]*(?:Oops|BUG:|WARNING:|soft lockup|rcu[^\n]*stall|hung_task)[^\n]*$", re.MULTILINE)
#: Of those, the lines after which the guest kernel cannot be trusted to run further probes (an oops or BUG:
#: it killed a task, maybe holding locks).
FATAL_RE = re.compile(r"Oops|BUG:")
#: Seconds exit_reason() waits for the console reader to reach EOF (QEMU is dead: at once), so the guest's last
#: words (a panic line printed just before QEMU exited) are read before they are looked for.
CONSOLE_DRAIN_S = 2.0
#: Deadline of one QMP command (seconds). QEMU answers in milliseconds, also under TCG on a loaded host; one that
#: does not answer in this time, nor a query-status within PING_TIMEOUT_S after it, is frozen (a deadlocked main
#: loop) and is treated as gone until it answers again.
DEFAULT_QMP_TIMEOUT_S = 10.0
#: Deadline of QMP's greeting and capabilities negotiation right after launch.
QMP_CONNECT_TIMEOUT_S = 20.0
#: Deadline of the ``query-status`` that asks whether QEMU still serves the guest (check()).
PING_TIMEOUT_S = 5.0
#: How often a wait that sees no progress (a silent console) asks QEMU whether it still serves the guest.
HEARTBEAT_S = 5.0
DEFAULT_BOOT_TIMEOUT_S = 120.0
#: Seconds from QMP ``quit`` until QEMU must have exited before it is killed.
DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0
#: Seconds a SIGKILLed QEMU may take to be reaped (only a process stuck in the kernel takes longer).
KILL_WAIT_S = 10.0
#: QMP run states in which the guest can still answer (query-status; qapi/run-state.json RunState).
LIVE_STATES = ("running", "prelaunch")


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


def _first_match(patterns: tuple[str, ...], text: str) -> str | None:
    for pattern in patterns:
        found = re.search(pattern, text)
        if found:
            return found.group(0).strip()
    return None


def console_evidence(text: str) -> list[str]:
    """The lines of ``text`` (console output) that show a guest kernel in trouble: oops, BUG, WARN splat, soft
    lockup, RCU stall, hung task (TROUBLE_RE), stripped."""
    return [line.strip() for line in TROUBLE_RE.findall(text)]


class _Monitor(QEMUMonitorProtocol):
    """qemu.qmp's synchronous client with a deadline on every step: its own ``connect`` and ``close`` have none, so
    a QEMU that never greets (stopped before QMP came up) would block them forever."""

    def connect_within(self, timeout_s: float) -> None:
        """Connect and negotiate capabilities (as ``connect(negotiate=True)``) within ``timeout_s`` seconds."""
        self._qmp.await_greeting = True
        self._qmp.negotiate = True
        self._sync(self._qmp.connect(self._address), timeout_s)

    def execute(self, command: str, args: dict[str, Any], timeout_s: float) -> Any:
        """Run one command (ids assigned, so a late answer to an abandoned one is never taken for the next)."""
        return self._sync(self._qmp.execute(command, args), timeout_s)

    def close_within(self, timeout_s: float) -> None:
        self._sync(self._qmp.disconnect(), timeout_s)

    def event_within(self, exit_fd: int | None, timeout_s: float) -> dict[str, Any] | None:
        """The next QMP event, waiting at most ``timeout_s`` seconds; None at the deadline or as soon as ``exit_fd``
        (QEMU's pidfd) becomes readable: qemu.qmp's own event wait does not end when the connection breaks."""
        return self._sync(self._next_event(exit_fd, timeout_s), None)

    async def _next_event(self, exit_fd: int | None, timeout_s: float) -> dict[str, Any] | None:
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        if exit_fd is not None:
            loop.add_reader(exit_fd, lambda: exited.done() or exited.set_result(None))
        getter = asyncio.ensure_future(self._qmp.events.get())
        try:
            await asyncio.wait({getter, exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if exit_fd is not None:
                loop.remove_reader(exit_fd)
            if not getter.done():
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
        return dict(getter.result()) if getter.done() and not getter.cancelled() else None


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
        self._watch: ProcessWatch | None = None
        self._qmp: _Monitor | None = None
        #: Why QEMU counts as frozen (a QMP command and the query-status after it went unanswered); None again as
        #: soon as it answers a command.
        self._frozen: str | None = None
        #: Why the QMP connection broke while QEMU runs (it cannot be mended); None while it works.
        self._qmp_lost: str | None = None
        #: The harness asked QEMU to end (QMP quit): its exit is then no news to quote QEMU's log for.
        self._quit_sent = False
        #: The guest's run state from the last query-status (check()).
        self.last_status: str | None = None
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
                    preexec_fn=dies_with_parent(),
                    env={**os.environ, "LC_ALL": "C"},  # errors in the C locale's words, which verdicts match
                )
        finally:
            theirs.close()  # QEMU holds its end; ours sees EOF when QEMU exits
        assert self._proc.stdout is not None
        self._watch = ProcessWatch(self._proc)
        self.launched_at = time.monotonic()
        self._console = ConsoleLog(self._proc.stdout.fileno(), logs / "serial.log")
        self._qmp = _Monitor(ours, nickname=self.name)
        self._qmp.settimeout(DEFAULT_QMP_TIMEOUT_S)
        try:
            self._qmp.connect_within(QMP_CONNECT_TIMEOUT_S)
        except TimeoutError as exc:
            state = process_state(self._proc.pid)
            raise LaunchError(f"QEMU did not greet on QMP within {QMP_CONNECT_TIMEOUT_S:.0f} s (process state "
                              f"{state})", None, self.argv, self._read_qemu_log()) from exc  # fmt: skip
        except (QMPError, OSError, EOFError) as exc:
            self._watch.wait(5)
            raise LaunchError(f"QEMU exited before QMP was ready ({exc})", self._proc.returncode, self.argv,
                              self._read_qemu_log()) from exc  # fmt: skip
        if self.config.image is not None and not self.config.incoming:  # a -machine none QEMU only answers
            phase("boot", machine=self)  # capability questions; an incoming one is announced by harness.suite.lifecycle

    def shutdown(self, timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S, raise_on_kill: bool = True) -> None:
        """Quit QEMU (QMP ``quit``), kill it if it does not exit in ``timeout_s`` seconds, and clean up. A QEMU
        already known to be frozen (see :meth:`gone`) is killed at once: it cannot answer ``quit``.

        Safe to call twice and after a failed launch.

        :raises AbnormalShutdown: a QEMU that was not known to be frozen had to be killed (only when
            ``raise_on_kill``); the reason says what QMP and the process state showed.
        """
        if self._proc is None:
            self._post_shutdown()
            return
        unanswered: str | None = None
        try:
            if self.config.image is not None:
                phase("shutdown", machine=self)
            if self._proc.poll() is None and self.gone() is None:
                unanswered = self._soft_shutdown(timeout_s)
        finally:
            self._post_shutdown()
        if unanswered and raise_on_kill:
            raise AbnormalShutdown(f"QEMU did not exit within {timeout_s:.0f} s of 'quit' and was killed "
                                   f"({unanswered})")  # fmt: skip

    def _soft_shutdown(self, timeout_s: float) -> str | None:
        """QMP ``quit``, then wait for the exit; return None once QEMU exited, else what was seen (it is killed).

        A QEMU that answered ``quit`` but is slow to exit (vCPUs slow to pause on a starved host) is killed with a
        warning, not an error: it did what was asked."""
        assert self._proc is not None and self._watch is not None
        deadline = time.monotonic() + timeout_s
        self._quit_sent = True
        answered = False
        try:
            self.qmp("quit", timeout_s=min(timeout_s, PING_TIMEOUT_S), record_frozen=False)
            answered = True
        except (QMPError, BootError) as exc:
            LOG.debug("QMP quit: %s (QEMU may already be exiting)", exc)
        if self._watch.wait(max(0.0, deadline - time.monotonic())) is not None:
            return None
        state = process_state(self._proc.pid)
        if answered:
            LOG.warning("QEMU (pid %d) answered 'quit' but had not exited %.0f s later (process state %s); killing it",
                        self._proc.pid, timeout_s, state)  # fmt: skip
            return None
        return self._frozen or f"process state {state}"

    def _hard_shutdown(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._user_killed = True
            self._proc.kill()  # also ends a stopped (SIGSTOP) process
            assert self._watch is not None
            if self._watch.wait(KILL_WAIT_S) is None:  # pragma: no cover - a process stuck in the kernel
                LOG.error("QEMU pid %d survived SIGKILL for %.0f s", self._proc.pid, KILL_WAIT_S)

    def _post_shutdown(self) -> None:
        """Kill QEMU if it still runs, close QMP and the console, reap QEMU, remove the temp dir. May also run after
        a failed launch. QEMU goes first: closing QMP to a frozen QEMU could wait for it."""
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._hard_shutdown()
            if self._qmp is not None:
                try:
                    self._qmp.close_within(PING_TIMEOUT_S)
                except BaseException as exc:  # EOF after 'quit' is expected; nothing to do about anything else
                    if not isinstance(exc, Exception):
                        raise
                    LOG.debug("QMP close: %s", exc)
                self._qmp = None
            if self._proc is not None:
                if self._console is not None:
                    self._console.close()
                    self._final_serial = self._console.text()
                if self._proc.stdout is not None:
                    self._proc.stdout.close()
                rc = self._proc.returncode
                if rc is not None and rc < 0 and not self._user_killed:
                    LOG.warning("qemu received signal %d; command: %s", -rc, shlex.join(self.argv))
                if self._watch is not None:
                    self._watch.close()
        finally:  # also when Ctrl-C/SIGTERM lands in here (e.g. re-raised by QMP's event loop): no temp dir left
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
        if self._proc is None or self._watch is None:
            return None
        return self._watch.wait(timeout_s)

    def exit_fd(self) -> int | None:
        """A descriptor that becomes readable the moment QEMU exits (its pidfd), for waits that select."""
        return self._watch.fileno() if self._watch is not None else None

    def gone(self) -> str | None:
        """Why QEMU can no longer serve the guest, without blocking: it exited (how: code, signal, a guest panic; it
        is reaped here), the kernel holds it stopped right now (read from /proc at each call: a QEMU continued after
        SIGSTOP is back), its QMP connection broke, or it counts as frozen (see :meth:`qmp`); None otherwise."""
        return self._unreachable() or self._frozen

    def _unreachable(self) -> str | None:
        """gone() without the frozen mark: what a new question to QEMU cannot get past."""
        if self._proc is None:
            return "QEMU is not running"
        if self._proc.poll() is not None:
            return self.exit_reason()
        return self._stopped() or self._qmp_lost

    def check(self, timeout_s: float = PING_TIMEOUT_S) -> str | None:
        """Ask QEMU whether it still serves the guest (QMP ``query-status`` within ``timeout_s`` seconds, and once
        more within PING_TIMEOUT_S when that goes unanswered): None when the guest is running; otherwise why not
        (exited, stopped, frozen, the guest panicked or is paused). A QEMU that counts as frozen is asked again: an
        answer clears the mark."""
        problem = self._unreachable()
        if problem is not None:
            return problem
        if self._qmp is None:
            return "QMP is not connected"
        try:
            status = self._execute("query-status", {}, timeout_s, record_frozen=True)
        except BootError as exc:
            return exc.reason
        except QMPError as exc:
            return f"QMP query-status failed: {exc}"
        self.last_status = str(status.get("status"))
        if self.last_status not in LIVE_STATES:
            return f"the guest is not running (QMP query-status: '{self.last_status}')"
        return None

    def exit_reason(self) -> str:
        """How QEMU ended, for error messages: the guest's panic line when there is one, the signal or exit code,
        and QEMU's own last words."""
        assert self._proc is not None
        rc = self._proc.returncode
        if rc is None:
            return "QEMU is still running"
        text = f"QEMU (pid {self._proc.pid}) {exit_text(rc)}"
        if self._user_killed:
            text += " by the harness"
        if self._console is not None:
            # The pidfd can wake a waiter before the reader thread has read the console's last chunk; QEMU is dead,
            # so the reader reaches EOF at once.
            self._console.close(CONSOLE_DRAIN_S)
        serial = self.serial_text()
        # A panicking guest ends QEMU with 0 (panic=-1 reboots, -no-reboot turns that into an exit); QEMU killed or
        # failing afterwards was not ended by the panic.
        panic = _first_match(PANIC_PATTERNS, serial) if rc == 0 else None
        if panic:
            return f"the guest kernel panicked ({panic}) and {text}"
        if not (self._user_killed or self._quit_sent):
            # Not the harness's doing: QEMU's own words say who ended it ("terminating on signal 15 from pid N")
            # or what failed; an exit with 0 is also a guest reset or poweroff (-no-reboot).
            output = self._read_qemu_log().strip()
            if output:
                text += f"; QEMU said: {tail(output, 3)}"
            elif rc == 0:
                text += " (QEMU said nothing: the guest reset or powered off?)"
        trouble = console_evidence(serial)
        if trouble:
            text += f"; the guest console showed: {' | '.join(trouble[-3:])}"
        return text

    def serial_text(self, since: int = 0) -> str:
        """The console output so far (after shutdown: all of it, up to the in-memory cap); with ``since`` (a
        :meth:`console_position`), only what came after it."""
        if self._console and self._proc:
            return self._console.text(since)
        return self._final_serial[since:] if since else self._final_serial

    def console_position(self) -> int:
        """A mark in the console output, for :meth:`serial_text` ``since`` and :meth:`wait_for_console` ``start``
        (which then see only what the guest prints later, e.g. the readiness marker of its next boot)."""
        if self._console and self._proc:
            return self._console.position()
        return len(self._final_serial)

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

    def qmp(self, command: str, timeout_s: float = DEFAULT_QMP_TIMEOUT_S, record_frozen: bool = True,
            **args: Any) -> Any:  # fmt: skip
        """Run a QMP command and return its ``return`` value, waiting at most ``timeout_s`` seconds.

        :param record_frozen: a command left unanswered marks QEMU frozen when the ``query-status`` sent after it
            (PING_TIMEOUT_S) goes unanswered too; False for best-effort reads, which never condemn the machine (no
            second question either).
        :raises qemu.qmp.ExecuteError: QEMU answered with an error (its ``desc`` is the message).
        :raises BootError: QEMU is not running, is stopped, counts as frozen, exited during the command, or did not
            answer within ``timeout_s``; the reason names what happened, the serial tail is attached.
        """
        problem = self.gone()
        if self._qmp is None or problem is not None:
            raise BootError(f"QMP {command}: {problem or 'QMP is not connected'}", self.serial_tail())
        return self._execute(command, args, timeout_s, record_frozen)

    def _execute(self, command: str, args: dict[str, Any], timeout_s: float, record_frozen: bool) -> Any:
        """qmp() past its gate: any answer (also an error) clears the frozen mark."""
        assert self._qmp is not None
        try:
            result = self._qmp.execute(command, args, timeout_s)
        except ExecuteError:
            self._frozen = None
            raise
        except TimeoutError:
            reason = self._unanswered(f"QMP '{command}'", timeout_s, record_frozen)
        except (QMPError, OSError, EOFError) as exc:
            reason = self._lost(f"QMP '{command}'", exc)
        else:
            self._frozen = None
            return result
        raise BootError(reason, self.serial_tail())

    def _stopped(self) -> str | None:
        """A QEMU the kernel holds stopped (SIGSTOP; a debugger: ptrace) cannot answer: say so at once instead of
        waiting for a QMP deadline. Read anew at each call: a QEMU continued (SIGCONT, the debugger detached) runs
        again."""
        assert self._proc is not None
        stopped = stopped_text(process_state(self._proc.pid))
        return f"QEMU (pid {self._proc.pid}) is {stopped}" if stopped else None

    def _unanswered(self, what: str, timeout_s: float, record_frozen: bool) -> str:
        """``what`` got no answer in time. QEMU exited meanwhile or is stopped: say so. Else, with
        ``record_frozen``, ask ``query-status`` once more: qemu.qmp drops the late answer of the abandoned command
        (its id is unknown), so the connection still works, and a QEMU that answers was only slow; one that does
        not is marked frozen (gone() says so until it answers again)."""
        assert self._proc is not None and self._qmp is not None
        if self._proc.poll() is not None:
            return self.exit_reason()
        stopped = self._stopped()
        if stopped is not None:
            return f"{what} got no answer within {timeout_s:g} s: {stopped}"
        slow = f"QEMU (pid {self._proc.pid}) did not answer {what} within {timeout_s:g} s"
        if not record_frozen:
            return f"{slow} (a best-effort read: QEMU is not counted as frozen)"
        try:
            self._qmp.execute("query-status", {}, PING_TIMEOUT_S)
        except TimeoutError:
            if self._proc.poll() is not None:
                return self.exit_reason()
            stopped = self._stopped()
            if stopped is not None:
                return f"{what} got no answer within {timeout_s:g} s: {stopped}"
            self._frozen = f"QEMU (pid {self._proc.pid}) stopped answering QMP: {what} got no answer within " \
                           f"{timeout_s:g} s, nor the query-status after it within {PING_TIMEOUT_S:g} s; process " \
                           f"state {process_state(self._proc.pid)}"  # fmt: skip
            return self._frozen
        except ExecuteError:
            pass  # an answer all the same
        except (QMPError, OSError, EOFError) as exc:
            return self._lost("QMP 'query-status'", exc)
        self._frozen = None
        return f"{slow} (it answered the query-status after it: slow, not frozen)"

    def _lost(self, what: str, exc: BaseException) -> str:
        """QMP broke during ``what``: usually QEMU exited (its socket closes before it can be reaped)."""
        assert self._watch is not None
        if self._watch.wait(2.0) is not None:
            return self.exit_reason()
        self._qmp_lost = f"QMP connection lost during {what} ({type(exc).__name__}: {exc}) while QEMU runs"
        return self._qmp_lost

    def console_evidence(self, since: int = 0) -> list[str]:
        """The console's lines of a guest kernel in trouble (TROUBLE_RE) after ``since`` (a console_position)."""
        return console_evidence(self.serial_text(since))

    def ssh_port(self) -> int:
        """Return the host port slirp bound for the guest's port 22 (read from ``info usernet``)."""
        text = self.qmp("human-monitor-command", **{"command-line": "info usernet"})
        match = re.search(r"HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+22\b", text)
        if match is None:
            raise BootError(f"no SSH port forward in QEMU's 'info usernet':\n{text}", self.serial_tail())
        return int(match.group(1))

    def wait_for_console(
        self, pattern: str, timeout_s: float, failures: tuple[str, ...] = PANIC_PATTERNS, start: int = 0
    ) -> str:
        """Wait for ``pattern`` on the console after offset ``start`` (:meth:`console_position`); return the match.

        :param timeout_s: seconds; the wait also ends at once on a failure pattern or when QEMU exits.
        :raises BootError: panic, QEMU exit, or timeout; the serial tail is attached.
        """
        assert self._console is not None, "launch() first"
        result = self._wait_console(pattern, failures, timeout_s, start)
        if result.outcome == "match":
            return result.text
        if result.outcome == "frozen":
            raise BootError(f"{result.text} while waiting for '{pattern}' on the console", self.serial_tail())
        if result.outcome == "failure":
            # Give the kernel a moment to print the rest of the panic (call trace) before we quote it.
            self._console.wait_for(r"end Kernel panic[^\n]*\n", (), 2.0, start)
            reason = f"guest kernel panicked: {result.text.strip()}"
        elif result.outcome == "eof":
            code = self.wait(5)
            reason = f"QEMU exited (code {code}) before '{pattern}' appeared on the console"
            if code is not None:
                reason = f"{self.exit_reason()} before '{pattern}' appeared on the console"
        else:
            reason = f"timeout after {timeout_s:.0f} s waiting for '{pattern}' on the console (guest hung?)"
        raise BootError(reason, self.serial_tail())

    def _wait_console(self, pattern: str, failures: tuple[str, ...], timeout_s: float, start: int = 0) -> ConsoleMatch:
        """The console wait in slices of HEARTBEAT_S: while the console is silent, QEMU is asked whether it still
        runs the guest (a stopped QEMU never closes the console), so a frozen QEMU ends the wait within
        HEARTBEAT_S + PING_TIMEOUT_S seconds, not at ``timeout_s``. Outcome ``frozen`` carries the reason."""
        assert self._console is not None
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            result = self._console.wait_for(pattern, failures, max(0.0, min(HEARTBEAT_S, remaining)), start)
            if result.outcome != "timeout" or remaining <= HEARTBEAT_S:
                return result
            problem = self.check()
            if problem is not None:
                return ConsoleMatch("frozen", problem)

    def wait_ready(self, timeout_s: float = DEFAULT_BOOT_TIMEOUT_S, start: int = 0) -> float:
        """Wait for the image's readiness marker (printed after console offset ``start``); return seconds since
        launch."""
        self.wait_for_console(READY_MARKER, timeout_s, start=start)
        return time.monotonic() - self.launched_at

    def wait_event(
        self, names: tuple[str, ...], timeout_s: float, until: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        """Wait for a QMP event named one of ``names`` for which ``until`` holds (default: any); return it (other
        events are dropped). Events that came before the call count: see :meth:`clear_events`.

        :param timeout_s: seconds; the wait ends at once when QEMU exits.
        :raises BootError: QEMU exited, is stopped or frozen, or no such event came within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            problem = self.gone()
            if self._qmp is None or problem is not None:
                raise BootError(f"waiting for QMP event {'/'.join(names)}: {problem or 'QMP is not connected'}",
                                self.serial_tail())  # fmt: skip
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BootError(f"no QMP event {'/'.join(names)} within {timeout_s:g} s", self.serial_tail())
            try:
                event = self._qmp.event_within(self.exit_fd(), remaining)
            except (QMPError, OSError, EOFError) as exc:
                reason = self._lost(f"the wait for QMP event {'/'.join(names)}", exc)
                raise BootError(reason, self.serial_tail()) from exc
            if event is None:
                continue  # QEMU exited (gone() says how) or the deadline passed
            if event.get("event") in names and (until is None or until(event)):
                return event

    def clear_events(self) -> None:
        """Drop the QMP events received so far (a later :meth:`wait_event` sees only newer ones)."""
        if self._qmp is not None:
            self._qmp.clear_events()

    def kill(self) -> None:
        """SIGKILL QEMU without cleanup (tests use it to simulate a crash); shutdown() still cleans up."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
