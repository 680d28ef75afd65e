"""Co-existence verdicts: what a host perf load does to the guest, and whether the host load itself behaved.

Under the perf-based vPMU every guest counter is a host perf event, so host contention can stop a guest
counter silently while the guest still sees time_running == time_enabled: only an exact-count canary catches
that (reference probe-reference.md §7b). Under the mediated vPMU the canary must stay exact whatever ``:H`` load
the host runs, and a host event that would count guest time must be refused with EOPNOTSUPP (kvm-x86 pull
"Mediated PMU for 6.20", perf_create_mediated_pmu include-guest accounting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.host.loads import LoadResult, LoadSpec
from harness.host.perf_output import event_key
from harness.judge.arch_counters import held_back_note
from harness.judge.bounds import NO_ERRATA, OvercountErrata, event_bounds, window_events
from harness.judge.expectations import Context, Expectation
from harness.judge.verdict import Record, Verdict, contention_skip, errored, failed, gate, passed, skipped
from harness.probe.guest_view import GuestView
from harness.probe.workloads import LOOP


@dataclass(frozen=True)
class MediatedHolder:
    """Whether this run's VM holds a mediated PMU (then the kernel refuses every include-guest host event), and
    why, in one phrase for the verdict."""

    holds: bool
    why: str
    #: False where ``holds`` rests on what released QEMU does (a pmu=off VM: QEMU does not set KVM_PMU_CAP_DISABLE
    #: today; a QEMU that does would spare the VM), so a VM seen without one is no KVM defect.
    certain: bool = True


def mediated_pmu_holder(ctx: Context) -> MediatedHolder:
    """Does KVM hold a mediated PMU for this run's VM?

    arch/x86/kvm/x86.c kvm_arch_vcpu_precreate(): ``if (enable_mediated_pmu && kvm->arch.enable_pmu &&
    !kvm->arch.created_mediated_pmu)`` it calls perf_create_mediated_pmu() (in-kernel irqchip, QEMU's default),
    which raises nr_mediated_pmu_vms; from then on kernel/events/core.c mediated_pmu_account_event() fails new
    ``!exclude_guest`` events with -EOPNOTSUPP. kvm->arch.enable_pmu is the module's enable_pmu (kvm_arch_init_vm)
    unless the VMM sets KVM_CAP_PMU_CAPABILITY(KVM_PMU_CAP_DISABLE); the guest's CPUID plays no part. So a pmu=off
    VM holds one too, unless QEMU passes pmu=off to KVM as KVM_PMU_CAP_DISABLE, which released QEMU does not
    (target/i386/kvm/kvm.c kvm_arch_pre_create_vcpu() sets no PMU capability). The expectation pmu_off_honoured
    carries that QEMU fact for AMD hosts (pmu_off_reaches_kvm); on Intel it holds through CPUID 0AH alone, which
    does not reach kvm->arch.enable_pmu.
    """
    from harness.judge.plan import expectation  # the pre-gate's resolver; plan is not needed by coexist's other users

    mode = ctx.host.get("vpmu_mode")
    if ctx.accel != "kvm":
        return MediatedHolder(False, f"accel {ctx.accel}: this run created no KVM VM")
    if mode != "mediated":
        return MediatedHolder(False, f"vPMU mode {mode or 'none'}: KVM creates no mediated PMU")
    created = "KVM created a mediated PMU for this VM (kvm_arch_vcpu_precreate -> perf_create_mediated_pmu)"
    if ctx.cpu.pmu_requested():
        return MediatedHolder(True, created)
    honoured = expectation("pmu_off_honoured", ctx)
    amd = ctx.host_vendor in ("AuthenticAMD", "HygonGenuine")
    if honoured.available and amd:
        return MediatedHolder(False, f"profile {ctx.profile.name} turns the PMU off and QEMU passes that to KVM "
                                     "(KVM_PMU_CAP_DISABLE), so KVM creates no mediated PMU")  # fmt: skip
    return MediatedHolder(True, f"{created}: profile {ctx.profile.name} turns the guest's PMU off, but only "
                                "KVM_PMU_CAP_DISABLE spares a VM and QEMU does not set it",
                          certain=False)  # fmt: skip


def _counted_nothing(events: dict[str, Any], sampling: bool) -> str | None:
    """What the load failed to count so far (None: every event counted something). A load that counts nothing
    does not load the host PMU, e.g. when the guest's pinned events hold every counter of its CPU. A hybrid host's
    event counts when one core PMU's row does (the other PMU's CPUs may not be the load's)."""
    if not events:
        return "perf record wrote no sample so far" if sampling else "perf printed no counts so far"
    rows: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, entry in events.items():
        rows.setdefault(event_key(name), []).append((name, entry))
    missing = []
    for variants in rows.values():
        if any(entry.get("max_value", entry.get("value")) for _name, entry in variants):
            continue
        for name, entry in variants:
            status = entry.get("status")
            quiet = status != "counted" and not entry.get("counted_rows")
            missing.append(f"{name} {status} throughout" if quiet else f"{name} read 0 throughout")
    if not missing:
        return None
    return "the load counted nothing for " + ", ".join(missing)


def host_load(
    spec: LoadSpec,
    result: LoadResult | None,
    vpmu_mode: str | None,
    snapshot: dict[str, Any],
    holder: MediatedHolder | None = None,
) -> Verdict:
    """The host load ran and counted; when this run's VM holds a mediated PMU (``holder``, from
    :func:`mediated_pmu_holder`), an include-guest load is refused instead.

    The refusal is host-wide (nr_mediated_pmu_vms counts every VM), so on a mediated host a refusal seen by a VM
    that holds no mediated PMU came from another VM: not this run's to judge. Without ``holder`` the host's vPMU
    mode alone decides (callers that do not know the run).

    A before-boot load (loads.toml ``start = "before-boot"``) exists before this VM does, so no refusal is due to it:
    the mediated vPMU refuses the VM instead (perf_create_mediated_pmu -EBUSY), which coexist.load_before_boot
    judges; here it must simply run and count, and a refusal can only be another VM's."""
    if spec.idle:
        return skipped("not-applicable: the idle baseline runs no host load")
    if result is None:
        return skipped("not-applicable: the profile's guest did not run")
    if holder is None:
        holder = MediatedHolder(vpmu_mode == "mediated", f"vPMU mode {vpmu_mode or 'none'} (run not known)")
    evidence = snapshot or result.events
    observed = {"status": result.status, "events": evidence, "reason": result.reason, "probe": result.probe,
                "mediated_pmu": {"holds": holder.holds, "why": holder.why}}  # fmt: skip
    if spec.before_boot and result.status == "refused":
        return skipped(f"not-applicable: {spec.name} started before this VM existed, so another VM's mediated PMU made "
                       f"the kernel refuse it (kernel/events/core.c mediated_pmu_account_event counts every VM's): "
                       f"{result.reason}", "running", observed)  # fmt: skip
    if spec.counts_guest and holder.holds and not spec.before_boot:
        if result.status == "refused":
            return passed(f"{holder.why}; the kernel refused the host's include-guest event: {result.reason}",
                          "refused", observed)  # fmt: skip
        if result.status in ("running", "stopped"):
            return failed(f"{holder.why}, so a host event that counts guest time must be refused (EOPNOTSUPP, "
                          "kernel/events/core.c mediated_pmu_account_event), but perf started", "refused",
                          observed)  # fmt: skip
    if result.status == "unavailable":
        return skipped(f"host-load: {result.reason}")
    if result.status == "died":
        return errored(f"host-load: {result.reason}")
    if result.status == "refused":
        if vpmu_mode == "mediated":
            return skipped(f"not-applicable: the refusal is host-wide (kernel/events/core.c "
                           f"mediated_pmu_account_event counts every VM's mediated PMU) and this VM holds none "
                           f"({holder.why}), so another VM's caused it: {result.reason}", "running",
                           observed)  # fmt: skip
        return failed(f"host perf refused the load ({result.reason}) although the vPMU is "
                      f"{vpmu_mode or 'not in use'}", "running", observed)  # fmt: skip
    nothing = _counted_nothing(evidence, spec.sampling)
    if nothing:
        return skipped(f"host-load: {nothing}", "counts", observed)
    pcts = [e.get("min_pct_running") for e in evidence.values() if e.get("min_pct_running")]
    low = min(pcts) if pcts else None
    share = f"; lowest running share {low:.0f}%" if low is not None else ""
    return passed(f"host load running ({', '.join(evidence)}{share})", "running", observed)


def _instruction_members(records: list[Record]) -> list[Record]:
    return [r for r in records if r.get("kind") == "count" and r.get("event") == "instructions" and "error" not in r]


def competing_load(spec: LoadSpec | None) -> str | None:
    """How a host load takes hardware counters from KVM's backing events (one phrase), or None when it cannot.

    Under the perf-based vPMU each guest counter is a pinned per-task perf event on the vCPU thread
    (arch/x86/kvm/pmu.c pmc_reprogram_counter(): attr.pinned, perf_event_create_kernel_counter(&attr, -1, current)).
    Flexible events never push a pinned one off its counter: pinned groups are scheduled first, CPU-pinned before
    task-pinned, and a pinned event that finds no counter goes to ERROR and stops counting (kernel/events/core.c
    perf_event_sched_in(), merge_sched_in()). So only pinned (:D) hardware events that reach the vCPU's CPU
    (system-wide -a, or -C) or thread (-t, -p) compete. Whether they count the guest too does not matter: a host-only
    event keeps its counter while the guest runs and is only masked out of the guest's GLOBAL_CTRL
    (arch/x86/events/intel/core.c intel_guest_get_msrs(): guest = intel_ctrl & ~intel_ctrl_host_mask).
    """
    if spec is None or spec.idle:
        return None
    pinned = [e.text for e in spec.event_list() if e.kind == "core" and "D" in e.modifiers]
    if not pinned:
        return None
    command = list(spec.command)
    if "-a" in command or "--all-cpus" in command:
        where = "on every CPU (-a), the vCPU's included"
    elif any(word in command for word in ("-C", "--cpu")) or any(w.startswith("--cpu=") for w in command):
        where = "on the vCPU's CPUs (-C)"
    elif any(word in command for word in ("-t", "--tid", "-p", "--pid")):
        where = "on the vCPU threads (-t/-p)"
    else:
        return None
    return f"pins hardware events {', '.join(pinned)} {where}"


def perf_based_contention(spec: LoadSpec | None, vpmu_mode: str | None) -> str | None:
    """The ``contention`` argument of the counting verdicts (verdict.contention_skip): which load competes
    for the counters and how, when the vPMU is the perf-based one, whose guest counters are host perf events that
    can be "silently dropped" under contention (verdict.CONTENTION_DOC). None under the mediated vPMU, which
    "eliminates lost guest events", and when the load does not compete (competing_load)."""
    how = competing_load(spec) if vpmu_mode == "perf-based" else None
    return f"{spec.name} {how}" if spec is not None and how else None


def canary(
    expectation: Expectation,
    view: GuestView,
    records: list[Record],
    idle_records: list[Record] | None,
    load: LoadResult | None,
    vm_exits: dict[str, Any],
    errata: OvercountErrata | bool = NO_ERRATA,
    contention: str | None = None,
) -> Verdict:
    """The exact-count canary: the loop's user instructions on every counter equal the exact value (and the idle
    run's) under this host load, up to the interrupts and exceptions the probe saw in its windows (one count each:
    harness.judge.bounds.WindowEvents). A shortfall with time_running == time_enabled is a silent, host-induced loss.
    Only the instructions erratum relaxes it (OvercountErrata.instructions; Clearwater Forest has no branch one).

    A loss under the perf-based vPMU while the load competes for counters (``contention``: perf_based_contention) is
    that vPMU's documented behaviour (verdict.CONTENTION_DOC), not a defect: SKIP, with the measured loss in the
    reason and the counts kept as the observation. A loss under a load that does not compete (idle, software events,
    flexible host events), or under the mediated vPMU, which "eliminates lost guest events", stays a FAIL; so does
    any overcount.
    """
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    if load is not None and load.status in ("unavailable", "refused"):
        return skipped(f"host-load: {load.reason}")
    members = _instruction_members(records)
    if not members:
        return failed("no instructions measurement under this load", "counts", None)
    n = int(members[0]["iterations"])
    exact = LOOP.delta_instructions(n)
    window = window_events(members[0])  # one group: every member shares the N and the 0 window
    bounds = event_bounds("instructions", n, view.amd, errata, 0, window)
    idle = {m["rdpmc_index"]: (m["value_n"] - m["value_0"], window_events(m))
            for m in _instruction_members(idle_records or [])}  # fmt: skip
    observed: dict[str, Any] = {"vm_exits": vm_exits, "counts": {},
                                "window_events": {"n": window.n, "zero": window.zero}}  # fmt: skip
    losses: list[str] = []
    others: list[str] = []
    worst = 0.0
    for m in members:
        delta = m["value_n"] - m["value_0"]
        label = f"{m['rdpmc_index']:#x}"
        observed["counts"][label] = delta
        error = (delta - exact) / exact * 100 if exact else 0.0
        worst = error if abs(error) > abs(worst) else worst
        problem = bounds.check(delta)
        if problem and delta < bounds.low and m["running_n"] == m["enabled_n"]:
            losses.append(f"counter {label}: {problem}; {bounds.low - delta:,.0f} counts lost silently "
                          "(time_running == time_enabled)")  # fmt: skip
        elif problem and delta < bounds.low:  # the guest saw itself multiplexed: not a host's silent drop
            others.append(f"counter {label}: {problem}; {bounds.low - delta:,.0f} counts lost with guest-visible "
                          "multiplexing")  # fmt: skip
        elif problem:
            others.append(f"counter {label}: {problem}; overcount by {delta - bounds.high:,.0f} beyond the "
                          "allowance")  # fmt: skip
        elif m["rdpmc_index"] in idle and bounds.low == bounds.high and window.quiet:
            idle_delta, idle_window = idle[m["rdpmc_index"]]
            if idle_window.quiet and idle_delta != delta:
                others.append(f"counter {label}: {delta:,} differs from the idle run's {idle_delta:,} (both runs "
                              "free of interrupts)")  # fmt: skip
    observed["count_error_pct"] = round(worst, 4)
    if bounds.low == bounds.high:
        expected = f"exactly {exact:,} on every counter"
    else:
        expected = f"[{bounds.low:,.0f}, {bounds.high:,.0f}] on every counter ({bounds.source})"
    verdict = contention_skip(contention, losses, others, expected, observed)
    if verdict:
        return verdict
    if losses or others:
        head = "host-induced loss: " if losses else ""
        return failed(head + "; ".join(losses + others), expected, observed)
    held = held_back_note(members[0])
    note = f" (one counter held back: {held})" if held else ""
    how = "exact" if window.quiet or not window.known else f"within the allowance for {window.text()}"
    return passed(f"canary {how} on {len(members)} counters under this load{note}", expected, observed)


def guest_multiplexing(expectation: Expectation, view: GuestView, records: list[Record]) -> Verdict:
    """The guest never uses more events than it has counters, so it must never see itself multiplexed."""
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    measured = [r for r in records if r.get("kind") == "count" and "error" not in r]
    if not measured:
        return failed("no counting measurement under this load", "time_running == time_enabled", None)
    short = [f"{r['event']}@{r['rdpmc_index']:#x} ran {r['running_n'] / r['enabled_n']:.0%}"
             for r in measured if r["enabled_n"] and r["running_n"] < r["enabled_n"]]  # fmt: skip
    observed = {"groups": len({r["event"] for r in measured}), "members": len(measured), "multiplexed": short}
    if short:
        return failed("guest-visible multiplexing without guest over-subscription: " + ", ".join(short[:6]),
                      "time_running == time_enabled", observed)  # fmt: skip
    return passed("no guest-visible multiplexing", "time_running == time_enabled", observed)
