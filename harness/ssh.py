"""SSH session to a guest with paramiko: run commands, copy files, every wait bounded.

The guest's host key is pinned (it comes from the image); an unknown key is rejected, never auto-accepted.
"""

from __future__ import annotations

import base64
import binascii
import logging
import select
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import paramiko

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
    """

    def __init__(self, host: str, port: int, key_path: Path, host_key: str, user: str = "root") -> None:
        self.host = host
        self.port = port
        self.user = user
        self._pkey = paramiko.Ed25519Key.from_private_key_file(str(key_path))
        self._host_key = parse_public_key(host_key)
        self._client: paramiko.SSHClient | None = None
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
        :raises SshError: no SSH handshake within ``timeout_s`` seconds, or the host key did not match.
        """
        start = time.monotonic()
        deadline = start + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
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
                    raise SshError(f"{self.host}:{self.port} refused the connection (QEMU gone?)") from exc
                time.sleep(RETRY_PAUSE_S)
                continue
            transport = client.get_transport()
            if transport is not None:
                transport.set_keepalive(5)
            self._client = client
            return time.monotonic() - start
        raise SshError(f"no SSH session with {self.host}:{self.port} within {timeout_s:.0f} s (last error: {last})")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport() if self._client else None
        if transport is None or not transport.is_active():
            raise SshError("SSH session is not connected")
        return transport

    def run(self, command: str, timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S, stdin: bytes = b"") -> CommandResult:
        """Run ``command`` through the guest's shell and return its exit code and output.

        :param timeout_s: seconds until the command is abandoned (its channel closed).
        :raises GuestCommandError: the command did not finish in time (reason names the timeout).
        :raises SshError: the connection broke (e.g. the guest died).
        """
        start = time.monotonic()
        deadline = start + timeout_s
        try:
            channel = self._start(command, stdin, timeout_s)
        except SshError as exc:
            # Rarely (2 of ~100 fresh boots here) dropbear drops the session or refuses the channel on the first
            # commands after boot. The command never started, so one reconnect and retry is safe.
            LOG.warning("guest SSH: %s; reconnecting once", exc)
            self.reconnects += 1
            self.close()
            self.connect(min(timeout_s, RECONNECT_TIMEOUT_S), refused_is_final=True)
            channel = self._start(command, stdin, timeout_s)
        out, err = bytearray(), bytearray()
        try:
            while True:
                while channel.recv_ready():
                    out += channel.recv(65536)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                if channel.exit_status_ready() and channel.eof_received:
                    if not channel.recv_ready() and not channel.recv_stderr_ready():
                        break
                    continue
                if channel.closed and not channel.exit_status_ready():
                    raise SshError(f"SSH channel closed without exit status (guest died?) running {command!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestCommandError(command, None, err.decode(errors="replace"),
                                            reason=f"timeout after {timeout_s:g} s")  # fmt: skip
                # The channel's fileno becomes readable on stdout data or close; stderr-only data is picked up
                # on the next short wake-up.
                select.select([channel], [], [], min(remaining, 0.05))
            rc = channel.recv_exit_status()
        except (TimeoutError, OSError, EOFError) as exc:
            raise SshError(f"SSH connection lost running {command!r}: {exc}") from exc
        finally:
            channel.close()
        return CommandResult(command, rc, out.decode(errors="replace"), err.decode(errors="replace"),
                             time.monotonic() - start)  # fmt: skip

    def _start(self, command: str, stdin: bytes, timeout_s: float) -> paramiko.Channel:
        """Open a session channel and start ``command`` in it; SshError if either step fails."""
        try:
            channel = self._transport().open_session(timeout=timeout_s)
            channel.exec_command(command)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshError(f"cannot start guest command {command!r}: {exc}") from exc
        return channel

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
            raise SshError(f"cannot open SFTP (is sftp-server in the image?): {exc}") from exc
        if sftp is None:
            raise SshError("cannot open SFTP channel")
        sftp.get_channel().settimeout(timeout_s)
        return sftp

    def put(self, local: Path, remote: str, mode: int | None = None, timeout_s: float = 60.0) -> None:
        """Copy ``local`` to ``remote`` in the guest over SFTP (``mode`` e.g. 0o755 for a probe)."""
        sftp = self._sftp(timeout_s)
        try:
            sftp.put(str(local), remote)
            if mode is not None:
                sftp.chmod(remote, mode)
        except (OSError, paramiko.SSHException) as exc:
            raise SshError(f"copying {local} to guest:{remote} failed: {exc}") from exc
        finally:
            sftp.close()

    def get(self, remote: str, local: Path, timeout_s: float = 60.0) -> None:
        """Copy ``remote`` from the guest to ``local`` over SFTP."""
        sftp = self._sftp(timeout_s)
        try:
            sftp.get(remote, str(local))
        except (OSError, paramiko.SSHException) as exc:
            raise SshError(f"copying guest:{remote} to {local} failed: {exc}") from exc
        finally:
            sftp.close()
