"""Architectural-counter verdicts (guest_tests/test_arch_counters.py): counts, widths, RDPMC, global control, PMIs.

Each general-purpose and fixed counter counts the generated loop within bounds (harness.judge.bounds); a disabled
counter stays still; counter widths, MSR ranges and RDPMC behave as CPUID says; IA32_PERF_GLOBAL_CTRL gates exactly;
overflow sets GLOBAL_STATUS; sampling delivers PMIs. Each rule cites the SDM/APM section, kernel source or
kvm-unit-tests x86/pmu.c line it follows next to the code and, shortened, in its FAIL reason.
"""

from __future__ import annotations

import errno as errno_mod
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from harness.cpu.caps import ArchPerfmon
from harness.judge.bounds import DIFFERENTIAL_EVENTS, NO_ERRATA, OvercountErrata, event_bounds, window_events
from harness.judge.expectations import Expectation
from harness.judge.verdict import (
    Record,
    Verdict,
    contention_skip,
    errno_text,
    errored,
    failed,
    first_record,
    gate,
    passed,
    signal_name,
    skipped,
)
from harness.probe.events import AMD_EVENTS, EVENT_FIXED_COUNTER, FIXED_EVENTS, FIXED_INDEX_BIT
from harness.probe.guest_view import GuestView
from harness.probe.host_watchdog import HELD_BACK_WATCHDOG, WATCHDOG_REASON, watchdog_reason
from harness.probe.workloads import LOOP


@dataclass(frozen=True)
class MemberJudgement:
    """One member's value and problem; ``short``: the problem is a count below the range with time_running ==
    time_enabled (what a host counter that silently stopped gives), as opposed to an overcount, a misplacement or
    guest-visible multiplexing."""

    value: int
    problem: str | None
    short: bool


def _judge_member(record: Record, event: str, vendor_amd: bool, errata: OvercountErrata | bool) -> MemberJudgement:
    n = int(record["iterations"])
    bounds = event_bounds(event, n, vendor_amd, errata, int(record.get("tsc_n", 0)), window_events(record))
    value = record["value_n"] - record["value_0"] if event in DIFFERENTIAL_EVENTS else record["value_n"]
    problem = bounds.check(value)
    if problem is None and record["running_n"] < record["enabled_n"]:
        problem = (f"guest-visible multiplexing: time_running {record['running_n']} < time_enabled "
                   f"{record['enabled_n']} with no more events than counters")  # fmt: skip
    silent = record["running_n"] == record["enabled_n"]  # a host's silent drop; a multiplexed guest is no such thing
    return MemberJudgement(value, problem, problem is not None and value < bounds.low and silent)


def _count_records(records: Iterable[Record], set_name: str, event: str) -> list[Record]:
    return [r for r in records if r.get("kind") == "count" and r.get("set") == set_name and r.get("event") == event]


def _open_error(found: list[Record]) -> Verdict | None:
    broken = [r for r in found if "error" in r]
    if broken:
        record = broken[0]
        opened = record.get("opened")
        return failed(f"perf_event_open of {record.get('event')} (x{record.get('copies')}, {opened} opened) failed: "
                      f"{errno_text(record)}", "counts", errno_text(record))  # fmt: skip
    return None


def held_back_note(record: Record, host: dict[str, Any] | None = None) -> str | None:
    """Why the probe opened fewer copies than counters, from the record itself (``held_back``/``held_back_for``)."""
    if not record.get("held_back"):
        return None
    if record.get("held_back_for") == HELD_BACK_WATCHDOG:
        return watchdog_reason(host or {}) or WATCHDOG_REASON.format(value="1")
    return f"{record['held_back']} copy held back ({record.get('held_back_for') or 'no reason recorded'})"


def _placement(found: list[Record], counters: int, event: str) -> tuple[dict[int, Record], list[Record], list[str]]:
    """Where the group's members landed (RDPMC index from perf's user page; bit 30 = fixed counter).

    Returns the members on GP counters by index, the members on the event's own fixed counter, and problems: a
    member on another fixed counter or beyond the GP counters, two members on one counter, or a member perf did not
    place at all while the group counted.
    """
    on_gp: dict[int, Record] = {}
    on_fixed: list[Record] = []
    problems: list[str] = []
    own_fixed = EVENT_FIXED_COUNTER.get(event)
    for record in found:
        index = record["rdpmc_index"]
        if index < 0:
            problems.append(f"member {record.get('member')}: not on any counter (user-page index 0)")
        elif index & FIXED_INDEX_BIT:
            if own_fixed is None or index != FIXED_INDEX_BIT | own_fixed:
                problems.append(f"member {record.get('member')}: on fixed counter {index & ~FIXED_INDEX_BIT}, "
                                f"which does not count {event}")  # fmt: skip
            else:
                on_fixed.append(record)
        elif index >= counters:
            problems.append(f"member {record.get('member')}: on GP{index}, beyond the {counters} enumerated")
        elif index in on_gp:
            problems.append(f"GP{index}: members {on_gp[index].get('member')} and {record.get('member')} both on it")
        else:
            on_gp[index] = record
    return on_gp, on_fixed, problems


def _judge_unplaced(
    found: list[Record], event: str, view: GuestView, errata: OvercountErrata | bool, counters: int
) -> Verdict:
    """No member has a user-page index (perf publishes 0 when user RDPMC is off: x86_pmu_event_idx() needs
    PERF_EVENT_FLAG_USER_READ_CNT), so which counter each copy used is unknown: judge the values alone."""
    observed: dict[str, Any] = {}
    problems = []
    for record in found:
        judged = _judge_member(record, event, view.amd, errata)
        observed[f"member{record.get('member')}"] = judged.value
        if judged.problem:
            problems.append(f"member {record.get('member')}: {judged.problem}")
    bounds = event_bounds(event, int(found[0]["iterations"]), view.amd, errata, int(found[0].get("tsc_n", 0)),
                          window_events(found[0]))  # fmt: skip
    expected = f"[{bounds.low:,.0f}, {bounds.high:,.0f}] on each of {counters} GP counters ({bounds.source})"
    note = "counter placement unknown: perf's user page gives no RDPMC index (guest rdpmc sysfs knob off?)"
    if problems:
        return failed("; ".join(problems) + f" ({note})", expected, observed)
    return passed(f"{event} within bounds on all {len(found)} group members ({note})", expected, observed)


def gp_event(
    expectation: Expectation,
    view: GuestView,
    records: list[Record],
    event: str,
    errata: OvercountErrata | bool = NO_ERRATA,
    host: dict[str, Any] | None = None,
    contention: str | None = None,
) -> Verdict:
    """Every GP counter counts ``event`` over the loop within the event's bounds (kvm-unit-tests check_gp_counters).

    Copies are judged where they actually landed (perf's user-page index): perf may put one copy on the event's
    fixed counter (instructions FC0, cycles FC1, and since Linux 6.7 ref-cycles 0x013c on FC2 of Golden Cove and
    later), and the probe may hold a copy back (``held_back``: the host NMI watchdog's counter). Each such copy
    leaves one GP counter unmeasured; the verdict accepts exactly that many, names them, and judges the member on
    the fixed counter like the others. Counts that fall short only while a host load competes for the counters under
    the perf-based vPMU (``contention``) are that vPMU's documented behaviour: SKIP (contention_skip).
    """
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    counters = _gp_counters(view)
    if view.caps.arch_perfmon is not None and not view.caps.arch_perfmon.events.get(event, False):
        return skipped(f"not-enumerated: CPUID.0AH does not enumerate event {event}")
    found = _count_records(records, "gp", event)
    if not found:
        if view.amd and event not in AMD_EVENTS:
            return skipped(f"not-applicable: no AMD encoding for the architectural event {event}")
        return errored(f"counters probe produced no record for {event}")
    verdict = _open_error(found)
    if verdict:
        return verdict
    if all(r["rdpmc_index"] < 0 for r in found):
        return _judge_unplaced(found, event, view, errata, counters)
    on_gp, on_fixed, problems = _placement(found, counters, event)
    held_back = int(found[0].get("held_back", 0))
    observed: dict[str, Any] = {}
    shortfalls: list[str] = []
    labelled = [(f"GP{index}", f"gp{index}", record) for index, record in sorted(on_gp.items())]
    labelled += [(f"fixed {r['rdpmc_index'] & ~FIXED_INDEX_BIT}", f"fixed{r['rdpmc_index'] & ~FIXED_INDEX_BIT}", r)
                 for r in on_fixed]  # fmt: skip
    for label, key, record in labelled:
        judged = _judge_member(record, event, view.amd, errata)
        observed[key] = judged.value
        if judged.problem:
            (shortfalls if judged.short else problems).append(f"{label}: {judged.problem}")
    unmeasured = [c for c in range(counters) if c not in on_gp]
    # Copies meant for GP counters: all but those on the fixed counter. Fewer than counters only because one took the
    # fixed counter without an extra copy for it, or the probe held one back; anything else is a missing member.
    copies = int(found[0].get("copies", len(found)))
    required = min(counters, copies - len(on_fixed))
    excused = min(counters - required, len(on_fixed) + held_back)
    if len(unmeasured) > excused:
        problems.append(f"GP{', GP'.join(map(str, unmeasured))}: no group member landed on it (indices "
                        f"{sorted(on_gp)}, {len(on_fixed)} on the fixed counter, {held_back} held back)")  # fmt: skip
    notes = []
    if unmeasured and len(unmeasured) <= excused:
        why = []
        if on_fixed and copies <= counters:
            why.append(f"a copy landed on fixed counter {EVENT_FIXED_COUNTER[event]}")
        if held_back:
            why.append(held_back_note(found[0], host) or "")
        notes.append(f"GP{', GP'.join(map(str, unmeasured))} not measured: {'; '.join(why)}")
    n = int(found[0].get("iterations", 0))
    bounds = event_bounds(event, n, view.amd, errata, int(found[0].get("tsc_n", 0)), window_events(found[0]))
    measured = len(on_gp)
    expected = f"[{bounds.low:,.0f}, {bounds.high:,.0f}] on each of {counters} GP counters ({bounds.source})"
    verdict = contention_skip(contention, shortfalls, problems, expected, observed)
    if verdict:
        return verdict
    problems = shortfalls + problems
    if problems:
        return failed("; ".join(problems + notes), expected, observed)
    where = f"all {counters} GP counters" if measured == counters else f"{measured} of {counters} GP counters"
    fixed = f" and fixed counter {EVENT_FIXED_COUNTER[event]}" if on_fixed else ""
    reason = f"{event} within bounds on {where}{fixed}"
    return passed(reason + (f" ({'; '.join(notes)})" if notes else ""), expected, observed)


def _gp_counters(view: GuestView) -> int:
    if view.caps.arch_perfmon is not None:
        return view.caps.arch_perfmon.gp_counters
    return view.caps.amd.core_counters if view.caps.amd else 0


def fixed_counter(
    expectation: Expectation,
    view: GuestView,
    records: list[Record],
    index: int,
    errata: OvercountErrata | bool = NO_ERRATA,
    contention: str | None = None,
) -> Verdict:
    """Fixed counter ``index`` counts its event within bounds, on the fixed counter (RDPMC index bit 30); a shortfall
    while a host load competes for the counters under the perf-based vPMU is a SKIP (``contention``, as gp_event)."""
    if view.amd and expectation.available:
        return skipped("not-applicable: AMD has no fixed-function counters")
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    perfmon = view.caps.arch_perfmon
    assert perfmon is not None
    if not (perfmon.fixed_counter_mask >> index) & 1:
        return skipped(f"not-enumerated: fixed counter {index} (CPUID.0AH: mask {perfmon.fixed_counter_mask:#x}, "
                       f"EDX[4:0]={perfmon.fixed_counters})")  # fmt: skip
    event = FIXED_EVENTS[index]
    found = _count_records(records, "fixed", f"fixed{index}")
    if not found:
        return errored(f"counters probe produced no record for fixed counter {index}")
    verdict = _open_error(found)
    if verdict:
        return verdict
    record = found[0]
    unplaced = record["rdpmc_index"] < 0
    if not unplaced and record["rdpmc_index"] != (FIXED_INDEX_BIT | index):
        return failed(f"fixed{index} event landed on RDPMC index {record['rdpmc_index']:#x}, not fixed counter "
                      f"{index} ({FIXED_INDEX_BIT | index:#x}); perf prefers the fixed counter when free",
                      f"{FIXED_INDEX_BIT | index:#x}", record["rdpmc_index"])  # fmt: skip
    judged = _judge_member(record, event, False, errata)
    bounds = event_bounds(event, int(record["iterations"]), False, errata, int(record.get("tsc_n", 0)),
                          window_events(record))  # fmt: skip
    expected = f"[{bounds.low:,.0f}, {bounds.high:,.0f}] ({bounds.source})"
    note = " (counter placement unknown: perf's user page gives no RDPMC index)" if unplaced else ""
    if judged.problem:
        problem = f"fixed{index}: {judged.problem}{note}"
        verdict = contention_skip(contention, [problem] if judged.short else [], [] if judged.short else [problem],
                                  expected, judged.value)  # fmt: skip
        return verdict or failed(problem, expected, judged.value)
    return passed(f"fixed counter {index} ({event}) within bounds{note}", expected, judged.value)


def disabled_no_count(expectation: Expectation, view: GuestView, counters: list[Record], msr: list[Record]) -> Verdict:
    """A disabled counter does not count: never-enabled perf event, EN=0, GLOBAL_CTRL bit 0 (all exactly 0)."""
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    observed: dict[str, Any] = {}
    problems: list[str] = []
    record = first_record(counters, "disabled")
    if record is None or "error" in record:
        problems.append(f"never-enabled perf event: {errno_text(record) if record else 'no record'}")
    else:
        observed["perf_never_enabled"] = record["value"]
        if record["value"] != 0:
            problems.append(f"never-enabled perf event counted {record['value']}")
    for kind, label in (("disabled_sel", "EVTSEL.EN=0"), ("disabled_global", "GLOBAL_CTRL bit clear")):
        record = first_record(msr, kind)
        if record is None:
            if kind == "disabled_sel" or (view.caps.arch_perfmon and view.caps.arch_perfmon.version >= 2):
                problems.append(f"{label}: no record from the msr probe")
            continue
        counts = {k: record[k] for k in ("instructions", "branches", "fixed0") if k in record}
        observed[label] = counts
        nonzero = {k: v for k, v in counts.items() if v}
        if nonzero:
            problems.append(f"{label}: counted {nonzero} (must stay 0)")
    if problems:
        return failed("; ".join(problems), 0, observed)
    return passed("disabled counters stay at exactly 0", 0, observed)


def _sign_extend32(value: int, width: int) -> int:
    low = value & 0xFFFFFFFF
    if low & 0x80000000:
        low |= ~0xFFFFFFFF
    return low & ((1 << width) - 1)


def counter_width(expectation: Expectation, view: GuestView, msr: list[Record]) -> Verdict:
    """Counter writes and width: legacy writes sign-extend bit 31 (Intel), full-width writes keep the width and
    #GP above it (SDM Vol. 3B "Full-Width Writes to Performance Counters"; kvm-unit-tests
    check_gp_counters_write_width).

    No kvm.ignore_msrs gate: the #GP above the width comes from intel_pmu_set_msr() rejecting the value of a
    counter MSR it knows (return 1, arch/x86/kvm/vmx/pmu_intel.c), and kvm_do_msr_access() (arch/x86/kvm/x86.c)
    swallows only KVM_MSR_RET_UNSUPPORTED, i.e. MSRs KVM does not know at all.
    """
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    if not msr:
        return errored("msr probe produced no records")
    perfmon: ArchPerfmon | None = view.caps.arch_perfmon
    gp_width = perfmon.gp_width if perfmon else 48  # AMD counters are 48 bits (APM Vol. 2, "Performance Counters")
    fixed_width = perfmon.fixed_width if perfmon else 0
    mask = (1 << gp_width) - 1
    problems: list[str] = []
    checked = 0
    for record in msr:
        kind = record.get("kind")
        if kind not in ("width_legacy", "width_full", "width_full_alias", "width_full_over", "width_fixed"):
            continue
        checked += 1
        written, where = record["written"], f"{kind} MSR {record['write_msr']:#x}"
        if kind == "width_full_over":
            if record.get("errno") != errno_mod.EIO:
                problems.append(f"{where}: write of {written:#x} above the width must #GP, got {record.get('read')}")
            continue
        if "error" in record:
            problems.append(f"{where}: {errno_text(record)}")
            continue
        if kind == "width_legacy":
            want = (written & mask) if view.amd else _sign_extend32(written, gp_width)
        elif kind == "width_fixed":
            want = written & ((1 << fixed_width) - 1)
        else:
            want = written & mask
        if record["read"] != want:
            problems.append(f"{where}: wrote {written:#x}, read {record['read']:#x}, want {want:#x}")
    if not checked:
        return errored("msr probe produced no width records")
    if problems:
        return failed("; ".join(problems), "width rules", f"{checked} writes")
    return passed(f"{checked} counter writes read back per the width rules", "width rules", f"{checked} writes")


def msr_bounds(
    expectation: Expectation, view: GuestView, msr: list[Record], faults: Expectation | None = None
) -> Verdict:
    """MSRs of counters beyond the enumerated number #GP (SDM; KVM kvm_pmu_is_valid_msr).

    Gated like enum.pmu_msrs_fault on ``faults`` (the pmu_msrs_fault expectation, kvm_ignore_msrs_off): an MSR
    KVM does not know returns KVM_MSR_RET_UNSUPPORTED, and with kvm.ignore_msrs=Y kvm_do_msr_access() (called by
    kvm_get_msr_ignored_check(), arch/x86/kvm/x86.c) zeroes the data and returns 0 instead of the #GP.
    """
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    if faults is not None and not faults.available:
        return skipped(faults.reason)
    found = [r for r in msr if r.get("kind") == "bounds"]
    if not found:
        return errored("msr probe produced no bounds records")
    readable = [f"{r['msr']:#x}" for r in found if "error" not in r]
    observed = {f"{r['msr']:#x}": ("#GP" if r.get("errno") == errno_mod.EIO else r.get("value")) for r in found}
    if readable:
        return failed(f"MSR {', '.join(readable)} beyond the enumerated counters is accessible", "#GP", observed)
    return passed("counter MSRs beyond the enumerated number #GP", "#GP", observed)


#: AMD RDPMC indices past the core counters that hardware may answer: 6-9 Northbridge/Data Fabric, 10-15 L3
#: counters (Linux arch/x86/events/amd/uncore.c RDPMC_BASE_NB = 6, RDPMC_BASE_LLC = 10).
AMD_UNCORE_RDPMC = range(6, 16)


def _user_page_count(record: Record) -> int:
    """The count perf's user-page protocol gives: offset + the PMC value sign-extended to pmc_width
    (include/uapi/linux/perf_event.h, perf_event_mmap_page: "pmc <<= 64 - width; pmc >>= 64 - width; count += pmc")."""
    width = record["pmc_width"] or 64
    raw = record["rdpmc_n"] & ((1 << width) - 1)
    if raw >> (width - 1):
        raw -= 1 << width
    return (record["offset_n"] + raw) & ((1 << 64) - 1)


def _user_page_problem(record: Record) -> str | None:
    """A member's user-page RDPMC must lie between the group reads just before and after it (the counters probe
    brackets each RDPMC so; a counter only counts up; an interrupt in between only adds to the read after). Records
    from before that probe have only the read before. Members read with cap_user_rdpmc=0 are not passed here: the
    probe made no RDPMC for them (their rdpmc_n is 0, not a measurement)."""
    where = f"user-page RDPMC of counter {record['rdpmc_index']:#x} ({record.get('event')})"
    if record.get("rdpmc_signal"):
        return f"{where} raised {signal_name(record['rdpmc_signal'])}"
    via = _user_page_count(record)
    before, after = record.get("read_before_rdpmc"), record.get("read_after_rdpmc")
    if before is None or after is None:
        if via < record["value_n"]:
            return f"{where} = {via:,} < the read() before it {record['value_n']:,}"
        return None
    if before < 0 or after < 0:
        return f"{where}: the group read() around it failed"
    if not before <= via <= after:
        return f"{where} = {via:,}, outside the reads around it [{before:,}, {after:,}]"
    return None


def rdpmc(
    expectation: Expectation,
    view: GuestView,
    counters: list[Record],
    msr: list[Record],
    vpmu_mode: str | None = None,
) -> Verdict:
    """RDPMC equals RDMSR for every GP and fixed counter, matches perf's user page, and an invalid index #GPs
    (SDM Vol. 2B RDPMC; kvm-unit-tests check_rdpmc, "Expected #GP on RDPMC(64)").

    RDPMC is not an MSR access: kvm_emulate_rdpmc() injects #GP whenever kvm_pmu_rdpmc() rejects the index,
    whatever kvm.ignore_msrs says, so no ignore_msrs gate here. Under the mediated vPMU RDPMC is not intercepted
    when the guest's counters match the host's (kvm_need_rdpmc_intercept(), arch/x86/kvm/pmu.c), and on AMD the
    hardware then answers indices 6-15 from the uncore counters (AMD_UNCORE_RDPMC) instead of faulting.
    """
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    invalid = first_record(counters, "rdpmc_invalid")
    if invalid is not None and "error" not in invalid and not invalid.get("user_rdpmc", 1):
        return errored("guest perf gives no user RDPMC (cap_user_rdpmc=0: /sys/bus/event_source/devices/cpu/rdpmc "
                       "is 0?), so CR4.PCE is clear and every RDPMC faults whatever its index")  # fmt: skip
    setup = first_record(msr, "rdpmc_setup")
    if setup is not None and not (setup.get("mmapped", 1) and setup.get("user_rdpmc", 1)):
        return errored(f"msr probe: user RDPMC not enabled (perf event mmapped={setup.get('mmapped')}, "
                       f"cap_user_rdpmc={setup.get('user_rdpmc')}): CR4.PCE is set only while a user-readable event "
                       "is mmapped (arch/x86/events/core.c x86_pmu_event_mapped()), so every RDPMC faults whatever "
                       "KVM does")  # fmt: skip
    problems: list[str] = []
    notes: list[str] = []
    unproven: list[str] = []
    observed: dict[str, Any] = {}
    pairs = [r for r in msr if r.get("kind") == "rdpmc"]
    if not pairs:
        problems.append("msr probe produced no rdpmc records")
    for record in pairs:
        index = record["index"]
        if record["signal"]:
            problems.append(f"RDPMC({index:#x}) raised {signal_name(record['signal'])}")
        elif record["rdpmc"] != record["rdmsr"]:
            problems.append(f"RDPMC({index:#x}) = {record['rdpmc']:#x} but RDMSR = {record['rdmsr']:#x}")
    observed["rdpmc_vs_rdmsr"] = len(pairs)
    members = [r for r in counters if r.get("kind") == "count" and "error" not in r and r.get("rdpmc_index", -1) >= 0]
    unreadable = [r for r in members if r.get("cap_user_rdpmc", 1) == 0]
    members = [r for r in members if r.get("cap_user_rdpmc", 1) != 0]
    for record in members:
        problem = _user_page_problem(record)
        if problem:
            problems.append(problem)
    observed["user_page_reads"] = len(members)
    if unreadable:
        notes.append(f"{len(unreadable)} members not compared with perf's user page: cap_user_rdpmc was 0 when they "
                     "were read, so the probe made no RDPMC")  # fmt: skip
    for kind in ("rdpmc_beyond", "rdpmc_invalid"):
        record = first_record(msr if kind == "rdpmc_beyond" else counters, kind)
        if record is None or "error" in record:
            problems.append(f"{kind}: {errno_text(record) if record else 'no record'}")
            continue
        observed[kind] = signal_name(record["signal"]) if record["signal"] else record.get("value", record.get("rdpmc"))
        if record["signal"] == signal.SIGSEGV:
            why = _fault_unproven(kind, record, counters, pairs)
            if why:
                unproven.append(why)
            continue
        if view.amd and vpmu_mode == "mediated" and record["index"] in AMD_UNCORE_RDPMC:
            notes.append(f"RDPMC({record['index']}) not judged: under the mediated vPMU AMD hardware answers it "
                         "from an uncore counter")  # fmt: skip
            continue
        problems.append(f"RDPMC({record['index']:#x}) of an invalid index did not #GP (SIGSEGV)")
    expected = "RDPMC == RDMSR; read before <= user-page RDPMC <= read after; invalid index #GP"
    suffix = f" ({'; '.join(notes)})" if notes else ""
    if problems:
        return failed("; ".join(problems + unproven) + suffix, expected, observed)
    if unproven:
        return errored("; ".join(unproven) + suffix, observed)
    return passed("RDPMC agrees with RDMSR and perf; invalid index #GPs" + suffix, expected, observed)


def _fault_unproven(kind: str, record: Record, counters: list[Record], pairs: list[Record]) -> str | None:
    """Why the #GP of an invalid-index RDPMC proves nothing, or None: it proves something only if a valid-index RDPMC
    in the same process did not fault. With CR4.PCE clear (arch/x86/events/core.c x86_pmu_event_mapped() sets it only
    while a user-readable event is mmapped) every RDPMC at CPL3 #GPs, and so does every index if KVM rejects them all.

    rdpmc_beyond (msr probe): the RDPMC == RDMSR pairs ran in that process, with the same mapping. rdpmc_invalid
    (counters probe): its control RDPMC(0) right before it; records from before the control fall back to the
    members' user-page RDPMCs in the same process."""
    if kind == "rdpmc_beyond":
        if any(not r["signal"] for r in pairs):
            return None
        return (f"rdpmc_beyond: RDPMC({record['index']:#x}) faulted, but no valid-index RDPMC in the msr probe's "
                "process succeeded, so the fault proves nothing")  # fmt: skip
    control = record.get("control_signal")
    if control is None:
        members = [r for r in counters if r.get("kind") == "count" and r.get("rdpmc_index", -1) >= 0
                   and "error" not in r and not r.get("rdpmc_signal")]  # fmt: skip
        if record.get("user_rdpmc") and members:
            return None
        return (f"rdpmc_invalid: RDPMC({record['index']:#x}) faulted, but the counters probe recorded no valid-index "
                "RDPMC that succeeded in its process (no control RDPMC), so the fault proves nothing")  # fmt: skip
    if control:
        return (f"rdpmc_invalid: the control RDPMC({record.get('control_index', 0)}) in the same process raised "
                f"{signal_name(control)}, so the fault of RDPMC({record['index']:#x}) proves nothing (CR4.PCE clear, "
                "or every index rejected)")  # fmt: skip
    return None


def exact_global_ctrl(
    expectation: Expectation,
    view: GuestView,
    msr: list[Record],
    errata: OvercountErrata | bool = NO_ERRATA,
    contention: str | None = None,
) -> Verdict:
    """Counting enabled only through GLOBAL_CTRL (or EN without one) gives exact loop counts on GP and fixed 0:
    instructions on PMC0 and fixed counter 0, branches on PMC1, each relaxed only by its own erratum and by the
    interrupts/exceptions around the two regions (WindowEvents: the record's irq_n/faults_n/..., exact when none)."""
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    record = first_record(msr, "enabled")
    if record is None:
        return errored("msr probe produced no 'enabled' record")
    n = int(record["iterations"])
    checks = [("instructions", record["instructions_n"] - record["instructions_0"])]
    if _gp_counters(view) > 1:
        checks.append(("branch_instructions", record["branches_n"] - record["branches_0"]))
    perfmon = view.caps.arch_perfmon
    if perfmon and perfmon.fixed_counter_mask & 1:
        checks.append(("instructions", record["fixed0_n"] - record["fixed0_0"]))
    problems: list[str] = []
    shortfalls: list[str] = []
    observed: dict[str, Any] = {}
    window = window_events(record)
    for (event, value), label in zip(checks, ("PMC0", "PMC1", "FIXED_CTR0")[: len(checks)], strict=False):
        bounds = event_bounds(event, n, view.amd, errata, 0, window)
        observed[label] = value
        problem = bounds.check(value)
        if problem:
            (shortfalls if value < bounds.low else problems).append(f"{label}: {problem}")
    expected = f"instructions {LOOP.delta_instructions(n):,}, branches {LOOP.delta_branches(n):,} (N-0)"
    if window.known and not window.quiet:
        expected += f", up to +{window.n:,}/-{window.zero:,} for {window.text()}"
        observed["window_events"] = {"n": window.n, "zero": window.zero}
    verdict = contention_skip(contention, shortfalls, problems, expected, observed)
    if verdict:
        return verdict
    problems = shortfalls + problems
    if problems:
        return failed("; ".join(problems), expected, observed)
    how = "exactly" if window.quiet or not window.known else "within the interrupts of their windows"
    return passed(f"MSR-programmed counters count the loop {how}", expected, observed)


def overflow_status(expectation: Expectation, view: GuestView, msr: list[Record]) -> Verdict:
    """A counter preset near its maximum overflows: GLOBAL_STATUS bit 0 set, cleared by a write of 1 to
    GLOBAL_OVF_CTRL (Intel v2+) / PerfCntrGlobalStatusClr (AMD PerfMonV2) (kvm-unit-tests check_counter_overflow)."""
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    perfmon = view.caps.arch_perfmon
    if perfmon is not None and perfmon.version < 2:
        return skipped(f"not-enumerated: PMU version {perfmon.version} has no global status MSRs (v2+)")
    if view.amd and not (view.caps.amd and view.caps.amd.perfmon_v2):
        return skipped("not-enumerated: no PerfMonV2, so no global status MSRs (kvm-unit-tests skips these too)")
    record = first_record(msr, "overflow")
    if record is None or "skipped" in record:
        return errored("msr probe produced no overflow record")
    observed = {"status": record["status"], "status_after_clear": record["status_after_clear"],
                "counter": record["counter"]}  # fmt: skip
    problems = []
    if "error" in record:
        problems.append(f"GLOBAL_STATUS: {errno_text(record)}")
    if not record["status"] & 1:
        problems.append(f"GLOBAL_STATUS bit 0 not set after overflow (status {record['status']:#x})")
    if record["status_after_clear"] & 1:
        problems.append("GLOBAL_STATUS bit 0 still set after clearing it")
    if record["counter"] > LOOP.instructions(1000) + 1000:
        problems.append(f"counter did not wrap (reads {record['counter']:#x})")
    if problems:
        return failed("; ".join(problems), "status bit 0 set, then clear", observed)
    return passed("overflow sets GLOBAL_STATUS bit 0 and the clear MSR clears it", "status bit 0 set, then clear",
                  observed)  # fmt: skip


def _sampling_setup_text(counters: list[Record]) -> str:
    """What vpmu_prepare_sampling() achieved, for reasons (the guest's throttle settings during the run)."""
    setup = first_record(counters, "sampling_setup")
    if setup is None:
        return "no sampling_setup record"
    text = (f"perf_cpu_time_max_percent={setup.get('perf_cpu_time_max_percent')}, "
            f"perf_event_max_sample_rate={setup.get('perf_event_max_sample_rate')}")  # fmt: skip
    if setup.get("errno"):
        text += f", a write failed: {errno_mod.errorcode.get(setup['errno'], setup['errno'])}"
    return text


def _host_throttle(record: Record, host: dict[str, Any] | None) -> str | None:
    """Under the perf-based vPMU the guest counter is a host sampling event, which the host throttles like any other
    at max_samples_per_tick = DIV_ROUND_UP(perf_event_max_sample_rate, HZ) PMIs per tick
    (kernel/events/core.c __perf_event_account_interrupt()), invisibly to the guest: the counter just stops until
    the next tick. The reason when the guest's PMI rate came within half of the host's limit."""
    host = host or {}
    rate = (host.get("sysctls") or {}).get("kernel.perf_event_max_sample_rate")
    elapsed = record.get("elapsed_ns") or 0
    if host.get("vpmu_mode") != "perf-based" or rate is None or not elapsed:
        return None
    try:
        host_rate = int(rate)
    except (TypeError, ValueError):
        return None
    guest_rate = record["samples"] / (elapsed / 1e9)
    if guest_rate * 2 <= host_rate:
        return None
    return (f"host: kernel.perf_event_max_sample_rate={host_rate} and the guest took {guest_rate:,.0f} PMIs/s: the "
            "host throttles KVM's backing event (kernel/events/core.c __perf_event_account_interrupt()) and the "
            "guest counter stops unseen (sysctl -w kernel.perf_event_max_sample_rate=100000 on the host)")  # fmt: skip


def pmi_sampling(
    expectation: Expectation,
    view: GuestView,
    counters: list[Record],
    host: dict[str, Any] | None = None,
    contention: str | None = None,
) -> Verdict:
    """Fixed-period sampling delivers one PMI-driven sample per period: n = count / P within 2, no lost records,
    PMI count up by at least n, >= 90 % of IPs in the loop (reference §6c).

    A throttled run measures the kernel's rate limit, not the PMI path: PERF_RECORD_THROTTLE in the guest's ring
    (the guest kernel stopped the event for the rest of a tick) is a SKIP with that reason, never a lost-sample
    FAIL; so is a shortfall while the guest's PMI rate is near the host's limit (_host_throttle). The probe first
    turns the guest's adaptive throttling off (vpmu_prepare_sampling(), its sampling_setup record). Too few samples
    and a short count while a host load competes for the counters under the perf-based vPMU (``contention``) are a
    SKIP too (contention_skip).
    """
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    record = first_record(counters, "sampling")
    if record is None:
        return errored("counters probe produced no sampling record")
    if "error" in record:
        return failed(f"sampling event: {errno_text(record)}", "samples", errno_text(record))
    expected_n = record["count"] // record["period"]
    samples = record["samples"]
    throttled = int(record.get("throttled", record.get("throttle", 0)) or 0)
    keys = ("count", "samples", "in_loop", "lost", "throttled", "unthrottled", "pmi_before", "pmi_after", "elapsed_ns")
    observed = {k: record[k] for k in keys if k in record}
    observed["throttled"] = throttled
    expected = f"{expected_n} +/- 2 samples, PMIs >= samples, >= 90 % IPs in the loop"
    if throttled:
        return skipped(f"guest kernel throttled sampling: {throttled} PERF_RECORD_THROTTLE records (more than "
                       "max_samples_per_tick PMIs in one tick; kernel/events/core.c __perf_event_account_interrupt); "
                       f"sampling setup: {_sampling_setup_text(counters)}", expected, observed)  # fmt: skip
    problems: list[str] = []
    shortfalls: list[str] = []
    if record["count"] < LOOP.delta_instructions(record["iterations"]):
        shortfalls.append(
            f"event counted {record['count']:,} < the loop's {LOOP.delta_instructions(record['iterations']):,}"
        )
    if abs(samples - expected_n) > 2:
        (shortfalls if samples < expected_n else problems).append(
            f"{samples} samples, want {expected_n} +/- 2 (count / period)"
        )
    if record["lost"]:
        problems.append(f"{record['lost']} lost records")
    if record["pmi_before"] >= 0 and record["pmi_after"] - record["pmi_before"] < samples:
        problems.append(f"PMI count rose by {record['pmi_after'] - record['pmi_before']} < {samples} samples")
    if samples and record["in_loop"] < 0.9 * samples:
        problems.append(f"only {record['in_loop']} of {samples} sample IPs inside the loop (want >= 90 %)")
    verdict = contention_skip(contention, shortfalls, problems, expected, observed)
    if verdict:
        return verdict
    problems = shortfalls + problems
    if problems:
        host_reason = _host_throttle(record, host)
        if host_reason:
            return skipped(f"{host_reason}; the run saw: {'; '.join(problems)}", expected, observed)
        return failed("; ".join(problems), expected, observed)
    return passed(f"{samples} samples as expected, each with a PMI", expected, observed)
