"""Verdicts for topdown, LBR, PEBS and AMD IBS: pure functions over the guest view and probe records.

Each rule cites its source. Today's upstream KVM gives most hosts none of these features, so the measurement
checks mostly SKIP with the expectation engine's reason; the enumeration checks still hold a guest to what it
may show ("expected absent" is checked, not assumed).
"""

from __future__ import annotations

import errno as errno_mod
import re
import signal
from typing import TYPE_CHECKING, Any

from harness.branch_map import BranchMap
from harness.expectations import Expectation
from harness.guest_view import GuestView
from harness.verdicts import Record, Verdict, errored, failed, first_record, gate, passed, skipped

if TYPE_CHECKING:
    from harness.loads import LoadSpec

USER_SPACE_END = 1 << 47  # x86-64 canonical user half (4-level paging): user addresses are below 0x8000_0000_0000
TOPDOWN_SUM_TOLERANCE = 0.02  # probe-reference.md §2c: |sum of level-1 metrics - slots| <= 2 % of slots
MAJORITY = 0.5  # retiring(ALU) > 50 %, backend(chase) > 50 % (§2c: relative assertions, not tight thresholds)
#: TOPDOWN.SLOTS per unhalted cycle of one logical processor = the core's "machine-width of the narrowest pipeline"
#: (TOPDOWN.SLOTS description, tools/perf/pmu-events/arch/x86/*/pipeline.json). Widths as the TMA models state
#: them (pmu-tools Pipeline_Width: icl_client_ratios.py 5, spr_server_ratios.py 6, gnr_server_ratios.py 6,
#: lnl_lnc_ratios.py 8). Fixed counter 3 and PERF_METRICS exist from Ice Lake on (tools/perf/Documentation/
#: topdown.txt), so 4-wide Skylake never reaches this check. Models: arch/x86/include/asm/intel-family.h.
TOPDOWN_WIDTHS = {
    0x6A: 5, 0x6C: 5, 0x7D: 5, 0x7E: 5, 0x8C: 5, 0x8D: 5, 0xA7: 5,  # Sunny/Willow/Cypress Cove: ICX, ICL, TGL, RKL
    0x8F: 6, 0xCF: 6, 0x97: 6, 0x9A: 6, 0xB7: 6, 0xBA: 6, 0xBF: 6, 0xD7: 6,  # Golden/Raptor Cove: SPR, EMR, ADL, RPL
    0xAD: 6, 0xAE: 6, 0xAA: 6, 0xAC: 6,  # Redwood Cove: GNR, MTL
    0xBD: 8, 0xC5: 8, 0xC6: 8, 0xB5: 8,  # Lion Cove: LNL, ARL
}  # fmt: skip
TOPDOWN_WIDTH_TOLERANCE = 0.05  # slots and cycles are two events with slightly different enable windows


def _errno_name(record: Record) -> str:
    return errno_mod.errorcode.get(record.get("errno", 0), str(record.get("errno")))


# --- the guest kernel's own words (review F3) ------------------------------------------------------------------
#: A CPU model the guest kernel's Intel perf driver does not know falls into the "default:" case of
#: arch/x86/events/intel/core.c intel_pmu_init(), which prints "generic architected perfmon" in the boot banner and
#: names the PMU "generic_arch_v1", "generic_arch_v2+" or "generic_arch_v5+" (sysfs cpu/caps/pmu_name). Only the
#: model cases set up legacy LBR (intel_pmu_lbr_init_*()), the topdown events (td_attr) and a PEBS constraint table
#: (x86_pmu.pebs_constraints), so such a kernel uses none of them whatever CPUID and PERF_CAPABILITIES say.
GENERIC_PMU_PREFIX = "generic_arch"
GENERIC_BANNER = "generic architected perfmon"
#: arch/x86/events/intel/ds.c intel_ds_init(): a PEBS format the kernel has no case for prints "no PEBS fmt%d%c, "
#: and sets x86_pmu.pebs = 0 (so cpu/caps/max_precise is 0). Format 6 got its case only in 2024 (the hunk context
#: of tip commit e02e9b0374c3 "perf/x86/intel: Support PEBS counters snapshotting" already has `case 6:`); 6.1 has
#: `case 5: ... fallthrough; case 4:` only, and a Lunar Lake host on such a kernel prints "no PEBS fmt6+, "
#: (intel/pcm issue #895).
UNKNOWN_PEBS_FORMAT = re.compile(r"no PEBS fmt\d+[+-]?")


def guest_kernel_release(run: Any) -> str | None:
    """The guest kernel release of a run: the image's (live ProfileRun), or as results.json stored it (rejudge)."""
    image = getattr(run, "image", None)
    if image is not None:
        return getattr(image, "kernel_release", None)
    summary = run.summary() if hasattr(run, "summary") else None
    return (summary or {}).get("kernel_release")


def guest_kernel_words(view: GuestView, release: str | None) -> str:
    """How the guest kernel describes its PMU: its release, cpu/caps/pmu_name and "Performance Events:" line."""
    pmu_name = view.sysfs.get("cpu/caps/pmu_name")
    return (f"guest kernel {release or '(release not recorded)'}, cpu/caps/pmu_name={pmu_name or '(absent)'}, "
            f"boot banner {view.kernel_banner or '(none)'!r}")  # fmt: skip


def kernel_knows_model(view: GuestView) -> bool | None:
    """Whether the guest kernel's perf driver has a case for this CPU model (see GENERIC_PMU_PREFIX); None when
    neither cpu/caps/pmu_name nor the banner says."""
    pmu_name = view.sysfs.get("cpu/caps/pmu_name")
    if pmu_name:
        return not pmu_name.startswith(GENERIC_PMU_PREFIX)
    if GENERIC_BANNER in view.kernel_banner:
        return False
    return None


def guest_kernel_skip(feature: str, enumerated: str, evidence: str, view: GuestView, release: str | None) -> Verdict:
    """SKIP for a feature that CPUID / PERF_CAPABILITIES enumerate (so KVM and QEMU kept their promise) but the guest
    kernel does not use: a newer guest kernel (--kernel) is the remedy, not a host or KVM change."""
    return skipped(f"guest-kernel: {enumerated}, but the guest kernel does not use {feature}: {evidence} "
                   f"({guest_kernel_words(view, release)}); boot a guest kernel that knows this CPU (--kernel)",
                   feature, {"pmu_name": view.sysfs.get("cpu/caps/pmu_name"), "banner": view.kernel_banner,
                             "kernel_release": release})  # fmt: skip


def pebs_competing_load(load: LoadSpec | None) -> str | None:
    """The host load's core-PMU events, if it has any, for the PEBS checks: they occupy host counters on the vCPU's
    CPUs, so the x86 scheduler may give KVM's backing event another counter index than the guest's (KVM marks it in
    host_cross_mapped_mask), and a host PEBS user switches guest PEBS off outright (arch/x86/events/intel/core.c
    intel_guest_get_msrs(): "Disable guest PEBS if host PEBS is enabled" and "Disable guest PEBS thoroughly for
    cross-mapped PEBS counters", which also clears the counter's GLOBAL_CTRL bit). Broader than
    harness.coexist.competing_load (pinned loads only), which is about counts lost to counter starvation: here any
    reassignment of counters matters, flexible events included [inferred from the scheduler; a real host run should
    confirm]. None for idle and software-only loads, which leave the PMU alone."""
    if load is None or load.idle:
        return None
    core = [event.text for event in load.event_list() if event.kind == "core"]
    return f"{load.name} ({', '.join(core)})" if core else None


def throttles(record: Record) -> int:
    """PERF_RECORD_THROTTLE records a sampler counted (the shared walker's "throttled", or its older "throttle")."""
    return int(record.get("throttled", record.get("throttle", 0)) or 0)


def throttle_skip(record: Record, records: list[Record]) -> Verdict | None:
    """SKIP when the guest kernel throttled the sampling event: its count and sample IPs no longer say anything
    about the vPMU (team contract: throttling is reported as such, never as a lost-sample FAIL)."""
    n = throttles(record)
    if not n:
        return None
    setup = first_record(records, "sampling_setup") or {}
    return skipped(f"guest kernel throttled sampling: {n} PERF_RECORD_THROTTLE record(s) (kernel/events/core.c "
                   "__perf_event_account_interrupt: more PMIs in one tick than max_samples_per_tick); the probe "
                   f"had set kernel.perf_cpu_time_max_percent={setup.get('perf_cpu_time_max_percent')}, "
                   f"perf_event_max_sample_rate={setup.get('perf_event_max_sample_rate')}",
                   "no throttling", {"throttled": n, "samples": record.get("samples")})  # fmt: skip


def _absent_or_present(feature: str, expectation: Expectation, shown: bool, detail: dict[str, Any]) -> Verdict:
    """The enumeration rule shared by every feature: the guest shows the feature exactly when it is expected."""
    if expectation.available:
        if shown:
            return passed(f"guest enumerates {feature}, as expected", True, detail)
        return failed(f"{feature} is promised (host, KVM and profile provide it) but the guest does not enumerate it",
                      True, detail)  # fmt: skip
    if shown:
        return failed(f"guest enumerates {feature} although it is not expected ({expectation.reason})", False, detail)
    return passed(f"{feature} absent, as expected ({expectation.reason})", False, detail)


# --- topdown ------------------------------------------------------------------------------------------------


def _perf_caps(view: GuestView) -> dict[str, Any]:
    return view.perf_capabilities() or {}


#: The guest kernel's own topdown event: present only when its perf driver has topdown for this CPU model
#: (core.c intel_pmu_init() sets x86_pmu.num_topdown_events and td_attr in the model cases) and PERF_METRICS is
#: enumerated (td_is_visible() hides the metric events otherwise).
TOPDOWN_SYSFS = "cpu/events/topdown-retiring"


def topdown_enumerated(view: GuestView) -> bool:
    """Fixed counter 3 (CPUID.0AH) and PERF_METRICS (PERF_CAPABILITIES[15]) both: what topdown needs. FC3 alone is
    possible (the mediated vPMU may expose more fixed counters, kvm_init_pmu_capability()) and is not topdown."""
    perfmon = view.caps.arch_perfmon
    return bool(perfmon and perfmon.fixed_counter_mask & 0b1000) and bool(_perf_caps(view).get("perf_metrics"))


def topdown_usable(view: GuestView) -> bool:
    """CPUID/PERF_CAPABILITIES show topdown and the guest kernel registered its topdown events."""
    return topdown_enumerated(view) and TOPDOWN_SYSFS in view.sysfs


def topdown_enumeration(expectation: Expectation, view: GuestView) -> Verdict:
    """Fixed counter 3 and PERF_CAPABILITIES[15] together (a vPMU must not expose PERF_METRICS without FC3)."""
    perfmon = view.caps.arch_perfmon
    fc3 = bool(perfmon and perfmon.fixed_counter_mask & 0b1000)
    metrics = bool(_perf_caps(view).get("perf_metrics"))
    detail = {"fixed_counter_3": fc3, "perf_metrics": metrics, "sysfs_slots": view.sysfs.get("cpu/events/slots"),
              "sysfs_topdown": TOPDOWN_SYSFS in view.sysfs}  # fmt: skip
    if metrics and not fc3:
        return failed("PERF_CAPABILITIES[15] (PERF_METRICS) without fixed counter 3 (SDM: metrics need FC3)",
                      "both or neither", detail)  # fmt: skip
    return _absent_or_present("topdown (FC3 + PERF_METRICS)", expectation, topdown_enumerated(view), detail)


def _topdown_records(
    expectation: Expectation, view: GuestView, records: list[Record], release: str | None = None
) -> Verdict | list[Record]:
    """The topdown records once the feature is expected, enumerated and used by the guest kernel (else the verdict).

    A guest kernel without topdown for the CPU model (no cpu/events/topdown-*) has none of the model's topdown
    plumbing either (core.c intel_pmu_init(): num_topdown_events, the metric event constraints and the topdown
    update hook are set only in the model cases), so whatever the probe's raw metric events would return is not
    PERF_METRICS: the measurement is not judged (SKIP with the kernel's own words, review F3)."""
    verdict = gate(expectation, topdown_enumerated(view), "does not enumerate FC3 + PERF_METRICS")
    if verdict:
        return verdict
    if TOPDOWN_SYSFS not in view.sysfs:
        return guest_kernel_skip("topdown", "CPUID.0AH and PERF_CAPABILITIES[15] enumerate fixed counter 3 and "
                                 "PERF_METRICS", f"it registered no {TOPDOWN_SYSFS} (its perf driver has no topdown "
                                 "for this CPU model: core.c intel_pmu_init())", view, release)  # fmt: skip
    found = [r for r in records if r.get("kind") == "topdown"]
    if not found:
        return errored("topdown probe produced no records")
    broken = [r for r in found if "error" in r]
    if broken:
        r = broken[0]
        return failed(f"topdown group ({r.get('event', 'read')}) failed: {_errno_name(r)}", "counts", r.get("strerror"))
    return found


METRIC_NAMES = ("retiring", "bad_spec", "fe_bound", "be_bound")


def topdown_metrics(
    expectation: Expectation, view: GuestView, records: list[Record], release: str | None = None
) -> Verdict:
    """Each level-1 metric is a fraction in [0, 1] of slots and the four sum to slots within 2 %."""
    found = _topdown_records(expectation, view, records, release)
    if isinstance(found, Verdict):
        return found
    problems, observed = [], {}
    for r in found:
        slots = r["slots"]
        if not slots:
            problems.append(f"{r['workload']}: slots counted 0")
            continue
        fractions = {m: r[m] / slots for m in METRIC_NAMES}
        observed[r["workload"]] = {m: round(f, 4) for m, f in fractions.items()}
        if any(not 0 <= f <= 1 for f in fractions.values()):
            problems.append(f"{r['workload']}: a metric fraction is outside [0, 1]: {observed[r['workload']]}")
        total = sum(r[m] for m in METRIC_NAMES)
        if abs(total - slots) > TOPDOWN_SUM_TOLERANCE * slots:
            problems.append(f"{r['workload']}: metrics sum to {total:,} vs slots {slots:,} (> 2 %)")
    if problems:
        return failed("; ".join(problems), "fractions in [0,1], sum = slots +/- 2 %", observed)
    return passed("level-1 metrics are fractions of slots that add up", "sum = slots +/- 2 %", observed)


def topdown_machine_width(view: GuestView, host: dict[str, Any] | None) -> tuple[int | None, str]:
    """The pipeline width of the physical core: the host's CPU model first (the guest may run a named CPU model
    whose width is not the hardware's), else the guest's; None when neither model is in TOPDOWN_WIDTHS."""
    host_caps = ((host or {}).get("cpu") or {}).get("caps") or {}
    candidates = (("host", host_caps.get("vendor"), host_caps.get("family"), host_caps.get("model")),
                  ("guest", view.caps.vendor, view.caps.family, view.caps.model))  # fmt: skip
    for source, vendor, family, model in candidates:
        if vendor == "GenuineIntel" and family == 6 and model in TOPDOWN_WIDTHS:
            return TOPDOWN_WIDTHS[model], f"{source} CPU model 06_{model:02X}H"
    known = [f"{source} 06_{model:02X}H" for source, vendor, family, model in candidates
             if vendor == "GenuineIntel" and isinstance(model, int)]  # fmt: skip
    return None, f"pipeline width unknown for {', '.join(known) or 'this CPU'}"


def _cpu_list(text: str | None) -> list[int]:
    """Parse a sysfs CPU list such as "0-1,4" (Documentation/admin-guide/cputopology.rst)."""
    cpus: list[int] = []
    for part in (text or "").split(","):
        part = part.strip()
        if "-" in part:
            low, high = part.split("-", 1)
            if low.isdigit() and high.isdigit():
                cpus.extend(range(int(low), int(high) + 1))
        elif part.isdigit():
            cpus.append(int(part))
    return cpus


def smt_state(records: list[Record], host: dict[str, Any] | None) -> dict[str, Any]:
    """What is knowable about SMT sharing of the probe's core.

    The guest knows its own topology (the topdown probe's topology record: thread_siblings_list of its CPU). That
    says nothing about the physical core: which host threads share the core a vCPU thread runs on is decided by the
    host scheduler and pinning, invisible from inside (Sean Christopherson on kvm@, 2023-09-27, "Re: [Patch v4 07/13]
    perf/x86: Add constraint for guest perf metrics event": topdown slots need vCPUs pinned 1:1 to pCPUs and an
    accurate topology). The host side is known only if the host facts carry cpu.smt_active (sysfs
    /sys/devices/system/cpu/smt/active); absent means unknown.
    """
    topology = first_record(records, "topology")
    siblings = topology.get("thread_siblings") if topology else None
    host_smt = ((host or {}).get("cpu") or {}).get("smt_active")
    return {"guest_thread_siblings": siblings, "guest_smt_sibling": len(_cpu_list(siblings)) > 1 if siblings else None,
            "host_smt_active": host_smt if isinstance(host_smt, bool) else None}  # fmt: skip


def topdown_width(
    expectation: Expectation,
    view: GuestView,
    records: list[Record],
    host: dict[str, Any] | None = None,
    release: str | None = None,
) -> Verdict:
    """slots / cycles over the same window is the core's pipeline width W, or less while an SMT sibling runs.

    TOPDOWN.SLOTS "is distributed among unhalted logical processors (hyper-threads) who share the same physical
    core" (its event description), so with the sibling busy a thread sees about W/2 slots per cycle; it never sees
    more than W. Hence: above W -> FAIL; W within 5 % -> PASS; between W/2 and W -> SKIP unless the host is known to
    run without SMT (then FAIL), because a busy sibling on the host core explains it and the guest cannot tell.
    """
    found = _topdown_records(expectation, view, records, release)
    if isinstance(found, Verdict):
        return found
    r = next((x for x in found if x["workload"] == "alu"), None)
    if r is None or not r.get("cycles"):
        return errored("no ALU-workload cycles count in the topdown records")
    ratio = r["slots"] / r["cycles"]
    width, source = topdown_machine_width(view, host)
    smt = smt_state(records, host)
    observed = {"slots_per_cycle": round(ratio, 3), "width": width, "width_source": source, **smt}
    tol = TOPDOWN_WIDTH_TOLERANCE
    if width is None:
        low, high = min(TOPDOWN_WIDTHS.values()) / 2 * (1 - tol), max(TOPDOWN_WIDTHS.values()) * (1 + tol)
        expected = f"[{low:.2f}, {high:.2f}] (any known width, SMT-diluted; {source})"
        if not low <= ratio <= high:
            return failed(f"slots/cycles = {ratio:.2f}, outside every known pipeline width", expected, observed)
        return passed(f"slots/cycles = {ratio:.2f}; only the loose bound is checked ({source})", expected, observed)
    expected = f"{width} slots per cycle +/- {tol:.0%} ({source}), down to {width}/2 with a busy SMT sibling"
    if ratio > width * (1 + tol):
        return failed(f"slots/cycles = {ratio:.2f} exceeds the core's width {width} (an SMT sibling can only lower it)",
                      expected, observed)  # fmt: skip
    if ratio >= width * (1 - tol):
        return passed(f"slots/cycles = {ratio:.2f} = pipeline width {width}", expected, observed)
    if ratio >= width / 2 * (1 - tol):
        if smt["host_smt_active"] is False:
            return failed(f"slots/cycles = {ratio:.2f} < width {width} although the host runs without SMT "
                          "(no sibling can share the core)", expected, observed)  # fmt: skip
        return skipped(f"host: slots/cycles = {ratio:.2f} lies between {width}/2 and {width}: TOPDOWN.SLOTS is shared "
                       "among the SMT threads of a core, and whether the vCPU's host core had a busy sibling is "
                       f"unknown (host SMT active: {smt['host_smt_active']}; guest siblings of the probe's CPU: "
                       f"{smt['guest_thread_siblings']!r}); pin the vCPU to a core with an idle sibling or disable "
                       "host SMT to judge", expected, observed)  # fmt: skip
    return failed(f"slots/cycles = {ratio:.2f}, below half the pipeline width {width}", expected, observed)


def topdown_workloads(
    expectation: Expectation, view: GuestView, records: list[Record], release: str | None = None
) -> Verdict:
    """A cache-resident ALU loop is mostly retiring; a pointer chase over 64 MiB is mostly backend bound."""
    found = _topdown_records(expectation, view, records, release)
    if isinstance(found, Verdict):
        return found
    by = {r["workload"]: r for r in found}
    if "alu" not in by or "chase" not in by:
        return errored("topdown probe lacks the alu or chase workload")
    retiring = by["alu"]["retiring"] / max(by["alu"]["slots"], 1)
    backend = by["chase"]["be_bound"] / max(by["chase"]["slots"], 1)
    observed = {"alu_retiring": round(retiring, 3), "chase_backend": round(backend, 3)}
    problems = []
    if retiring <= MAJORITY:
        problems.append(f"ALU loop retiring {retiring:.0%} (want > 50 %)")
    if backend <= MAJORITY:
        problems.append(f"pointer chase backend bound {backend:.0%} (want > 50 %)")
    if problems:
        return failed("; ".join(problems), "retiring(ALU) > 50 %, backend(chase) > 50 %", observed)
    return passed("ALU loop mostly retiring, pointer chase mostly backend bound", "> 50 % each", observed)


def topdown_rdpmc(
    expectation: Expectation, view: GuestView, records: list[Record], release: str | None = None
) -> Verdict:
    """RDPMC(1<<29) returns the metric bytes (bytes 0-3 sum to 0xff +/- 3) when the kernel allows it.

    A #GP (SIGSEGV) has two causes, told apart by the control read the probe makes first in the same task: RDPMC of
    fixed counter 3 (ECX = 1<<30 | 3, the group's slots counter).
    - Both fault: the task has no user RDPMC at all. KVM's kvm_pmu_rdpmc() (arch/x86/kvm/pmu.c) injects #GP for
      CPL > 0 while the guest's CR4.PCE is clear, and the guest kernel sets CR4.PCE only for an mm with a mapped
      event that has PERF_EVENT_FLAG_USER_READ_CNT (arch/x86/events/core.c x86_pmu_event_mapped(); the flag needs
      sysfs cpu/rdpmc != 0 and is what the mmap page's cap_user_rdpmc reports). With cap_user_rdpmc=0 or
      cpu/rdpmc=0 that is the guest kernel's choice (not-allowed); with cap_user_rdpmc=1 RDPMC of an enumerated
      fixed counter must work, so the vPMU is at fault (FAIL).
    - Only the metrics read faults: the PERF_METRICS index itself is refused (KVM's RDPMC emulation decodes only GP
      and fixed counter indices) -> kvm-limit.
    Records from before the control read (no rdpmc_fixed3_signal) keep the old kvm-limit reading, saying so."""
    found = _topdown_records(expectation, view, records, release)
    if isinstance(found, Verdict):
        return found
    r = found[0]
    sig, control, cap = r["rdpmc_metrics_signal"], r.get("rdpmc_fixed3_signal"), r.get("rdpmc_cap_user")
    sysfs_rdpmc = view.sysfs.get("cpu/rdpmc")
    observed = {"rdpmc_metrics_signal": sig, "rdpmc_fixed3_signal": control, "cap_user_rdpmc": cap,
                "cpu/rdpmc": sysfs_rdpmc, "rdpmc_metrics": hex(r.get("rdpmc_metrics", 0))}  # fmt: skip
    if sig == -1:
        return errored("the slots event's user page could not be mapped, so RDPMC was not tried", observed)
    if sig == signal.SIGSEGV and control == signal.SIGSEGV:
        if cap == 0 or sysfs_rdpmc == "0":
            return skipped(f"not-allowed: the guest kernel gave this task no user RDPMC (cap_user_rdpmc={cap}, "
                           f"cpu/rdpmc={sysfs_rdpmc}): RDPMC of fixed counter 3 #GPs as well, so CR4.PCE is clear "
                           "(arch/x86/events/core.c x86_pmu_event_mapped())", "RDPMC allowed", observed)  # fmt: skip
        return failed(f"RDPMC of fixed counter 3 (ECX=0x40000003) #GPs although the guest kernel enabled user RDPMC "
                      f"(cap_user_rdpmc={cap}, cpu/rdpmc={sysfs_rdpmc}): CR4.PCE is set and FC3 is enumerated, so "
                      "KVM must return it (arch/x86/kvm/pmu.c kvm_pmu_rdpmc())", "FC3 readable", observed)  # fmt: skip
    if sig == signal.SIGSEGV:
        control_text = {0: "RDPMC of fixed counter 3 in the same task worked, so the PERF_METRICS index itself is "
                           "refused", None: "no control read in this record"}.get(
            control, f"the control read of fixed counter 3 got signal {control}")  # fmt: skip
        return skipped("kvm-limit: RDPMC of PERF_METRICS (ECX bit 29) #GPs here: KVM's RDPMC emulation decodes only "
                       f"GP and fixed counters unless RDPMC is passed through ({control_text})", "0xff",
                       observed)  # fmt: skip
    if sig != 0:
        return skipped(f"not-allowed: the guest kernel gave this task no RDPMC (signal {sig})", "0xff", observed)
    raw = r["rdpmc_metrics"]
    total = sum((raw >> (8 * i)) & 0xFF for i in range(4))
    if abs(total - 0xFF) > 3:
        return failed(f"PERF_METRICS bytes 0-3 sum to {total:#x}, want 0xff +/- 3", "0xff", hex(raw))
    return passed("PERF_METRICS via RDPMC: bytes 0-3 sum to 0xff", "0xff +/- 3", hex(raw))


# --- LBR ----------------------------------------------------------------------------------------------------


def lbr_depth(view: GuestView) -> int:
    text = view.sysfs.get("cpu/caps/branches", "0")
    return int(text) if text.isdigit() else 0


def _legacy_lbr_unused(view: GuestView, release: str | None) -> Verdict | None:
    """SKIP when PERF_CAPABILITIES shows a legacy LBR format but the guest kernel set up no LBR because it does not
    know the CPU model (legacy LBR is initialised only in the model cases of core.c intel_pmu_init(), see
    GENERIC_PMU_PREFIX). None otherwise: a kernel that knows the model drops LBR only when its boot-time MSR probe
    fails (intel_pmu_init(): check_msr() on LBR_TOS/FROM/TO sets lbr_nr = 0), which the vPMU answers for."""
    fmt = int(_perf_caps(view).get("lbr_format") or 0)
    if not fmt or view.caps.arch_lbr is not None or lbr_depth(view) or kernel_knows_model(view) is not False:
        return None
    return guest_kernel_skip("legacy LBR", f"PERF_CAPABILITIES[5:0] shows LBR format {fmt}", "it does not know this "
                             "CPU model, so it set up no LBR (no cpu/caps/branches)", view, release)  # fmt: skip


def legacy_lbr_enumeration(expectation: Expectation, view: GuestView, release: str | None = None) -> Verdict:
    """Legacy LBR: PERF_CAPABILITIES[5:0] non-zero and the guest kernel's LBR depth (cpu/caps/branches)."""
    fmt = int(_perf_caps(view).get("lbr_format") or 0)
    shown = fmt != 0 and view.caps.arch_lbr is None
    detail = {"lbr_format": fmt, "depth": lbr_depth(view), "pmu_name": view.sysfs.get("cpu/caps/pmu_name")}
    if shown and expectation.available and not lbr_depth(view):
        unused = _legacy_lbr_unused(view, release)
        if unused:
            return unused
        return failed(f"LBR format {fmt} enumerated but the guest kernel registered no LBR depth although it knows "
                      f"the CPU model ({guest_kernel_words(view, release)}): its boot-time LBR MSR probe failed "
                      "(core.c intel_pmu_init() check_msr())", True, detail)  # fmt: skip
    return _absent_or_present("legacy LBR", expectation, shown, detail)


def arch_lbr_enumeration(expectation: Expectation, view: GuestView) -> Verdict:
    """Arch LBR: CPUID.07H:EDX[19] with leaf 1CH depths; the guest kernel's depth is one of them."""
    arch = view.caps.arch_lbr
    detail = {"cpuid_depths": arch.depths if arch else None, "depth": lbr_depth(view),
              "filters": {k: getattr(arch, k) for k in ("cpl_filter", "branch_filter", "call_stack", "mispredict",
                                                         "timed", "branch_type")} if arch else None}  # fmt: skip
    if arch is not None and not arch.depths:
        return failed("CPUID.07H:EDX[19] set but leaf 1CH enumerates no depth", "depths", detail)
    if arch is not None and lbr_depth(view) and lbr_depth(view) not in arch.depths:
        return failed(f"guest kernel LBR depth {lbr_depth(view)} is not one of CPUID.1CH's {arch.depths}",
                      "depth in CPUID.1CH", detail)  # fmt: skip
    return _absent_or_present("arch LBR", expectation, arch is not None, detail)


def lbr_expectation(legacy: Expectation, arch: Expectation) -> Expectation:
    """The LBR flavour the guest should have (legacy or arch), or legacy's reason when neither."""
    if arch.available:
        return arch
    return legacy


def _layout(records: list[Record]) -> Record | None:
    return first_record(records, "layout")


def _lbr_gate(expectation: Expectation, view: GuestView, release: str | None) -> Verdict | None:
    """Expected and the guest kernel has an LBR depth -> None (measure); else SKIP or FAIL with the reason."""
    if not expectation.available:
        return skipped(expectation.reason)
    if lbr_depth(view):
        return None
    return _legacy_lbr_unused(view, release) or gate(expectation, False,
                                                     "registered no LBR depth (cpu/caps/branches)")  # fmt: skip


def _lbr_no_samples(mode: Record, records: list[Record], what: str) -> Verdict | None:
    """A branch mode that produced no sample: throttled (SKIP), every record lost to a full ring (ERROR: the probe's
    buffer, not the PMU), else None (the caller FAILs)."""
    if mode["samples"]:
        return None
    throttled = throttle_skip(mode, records)
    if throttled:
        return throttled
    if mode.get("lost"):
        return errored(f"every {what} sample record was lost ({mode['lost']} PERF_RECORD_LOST: the ring buffer was "
                       "full, kernel/events/ring_buffer.c perf_output_begin()); the probe's buffer is too small",
                       {"samples": 0, "lost": mode["lost"]})  # fmt: skip
    return None


#: Why every stack can be empty on a healthy host: KVM gives the guest the LBRs through a host perf event
#: (arch/x86/kvm/vmx/pmu_intel.c intel_pmu_create_guest_lbr_event(): task-pinned, "if another cpu pinned event
#: reclaims LBR ..."). While a host LBR user holds them, vmx_passthrough_lbr_msrs() intercepts the LBR MSRs ("fail to
#: passthrough LBR" in the host log) and intel_pmu_handle_lbr_msrs_access() "return[s] 0 on guest reads", so the
#: guest reads all-zero entries, which its LBR read drops (lbr.c: "Read LBR call stack entries until invalid entry
#: (0s)", intel_pmu_lbr_filter() drops X86_BR_NONE, and utils.c get_branch_type() types from/to 0 as X86_BR_NONE:
#: "maybe zero if lbr did not fill up after a reset").
LBR_RECLAIMED_REASON = ("host: every branch stack is empty, as when a host LBR user (a CPU-pinned host event with "
                        "branch sampling, e.g. perf record -b -a) holds the LBRs: KVM then returns 0 for the guest's "
                        "LBR reads (arch/x86/kvm/vmx/pmu_intel.c intel_pmu_handle_lbr_msrs_access(), "
                        "vmx_passthrough_lbr_msrs(): 'fail to passthrough LBR' in the host log). Stop host "
                        "branch sampling and rerun; if the host log shows no such line, KVM lost the guest's "
                        "LBRs")  # fmt: skip


def _stacks_empty(mode: Record, samples: list[Record]) -> bool:
    """Samples were taken but no entry holds a branch: max_nr 0, or only zero entries (kernels without the filter)."""
    if not mode["samples"]:
        return False
    if mode["max_nr"] == 0:
        return True
    return bool(samples) and all(src == 0 and dst == 0 for s in samples for src, dst, _flags in s["entries"])


def lbr_records(
    expectation: Expectation,
    view: GuestView,
    records: list[Record],
    branches: BranchMap | None = None,
    release: str | None = None,
) -> Verdict:
    """ANY|USER branch stacks: every target in the probe's own text, depth reached, and every entry that starts
    inside the workload starts at one of its branch instructions (calls landing on the callee), as objdump of the
    probe binary lists them.

    USER filters by the branch *target* (perf_event_open(2): "PERF_SAMPLE_BRANCH_USER: Branch target is in user
    space"; arch/x86/events/utils.c get_branch_type(): "branch priv level determined by target as is done by HW when
    LBR_SELECT is implemented"), so the return from an interrupt or syscall (iret/sysret: from a kernel address to
    the interrupted user IP) legitimately appears with a kernel FROM. Only kernel *targets*, and kernel sources of
    branches that do not return to user space, are leaks.

    Zero entries (from = to = 0) are an LBR not yet refilled after a reset (get_branch_type(): "maybe zero if lbr
    did not fill up after a reset") and are not foreign branches; stacks that are all empty are LBR_RECLAIMED_REASON.
    PERF_RECORD_LOST records mean the ring was full (kernel/events/ring_buffer.c perf_output_begin()): the stacks
    that did arrive are whole and are judged; lost only matters when nothing arrived (ERROR, the probe's buffer)."""
    verdict = _lbr_gate(expectation, view, release)
    if verdict:
        return verdict
    mode = first_record(records, "branch_mode", mode="any")
    layout = _layout(records)
    if mode is None or layout is None:
        return errored("lbr probe produced no 'any' mode or layout record")
    if "error" in mode:
        return failed(f"branch-stack sampling failed: {_errno_name(mode)}", "samples", mode.get("strerror"))
    nothing = _lbr_no_samples(mode, records, "branch-stack")
    if nothing:
        return nothing
    samples = [r for r in records if r.get("kind") == "branch_sample" and r.get("mode") == "any"]
    depth = lbr_depth(view)
    problems, outside, kernel, kernel_returns, not_branch, wrong_target, zero = [], 0, 0, 0, 0, 0, 0
    for s in samples:
        if s["nr"] > depth:
            problems.append(f"a sample has {s['nr']} entries > depth {depth}")
            break
        for src, dst, _flags in s["entries"]:
            if src == 0 and dst == 0:
                zero += 1
                continue
            if dst >= USER_SPACE_END:
                kernel += 1
                continue
            if src >= USER_SPACE_END:
                kernel_returns += 1  # iret/sysret into user space: allowed by the USER (target) filter
            elif not layout["text_start"] <= src < layout["text_end"]:
                outside += 1
            if not layout["text_start"] <= dst < layout["text_end"]:
                outside += 1
            if branches is not None and branches.covers(src):
                site = branches.sites.get(src)
                if site is None:
                    not_branch += 1
                elif site.kind == "call" and site.target is not None and dst != site.target:
                    wrong_target += 1
    observed = {"samples": mode["samples"], "max_nr": mode["max_nr"], "depth": depth, "kernel_targets": kernel,
                "kernel_to_user_returns": kernel_returns, "outside_text": outside, "not_a_branch": not_branch,
                "call_elsewhere": wrong_target, "zero_entries": zero, "lost": mode["lost"],
                "throttled": throttles(mode)}  # fmt: skip
    if not mode["samples"]:
        problems.append("no branch-stack samples")
    elif _stacks_empty(mode, samples):
        return skipped(LBR_RECLAIMED_REASON, f"stacks of depth {depth}", observed)
    if kernel:
        problems.append(f"{kernel} kernel-space branch targets in USER-only stacks (host or guest-kernel leak)")
    if outside:
        problems.append(f"{outside} addresses outside the probe's text (foreign branches)")
    if not_branch:
        problems.append(f"{not_branch} entries start inside the workload but not at one of its branch instructions")
    if wrong_target:
        problems.append(f"{wrong_target} call entries land elsewhere than the callee's entry")
    if mode["max_nr"] != depth:
        problems.append(f"deepest stack {mode['max_nr']} != enumerated depth {depth}")
    if problems:
        return failed("; ".join(problems), f"entries in the probe's text, depth {depth}", observed)
    return passed(f"{mode['samples']} branch stacks, all entries in the probe's text, depth {depth}", depth, observed)


def lbr_call_stack(
    expectation: Expectation, view: GuestView, records: list[Record], release: str | None = None
) -> Verdict:
    """CALL_STACK|USER sampled inside f3: the newest entries are the calls f2->f3, f1->f2, loop->f1.

    In call-stack mode the LBR holds the open calls: every sample taken inside vpmu_chain has at least the call into
    it, so samples whose stacks are all empty (nr = 0 everywhere) are a broken call stack (FAIL) - unless the ANY
    stacks of the same run were empty too, which is a host LBR user (LBR_RECLAIMED_REASON). No sample at all is a
    FAIL as well, except for a throttled event (SKIP) or a full ring (ERROR)."""
    verdict = _lbr_gate(expectation, view, release)
    if verdict:
        return verdict
    mode = first_record(records, "branch_mode", mode="call_stack")
    layout = _layout(records)
    if mode is None or layout is None:
        return errored("lbr probe produced no 'call_stack' mode or layout record")
    if "error" in mode:
        if mode.get("errno") in (errno_mod.EOPNOTSUPP, errno_mod.EINVAL):
            return skipped(f"not-enumerated: call-stack mode unsupported ({_errno_name(mode)}; needs LBR format >= 4)")
        return failed(f"call-stack sampling failed: {_errno_name(mode)}", "samples", mode.get("strerror"))
    nothing = _lbr_no_samples(mode, records, "call-stack")
    if nothing:
        return nothing
    all_samples = [s for s in records if s.get("kind") == "branch_sample" and s.get("mode") == "call_stack"]
    observed: dict[str, Any] = {"samples": mode["samples"], "max_nr": mode["max_nr"], "lost": mode["lost"],
                                "throttled": throttles(mode)}  # fmt: skip
    if not mode["samples"]:
        return failed("no call-stack samples", "samples with the call chain", observed)
    if _stacks_empty(mode, all_samples):
        any_mode = first_record(records, "branch_mode", mode="any")
        any_samples = [s for s in records if s.get("kind") == "branch_sample" and s.get("mode") == "any"]
        if any_mode is not None and "error" not in any_mode and _stacks_empty(any_mode, any_samples):
            return skipped(LBR_RECLAIMED_REASON, "the open calls", observed)
        return failed(f"all {mode['samples']} call-stack samples have an empty stack although the ANY stacks of the "
                      "same run were filled: the open calls of vpmu_chain must be there", "the open calls",
                      observed)  # fmt: skip
    f1, f2, f3 = layout["f1"], layout["f2"], layout["f3"]
    f3_end = min(a for a in (f1, f2) if a > f3) if any(a > f3 for a in (f1, f2)) else f3 + 16
    inside = [s for s in all_samples if f3 <= s["ip"] < f3_end]
    if not inside:
        return skipped(f"no call-stack sample landed inside f3 ({len(all_samples)} reported; too few to judge)",
                       ">= 90 %", observed)  # fmt: skip
    good = [s for s in inside if [e[1] for e in s["entries"][:3]] == [f3, f2, f1]]
    observed.update({"samples_in_f3": len(inside), "chain_f3_f2_f1": len(good)})
    if len(good) < 0.9 * len(inside):
        return failed(f"only {len(good)} of {len(inside)} samples in f3 show the chain f3 <- f2 <- f1",
                      ">= 90 %", observed)  # fmt: skip
    return passed(f"{len(good)}/{len(inside)} samples in f3 show the call chain", ">= 90 %", observed)


# --- PEBS ---------------------------------------------------------------------------------------------------


def _leaf1_edx(view: GuestView) -> int:
    leaf = next((r for r in view.records if r.get("kind") == "leaf" and r.get("leaf") == 1), None)
    return int(leaf["edx"]) if leaf else 0


def max_precise(view: GuestView) -> int:
    text = view.sysfs.get("cpu/caps/max_precise", "0")
    return int(text) if text.isdigit() else 0


def pebs_kernel_gap(view: GuestView) -> str | None:
    """The guest kernel's own words when it switched PEBS off for a format it does not know (UNKNOWN_PEBS_FORMAT)."""
    found = UNKNOWN_PEBS_FORMAT.search(view.kernel_banner)
    if not found:
        return None
    return (f'its banner says "{found.group(0)}" (arch/x86/events/intel/ds.c intel_ds_init(): no case for this PEBS '
            "format, x86_pmu.pebs = 0, so cpu/caps/max_precise is 0)")  # fmt: skip


def _pebs_unused(view: GuestView, release: str | None) -> Verdict | None:
    """SKIP when PERF_CAPABILITIES shows a PEBS format the guest kernel has no case for; None otherwise (a kernel
    that knows the format and still sets up no PEBS saw an inconsistent enumeration: DS, DTES64 or
    IA32_MISC_ENABLE[12], arch/x86/kernel/cpu/intel.c init_intel(), which the vPMU answers for)."""
    fmt = int(_perf_caps(view).get("pebs_format") or 0)
    gap = pebs_kernel_gap(view)
    if not fmt or max_precise(view) or not gap:
        return None
    return guest_kernel_skip("PEBS", f"PERF_CAPABILITIES[11:8] shows PEBS format {fmt}", gap, view, release)


def pebs_enumeration(expectation: Expectation, view: GuestView, release: str | None = None) -> Verdict:
    """PEBS: DS (CPUID.1:EDX[21]), PERF_CAPABILITIES[11:8] format >= 4 for KVM guests, max_precise >= 1.

    The promise is judged on what KVM and QEMU enumerate (the format); a guest kernel that does not know that format
    says so in its banner and the check SKIPs with its words (review F3) instead of blaming the host."""
    fmt = int(_perf_caps(view).get("pebs_format") or 0)
    ds = bool(_leaf1_edx(view) >> 21 & 1)
    detail = {"pebs_format": fmt, "ds": ds, "max_precise": max_precise(view), "banner": view.kernel_banner}
    shown = fmt != 0 and max_precise(view) > 0
    if shown and not ds:
        return failed("PEBS format enumerated without CPUID.1:EDX[21] DS", "DS", detail)
    if expectation.available and not shown:
        unused = _pebs_unused(view, release)
        if unused:
            return unused
    if shown and expectation.available and fmt < 4:
        return failed(f"guest PEBS format {fmt} < 4 (KVM exposes PEBS only via EPT, format >= 4)", ">= 4", detail)
    return _absent_or_present("PEBS", expectation, shown, detail)


def _pebs_gate(expectation: Expectation, view: GuestView, release: str | None) -> Verdict | None:
    """Expected and the guest kernel reports a precise level -> None (measure); else SKIP or FAIL with the reason."""
    if not expectation.available:
        return skipped(expectation.reason)
    if max_precise(view):
        return None
    return _pebs_unused(view, release) or gate(expectation, False, "reports max_precise 0")


def _pebs_no_constraint(view: GuestView, record: Record, release: str | None) -> Verdict | None:
    """SKIP when a precise event could not run because the guest kernel does not know the CPU model.

    Without a model case there is no PEBS constraint table, and without PEBS baseline no PMU_FL_PEBS_ALL, so
    ds.c intel_pebs_constraints() returns &emptyconstraint for every precise event: perf_event_open() fails with
    EINVAL (x86_pmu_event_init() -> validate_event(): a constraint of weight 0). Judged only when the event failed
    or sampled nothing, so a kernel that does schedule it is still measured."""
    if kernel_knows_model(view) is not False or _perf_caps(view).get("pebs_baseline"):
        return None
    if "error" not in record and record.get("samples"):
        return None
    return guest_kernel_skip("PEBS on this CPU model", f"PERF_CAPABILITIES shows PEBS format "
                             f"{int(_perf_caps(view).get('pebs_format') or 0)} without baseline", "it does not know "
                             "this CPU model, so no PEBS constraint covers the load event (ds.c "
                             "intel_pebs_constraints(): &emptyconstraint)", view, release)  # fmt: skip


def _load_shortfall(load: str, n: int, expected: str, observed: dict[str, Any]) -> Verdict:
    """SKIP for fewer PEBS samples than the loop must give while a host load uses the PMU (see pebs_competing_load)."""
    return skipped(f"host-load: {n} PEBS samples where {expected} under host load {load}: the host switches guest "
                   "PEBS off while it has a PEBS event on the vCPU's CPU or maps the guest counter to another host "
                   "counter (arch/x86/events/intel/core.c intel_guest_get_msrs(): 'Disable guest PEBS if host PEBS "
                   "is enabled', 'Disable guest PEBS thoroughly for cross-mapped PEBS counters'); whether that "
                   "happened is not observable from the harness. Judged strictly under idle and software-only "
                   "loads", expected, observed)  # fmt: skip


def pebs_no_adaptive(pmu: Expectation, adaptive: Expectation, view: GuestView) -> Verdict:
    """Adaptive PEBS (PERF_CAPABILITIES[14]) stays hidden while KVM disallows it."""
    if not view.intel:
        return skipped(f"not-applicable: PEBS is Intel-only (guest vendor {view.caps.vendor})")
    if not pmu.available:
        return skipped(pmu.reason)
    baseline = bool(_perf_caps(view).get("pebs_baseline"))
    if adaptive.available:
        return passed("adaptive PEBS allowed here", True, baseline) if baseline else \
            failed("adaptive PEBS expected but PERF_CAPABILITIES[14] is clear", True, baseline)  # fmt: skip
    if baseline:
        return failed(f"PERF_CAPABILITIES[14] (PEBS baseline) is set although {adaptive.reason}", False, baseline)
    return passed(f"PEBS baseline hidden ({adaptive.reason})", False, baseline)


def pebs_ip_model(fmt: int, baseline: bool, level: int) -> str:
    """Where the guest kernel puts the sample IP of a PEBS record for precise_ip=level (arch/x86/events/intel/ds.c).

    - format <= 3: intel_pmu_drain_pebs_nhm -> setup_pebs_fixed_sample_data(): precise_ip=1 -> pebs->ip, the
      instruction after the load ("next"); precise_ip>=2 -> pebs->real_ip, the eventing IP with PERF_EFLAGS_EXACT
      ("load") when format >= 2, else the off-by-1 IP fixed up through the LBR when it can be ("fixup").
    - format >= 4: intel_ds_init() drains with intel_pmu_drain_pebs_icl -> setup_pebs_adaptive_sample_data(), whose
      basic group holds the eventing IP with EXACT ("load"). Only with PEBS baseline does pebs_update_adaptive_cfg()
      add the GP group for precise_ip < 2, and then the IP is gprs->ip, after the load, EXACT cleared ("next").
      Without baseline ("Only basic record supported", every KVM guest: vmx_get_perf_capabilities() clears
      PERF_CAP_PEBS_BASELINE) every level reports the load with EXACT.
    """
    if fmt >= 4:
        return "next" if baseline and level < 2 else "load"
    if level < 2:
        return "next"
    return "load" if fmt >= 2 else "fixup"


def pebs_precise(
    expectation: Expectation,
    view: GuestView,
    records: list[Record],
    level: int,
    load: LoadSpec | None = None,
    release: str | None = None,
) -> Verdict:
    """precise_ip=level on a load event whose only load in the loop is at vpmu_loop_load: >= 99 % of sample IPs
    where pebs_ip_model() says (with PERF_RECORD_MISC_EXACT_IP where the kernel sets it), and iterations / period
    samples within 2. A kernel that throttled the event makes the count meaningless (SKIP).

    Under a host load that uses the PMU (pebs_competing_load()) the host may switch guest PEBS off for a while, which
    only removes samples: a shortfall there SKIPs with the numbers, while samples at the wrong IP, without EXACT,
    or more samples than loads still FAIL (wrong data is wrong under any load)."""
    verdict = _pebs_gate(expectation, view, release)
    if verdict:
        return verdict
    if level > max_precise(view):
        return skipped(f"not-enumerated: precise_ip={level} > cpu/caps/max_precise={max_precise(view)}")
    r = first_record(records, "precise", precise_ip=level)
    if r is None:
        return errored(f"pebs probe produced no precise_ip={level} record")
    no_constraint = _pebs_no_constraint(view, r, release)
    if no_constraint:
        return no_constraint
    if "error" in r:
        return failed(f"precise_ip={level} event failed: {_errno_name(r)}", "samples", r.get("strerror"))
    throttled = throttle_skip(r, records)
    if throttled:
        return throttled
    fmt = int(_perf_caps(view).get("pebs_format") or 0)
    model = pebs_ip_model(fmt, bool(_perf_caps(view).get("pebs_baseline")), level)
    n = r["samples"]
    expected_n = r["iterations"] // r["period"]
    hits = {"load": r["at_load"], "next": r["at_next"], "fixup": r["at_load"] + r["at_next"]}[model]
    observed = {k: r[k] for k in ("samples", "exact", "at_load", "at_next", "in_loop", "outside", "lost")}
    observed["throttled"] = throttles(r)
    where = {"load": "the load", "next": "the instruction after the load (off-by-1)",
             "fixup": "the load or the instruction after it"}[model]  # fmt: skip
    competing = pebs_competing_load(load)
    short = n < expected_n - 2
    if competing:
        observed["host_load"] = competing
    problems = []
    if abs(n - expected_n) > 2 and not (short and competing):
        problems.append(f"{n} samples, want {expected_n} +/- 2")
    if n and hits < 0.99 * n:
        problems.append(f"only {hits} of {n} IPs at {where}")
    if n and model == "load" and r["exact"] < n:
        problems.append(f"{n - r['exact']} samples without PERF_RECORD_MISC_EXACT_IP")
    if r["lost"]:
        problems.append(f"{r['lost']} lost records")
    expected = f"{expected_n} +/- 2 samples at {where} (PEBS format {fmt})"
    if problems:
        return failed("; ".join(problems), expected, observed)
    if short and competing:
        return _load_shortfall(competing, n, f"{expected_n} +/- 2 are due", observed)
    return passed(f"precise_ip={level}: {n} samples at {where}", expected, observed)


def pebs_ldlat(
    expectation: Expectation,
    view: GuestView,
    records: list[Record],
    ldlat: int,
    load: LoadSpec | None = None,
    release: str | None = None,
) -> Verdict:
    """Load-latency sampling: data addresses inside the loop's buffer and weight >= ldlat, each for >= 99 %.

    Where ADDR and WEIGHT come from (arch/x86/events/intel/ds.c): with PEBS format <= 3,
    setup_pebs_fixed_sample_data() takes pebs->dla (format >= 1) and pebs->lat (PERF_X86_EVENT_PEBS_LDLAT events);
    with format >= 4 the record is adaptive (setup_pebs_adaptive_sample_data()) and both come only from the MEMINFO
    group, which PEBS_DATA_CFG can request only with PEBS baseline (PERF_CAPABILITIES[14]); without it intel_ds_init()
    notes "Only basic record supported". KVM clears baseline, so a format >= 4 guest without it gets samples with no
    address and no weight: that is SKIPped with the reason, not FAILed. No sample at all under a host load that uses
    the PMU is the host switching guest PEBS off (pebs_competing_load(), _load_shortfall()): SKIP with the numbers.
    """
    verdict = _pebs_gate(expectation, view, release)
    if verdict:
        return verdict
    r = first_record(records, "ldlat")
    if r is None:
        return errored("pebs probe produced no ldlat record")
    no_constraint = _pebs_no_constraint(view, r, release)
    if no_constraint:
        return no_constraint
    if "error" in r:
        return failed(f"mem-loads ldlat={ldlat} failed: {_errno_name(r)}", "samples", r.get("strerror"))
    fmt = int(_perf_caps(view).get("pebs_format") or 0)
    baseline = bool(_perf_caps(view).get("pebs_baseline"))
    n = r["samples"]
    observed = {"samples": n, "addr_in_buffer": r.get("addr_in_buffer"), "weight_ge_ldlat": r.get("weight_ge_ldlat"),
                "pebs_format": fmt, "baseline": baseline, "throttled": throttles(r)}  # fmt: skip
    if not n:
        throttled = throttle_skip(r, records)
        if throttled:
            return throttled
        competing = pebs_competing_load(load)
        if competing:
            return _load_shortfall(competing, 0, "the loop's cache-missing loads must give some",
                                   {**observed, "host_load": competing})  # fmt: skip
        return failed("no load-latency samples", "addresses in buffer, weight >= ldlat", observed)
    problems = []
    if r["addr_in_buffer"] < 0.99 * n:
        problems.append(f"{n - r['addr_in_buffer']} of {n} data addresses outside the probe's buffer")
    if r["weight_ge_ldlat"] < 0.99 * n:
        problems.append(f"only {r['weight_ge_ldlat']} of {n} samples with weight >= {ldlat}")
    if problems and fmt >= 4 and not baseline:
        return skipped(f"not-enumerated: PEBS baseline (PERF_CAPABILITIES[14]) is clear, so PEBS format {fmt} records "
                       "carry only the basic group and no data address or latency (ds.c intel_ds_init: \"Only basic "
                       "record supported\"; setup_pebs_adaptive_sample_data reads them from MEMINFO)",
                       "addresses in buffer, weight >= ldlat", observed)  # fmt: skip
    if problems:
        return failed("; ".join(problems), "addresses in buffer, weight >= ldlat", observed)
    return passed(f"{n} load-latency samples in the buffer", "addresses in buffer, weight >= ldlat", observed)


# --- AMD IBS ------------------------------------------------------------------------------------------------

IBS_OP_VAL = 1 << 18  # IbsOpCtl[18] IbsOpVal (APM Vol. 2, "Instruction-Based Sampling"; Linux IBS_OP_VAL)
IBS_FETCH_VAL = 1 << 49  # IbsFetchCtl[49] IbsFetchVal (Linux IBS_FETCH_VAL)
IBS_RIP_INVALID = 1 << 38  # IbsOpData[38] IbsRipInvalid
#: ibs_caps bits (CPUID 8000001BH EAX; arch/x86/include/asm/perf_event.h IBS_CAPS_*).
IBS_CAPS_BRNTRGT = 1 << 5
IBS_CAPS_RIPINVALIDCHK = 1 << 7
IBS_CAPS_FETCHCTLEXTD = 1 << 9
IBS_CAPS_OPDATA4 = 1 << 10
#: arch/x86/include/asm/msr-index.h: MSR_AMD64_IBSOP_REG_COUNT (IbsOpCtl, IbsOpRip, IbsOpData, IbsOpData2,
#: IbsOpData3, IbsDcLinAd, IbsDcPhysAd) and MSR_AMD64_IBSFETCH_REG_COUNT (IbsFetchCtl, IbsFetchLinAd, IbsFetchPhysAd).
IBS_OP_REG_COUNT = 7
IBS_FETCH_REG_COUNT = 3
IBS_IN_LOOP = 0.95


def ibs_raw_regs(pmu: str, caps: int) -> int:
    """How many u64 registers the guest kernel puts in an IBS PERF_SAMPLE_RAW payload for ``caps``.

    arch/x86/events/amd/ibs.c perf_ibs_handle_irq(): with PERF_SAMPLE_RAW it reads offset_max registers (the
    REG_COUNT above), then IbsBrTarget if IBS_CAPS_BRNTRGT and IbsOpData4 if IBS_CAPS_OPDATA4 (op), or
    IbsFetchExtdCtl if IBS_CAPS_FETCHCTLEXTD (fetch). Genoa's caps 0xBFF (bit 10 clear): 8 op, 4 fetch registers.
    """
    if pmu == "ibs_op":
        return IBS_OP_REG_COUNT + bool(caps & IBS_CAPS_BRNTRGT) + bool(caps & IBS_CAPS_OPDATA4)
    return IBS_FETCH_REG_COUNT + bool(caps & IBS_CAPS_FETCHCTLEXTD)


def ibs_shown(view: GuestView) -> bool:
    return bool(view.caps.amd and view.caps.amd.ibs) or "ibs_op/type" in view.sysfs


def ibs_enumeration(expectation: Expectation, view: GuestView) -> Verdict:
    """CPUID 80000001H:ECX[10] + 8000001BH and the guest kernel's ibs_op / ibs_fetch PMUs agree."""
    cpuid = bool(view.caps.amd and view.caps.amd.ibs)
    pmus = "ibs_op/type" in view.sysfs and "ibs_fetch/type" in view.sysfs
    detail = {"cpuid": cpuid, "ibs_pmus": pmus, "caps": view.caps.amd.ibs.caps if cpuid and view.caps.amd else None}
    if expectation.available and cpuid and not pmus:
        return failed("CPUID enumerates IBS but the guest kernel registered no ibs_op/ibs_fetch PMU", True, detail)
    return _absent_or_present("AMD IBS", expectation, cpuid or pmus, detail)


def _rip_invalid(sample: Record, pmu: str) -> bool:
    """IbsOpData.RipInvalid, honoured only where the kernel honours it (perf_ibs_handle_irq: check_rip needs
    IBS_CAPS_RIPINVALIDCHK); such a sample carries the interrupted IP without EXACT, not IbsOpRip."""
    regs = sample["regs"]
    return pmu == "ibs_op" and bool(sample.get("caps", 0) & IBS_CAPS_RIPINVALIDCHK) and len(regs) > 2 and \
        bool(regs[2] & IBS_RIP_INVALID)  # fmt: skip


def ibs_sampling(expectation: Expectation, view: GuestView, records: list[Record], pmu: str) -> Verdict:
    """IBS samples point into the loop: IbsOpRip (op) / IbsFetchLinAd (fetch) inside the loop for >= 95 % of the
    probe's own samples, and the sample IP equals that address (perf_ibs_handle_irq: set_linear_ip(regs,
    ibs_data.regs[1])). Samples with IbsRipInvalid are counted apart: their IbsOpRip is not an address (§5c). The
    probe opens per task, or CPU-wide filtered by its TID on guest kernels before 6.2.

    The Val bit says nothing about the vPMU: arch/x86/events/amd/ibs.c perf_ibs_handle_irq() reads the control MSR
    first and drops the interrupt unless `*buf & perf_ibs->valid_mask` is set, and that same value is regs[0] of the
    raw payload. A delivered sample without Val therefore means the probe decoded the payload at the wrong offset:
    an ERROR of the harness, not a verdict on the host."""
    verdict = gate(expectation, "ibs_op/type" in view.sysfs and "ibs_fetch/type" in view.sysfs,
                   "registered no ibs_op/ibs_fetch PMU")  # fmt: skip
    if verdict:
        return verdict
    mode = first_record(records, "ibs_mode", pmu=pmu)
    if mode is None:
        return errored(f"ibs probe produced no {pmu} record")
    if "error" in mode:
        tried = f" (per-task open: {errno_mod.errorcode.get(mode['task_errno'], mode['task_errno'])})" \
            if mode.get("task_errno") else ""  # fmt: skip
        return failed(f"{pmu} sampling failed in {mode.get('mode', 'task')} mode: {_errno_name(mode)}{tried}",
                      "samples", mode.get("strerror"))  # fmt: skip
    samples = [r for r in records if r.get("kind") == "ibs_sample" and r.get("pmu") == pmu and len(r["regs"]) >= 2]
    start, end = mode["loop_start"], mode["loop_end"]
    val_bit = IBS_OP_VAL if pmu == "ibs_op" else IBS_FETCH_VAL
    invalid = rip_invalid = inside = mismatched = odd_size = kernel = 0
    for s in samples:
        ctl, address = s["regs"][0], s["regs"][1]
        if not ctl & val_bit:
            invalid += 1
        if len(s["regs"]) != ibs_raw_regs(pmu, int(s.get("caps", 0))):
            odd_size += 1
        if _rip_invalid(s, pmu):
            rip_invalid += 1
            continue
        if address >= USER_SPACE_END:
            kernel += 1  # the guest kernel running in the probe's context (IBS has no exclude_kernel)
        if start <= address < end:
            inside += 1
        if s["ip"] != address:
            mismatched += 1
    judged = len(samples) - rip_invalid
    observed = {"mode": mode.get("mode", "task"), "config": mode.get("config"), "samples": mode["samples"],
                "own_samples": mode.get("own_samples"), "foreign_samples": mode.get("foreign_samples"),
                "judged": judged, "invalid": invalid, "rip_invalid": rip_invalid, "in_loop": inside,
                "kernel": kernel, "ip_mismatch": mismatched, "raw_size_unexpected": odd_size,
                "throttled": throttles(mode)}  # fmt: skip
    problems = []
    if not samples:
        throttled = throttle_skip(mode, records)
        if throttled:
            return throttled
        if mode.get("lost"):
            return errored(f"no {pmu} sample of the probe's thread arrived and {mode['lost']} PERF_RECORD_LOST "
                           "records say the ring buffer was full (kernel/events/ring_buffer.c perf_output_begin()): "
                           "the probe's buffer, not the PMU", observed)  # fmt: skip
        problems.append("no IBS samples of the probe's own thread")
    if invalid:
        return errored(f"{invalid} of {len(samples)} {pmu} raw payloads lack the Val bit in regs[0], which the kernel "
                       "checks before it delivers a sample (ibs.c perf_ibs_handle_irq()): the probe's raw decode is "
                       "misaligned", observed)  # fmt: skip
    if samples and not judged:
        problems.append("every sample has IbsRipInvalid")
    if judged and inside < IBS_IN_LOOP * judged:
        problems.append(f"only {inside} of {judged} sampled addresses inside the loop")
    if mismatched:
        register = "IbsOpRip" if pmu == "ibs_op" else "IbsFetchLinAd"
        problems.append(f"{mismatched} samples whose IP differs from {register}")
    if problems:
        return failed("; ".join(problems), ">= 95 % valid samples in the loop", observed)
    return passed(f"{judged} valid {pmu} samples in the loop ({observed['mode']} mode)", ">= 95 %", observed)
