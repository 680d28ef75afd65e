"""One profile's guest for a whole session: decide, boot once, look, and run probes on demand.

``ProfileRun`` asks QEMU whether the profile's ``-cpu`` properties exist (a profile QEMU cannot start is
"unavailable" with that reason, not a crash), boots the guest paused to read what QEMU granted, starts it,
reads the guest's own view (enum probe), and memoizes every probe run so checks share one run. If the guest
dies, the next probe request reboots it once, so one crash does not take the rest of the run with it.

Everything a check reads from the run (probe records, the guest view's inputs, branch maps, VM-exit counts) is also
kept for results.json (:meth:`ProfileRun.stored_inputs`), so ``python -m harness rejudge`` can give the same values
back to the same checks later (harness/suite/replay.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError

from harness.cpu.model import CpuModel
from harness.cpu.profile import Profile
from harness.errors import BootError, GuestError, HarnessError
from harness.guest.boot import Guest, boot_guest
from harness.guest.image import Image
from harness.guest.machine import FATAL_RE, QemuMachine
from harness.guest.qemu_argv import MachineConfig
from harness.guest.qemu_cpu import QemuCpuCaps, granted_props, probe_cpu_caps
from harness.judge import plan
from harness.judge.expectations import Context, Expectation
from harness.probe.branch_map import BranchMap, branch_map
from harness.probe.guest_view import ENUM_MSRS, GuestView, kernel_pmu_facts, view_from
from harness.probe.params import lifecycle_params
from harness.probe.runner import ProbeError, ProbeRun, ProbeRunner

LOG = logging.getLogger(__name__)
MAX_REBOOTS = 1
#: Memo key of the msr probe's reading of every PMU MSR right after boot (harness/suite/lifecycle.py).
BOOT_STATE_KEY = "lifecycle_boot_state"


def _seen(prop: str, view: GuestView) -> Any:
    """The guest's own view of a QEMU CPU property (None when the guest cannot show it)."""
    caps = view.caps
    perf_caps = view.perf_capabilities() or {}
    table: dict[str, Any] = {
        "pmu": view.cpuid_pmu,
        "pdcm": caps.pdcm,
        "arch-lbr": caps.arch_lbr is not None,
        "perfmon-v2": bool(caps.amd and caps.amd.perfmon_v2),
        "perfctr-core": bool(caps.amd and caps.amd.perfctr_core),
        "ibs": bool(caps.amd and caps.amd.ibs),
        "lbr-fmt": perf_caps.get("lbr_format"),
        "full-width-write": perf_caps.get("full_width_write"),
    }
    return table.get(prop)


class RunExpectations:
    """Expectations of a run from its profile, accelerator, host facts and (once booted) what QEMU granted; shared
    by the live :class:`ProfileRun` and rejudge's ReplayRun, so both decide through the same functions."""

    profile: Profile
    accel: str
    host: dict[str, Any]
    features: dict[str, dict[str, Any]]

    @property
    def ctx(self) -> Context:
        """The expectation context; once the guest is booted it includes what QEMU granted (qom-get)."""
        granted = {name: row.get("granted") for name, row in self.features.items()} if self.features else None
        return Context(self.accel, self.host, self.profile, granted)

    @property
    def cpu(self) -> CpuModel:
        return CpuModel.parse(self.profile.cpu_for(self.accel))

    def expectation(self, feature: str) -> Expectation:
        """A kvm_features.toml rule or a pseudo-name ("pmu", "lbr", ...), resolved as the pre-gate resolves it."""
        return plan.expectation(feature, self.ctx)

    def pmu_expectation(self) -> Expectation:
        return self.expectation("pmu")


def probe_entry(name: str, outcome: ProbeRun | ProbeError) -> dict[str, Any]:
    """A probe run as results.json keeps it (``probes`` of a run): its records, or why it failed."""
    if isinstance(outcome, ProbeError):
        return {"name": name, "records": outcome.records, "error": str(outcome), "duration_s": None}
    return {"name": name, "records": outcome.records, "error": None, "duration_s": round(outcome.duration_s, 3)}


def branch_map_json(found: BranchMap | None, functions: tuple[str, ...]) -> dict[str, Any]:
    """A branch map as results.json keeps it (JSON keys are strings: addresses in hex)."""
    if found is None:
        return {"functions": list(functions), "map": None}
    return {"functions": list(functions), "map": {
        "sites": {f"{a:#x}": [site.kind, site.target] for a, site in found.sites.items()},
        "ranges": {name: list(bounds) for name, bounds in found.ranges.items()}}}  # fmt: skip


@dataclass
class ProfileRun(RunExpectations):
    """A profile's guest and everything learned about it, shared by all checks of that profile."""

    profile: Profile
    accel: str
    host: dict[str, Any]
    image: Image
    log_dir: Path | None = None
    boot_timeout_s: float = 120.0
    unavailable: str | None = None
    boot_error: str | None = None
    boot_s: float | None = None
    reboots: int = 0
    qemu_caps: QemuCpuCaps | None = None
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    filtered_features: list[dict[str, Any]] = field(default_factory=list)
    view: GuestView | None = None
    probe_timings: dict[str, dict[str, float]] = field(default_factory=dict)
    pinning: dict[str, Any] = field(default_factory=dict)
    #: The host load the checks currently run under; probe runs are memoized per load.
    load: str = "idle"
    _guest: Guest | None = None
    _stack: contextlib.ExitStack | None = None
    _runner: ProbeRunner | None = None
    _probes: dict[str, ProbeRun | ProbeError] = field(default_factory=dict)
    #: Why the guest kernel cannot be trusted with another probe (an oops or BUG during one); cleared by a reboot.
    _oopsed: str | None = None
    #: Every probe run by memo key (kept across reboots, unlike ``_probes``), for results.json.
    probe_log: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Branch maps the checks asked for, by probe memo key.
    branch_maps: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The VM-exit total a check last read under each load (the co-existence canary's rate).
    exits_read: dict[str, int | None] = field(default_factory=dict)

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Decide whether the profile can run here, and boot its guest.

        :raises GuestError: the guest did not boot (the reason carries the serial tail).
        """
        reason = plan.profile_unavailable(self.profile, self.ctx)
        if reason is None:
            self.qemu_caps = probe_cpu_caps(self.profile.cpu_for(self.accel), self.accel)
            missing = self.qemu_caps.missing(self.cpu)
            if missing:
                reason = (f"qemu: this QEMU's '{self.cpu.name}' CPU has no property {', '.join(missing)} "
                          f"(qom-list-properties {self.cpu.qom_type()})")  # fmt: skip
        if reason is not None:
            self.unavailable = reason
            return
        self._boot()

    def _boot(self) -> None:
        config = MachineConfig(image=self.image, accel=self.accel, cpu=self.profile.cpu_for(self.accel), paused=True,
                               smp=self.profile.smp)  # fmt: skip
        self._stack = contextlib.ExitStack()
        start = time.monotonic()
        try:
            guest = self._stack.enter_context(
                boot_guest(config, self.boot_timeout_s, self.log_dir, before_start=self._read_granted)
            )
        except BaseException as exc:
            self._stack.close()
            self._stack = None
            if isinstance(exc, GuestError):
                self.boot_error = str(exc)
            raise
        self._guest = guest
        self._oopsed = None
        self.boot_s = time.monotonic() - start
        self._runner = ProbeRunner(guest.ssh)
        self._probes.clear()
        try:
            self.pinning = pin_vcpus(guest.machine)
            self._look()
        except BaseException:
            self.close()  # the caller never gets a booted run to close: shut the guest down here
            raise

    def _read_granted(self, machine: QemuMachine) -> None:
        granted, self.filtered_features = granted_props(machine, self.cpu)
        expansion = self.qemu_caps.expansion if self.qemu_caps else {}
        self.features = {
            name: {"requested": value, "qemu_expansion": expansion.get(name), "granted": granted.get(name)}
            for name, value in self.cpu.props.items()
        }

    def _look(self) -> None:
        """The guest's own view (third column of requested / granted / seen)."""
        assert self._guest is not None
        run = self.probe("enum", {"msrs": list(ENUM_MSRS)})
        pmus, banner, sysfs = kernel_pmu_facts(self._guest.ssh)
        self.view = view_from(run, pmus, banner, sysfs)
        for name, row in self.features.items():
            row["seen"] = _seen(name, self.view)
        self.features.setdefault("pmu", {"requested": self.cpu.pmu_requested(), "granted": None})
        self.features["pmu"]["seen"] = self.view.cpuid_pmu
        if self.view.cpuid_pmu:
            # Every PMU MSR as the cold boot left it, before any check programs one: the baseline of lifecycle.reset.
            self.probe("msr", lifecycle_params(self.view, "state"), key=BOOT_STATE_KEY)

    def boot_again(self) -> None:
        """Boot the guest again after :meth:`close`: a before-boot host load starts in between, so it exists when KVM
        creates the VM (harness.suite.before_boot.start_before_boot).

        :raises GuestError: the new guest did not boot. ``boot_error`` keeps the first boot's: a VM refused under one
            load says nothing about the groups that ran before it.
        """
        first = self.boot_error
        try:
            self._boot()
        except GuestError:
            self.boot_error = first
            raise

    def adopt(self, guest: Guest, stack: contextlib.ExitStack | None) -> None:
        """Make ``guest`` the run's guest after a life-cycle step (suite.lifecycle): a new SSH session on the same
        QEMU (``stack`` None: the session joins the current one), or a new QEMU that ``stack`` owns (a restored or
        migrated guest); the old QEMU is then shut down and the vCPUs of the new one pinned."""
        if stack is None:
            assert self._stack is not None
            self._stack.callback(guest.ssh.close)
        else:
            stack.callback(guest.ssh.close)
            old, self._stack = self._stack, stack
            if old is not None:
                try:
                    old.close()
                except GuestError as exc:  # the source had to be killed: the guest lives on in the new QEMU
                    LOG.warning("shutting down the source QEMU of %s: %s", self.profile.name, exc)
            self.pinning = pin_vcpus(guest.machine)
        self._guest = guest
        self._runner = ProbeRunner(guest.ssh)

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        self._guest = None

    @property
    def guest(self) -> Guest:
        if self._guest is None:
            raise HarnessError(self.unavailable or self.boot_error or "guest is not running")
        return self._guest

    def lost(self) -> str | None:
        """Why the booted guest can no longer run probes (QEMU exited, stopped or frozen; the guest stopped answering
        SSH; its kernel oopsed during a probe), without blocking; None while it can (a guest whose sshd dropped the
        session can: it is reconnected)."""
        if self._guest is None:
            return None
        return self._guest.machine.gone() or self._guest.ssh.unanswered or self._oopsed

    def ensure_alive(self) -> None:
        """Reboot a guest that is :meth:`lost` (at most MAX_REBOOTS times).

        :raises GuestError: it was lost again after MAX_REBOOTS reboots, or the reboot failed.
        """
        guest = self.guest
        problem = self.lost()
        if problem is None:
            return
        if self.reboots >= MAX_REBOOTS:
            raise GuestError(
                f"guest lost ({problem}) and was already rebooted {self.reboots} "
                f"time(s)\n--- serial log (tail) ---\n{guest.machine.serial_tail()}"
            )
        LOG.warning("guest of profile %s lost (%s); rebooting", self.profile.name, problem)
        self.reboots += 1
        self.close()
        self._boot()

    # --- probes ------------------------------------------------------------------------------------------

    def probe(self, name: str, params: dict[str, Any] | None = None, key: str | None = None, cpu: int = 0) -> ProbeRun:
        """Run probe ``name`` once per guest (memoized under ``key``, default the name) pinned to guest CPU ``cpu``
        (give a key per CPU: the per-vCPU canaries) and return its run.

        :raises ProbeError: the probe failed (the same error is raised to every check that asks again).
        :raises GuestError: the guest died and could not be brought back.
        """
        key = f"{self.load}/{key or name}"
        cached = self._probes.get(key)
        if cached is None:
            self.ensure_alive()
            assert self._runner is not None
            machine = self.guest.machine
            since = machine.console_position()
            try:
                cached = self._runner.run(name, params, cpu=cpu)
                self.probe_timings[key] = {"run_s": round(cached.duration_s, 3), "copy_s": round(cached.copy_s, 3)}
            except ProbeError as exc:
                problem = self.guest.machine.gone()
                if problem is not None:
                    exc.reason += f" ({problem})\n--- serial log (tail) ---\n{self.guest.machine.serial_tail()}"
                cached = exc
            except GuestError as exc:  # the guest was lost during the copy or the run; the reason says how
                text = str(exc) if isinstance(exc, BootError) else \
                    f"{exc}\n--- serial log (tail) ---\n{self.guest.machine.serial_tail()}"  # fmt: skip
                cached = ProbeError(name, text)
            self._judge_console(name, machine, since, cached)
            self._probes[key] = cached
            self.probe_log[key] = probe_entry(name, cached)
        if isinstance(cached, ProbeError):
            raise cached
        return cached

    @property
    def runner(self) -> ProbeRunner:
        """The probe runner of the current guest (life-cycle steps run probes outside the memo)."""
        assert self._runner is not None, "the guest is not running"
        return self._runner

    def measure(self, name: str, measure: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Run ``measure`` once per load (memoized under ``name`` like a probe) and keep its records for results.json,
        so that rejudge gives them back (ReplayRun.measure); a failure is kept too, with its text.

        :raises GuestError: ``measure`` failed (the same error text is raised to a check that asks again).
        """
        key = f"{self.load}/{name}"
        entry = self.probe_log.get(key)
        if entry is not None:
            if entry["error"]:
                raise GuestError(entry["error"])
            return list(entry["records"])
        if self._guest is None and self.unavailable is None:
            self.boot_again()  # the last load booted no guest (a before-boot load the mediated vPMU refused)
        self.ensure_alive()
        start = time.monotonic()
        try:
            records = measure()
        except (GuestError, ProbeError) as exc:
            self.probe_log[key] = {"name": name, "records": [], "error": str(exc), "duration_s": None}
            raise
        self.probe_log[key] = {"name": name, "records": records, "error": None,
                               "duration_s": round(time.monotonic() - start, 3)}  # fmt: skip
        return list(records)

    def _judge_console(self, name: str, machine: QemuMachine, since: int, outcome: ProbeRun | ProbeError) -> None:
        """What the guest kernel printed while probe ``name`` ran: its trouble lines (oops, BUG, WARN, lockup, RCU
        stall, hung task) go into the probe's error; an oops or BUG marks the guest lost (rebooted before the next
        probe), whether or not the probe itself failed."""
        evidence = machine.console_evidence(since)
        if not evidence:
            return
        if isinstance(outcome, ProbeError):
            outcome.reason += "\n--- guest console during the probe ---\n" + "\n".join(evidence[-10:])
        fatal = [line for line in evidence if FATAL_RE.search(line)]
        if fatal:
            self._oopsed = f"the guest kernel oopsed during probe {name}: {fatal[0]}"
            LOG.warning("guest of profile %s: %s", self.profile.name, self._oopsed)

    def cached_probe(self, load: str, name: str) -> ProbeRun | None:
        """A probe run made earlier under another load (e.g. the idle baseline), if there was a good one; also one
        from before a reboot (a before-boot load boots the guest again), from the records kept for results.json."""
        cached = self._probes.get(f"{load}/{name}")
        if cached is None and f"{load}/{name}" in self.probe_log:
            entry = self.probe_log[f"{load}/{name}"]
            return None if entry["error"] else ProbeRun(entry["name"], entry["records"], "", entry["duration_s"] or 0.0)
        return cached if isinstance(cached, ProbeRun) else None

    def branch_map(
        self, probe: str, functions: tuple[str, ...], params: dict[str, Any] | None = None
    ) -> BranchMap | None:
        """The branch instructions of ``functions`` in the binary of probe ``probe`` as it ran under this load
        (objdump, harness.probe.branch_map); None when the run has no binary. Runs the probe if it has not run yet.

        :raises ProbeError: the probe failed.
        :raises ToolMissingError: objdump is not installed.
        """
        key = f"{self.load}/{probe}"
        binary = self.probe(probe, params).binary
        found = branch_map(binary, functions) if binary else None
        self.branch_maps[key] = branch_map_json(found, functions)
        return found

    def vcpu_threads(self) -> tuple[list[int], list[int]]:
        """Host thread ids of the vCPUs and the host CPUs they are pinned to (for the host loads)."""
        tids = [int(v["thread"]) for v in self.pinning.get("vcpus", [])]
        cpus = [int(v["cpu"]) for v in self.pinning.get("vcpus", []) if v.get("cpu") is not None]
        return tids, cpus

    def vm_exits(self) -> int | None:
        """Total VM exits of all vCPUs from QMP ``query-stats`` (KVM provider); None where there is none (TCG).
        What a check reads is kept per load (``exits_read``) for rejudge; the harness's own reads use
        :meth:`vm_exits_now`."""
        total = vm_exits(self.guest.machine)
        self.exits_read[self.load] = total
        return total

    def vm_exits_now(self) -> int | None:
        """VM exits read by the harness itself (around a host load), not recorded as a check's input."""
        return vm_exits(self.guest.machine)

    def stored_inputs(self, load: str) -> dict[str, Any]:
        """What the checks of ``load`` read from this run, for results.json: probe records by memo key (with the
        enum probe the guest view came from), branch maps, and the VM exits a check read."""
        prefix = f"{load}/"
        probes = {k: v for k, v in self.probe_log.items() if k.startswith(prefix) or v["name"] == "enum"}
        maps = {k: v for k, v in self.branch_maps.items() if k.startswith(prefix)}
        return {"probes": probes, "branch_maps": maps, "exits_read": self.exits_read.get(load)}

    def summary(self) -> dict[str, Any]:
        """The ``guest`` object of this run in results.json."""
        return {
            "cpu": self.profile.cpu_for(self.accel),
            "kernel_release": self.image.kernel_release,
            "unavailable": self.unavailable,
            "boot_error": self.boot_error,
            "reboots": self.reboots,
            "features": self.features,
            "filtered_features": self.filtered_features,
            "view": {**self.view.summary(), "records": self.view.records} if self.view else None,
            "probe_timings": self.probe_timings,
            "pinning": self.pinning,
        }


def pin_vcpus(machine: QemuMachine) -> dict[str, Any]:
    """Pin vCPU i's host thread (QMP ``query-cpus-fast`` thread-id) to host CPU i, so per-CPU host loads hit it.

    Failure is recorded, not raised: pinning changes PMU counts, so the results must say whether it happened.
    """
    allowed = sorted(os.sched_getaffinity(0))
    vcpus = []
    try:
        cpus = machine.qmp("query-cpus-fast", record_frozen=False)
    except (QMPError, HarnessError) as exc:
        return {"error": f"query-cpus-fast: {exc}", "vcpus": []}
    for i, cpu in enumerate(cpus):
        host_cpu = allowed[i % len(allowed)]
        entry: dict[str, Any] = {"vcpu": cpu["cpu-index"], "thread": cpu["thread-id"], "cpu": host_cpu}
        try:
            os.sched_setaffinity(cpu["thread-id"], {host_cpu})
        except OSError as exc:
            entry["cpu"] = None
            entry["error"] = f"sched_setaffinity: {exc.strerror}"
        vcpus.append(entry)
    return {"vcpus": vcpus}


def vm_exits(machine: QemuMachine) -> int | None:
    """Sum of the KVM ``exits`` statistic over all vCPUs (QMP query-stats, QEMU 7.1+); None without KVM stats."""
    try:
        stats = machine.qmp("query-stats", record_frozen=False, target="vcpu",
                            providers=[{"provider": "kvm", "names": ["exits"]}])  # fmt: skip
    except (QMPError, HarnessError):
        return None
    total = None
    for entry in stats or []:
        for stat in entry.get("stats", []):
            if stat.get("name") == "exits" and isinstance(stat.get("value"), int):
                total = (total or 0) + stat["value"]
    return total
