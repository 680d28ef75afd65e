"""Verdicts over the semantics probe (guest_tests/probes/semantics.c.j2): register-level counter semantics that
kvm-unit-tests x86/pmu.c and the KVM selftests assert and a Linux guest can check through /dev/cpu/N/msr.

Each rule cites its source next to the code and, shortened, in its FAIL reason. Exact counts come from the
generated loop (harness.probe.workloads.LOOP, checked with callgrind in tests/test_semantics_verdicts.py), allowing one
count per interrupt, exception or switch the probe saw around a window (bounds.WindowEvents).
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Iterable, Iterator
from typing import Any

from harness.judge.bounds import (
    DIFFERENTIAL_EVENTS,
    INTERRUPT_OVERCOUNT_SOURCE,
    NO_ERRATA,
    Bounds,
    OvercountErrata,
    event_bounds,
    window_events,
)
from harness.judge.expectations import Expectation
from harness.judge.verdict import (
    Record,
    Verdict,
    contention_skip,
    errno_text,
    errored,
    failed,
    gate,
    passed,
    shortfall_verdict,
    skipped,
)
from harness.probe.guest_view import GuestView
from harness.probe.host_watchdog import watchdog_reason
from harness.probe.params import force_emulation_prefix
from harness.probe.workloads import CPUID_LOOP, FEP_LOOP, LOOP, RANDOM_BRANCHES

#: GLOBAL_STATUS bits that belong to counters: Intel GP 0-31 and fixed 32-47 (SDM Vol. 3B, "IA32_PERF_GLOBAL_STATUS"),
#: AMD 0-5 (APM Vol. 2, "PerfCntrGlobalStatus"). Bits above (PERF_METRICS overflow 48, trace/LBR/buffer overflow,
#: CondChgd 63) are not what this probe changes and are left out of "exactly that bit".
COUNTER_STATUS_BITS = (1 << 48) - 1
#: AMD's VMRUN may retire as a guest instruction (kvm-unit-tests x86/pmu.c never asserts exact counts on AMD): a
#: VM exit taken while the guest was in user mode inside a 0-iteration calibration window inflates the preset's
#: calibration, so the final count may fall a little below 1 too (what KUT's AMD rule "count == 0xFFFFFFFFFFFF or
#: < 7" allows for). The upper side gets bounds.event_bounds' +10k slack.
AMD_LOW_SLACK = 100
AMD_HIGH_SLACK = 10_000
#: WRMSR 0 to a running counter: what is left is the short tail after the write (a few hundred user instructions
#: of pwrite()'s return path); a write that was ignored leaves the whole loop. kvm-unit-tests
#: check_running_counter_wrmsr() asserts "count < the loop's minimum"; 1 % of the loop is far below that.
RUNNING_RESET_FRACTION = 100
KUT_OVERFLOW = "kvm-unit-tests x86/pmu.c check_counter_overflow()"
KUT_RUNNING = "kvm-unit-tests x86/pmu.c check_running_counter_wrmsr()"
KST_FIXED = "KVM selftests pmu_counters_test.c guest_test_fixed_counters()"
KST_FIXED_MSR = "KVM selftests pmu_counters_test.c guest_rd_wr_counters(MSR_CORE_PERF_FIXED_CTR0, ...)"
KST_PERFCAP = "KVM selftests vmx_pmu_caps_test.c guest_wrmsr_perf_capabilities()"


def _records(records: list[Record], kind: str) -> list[Record]:
    return [r for r in records if r.get("kind") == kind]


def _accessible(labelled: Iterable[tuple[str, Record]], problems: list[str]) -> Iterator[tuple[str, Record]]:
    """The (label, record) pairs whose counter MSRs the probe could use; each other one adds its access problem,
    named by its label, to ``problems``."""
    for label, record in labelled:
        access = _access_problem(record)
        if access:
            problems.append(f"{label}: {access}")
        else:
            yield label, record


def _access_problem(record: Record) -> str | None:
    """An MSR access of an enumerated counter that failed (the probe's rec_failure: failed_msr + errno)."""
    if "error" not in record:
        return None
    return f"MSR {record.get('failed_msr', 0):#x}: {errno_text(record)} (an enumerated counter's MSR must not #GP)"


def _signed(value: int, width: int) -> int:
    """``value`` read as a ``width``-bit two's-complement number (a count that wrapped once too few reads near 2^w)."""
    mask = (1 << width) - 1
    value &= mask
    return value - (1 << width) if value >> (width - 1) else value


def expected_overflow_counters(view: GuestView) -> list[str]:
    """The counters the probe wraps: every GP counter, and fixed counter 0 on an Intel v2+ guest that has it."""
    perfmon = view.caps.arch_perfmon
    if perfmon is not None:
        names = [f"gp{i}" for i in range(perfmon.gp_counters)]
        if perfmon.version >= 2 and perfmon.fixed_counter_mask & 1:
            names.append("fixed0")
        return names
    amd = view.caps.amd
    return [f"gp{i}" for i in range(amd.core_counters if amd else 0)]


def _status_problems(record: Record, label: str, source: str) -> list[str]:
    """GLOBAL_STATUS holds this counter's bit after the overflow, and writing only that bit to the clear MSR
    (IA32_PERF_GLOBAL_OVF_CTRL, SDM Vol. 3B "IA32_PERF_GLOBAL_OVF_CTRL": writing 1 clears the bit; AMD
    PerfCntrGlobalStatusClr, APM Vol. 2) clears exactly that bit (KVM: intel_pmu_set_msr()
    MSR_CORE_PERF_GLOBAL_OVF_CTRL and amd_pmu_set_msr() MSR_AMD64_PERF_CNTR_GLOBAL_STATUS_CLR clear
    global_status & ~data; the perf-based vPMU sets the bit from kvm_perf_overflow(), arch/x86/kvm/pmu.c)."""
    if not record.get("global"):
        return []
    bit, status, after = 1 << record["bit"], record["status"], record["status_after_clear"]
    problems = []
    if not status & bit:
        problems.append(f"{label}: GLOBAL_STATUS bit {record['bit']} not set after the wrap (status {status:#x}; "
                        f"{source})")  # fmt: skip
    want = status & COUNTER_STATUS_BITS & ~bit
    if after & COUNTER_STATUS_BITS != want:
        problems.append(f"{label}: writing bit {record['bit']} to the clear MSR left GLOBAL_STATUS {after:#x}, want "
                        f"counter bits {want:#x} (exactly that bit cleared)")  # fmt: skip
    return problems


def overflow_every_counter(
    pmu: Expectation,
    view: GuestView,
    records: list[Record],
    errata: OvercountErrata = NO_ERRATA,
    contention: str | None = None,
) -> Verdict:
    """Every GP counter and fixed counter 0, preset to 1 - (calibrated window + loop), wraps exactly once and reads
    1 (kvm-unit-tests check_counter_overflow(): count == 1 on Intel), up to one count per interrupt/exception in the N
    window and the 0 window the preset was calibrated on; GLOBAL_STATUS has that counter's bit, and the clear MSR
    clears exactly that bit. AMD, and Intel Atoms with the instructions-retired overcount erratum: >= with slack both
    ways (AMD_LOW_SLACK). Without global status MSRs (Intel v1, AMD without PerfMonV2) only the count is judged, as
    kvm-unit-tests skips the status checks there.
    """
    verdict = gate(pmu, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    found = {r.get("counter"): r for r in _records(records, "overflow")}
    wanted = expected_overflow_counters(view)
    missing = [c for c in wanted if c not in found]
    if missing:
        return errored(f"semantics probe produced no overflow record for {', '.join(missing)}")
    relaxed = view.amd or errata.covers("instructions")
    why = "AMD: VMRUN may count (kvm-unit-tests has no exact checks on AMD)" if view.amd else \
        "Intel Atom instructions-retired overcount erratum (SRF7)"  # fmt: skip
    problems: list[str] = []
    shortfalls: list[str] = []
    observed: dict[str, Any] = {}
    for label, record in _accessible(((label, found[label]) for label in wanted), problems):
        final = _signed(record["final"], record["width"])
        window = window_events(record)
        low, high = 1 - (window.zero or 0), 1 + (window.n or 0)
        if relaxed:
            low, high = low - AMD_LOW_SLACK, high + AMD_HIGH_SLACK
        source = f"{KUT_OVERFLOW}: count == 1 after one wrap"
        source += f", {why}" if relaxed else ""
        source += f"; {INTERRUPT_OVERCOUNT_SOURCE}: {window.text()}" if not window.quiet else ""
        problem = Bounds(low, high, f"{label}: count after the wrap", source).check(final)
        status = _status_problems(record, label, KUT_OVERFLOW)
        # A counter that fell short (did not reach the wrap) explains its missing status bit too.
        (shortfalls if problem and final < low else problems).extend(([problem] if problem else []) + status)
        observed[label] = {"final": final, "status": record["status"], "after_clear": record["status_after_clear"]}
    expected = "each counter reads 1 after one wrap; its GLOBAL_STATUS bit set, then cleared alone"
    verdict = shortfall_verdict(contention, shortfalls, problems, expected, observed)
    if verdict:
        return verdict
    status = "" if any(found[c].get("global") for c in wanted) else " (no global status MSRs: count only)"
    return passed(f"{len(wanted)} counters wrap to 1{status}", expected, observed)


def running_write(
    pmu: Expectation,
    view: GuestView,
    records: list[Record],
    errata: OvercountErrata = NO_ERRATA,
    contention: str | None = None,
) -> Verdict:
    """WRMSR to a running counter (kvm-unit-tests check_running_counter_wrmsr()): 0 written after the loop leaves only
    the short tail after the write; -1 (width-masked) written before the loop wraps the counter, which then reads
    the instructions after the write minus one, with its GLOBAL_STATUS bit set.

    KVM applies a guest write to a running counter at once: pmc_write_counter() (arch/x86/kvm/pmu.c) drops the
    accumulated counts and makes the counter relative to the perf event's running count, and
    pmc_update_sample_period() moves the overflow point, so kvm_perf_overflow() sets the status bit when the
    counter wraps; under the mediated vPMU the write goes to the hardware counter.
    """
    verdict = gate(pmu, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    reset = next(iter(_records(records, "running_write")), None)
    wrap = next(iter(_records(records, "running_overflow")), None)
    if reset is None or wrap is None:
        return errored("semantics probe produced no running_write/running_overflow record")
    problems: list[str] = []
    for record in (reset, wrap):
        access = _access_problem(record)
        if access:
            problems.append(access)
    if problems:
        return failed("; ".join(problems), "counter MSRs accessible", None)
    n = int(reset["iterations"])
    loop = LOOP.delta_instructions(n)
    limit = loop // RUNNING_RESET_FRACTION
    if reset["count"] >= limit:
        problems.append(f"WRMSR 0 to a running counter after the loop left {reset['count']:,} counts, want < "
                        f"{limit:,} (the loop alone is {loop:,}; {KUT_RUNNING})")  # fmt: skip
    # After WRMSR -1 the counter counts the whole loop call (LOOP.instructions) and then the tail up to the disable.
    final = _signed(wrap["final"], wrap["width"])
    low = LOOP.instructions(int(wrap["iterations"])) - 1
    high = low + limit + (AMD_HIGH_SLACK if view.amd or errata.covers("instructions") else 0)
    problem = Bounds(low, high, "counter after WRMSR -1 and the loop", f"{KUT_RUNNING}: -1 wraps at the first "
                     "instruction after the write").check(final)  # fmt: skip
    status = _status_problems(wrap, "gp0 preset -1", KUT_RUNNING)
    # A counter that never reached the wrap (a host load took its backing event away) explains its status bit too.
    shortfalls = [problem, *status] if problem and final < low else []
    if not shortfalls:
        problems += ([problem] if problem else []) + status
    observed = {"count_after_write_0": reset["count"], "final_after_write_minus_1": final,
                "status": wrap.get("status")}  # fmt: skip
    expected = f"reset: < {limit:,}; -1: wraps to [{low:,}, {high:,}] with the status bit set"
    verdict = contention_skip(contention, shortfalls, problems, expected, observed)
    if verdict:
        return verdict
    problems = shortfalls + problems
    if problems:
        return failed("; ".join(problems), expected, observed)
    return passed("WRMSR to a running counter takes effect at once (reset, and wrap from -1)", expected, observed)


def expected_all_counters(view: GuestView) -> list[str]:
    perfmon = view.caps.arch_perfmon
    if perfmon is not None:
        names = [f"gp{i}" for i in range(perfmon.gp_counters)]
        if perfmon.version >= 2:
            names += [f"fixed{j}" for j in range(perfmon.fixed_counter_mask.bit_length())
                      if (perfmon.fixed_counter_mask >> j) & 1]  # fmt: skip
        return names
    amd = view.caps.amd
    return [f"gp{i}" for i in range(amd.core_counters if amd else 0)]


def all_counters(
    pmu: Expectation,
    view: GuestView,
    records: list[Record],
    errata: OvercountErrata = NO_ERRATA,
    host: dict[str, Any] | None = None,
    contention: str | None = None,
) -> Verdict:
    """Every GP counter with its own architectural event plus every fixed counter, all counting one window at once
    (kvm-unit-tests check_counters_many()): each within its event's bounds (bounds.event_bounds: instructions and
    branches exact over the N-0 difference, the others KUT's ranges).

    A shortfall is SKIPped, not failed, where the host explains it: under the perf-based vPMU every guest counter in
    use is a pinned host event, so the host NMI watchdog's pinned cycles event (host_watchdog.WATCHDOG_REASON; KUT's
    unittests.cfg requires nmi_watchdog=0) or a competing host load (verdict.contention_skip) can leave one of
    them unscheduled while the guest uses all of them.
    """
    verdict = gate(pmu, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    found = {r.get("counter"): r for r in _records(records, "all_counters")}
    wanted = expected_all_counters(view)
    missing = [c for c in wanted if c not in found]
    if missing:
        return errored(f"semantics probe produced no all_counters record for {', '.join(missing)}")
    problems: list[str] = []
    shortfalls: list[str] = []
    observed: dict[str, Any] = {}
    for label, record in _accessible(((label, found[label]) for label in wanted), problems):
        event = record["event"]
        bounds = event_bounds(event, int(record["iterations"]), view.amd, errata, int(record.get("tsc_n", 0)),
                              window_events(record))  # fmt: skip
        value = record["value_n"] - record["value_0"] if event in DIFFERENTIAL_EVENTS else record["value_n"]
        observed[f"{label}:{event}"] = value
        problem = bounds.check(value)
        if problem:
            (shortfalls if value < bounds.low else problems).append(f"{label}: {problem}")
    expected = "each counter within its event's bounds, all counting at once"
    verdict = contention_skip(contention, shortfalls, problems, expected, observed)
    if verdict:
        return verdict
    watchdog = watchdog_reason(host or {})
    if shortfalls and not problems and watchdog:
        return skipped(f"{watchdog}; measured: {'; '.join(shortfalls)}", expected, observed)
    if shortfalls or problems:
        return failed("; ".join(shortfalls + problems), expected, observed)
    return passed(f"{len(wanted)} counters with different events count together within bounds", expected, observed)


def fixed_absent(pmu: Expectation, view: GuestView, records: list[Record], faults: Expectation) -> Verdict:
    """Fixed counters the guest does not have: enabling one in IA32_FIXED_CTR_CTRL or IA32_PERF_GLOBAL_CTRL #GPs (KVM
    selftests guest_test_fixed_counters()), and so do its counter MSR's read and write (guest_rd_wr_counters(), which
    guest_test_fixed_counters() runs over MSR_CORE_PERF_FIXED_CTR0 + i with ``expect_gp`` for every counter that is
    neither below the enumerated count nor in the v5 bitmask).

    The control-register writes #GP whatever kvm.ignore_msrs says: intel_pmu_set_msr() rejects reserved bits
    (fixed_ctr_ctrl_rsvd; kvm_valid_perf_global_ctrl()) by returning 1, which kvm_do_msr_access() does not swallow.
    The counter MSR of a counter that does not exist is one KVM does not know (intel_is_valid_msr() false), whose
    access kvm.ignore_msrs=Y turns into a silent 0, so that part is judged only where ``faults`` (pmu_msrs_fault) holds.
    """
    verdict = gate(pmu, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    found = _records(records, "fixed_absent")
    if not found:
        return errored("semantics probe produced no fixed_absent record")
    judged: list[Record] = []
    notes: list[str] = []
    for record in found:
        if record["op"] in ("rdmsr", "wrmsr") and not faults.available:
            continue
        judged.append(record)
    if not faults.available:
        notes.append(f"counter MSRs not judged ({faults.reason})")
    problems = []
    observed: dict[str, Any] = {}
    for record in judged:
        where = f"fixed counter {record['index']} {record['op']} MSR {record['msr']:#x}"
        faulted = record.get("errno") == errno_mod.EIO
        value = record.get("read", record.get("value"))
        observed[f"{record['index']}:{record['op']}"] = "#GP" if faulted else value
        if not faulted:
            got = errno_text(record) if "error" in record else f"accepted, reads {value}"
            source = KST_FIXED_MSR if record["op"] in ("rdmsr", "wrmsr") else KST_FIXED
            problems.append(f"{where}: {got}, want #GP ({source})")
    expected = "#GP for every access to a fixed counter that is not enumerated"
    note = f"; {'; '.join(notes)}" if notes else ""
    if problems:
        return failed("; ".join(problems) + note, expected, observed)
    indices = sorted({r["index"] for r in judged})
    return passed(f"fixed counters {indices} are absent as enumerated: every access #GPs{note}", expected, observed)


def perfcap_write(pmu: Expectation, view: GuestView, records: list[Record], faults: Expectation) -> Verdict:
    """A guest WRMSR to IA32_PERF_CAPABILITIES #GPs whatever the value, and the value survives (KVM selftests
    guest_wrmsr_perf_capabilities(); KVM kvm_set_msr_common() refuses any write that is not host-initiated).

    Gated on ``faults`` (kvm.ignore_msrs=N): older kernels refuse with 1 (always a #GP), but Sean Christopherson's
    change of that case to "!host_initiated || !PDCM -> KVM_MSR_RET_UNSUPPORTED" makes it a refusal that
    kvm_do_msr_access() drops silently under kvm.ignore_msrs=Y; with ignore_msrs=N both kernels #GP.
    """
    verdict = gate(pmu, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    if view.perf_capabilities() is None:
        return skipped("not-enumerated: CPUID.01H:ECX.PDCM[15] is clear, so the guest has no IA32_PERF_CAPABILITIES")
    if not faults.available:
        return skipped(faults.reason)
    first = next((r for r in _records(records, "perfcap_write") if r.get("op") == "rdmsr"), None)
    writes = [r for r in _records(records, "perfcap_write") if r.get("op") == "wrmsr"]
    after = next(iter(_records(records, "perfcap_after")), None)
    if first is None or not writes or after is None:
        return errored("semantics probe produced no perfcap_write records")
    problems = []
    for record in writes:
        if record.get("errno") != errno_mod.EIO:
            got = errno_text(record) if "error" in record else f"accepted (reads {record.get('read', 0):#x})"
            problems.append(f"WRMSR {record['written']:#x} to IA32_PERF_CAPABILITIES: {got}, want #GP ({KST_PERFCAP})")
    if "error" in first or "error" in after or first.get("value") != after.get("value"):
        problems.append(f"IA32_PERF_CAPABILITIES changed: {first.get('value')} before, {after.get('value')} after")
    observed = {"value": first.get("value"), "writes": [r.get("errno") == errno_mod.EIO for r in writes]}
    if problems:
        return failed("; ".join(problems), "#GP, value unchanged", observed)
    return passed(f"{len(writes)} guest writes to IA32_PERF_CAPABILITIES #GP; the value is unchanged",
                  "#GP, value unchanged", observed)  # fmt: skip


def k7_alias(pmu: Expectation, view: GuestView, records: list[Record]) -> Verdict:
    """With PerfCtrExtCore the legacy K7 MSRs (PerfEvtSel0-3 0xC0010000-3, PerfCtr0-3 0xC0010004-7) are counters 0-3
    under a second name (AMD APM Vol. 2, "Performance Counters": the legacy MSRs alias the first four
    PerfEvtSel/PerfCtr of the extended set; KVM get_gp_pmc_amd() maps both to one kvm_pmc; kvm-unit-tests x86/pmu.c
    runs its whole suite again on them, "K7"): a write through one name reads back through the other."""
    verdict = gate(pmu, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    amd = view.caps.amd
    if amd is None or not amd.perfctr_core:
        return skipped("not-enumerated: no PerfCtrExtCore (CPUID 80000001H:ECX[23]): the K7 MSRs are the only counters")
    found = _records(records, "alias")
    if not found:
        return errored("semantics probe produced no alias record")
    problems = []
    for record in found:
        where = f"counter {record['index']}: write {record['write_msr']:#x}, read {record['read_msr']:#x}"
        if "error" in record:
            problems.append(f"{where}: {errno_text(record)}")
        elif record["read"] != record["written"]:
            problems.append(f"{where}: wrote {record['written']:#x}, read {record['read']:#x}")
    expected = "each write reads back through the other name"
    if problems:
        return failed("; ".join(problems) + " (APM Vol. 2: K7 MSRs alias counters 0-3)", expected, len(found))
    return passed(f"{len(found)} writes read back through the aliased name", expected, len(found))


#: OS-only counting of a user-mode loop: what the kernel runs inside the window (the enabling/disabling pwrite()
#: paths are the same for N and 0 iterations; the guest's ticks, softirqs and device interrupts during the N window
#: are not: a few thousand to tens of thousands of instructions each, over a window of a few ms to tens of ms) stays
#: well below half the loop; a vPMU that ignored EVTSEL.OS/USR would count the whole loop (1e7) there.
OS_FRACTION = 2
#: cmask=1 + (cmask=1, INV) must add up to the window's user-mode cycles: every cycle has either >= 1 or < 1
#: instruction retired (SDM Vol. 3B, IA32_PERFEVTSELx INV: "inverts the counter-mask comparison"). The counters are
#: enabled and disabled by the same GLOBAL_CTRL write; 10 % (+1000 cycles) absorbs the skew of the perf-based
#: vPMU's separate host events.
CYCLE_SUM_TOLERANCE = 0.10
#: EDGE after a host VM exit the guest cannot see: the counters stop in host mode (exclude_host) and may see a new
#: rising edge when they start again at VM entry, so host interrupts taken while the guest runs the loop can add
#: edges beyond the guest's own INV cycles (hundreds per second at most, on a window of milliseconds).
EDGE_HOST_SLACK = 1000
SDM_EVTSEL = "SDM Vol. 3B, IA32_PERFEVTSELx CMASK/INV/EDGE; APM Vol. 2, PerfEvtSeln"


def event_filters(
    pmu: Expectation,
    view: GuestView,
    records: list[Record],
    errata: OvercountErrata = NO_ERRATA,
    host: dict[str, Any] | None = None,
    contention: str | None = None,
) -> Verdict:
    """EVTSEL filters over the generated loop, four GP counters counting one window at once:

    * USR only: the loop's instructions exactly (N-0); OS only: the N-0 difference under half of that (the loop
      runs entirely in user mode; KVM turns USR/OS into exclude_user/exclude_kernel, reprogram_counter());
    * CMASK=2: each counted cycle retired >= 2 of the window's instructions, so 2 x count <= the USR count of the
      same window (kvm-unit-tests check_counters_many "cmask" asserts count < 10N);
    * CMASK=1 plus CMASK=1 INV adds up to the window's user-mode cycles (CYCLE_SUM_TOLERANCE);
    * EDGE with CMASK=1 counts rising edges: at least one, at most the CMASK=1 cycles, and at most one more than the
      INV (no-retirement) cycles plus one per interrupt/exception (a return to user mode may start a new edge) and
      EDGE_HOST_SLACK for host exits the guest cannot count.
    """
    verdict = gate(pmu, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    record = next(iter(_records(records, "filters")), None)
    if record is None:
        return errored("semantics probe produced no filters record")
    if "skipped" in record:
        return skipped(f"not-enumerated: the guest has {record['skipped']}; the filter window needs four at once")
    access = _access_problem(record)
    if access:
        return failed(access, "counter MSRs accessible", None)
    n = int(record["iterations"])
    window = window_events(record)
    events_b = sum(max(0, record.get(k, 0) or 0) for k in ("irq_b", "faults_b", "switches_b"))
    usr, os_ = record["usr_n"] - record["usr_0"], record["os_n"] - record["os_0"]
    observed = {k: record[k] for k in ("usr_n", "usr_0", "os_n", "os_0", "cmask2_n", "cycles_n", "cmask1_n", "inv_n",
                                       "edge_n", "cycles_b")}  # fmt: skip
    problems: list[str] = []
    bounds = event_bounds("instructions", n, view.amd, errata, 0, window)
    problem = bounds.check(usr)
    usr_short = problem is not None and usr < bounds.low
    if problem:
        problems.append(f"USR only: {problem}")
    os_limit = LOOP.delta_instructions(n) // OS_FRACTION
    if os_ >= os_limit:
        problems.append(f"OS only counted {os_:,} over a user-mode loop (N-0), want < {os_limit:,} (EVTSEL.OS/USR)")
    if record["cmask2_n"] == 0:
        problems.append(f"CMASK=2 counted 0 cycles over {record['usr_n']:,} instructions: every x86 core since the P6 "
                        "retires several instructions in some cycles, so the counter did not count")  # fmt: skip
    elif 2 * record["cmask2_n"] > record["usr_n"]:
        problems.append(f"CMASK=2 counted {record['cmask2_n']:,} cycles, more than half the window's "
                        f"{record['usr_n']:,} instructions ({SDM_EVTSEL})")  # fmt: skip
    cycles = record["cycles_b"]
    total = record["cmask1_n"] + record["inv_n"]
    if abs(total - cycles) > CYCLE_SUM_TOLERANCE * cycles + 1000:
        problems.append(f"CMASK=1 ({record['cmask1_n']:,}) + INV ({record['inv_n']:,}) = {total:,}, not the window's "
                        f"{cycles:,} user-mode cycles within 10 % ({SDM_EVTSEL})")  # fmt: skip
    edge_high = min(record["cmask1_n"], record["inv_n"] + 1 + events_b + EDGE_HOST_SLACK)
    if not 1 <= record["edge_n"] <= edge_high:
        problems.append(f"EDGE counted {record['edge_n']:,} rising edges, want [1, {edge_high:,}] (at most the CMASK=1 "
                        f"cycles and the INV cycles + 1 + {events_b} interrupts + {EDGE_HOST_SLACK} host exits; "
                        f"{SDM_EVTSEL})")  # fmt: skip
    expected = "USR exact, OS ~0, CMASK=2 <= insns/2, CMASK=1 + INV = cycles, 1 <= EDGE <= min(CMASK=1, INV + 1)"
    if problems:
        starved = usr_short or any(record[k] == 0 for k in ("usr_n", "cycles_n", "cmask1_n", "cycles_b", "cmask2_n",
                                                              "inv_n", "edge_n"))  # fmt: skip
        explained = f"host-load: {contention}" if contention else watchdog_reason(host or {})
        if starved and explained:
            return skipped(f"{explained}: a counter of the filter window never counted; measured: "
                           f"{'; '.join(problems)}", expected, observed)  # fmt: skip
        return failed("; ".join(problems), expected, observed)
    return passed("USR/OS, CMASK, INV and EDGE behave as the SDM defines over the loop", expected, observed)


#: "KVM: x86/pmu: Disallow "fast" RDPMC for architectural Intel PMUs" (5728a4a0ea79), "Apply "fast" RDPMC only to
#: Intel PMUs" (d652981db08f) and "Don't ignore bits 31:30 for RDPMC index on AMD" (ecb490770ad4) came in with
#: kvm-x86-pmu-6.9 (Sean Christopherson's "[GIT PULL] KVM: x86: PMU changes for 6.9", based on v6.8-rc2, merged by
#: Paolo Bonzini's "KVM changes for Linux 6.9 merge window" on top of v6.8-rc7), so v6.9-rc1 is the first tag with
#: them: RDPMC with ECX[31] set #GPs. Before, KVM's kvm_pmu_rdpmc() honoured the "fast" flag on both vendors
#: (``mask = fast_mode ? ~0u : ~0ull``) and returned bits 31:0 of the count; upstream 6.8 (the base of Ubuntu
#: 24.04's 6.8.0-*) still does. That is what kvm-unit-tests x86/pmu.c check_rdpmc() still accepts ("fast-<i>",
#: report_skip on #GP); the KVM selftests (pmu_counters_test.c guest_rd_wr_counters()) require the #GP.
#: Distribution kernels older than 6.9 may carry the backport, so below 6.9 (or when the host kernel is unknown)
#: both answers are right; from 6.9 only the #GP is.
FAST_RDPMC_GP_KERNEL = (6, 9)
FAST_RDPMC_SOURCE = ("KVM 5728a4a0ea79 / d652981db08f / ecb490770ad4 (Linux 6.9): RDPMC with ECX[31] #GPs; before, "
                     "kvm_pmu_rdpmc() returned bits 31:0 (kvm-unit-tests check_rdpmc \"fast-<i>\")")  # fmt: skip
#: Fixed counters are written at full width whatever PERF_CAPABILITIES.FW_WRITE says: KVM intel_pmu_set_msr()
#: sign-extends bit 31 only for a GP counter written through IA32_PMCx (``!(msr & MSR_PMC_FULL_WIDTH_BIT)``) and
#: writes IA32_FIXED_CTRx as given; kvm-unit-tests check_rdpmc() writes ``val & fixed width`` and reads it back
#: ("fixed cntr-<i>"). The SDM's "sign-extended from bit 31" applies to IA32_PMCx alone.
FIXED_WRITE_SOURCE = "KVM intel_pmu_set_msr() writes IA32_FIXED_CTRx unextended; kvm-unit-tests check_rdpmc()"


def kernel_version(release: str | None) -> tuple[int, int] | None:
    """(major, minor) of a kernel release string such as "6.12.0" or "5.14.0-427.el9.x86_64", or None."""
    parts = (release or "").split(".")
    if len(parts) < 2 or not parts[0].isdigit():
        return None
    minor = "".join(c for c in parts[1] if c.isdigit())
    return (int(parts[0]), int(minor)) if minor else None


def rdpmc_fast(pmu: Expectation, view: GuestView, records: list[Record], host: dict[str, Any] | None = None) -> Verdict:
    """RDPMC with ECX[31] ("fast" read) of a counter holding bits above 31: #GP, or (only before Linux 6.9, see
    FAST_RDPMC_GP_KERNEL) exactly bits 31:0 of the count. Under the mediated vPMU the hardware answers (RDPMC is
    not intercepted when the guest has every counter): #GP, as on bare metal (SDM Vol. 2B RDPMC: #GP(0) if ECX is
    outside the valid range; APM Vol. 3 RDPMC likewise). A fixed counter must hold exactly the full-width value
    written to it, FW_WRITE or not (FIXED_WRITE_SOURCE); a GP counter's legacy write sign-extends bit 31."""
    verdict = gate(pmu, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    found = _records(records, "rdpmc_fast")
    if not found:
        return errored("semantics probe produced no rdpmc_fast record")
    host = host or {}
    version = kernel_version(host.get("kernel"))
    must_fault = host.get("vpmu_mode") == "mediated" or (version is not None and version >= FAST_RDPMC_GP_KERNEL)
    why = ("mediated vPMU" if host.get("vpmu_mode") == "mediated" else f"host kernel {host.get('kernel')}") \
        if must_fault else f"host kernel {host.get('kernel') or 'unknown'} (before 6.9 either answer)"  # fmt: skip
    problems: list[str] = []
    observed: dict[str, Any] = {}
    for label, record in _accessible(((r["counter"], r) for r in found), problems):
        if record["signal"] or not record.get("user_rdpmc"):
            return skipped(f"guest-kernel: plain RDPMC from user space is not available here (signal "
                           f"{record['signal']}, cap_user_rdpmc={record.get('user_rdpmc')}); arch.rdpmc judges "
                           "that")  # fmt: skip
        full = record["rdmsr"]
        if label.startswith("fixed") and full != record["written"]:
            problems.append(f"{label}: wrote {record['written']:#x}, RDMSR reads {full:#x}: a fixed counter keeps the "
                            f"full value written ({FIXED_WRITE_SOURCE})")  # fmt: skip
            continue
        if full >> 32 == 0:
            return errored(f"{label}: the counter holds {full:#x}, nothing above bit 31 to tell a fast read apart")
        if record["fast_signal"]:
            observed[label] = "#GP"
            continue
        observed[label] = record["fast"]
        if must_fault:
            problems.append(f"{label}: RDPMC({record['index'] | 1 << 31:#x}) returned {record['fast']:#x}, want #GP "
                            f"({why}; {FAST_RDPMC_SOURCE})")  # fmt: skip
        elif record["fast"] != full & 0xFFFFFFFF:
            problems.append(f"{label}: fast RDPMC returned {record['fast']:#x}, want #GP or bits 31:0 of "
                            f"{full:#x} = {full & 0xFFFFFFFF:#x} ({FAST_RDPMC_SOURCE})")  # fmt: skip
    expected = "#GP" if must_fault else "#GP or bits 31:0"
    if problems:
        return failed("; ".join(problems), expected, observed)
    return passed(f"fast RDPMC answers as this KVM must ({why})", expected, observed)


#: KVM counts the instructions it skips or emulates for the guest since "KVM: x86: Update vPMCs when retiring
#: instructions" (9cd803d496e7) and "... retiring branch instructions" (018d70ffcfec), Linux 5.17:
#: kvm_skip_emulated_instruction() -> kvm_pmu_instruction_retired(); x86_emulate_instruction() -> also
#: kvm_pmu_branch_retired() for a branch. Older hosts lose one count per exiting instruction.
EMULATED_COUNT_KERNEL = (5, 17)
EMULATED_COUNT_SOURCE = (
    "KVM 9cd803d496e7 (Linux 5.17): kvm_skip_emulated_instruction() -> kvm_pmu_instruction_retired()"
)


def emulated_cpuid(
    pmu: Expectation,
    view: GuestView,
    records: list[Record],
    errata: OvercountErrata = NO_ERRATA,
    host: dict[str, Any] | None = None,
    contention: str | None = None,
) -> Verdict:
    """A user-mode loop of CPUID (which always exits to KVM) counts exactly: CPUID_LOOP.delta_instructions(N)
    instructions and N branches over the N-0 difference, so instruction counting survives N VM exits
    (kvm-unit-tests check_emulated_instr() counts 5 CPUIDs in its blob; KVM counts the skipped instruction,
    EMULATED_COUNT_SOURCE). Up to one count per guest interrupt/exception in a window (WindowEvents). AMD and the Intel
    Atoms with the VM-exit overcount erratum: up to one more instruction and branch per exit (VMRUN / VM-entry may
    retire as a guest instruction; kvm-unit-tests has no exact checks on AMD), plus bounds.event_bounds' slack."""
    verdict = gate(pmu, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    version = kernel_version((host or {}).get("kernel"))
    if version is not None and version < EMULATED_COUNT_KERNEL:
        return skipped(f"kvm-limit: host kernel {(host or {}).get('kernel')} does not count instructions KVM skips "
                       f"or emulates ({EMULATED_COUNT_SOURCE})")  # fmt: skip
    record = next(iter(_records(records, "cpuid_loop")), None)
    if record is None:
        return errored("semantics probe produced no cpuid_loop record")
    access = _access_problem(record)
    if access:
        return failed(access, "counter MSRs accessible", None)
    n = int(record["iterations"])
    window = window_events(record)
    exits = n if view.amd or errata.covers("instructions") else 0
    problems: list[str] = []
    shortfalls: list[str] = []
    observed: dict[str, Any] = {}
    for what, exact, value, relax in (
        ("instructions", CPUID_LOOP.delta_instructions(n), record["instructions_n"] - record["instructions_0"],
         exits),
        ("branches", CPUID_LOOP.delta_branches(n), record["branches_n"] - record["branches_0"],
         n if view.amd or errata.covers("branch_instructions") else 0),
    ):  # fmt: skip
        low, high = exact - (window.zero or 0), exact + (window.n or 0) + (relax + AMD_HIGH_SLACK if relax else 0)
        source = (
            f"exact: {CPUID_LOOP.insns_per_iter} instructions / 1 branch per CPUID iteration; {EMULATED_COUNT_SOURCE}"
        )
        if relax:
            source += "; + one per VM exit (VMRUN / VM-entry overcount)"
        if not window.quiet:
            source += f"; {INTERRUPT_OVERCOUNT_SOURCE}: {window.text()}"
        observed[what] = value
        problem = Bounds(low, high, f"{what} over {n:,} CPUIDs (N-0)", source).check(value)
        if problem:
            (shortfalls if value < low else problems).append(problem)
    expected = f"instructions {CPUID_LOOP.delta_instructions(n):,}, branches {CPUID_LOOP.delta_branches(n):,} (N-0)"
    verdict = shortfall_verdict(contention, shortfalls, problems, expected, observed)
    if verdict:
        return verdict
    return passed(f"{n:,} CPUID exits counted exactly", expected, observed)


#: The floor of branch misses over the random-branch window: each of the N jz follows a fresh pseudo-random bit, which
#: no predictor that has not seen the sequence can call better than chance (~N/2 misses); a tenth of that is the
#: floor, far above KUT's ">= 1" and far below what any working predictor-plus-counter gives.
BRANCH_MISS_FLOOR_DIVISOR = 20


def branch_miss_floor(
    pmu: Expectation,
    view: GuestView,
    records: list[Record],
    errata: OvercountErrata = NO_ERRATA,
    contention: str | None = None,
) -> Verdict:
    """Branch misses have a floor (kvm-unit-tests x86/pmu.c: branch misses >= 1, forced there by IBPB + an indirect
    jump from ring 0): over RANDOM_BRANCHES (N conditional branches on pseudo-random bits, user mode) the
    branch-misses event (Intel 0xC5, AMD 0xC3) counts at least N/BRANCH_MISS_FLOOR_DIVISOR and at most the branches;
    the branches event counts 2N exactly over N-0 (the workload ran as generated; WindowEvents allowance)."""
    verdict = gate(pmu, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    perfmon = view.caps.arch_perfmon
    if perfmon is not None and not perfmon.events.get("branch_misses"):
        return skipped("not-enumerated: CPUID.0AH does not offer the branch-misses event (EBX[6] or EAX[31:24])")
    record = next(iter(_records(records, "branch_misses")), None)
    if record is None:
        return errored("semantics probe produced no branch_misses record")
    if "error" in record and "failed_msr" not in record:
        return errored(f"semantics probe: {errno_text(record)}")
    access = _access_problem(record)
    if access:
        return failed(access, "counter MSRs accessible", None)
    n = int(record["iterations"])
    window = window_events(record)
    misses = record["misses_n"] - record["misses_0"]
    branches = record["branches_n"] - record["branches_0"]
    observed = {"misses": misses, "branches": branches}
    problems: list[str] = []
    shortfalls: list[str] = []
    exact = RANDOM_BRANCHES.delta_branches(n)
    relaxed = view.amd or errata.covers("branch_instructions")
    low, high = exact - (window.zero or 0), exact + (window.n or 0) + (AMD_HIGH_SLACK if relaxed else 0)
    source = "exact: 2 conditional branches per iteration"
    source += "" if window.quiet else f"; {INTERRUPT_OVERCOUNT_SOURCE}: {window.text()}"
    problem = Bounds(low, high, "branches (N-0)", source).check(branches)
    if problem:
        (shortfalls if branches < low else problems).append(problem)
    floor = n // BRANCH_MISS_FLOOR_DIVISOR
    problem = Bounds(floor, max(branches, floor), "branch misses (N-0)", f"floor N/{BRANCH_MISS_FLOOR_DIVISOR}: "
                     f"{n:,} branches on pseudo-random bits mispredict ~half the time; at most the branches; "
                     "kvm-unit-tests: branch misses >= 1").check(misses)  # fmt: skip
    if problem:
        (shortfalls if misses < floor else problems).append(problem)
    expected = f"misses >= {floor:,}, branches {exact:,} (N-0)"
    verdict = shortfall_verdict(contention, shortfalls, problems, expected, observed)
    if verdict:
        return verdict
    return passed(f"{misses:,} branch misses over {n:,} unpredictable branches", expected, observed)


FEP_SOURCE = ("KVM x86.c handle_ud(): the forced-emulation prefix (ud2; \"kvm\") is honoured only with "
              "kvm.force_emulation_prefix set; x86_emulate_instruction() -> kvm_pmu_instruction_retired(), "
              "kvm_pmu_branch_retired() (9cd803d496e7, 018d70ffcfec)")  # fmt: skip


def emulated_fep(
    pmu: Expectation,
    view: GuestView,
    records: list[Record],
    errata: OvercountErrata = NO_ERRATA,
    host: dict[str, Any] | None = None,
    contention: str | None = None,
) -> Verdict:
    """Instructions KVM emulates are counted (kvm-unit-tests check_emulated_instr(), KVM selftests' KVM_FEP
    variants): a user-mode loop of ``dec`` + a forced-emulation ``jnz`` counts FEP_LOOP.delta_instructions(N)
    instructions and N branches over N-0 (WindowEvents allowance; AMD / Atom errata: + one per exit). SKIP where the
    host does not honour the prefix (kvm.force_emulation_prefix off) or predates emulated-instruction counting."""
    verdict = gate(pmu, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    host = host or {}
    if not force_emulation_prefix(host):
        value = (host.get("kvm") or {}).get("force_emulation_prefix")
        return skipped(f"host: kvm.force_emulation_prefix={value}: KVM emulates behind the forced-emulation prefix "
                       "only when it is set (arch/x86/kvm/x86.c handle_ud())")  # fmt: skip
    version = kernel_version(host.get("kernel"))
    if version is not None and version < EMULATED_COUNT_KERNEL:
        return skipped(f"kvm-limit: host kernel {host.get('kernel')} does not count instructions KVM emulates "
                       f"({EMULATED_COUNT_SOURCE})")  # fmt: skip
    record = next(iter(_records(records, "fep_loop")), None)
    if record is None:
        return errored("semantics probe produced no fep_loop record")
    if "skipped" in record:
        return skipped(f"host: the probe ran where {record['skipped']} (results judged again with other host facts)")
    access = _access_problem(record)
    if access:
        return failed(access, "counter MSRs accessible", None)
    if record["signal"]:
        return failed(f"the forced-emulation prefix raised signal {record['signal']} in user mode although "
                      f"kvm.force_emulation_prefix is set ({FEP_SOURCE})", "emulated", record["signal"])  # fmt: skip
    n = int(record["iterations"])
    window = window_events(record)
    problems: list[str] = []
    shortfalls: list[str] = []
    observed: dict[str, Any] = {}
    for what, exact, value, relax in (
        ("instructions", FEP_LOOP.delta_instructions(n), record["instructions_n"] - record["instructions_0"],
         n if view.amd or errata.covers("instructions") else 0),
        ("branches", FEP_LOOP.delta_branches(n), record["branches_n"] - record["branches_0"],
         n if view.amd or errata.covers("branch_instructions") else 0),
    ):  # fmt: skip
        low, high = exact - (window.zero or 0), exact + (window.n or 0) + (relax + AMD_HIGH_SLACK if relax else 0)
        source = f"exact: dec + an emulated jnz per iteration; {FEP_SOURCE}"
        if relax:
            source += "; + one per VM exit (VMRUN / VM-entry overcount)"
        if not window.quiet:
            source += f"; {INTERRUPT_OVERCOUNT_SOURCE}: {window.text()}"
        observed[what] = value
        problem = Bounds(low, high, f"{what} over {n:,} emulated jnz (N-0)", source).check(value)
        if problem:
            (shortfalls if value < low else problems).append(problem)
    overflow = next(iter(_records(records, "fep_overflow")), None)
    if overflow is None:
        return errored("semantics probe produced no fep_overflow record")
    problems += _fep_overflow_problems(overflow, window, view.amd or errata.covers("branch_instructions"))
    observed["overflow_final"] = _signed(overflow.get("final", 0), overflow.get("width", 48))
    expected = (f"instructions {FEP_LOOP.delta_instructions(n):,}, branches {FEP_LOOP.delta_branches(n):,} (N-0); "
                f"branches preset to wrap mid-loop read {n // 2:,} with status bit 1 set")  # fmt: skip
    verdict = shortfall_verdict(contention, shortfalls, problems, expected, observed)
    if verdict:
        return verdict
    return passed(f"{n:,} forced emulations counted exactly, and a wrap through them sets the status bit", expected,
                  observed)  # fmt: skip


def _fep_overflow_problems(record: Record, calibration: Any, relaxed: bool) -> list[str]:
    """The branches counter, preset to -(0-window branches + N/2), wraps on an emulated jnz (kvm-unit-tests
    check_emulated_instr() "branch counter overflow"; KVM kvm_pmu_incr_counter(), reprogram_counter() ->
    __kvm_perf_overflow()): it reads N/2 (- the 0 window's interrupts, + this window's), status bit 1 set and then
    cleared alone by the clear MSR."""
    access = _access_problem(record)
    if access:
        return [f"overflow window: {access}"]
    if record["signal"]:
        return [f"overflow window: signal {record['signal']} ({FEP_SOURCE})"]
    n = int(record["iterations"])
    events = sum(max(0, record.get(k, 0) or 0) for k in ("irq_n", "faults_n", "switches_n"))
    low, high = n // 2 - (calibration.zero or 0), n // 2 + events
    if relaxed:
        low, high = low - AMD_LOW_SLACK, high + n + AMD_HIGH_SLACK
    final = _signed(record["final"], record["width"])
    problems = []
    problem = Bounds(low, high, "branches after the wrap through emulation", f"{FEP_SOURCE}; preset wraps at "
                     "N/2").check(final)  # fmt: skip
    if problem:
        problems.append(problem)
    return problems + _status_problems({**record, "bit": 1}, "emulated wrap", "kvm-unit-tests check_emulated_instr()")


TSX_SOURCE = ("SDM Vol. 3B, \"Performance Monitoring and Intel TSX\": IN_TX counts inside transactional regions, "
              "IN_TXCP everywhere but in aborted regions; kvm-unit-tests check_tsx_cycles(): count > 0")  # fmt: skip
#: Why a counter that ignores its qualifier reads what the plain cycles counter reads: perf's hsw_hw_config()
#: (arch/x86/events/intel/core.c) copies HSW_IN_TX / HSW_IN_TX_CHECKPOINTED into the hardware config only when the
#: host has RTM or HLE, and drops them silently otherwise.
TSX_DROPPED = (
    "the qualifier was dropped on the way to the hardware (perf hsw_hw_config() drops it on a host without RTM and HLE)"
)


def tsx_cycles(pmu: Expectation, view: GuestView, records: list[Record], contention: str | None = None) -> Verdict:
    """Intel with RTM in the guest: cycles with IN_TX on GP counter 0, plain cycles on GP counter 1 and cycles with
    IN_TXCP on GP counter 2 (the only counter that supports it), over ``transactions`` transactions that each spin
    ``spin`` dependent dec/jnz iterations and then xabort $0xff, followed by ``pad`` iterations outside any
    transaction. KVM lets the guest set these bits only with HLE or RTM in its CPUID (intel_pmu_refresh():
    raw_event_mask gains HSW_IN_TX | HSW_IN_TX_CHECKPOINTED).

    Raw CPUID RTM does not mean transactions run (a guest kernel with tsx=off sets TSX_CTRL.RTM_DISABLE, which KVM
    passes through while its CPUID answer keeps RTM; a host's TSX_FORCE_ABORT aborts every XBEGIN), so the probe counts
    ``explicit_aborts``, the transactions whose abort status says they reached the xabort, and the rule SKIPs when none
    did. Each dec depends on the one before, so each iteration takes >= 1 cycle: an explicit abort spent >= ``spin``
    cycles inside its transaction, and every transaction is followed by >= ``pad`` cycles outside one (pad = 4 x
    spin, so the non-transactional part is most of the window). With half of each as slack for counter skew:

    * cycles >= transactions x pad / 2 (the window's non-transactional part alone);
    * explicit x spin / 2 <= IN_TX <= cycles - transactions x pad / 2: a counter that ignores IN_TX counts the
      non-transactional part too, reads about ``cycles`` and exceeds the upper bound by >= transactions x pad / 2;
    * transactions x pad / 2 <= IN_TXCP <= cycles - explicit x spin / 2: the aborted regions' cycles are dropped, so
      a counter that ignores IN_TXCP, reading about ``cycles``, exceeds the upper bound by >= explicit x spin / 2.
    """
    verdict = gate(pmu, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    record = next(iter(_records(records, "tsx")), None)
    if record is None:
        return errored("semantics probe produced no tsx record")
    if "skipped" in record:
        return skipped(f"not-enumerated: {record['skipped']} in the guest (the host or the profile offers no RTM)")
    if record.get("cpuid7_edx", 0) & (1 << 11):
        # CPUID.07H:EDX[11] RTM_ALWAYS_ABORT: XBEGIN aborts at once (TSX_FORCE_ABORT microcode), so there may be no
        # cycle inside a transaction to count.
        return skipped("not-enumerated: CPUID.07H:EDX[11] RTM_ALWAYS_ABORT is set: every transaction aborts at once")
    expected = "0 < IN_TX, IN_TXCP < cycles, within the bounds of the transactional and non-transactional parts"
    access = _access_problem(record)
    if access:
        return failed(f"{access} (IN_TX/IN_TXCP must be accepted with RTM enumerated)", expected, None)
    n, spin, pad, explicit = (int(record[k]) for k in ("transactions", "spin", "pad", "explicit_aborts"))
    in_tx, cycles, in_txcp = record["in_tx"], record["cycles"], record["in_txcp"]
    observed = {"in_tx": in_tx, "cycles": cycles, "in_txcp": in_txcp, "explicit_aborts": explicit}
    if explicit == 0:
        if record.get("cpuinfo_rtm") == 0:
            why = ("guest-kernel: the guest kernel lists no rtm flag (tsx=off: TSX_CTRL.RTM_DISABLE, which KVM passes "
                   "through while its CPUID answer keeps RTM)")  # fmt: skip
        elif record.get("cpuinfo_rtm") == 1:
            why = "host: TSX is disabled or force-aborted below the guest (TSX_CTRL / TSX_FORCE_ABORT)"
        else:
            why = "host: TSX is disabled below the guest or by its kernel (/proc/cpuinfo unreadable)"
        return skipped(f"{why}: none of the {n:,} transactions reached its xabort, so IN_TX/IN_TXCP had no "
                       "transactional cycle to count", expected, observed)  # fmt: skip
    outside, inside = n * pad // 2, explicit * spin // 2
    shortfalls: list[str] = []
    others: list[str] = []
    # The upper bounds hang on the cycles count: when it falls short, only that shortfall is reported.
    cycles_ok = cycles >= outside
    if not cycles_ok:
        shortfalls.append(f"cycles {cycles:,} < {outside:,}, half the {n:,} x {pad} dependent iterations outside "
                          "transactions")  # fmt: skip
    if in_tx < inside:
        shortfalls.append(f"IN_TX {in_tx:,} < {inside:,}, half the {explicit:,} x {spin} dependent iterations inside "
                          f"the transactions that reached xabort ({TSX_SOURCE})")  # fmt: skip
    elif cycles_ok and in_tx > cycles - outside:
        others.append(f"IN_TX {in_tx:,} > cycles {cycles:,} - {outside:,}: it counted the non-transactional part of "
                      f"the window, i.e. cycles outside transactions; {TSX_DROPPED} ({TSX_SOURCE})")  # fmt: skip
    if in_txcp < outside:
        shortfalls.append(f"IN_TXCP {in_txcp:,} < {outside:,}, half the {n:,} x {pad} dependent iterations outside "
                          f"transactions ({TSX_SOURCE})")  # fmt: skip
    elif cycles_ok and in_txcp > cycles - inside:
        others.append(f"IN_TXCP {in_txcp:,} > cycles {cycles:,} - {inside:,}: it kept the cycles of the "
                      f"{explicit:,} aborted transactions; {TSX_DROPPED} ({TSX_SOURCE})")  # fmt: skip
    if shortfalls or others:
        verdict = contention_skip(contention, shortfalls, others, expected, observed)
        return verdict or failed("; ".join(shortfalls + others), expected, observed)
    return passed(f"IN_TX and IN_TXCP count within the transactional and non-transactional shares of "
                  f"{cycles:,} cycles ({explicit:,} of {n:,} transactions reached xabort)", expected,
                  observed)  # fmt: skip


MISC_ENABLE_PEBS_UNAVAIL = 1 << 12
CPUID1_EDX_DS = 1 << 21
CPUID1_ECX_PDCM = 1 << 15


#: "KVM: x86: Give host userspace full control of MSR_IA32_MISC_ENABLES" (9fc222967a39, pushed to kvm/next in June
#: 2022, Linux 6.0) removed intel_pmu_refresh()'s ``ia32_misc_enable_msr &= ~MSR_IA32_MISC_ENABLE_PEBS_UNAVAIL`` and
#: made kvm_vcpu_reset() set PEBS_UNAVAIL | BTS_UNAVAIL: from 6.0 the bit is whatever the VMM writes with KVM_SET_MSRS
#: (QEMU: MSR_IA32_MISC_ENABLE_DEFAULT at vCPU reset), before 6.0 KVM cleared it when it gave the vCPU a PEBS format.
MISC_ENABLE_VMM_KERNEL = (6, 0)
MISC_ENABLE_VMM_SOURCE = "KVM 9fc222967a39 (Linux 6.0): MISC_ENABLE's PEBS_UNAVAIL is the VMM's to set"


def misc_enable_pebs(
    pmu: Expectation, view: GuestView, records: list[Record], host: dict[str, Any] | None = None
) -> Verdict:
    """Where the guest enumerates PEBS (CPUID.01H:EDX.DS[21], PDCM and a non-zero PEBS format in
    IA32_PERF_CAPABILITIES[11:8]), IA32_MISC_ENABLE bit 12 (PEBS_UNAVAIL, "PEBS not supported", SDM Vol. 4) must be
    clear: a Linux guest uses PEBS only with the bit clear (arch/x86/kernel/cpu/intel.c sets X86_FEATURE_PEBS only
    then). kvm-unit-tests pmu_pebs.c skips on the bit; KVM selftests msrs_test.

    Who owns the bit depends on the host kernel (MISC_ENABLE_VMM_KERNEL): before Linux 6.0 KVM cleared it in
    intel_pmu_refresh() when it gave the vCPU a PEBS format; since 9fc222967a39 KVM sets it at vCPU reset and leaves
    it to the VMM, so on such a host a FAIL is a VMM-configuration finding (QEMU's MISC_ENABLE reset value, or a VMM
    that never writes MISC_ENABLE and keeps KVM's reset value), not a KVM bug.

    Only this direction is judged: without PEBS the bit's value depends on the VMM version (QEMU writes MISC_ENABLE at
    vCPU reset as the host, which KVM's read-only check does not cover; later QEMU sets PEBS_UNAVAIL itself when DS is
    absent), so a set or clear bit there is no verdict on KVM."""
    verdict = gate(pmu, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    record = next(iter(_records(records, "misc_enable")), None)
    if record is None:
        return errored("semantics probe produced no misc_enable record")
    caps = record.get("perf_capabilities")
    pebs = (record["cpuid1_edx"] & CPUID1_EDX_DS and record["cpuid1_ecx"] & CPUID1_ECX_PDCM and caps is not None
            and (caps >> 8) & 0xF)  # fmt: skip
    if not pebs:
        return skipped("not-enumerated: the guest has no PEBS (CPUID.01H:EDX.DS, PDCM, IA32_PERF_CAPABILITIES[11:8]); "
                       "MISC_ENABLE[12] is then the VMM's reset value, not KVM's answer")  # fmt: skip
    if "error" in record:
        return failed(f"IA32_MISC_ENABLE: {errno_text(record)}", "readable", None)
    observed = {"misc_enable": record["value"], "pebs_format": (caps >> 8) & 0xF}
    if record["value"] & MISC_ENABLE_PEBS_UNAVAIL:
        kernel = (host or {}).get("kernel")
        version = kernel_version(kernel)
        if version is None:
            owner = (f"host kernel {kernel or 'unknown'}: the VMM's MISC_ENABLE setting on Linux >= 6.0 "
                     f"({MISC_ENABLE_VMM_SOURCE}), KVM intel_pmu_refresh() before")  # fmt: skip
        elif version >= MISC_ENABLE_VMM_KERNEL:
            owner = (f"vmm: host kernel {kernel} leaves the bit to userspace ({MISC_ENABLE_VMM_SOURCE}), so the VMM "
                     "(QEMU's MISC_ENABLE reset value) set it or never cleared KVM's reset value")  # fmt: skip
        else:
            owner = f"host kernel {kernel}: KVM intel_pmu_refresh() clears it when it gives the vCPU a PEBS format"
        return failed(f"IA32_MISC_ENABLE {record['value']:#x} has PEBS_UNAVAIL (bit 12) set while the guest enumerates "
                      f"PEBS format {(caps >> 8) & 0xF}, so the guest kernel will not use PEBS ({owner})",
                      "bit 12 clear", observed)  # fmt: skip
    return passed("PEBS enumerated and MISC_ENABLE.PEBS_UNAVAIL clear", "bit 12 clear", observed)
