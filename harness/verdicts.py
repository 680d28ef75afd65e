"""Verdicts: pure functions from (expectation, guest view, probe records) to PASS / FAIL / SKIP / ERROR.

A probe measures; this module decides. Each rule cites where it comes from (SDM/APM section, kernel source,
or kvm-unit-tests x86/pmu.c, whose tolerances we follow) next to the code and, shortened, in the FAIL reason.
Nothing here runs a guest, so every rule is unit-tested with records in the probes' exact output format.
"""

from __future__ import annotations

import errno as errno_mod
import signal
from collections.abc import Callable, Iterable
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
#: The fixed counter an architectural event may land on besides the GP counters (Linux arch/x86/events/intel/core.c
#: fixed event constraints: 0x00c0 -> 0, 0x003c -> 1, and since 6.7 "perf/x86/intel: Extend the ref-cycles event
#: to GP counters" (ffbe4ab0beda) FIXED_EVENT_CONSTRAINT(0x013c, 2) on Golden Cove/Gracemont and later; SLOTS -> 3).
EVENT_FIXED_COUNTER = {event: index for index, event in enumerate(FIXED_EVENTS)}
#: Intel Atom models whose "Instruction Retired" count overcounts on VM-entry/VM-exit, far transfers, IRET and
#: complex flows (Sierra Forest specification update erratum SRF7; the older Atoms 0x4D Avaton/Rangeley,
#: 0x5F Denverton, 0x86 Jacobsville and 0xAF Sierra Forest overcount "Branch Instruction Retired" too, 0xDD
#: Clearwater Forest instructions only). Same lists as kvm-unit-tests lib/x86/pmu.c
#: pmu_detect_intel_overcount_errata() (commit 3ffdf39c) and KVM selftests lib/x86/pmu.c get_pmu_errata(), which
#: relax exact counts to ">=" on them.
INSTRUCTION_OVERCOUNT_MODELS = frozenset({0xDD, 0xAF, 0x4D, 0x5F, 0x86})
BRANCH_OVERCOUNT_MODELS = frozenset({0xAF, 0x4D, 0x5F, 0x86})
#: held_back_for in the counters probe's records: a copy left out for the host NMI watchdog's counter.
HELD_BACK_WATCHDOG = "host nmi_watchdog"
#: What the host NMI watchdog does to a perf-based vPMU, and the way out (the SKIP/note text).
WATCHDOG_REASON = ("host: nmi_watchdog={value} takes a host counter: kernel/watchdog_perf.c "
                   "hardlockup_detector_event_create() pins a cycles event on every CPU, and CPU-pinned events are "
                   "scheduled before KVM's pinned per-task backing events (arch/x86/kvm/pmu.c "
                   "pmc_reprogram_counter(); a pinned event that does not fit goes to ERROR, kernel/events/core.c "
                   "merge_sched_in()), so one guest counter would silently stop "
                   "(echo 0 > /proc/sys/kernel/nmi_watchdog)")  # fmt: skip


@dataclass(frozen=True)
class OvercountErrata:
    """Which exact counts a CPU erratum turns into ">=" counts (see INSTRUCTION_OVERCOUNT_MODELS)."""

    instructions: bool = False
    branches: bool = False

    def covers(self, event: str) -> bool:
        """Whether ``event``'s exact count is relaxed by an erratum."""
        return (event == "instructions" and self.instructions) or (event == "branch_instructions" and self.branches)


NO_ERRATA = OvercountErrata()


def _as_errata(errata: OvercountErrata | bool) -> OvercountErrata:
    """Accept the old boolean form (both errata) from callers written before the split."""
    return errata if isinstance(errata, OvercountErrata) else OvercountErrata(errata, errata)


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


#: The reason prefix of a PMU expectation that is unmet only because the profile turns the PMU off
#: (harness.expectations _profile_pmu: "profile: NAME sets pmu=off" or a model whose pmu defaults to off). The rule's
#: earlier needs (accel_kvm, kvm_enable_pmu, host_pmu, ...) all held, so KVM would otherwise give a vPMU.
PROFILE_PREFIX = "profile:"


def pmu_off_unjudgeable(pmu: Expectation, pmu_off: Expectation | None) -> Expectation | None:
    """The ``pmu_off_honoured`` expectation when it makes a "no PMU" check unjudgeable here, else None.

    A profile's pmu=off reaches KVM only as CPUID: on Intel a zero CPUID.0AH gives KVM PMU version 0
    (arch/x86/kvm/vmx/pmu_intel.c intel_pmu_refresh()), but AMD has no CPUID bit for the four legacy K7 counters,
    KVM's amd_pmu_refresh() (arch/x86/kvm/svm/pmu.c) gives them whatever CPUID says, and only
    KVM_CAP_PMU_CAPABILITY(KVM_PMU_CAP_DISABLE) removes them, which released QEMUs do not set for pmu=off. The data
    file says when that is so (kvm_features.toml [pmu_off_honoured], condition pmu_off_reaches_kvm), with its reason;
    it applies only when the profile's pmu=off is what makes the PMU unexpected (PROFILE_PREFIX).
    """
    if pmu.available or pmu_off is None or pmu_off.available or not pmu.reason.startswith(PROFILE_PREFIX):
        return None
    return pmu_off


def pmu_visible(expectation: Expectation, view: GuestView, pmu_off: Expectation | None = None) -> Verdict:
    """CPUID and the guest kernel show a PMU exactly when one is expected.

    When the profile's pmu=off does not reach KVM on this host (``pmu_off``, the pmu_off_honoured expectation: AMD
    keeps KVM's legacy counters whatever QEMU does to CPUID), what the guest shows is not the profile's to promise:
    SKIP with the data file's reason, the guest's view kept as the observation (pmu_off_unjudgeable).
    """
    observed = {"cpuid_pmu": view.cpuid_pmu, "kernel_pmus": view.kernel_pmus, "banner": view.kernel_banner}
    if expectation.available:
        if not view.cpuid_pmu:
            return failed(f"{expectation.feature} expected but guest CPUID enumerates no PMU", True, observed)
        if not view.kernel_pmu:
            return failed(f"guest CPUID enumerates a PMU but the guest kernel registered none: {view.kernel_banner}",
                          True, observed)  # fmt: skip
        return passed("guest CPUID and kernel show the vPMU", True, observed)
    unjudgeable = pmu_off_unjudgeable(expectation, pmu_off)
    if unjudgeable is not None:
        return skipped(unjudgeable.reason, False, observed)
    if view.cpuid_pmu or view.kernel_pmu:
        return failed(f"guest sees a PMU although none is expected ({expectation.reason})", False, observed)
    return passed(f"no PMU visible, as expected ({expectation.reason})", False, observed)


def pmu_msrs_fault(
    pmu: Expectation, faults: Expectation, view: GuestView, pmu_off: Expectation | None = None
) -> Verdict:
    """Without a vPMU, PMU MSR reads must #GP (EIO through /dev/cpu/N/msr).

    Not judged where the profile's pmu=off leaves KVM's counters in place (``pmu_off``, the pmu_off_honoured
    expectation: AMD's legacy K7 counters stay readable), with the data file's reason (pmu_off_unjudgeable)."""
    if pmu.available:
        return skipped("profile: the vPMU is on; counter MSR bounds are checked by arch.msr_bounds")
    unjudgeable = pmu_off_unjudgeable(pmu, pmu_off)
    if unjudgeable is not None:
        return skipped(unjudgeable.reason)
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


#: Fixed counters the mediated vPMU may give a guest: the Intel fixed counter 3 (TOPDOWN.SLOTS) series makes
#: KVM_MAX_NR_INTEL_FIXED_COUNTERS 4 and keeps 3 only "if (!enable_mediated_pmu)" in kvm_init_pmu_capability()
#: ("KVM: x86/pmu: Support Intel fixed counter 3 on mediated vPMU", Zide Chen/Dapeng Mi, 2026-02-26). The perf-based
#: vPMU stays at 3 (KVM_MAX_NR_FIXED_COUNTERS, BUILD_BUG_ON in kvm_init_msr_lists()). Used only when the host
#: facts carry no measured KVM offer; a kernel without the series still offers 3, which the check accepts.
MEDIATED_FIXED_COUNTERS = 4


def _kvm_bounds(pmu: Expectation, vpmu_mode: str | None) -> dict[str, int]:
    """KVM's limits from kvm_features.toml, with the fixed-counter limit of the mediated vPMU where it applies."""
    limits = dict(pmu.limits)
    if vpmu_mode == "mediated" and "fixed_counters" in limits:
        limits["fixed_counters"] = max(limits["fixed_counters"], MEDIATED_FIXED_COUNTERS)
    return limits


def guest_within_host(
    accel: str,
    pmu: Expectation,
    view: GuestView,
    host_caps: dict[str, Any] | None,
    kvm_offer: dict[str, Any] | None = None,
    vpmu_mode: str | None = None,
) -> Verdict:
    """The guest never sees more than the host has, nor more than KVM offers.

    KVM's offer is measured when the host facts have it (``host["kvm_offer"]["pmu"]``: KVM_GET_SUPPORTED_CPUID,
    decoded like the guest's CPUID): that is what kvm_init_pmu_capability() left after its clamps, in whichever vPMU
    mode the module runs, so it wins over the table. Without it (old host files) the table limits apply, with the
    mediated vPMU's fixed-counter limit (MEDIATED_FIXED_COUNTERS) when the host runs it.
    """
    if accel != "kvm":
        return skipped(f"accel: under {accel.upper()} the guest CPU model is QEMU's own, not derived from the host")
    if host_caps is None:
        return skipped("host: CPUID not readable (no /dev/cpu/0/cpuid access and CPUID not executable)")
    offer = (kvm_offer or {}).get("pmu")
    problems: list[str] = []
    guest = view.caps
    limits = {} if offer is not None else _kvm_bounds(pmu, vpmu_mode)
    source = "KVM_GET_SUPPORTED_CPUID" if offer is not None else "kvm_features.toml limits"
    if guest.arch_perfmon is not None:
        host = host_caps.get("arch_perfmon") or {}
        offered = offer.get("arch_perfmon") if offer is not None else None
        if offer is not None and offered is None:
            problems.append("KVM offers no architectural PMU (KVM_GET_SUPPORTED_CPUID leaf 0AH version 0)")
        ap = guest.arch_perfmon
        for key in ("version", "gp_counters", "gp_width", "fixed_counters", "fixed_width"):
            candidates = (host.get(key, 0), limits.get(key), (offered or {}).get(key, 0) if offer is not None else None)
            bound = min(v for v in candidates if v is not None)
            if getattr(ap, key) > bound:
                problems.append(f"{key} {getattr(ap, key)} > {bound}")
        have = [host.get("events", {})] + ([offered.get("events", {})] if offered else [])
        extra = [e for e, ok in ap.events.items() if ok and not all(events.get(e) for events in have)]
        if extra:
            problems.append(f"events the host or KVM lacks: {', '.join(extra)}")
    if guest.amd is not None and host_caps.get("amd"):
        offered_amd = (offer or {}).get("amd") or {}
        candidates = (host_caps["amd"]["core_counters"], limits.get("core_counters"), offered_amd.get("core_counters"))
        bound = min(v for v in candidates if v is not None)
        if guest.amd.core_counters > bound:
            problems.append(f"core_counters {guest.amd.core_counters} > {bound}")
    observed = view.summary()["caps"]
    if problems:
        return failed(f"guest PMU exceeds the host or what KVM offers ({source}): " + "; ".join(problems),
                      "guest <= host", observed)  # fmt: skip
    return passed(f"guest PMU enumeration within the host's and KVM's limits ({source})", "guest <= host", observed)


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


@dataclass(frozen=True)
class WindowEvents:
    """Interrupts, exceptions and context switches the probe saw around the N and the 0 window of a differential
    count (``irq_n``/``faults_n``/``switches_n`` and the ``_0`` twins, _common.h.j2 window_sample()); None: unknown
    (a record from before the probe measured them, or -1: /proc/interrupts or getrusage() unreadable).

    Each one taken while user-mode counting is on adds one to the user-mode instructions-retired and all-branches
    counts: the IRET back to user space retires partly at CPL3 (V. Weaver, D. Terpstra, S. Moore, "Non-determinism
    and overcount on modern hardware performance counter implementations", ISPASS 2013; rr-debugger/rr issue #610:
    it "overcounts on hardware interrupts, page faults"). Conditional branches would be immune, but the architectural
    event 0xC4 counts all branches. A context switch is counted too: a KVM async page fault in user mode sleeps in
    kvm_async_pf_task_wait_schedule() (arch/x86/kernel/kvm.c) without counting as a fault, and a preemption's
    interrupt is counted already, so at worst this adds one count of slack per switch.

    Policy: tolerance, not retry. A window of N = 1e6 iterations streams 64 MB from DRAM for milliseconds, and the
    guest's tick (every 1-10 ms for HZ=1000..100; NO_HZ_IDLE stops it only while the CPU idles, and the probe's CPU
    is busy) lands in most such windows, so retrying until an event-free window exists could go on without end; the
    count is judged in [exact - events_0, exact + events_n] instead, the exact count when both windows were quiet.
    """

    n: int | None
    zero: int | None

    @property
    def known(self) -> bool:
        return self.n is not None and self.zero is not None

    @property
    def quiet(self) -> bool:
        """Both windows known and free of interrupts, exceptions and switches: the count must be exact."""
        return self.n == 0 and self.zero == 0

    def text(self) -> str:
        return f"{_or_unknown(self.n)} interrupts/faults/switches in the N window, {_or_unknown(self.zero)} in the 0"


def _or_unknown(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


NO_WINDOW = WindowEvents(0, 0)
#: The source of the interrupt allowance, for reasons.
INTERRUPT_OVERCOUNT_SOURCE = ("+1 per interrupt/exception taken in user mode: Weaver et al., ISPASS 2013; "
                              "rr-debugger/rr #610")  # fmt: skip


def _window_side(record: Record, suffix: str) -> int | None:
    values = [record.get(f"{key}_{suffix}") for key in ("irq", "faults", "switches")]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        return None
    return sum(values)


def window_events(record: Record) -> WindowEvents:
    """The interrupts, faults and switches around a record's N and 0 windows (WindowEvents)."""
    return WindowEvents(_window_side(record, "n"), _window_side(record, "0"))


#: AMD: each VMRUN back into guest user mode is counted by a guest-only user-mode counter (+1 per VM exit the guest
#: cannot see: Like Xu's Zen 4 measurements on the kvm list, April 2023; the reason kvm-unit-tests x86/pmu.c asserts
#: only ">=" on AMD). Host exits in the short 0-iteration window then raise the subtracted baseline, so N-0 may fall
#: below exact by that many; a host timer or perf_event_mux_interval_ms hrtimer (1 ms) lands there rarely, twice
#: almost never (adversarial review of issue 14).
AMD_ZERO_WINDOW_EXITS = 2


def _differential_bounds(exact: int, what: str, exact_source: str, relaxed_why: str | None,
                         window: WindowEvents, vendor_amd: bool = False) -> Bounds:  # fmt: skip
    """[exact - events in the 0 window, exact + events in the N window] (+10k over the top where an erratum or AMD's
    VMRUN relaxes it; on AMD also AMD_ZERO_WINDOW_EXITS under the bottom). An unknown side allows nothing, as before
    the probe counted interrupts."""
    low_slack, high_slack = (window.zero or 0) + (AMD_ZERO_WINDOW_EXITS if vendor_amd else 0), window.n or 0
    if relaxed_why is not None:
        return Bounds(exact - low_slack, exact + 10_000 + high_slack, what, relaxed_why)
    if not window.known:
        return Bounds(exact - low_slack, exact + high_slack, what, f"{exact_source}; interrupt count unknown "
                      f"({window.text()})")  # fmt: skip
    if window.quiet:
        return Bounds(exact, exact, what, f"{exact_source}; no interrupt in either window")
    return Bounds(exact - low_slack, exact + high_slack, what,
                  f"{exact_source}, {INTERRUPT_OVERCOUNT_SOURCE}: {window.text()}")  # fmt: skip


def event_bounds(
    event: str,
    iterations: int,
    vendor_amd: bool,
    errata: OvercountErrata | bool,
    tsc: int,
    window: WindowEvents = NO_WINDOW,
) -> Bounds:
    """The expected range of an event over ``vpmu_loop(iterations)``: exact where the workload makes it exact, up to
    the interrupts and exceptions the probe saw around the N and 0 windows (``window``, see WindowEvents)."""
    n = iterations
    insns = LOOP.delta_instructions(n)
    relaxed = vendor_amd or _as_errata(errata).covers(event)
    # AMD: VMRUN may be counted as a guest instruction/branch, so kvm-unit-tests never asserts exact counts there
    # (x86/pmu.c); Intel Atom errata (INSTRUCTION_/BRANCH_OVERCOUNT_MODELS) likewise. Reference policy: ">=" with
    # expected + 10k slack.
    why = ">= on AMD (VMRUN may count)" if vendor_amd else ">= (Intel Atom overcount erratum, SRF7)"
    if event == "instructions":
        return _differential_bounds(insns, "instructions (N-0 differential)", "exact: generated loop, user mode",
                                    why if relaxed else None, window, vendor_amd)  # fmt: skip
    if event == "branch_instructions":
        return _differential_bounds(LOOP.delta_branches(n), "branches (N-0 differential)",
                                    "exact: one jnz per iteration", why if relaxed else None, window,
                                    vendor_amd)  # fmt: skip
    if event == "core_cycles":
        return Bounds(n, 50 * n, "cycles", "kvm-unit-tests x86/pmu.c: [N, 50N]")
    if event == "ref_cycles":
        # Fixed counter 2 (CPU_CLK_UNHALTED.REF_TSC) counts at the TSC's rate while unhalted (SDM Vol. 3B,
        # "Fixed-Function Performance Counters"); the GP encoding 0x013C may tick at the slower crystal/bus rate
        # (kvm-unit-tests calibrates the ratio), so only bound it by the TSC ticks of the same window, which starts
        # before the enable and ends after the read. That holds while the guest TSC runs at the host's rate, i.e.
        # unless userspace scales it (KVM_SET_TSC_KHZ: QEMU's tsc-frequency=, or a migration to a host of another
        # frequency), which no profile does; with scaling this bound would have to include the ratio.
        return Bounds(1, 1.05 * tsc, "ref-cycles", "0 < ref-cycles <= 1.05 x TSC delta")
    if event == "llc_references":
        return Bounds(1, 2.5 * n, "LLC references", "kvm-unit-tests x86/pmu.c: [1, 2.5N]")
    if event == "llc_misses":
        # kvm-unit-tests' [1, N] bounds a loop that flushes one line per run ("x86: pmu: Improve LLC misses event
        # verification": one clflush before the N loads), so N is its worst case. The probe flushes all N lines
        # (flush_buffer), which makes N the expected count, and the architectural event "may include speculation"
        # and, on newer cores, fills by the first-level cache prefetcher (SDM Vol. 3B, "Last Level Cache Misses -
        # Event Select 2EH, Umask 41H"), plus the page walks of 16,384 fresh 4 KiB pages: 10 % over N.
        return Bounds(1, 1.1 * n, "LLC misses", "[1, 1.1N]: every line flushed, so ~N misses; SDM: the event may "
                      "include speculative and L1-prefetcher misses")  # fmt: skip
    if event == "branch_misses":
        return Bounds(0, 0.1 * n, "branch misses", "kvm-unit-tests x86/pmu.c: <= 0.1N (min 1 only with IBPB)")
    if event == "topdown_slots":
        return Bounds(n, 400 * n, "slots", ">= cycles >= N; <= 8 slots x 50N cycles")
    raise ValueError(f"no bounds for event {event!r}")


#: Events judged on the N-0 difference; the rest on the N run alone (a 0-iteration run has no range of its own).
DIFFERENTIAL_EVENTS = ("instructions", "branch_instructions")


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


#: The perf-based vPMU's documented behaviour under counter contention (Documentation/admin-guide/kernel-parameters.txt,
#: kvm-{amd,intel}.enable_mediated_pmu): KVM-created perf events "contend for hardware resources", and a perf-based
#: vPMU "can result in silently dropped guest events (due to resource contention)"; a mediated vPMU "eliminates lost
#: guest events".
CONTENTION_DOC = ("the perf-based vPMU \"can result in silently dropped guest events (due to resource contention)\" "
                  "(Documentation/admin-guide/kernel-parameters.txt, kvm-{amd,intel}.enable_mediated_pmu)")  # fmt: skip


def contention_skip(
    contention: str | None, shortfalls: list[str], others: list[str], expected: Any, observed: Any
) -> Verdict | None:
    """SKIP when every problem is a shortfall and a host load that competes for the counters explains it under the
    perf-based vPMU (``contention``: which load and how, harness.coexist.perf_based_contention()); the measured loss
    goes into the reason and the counts stay the observation. None: judge as usual (an overcount, a misplaced
    member, or a loss without such a load stays a FAIL)."""
    if contention is None or not shortfalls or others:
        return None
    return skipped(f"host-load: {contention}: they compete with KVM's pinned backing events for the counters, and "
                   f"{CONTENTION_DOC}; measured: {'; '.join(shortfalls)}", expected, observed)  # fmt: skip


def shortfall_verdict(
    contention: str | None, shortfalls: list[str], others: list[str], expected: Any, observed: Any
) -> Verdict | None:
    """The verdict of a measurement with problems: contention_skip's SKIP where a competing load explains every
    shortfall, else a FAIL naming the shortfalls and the other problems; None when there is none."""
    verdict = contention_skip(contention, shortfalls, others, expected, observed)
    if verdict:
        return verdict
    if shortfalls or others:
        return failed("; ".join(shortfalls + others), expected, observed)
    return None


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


#: AMD core events standing in for the architectural ones (AMD PPR "Core Performance Monitor Counters":
#: 0x76 cycles not in halt, 0xC0 retired instructions, 0xC2 retired branches, 0xC3 retired branch mispredicts).
AMD_EVENTS = {"core_cycles": 0x76, "instructions": 0xC0, "branch_instructions": 0xC2, "branch_misses": 0xC3}


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


def first_record(records: list[Record], kind: str, **match: Any) -> Record | None:
    """The first record of ``kind`` whose fields equal ``match`` (e.g. mode="any"), or None."""
    for r in records:
        if r.get("kind") == kind and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def overcount_errata(caps: PmuCaps, host_caps: dict[str, Any] | None = None) -> OvercountErrata:
    """Which counts overcount on this CPU (INSTRUCTION_/BRANCH_OVERCOUNT_MODELS).

    An erratum is a property of the silicon, so the host's model counts as well as the one the guest is shown:
    a profile with a named CPU model (e.g. ``-cpu SapphireRapids`` on a Sierra Forest host) hides the real model
    from the guest's CPUID, while the hardware still overcounts.
    """
    models = {caps.model} if caps.vendor == "GenuineIntel" and caps.family == 6 else set()
    host = host_caps or {}
    if host.get("vendor") == "GenuineIntel" and host.get("family") == 6 and isinstance(host.get("model"), int):
        models.add(host["model"])
    return OvercountErrata(instructions=bool(models & INSTRUCTION_OVERCOUNT_MODELS),
                           branches=bool(models & BRANCH_OVERCOUNT_MODELS))  # fmt: skip


def host_nmi_watchdog(host: dict[str, Any]) -> str | None:
    """The host's kernel.nmi_watchdog when it is on (doctor ``sysctls``, else the older ``perf.nmi_watchdog``)."""
    value = (host.get("sysctls") or {}).get("kernel.nmi_watchdog")
    if value is None:
        value = (host.get("perf") or {}).get("nmi_watchdog")
    value = str(value).strip() if value is not None else None
    return value if value not in (None, "", "0") else None


def watchdog_reason(host: dict[str, Any]) -> str | None:
    """WATCHDOG_REASON for a perf-based vPMU host whose NMI watchdog is on, else None.

    Under the mediated vPMU the watchdog cannot starve a guest counter: the host's counters are switched out at
    VM-entry (perf_load_guest_context()), and the watchdog's include-guest event makes perf_create_mediated_pmu()
    fail with EBUSY, so the VM does not even get a vCPU ("Failed to enable mediated vPMU, try disabling system wide
    perf events and nmi_watchdog", arch/x86/kvm/x86.c kvm_arch_vcpu_precreate()).
    """
    value = host_nmi_watchdog(host)
    if value is None or host.get("vpmu_mode") != "perf-based":
        return None
    return WATCHDOG_REASON.format(value=value)


def host_watchdog_starves(view: GuestView, host: dict[str, Any]) -> Callable[[str, int], bool]:
    """Which counters-probe groups would lose a member to the host NMI watchdog: ``starves(event, copies)``.

    Under the perf-based vPMU every guest counter in use is a pinned host perf event on the vCPU's task, and the
    watchdog's pinned per-CPU cycles event is scheduled first (CPU-pinned before task-pinned, kernel/events/core.c
    ctx_sched_in()). On Intel x86 perf puts that cycles event on fixed counter 1 (arch/x86/events/core.c
    __perf_sched_find_counter() prefers fixed counters), so the only guest group that then needs more host GP
    counters than exist is the cycles group using every GP counter plus guest FC1 (KVM backs guest FC1 with the
    0x003c encoding, which may then take a host GP counter). On AMD there are no fixed counters: the watchdog takes one
    of the host's core counters, so every group using all guest counters is one short. A host with more counters
    than the guest is shown has room, and nothing is held back. The verdicts accept the unmeasured counter
    (gp_event) and say why; the alternative, skipping every arch.gp check on a default AMD host, measures nothing.
    """
    if watchdog_reason(host) is None:
        return lambda _event, _copies: False
    host_caps = (host.get("cpu") or {}).get("caps") or {}
    if view.amd:
        host_counters = (host_caps.get("amd") or {}).get("core_counters")
        return lambda _event, copies: host_counters is None or copies > host_counters - 1
    host_pm = host_caps.get("arch_perfmon") or {}
    host_gp, host_fixed = host_pm.get("gp_counters"), host_pm.get("fixed_counters")
    guest = view.caps.arch_perfmon
    guest_gp = guest.gp_counters if guest else 0
    if host_fixed is not None and host_fixed < 2:  # no host FC1: the watchdog sits on a GP counter, as on AMD
        return lambda _event, copies: host_gp is None or copies > host_gp - 1
    room = host_gp is not None and host_gp > guest_gp
    return lambda event, copies: event == "core_cycles" and copies > guest_gp and not room


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
        return f"{where} raised {_sig_name(record['rdpmc_signal'])}"
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
            problems.append(f"RDPMC({index:#x}) raised {_sig_name(record['signal'])}")
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
            problems.append(f"{kind}: {_errno_text(record) if record else 'no record'}")
            continue
        observed[kind] = _sig_name(record["signal"]) if record["signal"] else record.get("value", record.get("rdpmc"))
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
                f"{_sig_name(control)}, so the fault of RDPMC({record['index']:#x}) proves nothing (CR4.PCE clear, "
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
        return failed(f"sampling event: {_errno_text(record)}", "samples", _errno_text(record))
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
