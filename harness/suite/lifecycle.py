"""The guest's life cycle under QMP: reset (QMP ``system_reset`` and a guest-initiated reboot), save to a file and
restore into a new QEMU, and live migration to a second QEMU over a unix socket.

Each step is bounded and ends at once when a QEMU it waits on exits (QMP events are awaited together with QEMU's
pidfd: ``QemuMachine.wait_event``). A step that fails raises :class:`~harness.errors.LifecycleError` naming the step,
with the serial tails of the source and of the destination. The profile's guest is then still usable where it can
be: after a failed restore or migration the source is resumed; a QEMU that died is rebooted by
``ProfileRun.ensure_alive`` for the checks that follow.

What each step measured (times, boot ids, QMP's own account, the guest's enumeration before and after) is returned
as a JSON-able dict; the PMU verdicts on it are in harness/judge/lifecycle.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPError

from harness.errors import GuestError, HarnessError, LifecycleError
from harness.guest.boot import BootTimes, Guest
from harness.guest.machine import TMPDIR_PREFIX, QemuMachine
from harness.guest.qemu_argv import MachineConfig
from harness.guest.ssh import GuestSession
from harness.lifetime import phase
from harness.probe.guest_view import ENUM_MSRS, kernel_pmu_facts, view_from
from harness.probe.params import SPAN_TARGET_S, lifecycle_params, span_repeats
from harness.probe.runner import ProbeRunner, parse_records
from harness.suite.profile_run import BOOT_STATE_KEY

#: Deadline of a save, a restore or a live migration (seconds), each from its QMP command to the end of the step
#: (for a restore and a migration: until SSH works on the destination). Measured here under TCG with 512 MiB:
#: save 0.65 s, restore-to-SSH 1.2 s, migration 0.66 s; a real host with a busy guest may need far more.
STEP_TIMEOUT_S = 120.0
#: MIGRATION event states that end a migration (qapi/migration.json MigrationStatus).
MIGRATION_END = ("completed", "failed", "cancelled")
#: QMP ``migrate-set-capabilities``: ``events`` makes QEMU send a MIGRATION event at each state change (QEMU 2.4+),
#: so the harness waits on events instead of polling ``query-migrate``.
EVENTS_CAPABILITY = [{"capability": "events", "state": True}]
#: The guest's boot id: a new random UUID per boot (drivers/char/random.c, proc_do_uuid on boot_id), the same
#: for as long as the kernel runs, so it tells a continued guest from a rebooted one.
BOOT_ID = "/proc/sys/kernel/random/boot_id"
#: The guest kernel's lines that betray stale PMU state after a reset: check_hw_exists() (arch/x86/events/core.c)
#: prints the first when an event select or FIXED_CTR_CTRL still has an enable bit set at boot; an active KVM
#: backing event left over from before the reset delivers PMIs the guest did not ask for
#: (arch/x86/kernel/nmi.c unknown_nmi_error()). Both as reported for QEMU's missing AMD PMU reset (Dongli Zhang,
#: "target/i386/kvm: reset AMD PMU registers during VM reset", qemu-devel 2025). The NMI line is opportunistic:
#: the program step never sets EVTSEL.INT, and KVM injects a PMI only for a counter that asks for one
#: (arch/x86/kvm/pmu.c, pmc->intr), so only some other stale source can print it. Lines the boot before the step
#: printed already are not blamed on the step (stale_pmu_lines is read before and after it).
STALE_PMU_LINES = ("Broken BIOS detected", "the BIOS has corrupted hw-PMU resources", "NMI received for unknown reason")


class MigrationRefused(LifecycleError):
    """QEMU refused to start a migration or a save (QMP ``migrate`` answered an error, e.g. a migration blocker such
    as "State blocked by non-migratable CPU device (invtsc flag)")."""

    def __init__(self, step: str, reason: str, source_tail: str, destination_tail: str | None) -> None:
        super().__init__(step, f"QEMU refused to migrate: {reason}", source_tail, destination_tail)
        self.refusal = reason


def boot_id(session: GuestSession) -> str:
    """The guest kernel's boot id."""
    return session.check(f"cat {BOOT_ID}", timeout_s=30).stdout.strip()


def enumeration(run: Any, runner: ProbeRunner) -> dict[str, Any]:
    """What the guest shows of its PMU now, decoded as at boot: CPUID (enum probe), IA32_PERF_CAPABILITIES, the
    kernel's perf PMUs, its "Performance Events" line and PMU sysfs files."""
    probe = runner.run("enum", {"msrs": list(ENUM_MSRS)})
    pmus, banner, sysfs = kernel_pmu_facts(runner.session)
    summary = view_from(probe, pmus, banner, sysfs).summary()
    return {key: summary[key] for key in ("caps", "perf_capabilities", "kernel_pmus", "kernel_banner", "sysfs")}


def boot_enumeration(run: Any) -> dict[str, Any]:
    """The enumeration the run saw at its boot (the same keys as :func:`enumeration`)."""
    summary = run.view.summary()
    return {key: summary[key] for key in ("caps", "perf_capabilities", "kernel_pmus", "kernel_banner", "sysfs")}


def stale_pmu_lines(session: GuestSession) -> list[str]:
    """The guest's kernel log lines of :data:`STALE_PMU_LINES` (dmesg: ``quiet`` keeps some off the console), without
    their timestamps, so that the lines of two boots compare."""
    text = session.run("dmesg", timeout_s=30).stdout
    return [_untimed(line) for line in text.splitlines() if any(word in line for word in STALE_PMU_LINES)]


def _untimed(line: str) -> str:
    line = line.strip()
    return line.split("] ", 1)[1].strip() if line.startswith("[") and "] " in line else line


def _session(machine: QemuMachine, run: Any, timeout_s: float) -> GuestSession:
    """A new SSH session to the guest in ``machine`` (the forwarded port is the machine's own)."""
    image = run.image
    session = GuestSession("127.0.0.1", machine.ssh_port(), image.client_key, image.host_key, peer=machine)
    session.connect(max(1.0, timeout_s))
    return session


def _tails(source: QemuMachine, destination: QemuMachine | None) -> tuple[str, str | None]:
    return source.serial_tail(), destination.serial_tail() if destination is not None else None


def _why(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or str(exc).splitlines()[0]


def _workdir() -> Path:
    """A directory for the save file and the migration socket, named like the launcher's temp dirs so that the next
    launch sweeps it if the harness is killed before it removes it."""
    return Path(tempfile.mkdtemp(prefix=f"{TMPDIR_PREFIX}{os.getpid()}-lifecycle-"))


# --- reset -----------------------------------------------------------------------------------------------------


def reset(run: Any, how: str, timeout_s: float | None = None) -> dict[str, Any]:
    """Reset the guest (``how``: ``qmp`` = QMP ``system_reset``, ``guest`` = ``reboot -f`` in the guest) and wait
    until SSH works again; the run's session is replaced.

    The launcher starts QEMU with ``-no-reboot`` (a guest panic ends QEMU), under which every reset request is a
    shutdown (softmmu/runstate.c qemu_system_reset_request(): reboot_action SHUTDOWN): the reset action is set to
    ``reset`` for the step (QMP ``set-action``, QEMU 6.0+, qapi/run-state.json) and back to ``shutdown`` after.

    :param timeout_s: seconds from the request until SSH works (default: the run's boot deadline).
    :raises LifecycleError: QEMU exited, the guest did not come back, or SSH did not (step ``reset`` or
        ``guest_reboot``).
    """
    step = "reset" if how == "qmp" else "guest_reboot"
    guest = run.guest
    machine = guest.machine
    timeout_s = timeout_s or run.boot_timeout_s
    try:
        before = boot_id(guest.ssh)
        machine.clear_events()
        machine.qmp("set-action", reboot="reset")
        mark = machine.console_position()
        start = time.monotonic()
        if how == "qmp":
            machine.qmp("system_reset")
        else:
            # In the background, so the command returns before the session dies with the kernel.
            guest.ssh.run("(sleep 0.2; reboot -f) </dev/null >/dev/null 2>&1 &", timeout_s=30)
        phase("reset", machine=machine, session=guest.ssh)
        event = machine.wait_event(("RESET",), timeout_s)
        guest.ssh.close()
        machine.wait_ready(max(1.0, timeout_s - (time.monotonic() - start)), start=mark)
        console_s = time.monotonic() - start
        session = _session(machine, run, timeout_s - (time.monotonic() - start))
        ssh_s = time.monotonic() - start
        after = boot_id(session)
    except (HarnessError, QMPError) as exc:
        raise LifecycleError(step, _why(exc), machine.serial_tail()) from exc
    finally:
        with contextlib.suppress(GuestError, QMPError):  # -no-reboot again: a later guest panic ends QEMU at once
            if machine.gone() is None:
                machine.qmp("set-action", reboot="shutdown")
    run.adopt(Guest(machine, session, replace(guest.boot)), None)
    return {
        "step": step,
        "boot_id_before": before,
        "boot_id_after": after,
        "reset_event": event.get("data"),
        "reset_to_console_s": round(console_s, 3),
        "reset_to_ssh_s": round(ssh_s, 3),
    }


# --- save and restore ------------------------------------------------------------------------------------------


def _await_migration(machine: QemuMachine, timeout_s: float) -> str:
    """Wait for the MIGRATION event that ends a migration on ``machine``; return its status.

    :raises BootError: QEMU exited or froze, or no end within ``timeout_s`` seconds.
    """
    event = machine.wait_event(("MIGRATION",), timeout_s, until=lambda e: e["data"]["status"] in MIGRATION_END)
    return str(event["data"]["status"])


def _migration_error(machine: QemuMachine) -> str:
    """QEMU's own words on a failed migration (query-migrate ``error-desc``)."""
    try:
        info = machine.qmp("query-migrate")
    except (GuestError, QMPError) as exc:
        return f"query-migrate: {_why(exc)}"
    return str(info.get("error-desc") or info.get("status"))


def _destination(run: Any, name: str) -> tuple[contextlib.ExitStack, QemuMachine]:
    """A new QEMU with the source's machine and -cpu, waiting for its state (``-incoming defer``)."""
    source = run.guest.machine
    config: MachineConfig = replace(source.config, paused=False, incoming=True)
    log_dir = run.log_dir / name if run.log_dir else None
    stack = contextlib.ExitStack()
    try:
        machine = stack.enter_context(QemuMachine(config, log_dir=log_dir, name=name))
        machine.qmp("migrate-set-capabilities", capabilities=EVENTS_CAPABILITY)
    except BaseException:
        stack.close()
        raise
    return stack, machine


def _resume_source(run: Any, source: QemuMachine) -> None:
    """After a failed restore or migration: let the source run on and reconnect to it (best effort: a source that is
    gone is rebooted by ensure_alive for the next check)."""
    with contextlib.suppress(GuestError, QMPError, HarnessError):
        if source.gone() is None and source.qmp("query-status").get("status") != "running":
            source.qmp("cont")
        if source.gone() is None:
            run.adopt(Guest(source, _session(source, run, 30.0), run.guest.boot), None)


def save_restore(run: Any, timeout_s: float = STEP_TIMEOUT_S) -> dict[str, Any]:
    """Stop the guest, save its state to a file (QMP ``migrate`` to ``exec:cat > FILE``), start a new QEMU with the
    same machine and -cpu from that file (``-incoming defer`` + ``migrate-incoming exec:cat FILE``), resume it and
    wait for SSH; the new QEMU becomes the run's guest and the old one is shut down.

    ``exec:`` because QEMU before 8.2 has no ``file:`` migration URI (the QEMU here is 7.2); every QEMU has ``exec:``.

    :raises LifecycleError: step ``save`` (the source stopped, died or reported a failed migration) or ``restore``
        (the destination exited, reported a failure, or the guest did not answer SSH), with both serial tails; the
        source is resumed where it can be.
    """
    source = run.guest.machine
    work = _workdir()
    state = work / "state"
    with _handing_over(run, source, work, "save") as handover:
        before = boot_id(run.guest.ssh)
        run.guest.ssh.close()  # a paused guest cannot answer keepalives; the session ends here either way
        source.clear_events()
        source.qmp("migrate-set-capabilities", capabilities=EVENTS_CAPABILITY)
        source.qmp("stop")
        start = time.monotonic()
        try:
            # "completed" is sent (migration_completion()) before QEMU closes the pipe and reaps the command
            # (migrate_fd_cleanup() -> qio_channel_command_close(), io/channel-command.c; older QEMU: SIGTERM in
            # qio_channel_command_abort()), so the file appears under its name only once cat has written all of it.
            source.qmp("migrate", uri=f"exec:cat > {state}.part && mv {state}.part {state}")
        except ExecuteError as exc:  # a migration blocker also blocks a save
            raise MigrationRefused(handover.step, str(exc), *_tails(source, None)) from exc
        phase("save", machine=source)
        status = _await_migration(source, timeout_s)
        if status != "completed":
            raise LifecycleError(
                handover.step, f"QEMU reported the save {status}: {_migration_error(source)}", *_tails(source, None)
            )
        _await_file(source, state, timeout_s - (time.monotonic() - start))
        save_s = time.monotonic() - start
        size = state.stat().st_size
        handover.step = "restore"
        start = time.monotonic()
        handover.stack, destination = _destination(run, "restore")
        handover.destination = destination
        destination.qmp("migrate-incoming", uri=f"exec:cat {state}")
        phase("restore", machine=destination)
        status = _await_migration(destination, timeout_s)
        if status != "completed":
            raise LifecycleError(handover.step, f"QEMU reported the restore {status}: {_migration_error(destination)}",
                                 *_tails(source, destination))  # fmt: skip
        loaded_s = time.monotonic() - start
        # The source was stopped when it was saved, so the destination stays paused (migration.c
        # process_incoming_migration_bh(): it autostarts only a guest that was running).
        destination.qmp("cont")
        session = _session(destination, run, timeout_s - (time.monotonic() - start))
        restore_s = time.monotonic() - start
        after = boot_id(session)
    assert handover.stack is not None and handover.destination is not None
    run.adopt(Guest(handover.destination, session, BootTimes()), handover.stack)
    return {
        "step": "save_restore",
        "boot_id_before": before,
        "boot_id_after": after,
        "save_s": round(save_s, 3),
        "state_bytes": size,
        "restore_load_s": round(loaded_s, 3),
        "restore_to_ssh_s": round(restore_s, 3),
    }


#: Poll interval while waiting for the save file's final name.
FILE_POLL_S = 0.05


def _await_file(machine: QemuMachine, path: Path, timeout_s: float) -> None:
    """Wait until ``path`` exists (the save command renamed it into place).

    :raises LifecycleError: step ``save``: QEMU exited first, or the file did not appear within ``timeout_s``.
    """
    deadline = time.monotonic() + max(1.0, timeout_s)
    while not path.exists():
        gone = machine.gone()
        if gone is not None:
            raise LifecycleError("save", f"{gone} before the saved state was complete in {path}",
                                 *_tails(machine, None))  # fmt: skip
        if time.monotonic() > deadline:
            raise LifecycleError("save", f"QEMU reported the save completed, but {path} was not complete after "
                                 f"{max(1.0, timeout_s):.0f} s", *_tails(machine, None))  # fmt: skip
        time.sleep(FILE_POLL_S)


def _abandon(stack: contextlib.ExitStack | None, run: Any, source: QemuMachine) -> None:
    """A failed step: shut the destination down and resume the source."""
    if stack is not None:
        with contextlib.suppress(GuestError):
            stack.close()
    _resume_source(run, source)


@dataclass
class _Handover:
    """What a step that moves the guest to a new QEMU (restore, migration) has started so far, and which part of it
    (``step``) is in progress: what a failure must undo and name."""

    step: str
    stack: contextlib.ExitStack | None = None
    destination: QemuMachine | None = None


@contextlib.contextmanager
def _handing_over(run: Any, source: QemuMachine, work: Path, step: str) -> Iterator[_Handover]:
    """Around a hand-over to a destination QEMU: a harness, QMP or OS error becomes a LifecycleError of the part in
    progress with both serial tails, and every failure shuts the destination down and resumes the source; Ctrl-C
    and SIGTERM leave no destination QEMU behind; the work directory goes in every case."""
    handover = _Handover(step)
    try:
        yield handover
    except LifecycleError:
        _abandon(handover.stack, run, source)
        raise
    except (HarnessError, QMPError, OSError) as exc:
        tails = _tails(source, handover.destination)
        _abandon(handover.stack, run, source)
        raise LifecycleError(handover.step, _why(exc), *tails) from exc
    except BaseException:
        if handover.stack is not None:
            handover.stack.close()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- live migration --------------------------------------------------------------------------------------------


def migrate(
    run: Any, during: Callable[[GuestSession], Any] | None = None, timeout_s: float = STEP_TIMEOUT_S
) -> dict[str, Any]:
    """Live-migrate the running guest to a second QEMU on this host over a unix socket, wait for SSH on the
    destination, and make it the run's guest (the source is shut down).

    :param during: called with the source's session just before the migration starts (e.g. to start a probe that
        counts across the switch-over); it must return at once.
    :raises LifecycleError: step ``migration``: the destination or the source died, QEMU reported a failed
        migration, it did not complete within ``timeout_s`` seconds (it is cancelled: QMP ``migrate_cancel``), or
        the guest did not answer SSH on the destination; with both serial tails. The source runs on where it can.
    """
    source = run.guest.machine
    work = _workdir()
    sock = work / "migration.sock"
    started: Any = None
    with _handing_over(run, source, work, "migration") as handover:
        before = boot_id(run.guest.ssh)
        handover.stack, destination = _destination(run, "migration")
        handover.destination = destination
        destination.qmp("migrate-incoming", uri=f"unix:{sock}")
        if during is not None:
            started = during(run.guest.ssh)
        run.guest.ssh.close()
        source.clear_events()
        source.qmp("migrate-set-capabilities", capabilities=EVENTS_CAPABILITY)
        start = time.monotonic()
        try:
            source.qmp("migrate", uri=f"unix:{sock}")
        except ExecuteError as exc:  # a migration blocker (QEMU's words name it) or a bad state
            raise MigrationRefused("migration", str(exc), *_tails(source, destination)) from exc
        phase("migration", machine=destination)
        phase("migration_source", machine=source)
        try:
            status = _await_migration(source, timeout_s)
        except GuestError as exc:
            if source.gone() is None:  # the source is alive: the migration is what hangs
                with contextlib.suppress(GuestError, QMPError):
                    source.qmp("migrate_cancel")
            raise LifecycleError("migration", f"{_why(exc)} (source)", *_tails(source, destination)) from exc
        if status != "completed":
            raise LifecycleError("migration", f"QEMU reported the migration {status}: {_migration_error(source)}",
                                 *_tails(source, destination))  # fmt: skip
        total_s = time.monotonic() - start
        info = source.qmp("query-migrate")
        # The source ran when the migration started, so the destination resumes by itself once it has all
        # (migration.c process_incoming_migration_bh()); wait for its end too, bounded by what is left.
        if _await_migration(destination, max(1.0, timeout_s - total_s)) != "completed":
            raise LifecycleError("migration", f"the destination reported {_migration_error(destination)}",
                                 *_tails(source, destination))  # fmt: skip
        session = _session(destination, run, timeout_s - (time.monotonic() - start))
        to_ssh_s = time.monotonic() - start
        after = boot_id(session)
        sock_left = sock.exists()
    assert handover.stack is not None and handover.destination is not None
    run.adopt(Guest(handover.destination, session, BootTimes()), handover.stack)
    return {
        "step": "migration",
        "boot_id_before": before,
        "boot_id_after": after,
        "total_s": round(total_s, 3),
        "qemu_total_ms": info.get("total-time"),
        "downtime_ms": info.get("downtime"),
        "setup_ms": info.get("setup-time"),
        "transferred_bytes": (info.get("ram") or {}).get("transferred"),
        "migration_to_ssh_s": round(to_ssh_s, 3),
        "socket_left_by_qemu": sock_left,
        "during": started,
    }


# --- what the life-cycle checks measure --------------------------------------------------------------------------

#: Guest files of the process that runs across a live migration (a tmpfs: they live as long as the guest's boot).
SPAN_DIR = "/tmp/vpmu-span"
#: Seconds to wait on the destination for that process beyond its planned length.
SPAN_GRACE_S = 60.0


def _tag(records: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    return [{**r, "stage": stage} for r in records]


def _has_pmu(run: Any) -> bool:
    return run.view is not None and run.view.cpuid_pmu


def _boot_state(run: Any) -> list[dict[str, Any]]:
    """The msr probe's reading of every PMU MSR right after the (latest) cold boot (ProfileRun._look)."""
    for key in reversed(list(run.probe_log)):
        entry = run.probe_log[key]
        if key.endswith(f"/{BOOT_STATE_KEY}") and not entry["error"]:
            return _tag(entry["records"], "boot")
    return []


def _enumeration_record(stage: str, found: dict[str, Any]) -> dict[str, Any]:
    return {"probe": "lifecycle", "kind": "enumeration", "stage": stage, **found}


def _msr(run: Any, mode: str, stage: str, repeats: int = 1, cpu: int = 0) -> list[dict[str, Any]]:
    return _tag(run.runner.run("msr", lifecycle_params(run.view, mode, repeats), cpu=cpu).records, stage)


def _stop(run: Any, cpu: int = 0) -> list[dict[str, Any]]:
    """After a refused step: stop the counters the program step left running, so the checks that follow start from
    an idle PMU (best effort: a probe failure here is no verdict on the step)."""
    if not _has_pmu(run):
        return []
    with contextlib.suppress(HarnessError):
        return _msr(run, "stop", "stopped", cpu=cpu)
    return []


def measure_reset(run: Any, how: str) -> list[dict[str, Any]]:
    """Program the counters (where there is a PMU), reset the guest (``how``: qmp / guest), and read every PMU MSR
    before anything else touches them, the kernel's stale-PMU lines and the enumeration."""
    records = [_enumeration_record("boot", boot_enumeration(run))]
    records.append({"probe": "lifecycle", "kind": "stale_lines", "stage": "before",
                    "lines": stale_pmu_lines(run.guest.ssh)})  # fmt: skip
    if _has_pmu(run):
        records += _boot_state(run) + _msr(run, "program", "saved")
    records.append({"probe": "lifecycle", "kind": "step", **reset(run, how)})
    if _has_pmu(run):
        records += _msr(run, "state", "after")
    records.append({"probe": "lifecycle", "kind": "stale_lines", "stage": "after",
                    "lines": stale_pmu_lines(run.guest.ssh)})  # fmt: skip
    records.append(_enumeration_record("after", enumeration(run, run.runner)))
    return records


def measure_save_restore(run: Any) -> list[dict[str, Any]]:
    """Program the counters, save and restore the guest into a new QEMU, then read the MSRs and count a new loop on
    the counters as restored."""
    records = [_enumeration_record("boot", boot_enumeration(run))]
    if _has_pmu(run):
        records += _msr(run, "program", "saved")
    try:
        records.append({"probe": "lifecycle", "kind": "step", **save_restore(run)})
    except MigrationRefused as exc:
        records.append({"probe": "lifecycle", "kind": "refused", "reason": exc.refusal})
        return records + _stop(run)
    if _has_pmu(run):
        records += _msr(run, "continue", "restored")
    records.append(_enumeration_record("after", enumeration(run, run.runner)))
    return records


def _span_cpu(run: Any) -> int:
    """The vCPU the span probe counts on: 1 where the guest has two or more (the SSH server is moved to vCPU 0),
    else 0, the only one, shared with the harness's SSH work."""
    return 1 if getattr(run.guest.machine.config, "smp", 1) >= 2 else 0


def measure_migration(run: Any) -> list[dict[str, Any]]:
    """Program the counters, start a region that counts the loop for about probe_params.SPAN_TARGET_S seconds
    (without a PMU: a plain guest process), live-migrate while it runs, and collect it on the destination.

    The counters are raw per-CPU MSR counters (EVTSEL.USR): they count every user-mode instruction retired on their
    vCPU, and during the region the harness closes its session, opens one on the destination (dropbear's key
    exchange runs in user mode) and reads files through it. With two or more vCPUs every dropbear process is moved
    to vCPU 0 (``taskset``; new sessions inherit it) and the probe counts on vCPU 1; the verdict still skips the
    exact count when the probe was switched out in its windows (lifecycle_verdicts._exact)."""
    records = [_enumeration_record("boot", boot_enumeration(run))]
    repeats = 1
    cpu = _span_cpu(run) if _has_pmu(run) else 0
    if _has_pmu(run):
        saved = _msr(run, "program", "saved", cpu=cpu)
        records += saved
        loop_ns = next((r["loop_ns"] for r in saved if r.get("kind") == "program"), 0)
        repeats = span_repeats(int(loop_ns))

    def start(session: GuestSession) -> dict[str, Any]:
        pinned = None
        if _has_pmu(run):
            if cpu:
                moved = session.run("pids=$(pidof dropbear) && for p in $pids; do taskset -p 0x1 $p || exit 1; done "
                                    ">/dev/null")  # fmt: skip
                pinned = moved.rc == 0
            probe = run.runner.builder.build("msr", lifecycle_params(run.view, "continue", repeats))
            remote = f"{SPAN_DIR}/msr-span"
            session.check(f"rm -rf {SPAN_DIR} && mkdir -p {SPAN_DIR} && mkfifo {SPAN_DIR}/started {SPAN_DIR}/done")
            session.put(probe.binary, remote, mode=0o755)
            command = f"{remote} {cpu} {SPAN_DIR}/started"
        else:
            session.check(f"rm -rf {SPAN_DIR} && mkdir -p {SPAN_DIR} && mkfifo {SPAN_DIR}/started {SPAN_DIR}/done")
            command = f"echo s >{SPAN_DIR}/started; sleep 2"  # a plain guest process that spans the switch-over
        # The job tells the harness it started (the probe itself writes the FIFO right before its region; a plain
        # process or a probe that died early through the subshell's non-blocking read-write open), and that it ended.
        files = SPAN_DIR
        session.check(f"({command} >{files}/out 2>{files}/err; echo $? >{files}/rc; echo x 1<>{files}/started; "
                      f"echo x >{files}/done) </dev/null >/dev/null 2>&1 &")  # fmt: skip
        session.check(f"head -c 1 {SPAN_DIR}/started", timeout_s=SPAN_GRACE_S)
        return {"command": command, "repeats": repeats, "probe_cpu": cpu, "ssh_pinned_away": pinned}

    try:
        step = migrate(run, start)
    except MigrationRefused as exc:
        records.append({"probe": "lifecycle", "kind": "refused", "reason": exc.refusal})
        return records + _stop(run, cpu)
    session = run.guest.ssh
    try:
        uptime = float(session.check("cat /proc/uptime").stdout.split()[0])
        records.append({"probe": "lifecycle", "kind": "switchover", "guest_boottime_ns": int(uptime * 1e9)})
        wait_s = SPAN_GRACE_S + (SPAN_TARGET_S * 2 if _has_pmu(run) else 0)
        done = session.run(f"cat {SPAN_DIR}/done", timeout_s=wait_s)
        rc = session.run(f"cat {SPAN_DIR}/rc").stdout.strip()
        step["during"] = {**(step.get("during") or {}), "finished": done.rc == 0 and rc == "0", "rc": rc}
        if _has_pmu(run):
            out = session.run(f"cat {SPAN_DIR}/out").stdout
            records += _tag(parse_records("msr", out), "restored")
    except HarnessError as exc:
        raise LifecycleError("migration", f"collecting the job that ran across the switch-over: {_why(exc)}",
                             run.guest.machine.serial_tail()) from exc  # fmt: skip
    records.append({"probe": "lifecycle", "kind": "step", **step})
    records.append(_enumeration_record("after", enumeration(run, run.runner)))
    return records
