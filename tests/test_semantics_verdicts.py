"""The semantics probe's verdicts (harness/judge/semantics.py) over records in its exact output format, built as
a healthy Intel or AMD KVM guest would print them, and the probe's counted window checked with callgrind.

Record factories are checked against the keys guest_tests/probes/semantics.c.j2 prints, so they cannot drift.
"""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
from dataclasses import replace

import pytest

from harness.judge import semantics as sv
from harness.judge.expectations import Expectation
from harness.probe.params import SEMANTICS_OVERFLOW_ITERATIONS, semantics_params
from harness.probe.runner import PROBES_DIR, ProbeBuilder
from harness.probe.workloads import CPUID_LOOP, FEP_LOOP, LOOP, RANDOM_BRANCHES
from tests.test_verdicts import (
    ABSENT,
    EXPECTED,
    WINDOW_KEYS,
    amd_kvm_guest_view,
    function_keys,
    intel_kvm_guest_view,
    windows,
)

SOURCE = (PROBES_DIR / "semantics.c.j2").read_text()
MASK48 = (1 << 48) - 1
OVF_N = SEMANTICS_OVERFLOW_ITERATIONS
#: User-mode instructions of the 0-iteration window on a healthy guest: the return half of the enabling pwrite(), the
#: loop's call with n = 0, the start of the disabling pwrite() (callgrind, test_window_is_the_loop_plus_a_constant).
ZERO = 98
FAULTS = Expectation("pmu_msrs_fault", True, "kvm.ignore_msrs=N")
IGNORED = Expectation("pmu_msrs_fault", False, "host: kvm.ignore_msrs=Y: KVM returns 0 instead of #GP")
EIO = {"error": "wrmsr", "errno": errno.EIO, "strerror": "Input/output error"}
PERF_BASED_WATCHDOG = {"vpmu_mode": "perf-based", "sysctls": {"kernel.nmi_watchdog": "1"}}


def overflow(counter: str, bit: int, final: int = 1, *, status: int | None = None, after: int = 0, global_: int = 1,
             width: int = 48, **window) -> dict:  # fmt: skip
    """An "overflow" record (overflow() in semantics.c.j2): the preset 1 - (zero + loop) wrapped once to ``final``;
    status as KVM's kvm_perf_overflow() sets it (only this counter's bit), cleared by the write of that bit."""
    preset = (1 - (ZERO + LOOP.delta_instructions(OVF_N))) & ((1 << width) - 1)
    return {"probe": "semantics", "kind": "overflow", "counter": counter, "bit": bit, "width": width,
            "iterations": OVF_N, "global": global_, "write_msr": 0x4C1, "zero": ZERO, "zero_runs": [ZERO, ZERO, 99],
            "preset": preset, "final": final & ((1 << width) - 1), "status_before": 0,
            "status": (1 << bit) * global_ if status is None else status, "status_after_clear": after,
            **windows(**window)}  # fmt: skip


def intel_overflows(**changes) -> list[dict]:
    records = [overflow(f"gp{i}", i) for i in range(8)] + [overflow("fixed0", 32)]
    for r in records:
        r.update(changes.get(r["counter"], {}))
    return records


def running(count: int = 150, final: int | None = None, status: int = 1, global_: int = 1) -> list[dict]:
    """The running_write and running_overflow records (running_write() in semantics.c.j2): 150 user instructions
    after the WRMSR 0; after WRMSR -1 the loop call plus a 150-instruction tail, minus one."""
    wrapped = LOOP.instructions(OVF_N) + 150 - 1 if final is None else final
    return [
        {
            "probe": "semantics",
            "kind": "running_write",
            "counter": "gp0",
            "iterations": OVF_N,
            "write_msr": 0x4C1,
            "count": count,
            "irq_n": 0,
            "faults_n": 0,
            "switches_n": 0,
        },
        {
            "probe": "semantics",
            "kind": "running_overflow",
            "counter": "gp0",
            "bit": 0,
            "width": 48,
            "iterations": OVF_N,
            "global": global_,
            "write_msr": 0x4C1,
            "start": 1 << 24,
            "preset": MASK48,
            "final": wrapped & MASK48,
            "status_before": 0,
            "status": status * global_,
            "status_after_clear": 0,
        },
    ]


def member(counter: str, event: str, value: int, value_0: int = 0, tsc: int = 50_000_000, **window) -> dict:
    """An "all_counters" record (rec_member() in semantics.c.j2)."""
    return {"probe": "semantics", "kind": "all_counters", "counter": counter, "event": event, "config": 0,
            "iterations": 1_000_000, "global": 1, "value_n": value_0 + value, "value_0": value_0, "tsc_n": tsc,
            **windows(**window)}  # fmt: skip


#: What a healthy N = 1e6 window gives for each event (bounds.event_bounds): exact for instructions/branches.
HEALTHY = {"core_cycles": 3_000_000, "instructions": LOOP.delta_instructions(1_000_000),
           "ref_cycles": 2_500_000, "llc_references": 1_000_000, "llc_misses": 990_000,
           "branch_instructions": LOOP.delta_branches(1_000_000), "branch_misses": 12,
           "topdown_slots": 12_000_000}  # fmt: skip


def all_members(view) -> list[dict]:
    exact = ("instructions", "branch_instructions")
    records = [member(f"gp{i}", e["name"], HEALTHY[e["name"]], 300 if e["name"] in exact else 0)
               for i, e in enumerate(semantics_params(view)["gp_events"])]  # fmt: skip
    if view.caps.arch_perfmon:
        records += [member(f"fixed{j}", e, HEALTHY[e], 300 if e == "instructions" else 0)
                    for j, e in enumerate(("instructions", "core_cycles", "ref_cycles"))]  # fmt: skip
    return records


def absent(op: str, msr: int, faulted: bool = True, value: int = 0) -> dict:
    record = {"probe": "semantics", "kind": "fixed_absent", "op": op, "index": 3, "msr": msr}
    if op != "rdmsr":
        record["written"] = 0x2000 if op == "fixed_ctrl" else (1 << 35 if op == "global_ctrl" else 0)
    if faulted:
        return {**record, **EIO, "error": "rdmsr" if op == "rdmsr" else "wrmsr"}
    return {**record, ("value" if op == "rdmsr" else "read"): value}


def absent_records(**accepted) -> list[dict]:
    ops = (("fixed_ctrl", 0x38D), ("global_ctrl", 0x38F), ("rdmsr", 0x30C), ("wrmsr", 0x30C))
    return [absent(op, msr, op not in accepted, accepted.get(op, 0)) for op, msr in ops]


def perfcap(accepted: bool = False, after: int = 0x2000) -> list[dict]:
    read = {"probe": "semantics", "kind": "perfcap_write", "op": "rdmsr", "msr": 0x345, "value": 0x2000}
    writes = [{"probe": "semantics", "kind": "perfcap_write", "op": "wrmsr", "msr": 0x345, "written": v,
               **({"read": v} if accepted else EIO)} for v in (0x2000, 0)]  # fmt: skip
    return [read, *writes, {"probe": "semantics", "kind": "perfcap_after", "op": "rdmsr", "msr": 0x345, "value": after}]


def alias(broken: int | None = None) -> list[dict]:
    records = []
    for i in range(4):
        for wmsr, rmsr, value in ((0xC0010004 + i, 0xC0010201 + 2 * i, 0x123456789A + i),
                                  (0xC0010201 + 2 * i, 0xC0010004 + i, 0xABCDEF0123 + i)):  # fmt: skip
            read = 0 if broken == i else value
            records.append({"probe": "semantics", "kind": "alias", "index": i, "write_msr": wmsr, "read_msr": rmsr,
                            "written": value, "read": read})  # fmt: skip
    return records


# --- the factories print what the probe prints ------------------------------------------------------------------


def test_factories_emit_the_probe_keys():
    base = {"probe", "kind"}
    over = function_keys(SOURCE, "static void overflow(const char", "/* KUT check_running_counter_wrmsr")
    over |= {"zero_runs"}  # rec_u64_list
    assert set(overflow("gp0", 0)) == over | WINDOW_KEYS | base
    run = function_keys(SOURCE, "static void running_write(void)", "/* --- every counter at once")
    write, wrap = running()
    assert set(write) | set(wrap) == run | base
    assert set(member("gp0", "instructions", 1)) == (
        function_keys(SOURCE, "static void rec_member", "static void all_counters") | WINDOW_KEYS | base
    )
    write = function_keys(SOURCE, "int probe_write(", "void probe_read(")
    read = function_keys(SOURCE, "void probe_read(", "/* Fixed counters beyond")
    assert set(absent("wrmsr", 0x30C, False)) == write | base and set(absent("rdmsr", 0x30C, False)) == read | base
    assert set(perfcap()[1]) == write - {"read", "index"} | base | set(EIO)
    assert set(alias()[0]) == function_keys(SOURCE, "static void write_read_alias", "static void alias") | base


# --- overflow on every counter ----------------------------------------------------------------------------------


def test_overflow_every_counter_healthy_intel():
    v = sv.overflow_every_counter(EXPECTED, intel_kvm_guest_view(), intel_overflows())
    assert v.status == "pass" and "9 counters" in v.reason


def test_overflow_off_by_one_fails_unless_an_interrupt_explains_it():
    view = intel_kvm_guest_view()
    v = sv.overflow_every_counter(EXPECTED, view, intel_overflows(gp3={"final": 2}))
    assert v.status == "fail" and "gp3" in v.reason and "count == 1" in v.reason
    assert sv.overflow_every_counter(EXPECTED, view, intel_overflows(gp3={"final": 2, "irq_n": 1})).status == "pass"
    # An interrupt in the calibration window makes the preset one too small: the count falls short by one.
    assert sv.overflow_every_counter(EXPECTED, view, intel_overflows(gp3={"final": 0, "irq_0": 1})).status == "pass"


def test_overflow_that_never_wrapped_fails():
    """A counter that missed the last instructions reads just below 2^48: signed, it is far below 1."""
    v = sv.overflow_every_counter(EXPECTED, intel_kvm_guest_view(), intel_overflows(fixed0={"final": MASK48 - 40}))
    assert v.status == "fail" and "fixed0" in v.reason


def test_overflow_status_bit_and_clear_exactly_that_bit():
    view = intel_kvm_guest_view()
    v = sv.overflow_every_counter(EXPECTED, view, intel_overflows(gp5={"status": 0}))
    assert v.status == "fail" and "bit 5 not set" in v.reason
    v = sv.overflow_every_counter(EXPECTED, view, intel_overflows(gp2={"status": 0b101, "status_after_clear": 0}))
    assert v.status == "fail" and "exactly that bit" in v.reason  # bit 0 was cleared too
    # Bits above the counters (CondChgd 63, buffer overflow 62) are not this probe's business.
    high = 1 << 63
    ok = intel_overflows(gp2={"status": high | 4, "status_after_clear": high})
    assert sv.overflow_every_counter(EXPECTED, view, ok).status == "pass"


def test_overflow_missing_counter_is_an_error_and_absent_pmu_skips():
    view = intel_kvm_guest_view()
    v = sv.overflow_every_counter(EXPECTED, view, intel_overflows()[:-1])
    assert v.status == "error" and "fixed0" in v.reason
    assert sv.overflow_every_counter(ABSENT, view, []).status == "skip"


def test_overflow_amd_allows_vmrun_both_ways():
    view = amd_kvm_guest_view()
    records = [overflow(f"gp{i}", i, final=3 if i else MASK48) for i in range(6)]  # +2 and -2 around 1
    assert sv.overflow_every_counter(EXPECTED, view, records).status == "pass"
    records[4]["final"] = MASK48 - 5000  # far below: the counter never wrapped
    assert sv.overflow_every_counter(EXPECTED, view, records).status == "fail"


def test_overflow_without_perfmon_v2_judges_the_count_only():
    view = amd_kvm_guest_view()
    zen3 = replace(view, caps=replace(view.caps, amd=replace(view.caps.amd, perfmon_v2=False)))  # Milan, Rome
    records = [overflow(f"gp{i}", i, global_=0) for i in range(6)]
    v = sv.overflow_every_counter(EXPECTED, zen3, records)
    assert v.status == "pass" and "count only" in v.reason


def test_overflow_shortfall_under_a_competing_host_load_skips():
    records = intel_overflows(gp7={"final": MASK48 - 400_000, "status": 0})
    v = sv.overflow_every_counter(EXPECTED, intel_kvm_guest_view(), records, contention="host-pinned (pinned)")
    assert v.status == "skip" and v.reason.startswith("host-load:")
    # An overcount is never the load's doing.
    records = intel_overflows(gp7={"final": 40})
    v = sv.overflow_every_counter(EXPECTED, intel_kvm_guest_view(), records, contention="host-pinned (pinned)")
    assert v.status == "fail"


# --- WRMSR to a running counter ---------------------------------------------------------------------------------


def test_running_write_healthy():
    v = sv.running_write(EXPECTED, intel_kvm_guest_view(), running())
    assert v.status == "pass"


def test_running_write_ignored_zero_fails():
    v = sv.running_write(EXPECTED, intel_kvm_guest_view(), running(count=LOOP.delta_instructions(OVF_N) + 150))
    assert v.status == "fail" and "WRMSR 0" in v.reason


def test_running_write_ignored_minus_one_fails_even_without_status():
    """The counter starts at 2^24: an ignored -1 leaves 2^24 + the loop, which no wrap explains."""
    ignored = (1 << 24) + LOOP.instructions(OVF_N) + 150
    v = sv.running_write(EXPECTED, intel_kvm_guest_view(), running(final=ignored, global_=0))
    assert v.status == "fail" and "WRMSR -1" in v.reason
    v = sv.running_write(EXPECTED, intel_kvm_guest_view(), running(status=0))
    assert v.status == "fail" and "bit 0 not set" in v.reason


# --- all counters at once ---------------------------------------------------------------------------------------


def test_all_counters_healthy_intel_and_amd():
    for view in (intel_kvm_guest_view(), amd_kvm_guest_view()):
        v = sv.all_counters(EXPECTED, view, all_members(view))
        assert v.status == "pass", v.reason


def test_all_counters_exact_members_and_missing_ones():
    view = intel_kvm_guest_view()
    records = all_members(view)
    records[1]["value_n"] += 1  # gp1 counts instructions: one too many with no interrupt
    v = sv.all_counters(EXPECTED, view, records)
    assert v.status == "fail" and "gp1" in v.reason
    v = sv.all_counters(EXPECTED, view, all_members(view)[:-1])
    assert v.status == "error" and "fixed2" in v.reason


def test_all_counters_shortfall_with_the_host_watchdog_skips():
    """perf-based vPMU + host NMI watchdog: one guest counter may stay unscheduled while all are in use."""
    view = intel_kvm_guest_view()
    records = all_members(view)
    records[0]["value_n"] = 0  # gp0 (cycles) never counted
    assert sv.all_counters(EXPECTED, view, records).status == "fail"
    v = sv.all_counters(EXPECTED, view, records, host=PERF_BASED_WATCHDOG)
    assert v.status == "skip" and "nmi_watchdog=1" in v.reason
    mediated = {**PERF_BASED_WATCHDOG, "vpmu_mode": "mediated"}
    assert sv.all_counters(EXPECTED, view, records, host=mediated).status == "fail"


# --- fixed counters that do not exist ---------------------------------------------------------------------------


def test_fixed_absent_all_gp():
    v = sv.fixed_absent(EXPECTED, intel_kvm_guest_view(), absent_records(), FAULTS)
    assert v.status == "pass" and "[3]" in v.reason


def test_fixed_absent_accepted_control_bit_fails_even_with_ignore_msrs():
    view = intel_kvm_guest_view()
    v = sv.fixed_absent(EXPECTED, view, absent_records(fixed_ctrl=0x2000), IGNORED)
    assert v.status == "fail" and "fixed_ctrl" in v.reason and "guest_test_fixed_counters()" in v.reason
    # With ignore_msrs=Y the unknown counter MSR reads 0 instead of faulting: not judged, and said so.
    v = sv.fixed_absent(EXPECTED, view, absent_records(rdmsr=0, wrmsr=0), IGNORED)
    assert v.status == "pass" and "ignore_msrs" in v.reason
    v = sv.fixed_absent(EXPECTED, view, absent_records(rdmsr=0), FAULTS)
    assert v.status == "fail" and "guest_rd_wr_counters(MSR_CORE_PERF_FIXED_CTR0" in v.reason  # the counter-MSR #GP


# --- IA32_PERF_CAPABILITIES -------------------------------------------------------------------------------------


def test_perfcap_write():
    view = intel_kvm_guest_view()
    assert sv.perfcap_write(EXPECTED, view, perfcap(), FAULTS).status == "pass"
    v = sv.perfcap_write(EXPECTED, view, perfcap(accepted=True, after=0), FAULTS)
    assert v.status == "fail" and "want #GP" in v.reason and "changed" in v.reason
    assert sv.perfcap_write(EXPECTED, view, perfcap(), IGNORED).status == "skip"
    no_pdcm = replace(view, msrs={})
    v = sv.perfcap_write(EXPECTED, no_pdcm, [], FAULTS)
    assert v.status == "skip" and "PDCM" in v.reason


# --- AMD K7 aliases ---------------------------------------------------------------------------------------------


def test_k7_alias():
    view = amd_kvm_guest_view()
    assert sv.k7_alias(EXPECTED, view, alias()).status == "pass"
    v = sv.k7_alias(EXPECTED, view, alias(broken=2))
    assert v.status == "fail" and "counter 2" in v.reason
    legacy = replace(view, caps=replace(view.caps, amd=replace(view.caps.amd, perfctr_core=False)))
    v = sv.k7_alias(EXPECTED, legacy, [])
    assert v.status == "skip" and "PerfCtrExtCore" in v.reason


# --- the counted window: the loop plus a constant (callgrind) -----------------------------------------------------


@pytest.fixture(scope="module")
def semantics_probe():
    if shutil.which("valgrind") is None:
        pytest.fail("valgrind is not installed (Debian package valgrind); scripts/install installs it")
    return ProbeBuilder().build("semantics", semantics_params(intel_kvm_guest_view()))


def window_totals(binary, iterations: int, tmp_path, function: str = "sem_window", mode: str = "window") -> dict:
    out = tmp_path / f"cg.{function}.{iterations}"
    subprocess.run(["valgrind", "--tool=callgrind", f"--toggle-collect={function}", "--branch-sim=yes",
                    f"--callgrind-out-file={out}", str(binary), "0", mode, str(iterations)],
                   check=True, capture_output=True)  # fmt: skip
    text = out.read_text()
    events = re.search(r"^events: (.*)$", text, re.M).group(1).split()
    totals = [int(v) for v in re.search(r"^totals: (.*)$", text, re.M).group(1).split()]
    return dict(zip(events, totals + [0] * (len(events) - len(totals)), strict=True))


def test_window_is_the_loop_plus_a_constant(semantics_probe, tmp_path):
    """sem_window() (enable, vpmu_loop, disable; its MSR writes go to /dev/null in "window" mode) executes the same
    user instructions for every N but the loop's: the N-0 difference the overflow preset and the all-counters
    verdicts rely on is exactly LOOP.delta_instructions(N) and LOOP.delta_branches(N) conditional branches."""
    zero = window_totals(semantics_probe.binary, 0, tmp_path)
    for n in (1, OVF_N):
        totals = window_totals(semantics_probe.binary, n, tmp_path)
        assert totals["Ir"] - zero["Ir"] == LOOP.delta_instructions(n)
        assert totals["Bc"] - zero["Bc"] == LOOP.delta_branches(n)
    assert zero["Ir"] == ZERO  # the factories' calibration value is what the real window executes


# --- event-select filters ---------------------------------------------------------------------------------------


def filters(**changes) -> list[dict]:
    """A "filters" record (filters() in semantics.c.j2) of a healthy guest: the loop in user mode, a tick and the
    pwrite() paths in kernel mode, ~2 instructions per cycle."""
    record = {"probe": "semantics", "kind": "filters", "iterations": 1_000_000,
              "usr_n": 300 + LOOP.delta_instructions(1_000_000), "usr_0": 300, "os_n": 52_000, "os_0": 40_000,
              "cmask2_n": 2_000_000, "cycles_n": 5_000_000, "cmask1_n": 3_000_000, "inv_n": 2_000_000,
              "edge_n": 900_000, "cycles_b": 5_000_000, **windows(), "irq_b": 0, "faults_b": 0,
              "switches_b": 0}  # fmt: skip
    record.update(changes)
    return [record]


def test_filters_factory_emits_the_probe_keys():
    keys = function_keys(SOURCE, "static void filters(void)", '"Fast" RDPMC (ECX[31]')
    assert set(filters()[0]) == keys - {"skipped"} | WINDOW_KEYS | {"probe", "kind"}


def test_event_filters_healthy_and_each_bit_ignored():
    view = intel_kvm_guest_view()
    assert sv.event_filters(EXPECTED, view, filters()).status == "pass"
    ignored = {
        "OS only": {"os_n": 40_000 + LOOP.delta_instructions(1_000_000)},  # USR/OS ignored: counts the loop
        "CMASK=2": {"cmask2_n": 300 + LOOP.delta_instructions(1_000_000)},  # CMASK ignored: plain instructions
        "INV": {"inv_n": 3_000_000},  # INV ignored: the CMASK=1 count again
        "EDGE": {"edge_n": 3_000_000},  # EDGE ignored: the CMASK=1 count again
        "USR only": {"usr_n": 301 + LOOP.delta_instructions(1_000_000)},  # one too many, no interrupt
        "counted 0 cycles": {"cmask2_n": 0},  # a CMASK=2 counter that never counted
    }
    for what, change in ignored.items():
        v = sv.event_filters(EXPECTED, view, filters(**change))
        assert v.status == "fail" and what in v.reason, (what, v.reason)


def test_event_filters_edges_after_interrupts_and_amd():
    # Few stall cycles: EDGE may exceed INV + 1 by one per guest interrupt (a return to user mode starts an edge) and
    # by EDGE_HOST_SLACK for host exits the guest cannot see; an ignored EDGE bit exceeds that by far.
    view = intel_kvm_guest_view()
    edges = 10 + 1 + sv.EDGE_HOST_SLACK + 2
    busy = {"inv_n": 10, "cmask1_n": 4_999_990, "edge_n": edges}
    assert sv.event_filters(EXPECTED, view, filters(**busy)).status == "fail"
    assert sv.event_filters(EXPECTED, view, filters(**busy, irq_b=2)).status == "pass"
    assert sv.event_filters(EXPECTED, view, filters(**{**busy, "edge_n": 4_999_990}, irq_b=2)).status == "fail"
    assert sv.event_filters(EXPECTED, amd_kvm_guest_view(), filters(usr_n=2_300 + LOOP.delta_instructions(1_000_000)))\
        .status == "pass"  # fmt: skip


def test_event_filters_skips():
    view = intel_kvm_guest_view()
    record = {"probe": "semantics", "kind": "filters", "skipped": "fewer than 4 GP counters"}
    assert sv.event_filters(EXPECTED, view, [record]).status == "skip"
    starved = filters(cycles_n=0, cycles_b=0)
    assert sv.event_filters(EXPECTED, view, starved).status == "fail"
    v = sv.event_filters(EXPECTED, view, starved, host=PERF_BASED_WATCHDOG)
    assert v.status == "skip" and v.reason.startswith("host: nmi_watchdog=1")
    v = sv.event_filters(EXPECTED, view, starved, contention="host-pinned (pinned)")
    assert v.status == "skip" and v.reason.startswith("host-load:")
    assert sv.event_filters(ABSENT, view, []).status == "skip"


# --- fast RDPMC -------------------------------------------------------------------------------------------------


def fast(counter: str = "gp0", index: int = 0, value: int = 0xAB12345678, fast_value: int | None = None) -> dict:
    """An "rdpmc_fast" record (rdpmc_pair() in semantics.c.j2): the fast read #GPs (SIGSEGV) unless fast_value."""
    return {"probe": "semantics", "kind": "rdpmc_fast", "counter": counter, "index": index, "written": value,
            "rdmsr": value, "signal": 0, "rdpmc": value, "fast_signal": 0 if fast_value is not None else 11,
            "fast": fast_value or 0, "user_rdpmc": 1}  # fmt: skip


def test_fast_factory_emits_the_probe_keys():
    keys = function_keys(SOURCE, "static void rdpmc_pair(", "static void rdpmc_fast(void)")
    assert set(fast()) == keys | {"probe", "kind"}


def test_rdpmc_fast_by_host_kernel():
    view = intel_kvm_guest_view()
    gp_fault = [fast(), fast("fixed0", 1 << 30)]
    low = [fast(fast_value=0x12345678), fast("fixed0", 1 << 30, fast_value=0x12345678)]
    new, old = {"kernel": "6.12.0", "vpmu_mode": "perf-based"}, {"kernel": "5.15.0-91-generic"}
    assert sv.rdpmc_fast(EXPECTED, view, gp_fault, new).status == "pass"
    assert sv.rdpmc_fast(EXPECTED, view, gp_fault, old).status == "pass"  # a backport
    assert sv.rdpmc_fast(EXPECTED, view, low, old).status == "pass"
    assert sv.rdpmc_fast(EXPECTED, view, low, {}).status == "pass"  # kernel unknown: both answers
    v = sv.rdpmc_fast(EXPECTED, view, low, new)
    assert v.status == "fail" and "want #GP" in v.reason and "5728a4a0ea79" in v.reason and "6.9" in v.reason
    assert sv.rdpmc_fast(EXPECTED, view, low, {"kernel": "5.15.0", "vpmu_mode": "mediated"}).status == "fail"
    wrong = [fast(fast_value=0xAB12345678)]  # the full value: the flag ignored
    v = sv.rdpmc_fast(EXPECTED, view, wrong, old)
    assert v.status == "fail" and "bits 31:0" in v.reason


def test_rdpmc_fast_a_6_8_host_still_returns_bits_31_0():
    """The #GP came with kvm-x86-pmu-6.9: a 6.8 host (Ubuntu 24.04's 6.8.0-*) still masks a fast read to 32 bits."""
    view = intel_kvm_guest_view()
    low = [fast(fast_value=0x12345678), fast("fixed0", 1 << 30, fast_value=0x12345678)]
    v = sv.rdpmc_fast(EXPECTED, view, low, {"kernel": "6.8.0-45-generic", "vpmu_mode": "perf-based"})
    assert v.status == "pass" and "before 6.9" in v.reason
    assert sv.rdpmc_fast(EXPECTED, view, low, {"kernel": "6.9.0", "vpmu_mode": "perf-based"}).status == "fail"


def test_rdpmc_fast_without_full_width_writes():
    """No FW_WRITE (e.g. a named QEMU CPU model): GP counter 0 gets 0x87654321 through IA32_PMC0, sign-extended to 48
    bits; fixed counter 0 still gets 0xAB12345678, as fixed counters are never sign-extended (not an ERROR)."""
    view = intel_kvm_guest_view()
    gp = {**fast(value=0x87654321, fast_value=0x87654321), "rdmsr": 0xFFFF87654321, "rdpmc": 0xFFFF87654321}
    fixed = fast("fixed0", 1 << 30, value=0xAB12345678, fast_value=0x12345678)
    v = sv.rdpmc_fast(EXPECTED, view, [gp, fixed], {"kernel": "6.8.0-45-generic"})
    assert v.status == "pass" and v.observed == {"gp0": 0x87654321, "fixed0": 0x12345678}
    # A vPMU that treats the fixed counter like a legacy GP write keeps only bits 31:0 of it.
    truncated = {**fixed, "rdmsr": 0x12345678, "rdpmc": 0x12345678}
    v = sv.rdpmc_fast(EXPECTED, view, [gp, truncated], {"kernel": "6.8.0-45-generic"})
    assert v.status == "fail" and "fixed0: wrote 0xab12345678, RDMSR reads 0x12345678" in v.reason


def test_rdpmc_fast_fixed_value_ignores_full_width(tmp_path):
    """Rendered for a guest without FW_WRITE, the probe writes 0x87654321 to GP counter 0 (sign-extended by the legacy
    MSR) but the full-width 0xAB12345678 to fixed counter 0, which is never sign-extended."""
    params = {**semantics_params(intel_kvm_guest_view()), "full_width": False}
    source = tmp_path / "semantics.c"
    source.write_text(ProbeBuilder(cache_dir=tmp_path / "cache").render("semantics", params))
    expanded = subprocess.run(["gcc", "-E", "-P", str(source)], capture_output=True, text=True, check=True).stdout
    calls = dict(re.findall(r'rdpmc_pair\("(gp0|fixed0)", [^,]+, [^,]+, [^,]+, (.+?),\s*user_rdpmc\)', expanded))
    assert calls["gp0"] == "0x87654321ULL"
    assert calls["fixed0"].startswith("0xAB12345678ULL &"), calls["fixed0"]


def test_rdpmc_fast_cannot_judge():
    view = intel_kvm_guest_view()
    no_user = [{**fast(), "signal": 11, "user_rdpmc": 0}]
    assert sv.rdpmc_fast(EXPECTED, view, no_user, {}).status == "skip"
    assert sv.rdpmc_fast(EXPECTED, view, [fast(value=0x1234)], {}).status == "error"
    assert sv.kernel_version("5.14.0-427.el9.x86_64") == (5, 14) and sv.kernel_version("") is None


# --- CPUID exits are counted -------------------------------------------------------------------------------------


def cpuid_loop(extra_insns: int = 0, extra_branches: int = 0, n: int = 10_000, **window) -> list[dict]:
    """A "cpuid_loop" record (cpuid_loop() in semantics.c.j2) of a host that counts every skipped CPUID."""
    return [{"probe": "semantics", "kind": "cpuid_loop", "iterations": n,
             "instructions_n": 99 + CPUID_LOOP.delta_instructions(n) + extra_insns, "instructions_0": 99,
             "branches_n": 15 + n + extra_branches, "branches_0": 15, **windows(**window)}]  # fmt: skip


def test_cpuid_factory_emits_the_probe_keys():
    keys = function_keys(SOURCE, "static void cpuid_loop(void)", " * Branch misses have a floor")
    assert set(cpuid_loop()[0]) == keys | WINDOW_KEYS | {"probe", "kind"}


def test_emulated_cpuid():
    view, host = intel_kvm_guest_view(), {"kernel": "6.12.0"}
    assert sv.emulated_cpuid(EXPECTED, view, cpuid_loop(), host=host).status == "pass"
    # A KVM that does not count the skipped CPUID loses one instruction per iteration.
    v = sv.emulated_cpuid(EXPECTED, view, cpuid_loop(extra_insns=-10_000), host=host)
    assert v.status == "fail" and "9cd803d496e7" in v.reason
    v = sv.emulated_cpuid(EXPECTED, view, cpuid_loop(extra_branches=1), host=host)
    assert v.status == "fail" and "branches" in v.reason
    assert sv.emulated_cpuid(EXPECTED, view, cpuid_loop(extra_branches=1, irq_n=1), host=host).status == "pass"
    v = sv.emulated_cpuid(EXPECTED, view, cpuid_loop(extra_insns=-10_000), host={"kernel": "5.15.0"})
    assert v.status == "skip" and v.reason.startswith("kvm-limit:")
    # AMD: VMRUN after each exit may retire as a guest instruction and branch.
    amd = amd_kvm_guest_view()
    assert sv.emulated_cpuid(EXPECTED, amd, cpuid_loop(10_000, 10_000), host=host).status == "pass"
    assert sv.emulated_cpuid(EXPECTED, amd, cpuid_loop(extra_insns=-1), host=host).status == "fail"


def test_cpuid_loop_and_window_counts(semantics_probe, tmp_path):
    """vpmu_cpuid_loop executes exactly what CPUID_LOOP declares, and sem_cpuid_window() adds a constant to it."""
    for n in (0, 1, 1000):
        totals = window_totals(semantics_probe.binary, n, tmp_path, "vpmu_cpuid_loop", "cpuid_window")
        assert totals["Ir"] == CPUID_LOOP.instructions(n) and totals["Bc"] == CPUID_LOOP.conditional_branches(n)
    zero = window_totals(semantics_probe.binary, 0, tmp_path, "sem_cpuid_window", "cpuid_window")
    many = window_totals(semantics_probe.binary, 1000, tmp_path, "sem_cpuid_window", "cpuid_window")
    assert many["Ir"] - zero["Ir"] == CPUID_LOOP.delta_instructions(1000)
    assert many["Bc"] - zero["Bc"] == CPUID_LOOP.delta_branches(1000)


# --- branch misses have a floor ----------------------------------------------------------------------------------


def xorshift_odd(n: int) -> int:
    """How many of fill_random()'s first n bytes (semantics.c.j2) have bit 0 set: the same xorshift64 in Python."""
    x, odd, mask = 0x9E3779B97F4A7C15, 0, (1 << 64) - 1
    for _ in range(n):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        odd += (x >> 32) & 1
    return odd


def misses(m: int = 50_000, n: int = 100_000, extra_branches: int = 0, **window) -> list[dict]:
    """A "branch_misses" record (branch_misses() in semantics.c.j2): ~half of the random jz mispredict."""
    return [{"probe": "semantics", "kind": "branch_misses", "iterations": n, "odd": n // 2,
             "misses_n": 3 + m, "misses_0": 3, "branches_n": 15 + 2 * n + extra_branches, "branches_0": 15,
             **windows(**window)}]  # fmt: skip


def test_misses_factory_emits_the_probe_keys():
    keys = function_keys(SOURCE, "static void branch_misses(void)", " * Forced emulation (KUT")
    assert set(misses()[0]) == keys | WINDOW_KEYS | {"probe", "kind"}


def test_branch_miss_floor():
    view = intel_kvm_guest_view()
    assert sv.branch_miss_floor(EXPECTED, view, misses()).status == "pass"
    v = sv.branch_miss_floor(EXPECTED, view, misses(m=0))
    assert v.status == "fail" and "floor" in v.reason
    assert sv.branch_miss_floor(EXPECTED, view, misses(m=0), contention="host-pinned (pinned)").status == "skip"
    v = sv.branch_miss_floor(EXPECTED, view, misses(m=300_000))
    assert v.status == "fail" and "at most the branches" in v.reason
    assert sv.branch_miss_floor(EXPECTED, view, misses(extra_branches=2)).status == "fail"
    assert sv.branch_miss_floor(EXPECTED, view, misses(extra_branches=2, irq_n=2)).status == "pass"
    no_event = replace(view, caps=replace(view.caps, arch_perfmon=replace(
        view.caps.arch_perfmon, events={**view.caps.arch_perfmon.events, "branch_misses": False})))  # fmt: skip
    assert sv.branch_miss_floor(EXPECTED, no_event, misses()).status == "skip"
    assert sv.branch_miss_floor(EXPECTED, amd_kvm_guest_view(), misses()).status == "pass"


def test_random_branches_counts(semantics_probe, tmp_path):
    """vpmu_random_branches executes what RANDOM_BRANCHES declares for fill_random()'s bits, and callgrind's own
    simple predictor mispredicts about half of them (the bits follow no pattern)."""
    for n in (0, 1, 1000):
        totals = window_totals(semantics_probe.binary, n, tmp_path, "vpmu_random_branches", "random_window")
        assert totals["Ir"] == RANDOM_BRANCHES.instructions(n, xorshift_odd(n))
        assert totals["Bc"] == RANDOM_BRANCHES.conditional_branches(n)
    assert 0.3 * 1000 < totals["Bcm"] < 0.7 * 1000
    zero = window_totals(semantics_probe.binary, 0, tmp_path, "sem_random_window", "random_window")
    many = window_totals(semantics_probe.binary, 1000, tmp_path, "sem_random_window", "random_window")
    assert many["Bc"] - zero["Bc"] == RANDOM_BRANCHES.delta_branches(1000)


# --- forced emulation ---------------------------------------------------------------------------------------------

FEP_HOST = {"kernel": "6.12.0", "kvm": {"force_emulation_prefix": "1"}}


def fep(extra_insns: int = 0, extra_branches: int = 0, n: int = 2_000, signal: int = 0, final: int | None = None,
        status: int = 0b10, **window) -> list[dict]:  # fmt: skip
    """The "fep_loop" and "fep_overflow" records (fep_loop(), fep_overflow() in semantics.c.j2) of a host that honours
    the prefix and counts emulation: the branches counter preset to -(14 + N/2) reads N/2 after the window."""
    preset = (-(14 + n // 2)) & MASK48
    return [{"probe": "semantics", "kind": "fep_loop", "iterations": n, "signal": signal,
             "instructions_n": 90 + FEP_LOOP.delta_instructions(n) + extra_insns, "instructions_0": 90,
             "branches_n": 14 + n + extra_branches, "branches_0": 14, **windows(**window)},
            {"probe": "semantics", "kind": "fep_overflow", "iterations": n, "signal": signal, "global": 1,
             "width": 48, "preset": preset, "final": (n // 2 if final is None else final) & MASK48,
             "status_before": 0, "status": status, "status_after_clear": 0, "irq_n": 0, "faults_n": 0,
             "switches_n": 0}]  # fmt: skip


def test_fep_factory_emits_the_probe_keys():
    keys = function_keys(SOURCE, "static void fep_loop(void)", " * TSX cycles (KUT")
    assert set(fep()[0]) == keys - {"skipped"} | WINDOW_KEYS | {"probe", "kind"}
    keys = function_keys(SOURCE, "static void fep_overflow(uint64_t", "static void fep_loop(void)")
    assert set(fep()[1]) == keys | {"probe", "kind"}


def test_emulated_fep():
    view = intel_kvm_guest_view()
    assert sv.emulated_fep(EXPECTED, view, fep(), host=FEP_HOST).status == "pass"
    v = sv.emulated_fep(EXPECTED, view, fep(extra_branches=-2_000), host=FEP_HOST)  # emulated branches not counted
    assert v.status == "fail" and "branches" in v.reason
    v = sv.emulated_fep(EXPECTED, view, fep(signal=4), host=FEP_HOST)
    assert v.status == "fail" and "signal 4" in v.reason
    for value in ("0", "N", None):
        v = sv.emulated_fep(EXPECTED, view, [], host={"kernel": "6.12.0", "kvm": {"force_emulation_prefix": value}})
        assert v.status == "skip" and v.reason.startswith("host: kvm.force_emulation_prefix="), value
    v = sv.emulated_fep(EXPECTED, view, fep(), host={**FEP_HOST, "kernel": "5.10.0"})
    assert v.status == "skip" and v.reason.startswith("kvm-limit:")
    skipped_run = [
        {"probe": "semantics", "kind": "fep_loop", "skipped": "kvm.force_emulation_prefix is off on the host"}
    ]
    assert sv.emulated_fep(EXPECTED, view, skipped_run, host=FEP_HOST).status == "skip"
    assert sv.emulated_fep(EXPECTED, amd_kvm_guest_view(), fep(2_000, 2_000), host=FEP_HOST).status == "pass"
    # The wrap through an emulated jnz: status bit 1 and the count left after it.
    v = sv.emulated_fep(EXPECTED, view, fep(status=0), host=FEP_HOST)
    assert v.status == "fail" and "bit 1 not set" in v.reason
    v = sv.emulated_fep(EXPECTED, view, fep(final=-(14 + 1_000)), host=FEP_HOST)  # emulated branches not counted
    assert v.status == "fail" and "wrap through emulation" in v.reason
    assert semantics_params(view, FEP_HOST)["fep"] and not semantics_params(view, {"kvm": {}})["fep"]


def function_bytes(binary, name: str) -> list[int]:
    """The bytes of function ``name`` in ``binary``, from objdump's raw-instruction column."""
    out = subprocess.run(["objdump", "-d", f"--disassemble={name}", str(binary)], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    data: list[int] = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and re.fullmatch(r"\s*[0-9a-f]+:", parts[0]):
            data += [int(b, 16) for b in parts[1].split()]
    return data


def test_fep_loop_is_its_twin_plus_the_prefix(semantics_probe, tmp_path):
    """The twin executes what FEP_LOOP declares (callgrind); the FEP loop is the twin with the 5 prefix bytes before
    the jnz, whose displacement grows by 5 so that both jump back to the dec (and the jz over the body by 5 too)."""
    for n in (0, 1, 1000):
        totals = window_totals(semantics_probe.binary, n, tmp_path, "vpmu_fep_twin", "fep_twin_window")
        assert totals["Ir"] == FEP_LOOP.instructions(n) and totals["Bc"] == FEP_LOOP.conditional_branches(n)
    twin, loop = function_bytes(semantics_probe.binary, "vpmu_fep_twin"), function_bytes(semantics_probe.binary,
                                                                                          "vpmu_fep_loop")  # fmt: skip
    jnz = len(twin) - 3  # jnz rel8 (2 bytes), then ret (1)
    assert twin[jnz] == 0x75 and len(loop) == len(twin) + len(FEP_LOOP.prefix)
    jz = 6  # mov (3), test (3), then jz rel8
    assert twin[jz] == loop[jz] == 0x74 and loop[jz + 1] == twin[jz + 1] + 5
    assert loop[:jz] == twin[:jz] and loop[jz + 2 : jnz] == twin[jz + 2 : jnz]
    assert bytes(loop[jnz : jnz + 5]) == FEP_LOOP.prefix
    assert loop[jnz + 5] == 0x75 and loop[jnz + 6] == (twin[jnz + 1] - 5) & 0xFF and loop[-1] == twin[-1] == 0xC3


# --- TSX cycles ---------------------------------------------------------------------------------------------------


def tsx(explicit: int = 1000, in_tx: int = 1_300_000, cycles: int = 5_600_000, in_txcp: int = 4_300_000,
        cpuinfo_rtm: int = 1) -> list[dict]:  # fmt: skip
    """A "tsx" record (tsx_cycles() in semantics.c.j2) of a guest with RTM (CPUID.07H:EBX[11]) whose 1,000
    transactions (1,000 dec/jnz inside, 4,000 outside) all reached their xabort: ~1,300 cycles inside each,
    ~4,300 outside."""
    return [{"probe": "semantics", "kind": "tsx", "cpuid7_ebx": 1 << 11, "cpuid7_edx": 0, "transactions": 1000,
             "spin": 1000, "pad": 4000, "explicit_aborts": explicit, "cpuinfo_rtm": cpuinfo_rtm, "in_tx": in_tx,
             "cycles": cycles, "in_txcp": in_txcp}]  # fmt: skip


def test_tsx_factory_emits_the_probe_keys():
    keys = function_keys(SOURCE, "static void tsx_cycles(void)", "/* One WRMSR (then a read-back")
    assert set(tsx()[0]) == keys - {"skipped"} | {"probe", "kind"}


def test_tsx_probe_constants_are_what_the_records_say():
    """The verdict's bounds use the record's transactions/spin/pad; the factory mirrors the probe's #defines."""
    defines = dict(re.findall(r"#define (TSX_TRANSACTIONS|TSX_SPIN|TSX_PAD) (\d+)", SOURCE))
    record = tsx()[0]
    assert (record["transactions"], record["spin"], record["pad"]) == (
        int(defines["TSX_TRANSACTIONS"]), int(defines["TSX_SPIN"]), int(defines["TSX_PAD"]))  # fmt: skip
    assert record["pad"] >= 4 * record["spin"]  # the non-transactional part is most of the window


def test_tsx_cycles():
    view = intel_kvm_guest_view()
    assert sv.tsx_cycles(EXPECTED, view, tsx()).status == "pass"
    assert sv.tsx_cycles(EXPECTED, view, tsx(explicit=3, in_tx=4_000, cycles=4_300_000, in_txcp=4_296_000)).status \
        == "pass"  # most transactions aborted early (interrupts): judged on the three that ran  # fmt: skip
    v = sv.tsx_cycles(EXPECTED, view, tsx(in_txcp=0))
    assert v.status == "fail" and "IN_TXCP 0" in v.reason
    assert sv.tsx_cycles(EXPECTED, view, tsx(in_tx=0), contention="host-pinned (pinned)").status == "skip"
    no_rtm = [{"probe": "semantics", "kind": "tsx", "cpuid7_ebx": 0, "cpuid7_edx": 0,
               "skipped": "no RTM: CPUID.07H:EBX[11] is clear"}]  # fmt: skip
    v = sv.tsx_cycles(EXPECTED, view, no_rtm)
    assert v.status == "skip" and v.reason.startswith("not-enumerated: no RTM")
    always_abort = [{**tsx(explicit=0, in_tx=0)[0], "cpuid7_edx": 1 << 11}]
    v = sv.tsx_cycles(EXPECTED, view, always_abort)
    assert v.status == "skip" and "RTM_ALWAYS_ABORT" in v.reason
    rejected = [{**tsx()[0], "failed_msr": 0x186, "error": "wrmsr", "errno": errno.EIO, "strerror": "I/O error"}]
    assert sv.tsx_cycles(EXPECTED, view, rejected).status == "fail"


def test_tsx_transactions_that_never_reached_xabort_skip():
    """Raw CPUID RTM, but TSX_CTRL.RTM_DISABLE (guest tsx=off) or the host's TSX_FORCE_ABORT aborts every XBEGIN at
    once: IN_TX reads 0 and IN_TXCP equals cycles, yet that is no verdict on the vPMU."""
    view = intel_kvm_guest_view()
    never = tsx(explicit=0, in_tx=0, cycles=4_100_000, in_txcp=4_100_000, cpuinfo_rtm=0)
    v = sv.tsx_cycles(EXPECTED, view, never)
    assert v.status == "skip" and v.reason.startswith("guest-kernel:") and "reached its xabort" in v.reason
    v = sv.tsx_cycles(EXPECTED, view, tsx(explicit=0, in_tx=0, cycles=4_100_000, in_txcp=4_100_000))
    assert v.status == "skip" and v.reason.startswith("host:")


def test_tsx_qualifier_dropped_fails():
    """A vPMU that drops IN_TX (or IN_TXCP) on the way to the hardware counts every cycle of the window: IN_TX then
    reads what the plain cycles counter reads, above cycles - the non-transactional part."""
    view = intel_kvm_guest_view()
    v = sv.tsx_cycles(EXPECTED, view, tsx(in_tx=5_600_000))
    assert v.status == "fail" and "IN_TX 5,600,000 > cycles 5,600,000 - 2,000,000" in v.reason
    assert "hsw_hw_config" in v.reason
    # Not a host-load shortfall: it stays a FAIL under a competing load.
    assert sv.tsx_cycles(EXPECTED, view, tsx(in_tx=5_600_000), contention="host-pinned (pinned)").status == "fail"
    v = sv.tsx_cycles(EXPECTED, view, tsx(in_txcp=5_600_000))
    assert v.status == "fail" and "IN_TXCP 5,600,000 > cycles 5,600,000 - 500,000" in v.reason
    # Too little inside the transactions that reached xabort.
    v = sv.tsx_cycles(EXPECTED, view, tsx(in_tx=1_000))
    assert v.status == "fail" and "IN_TX 1,000 < 500,000" in v.reason
    # A short cycles counter: only the shortfall, no bound derived from it.
    v = sv.tsx_cycles(EXPECTED, view, tsx(cycles=1_000))
    assert v.status == "fail" and v.reason.startswith("cycles 1,000 < 2,000,000") and "IN_TX " not in v.reason


# --- MISC_ENABLE.PEBS_UNAVAIL -------------------------------------------------------------------------------------


def misc(value: int = 0x850089, caps: int = 0x4000_2000 | 0x400, ds: bool = True) -> list[dict]:
    """A "misc_enable" record (misc_enable() in semantics.c.j2): a PEBS-via-EPT guest (format 4) by default."""
    return [{"probe": "semantics", "kind": "misc_enable", "cpuid1_edx": (1 << 21) if ds else 0,
             "cpuid1_ecx": 1 << 15, "perf_capabilities": caps, "value": value}]  # fmt: skip


def test_misc_factory_emits_the_probe_keys():
    keys = function_keys(SOURCE, "static void misc_enable(void)", "/* A guest WRMSR to IA32_PERF_CAPABILITIES")
    assert set(misc()[0]) == keys - {"perf_capabilities_errno"} | {"probe", "kind"}


def test_misc_enable_pebs():
    view = intel_kvm_guest_view()
    assert sv.misc_enable_pebs(EXPECTED, view, misc()).status == "pass"
    v = sv.misc_enable_pebs(EXPECTED, view, misc(value=0x851089))
    assert v.status == "fail" and "PEBS_UNAVAIL" in v.reason and "9fc222967a39" in v.reason
    # No PEBS: whatever QEMU's reset value says, no verdict.
    for record in (misc(caps=0x2000), misc(value=0x1, caps=0x2000), misc(ds=False)):
        v = sv.misc_enable_pebs(EXPECTED, view, record)
        assert v.status == "skip" and v.reason.startswith("not-enumerated:")


def test_misc_enable_pebs_names_the_owner_by_host_kernel():
    """Since 9fc222967a39 (6.0) KVM sets PEBS_UNAVAIL at vCPU reset and leaves the bit to the VMM."""
    view = intel_kvm_guest_view()
    v = sv.misc_enable_pebs(EXPECTED, view, misc(value=0x851089), {"kernel": "6.8.0-45-generic"})
    assert v.status == "fail" and "vmm:" in v.reason and "QEMU" in v.reason and "intel_pmu_refresh" not in v.reason
    v = sv.misc_enable_pebs(EXPECTED, view, misc(value=0x851089), {"kernel": "5.15.0-91-generic"})
    assert v.status == "fail" and "intel_pmu_refresh() clears it" in v.reason and "vmm:" not in v.reason
