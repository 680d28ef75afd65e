"""The liveness rules without a guest: when the harness calls a guest or QEMU gone, and the waits' plumbing.

Real processes and descriptors where the rule is about them (poll with descriptors past 1024, PR_SET_PDEATHSIG, a
QEMU stand-in that exits, a console that is still draining); a stand-in transport or monitor where the rule is a
decision over what they answered (keepalive verdicts, QMP ``quit`` answered).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harness.errors import ImageBuildError
from harness.guest import ssh
from harness.guest.console import ConsoleLog
from harness.guest.image import assemble_rootfs
from harness.guest.machine import PANIC_PATTERNS, QemuMachine, _first_match, console_evidence
from harness.guest.qemu_argv import MachineConfig
from harness.host.loads import HostLoad, LoadSpec
from harness.lifetime import ProcessWatch, dies_with_parent, stopped_text, wait_readable
from harness.probe.runner import guest_deadline_s

#: An oops the kernel survives (panic_on_oops=0), followed by a WARN splat: neither is a panic.
OOPS_CONSOLE = """\
[   12.000001] BUG: kernel NULL pointer dereference, address: 0000000000000008
[   12.000002] Oops: 0002 [#1] SMP NOPTI
[   12.000003] RIP: 0010:perf_event_init+0x1/0x2
[   12.000004] ---[ end trace 0000000000000000 ]---
[   13.000001] WARNING: CPU: 0 PID: 1 at arch/x86/events/core.c:1 x86_pmu_enable+0x1/0x2
[   13.000002] ---[ end trace 0000000000000000 ]---
[   20.000000] rcu: INFO: rcu_preempt self-detected stall on CPU
"""


# --- keepalive ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answered", "waited_s", "second", "verdict"),
    [
        (True, 0.01, False, "answered"),
        (True, 30.0, True, "answered"),
        (False, 10.0, False, "retry"),  # unanswered on time: one more, with a short deadline
        (False, 3.0, True, "dead"),  # ... and that one unanswered too
        (False, 11.9, False, "retry"),  # a little late (a loaded host) is not a pause
        (False, 13.0, False, "stalled"),  # ended 3 s past its deadline: the harness was not running
        (False, 13.0, True, "stalled"),
    ],
)
def test_keepalive_verdict(answered, waited_s, second, verdict):
    timeout_s = ssh.KEEPALIVE_RETRY_TIMEOUT_S if second else ssh.KEEPALIVE_TIMEOUT_S
    assert ssh.keepalive_verdict(answered, waited_s, timeout_s, second) == verdict


class _Transport:
    """Stands in for paramiko's transport: answers only the global requests ``answers`` lets through."""

    def __init__(self, answers: list[bool]) -> None:
        self.answers = answers
        self.requests = 0
        self.closed = threading.Event()

    def is_active(self) -> bool:
        return not self.closed.is_set()

    def global_request(self, kind: str, wait: bool = True) -> Any:
        self.requests += 1
        answer = self.answers.pop(0) if self.answers else False
        if not answer:
            self.closed.wait()  # paramiko returns only when the transport dies
        return None

    def close(self) -> None:
        self.closed.set()


def test_keepalive_asks_twice_before_giving_up():
    """The first keepalive goes unanswered, the second is answered: the guest lives; later ones go unanswered: it is
    declared dead only after the second of those, and the transport is closed."""
    transport = _Transport([True, False, True])
    keepalive = ssh._Keepalive(transport, interval_s=0.05, timeout_s=0.3, retry_timeout_s=0.2)  # type: ignore[arg-type]
    try:
        assert transport.closed.wait(10)
    finally:
        keepalive.stop()
    assert transport.requests == 5  # answered, unanswered + answered second, unanswered + unanswered second
    assert keepalive.dead == ("the guest did not answer an SSH keepalive within 0.3 s, nor a second one within 0.2 s")


def test_keepalive_does_not_ask_twice_a_machine_known_gone():
    """QEMU known stopped (or exited) when the first keepalive goes unanswered: no second request is waited for."""
    transport = _Transport([])
    keepalive = ssh._Keepalive(transport, interval_s=0.05, timeout_s=0.3, retry_timeout_s=5.0,  # type: ignore[arg-type]
                               gone=lambda: "QEMU (pid 1) is stopped")  # fmt: skip
    start = time.monotonic()
    try:
        assert transport.closed.wait(10)
    finally:
        keepalive.stop()
    assert time.monotonic() - start < 3 and transport.requests == 1
    assert keepalive.dead == "the guest did not answer an SSH keepalive within 0.3 s"


# --- process states and waits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "words"),
    [("T (stopped)", "SIGSTOP"), ("t (tracing stop)", "debugger"), ("S (sleeping)", None), (None, None)],
)
def test_stopped_process_states(state, words):
    text = stopped_text(state)
    assert (text is None) if words is None else (words in (text or ""))


@pytest.fixture
def high_descriptors():
    """Occupy descriptors up to past 1024, so the next ones opened are numbered above select()'s limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"host: RLIMIT_NOFILE hard limit {hard} < 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = []
    try:
        while not held or held[-1] < 1030:
            held.append(os.open("/dev/null", os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_waits_take_descriptors_past_1024(high_descriptors):
    """select() raises ValueError for a descriptor >= 1024 (FD_SETSIZE); the pidfd wait and wait_readable use
    poll(2)."""
    proc = subprocess.Popen(["sleep", "0.2"])
    watch = ProcessWatch(proc)
    try:
        assert watch.fileno() is not None and watch.fileno() >= 1024
        assert watch.wait(10) == 0
        read, write = os.pipe()
        assert read >= 1024
        assert wait_readable([read], 0.05) == []
        os.write(write, b"x")
        assert wait_readable([read], 5) == [read]
        os.close(read)
        os.close(write)
    finally:
        watch.close()


def test_child_dies_with_its_launching_thread():
    """dies_with_parent(): the kernel SIGKILLs the child when the thread that started it ends (PR_SET_PDEATHSIG
    names the thread, not the process: start guests from a thread that lives as long as they do)."""
    started: list[subprocess.Popen[bytes]] = []

    def launch() -> None:
        started.append(subprocess.Popen(["sleep", "30"], preexec_fn=dies_with_parent()))

    launcher = threading.Thread(target=launch)
    launcher.start()
    launcher.join()
    assert started[0].wait(10) == -signal.SIGKILL


# --- panic, evidence and the exit reason ----------------------------------------------------------------------------


def test_an_oops_and_a_warn_splat_are_evidence_not_a_panic():
    assert _first_match(PANIC_PATTERNS, OOPS_CONSOLE) is None
    assert console_evidence(OOPS_CONSOLE) == [
        "[   12.000001] BUG: kernel NULL pointer dereference, address: 0000000000000008",
        "[   12.000002] Oops: 0002 [#1] SMP NOPTI",
        "[   13.000001] WARNING: CPU: 0 PID: 1 at arch/x86/events/core.c:1 x86_pmu_enable+0x1/0x2",
        "[   20.000000] rcu: INFO: rcu_preempt self-detected stall on CPU",
    ]


def _stand_in(tmp_path: Path, script: str) -> QemuMachine:
    """A QemuMachine whose 'QEMU' is ``sh -c script`` (console on its stdout, qemu.log on its stderr)."""
    machine = QemuMachine(MachineConfig(image=None, accel="tcg", cpu="max"))
    machine._qemu_log = tmp_path / "qemu.log"
    with open(machine._qemu_log, "wb") as log:
        machine._proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, stderr=log)
    assert machine._proc.stdout is not None
    machine._watch = ProcessWatch(machine._proc)
    machine._console = ConsoleLog(machine._proc.stdout.fileno(), tmp_path / "serial.log")
    return machine


def test_exit_reason_reads_the_console_to_its_end(tmp_path):
    """The pidfd can fire before the console reader took the last chunk; the panic printed last is still found."""
    machine = _stand_in(tmp_path, "printf 'booting\\n'; sleep 0.2; printf 'Kernel panic - not syncing: sysrq\\n'")
    try:
        assert machine.wait(10) == 0
        assert machine.exit_reason().startswith("the guest kernel panicked (Kernel panic - not syncing: sysrq)")
    finally:
        machine.shutdown()


def test_exit_reason_of_an_unrequested_exit_quotes_qemu(tmp_path):
    """QEMU ends with 0 after a SIGTERM and says who sent it: the reason quotes that; an oops before it is evidence,
    not a panic."""
    script = ("printf 'BUG: kernel NULL pointer dereference\\nOops: 0002 [#1]\\n'; "
              "echo 'qemu-system-x86_64: terminating on signal 15 from pid 4242 (cleanup.sh)' >&2")  # fmt: skip
    machine = _stand_in(tmp_path, script)
    try:
        assert machine.wait(10) == 0
        reason = machine.exit_reason()
    finally:
        machine.shutdown()
    assert reason.startswith("QEMU (pid ") and "exited with code 0" in reason and "panicked" not in reason
    assert "QEMU said: qemu-system-x86_64: terminating on signal 15 from pid 4242 (cleanup.sh)" in reason
    assert "the guest console showed: BUG: kernel NULL pointer dereference | Oops: 0002 [#1]" in reason


def test_a_panic_line_does_not_explain_a_kill(tmp_path):
    """A panicking guest ends QEMU with 0; QEMU SIGKILLed after some panic text was printed died of the SIGKILL."""
    machine = _stand_in(tmp_path, "printf 'Kernel panic - not syncing: x\\n'; kill -9 $$")
    try:
        assert machine.wait(10) == -signal.SIGKILL
        reason = machine.exit_reason()
    finally:
        machine.shutdown(raise_on_kill=False)
    assert "killed by signal 9 (SIGKILL)" in reason and "panicked" not in reason


class _Monitor:
    """Stands in for QMP: answers every command (``quit`` included) and does nothing."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def execute(self, command: str, args: dict[str, Any], timeout_s: float) -> Any:
        self.commands.append(command)
        return {}

    def close_within(self, timeout_s: float) -> None:
        pass


def test_quit_answered_but_slow_to_exit_warns(tmp_path, caplog):
    """QEMU answered 'quit' but is still there at the deadline (vCPUs slow to stop on a starved host): it is killed
    with a warning, not an AbnormalShutdown (which would ERROR the last check)."""
    machine = QemuMachine(MachineConfig(image=None, accel="tcg", cpu="max"))
    machine._proc = subprocess.Popen(["sleep", "30"])
    machine._watch = ProcessWatch(machine._proc)
    machine._qmp = _Monitor()  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="harness.guest.machine"):
        machine.shutdown(timeout_s=0.3)
    assert machine._proc.returncode == -signal.SIGKILL
    assert "answered 'quit' but had not exited" in caplog.text


# --- host load ------------------------------------------------------------------------------------------------------


class _Unkillable(subprocess.Popen):  # type: ignore[type-arg]
    """A real process whose every timed wait times out: a perf stuck in the kernel, as far as the harness can see."""

    def wait(self, timeout: float | None = None) -> int:
        if timeout is not None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return super().wait()


def test_perf_that_survives_sigkill_is_recorded_not_raised(tmp_path, monkeypatch):
    monkeypatch.setattr("harness.host.loads.STOP_TIMEOUT_S", 0.1)
    load = HostLoad(LoadSpec("stuck", "d", ("perf", "stat", "-a")), tmp_path, [], [])
    (tmp_path / "stuck.out").write_text("")
    proc = _Unkillable(["sleep", "30"], start_new_session=True)
    load._proc = proc
    try:
        result = load.stop()
    finally:
        proc.kill()
        subprocess.Popen.wait(proc)
    assert "perf survived SIGKILL for 0.1 s" in result.reason


# --- probes in the guest --------------------------------------------------------------------------------------------


def test_image_without_timeout_applet_is_refused(tmp_path):
    """Every probe runs under the guest's ``timeout -s KILL``: a busybox without that applet fails the image build
    with the package to install, instead of every probe failing with 'timeout: not found'."""
    busybox = tmp_path / "busybox"
    busybox.write_text("#!/bin/sh\nprintf 'bin/sh\\nbin/ls\\nsbin/init\\n'\n")
    busybox.chmod(0o755)
    with pytest.raises(ImageBuildError, match=r"has no applet timeout, .* install the Debian package busybox-static"):
        assemble_rootfs(tmp_path, "6.1.0", {"busybox": busybox}, "ssh-ed25519 AAAA x", b"key")


@pytest.mark.parametrize(("timeout_s", "guest_s"), [(120.0, 115), (7.0, 2), (2.0, 1), (5.5, 1)])
def test_guest_kills_a_probe_before_the_harness_gives_up(timeout_s, guest_s):
    assert guest_deadline_s(timeout_s) == guest_s and guest_s < timeout_s
