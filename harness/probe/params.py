"""Parameters of the counting probes, derived from the guest's decoded view (decoding happens once, in Python).

Event encodings: SDM Vol. 3B, "Pre-defined Architectural Performance Events" (EVTSEL umask<<8 | event) and the
fixed-counter pseudo-encodings of Linux's Intel PMU driver (0x0300 ref-cycles, 0x0400 slots: fixed-only);
AMD: harness.probe.events.AMD_EVENTS.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from harness.probe.events import AMD_EVENTS, FIXED_EVENTS
from harness.probe.guest_view import GuestView
from harness.probe.host_watchdog import HELD_BACK_WATCHDOG, host_watchdog_starves
from harness.probe.workloads import CPUID_LOOP

PERF_TYPE_HARDWARE = 0
PERF_TYPE_RAW = 4
PERF_COUNT_HW_INSTRUCTIONS = 1
ARCH_EVENTS = {
    "core_cycles": 0x003C,
    "instructions": 0x00C0,
    "ref_cycles": 0x013C,
    "llc_references": 0x4F2E,
    "llc_misses": 0x412E,
    "branch_instructions": 0x00C4,
    "branch_misses": 0x00C5,
    "topdown_slots": 0x01A4,
}
#: Raw configs perf schedules on fixed counter j (Linux arch/x86/events/intel/core.c fixed constraints).
FIXED_CONFIGS = (0x00C0, 0x003C, 0x0300, 0x0400)
#: Architectural events that may also run on a fixed counter: their group gets one more copy so that one copy
#: can sit on the fixed counter and the others still cover every GP counter.
FIXED_CAPABLE = {"instructions": 0, "core_cycles": 1}
ITERATIONS = 1_000_000  # kvm-unit-tests' N
#: arch.pmi_sampling: one PMI per 1,000,003 user instructions (prime) over 20 loops of N (2e8 instructions, ~200
#: samples). Even at 1e10 instructions/s that is 1e4 PMIs/s = 10 per 1 ms tick, a tenth of the per-tick budget at
#: perf_event_max_sample_rate=100000 and HZ=1000 (kernel/events/core.c: max_samples_per_tick =
#: DIV_ROUND_UP(rate, HZ); __perf_event_account_interrupt() throttles at that many PMIs per tick). The budget is
#: the guest's and, under the perf-based vPMU, the host's too: KVM's backing event is a host sampling event that
#: the host throttles like any other, invisibly to the guest. The old 100,003 gave 1e5 PMIs/s on a fast core.
PMI_SAMPLE_PERIOD = 1_000_003
PMI_SAMPLE_REPEATS = 20
#: The LBR probe samples user instructions over vpmu_chain() the same way and under the same budget: the old period of
#: 100,003 gave up to 1e5 PMIs/s, and an LBR PMI is a heavy one for a guest (the LBR MSRs are read in the PMI
#: handler). The period is PMI_SAMPLE_PERIOD (prime: no aliasing with the 12-instruction chain iteration), and
#: LBR_ITERATIONS (1.2e8 instructions) gives ~120 samples, a third of them in f3 for the call-stack check. The probe
#: calls vpmu_prepare_sampling() and counts PERF_RECORD_THROTTLE, as the counters probe does.
LBR_SAMPLE_PERIOD = PMI_SAMPLE_PERIOD
LBR_ITERATIONS = 10_000_000
INVALID_RDPMC_INDEX = 64  # kvm-unit-tests x86/pmu.c: "Expected #GP on RDPMC(64)"


def _group(name: str, config: int, copies: int, held_back: int, event_type: int = PERF_TYPE_RAW) -> dict[str, Any]:
    return {"name": name, "set": "gp", "type": event_type, "config": config, "copies": copies - held_back,
            "held_back": held_back, "held_back_for": HELD_BACK_WATCHDOG if held_back else ""}  # fmt: skip


def counters_params(view: GuestView, host: dict[str, Any] | None = None) -> dict[str, Any]:
    """Groups to open: every available event on every GP counter, and each fixed counter alone.

    With ``host`` facts, a group that would need the counter the host NMI watchdog holds gets one copy fewer
    (probe.host_watchdog.host_watchdog_starves says which); its records carry ``held_back`` and the verdict accepts the
    one GP counter left unmeasured, saying why.
    """
    events: list[dict[str, Any]] = []
    perfmon = view.caps.arch_perfmon
    starves = host_watchdog_starves(view, host or {})
    if perfmon is not None:
        for name, config in ARCH_EVENTS.items():
            if not perfmon.events.get(name):
                continue
            fixed = FIXED_CAPABLE.get(name)
            extra = 1 if fixed is not None and (perfmon.fixed_counter_mask >> fixed) & 1 else 0
            copies = perfmon.gp_counters + extra
            events.append(_group(name, config, copies, 1 if starves(name, copies) else 0))
        for index, config in enumerate(FIXED_CONFIGS):
            if (perfmon.fixed_counter_mask >> index) & 1:
                events.append({**_group(f"fixed{index}", config, 1, 0), "set": "fixed"})
    elif view.amd and view.cpuid_pmu:
        assert view.caps.amd is not None
        for name, config in AMD_EVENTS.items():
            copies = view.caps.amd.core_counters
            events.append(_group(name, config, copies, 1 if starves(name, copies) else 0))
    else:
        # No PMU enumerated: still try the generic event once, so the run records the kernel's own answer.
        events.append(_group("instructions", PERF_COUNT_HW_INSTRUCTIONS, 1, 0, PERF_TYPE_HARDWARE))
    return {
        "iterations": ITERATIONS,
        "events": events,
        "invalid_rdpmc_index": INVALID_RDPMC_INDEX,
        "sample_period": PMI_SAMPLE_PERIOD,
        "sample_repeats": PMI_SAMPLE_REPEATS,
    }


def msr_params(view: GuestView) -> dict[str, Any]:
    """The register layout the msr probe programs."""
    perfmon = view.caps.arch_perfmon
    if perfmon is not None:
        perf_caps = view.perf_capabilities() or {}
        return {
            "vendor": "intel",
            "counters": perfmon.gp_counters,
            "width": perfmon.gp_width,
            "fixed_mask": perfmon.fixed_counter_mask,
            "fixed_count": perfmon.fixed_counter_mask.bit_length(),
            "fixed_width": perfmon.fixed_width,
            "version": perfmon.version,
            "full_width": bool(perf_caps.get("full_width_write")),
            "iterations": ITERATIONS,
        }
    amd = view.caps.amd
    assert amd is not None, "msr probe needs an enumerated PMU"
    return {
        "vendor": "amd",
        "counters": amd.core_counters,
        "width": 48,
        "core_ext": amd.perfctr_core,
        "perfmon_v2": amd.perfmon_v2,
        "iterations": ITERATIONS,
    }


# --- feature probes (issue: topdown, LBR, PEBS, IBS) ----------------------------------------------------------
#: Topdown encodings (tools/perf/Documentation/topdown.txt; the guest's cpu/events/topdown-*): slots is the fixed
#: pseudo-event 0x0400, metric events are umask 0x80..0x83 of event 0.
TOPDOWN_SLOTS = 0x0400
TOPDOWN_METRICS = (("retiring", 0x8000), ("bad_spec", 0x8100), ("fe_bound", 0x8200), ("be_bound", 0x8300))
CHASE_LINES = 1 << 20  # 64 MiB of cache lines: far beyond any LLC a guest sees
#: MEM_INST_RETIRED.ALL_LOADS (Skylake and later server/client cores, incl. ICX/SPR/EMR/GNR, the PEBS-via-EPT
#: hosts); MEM_TRANS_RETIRED.LOAD_LATENCY = perf's mem-loads (event 0xcd, umask 0x1) with ldlat in config1.
PEBS_LOAD_EVENT = 0x81D0
LDLAT_EVENT = 0x01CD
LDLAT = 30
PEBS_PERIOD = 10_007  # prime (reference §4c)
IBS_PERIOD = 0x10000  # a multiple of 16 (arch/x86/events/amd/ibs.c rejects a low nibble)
IBS_OP_CNT_CTL = 1 << 19  # ibs_op format "cnt_ctl" = config:19: count dispatched ops, not cycles
#: The guest kernel's sysfs file for cnt_ctl. arch/x86/events/amd/ibs.c perf_ibs_op_init() adds IBS_OP_CNT_CTL to
#: the op PMU's config_mask only when ibs_caps has IBS_CAPS_OPCNT (CPUID 8000001BH EAX[4]), and cnt_ctl_is_visible()
#: shows format/cnt_ctl under the same condition; perf_ibs_init() rejects config bits outside config_mask with
#: EINVAL. So the file's presence is the guest kernel's own answer to "may bit 19 be set".
IBS_CNT_CTL_FORMAT = "ibs_op/format/cnt_ctl"


def topdown_params() -> dict[str, Any]:
    return {"slots_config": TOPDOWN_SLOTS, "cycles_config": ARCH_EVENTS["core_cycles"],
            "metrics": [{"name": n, "config": c} for n, c in TOPDOWN_METRICS], "alu_repeats": 2000,
            "chase_lines": CHASE_LINES, "chase_steps": 2_000_000}  # fmt: skip


def lbr_params() -> dict[str, Any]:
    return {"max_samples": 100, "sample_period": LBR_SAMPLE_PERIOD, "iterations": LBR_ITERATIONS}


def pebs_params(max_precise: int) -> dict[str, Any]:
    return {"iterations": ITERATIONS, "sample_period": PEBS_PERIOD, "precise_levels": list(range(1, max_precise + 1)),
            "load_event": PEBS_LOAD_EVENT, "ldlat_event": LDLAT_EVENT, "ldlat": LDLAT}  # fmt: skip


def ibs_params(sysfs: dict[str, str]) -> dict[str, Any]:
    """IBS op counts dispatched ops (cnt_ctl) only where the guest kernel offers cnt_ctl, else cycles (config 0)."""
    op_config = IBS_OP_CNT_CTL if IBS_CNT_CTL_FORMAT in sysfs else 0
    return {"iterations": ITERATIONS, "max_samples": 200, "period": IBS_PERIOD,
            "op_type": int(sysfs["ibs_op/type"]), "op_config": op_config,
            "fetch_type": int(sysfs["ibs_fetch/type"])}  # fmt: skip


# --- semantics probe (issue 12: overflow on every counter, WRMSR to a running counter, all counters at once, fixed
# counters that do not exist, guest writes to IA32_PERF_CAPABILITIES, AMD K7 aliases) ------------------------------
#: Iterations of the overflow and running-write windows: 1e6 loop instructions, enough to wrap a counter preset just
#: below its width, short enough that most windows see no guest interrupt (each one adds a count: WindowEvents).
SEMANTICS_OVERFLOW_ITERATIONS = 100_000
#: Fixed counter indices the semantics probe tries beyond the enumerated ones reach at least this (KVM selftests
#: pmu_counters_test.c guest_test_fixed_counters() walks 0..MAX_NR_FIXED_COUNTERS-1 = 0..2; the mediated vPMU may
#: give a fourth, fixed counter 3).
SEMANTICS_FIXED_PROBE_LIMIT = 4
#: CPUID iterations of the emulated-instruction window: each is a VM exit (~1-2 us under KVM), so 10,000 take ~20 ms.
SEMANTICS_CPUID_ITERATIONS = 10_000
#: Random conditional branches of the branch-miss window (~half mispredict: ~50,000 misses).
SEMANTICS_RANDOM_ITERATIONS = 100_000
#: Forced-emulation iterations: each is a #UD exit plus an emulation (~2-5 us), so 2,000 take ~10 ms.
SEMANTICS_FEP_ITERATIONS = 2_000


def force_emulation_prefix(host: dict[str, Any] | None) -> bool:
    """Whether the host's kvm.force_emulation_prefix is on (doctor ``kvm.force_emulation_prefix``: "Y"/"N" on older
    kernels, an integer bit mask since 6.7, where any non-zero value enables the prefix)."""
    value = str(((host or {}).get("kvm") or {}).get("force_emulation_prefix") or "").strip()
    return value not in ("", "0", "N", "n")


def semantics_gp_events(view: GuestView) -> list[dict[str, Any]]:
    """GP counter i's event in the all-counters window: the available architectural events in turn (kvm-unit-tests
    x86/pmu.c check_counters_many() gives each counter the next available event, wrapping around when counters
    outnumber events)."""
    perfmon = view.caps.arch_perfmon
    if perfmon is not None:
        available = [(name, config) for name, config in ARCH_EVENTS.items() if perfmon.events.get(name)]
        counters = perfmon.gp_counters
    else:
        assert view.caps.amd is not None, "semantics probe needs an enumerated PMU"
        available = list(AMD_EVENTS.items())
        counters = view.caps.amd.core_counters
    if not available:
        available = [("instructions", ARCH_EVENTS["instructions"])]
    return [{"name": available[i % len(available)][0], "config": available[i % len(available)][1]}
            for i in range(counters)]  # fmt: skip


def semantics_absent_fixed(fixed_mask: int) -> list[int]:
    """Fixed counter indices the guest does not have: every index below SEMANTICS_FIXED_PROBE_LIMIT missing from the
    mask, and always the first index above the highest enumerated one."""
    top = max(fixed_mask.bit_length() + 1, SEMANTICS_FIXED_PROBE_LIMIT)
    return [j for j in range(top) if not (fixed_mask >> j) & 1]


def semantics_params(view: GuestView, host: dict[str, Any] | None = None) -> dict[str, Any]:
    """The register layout and events the semantics probe programs (guest_tests/probes/semantics.c.j2); ``host``
    facts say whether the forced-emulation loop may run."""
    perfmon = view.caps.arch_perfmon
    common = {"iterations": ITERATIONS, "overflow_iterations": SEMANTICS_OVERFLOW_ITERATIONS,
              "gp_events": semantics_gp_events(view), "cpuid_iterations": SEMANTICS_CPUID_ITERATIONS,
              "cpuid_loop": asdict(CPUID_LOOP),
              "random_iterations": SEMANTICS_RANDOM_ITERATIONS, "fep_iterations": SEMANTICS_FEP_ITERATIONS,
              "fep": force_emulation_prefix(host)}  # fmt: skip
    if perfmon is not None:
        perf_caps = view.perf_capabilities() or {}
        fixed_count = perfmon.fixed_counter_mask.bit_length()
        return {**common, "vendor": "intel", "counters": perfmon.gp_counters, "width": perfmon.gp_width,
                "fixed_mask": perfmon.fixed_counter_mask, "fixed_count": fixed_count,
                "fixed_width": perfmon.fixed_width, "version": perfmon.version,
                "full_width": bool(perf_caps.get("full_width_write")),
                "fixed_events": [FIXED_EVENTS[j] if j < len(FIXED_EVENTS) else f"fixed{j}" for j in range(fixed_count)],
                "absent_fixed": semantics_absent_fixed(perfmon.fixed_counter_mask)}  # fmt: skip
    amd = view.caps.amd
    assert amd is not None, "semantics probe needs an enumerated PMU"
    return {**common, "vendor": "amd", "counters": amd.core_counters, "width": 48, "core_ext": amd.perfctr_core,
            "perfmon_v2": amd.perfmon_v2}  # fmt: skip


#: Life-cycle checks (harness/suite/lifecycle.py): the counting region across a live migration should last this long
#: (seconds) so that the switch-over happens inside it: a 512 MiB guest migrates in about 0.7 s here and the
#: destination answers SSH 0.3 s later.
SPAN_TARGET_S = 5.0
MAX_SPAN_REPEATS = 100_000


def lifecycle_params(view: GuestView, mode: str, repeats: int = 1) -> dict[str, Any]:
    """The msr probe in a life-cycle mode: ``state`` (read every PMU MSR), ``program`` (program the counters and
    leave them counting) or ``continue`` (count ``repeats`` x N loop iterations on the running counters)."""
    return {**msr_params(view), "mode": mode, "repeats": repeats}


def span_repeats(loop_ns: int) -> int:
    """How many loops of N iterations last SPAN_TARGET_S, from the time one took (the program step measures it)."""
    return max(1, min(MAX_SPAN_REPEATS, int(SPAN_TARGET_S * 1e9 / max(1, loop_ns)) + 1))
