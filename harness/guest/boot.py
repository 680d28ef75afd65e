"""A booted guest: QEMU machine + readiness (serial marker, then SSH handshake) + SSH session.

``with boot_guest(config) as guest:`` boots, waits until SSH works and yields; at the end of the block the
session is closed and QEMU is gone, also on Ctrl-C or an exception. A guest that panics or hangs raises
:class:`~harness.errors.BootError` with the serial tail, within the boot deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.errors import BootError, SshError
from harness.guest.machine import DEFAULT_BOOT_TIMEOUT_S, QemuMachine
from harness.guest.qemu_argv import MachineConfig
from harness.guest.ssh import GuestSession
from harness.lifetime import phase


@dataclass
class BootTimes:
    """Seconds from QEMU launch to each readiness step."""

    console_ready_s: float = 0.0
    ssh_ready_s: float = 0.0


@dataclass
class Guest:
    """What a running guest offers to its user: the machine (QMP, serial log) and the SSH session."""

    machine: QemuMachine
    ssh: GuestSession
    boot: BootTimes


@contextmanager
def boot_guest(
    config: MachineConfig,
    timeout_s: float = DEFAULT_BOOT_TIMEOUT_S,
    log_dir: Path | None = None,
    before_start: Callable[[QemuMachine], None] | None = None,
) -> Iterator[Guest]:
    """Boot a guest and yield it once SSH works.

    :param timeout_s: seconds from launch until SSH must work (console marker and handshake together).
    :param before_start: with ``config.paused``, called with the stopped machine (e.g. to read what QEMU
        granted over QMP) before the vCPUs are started with QMP ``cont``.
    :raises LaunchError: QEMU did not start.
    :raises BootError: panic, hang, QEMU death or no SSH within ``timeout_s``; a QEMU that stops answering QMP
        (frozen) ends the wait within about 15 s instead; the serial tail is attached.
    """
    with QemuMachine(config, log_dir=log_dir) as machine:
        if config.paused:
            if before_start is not None:
                phase("capability_probe", machine=machine)
                before_start(machine)
            machine.qmp("cont")
        times = BootTimes()
        start = time.monotonic()
        times.console_ready_s = machine.wait_ready(timeout_s)
        port = machine.ssh_port()
        remaining = max(1.0, timeout_s - (time.monotonic() - start))
        session = GuestSession("127.0.0.1", port, config.image.client_key, config.image.host_key, peer=machine)
        try:
            phase("ssh_ready", machine=machine, session=session)
            try:
                session.connect(remaining)
            except SshError as exc:
                state = machine.gone() or "QEMU is running"
                reason = f"guest console is up but SSH is not ({exc})" + ("" if state in str(exc) else f"; {state}")
                raise BootError(reason, machine.serial_tail()) from exc
            times.ssh_ready_s = time.monotonic() - machine.launched_at
            yield Guest(machine, session, times)
        finally:
            session.close()
