"""The VM-exit cost of host multiplexing (coexist.mux_cost): sweep the host PMU's rotation interval under
harness.host.mux_interval's guard, and measure what the guest pays per setting.

While a CPU has more flexible events than counters, perf_mux_hrtimer_handler() (kernel/events/core.c) calls
perf_rotate_context() every interval and re-arms the timer only while rotations are needed; the timer is
HRTIMER_MODE_ABS_PINNED_HARD, a hard interrupt on that CPU, so a vCPU running there in guest mode takes a VM exit
(KVM's ``irq_exits``) each time it fires. harness.judge.mux_curve turns the sweep into a curve.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qemu.qmp import QMPError

from harness.errors import HarnessError
from harness.host.mux_interval import MuxUnavailable

if TYPE_CHECKING:
    from harness.host.loads import HostLoad
    from harness.suite.profile_run import ProfileRun

LOG = logging.getLogger(__name__)


#: Seconds the guest keeps vCPU 0 busy per setting while its KVM statistics are read before and after.
WINDOW_S = 2.0
#: Iterations of the probe's loop (10 instructions each, harness.probe.workloads) the window is calibrated from.
CALIBRATION_ITERATIONS = 20_000_000
MAX_ITERATIONS = 10**11
#: Let the new interval take effect (the store restarts every CPU's timer by IPI) before the window opens.
SETTLE_S = 0.1

#: KVM vCPU statistics worth recording for the PMU (arch/x86/kvm/x86.c kvm_vcpu_stats_desc[]), with why. Only those
#: this host's QEMU offers (QMP query-stats-schemas) are read.
PMU_STATS = {
    "exits": "every VM exit",
    # vmx.c handle_external_interrupt() / svm.c intr_interception(): ++vcpu->stat.irq_exits
    "irq_exits": "external-interrupt exits: the host's mux hrtimer expiring on the vCPU's CPU lands here",
    "nmi_injections": "NMIs injected: guest PMIs (LVTPC in NMI mode, kvm_pmu_deliver_pmi)",
    "irq_injections": "interrupts injected into the guest",
    "nmi_window_exits": "exits waiting to inject an NMI (PMI delivery)",
    "irq_window_exits": "exits waiting to inject an interrupt",
    "req_event": "KVM_REQ_EVENT processing (pending PMIs and interrupts)",
    "host_state_reload": "host state reloads (vCPU put/load around scheduling)",
    "halt_exits": "HLT exits: the vCPU idled inside the window",
    "signal_exits": "exits to deliver a signal to the vCPU thread",
    "preemption_reported": "the vCPU thread was preempted (reported to the guest)",
    "preemption_other": "the vCPU thread was preempted (not reported)",
}


# --- the journal -----------------------------------------------------------------------------------------------


# --- KVM statistics over QMP --------------------------------------------------------------------------------------


def stats_schemas(machine: Any) -> dict[str, Any]:
    """What QMP ``query-stats-schemas`` offers for the KVM provider (qapi/stats.json StatsSchema: provider, target,
    stats[name, type, unit, base, exponent]): every name per target, and the PMU-relevant vCPU ones in full."""
    try:
        schemas = machine.qmp("query-stats-schemas", provider="kvm")
    except (QMPError, HarnessError) as exc:
        return {"error": f"query-stats-schemas: {exc}", "offered": {}, "pmu_relevant": []}
    offered: dict[str, list[str]] = {}
    relevant = []
    for schema in schemas or []:
        names = [stat.get("name") for stat in schema.get("stats", [])]
        offered[schema.get("target", "?")] = names
        if schema.get("target") == "vcpu":
            relevant += [{**stat, "why": PMU_STATS[stat["name"]]} for stat in schema.get("stats", [])
                         if stat.get("name") in PMU_STATS]  # fmt: skip
    return {"error": None, "offered": offered, "pmu_relevant": relevant}


def vcpu_stats(machine: Any, names: list[str]) -> dict[int, dict[str, int]]:
    """KVM's ``names`` per vCPU index (QMP query-stats, target vcpu; the qom-path of each StatsResult matched to
    query-cpus-fast's cpu-index). Empty without KVM statistics (TCG, QEMU < 7.1)."""
    try:
        cpus = machine.qmp("query-cpus-fast")
        stats = machine.qmp("query-stats", target="vcpu", providers=[{"provider": "kvm"}])
    except (QMPError, HarnessError):
        return {}
    index = {cpu.get("qom-path"): cpu.get("cpu-index") for cpu in cpus or []}
    found: dict[int, dict[str, int]] = {}
    for entry in stats or []:
        vcpu = index.get(entry.get("qom-path"))
        if vcpu is None:
            continue
        found[vcpu] = {s["name"]: s["value"] for s in entry.get("stats", [])
                       if s.get("name") in names and isinstance(s.get("value"), int)}  # fmt: skip
    return found


# --- the sweep ------------------------------------------------------------------------------------------------------


def canary_key(interval_ms: int) -> str:
    """The probe memo key of the canary run at one setting (kept with the run's probes for rejudge)."""
    return f"counters@mux{interval_ms}ms"


def measure(run: ProfileRun, load: HostLoad, params: dict[str, Any],
            window_s: float = WINDOW_S) -> dict[str, Any]:  # fmt: skip
    """Sweep ``load.spec.mux_sweep`` while ``load`` multiplexes: per setting, vCPU 0's KVM statistics over a window in
    which the guest runs the probe's loop on vCPU 0, the load's running share in that window, then the canary probe
    (memo key :func:`canary_key`). The original values are back when this returns (and again when the load stops).

    Returns the sweep as results.json keeps it (``load_inputs.reads.mux_sweep``); ``unavailable`` says why nothing
    was measured.
    """
    from harness.probe.runner import ProbeError, ProbeRunner  # the guest side, imported where it is used

    guard = load.mux_guard()
    machine = run.guest.machine
    schemas = stats_schemas(machine)
    names = [s["name"] for s in schemas["pmu_relevant"]] or ["exits"]
    sweep: dict[str, Any] = {"intervals": list(load.spec.mux_sweep), "window_s": window_s, "vcpu": 0,
                             "schemas": schemas, "points": [], "unavailable": None}  # fmt: skip
    runner = ProbeRunner(run.guest.ssh)
    try:
        guard.begin()
        sweep["originals"] = dict(guard.originals)
        iterations = _calibrate(lambda n: runner.run("counters", params, args=("workload", str(n)), cpu=0), window_s)
        sweep["iterations"] = iterations
        for interval in load.spec.mux_sweep:
            guard.set(interval)
            time.sleep(SETTLE_S)
            before, start = vcpu_stats(machine, names), time.monotonic()
            runner.run("counters", params, args=("workload", str(iterations)), cpu=0)
            end, after = time.monotonic(), vcpu_stats(machine, names)
            point: dict[str, Any] = {"interval_ms": interval, "window_s": round(end - start, 3),
                                     "stats": _delta(before.get(0), after.get(0)),
                                     "host_running_pct": load.window_share(start, end),
                                     "canary_key": canary_key(interval), "error": None}  # fmt: skip
            try:
                run.probe("counters", params, key=canary_key(interval))
            except ProbeError as exc:
                point["error"] = str(exc).splitlines()[0]
            sweep["points"].append(point)
            if point["error"]:
                break
    except MuxUnavailable as exc:
        sweep["unavailable"] = str(exc)
    except ProbeError as exc:
        sweep["error"] = f"the guest's loop could not run: {str(exc).splitlines()[0]}"
    finally:
        sweep["restore"] = guard.restore()
    return sweep


def _calibrate(run_loop: Callable[[int], Any], window_s: float) -> int:
    """Loop iterations that keep the vCPU busy for about ``window_s`` (measured once on this guest)."""
    start = time.monotonic()
    run_loop(CALIBRATION_ITERATIONS)
    took = max(time.monotonic() - start, 1e-3)
    return int(min(MAX_ITERATIONS, max(CALIBRATION_ITERATIONS, CALIBRATION_ITERATIONS * window_s / took)))


def _delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int]:
    if not before or not after:
        return {}
    return {name: after[name] - before[name] for name in after if name in before}
