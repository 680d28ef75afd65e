"""SSH session to a guest with paramiko: run commands, copy files, every wait bounded.

The guest's host key is pinned (it comes from the image); an unknown key is rejected, never auto-accepted.

A command's wait sleeps on one descriptor that paramiko's transport thread pokes on each event of the channel
(output, EOF, exit status, close) together with QEMU's pidfd (the session's :class:`Peer`,
machine.QemuMachine), so QEMU's exit and a dead transport end it at once. A keepalive thread asks the guest
for an answer every KEEPALIVE_INTERVAL_S; one left unanswered for KEEPALIVE_TIMEOUT_S, and a second one then left
unanswered for KEEPALIVE_RETRY_TIMEOUT_S (QEMU stopped, the guest locked up), closes the transport, which ends every
wait on the session (commands, SFTP, channel opens). A keepalive wait that ends far later than its deadline means the
harness itself was paused (the guest's answer may sit unread in the socket): that round starts again instead of
counting against the guest. The SshError then says why, as precisely as the peer can tell: QEMU's exit code or
signal, the guest's panic line, a frozen QEMU, a guest that stopped answering, or a guest that dropped the
connection.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

import paramiko

from harness import lifetime
from harness.errors import GuestCommandError, SshError

LOG = logging.getLogger(__name__)
# paramiko logs every refused attempt at ERROR from its transport thread; connect() reports failures itself.
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)
DEFAULT_CONNECT_TIMEOUT_S = 60.0
DEFAULT_COMMAND_TIMEOUT_S = 60.0
#: One SSH attempt; a guest that is still starting dropbear refuses or drops the connection at once.
ATTEMPT_TIMEOUT_S = 10.0
#: Pause between connection attempts while dropbear starts (slirp accepts, then drops, until it listens).
RETRY_PAUSE_S = 0.05
#: Deadline of the one reconnect run() makes when a command cannot be started.
RECONNECT_TIMEOUT_S = 20.0
#: Deadline of opening a channel (a command or SFTP); the keepalive ends it earlier when the guest stops answering.
CHANNEL_OPEN_TIMEOUT_S = 30.0
#: The guest is asked for an answer this often (seconds) while the session is open ...
KEEPALIVE_INTERVAL_S = 3.0
#: ... and counts as gone when an answer takes longer than this (seconds). A guest that runs answers in
#: milliseconds, also under TCG on a loaded host; a stopped QEMU or a locked-up guest kernel never does.
KEEPALIVE_TIMEOUT_S = 10.0
#: The second keepalive, sent when the first went unanswered, must be answered within this (seconds) ...
KEEPALIVE_RETRY_TIMEOUT_S = 3.0
#: ... unless the wait itself ended this much (seconds) later than its deadline: then the harness was paused
#: (Ctrl-Z, a cgroup freeze, a paused CI container; its timers run on while it cannot read), not the guest.
KEEPALIVE_STALL_SLACK_S = 2.0
#: How many harness pauses in a row one keepalive round forgives before it judges the guest anyway.
KEEPALIVE_MAX_STALLS = 3
#: Any global request the server must answer (RFC 4254 section 4: want-reply; dropbear answers an unknown one with
#: SSH_MSG_REQUEST_FAILURE, which is an answer). OpenSSH's ServerAliveInterval uses the same name.
KEEPALIVE_REQUEST = "keepalive@openssh.com"


class Peer(Protocol):
    """What the session may ask about the machine its guest runs in (harness.guest.machine.QemuMachine answers)."""

    def exit_fd(self) -> int | None:
        """A descriptor that becomes readable when the machine is gone (QEMU's pidfd)."""
        ...

    def gone(self) -> str | None:
        """Why the machine can no longer serve the guest (exited, frozen), without blocking; None while it can."""
        ...

    def check(self) -> str | None:
        """Like gone(), but also ask the machine (QMP query-status, bounded): None when the guest is running."""
        ...

    def console_evidence(self) -> list[str]:
        """The guest console's lines of a kernel in trouble (oops, BUG, WARN, soft lockup, RCU stall, hung task)."""
        ...


@dataclass(frozen=True)
class CommandResult:
    """What a guest command did: exit code, its output and how long it took (seconds)."""

    command: str
    rc: int
    stdout: str
    stderr: str
    duration_s: float


def _refused(exc: BaseException) -> bool:
    """Whether a connect error was a TCP refusal (paramiko wraps refusals in NoValidConnectionsError)."""
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return all(isinstance(e, ConnectionRefusedError) for e in exc.errors.values())
    return isinstance(exc, ConnectionRefusedError)


class _Wakeup:
    """An eventfd that paramiko's transport thread sets on channel events (it calls ``set``), so a wait can select on
    it together with other descriptors. ``clear`` does nothing: paramiko clears its event when one buffer runs
    empty, which would lose an event of the other buffer sharing it; the waiter drains before it looks instead."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        assert self._fd is not None
        return self._fd

    def set(self) -> None:
        with self._lock:  # the transport thread may poke after close(): never write to a reused descriptor
            if self._fd is not None:
                os.eventfd_write(self._fd, 1)

    def clear(self) -> None:
        """Ignored (see the class docstring)."""

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fileno())

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class _WakingEvent(threading.Event):
    """A channel's ``status_event`` (set by paramiko when the exit status arrives or the channel closes) that also
    wakes the waiter."""

    def __init__(self, wake: _Wakeup) -> None:
        super().__init__()
        self._wake = wake

    def set(self) -> None:
        super().set()
        self._wake.set()


def keepalive_verdict(answered: bool, waited_s: float, timeout_s: float, second: bool) -> str:
    """What one keepalive wait means: ``answered``; ``stalled`` (no answer, but the wait ended more than
    KEEPALIVE_STALL_SLACK_S after its ``timeout_s``: the harness was paused, so ask again with the full deadline);
    ``retry`` (the first keepalive went unanswered: send a second with KEEPALIVE_RETRY_TIMEOUT_S); ``dead`` (the
    second went unanswered too)."""
    if answered:
        return "answered"
    if waited_s > timeout_s + KEEPALIVE_STALL_SLACK_S:
        return "stalled"
    return "dead" if second else "retry"


class _Keepalive:
    """Asks the guest for an answer every ``interval_s``; none within ``timeout_s``, nor to a second request within
    ``retry_timeout_s``, means QEMU stopped or the guest locked up: the transport is closed, which ends every wait on
    the session at once, and ``dead`` says why. A harness that was paused meanwhile does not count against the guest
    (keepalive_verdict).

    paramiko's own keepalive (``set_keepalive``) wants no reply, so it cannot notice a peer that stopped answering.
    """

    def __init__(
        self, transport: paramiko.Transport, interval_s: float, timeout_s: float,
        retry_timeout_s: float = KEEPALIVE_RETRY_TIMEOUT_S, gone: Callable[[], str | None] | None = None,
    ) -> None:  # fmt: skip
        self._transport = transport
        #: Asked (without blocking) before the second request: a machine already known gone (QEMU stopped or
        #: exited) cannot answer it, so it is not waited for.
        self._gone = gone
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.retry_timeout_s = retry_timeout_s
        self.dead: str | None = None
        #: Rounds that forgave a harness pause (keepalive_verdict "stalled"), for the self-tests and the log.
        self.stalls = 0
        self._asked_twice = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ssh-keepalive", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self._transport.is_active():
                return
            if self._round() or self._stop.is_set():
                continue
            self.dead = f"the guest did not answer an SSH keepalive within {self.timeout_s:g} s" + \
                (f", nor a second one within {self.retry_timeout_s:g} s" if self._asked_twice else "")  # fmt: skip
            LOG.warning("guest SSH: %s; closing the session", self.dead)
            self._transport.close()
            return

    def _round(self) -> bool:
        """One keepalive (and the second one, and the repeats after harness pauses); True when the guest answered."""
        timeout_s, second, stalls = self.timeout_s, False, 0
        self._asked_twice = False
        while not self._stop.is_set():
            answered = threading.Event()
            threading.Thread(target=self._ask, args=(answered,), name="ssh-keepalive-request", daemon=True).start()
            began = time.monotonic()
            got = answered.wait(timeout_s)
            verdict = keepalive_verdict(got, time.monotonic() - began, timeout_s, second)
            if verdict == "answered":
                return True
            if verdict == "stalled" and stalls < KEEPALIVE_MAX_STALLS:
                stalls += 1
                self.stalls += 1
                LOG.warning("guest SSH: a keepalive wait of %g s took %.1f s: the harness was paused; asking again",
                            timeout_s, time.monotonic() - began)  # fmt: skip
                timeout_s, second = self.timeout_s, False
            elif second or (self._gone is not None and self._gone() is not None):
                return False
            else:
                timeout_s, second, self._asked_twice = self.retry_timeout_s, True, True
        return True

    def _ask(self, answered: threading.Event) -> None:
        try:
            # Blocks until the answer arrives or the transport is closed (paramiko checks every 0.1 s).
            self._transport.global_request(KEEPALIVE_REQUEST, wait=True)
        except Exception as exc:  # a transport that died under the request: the waiters learn it from the channel
            LOG.debug("keepalive request: %s", exc)
        finally:
            answered.set()

    def stop(self) -> None:
        self._stop.set()


def parse_public_key(line: str) -> paramiko.PKey:
    """Parse an OpenSSH public key line (``ssh-ed25519 AAAA... [comment]``).

    :raises SshError: the line is not a public key paramiko understands.
    """
    try:
        key_type, blob = line.split()[:2]
        return paramiko.PKey.from_type_string(key_type, base64.b64decode(blob))
    except (ValueError, binascii.Error, paramiko.SSHException) as exc:
        raise SshError(f"bad pinned host key {line[:40]!r}: {exc}") from exc


class GuestSession:
    """An SSH connection to one guest. Use as ``with GuestSession(...) as ssh:``.

    :param host_key: the guest's public host key as an OpenSSH line (``ssh-ed25519 AAAA...``).
    :param peer: the machine the guest runs in; its exit ends every wait at once, and it names what happened.
    """

    def __init__(
        self, host: str, port: int, key_path: Path, host_key: str, user: str = "root", peer: Peer | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.peer = peer
        self._pkey = paramiko.Ed25519Key.from_private_key_file(str(key_path))
        self._host_key = parse_public_key(host_key)
        self._client: paramiko.SSHClient | None = None
        self._keepalive: _Keepalive | None = None
        #: How often run() had to reconnect because a command could not be started (see run()).
        self.reconnects = 0

    def __enter__(self) -> GuestSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def connect(self, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, refused_is_final: bool = False) -> float:
        """Connect and authenticate, retrying while the guest's sshd starts; return seconds taken.

        :param refused_is_final: give up at the first refused TCP connection. The forwarded port is QEMU's
            (slirp accepts even while the guest's sshd is down), so a refusal means QEMU itself is gone.
        :raises SshError: no SSH handshake within ``timeout_s`` seconds, the host key did not match, or the peer is
            gone (checked before every attempt; after an attempt that timed out, the peer is asked over QMP, so a
            frozen QEMU ends the wait within ATTEMPT_TIMEOUT_S + the peer's check).
        """
        start = time.monotonic()
        deadline = start + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            problem = self.peer.gone() if self.peer is not None else None
            if problem is not None:
                raise SshError(f"no SSH session with {self.host}:{self.port}: {problem}")
            began = time.monotonic()
            client = paramiko.SSHClient()
            client.get_host_keys().add(f"[{self.host}]:{self.port}", self._host_key.get_name(), self._host_key)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            attempt = max(0.5, min(ATTEMPT_TIMEOUT_S, deadline - time.monotonic()))
            try:
                client.connect(
                    self.host, self.port, username=self.user, pkey=self._pkey, timeout=attempt,
                    banner_timeout=attempt, auth_timeout=attempt, allow_agent=False, look_for_keys=False,
                )  # fmt: skip
            except paramiko.BadHostKeyException as exc:
                client.close()
                raise SshError(f"guest host key mismatch on port {self.port}: {exc}") from exc
            except paramiko.AuthenticationException as exc:
                client.close()
                raise SshError(f"guest rejected the image's client key: {exc}") from exc
            except (paramiko.SSHException, OSError, EOFError) as exc:
                client.close()
                last = exc
                if refused_is_final and _refused(exc):
                    why = (self.peer.check() if self.peer is not None else None) or "QEMU gone?"
                    raise SshError(f"{self.host}:{self.port} refused the connection ({why})") from exc
                if self.peer is not None and time.monotonic() - began > 1.0:  # no answer: is QEMU still there?
                    problem = self.peer.check()
                    if problem is not None:
                        raise SshError(f"no SSH session with {self.host}:{self.port}: {problem}") from exc
                self._pause(RETRY_PAUSE_S)
                continue
            transport = client.get_transport()
            if transport is not None:
                gone = self.peer.gone if self.peer is not None else None
                self._keepalive = _Keepalive(transport, KEEPALIVE_INTERVAL_S, KEEPALIVE_TIMEOUT_S, gone=gone)
            self._client = client
            return time.monotonic() - start
        raise SshError(f"no SSH session with {self.host}:{self.port} within {timeout_s:.0f} s (last error: {last})")

    def _pause(self, seconds: float) -> None:
        """Sleep between attempts, waking at once when the peer exits."""
        fd = self.peer.exit_fd() if self.peer is not None else None
        if fd is None:
            time.sleep(seconds)
        else:
            lifetime.wait_readable([fd], seconds)

    def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.stop()
            self._keepalive = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport() if self._client else None
        if transport is None or not transport.is_active():
            raise SshError(f"SSH session is not connected ({self.lost_reason()})")
        return transport

    def broken(self) -> bool:
        """Whether the session can no longer carry commands: not connected, transport dead, keepalive unanswered,
        or the peer gone (never blocks)."""
        transport = self._client.get_transport() if self._client else None
        dead = self._keepalive.dead if self._keepalive is not None else None
        gone = self.peer.gone() if self.peer is not None else None
        return transport is None or not transport.is_active() or dead is not None or gone is not None

    @property
    def unanswered(self) -> str | None:
        """Why the guest counts as unresponsive (a keepalive went unanswered), or None: a session whose guest is
        unresponsive cannot be reconnected; a session whose sshd merely dropped it can."""
        return self._keepalive.dead if self._keepalive is not None else None

    def _known_lost(self) -> bool:
        """Whether the peer is known gone or the keepalive went unanswered (a reconnect cannot help then)."""
        dead = self._keepalive is not None and self._keepalive.dead is not None
        return dead or (self.peer is not None and self.peer.gone() is not None)

    def lost_reason(self) -> str:
        """Why the session broke, as precisely as can be told: the peer's account (QEMU exited: how; frozen), the
        keepalive's, or a guest that dropped the connection while QEMU runs it. May ask the peer over QMP."""
        dead = self._keepalive.dead if self._keepalive is not None else None
        problem = None
        if self.peer is not None:
            problem = self.peer.gone() or self.peer.check()
        if problem is not None:
            return f"{problem} ({dead})" if dead else problem
        if dead is not None:
            text = f"{dead} while QEMU runs it (QMP query-status answers): the guest kernel is locked up or starved"
            evidence = self.peer.console_evidence() if self.peer is not None else []
            return text + (f"; the guest console showed: {' | '.join(evidence[-3:])}" if evidence else "")
        if self._client is None:
            return "the session was closed"
        return "the guest closed the SSH connection (its sshd died?) while QEMU runs it"

    def run(
        self, command: str, timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S, stdin: bytes = b"", phase: str | None = None
    ) -> CommandResult:
        """Run ``command`` through the guest's shell and return its exit code and output.

        The wait wakes only on the channel's events and on QEMU's exit (no polling); see the module docstring.

        :param timeout_s: seconds until the command is abandoned (its channel closed).
        :param phase: announced (harness.lifetime.phase) once the command runs in the guest.
        :raises GuestCommandError: the command did not finish in time (reason names the timeout).
        :raises SshError: the session broke or the guest is gone, at once (QEMU exited or the connection dropped)
            or within KEEPALIVE_INTERVAL_S + KEEPALIVE_TIMEOUT_S + KEEPALIVE_RETRY_TIMEOUT_S (a frozen QEMU, a
            locked-up guest); the reason
            says which (:meth:`lost_reason`).
        """
        start = time.monotonic()
        deadline = start + timeout_s
        try:
            channel, wake = self._start(command, stdin, timeout_s)
        except SshError as exc:
            if self._known_lost():
                raise SshError(f"cannot start guest command {command!r}: {self.lost_reason()}") from exc
            # Rarely (2 of ~100 fresh boots here) dropbear drops the session or refuses the channel on the first
            # commands after boot, and a guest whose sshd died has a new one (init respawns it). The command never
            # started, so one reconnect and retry is safe.
            LOG.warning("guest SSH: %s; reconnecting once", exc)
            self.reconnects += 1
            self.close()
            self.connect(min(timeout_s, RECONNECT_TIMEOUT_S), refused_is_final=True)
            channel, wake = self._start(command, stdin, timeout_s)
        exit_fd = self.peer.exit_fd() if self.peer is not None else None
        waitables = [wake.fileno()] + ([exit_fd] if exit_fd is not None else [])
        out, err = bytearray(), bytearray()
        try:
            if phase is not None:
                lifetime.phase(phase, session=self)
            while True:
                wake.drain()  # first: an event after this wakes the select below
                _read_available(channel, out, err)
                if channel.closed or (channel.eof_received and channel.status_event.is_set()):
                    _read_available(channel, out, err)
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestCommandError(command, None, err.decode(errors="replace"),
                                            reason=f"timeout after {timeout_s:g} s")  # fmt: skip
                ready = lifetime.wait_readable(waitables, remaining)
                if exit_fd is not None and exit_fd in ready:
                    raise SshError(f"guest gone while running {command!r}: {self.lost_reason()}")
            # paramiko keeps -1 until an exit-status arrives; a channel closed without one lost its guest or sshd.
            if channel.exit_status == -1:
                raise SshError(f"SSH connection lost running {command!r}: {self.lost_reason()}")
            rc = channel.exit_status
        except (TimeoutError, OSError, EOFError) as exc:
            raise SshError(f"SSH connection lost running {command!r}: {exc}; {self.lost_reason()}") from exc
        finally:
            channel.close()
            wake.close()
        return CommandResult(command, rc, out.decode(errors="replace"), err.decode(errors="replace"),
                             time.monotonic() - start)  # fmt: skip

    def _start(self, command: str, stdin: bytes, timeout_s: float) -> tuple[paramiko.Channel, _Wakeup]:
        """Open a session channel wired to a wake-up descriptor and start ``command`` in it; SshError if either step
        fails."""
        wake = _Wakeup()
        try:
            channel = self._transport().open_session(timeout=min(timeout_s, CHANNEL_OPEN_TIMEOUT_S))
            # Wired before the command exists, so no event can be missed.
            channel.in_buffer.set_event(wake)
            channel.in_stderr_buffer.set_event(wake)
            channel.status_event = _WakingEvent(wake)
            if channel.closed:
                channel.status_event.set()
            channel.exec_command(command)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            wake.close()
            raise SshError(f"cannot start guest command {command!r}: {exc}") from exc
        except BaseException:
            wake.close()
            raise
        return channel, wake

    def check(self, command: str, timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S) -> CommandResult:
        """Like :meth:`run`, but a non-zero exit raises :class:`GuestCommandError` with the stderr tail."""
        result = self.run(command, timeout_s)
        if result.rc != 0:
            raise GuestCommandError(command, result.rc, result.stderr)
        return result

    def _sftp(self, timeout_s: float) -> paramiko.SFTPClient:
        try:
            sftp = paramiko.SFTPClient.from_transport(self._transport())
        except (paramiko.SSHException, OSError, EOFError) as exc:
            doing = "cannot open SFTP" if self.broken() else "cannot open SFTP (is sftp-server in the image?)"
            raise self._failed(doing, exc) from exc
        if sftp is None:
            raise SshError("cannot open SFTP channel")
        sftp.get_channel().settimeout(timeout_s)
        return sftp

    def _failed(self, doing: str, exc: BaseException) -> SshError:
        """The error of a failed transfer step: with why the session broke, when it did (a guest or QEMU that went
        away mid-copy), else paramiko's own words (e.g. no such file)."""
        if self.broken():
            return SshError(f"{doing}: {exc or type(exc).__name__}; {self.lost_reason()}")
        return SshError(f"{doing}: {exc}")

    def put(self, local: Path, remote: str, mode: int | None = None, timeout_s: float = 60.0) -> None:
        """Copy ``local`` to ``remote`` in the guest over SFTP (``mode`` e.g. 0o755 for a probe).

        :param timeout_s: seconds each SFTP request may take; QEMU's exit or a guest that stops answering ends the
            copy earlier (the transport closes under it).
        :raises SshError: the copy failed; the reason names why the session broke, when it did.
        """
        sftp = self._sftp(timeout_s)
        try:
            sftp.put(str(local), remote)
            if mode is not None:
                sftp.chmod(remote, mode)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._failed(f"copying {local} to guest:{remote} failed", exc) from exc
        finally:
            sftp.close()

    def get(self, remote: str, local: Path, timeout_s: float = 60.0) -> None:
        """Copy ``remote`` from the guest to ``local`` over SFTP (bounds and errors as :meth:`put`)."""
        sftp = self._sftp(timeout_s)
        try:
            sftp.get(remote, str(local))
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._failed(f"copying guest:{remote} to {local} failed", exc) from exc
        finally:
            sftp.close()


def _read_available(channel: paramiko.Channel, out: bytearray, err: bytearray) -> None:
    """Move what the channel has buffered (stdout and stderr) into ``out`` and ``err`` without blocking."""
    while channel.recv_ready():
        out += channel.recv(65536)
    while channel.recv_stderr_ready():
        err += channel.recv_stderr(65536)
