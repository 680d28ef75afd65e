"""Verdicts: pure functions from (expectation, guest view, probe records) to PASS / FAIL / SKIP / ERROR.

A probe measures; this module decides. Each rule cites where it comes from (SDM/APM section, kernel source,
or kvm-unit-tests x86/pmu.c, whose tolerances we follow) next to the code and, shortened, in the FAIL reason.
Nothing here runs a guest, so every rule is unit-tested with records in the probes' exact output format.
"""

from __future__ import annotations

import errno as errno_mod
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from harness.caps import ArchPerfmon, PmuCaps
from harness.expectations import Expectation
from harness.guest_view import NO_PMU_FAULTING_MSRS, GuestView
from harness.workloads import LOOP

Record = dict[str, Any]
STATUSES = ("pass", "fail", "skip", "error")
FIXED_INDEX_BIT = 1 << 30  # SDM Vol. 2B, RDPMC: ECX[30] selects the fixed-function counters
#: Fixed counter j counts this architectural event (SDM Vol. 3B, "Fixed-Function Performance Counters").
FIXED_EVENTS = ("instructions", "core_cycles", "ref_cycles", "topdown_slots")
#: Intel Atom models with the instructions/branches overcount errata (kvm-unit-tests lib/x86/pmu.c; KVM
#: selftests lib/x86/pmu.c): exact checks become ">=" checks there.
ERRATA_OVERCOUNT_MODELS = {0xAF, 0x4D, 0x5F, 0x86, 0xDD}
#: User instructions between the probe's read() of the group and its RDPMC of a member (a few dozen) plus margin.
RDPMC_AFTER_READ_MAX = 2000


@dataclass(frozen=True)
class Verdict:
    """One check's outcome; ``expected``/``observed`` are short human-readable strings or numbers."""

    status: str
    reason: str
    expected: Any = None
    observed: Any = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.status in STATUSES, self.status


def passed(reason: str, expected: Any = None, observed: Any = None, **details: Any) -> Verdict:
    return Verdict("pass", reason, expected, observed, details)


def failed(reason: str, expected: Any = None, observed: Any = None, **details: Any) -> Verdict:
    return Verdict("fail", reason, expected, observed, details)


def skipped(reason: str, expected: Any = None, observed: Any = None) -> Verdict:
    return Verdict("skip", reason, expected, observed)


def errored(reason: str, observed: Any = None) -> Verdict:
    return Verdict("error", reason, None, observed)


def _errno_text(record: Record) -> str:
    number = record.get("errno")
    name = errno_mod.errorcode.get(number, str(number)) if isinstance(number, int) else "?"
    return f"{record.get('error', 'call')}: {name} ({record.get('strerror', '')})"


def _sig_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def gate(expectation: Expectation, guest_has_it: bool, what: str) -> Verdict | None:
    """The common start of every measurement check.

    Not expected -> SKIP with the expectation's reason, even if a probe ran (under TCG nothing can count).
    Expected but the guest lacks it -> FAIL. Otherwise None: judge the measurement.
    """
    if not expectation.available:
        return skipped(expectation.reason)
    if not guest_has_it:
        return failed(f"{expectation.feature} is promised (host, KVM and profile provide it) but the guest {what}")
    return None


# --- enumeration ------------------------------------------------------------------------------------------


def pmu_visible(expectation: Expectation, view: GuestView) -> Verdict:
    """CPUID and the guest kernel show a PMU exactly when one is expected."""
    observed = {"cpuid_pmu": view.cpuid_pmu, "kernel_pmus": view.kernel_pmus, "banner": view.kernel_banner}
    if expectation.available:
        if not view.cpuid_pmu:
            return failed(f"{expectation.feature} expected but guest CPUID enumerates no PMU", True, observed)
        if not view.kernel_pmu:
            return failed(f"guest CPUID enumerates a PMU but the guest kernel registered none: {view.kernel_banner}",
                          True, observed)  # fmt: skip
        return passed("guest CPUID and kernel show the vPMU", True, observed)
    if view.cpuid_pmu or view.kernel_pmu:
        return failed(f"guest sees a PMU although none is expected ({expectation.reason})", False, observed)
    return passed(f"no PMU visible, as expected ({expectation.reason})", False, observed)


def pmu_msrs_fault(pmu: Expectation, faults: Expectation, view: GuestView) -> Verdict:
    """Without a vPMU, PMU MSR reads must #GP (EIO through /dev/cpu/N/msr)."""
    if pmu.available:
        return skipped("profile: the vPMU is on; counter MSR bounds are checked by arch.msr_bounds")
    if not faults.available:
        return skipped(faults.reason)
    msrs = NO_PMU_FAULTING_MSRS["amd" if view.amd else "intel"]
    reads = {f"{m:#x}": view.msrs.get(m) for m in msrs}
    missing = [name for name, read in reads.items() if read is None]
    if missing:
        return errored(f"enum probe did not read MSR {', '.join(missing)}")
    ok = [name for name, read in reads.items() if read is not None and not read.faulted]
    observed = {
        name: ("#GP" if read and read.faulted else read.value if read else None) for name, read in reads.items()
    }
    if ok:
        return failed(f"MSR {', '.join(ok)} readable although the guest has no vPMU (expected #GP; "
                      "arch/x86/kvm/x86.c kvm_get_msr_common default case)", "#GP", observed)  # fmt: skip
    return passed("PMU MSRs #GP without a vPMU", "#GP", observed)


def perf_capabilities(pmu: Expectation, faults: Expectation, view: GuestView) -> Verdict:
    """IA32_PERF_CAPABILITIES is readable iff CPUID.1:ECX.PDCM (SDM Vol. 4: the MSR exists iff PDCM)."""
    if not view.intel:
        return skipped(f"not-applicable: IA32_PERF_CAPABILITIES is Intel-only (guest vendor {view.caps.vendor})")
    if not faults.available:
        return skipped(faults.reason)
    read = view.msrs.get(0x345)
    if read is None:
        return errored("enum probe did not read IA32_PERF_CAPABILITIES")
    if view.caps.pdcm:
        if read.faulted:
            return failed("CPUID.1:ECX.PDCM=1 but IA32_PERF_CAPABILITIES #GPs", "readable", "#GP")
        return passed("PDCM set and IA32_PERF_CAPABILITIES readable", "readable", view.perf_capabilities())
    if not read.faulted:
        return failed("CPUID.1:ECX.PDCM=0 but IA32_PERF_CAPABILITIES is readable (SDM: the MSR exists iff PDCM)",
                      "#GP", read.value)  # fmt: skip
    return passed("PDCM clear and IA32_PERF_CAPABILITIES #GPs", "#GP", "#GP")


def guest_within_host(accel: str, pmu: Expectation, view: GuestView, host_caps: dict[str, Any] | None) -> Verdict:
    """The guest never sees more than the host has, nor more than KVM's limits (kvm_features.toml)."""
    if accel != "kvm":
        return skipped(f"accel: under {accel.upper()} the guest CPU model is QEMU's own, not derived from the host")
    if host_caps is None:
        return skipped("host: CPUID not readable (no /dev/cpu/0/cpuid access and CPUID not executable)")
    problems: list[str] = []
    guest = view.caps
    limits = pmu.limits
    if guest.arch_perfmon is not None:
        host = host_caps.get("arch_perfmon") or {}
        ap = guest.arch_perfmon
        for key in ("version", "gp_counters", "gp_width", "fixed_counters", "fixed_width"):
            bound = min(v for v in (host.get(key, 0), limits.get(key)) if v is not None)
            if getattr(ap, key) > bound:
                problems.append(f"{key} {getattr(ap, key)} > {bound}")
        extra = [e for e, ok in ap.events.items() if ok and not host.get("events", {}).get(e)]
        if extra:
            problems.append(f"events the host lacks: {', '.join(extra)}")
    if guest.amd is not None and host_caps.get("amd"):
        bound = min(host_caps["amd"]["core_counters"], limits.get("core_counters", 99))
        if guest.amd.core_counters > bound:
            problems.append(f"core_counters {guest.amd.core_counters} > {bound}")
    observed = view.summary()["caps"]
    if problems:
        return failed("guest PMU exceeds the host or KVM's limits: " + "; ".join(problems), "guest <= host", observed)
    return passed("guest PMU enumeration within the host's and KVM's limits", "guest <= host", observed)


# --- counting ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """An inclusive range on a measured quantity, with the rule's source for the FAIL reason."""

    low: float
    high: float
    what: str
    source: str

    def check(self, value: float) -> str | None:
        if self.low <= value <= self.high:
            return None
        return f"{self.what} {value:,.0f} outside [{self.low:,.0f}, {self.high:,.0f}] ({self.source})"


def event_bounds(event: str, iterations: int, vendor_amd: bool, errata: bool, tsc: int) -> Bounds:
    """The expected range of an event over ``vpmu_loop(iterations)``: exact where the workload makes it exact."""
    n = iterations
    insns = LOOP.delta_instructions(n)
    exact = not vendor_amd and not errata
    if event == "instructions":
        if exact:
            return Bounds(insns, insns, "instructions (N-0 differential)", "exact: generated loop, user mode")
        # AMD: VMRUN may be counted as a guest instruction/branch, so kvm-unit-tests never asserts exact counts
        # there (x86/pmu.c); reference policy: accept >= with expected + 10k slack.
        return Bounds(insns, insns + 10_000, "instructions (N-0 differential)", ">= on AMD/errata models")
    if event == "branch_instructions":
        branches = LOOP.delta_branches(n)
        if exact:
            return Bounds(branches, branches, "branches (N-0 differential)", "exact: one jnz per iteration")
        return Bounds(branches, branches + 10_000, "branches (N-0 differential)", ">= on AMD/errata models")
    if event == "core_cycles":
        return Bounds(n, 50 * n, "cycles", "kvm-unit-tests x86/pmu.c: [N, 50N]")
    if event == "ref_cycles":
        # The GP encoding may tick at the crystal rate rather than the TSC's (kvm-unit-tests calibrates the
        # ratio), so only bound it by the TSC ticks of the same window.
        return Bounds(1, 1.05 * tsc, "ref-cycles", "0 < ref-cycles <= 1.05 x TSC delta")
    if event == "llc_references":
        return Bounds(1, 2.5 * n, "LLC references", "kvm-unit-tests x86/pmu.c: [1, 2.5N]")
    if event == "llc_misses":
        return Bounds(1, n, "LLC misses", "kvm-unit-tests x86/pmu.c: [1, N] (buffer flushed with clflush)")
    if event == "branch_misses":
        return Bounds(0, 0.1 * n, "branch misses", "kvm-unit-tests x86/pmu.c: <= 0.1N (min 1 only with IBPB)")
    if event == "topdown_slots":
        return Bounds(n, 400 * n, "slots", ">= cycles >= N; <= 8 slots x 50N cycles")
    raise ValueError(f"no bounds for event {event!r}")


#: Events judged on the N-0 difference; the rest on the N run alone (a 0-iteration run has no range of its own).
DIFFERENTIAL_EVENTS = ("instructions", "branch_instructions")


def _judge_member(record: Record, event: str, vendor_amd: bool, errata: bool) -> tuple[int, str | None]:
    n = int(record["iterations"])
    bounds = event_bounds(event, n, vendor_amd, errata, int(record.get("tsc_n", 0)))
    value = record["value_n"] - record["value_0"] if event in DIFFERENTIAL_EVENTS else record["value_n"]
    problem = bounds.check(value)
    if problem is None and record["running_n"] < record["enabled_n"]:
        problem = (f"guest-visible multiplexing: time_running {record['running_n']} < time_enabled "
                   f"{record['enabled_n']} with no more events than counters")  # fmt: skip
    return value, problem


def _count_records(records: Iterable[Record], set_name: str, event: str) -> list[Record]:
    return [r for r in records if r.get("kind") == "count" and r.get("set") == set_name and r.get("event") == event]


def _open_error(found: list[Record]) -> Verdict | None:
    broken = [r for r in found if "error" in r]
    if broken:
        record = broken[0]
        opened = record.get("opened")
        return failed(f"perf_event_open of {record.get('event')} (x{record.get('copies')}, {opened} opened) failed: "
                      f"{_errno_text(record)}", "counts", _errno_text(record))  # fmt: skip
    return None


def gp_event(
    expectation: Expectation, view: GuestView, records: list[Record], event: str, errata: bool = False
) -> Verdict:
    """Every GP counter counts ``event`` over the loop within the event's bounds (kvm-unit-tests check_gp_counters)."""
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
    by_counter = {r["rdpmc_index"]: r for r in found}
    observed: dict[str, Any] = {}
    problems: list[str] = []
    for counter in range(counters):
        record = by_counter.get(counter)
        if record is None:
            problems.append(f"GP{counter}: no group member landed on it (indices {sorted(by_counter)})")
            continue
        value, problem = _judge_member(record, event, view.amd, errata)
        observed[f"gp{counter}"] = value
        if problem:
            problems.append(f"GP{counter}: {problem}")
    n = int(found[0].get("iterations", 0))
    bounds = event_bounds(event, n, view.amd, errata, int(found[0].get("tsc_n", 0)))
    expected = f"[{bounds.low:,.0f}, {bounds.high:,.0f}] on each of {counters} GP counters ({bounds.source})"
    if problems:
        return failed("; ".join(problems), expected, observed)
    return passed(f"{event} within bounds on all {counters} GP counters", expected, observed)


#: AMD core events standing in for the architectural ones (AMD PPR "Core Performance Monitor Counters":
#: 0x76 cycles not in halt, 0xC0 retired instructions, 0xC2 retired branches, 0xC3 retired branch mispredicts).
AMD_EVENTS = {"core_cycles": 0x76, "instructions": 0xC0, "branch_instructions": 0xC2, "branch_misses": 0xC3}


def _gp_counters(view: GuestView) -> int:
    if view.caps.arch_perfmon is not None:
        return view.caps.arch_perfmon.gp_counters
    return view.caps.amd.core_counters if view.caps.amd else 0


def fixed_counter(
    expectation: Expectation, view: GuestView, records: list[Record], index: int, errata: bool = False
) -> Verdict:
    """Fixed counter ``index`` counts its event within bounds, on the fixed counter (RDPMC index bit 30)."""
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
    if record["rdpmc_index"] != (FIXED_INDEX_BIT | index):
        return failed(f"fixed{index} event landed on RDPMC index {record['rdpmc_index']:#x}, not fixed counter "
                      f"{index} ({FIXED_INDEX_BIT | index:#x}); perf prefers the fixed counter when free",
                      f"{FIXED_INDEX_BIT | index:#x}", record["rdpmc_index"])  # fmt: skip
    value, problem = _judge_member(record, event, False, errata)
    bounds = event_bounds(event, int(record["iterations"]), False, errata, int(record.get("tsc_n", 0)))
    expected = f"[{bounds.low:,.0f}, {bounds.high:,.0f}] ({bounds.source})"
    if problem:
        return failed(f"fixed{index}: {problem}", expected, value)
    return passed(f"fixed counter {index} ({event}) within bounds", expected, value)


def first_record(records: list[Record], kind: str, **match: Any) -> Record | None:
    """The first record of ``kind`` whose fields equal ``match`` (e.g. mode="any"), or None."""
    for r in records:
        if r.get("kind") == kind and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def overcount_errata(caps: PmuCaps) -> bool:
    """Whether the CPU is one of the Intel Atom models whose instruction/branch counts overcount."""
    return caps.vendor == "GenuineIntel" and caps.family == 6 and caps.model in ERRATA_OVERCOUNT_MODELS


def disabled_no_count(expectation: Expectation, view: GuestView, counters: list[Record], msr: list[Record]) -> Verdict:
    """A disabled counter does not count: never-enabled perf event, EN=0, GLOBAL_CTRL bit 0 (all exactly 0)."""
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    observed: dict[str, Any] = {}
    problems: list[str] = []
    record = first_record(counters, "disabled")
    if record is None or "error" in record:
        problems.append(f"never-enabled perf event: {_errno_text(record) if record else 'no record'}")
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
    check_gp_counters_write_width)."""
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
            problems.append(f"{where}: {_errno_text(record)}")
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


def msr_bounds(expectation: Expectation, view: GuestView, msr: list[Record]) -> Verdict:
    """MSRs of counters beyond the enumerated number #GP (SDM; KVM kvm_pmu_is_valid_msr)."""
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    found = [r for r in msr if r.get("kind") == "bounds"]
    if not found:
        return errored("msr probe produced no bounds records")
    readable = [f"{r['msr']:#x}" for r in found if "error" not in r]
    observed = {f"{r['msr']:#x}": ("#GP" if r.get("errno") == errno_mod.EIO else r.get("value")) for r in found}
    if readable:
        return failed(f"MSR {', '.join(readable)} beyond the enumerated counters is accessible", "#GP", observed)
    return passed("counter MSRs beyond the enumerated number #GP", "#GP", observed)


def rdpmc(expectation: Expectation, view: GuestView, counters: list[Record], msr: list[Record]) -> Verdict:
    """RDPMC equals RDMSR for every GP and fixed counter, matches perf's user page, and an invalid index #GPs
    (SDM Vol. 2B RDPMC; kvm-unit-tests check_rdpmc, "Expected #GP on RDPMC(64)")."""
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    problems: list[str] = []
    observed: dict[str, Any] = {}
    pairs = [r for r in msr if r.get("kind") == "rdpmc"]
    if not pairs:
        problems.append("msr probe produced no rdpmc records")
    for record in pairs:
        index = record["index"]
        if record["signal"]:
            problems.append(f"RDPMC({index:#x}) raised {_sig_name(record['signal'])}")
        elif record["rdpmc"] != record["rdmsr"]:
            problems.append(f"RDPMC({index:#x}) = {record['rdpmc']:#x} but RDMSR = {record['rdmsr']:#x}")
    observed["rdpmc_vs_rdmsr"] = len(pairs)
    for record in [r for r in counters if r.get("kind") == "count" and r.get("event") == "instructions"]:
        if "error" in record or record.get("rdpmc_index", -1) < 0:
            continue
        width = record["pmc_width"] or 64
        raw = record["rdpmc_n"] & ((1 << width) - 1)
        if raw >> (width - 1):
            raw -= 1 << width  # perf's user page: sign-extend the PMC value to pmc_width, then add offset
        via_rdpmc = (record["offset_n"] + raw) & ((1 << 64) - 1)
        gap = via_rdpmc - record["value_n"]
        if not 0 <= gap <= RDPMC_AFTER_READ_MAX:
            problems.append(f"user-page RDPMC of counter {record['rdpmc_index']:#x} = {via_rdpmc} vs read() "
                            f"{record['value_n']} (gap {gap}, want 0..{RDPMC_AFTER_READ_MAX})")  # fmt: skip
    for kind in ("rdpmc_beyond", "rdpmc_invalid"):
        record = first_record(msr if kind == "rdpmc_beyond" else counters, kind)
        if record is None or "error" in record:
            problems.append(f"{kind}: {_errno_text(record) if record else 'no record'}")
            continue
        observed[kind] = _sig_name(record["signal"]) if record["signal"] else record.get("value", record.get("rdpmc"))
        if record["signal"] != signal.SIGSEGV:
            problems.append(f"RDPMC({record['index']:#x}) of an invalid index did not #GP (SIGSEGV)")
    if problems:
        return failed("; ".join(problems), "RDPMC == RDMSR; invalid index #GP", observed)
    return passed("RDPMC agrees with RDMSR and perf; invalid index #GPs", "RDPMC == RDMSR; invalid index #GP",
                  observed)  # fmt: skip


def exact_global_ctrl(expectation: Expectation, view: GuestView, msr: list[Record], errata: bool = False) -> Verdict:
    """Counting enabled only through GLOBAL_CTRL (or EN without one) gives exact loop counts on GP and fixed 0."""
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
    problems, observed = [], {}
    for (event, value), label in zip(checks, ("PMC0", "PMC1", "FIXED_CTR0")[: len(checks)], strict=False):
        bounds = event_bounds(event, n, view.amd, errata, 0)
        observed[label] = value
        problem = bounds.check(value)
        if problem:
            problems.append(f"{label}: {problem}")
    expected = f"instructions {LOOP.delta_instructions(n):,}, branches {LOOP.delta_branches(n):,} (N-0)"
    if problems:
        return failed("; ".join(problems), expected, observed)
    return passed("MSR-programmed counters count the loop exactly", expected, observed)


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
        problems.append(f"GLOBAL_STATUS: {_errno_text(record)}")
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


def pmi_sampling(expectation: Expectation, view: GuestView, counters: list[Record]) -> Verdict:
    """Fixed-period sampling delivers one PMI-driven sample per period: n = count / P within 2, no lost or
    throttled records, PMI count up by at least n, >= 90 % of IPs in the loop (reference §6c)."""
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    record = first_record(counters, "sampling")
    if record is None:
        return errored("counters probe produced no sampling record")
    if "error" in record:
        return failed(f"sampling event: {_errno_text(record)}", "samples", _errno_text(record))
    expected_n = record["count"] // record["period"]
    samples = record["samples"]
    observed = {k: record[k] for k in ("count", "samples", "in_loop", "lost", "throttle", "pmi_before", "pmi_after")}
    problems = []
    if record["count"] < LOOP.delta_instructions(record["iterations"]):
        problems.append(
            f"event counted {record['count']:,} < the loop's {LOOP.delta_instructions(record['iterations']):,}"
        )
    if abs(samples - expected_n) > 2:
        problems.append(f"{samples} samples, want {expected_n} +/- 2 (count / period)")
    if record["lost"] or record["throttle"]:
        problems.append(f"{record['lost']} lost and {record['throttle']} throttle records")
    if record["pmi_before"] >= 0 and record["pmi_after"] - record["pmi_before"] < samples:
        problems.append(f"PMI count rose by {record['pmi_after'] - record['pmi_before']} < {samples} samples")
    if samples and record["in_loop"] < 0.9 * samples:
        problems.append(f"only {record['in_loop']} of {samples} sample IPs inside the loop (want >= 90 %)")
    expected = f"{expected_n} +/- 2 samples, PMIs >= samples, >= 90 % IPs in the loop"
    if problems:
        return failed("; ".join(problems), expected, observed)
    return passed(f"{samples} samples as expected, each with a PMI", expected, observed)
