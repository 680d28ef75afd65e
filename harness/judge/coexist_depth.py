"""Co-existence in depth: a host load that exists before KVM creates the VM, the VM-exit cost of host multiplexing,
and host loads bound to one vCPU.

* **Before boot** (loads.toml ``start = "before-boot"``): the profile's guest is shut down, the load starts, and a new
  guest is booted under it (harness/suite/before_boot.py). Under the mediated vPMU KVM creates the VM's mediated PMU
  at the first KVM_CREATE_VCPU (arch/x86/kvm/x86.c kvm_arch_vcpu_precreate() -> kernel/events/core.c
  perf_create_mediated_pmu(), which returns -EBUSY while any include-guest event exists, ``nr_include_guest_events``,
  and KVM logs "Failed to enable mediated vPMU, try disabling system wide perf events and nmi_watchdog."); QEMU then
  exits with "kvm_init_vcpu: kvm_create_vcpu failed (0): Device or resource busy" (accel/kvm/kvm-all.c
  kvm_init_vcpu(); older QEMU said "kvm_get_vcpu failed"). That refusal is coexist.load_before_boot's PASS, not a boot
  ERROR. Under the perf-based vPMU the VM boots and every check of the group runs as usual.
* **Mux cost** (loads.toml ``mux_sweep``): harness/suite/mux_sweep.py measures, harness/judge/mux_curve.py draws the
  curve; :func:`mux_cost` judges: guest counts exact at every setting, the exits/s curve reported, a rise beyond
  mux_curve.FLAG_EXITS_PER_ROTATION flagged.
* **Per-vCPU loads** (``{vcpu_tids[0]}``): :func:`load_reach` says which vCPUs a load reaches; the canary runs on
  each vCPU and :func:`vcpu_canary` judges the reached one and the other separately.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from harness.host import mux_interval
from harness.host.loads import LoadResult, LoadSpec, _option_values
from harness.judge import coexist, mux_curve, plan
from harness.judge.bounds import NO_ERRATA, OvercountErrata
from harness.judge.expectations import Context, Expectation
from harness.judge.verdict import Record, Verdict, errored, failed, gate, passed, skipped
from harness.probe.guest_view import GuestView

LOAD_BEFORE_BOOT_CHECK = "coexist.load_before_boot"
#: QEMU's words when KVM_CREATE_VCPU fails with EBUSY (strerror(EBUSY) = "Device or resource busy"):
#: accel/kvm/kvm-all.c kvm_init_vcpu() error_setg_errno(errp, -ret, "kvm_init_vcpu: kvm_create_vcpu failed (%lu)");
#: older QEMU (before "accel/kvm: Extract common KVM vCPU {creation,parking} code") said "kvm_get_vcpu failed". The
#: vCPU thread reports it through &error_fatal and QEMU exits 1.
#: Matched in any libc's words (glibc "Device or resource busy", musl "Resource busy"; QEMU runs with LC_ALL=C) and in
#: the pre-errp form "kvm_init_vcpu failed: ..." of older QEMU.
VCPU_CREATE_EBUSY = re.compile(r"kvm_init_vcpu(?::| failed:)(?: kvm_(?:create|get)_vcpu failed \(\d+\):)? "
                               r"(?:Device or r|R)esource busy")  # fmt: skip
#: Any failure of QEMU to create a KVM vCPU (another errno than EBUSY included), in the same forms.
VCPU_CREATE_FAILED = re.compile(r"kvm_init_vcpu(?::| failed:)[^\n]*")
#: perf_create_mediated_pmu()'s refusal as the kernel documents it to the administrator (arch/x86/kvm/x86.c).
MEDIATED_REFUSAL = ("KVM_CREATE_VCPU -> kvm_arch_vcpu_precreate -> perf_create_mediated_pmu() returns -EBUSY while an "
                    "include-guest host event exists (kernel/events/core.c nr_include_guest_events; KVM logs \"Failed "
                    "to enable mediated vPMU, try disabling system wide perf events and nmi_watchdog.\")")  # fmt: skip


# --- before boot --------------------------------------------------------------------------------------------------


def vcpu_create_refused(boot_error: str | None) -> bool:
    """Whether a failed boot is KVM refusing the vCPU with EBUSY (QEMU's own words)."""
    return bool(boot_error and VCPU_CREATE_EBUSY.search(boot_error))


def refusal_expected(spec: LoadSpec, holder: coexist.MediatedHolder) -> bool:
    """The VM creation must fail: an include-guest load exists and this VM would hold a mediated PMU."""
    return spec.before_boot and spec.counts_guest and holder.holds


def unbooted_gate(spec: LoadSpec, result: LoadResult, holder: coexist.MediatedHolder) -> tuple[str, bool] | None:
    """For the other checks of a before-boot group whose guest did not boot: (reason, expected). Expected (the
    mediated vPMU's refusal) is a SKIP of every check but the two that judge it; anything else is their ERROR.
    None: the guest booted (or the load is not a before-boot one)."""
    record = result.before_boot
    if not spec.before_boot or not record or record.get("booted") or record.get("load_status") != "running":
        return None
    if refusal_expected(spec, holder) and record.get("vcpu_create_refused"):
        return (f"not-applicable: KVM refused to create the VM under {spec.name}, as the mediated vPMU must "
                f"({LOAD_BEFORE_BOOT_CHECK} judges it)"), True  # fmt: skip
    return f"the guest did not boot under the before-boot load {spec.name}: {record.get('boot_error')}", False


def load_before_boot(spec: LoadSpec, result: LoadResult | None, holder: coexist.MediatedHolder) -> Verdict:
    """A load that exists when KVM creates the VM: under the mediated vPMU an include-guest one makes VM creation fail
    with EBUSY (PASS: the expected outcome); otherwise the guest boots under it (PASS) and the group runs as usual."""
    if spec.idle:
        return skipped(plan.IDLE_LOAD_REASON)
    if not spec.before_boot:
        return skipped(f"not-applicable: {spec.name} starts after the guest boots (loads.toml start = "
                       f"\"{spec.start}\")")  # fmt: skip
    if result is None:
        return skipped("not-applicable: the profile's guest did not run")
    record = result.before_boot
    if not record:
        return errored(f"{spec.name} is a before-boot load but the run recorded no boot under it")
    if record.get("load_status") != "running":
        return skipped(f"host-load: {result.reason or record.get('load_status')}")
    observed = {**record, "mediated_pmu": {"holds": holder.holds, "why": holder.why}}
    order = (f"the load ran {record['load_ready_s']:.2f} s after it was started and before the VM was created "
             f"(boot started at {record['boot_started_s']:.2f} s)")  # fmt: skip
    if record["boot_started_s"] is None or record["load_ready_s"] > record["boot_started_s"]:
        return errored(f"{spec.name}: the guest was booted before the load ran ({record})", observed)
    if record.get("load_alive_after_boot") is False:
        return errored(f"{spec.name} exited before KVM created the VM under it, so VM creation was not tested: "
                       f"{result.reason or 'perf gone'}", observed)  # fmt: skip
    error = record.get("boot_error") or ""
    first = error.strip().splitlines()
    vcpu_failure = VCPU_CREATE_FAILED.search(error)
    if refusal_expected(spec, holder):
        expected = "VM creation refused with EBUSY"
        if record.get("vcpu_create_refused"):
            return passed(f"{holder.why}; {order}; {MEDIATED_REFUSAL}, and QEMU said so: "
                          f"{VCPU_CREATE_EBUSY.search(error).group(0)}", expected, observed)  # type: ignore[union-attr]  # fmt: skip
        if record.get("booted") and not holder.certain:
            return skipped(f"qemu-limit: {holder.why}; yet the VM was created under the include-guest load "
                           f"{spec.name}: this QEMU may pass pmu=off to KVM (KVM_PMU_CAP_DISABLE), which spares the "
                           "VM, so no verdict")  # fmt: skip
        if record.get("booted"):
            return failed(f"{holder.why}, yet KVM created the VM while the include-guest host load {spec.name} "
                          f"existed; {order}; expected: {MEDIATED_REFUSAL}", expected, observed)  # fmt: skip
        if vcpu_failure:
            return failed(f"{holder.why}; KVM refused the vCPU, but not with EBUSY: {vcpu_failure.group(0)}",
                          expected, observed)  # fmt: skip
        return errored(f"the guest did not boot under {spec.name}, and not because KVM refused the vCPU: "
                       f"{first[0] if first else 'no error text'}", observed)  # fmt: skip
    if record.get("booted"):
        launched = record.get("qemu_launched_s")
        when = f"QEMU launched at {launched:.2f} s; " if launched is not None else ""
        return passed(f"the guest booted under a load that existed before the VM ({holder.why}); {when}{order}",
                      "guest boots", observed)  # fmt: skip
    if vcpu_failure:
        return failed(f"KVM refused the vCPU under {spec.name} ({holder.why}, so nothing should refuse it): "
                      f"{vcpu_failure.group(0)}", "guest boots", observed)  # fmt: skip
    return errored(f"the guest did not boot under {spec.name} ({holder.why}), not for a KVM refusal: "
                   f"{first[0] if first else 'no error text'}", observed)  # fmt: skip


# --- per-vCPU loads ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reach:
    """Which vCPUs (indices) a host load reaches, and how, in one phrase."""

    vcpus: frozenset[int]
    how: str


def _cpu_list(text: str) -> set[int] | None:
    """A perf CPU list (``0,2-3``) as a set; None when it is not one (an unfilled placeholder)."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _sep, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            return None
        cpus |= set(range(int(low), int(high or low) + 1))
    return cpus


def load_reach(spec: LoadSpec | None, pinning: dict[str, Any]) -> Reach:
    """The vCPUs a load's counters share a PMU with: ``-a`` and ``{vcpu_tids}``/``{vcpu_cpus}`` reach every vCPU;
    ``{vcpu_tids[i]}`` (a per-task event: it counts only while that thread runs) reaches vCPU i; ``-C`` reaches
    every vCPU pinned to one of those host CPUs (``{vcpu_cpus[i]}`` is vCPU i's). An unpinned vCPU may run on any
    CPU, so a CPU-bound load may reach it. Counters are per logical CPU, so nothing else crosses over."""
    vcpus = {int(v["vcpu"]): v.get("cpu") for v in pinning.get("vcpus", [])}
    every = frozenset(vcpus)
    if spec is None or spec.idle:
        return Reach(frozenset(), "the idle baseline runs no host load")
    command = list(spec.command)
    if "-a" in command or "--all-cpus" in command:
        return Reach(every, "system-wide (-a)")
    if spec.uses_whole("vcpu_tids") or spec.uses_whole("vcpu_cpus"):
        return Reach(every, "every vCPU ({vcpu_tids}/{vcpu_cpus})")
    reached: set[int] = set(spec.indexes("vcpu_tids"))
    for index in spec.indexes("vcpu_cpus"):
        cpu = vcpus.get(index)
        if cpu is None:
            return Reach(every, f"the host CPU of vCPU {index}, which is not pinned (it may run anywhere)")
        reached |= {v for v, c in vcpus.items() if c == cpu}
    for text in _option_values(command, "-C", "--cpu"):
        cpus = _cpu_list(text)
        if cpus is None:
            continue  # a {vcpu_cpus[i]} placeholder, handled above
        if any(c is None for c in vcpus.values()):
            return Reach(every, f"host CPUs {text}, and some vCPU is not pinned")
        reached |= {v for v, c in vcpus.items() if c in cpus}
    names = ", ".join(str(v) for v in sorted(reached)) or "none"
    return Reach(frozenset(reached), f"vCPU {names} (per-vCPU targets of {spec.name})")


def two_vcpus_gate(ctx: Context) -> Verdict | None:
    """The verdict side of the ``two_vcpus`` pre-gate (harness.judge.plan): the same reason, word for word."""
    found = plan.expectation("two_vcpus", ctx)
    return None if found.available else skipped(found.reason)


def vcpu_gate(ctx: Context, expectation: Expectation, view: GuestView) -> Verdict | None:
    """The per-vCPU canary's SKIPs before it measures, in its pre-gate's order (pmu, then two_vcpus)."""
    return gate(expectation, view.cpuid_pmu, "enumerates no PMU") or two_vcpus_gate(ctx)


def vcpu_probe_key(vcpu: int) -> str:
    """The counters probe's memo key on guest CPU ``vcpu``: vCPU 0's run is the one the arch checks use."""
    return "counters" if vcpu == 0 else f"counters@cpu{vcpu}"


def pin_error(records: list[Record], cpu: int) -> str | None:
    """Why the probe did not run on guest CPU ``cpu`` (its ``pin`` record: sched_setaffinity failed), or None."""
    for record in records:
        if record.get("kind") == "pin" and "error" in record:
            return (f"the probe could not pin itself to guest CPU {cpu} ({record['error']}: "
                    f"{record.get('strerror', record.get('errno'))}), so its counts are another CPU's")  # fmt: skip
    return None


def vcpu_canary(
    vcpu: int,
    ctx: Context,
    expectation: Expectation,
    view: GuestView,
    records: list[Record],
    idle_records: list[Record] | None,
    spec: LoadSpec | None,
    load: LoadResult | None,
    pinning: dict[str, Any],
    errata: OvercountErrata | bool = NO_ERRATA,
) -> Verdict:
    """The exact-count canary on guest CPU ``vcpu``, judged by its role: on a vCPU the load reaches, a loss under a
    load that competes for counters under the perf-based vPMU is that vPMU's documented behaviour (SKIP, as
    coexist.canary); on a vCPU it does not reach, any loss is the load disturbing another vCPU (FAIL)."""
    verdict = vcpu_gate(ctx, expectation, view)
    if verdict:
        return verdict
    if vcpu not in {int(v["vcpu"]) for v in pinning.get("vcpus", [])}:
        return errored(f"QEMU reported no vCPU {vcpu} (query-cpus-fast: {len(pinning.get('vcpus', []))} vCPUs) "
                       f"although profile {ctx.profile.name} asks for {ctx.profile.smp}")  # fmt: skip
    problem = pin_error(records, vcpu)
    if problem:
        return errored(problem)
    reach = load_reach(spec, pinning)
    reached = vcpu in reach.vcpus
    contention = coexist.perf_based_contention(spec, ctx.host.get("vpmu_mode")) if reached else None
    verdict = coexist.canary(expectation, view, records, idle_records, load, {}, errata, contention)
    role = f"reached by the load: {reach.how}" if reached else f"not reached by the load ({reach.how})"
    head = f"vCPU {vcpu}, {role}: "
    if verdict.status == "fail" and not reached and spec is not None and not spec.idle:
        head = f"vCPU {vcpu}, {role}, yet the load disturbed it: "
    observed = {**verdict.observed, "vcpu": vcpu, "reached": reached} if isinstance(verdict.observed, dict) else \
        verdict.observed  # fmt: skip
    if verdict.status == "skip" and not verdict.reason.startswith("host-load: "):
        return verdict  # a gate's reason stays word for word (the plan's)
    return replace(verdict, reason=head + verdict.reason, observed=observed)


# --- mux cost -----------------------------------------------------------------------------------------------------


def mux_cost_gate(spec: LoadSpec, expectation: Expectation, view: GuestView, host: dict[str, Any]) -> Verdict | None:
    """The SKIPs decided before anything is measured, in the pre-gate's order (host_load, then pmu)."""
    if spec.idle:
        return skipped(plan.IDLE_LOAD_REASON)
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    if not spec.mux_sweep:
        return skipped(f"not-applicable: {spec.name} sweeps no perf_event_mux_interval_ms (no mux_sweep in "
                       "loads.toml)")  # fmt: skip
    mux = (host.get("sysctls") or {}).get("perf_event_mux_interval_ms")
    if mux == {}:
        return skipped(f"host: no core PMU {mux_interval.MUX_FILE} (doctor found no cpu/cpu_core/cpu_atom PMU in "
                       "/sys/bus/event_source/devices)")  # fmt: skip
    return None


def mux_cost(
    spec: LoadSpec,
    expectation: Expectation,
    view: GuestView,
    sweep: dict[str, Any],
    canaries: dict[int, list[Record]],
    idle_records: list[Record] | None,
    load: LoadResult | None,
    errata: OvercountErrata | bool = NO_ERRATA,
    contention: str | None = None,
) -> Verdict:
    """Guest counts exact at every perf_event_mux_interval_ms setting; the exits/s curve is reported (observed
    ``points``) and a least-squares rise above mux_curve.FLAG_EXITS_PER_ROTATION exits per rotation is flagged in the
    reason. ``canaries``: the canary probe's records per setting (ms); ``contention``: as coexist.canary (a pinned
    load under the perf-based vPMU).

    The canaries are judged before anything that would SKIP the curve (no KVM statistics, no rotation): a loss
    measured at some setting is a FAIL whether or not the exits could be read."""
    if sweep.get("unavailable"):
        return skipped(sweep["unavailable"])
    restore = sweep.get("restore")
    if restore and not restore.get("restored"):
        lost = [e.get("error", f"{pmu} not restored") for pmu, e in restore["pmus"].items() if not e["restored"]]
        why = "; ".join(lost)
        return errored(f"{mux_interval.MUX_FILE} could not be put back: {why}", sweep)
    if sweep.get("error"):
        return errored(sweep["error"], sweep)
    broken = [p for p in sweep.get("points", []) if p.get("error")]
    if broken:
        return errored(f"canary at {broken[0]['interval_ms']} ms: {broken[0]['error']}", sweep)
    rows = mux_curve.curve(sweep)
    if not rows:
        return errored("the sweep measured no setting", sweep)
    problems, skips = [], []
    worst = 0.0
    for row in rows:
        verdict = coexist.canary(expectation, view, canaries.get(row["interval_ms"], []), idle_records, load, {},
                                 errata, contention)  # fmt: skip
        error = (verdict.observed or {}).get("count_error_pct") if isinstance(verdict.observed, dict) else None
        row["count_error_pct"] = error
        row["canary"] = verdict.status
        worst = error if error is not None and abs(error) > abs(worst) else worst
        if verdict.status in ("fail", "error"):
            problems.append(f"{row['interval_ms']} ms: {verdict.reason}")
        elif verdict.status == "skip":
            skips.append(f"{row['interval_ms']} ms: {verdict.reason}")
    expected = "exact guest counts at every setting"
    if problems:
        return failed("guest counts not exact under host multiplexing at " + "; ".join(problems), expected,
                      {"points": rows, "count_error_pct": round(worst, 4), "restore": restore})  # fmt: skip
    if skips:  # the perf-based vPMU's documented loss under a competing load: coexist.canary's SKIP, per setting
        return skipped("; ".join(skips))
    shares = [row["host_running_pct"] for row in rows if row.get("host_running_pct") is not None]
    if shares and min(shares) >= 100.0:
        return skipped(f"host-load: {spec.name} did not multiplex on the vCPU's CPU (running share 100 % at every "
                       "setting): there was no rotation to measure (guest counts exact at every setting)")  # fmt: skip
    settings = ", ".join(str(row["interval_ms"]) for row in rows)
    if all(row.get("exits_per_s") is None for row in rows):
        return passed(f"guest counts exact at every setting ({settings} ms); exits curve unavailable: QMP "
                      "query-stats gave no KVM 'exits' statistic for vCPU 0 (KVM statistics need QEMU >= 7.1 and "
                      "Linux >= 5.14)", expected, {"points": rows, "count_error_pct": round(worst, 4),
                                                   "restore": restore})  # fmt: skip
    rise = mux_curve.slope(rows)
    flagged = rise is not None and rise > mux_curve.FLAG_EXITS_PER_ROTATION
    if rise is None:
        flag = "no slope (fewer than two settings with KVM statistics)"
    elif flagged:
        flag = f"FLAGGED: exits/s rise by {rise:.2f} per rotation/s, above {mux_curve.FLAG_EXITS_PER_ROTATION}"
    else:
        flag = f"{rise:.2f} exits per rotation/s (flagged above {mux_curve.FLAG_EXITS_PER_ROTATION})"
    curve_text = ", ".join(f"{row['interval_ms']} ms {row['exits_per_s']:,.0f}" for row in rows
                           if row.get("exits_per_s") is not None)  # fmt: skip
    share = f"; host load running share {min(shares):.0f}-{max(shares):.0f} %" if shares else ""
    observed = {"points": rows, "slope_exits_per_rotation": round(rise, 3) if rise is not None else None,
                "threshold": mux_curve.FLAG_EXITS_PER_ROTATION, "flagged": flagged, "count_error_pct": round(worst, 4),
                "vm_exits": {"per_s": rows[0].get("exits_per_s")}, "restore": restore,
                "schemas": sweep.get("schemas")}  # fmt: skip
    return passed(f"guest counts exact at every setting ({settings} ms); vCPU 0 exits/s: {curve_text}; {flag}{share}",
                  expected, observed)  # fmt: skip
