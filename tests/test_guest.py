"""Guest lifecycle under the accelerator doctor picks (TCG here): boot, SSH, QMP, and every way it can go wrong."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from harness.errors import BootError, GuestCommandError, LaunchError, SshError
from harness.guest.boot import Guest, boot_guest
from harness.guest.machine import QemuMachine, sweep_stale_tmpdirs
from harness.guest.qemu_argv import MachineConfig
from harness.guest.ssh import GuestSession
from harness.lifetime import process_state

pytestmark = pytest.mark.integration


@pytest.fixture
def config(guest_image, accel) -> MachineConfig:
    return MachineConfig(image=guest_image, accel=accel, cpu="host" if accel == "kvm" else "max")


@pytest.fixture(scope="module")
def guest(guest_image, accel) -> Iterator[Guest]:
    """One guest shared by the tests that only run commands in it."""
    config = MachineConfig(image=guest_image, accel=accel, cpu="host" if accel == "kvm" else "max")
    with boot_guest(config) as booted:
        yield booted


def test_boot_reaches_ssh(guest, guest_image):
    result = guest.ssh.check("uname -r")
    assert result.stdout.strip() == guest_image.kernel_release
    assert 0 < guest.boot.console_ready_s <= guest.boot.ssh_ready_s < 60
    assert guest.machine.qmp("query-status")["status"] == "running"
    assert "VPMU-GUEST-READY" in guest.machine.serial_text()


def test_guest_has_msr_and_cpuid_devices(guest):
    guest.ssh.check("test -c /dev/cpu/0/msr && test -c /dev/cpu/0/cpuid")
    assert "nmi_watchdog=0" in guest.ssh.check("cat /proc/cmdline").stdout


def test_exit_code_and_streams(guest):
    result = guest.ssh.run("echo out; echo err >&2; exit 7")
    assert (result.rc, result.stdout, result.stderr) == (7, "out\n", "err\n")
    with pytest.raises(GuestCommandError) as info:
        guest.ssh.check("echo broken >&2; exit 3")
    assert info.value.rc == 3 and "broken" in str(info.value)


def test_command_timeout_is_reported(guest):
    start = time.monotonic()
    with pytest.raises(GuestCommandError, match=r"timeout after 1 s"):
        guest.ssh.run("sleep 30", timeout_s=1)
    assert time.monotonic() - start < 5
    assert guest.ssh.check("echo alive").stdout == "alive\n"  # the session survives an abandoned command


def test_stdin_and_large_output(guest):
    result = guest.ssh.run("wc -c; head -c 3000000 /dev/zero | tr '\\0' x", stdin=b"12345")
    assert result.stdout.startswith("5\n") and len(result.stdout) == 2 + 3_000_000


def test_put_and_get_round_trip(guest, tmp_path):
    payload = bytes(range(256)) * 4096
    (tmp_path / "in.bin").write_bytes(payload)
    guest.ssh.put(tmp_path / "in.bin", "/tmp/probe.bin", mode=0o755)
    assert guest.ssh.check("stat -c %a /tmp/probe.bin").stdout.strip() == "755"
    guest.ssh.get("/tmp/probe.bin", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == payload
    with pytest.raises(SshError, match="/no/such/file"):
        guest.ssh.get("/no/such/file", tmp_path / "x")


def test_vcpu_threads_over_qmp(guest):
    cpus = guest.machine.qmp("query-cpus-fast")
    assert len(cpus) == 1 and cpus[0]["thread-id"] > 0


def test_unpinned_host_key_is_rejected(guest, guest_image):
    port = guest.machine.ssh_port()
    other = paramiko.Ed25519Key.from_private_key_file(str(guest_image.client_key))  # any other ed25519 key
    session = GuestSession("127.0.0.1", port, guest_image.client_key, f"ssh-ed25519 {other.get_base64()}")
    with pytest.raises(SshError, match="host key mismatch"):
        session.connect(timeout_s=10)


def test_port_and_process_gone_after_shutdown(config):
    with boot_guest(config) as booted:
        port = booted.machine.ssh_port()
        pid = booted.machine.pid
    assert not Path(f"/proc/{pid}").exists()
    with socket.socket() as probe, pytest.raises(OSError):
        probe.connect(("127.0.0.1", port))


def test_kernel_panic_is_a_boot_failure_with_the_panic_text(config):
    """A command line whose init does not exist: the kernel panics (no root fs); reported fast, with the tail."""
    bad = MachineConfig(**{**config.__dict__, "cmdline": "console=ttyS0 panic=-1 rdinit=/does/not/exist"})
    start = time.monotonic()
    with pytest.raises(BootError) as info, boot_guest(bad, timeout_s=90):
        pass
    assert time.monotonic() - start < 60
    assert "guest kernel panicked: Kernel panic - not syncing" in info.value.reason
    assert "Kernel panic" in info.value.serial_tail
    assert "--- serial log (tail) ---" in str(info.value)


def test_hung_guest_times_out(config):
    """init is a shell waiting on the console: the guest never gets ready; the wait ends at its deadline."""
    hung = MachineConfig(**{**config.__dict__, "cmdline": "console=ttyS0 panic=-1 rdinit=/bin/sh"})
    start = time.monotonic()
    with pytest.raises(BootError, match=r"timeout after 6 s waiting for 'VPMU-GUEST-READY'"), boot_guest(hung, 6):
        pass
    assert time.monotonic() - start < 20


def test_qemu_killed_during_boot(config):
    with QemuMachine(config) as machine:
        machine.kill()
        with pytest.raises(BootError, match=r"QEMU \(pid \d+\) killed by signal 9 \(SIGKILL\) before"):
            machine.wait_ready(60)
        with pytest.raises(BootError, match=r"QMP query-status: QEMU \(pid \d+\) killed by signal 9"):
            machine.qmp("query-status")


def test_qemu_killed_mid_run(config):
    """QEMU dies while a command runs: the command fails promptly with SshError, nothing hangs or leaks."""
    with boot_guest(config) as booted:
        booted.machine.kill()
        start = time.monotonic()
        with pytest.raises(SshError):
            booted.ssh.run("sleep 20", timeout_s=30)
        assert time.monotonic() - start < 15
        assert booted.machine.wait(5) == -9  # the socket can close before the process is reaped


def test_launch_failure_carries_qemu_output(config):
    bad = MachineConfig(**{**config.__dict__, "cpu": "max,no-such-feature=on"})
    with pytest.raises(LaunchError) as info, QemuMachine(bad):
        pass
    error = info.value
    assert error.exitcode == 1
    assert "no-such-feature" in error.output
    assert "-cpu max,no-such-feature=on" in str(error)


def test_stale_tmpdirs_of_dead_launchers_are_swept(tmp_path):
    dead = tmp_path / "vpmu-qemu-999999999-abc"
    alive = tmp_path / "vpmu-qemu-1-abc"  # pid 1 exists
    dead.mkdir()
    alive.mkdir()
    assert sweep_stale_tmpdirs(tmp_path) == [dead]
    assert alive.exists() and not dead.exists()


# --- a healthy guest is not declared lost; a kernel in trouble is shown (review of issue 11) ------------------------


def test_one_late_qmp_answer_does_not_make_qemu_frozen(guest):
    """A command that outlives its deadline is followed by a query-status: QEMU answers it, so QEMU is slow, not
    frozen, and later commands still go through. A best-effort read never asks (and never condemns)."""
    machine = guest.machine
    with pytest.raises(BootError, match=r"did not answer QMP 'query-cpus-fast' within 0 s \(it answered the "):
        machine.qmp("query-cpus-fast", timeout_s=0)  # 0 s: asyncio gives up before the answer can arrive
    assert machine.gone() is None and machine.check() is None
    with pytest.raises(BootError, match=r"best-effort read"):
        machine.qmp("query-stats", timeout_s=0, record_frozen=False, target="vcpu")
    assert machine.gone() is None
    assert machine.qmp("query-status")["status"] == "running"


def test_qemu_stopped_for_6_s_is_not_lost(guest):
    """QEMU SIGSTOPped for 6 s, then continued: while stopped it is reported as such at once (a VM-exit read gets
    None, not an error); a command that runs across the stop completes (the keepalive allows 10 s); afterwards
    nothing is left marked: not gone, keepalive answered, QMP answers."""
    from harness.suite.profile_run import vm_exits

    machine = guest.machine
    os.kill(machine.pid, signal.SIGSTOP)
    resume = threading.Timer(6.0, os.kill, (machine.pid, signal.SIGCONT))
    resume.start()
    try:
        deadline = time.monotonic() + 2  # the signal is delivered asynchronously
        while not (process_state(machine.pid) or "").startswith("T") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "SIGSTOP" in (machine.gone() or "")
        assert vm_exits(machine) is None
        start = time.monotonic()
        result = guest.ssh.run("echo alive", timeout_s=60)
        assert result.rc == 0 and result.stdout == "alive\n"
        assert time.monotonic() - start > 3  # it did wait for QEMU
    finally:
        resume.join()
        os.kill(machine.pid, signal.SIGCONT)
    assert machine.gone() is None and guest.ssh.unanswered is None and not guest.ssh.broken()
    assert machine.check() is None


def test_console_trouble_during_a_probe_is_evidence_and_an_oops_loses_the_guest(guest, guest_image, accel, tmp_path):
    """A probe during which the guest kernel prints a WARN line fails with that line quoted; one during which it
    prints an oops marks the guest lost (it is rebooted before the next probe) even though the probe passed."""
    from harness.cpu.profile import Profile
    from harness.probe.runner import ProbeBuilder, ProbeError, ProbeRunner
    from harness.suite.profile_run import ProfileRun
    from tests.helpers import TEST_DATA

    profile = Profile("selftest", "console evidence", "host", "max", ("kvm", "tcg"))
    run = ProfileRun(profile, accel, {}, guest_image)
    run._guest = guest
    run._runner = ProbeRunner(guest.ssh, ProbeBuilder(TEST_DATA / "probes", tmp_path / "cache"))
    with pytest.raises(ProbeError) as info:
        run.probe("selftest_kmsg", {"line": "WARNING: CPU: 0 PID: 1 at vpmu/self-test.c:1", "rc": 3})
    assert "exit code 3" in str(info.value) and "--- guest console during the probe ---" in str(info.value)
    assert "WARNING: CPU: 0 PID: 1 at vpmu/self-test.c:1" in str(info.value)
    assert run.lost() is None  # a WARN splat does not stop the kernel
    run.probe("selftest_kmsg", {"line": "Oops: 0002 [#1] vpmu self-test", "rc": 0}, key="oops")
    assert "oopsed during probe selftest_kmsg: " in (run.lost() or "") and "Oops: 0002" in (run.lost() or "")
    assert guest.machine.gone() is None  # the machine itself is fine: only this run stops trusting its kernel


def test_starved_guest_names_the_console_evidence(config):
    """The session's sshd stops answering while QEMU runs the guest (here: the guest stops it, as a starved or
    locked-up kernel would), after the kernel printed a soft-lockup line: the error says the guest is locked up or
    starved and quotes that line."""
    with boot_guest(config) as booted:
        lockup = "watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [vpmu-selftest:1]"
        start = time.monotonic()
        with pytest.raises(SshError) as info:
            booted.ssh.run(f"echo '<1>{lockup}' > /dev/kmsg; kill -STOP $PPID; sleep 60", timeout_s=120)
        elapsed = time.monotonic() - start
    assert elapsed < 30
    reason = str(info.value)
    assert "the guest kernel is locked up or starved" in reason, reason
    assert "the guest console showed: [" in reason and lockup in reason, reason
