"""Verdict logic over records in the probes' exact output format: good, off-by-one, out of range, missing, errno.

Guest views are built from the real CPUID dumps in shared/data/cpuid, transformed the way KVM documents it
transforms them for a guest (arch/x86/kvm/pmu.c kvm_init_pmu_capability: PMU version capped at 2; pmu.h: at most
3 fixed counters with the perf-based vPMU; the hypervisor bit and KVM signature added). Record factories are
checked against the keys the probe templates actually emit, so they cannot drift from the real format.
"""

from __future__ import annotations

import errno
import re
import signal
from dataclasses import replace

import pytest

from harness.cpu.caps import decode_caps
from harness.cpu.cpuid_dump import CpuidTable, Regs, load_cpuid_dump
from harness.judge import arch_counters, bounds, enumeration
from harness.judge.expectations import Expectation
from harness.probe.events import FIXED_INDEX_BIT
from harness.probe.guest_view import NO_PMU_FAULTING_MSRS, GuestView, MsrRead
from harness.probe.host_watchdog import HELD_BACK_WATCHDOG
from harness.probe.runner import PROBES_DIR
from harness.probe.workloads import LOOP
from tests.helpers import CPUID_DIR

N = 1_000_000
INSNS = LOOP.delta_instructions(N)
EXPECTED = Expectation("arch_perfmon", True, "expected: Intel architectural PMU", {"version": 2, "gp_counters": 8})
ABSENT = Expectation("arch_perfmon", False, "accel: no vPMU under TCG (...)")
FIXED = FIXED_INDEX_BIT


def kvm_guest_table(dump: str) -> CpuidTable:
    """The host dump as a KVM guest would see it (version <= 2, <= 3 fixed counters, no v5 bitmap)."""
    host = load_cpuid_dump(CPUID_DIR / dump)
    leaves = dict(host.leaves)
    one = leaves[(1, 0)]
    leaves[(1, 0)] = replace(one, ecx=one.ecx | (1 << 31))
    leaves[(0x40000000, 0)] = Regs(0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)
    seven = leaves.get((7, 0))
    if seven:  # no guest arch LBR upstream (kvm_features.toml arch_lbr), and no hybrid vPMU
        leaves[(7, 0)] = replace(seven, edx=seven.edx & ~((1 << 19) | (1 << 15)))
    perf = leaves.get((0xA, 0))
    if perf and perf.eax & 0xFF:
        version = min(perf.eax & 0xFF, 2)
        fixed = min(perf.edx & 0x1F, 3)
        leaves[(0xA, 0)] = Regs((perf.eax & ~0xFF) | version, perf.ebx, 0, (perf.edx & ~0x1F) | fixed)
    return CpuidTable(leaves, f"KVM guest of {dump}")


def intel_kvm_guest_view() -> GuestView:
    table = kvm_guest_table("GenuineIntel00806F8_SapphireRapids_05_CPUID.txt")
    # KVM always advertises full-width writes (vmx.c vmx_get_perf_capabilities: perf_cap = PERF_CAP_FW_WRITES).
    msrs = {0x345: MsrRead(0x345, 0x2000, None)}
    banner = "Performance Events: full-width counters, Intel PMU driver."
    return GuestView(decode_caps(table), msrs, ["cpu", "msr", "software"], banner, table.to_records())


def amd_kvm_guest_view() -> GuestView:
    table = kvm_guest_table("AuthenticAMD0A10F11_K19_Genoa_01_CPUID.txt")
    banner = "Performance Events: Fam17h+ core perfctr, AMD PMU driver."
    return GuestView(decode_caps(table), {}, ["cpu", "msr", "software"], banner, table.to_records())


def no_pmu_view() -> GuestView:
    table = kvm_guest_table("GenuineIntel00806F8_SapphireRapids_05_CPUID.txt")
    table.leaves[(0xA, 0)] = Regs()
    gp = MsrRead(0, None, errno.EIO)
    msrs = {m: replace(gp, msr=m) for m in (0xC3, 0x309, 0x38F, 0x345)}
    return GuestView(decode_caps(table), msrs, ["msr", "software"], "Performance Events: PMU not available")


def count(
    event: str,
    member: int,
    index: int,
    delta: int,
    *,
    set_name: str = "gp",
    value_0: int = 1234,
    running: int = 1000,
    value_n: int | None = None,
    tsc: int = 50 * N,
    copies: int = 9,
    held_back: int = 0,
    irq_n: int = 0,
    irq_0: int = 0,
    faults_n: int = 0,
    switches_n: int = 0,
) -> dict:
    """A counters-probe "count" record (keys as emitted by group_event in counters.c.j2): the user-page RDPMC of the
    member lies between the two group reads around it, as on a healthy PMU (each read adds a few user instructions);
    no interrupt, fault or context switch around either window unless given (rec_windows() in _common.h.j2)."""
    value = value_0 + delta if value_n is None else value_n
    return {"probe": "counters", "kind": "count", "set": set_name, "event": event, "config": 0xC0, "copies": copies,
            "held_back": held_back, "held_back_for": HELD_BACK_WATCHDOG if held_back else "",
            "member": member, "iterations": N, "rdpmc_index": index, "value_n": value, "value_0": value_0,
            "enabled_n": 1000, "running_n": running, "enabled_0": 900, "running_0": 900,
            "rdpmc_n": value + 40 + 90 * member, "rdpmc_signal": 0, "read_before_rdpmc": value + 20 + 90 * member,
            "read_after_rdpmc": value + 60 + 90 * member, "offset_n": 0, "pmc_width": 48, "cap_user_rdpmc": 1,
            "tsc_n": tsc, **windows(irq_n, irq_0, faults_n, switches_n)}  # fmt: skip


def windows(irq_n: int = 0, irq_0: int = 0, faults_n: int = 0, switches_n: int = 0) -> dict:
    """The keys rec_windows() (_common.h.j2) prints: the N and 0 windows' interrupts, faults and context switches."""
    return {"irq_n": irq_n, "faults_n": faults_n, "switches_n": switches_n, "irq_0": irq_0, "faults_0": 0,
            "switches_0": 0}  # fmt: skip


def function_keys(source: str, start: str, end: str) -> set[str]:
    """The record keys a C function of a probe template prints (rec_u64/rec_i64/rec_str/rec_sysctl literals)."""
    body = source[source.index(start) : source.index(end)]
    return set(re.findall(r'rec_(?:u64|i64|str|sysctl)\("(\w+)"', body))


COMMON = (PROBES_DIR / "_common.h.j2").read_text()
WINDOW_KEYS = function_keys(COMMON, "static __attribute__((unused)) void rec_windows", "/* --- sampling ring")


def gp_group(event: str, delta: int, counters: int = 8, fixed_index: int | None = 0, **kw) -> list[dict]:
    records = [count(event, i, i, delta, **kw) for i in range(counters)]
    if fixed_index is not None:
        records.append(count(event, counters, FIXED | fixed_index, delta, **kw))
    return records


def test_factories_emit_the_probe_keys():
    """count() produces exactly the keys group_event() in counters.c.j2 prints for a measured member."""
    source = (PROBES_DIR / "counters.c.j2").read_text()
    head = source[source.index("static void rec_group_head") : source.index("static void group_event")]
    body = source[source.index("static void group_event") : source.index("/* An event that is opened but never")]
    per_member = body[body.index("for (int i = 0; i < n; i++) {") :]  # the loop that prints measured members
    keys = set(re.findall(r'rec_(?:u64|i64|str)\("(\w+)"', head + per_member)) | {"probe", "kind"}
    assert "rec_windows(&wn, &w0);" in per_member and set(windows()) == WINDOW_KEYS
    assert set(count("instructions", 0, 0, INSNS)) == keys | WINDOW_KEYS


# --- GP counters ---------------------------------------------------------------------------------------------


def test_instructions_exact_on_every_gp_counter_passes():
    v = arch_counters.gp_event(EXPECTED, intel_kvm_guest_view(), gp_group("instructions", INSNS), "instructions")
    assert v.status == "pass", v.reason
    assert v.observed == {**{f"gp{i}": INSNS for i in range(8)}, "fixed0": INSNS}


def test_instructions_off_by_one_fails_naming_the_counter():
    records = gp_group("instructions", INSNS)
    records[3] = count("instructions", 3, 3, INSNS + 1)
    v = arch_counters.gp_event(EXPECTED, intel_kvm_guest_view(), records, "instructions")
    assert v.status == "fail" and "GP3" in v.reason and "10,000,001" in v.reason


def test_branches_exact():
    view = intel_kvm_guest_view()
    assert arch_counters.gp_event(EXPECTED, view, gp_group("branch_instructions", N, fixed_index=None),
                             "branch_instructions").status == "pass"  # fmt: skip
    assert arch_counters.gp_event(EXPECTED, view, gp_group("branch_instructions", N - 1, fixed_index=None),
                             "branch_instructions").status == "fail"  # fmt: skip


@pytest.mark.parametrize(("value", "status"), [(N - 1, "fail"), (N, "pass"), (7 * N, "pass"), (50 * N + 1, "fail")])
def test_cycles_range(value, status):
    # kvm-unit-tests x86/pmu.c: cycles in [N, 50N]
    records = gp_group("core_cycles", 0, fixed_index=1, value_n=value)
    assert arch_counters.gp_event(EXPECTED, intel_kvm_guest_view(), records, "core_cycles").status == status


def test_missing_gp_member_fails():
    records = [r for r in gp_group("instructions", INSNS) if r["rdpmc_index"] != 5]
    v = arch_counters.gp_event(EXPECTED, intel_kvm_guest_view(), records, "instructions")
    assert v.status == "fail" and "GP5: no group member landed" in v.reason


def test_guest_visible_multiplexing_fails():
    v = arch_counters.gp_event(EXPECTED, intel_kvm_guest_view(), gp_group("instructions", INSNS, running=500),
                          "instructions")  # fmt: skip
    assert v.status == "fail" and "multiplexing" in v.reason


def open_error(event: str) -> dict:
    return {"probe": "counters", "kind": "count", "set": "gp", "event": event, "config": 0xC0, "copies": 9,
            "opened": 0, "error": "perf_event_open", "errno": 2, "strerror": "No such file or directory"}  # fmt: skip


def test_errno_is_a_fail_when_the_pmu_is_promised():
    v = arch_counters.gp_event(EXPECTED, intel_kvm_guest_view(), [open_error("instructions")], "instructions")
    assert v.status == "fail" and "ENOENT" in v.reason


def test_errno_is_a_skip_when_no_pmu_is_expected():
    v = arch_counters.gp_event(ABSENT, no_pmu_view(), [open_error("instructions")], "instructions")
    assert v.status == "skip" and v.reason == ABSENT.reason


def test_promised_but_not_enumerated_fails():
    v = arch_counters.gp_event(EXPECTED, no_pmu_view(), [open_error("instructions")], "instructions")
    assert v.status == "fail" and "promised" in v.reason


def test_missing_records_are_an_error():
    assert arch_counters.gp_event(EXPECTED, intel_kvm_guest_view(), [], "instructions").status == "error"


def test_amd_accepts_overcount_but_not_undercount():
    view = amd_kvm_guest_view()
    amd = replace(EXPECTED, feature="amd_core_pmu")
    ok = arch_counters.gp_event(
        amd, view, gp_group("instructions", INSNS + 5, counters=6, fixed_index=None), "instructions"
    )
    # up to AMD_ZERO_WINDOW_EXITS below: VMRUNs of host-invisible exits counted in the 0 window
    edge = arch_counters.gp_event(amd, view, gp_group("instructions", INSNS - bounds.AMD_ZERO_WINDOW_EXITS,
                                                      counters=6, fixed_index=None), "instructions")  # fmt: skip
    low = arch_counters.gp_event(amd, view, gp_group("instructions", INSNS - bounds.AMD_ZERO_WINDOW_EXITS - 1,
                                                     counters=6, fixed_index=None), "instructions")  # fmt: skip
    assert (ok.status, edge.status, low.status) == ("pass", "pass", "fail")


def test_atom_errata_relaxes_exactness():
    records = gp_group("instructions", INSNS + 3)
    assert (
        arch_counters.gp_event(EXPECTED, intel_kvm_guest_view(), records, "instructions", errata=True).status == "pass"
    )
    assert arch_counters.gp_event(EXPECTED, intel_kvm_guest_view(), records, "instructions").status == "fail"


def model_view(model: int) -> GuestView:
    view = intel_kvm_guest_view()
    return replace(view, caps=replace(view.caps, model=model))


def test_clearwater_forest_overcounts_instructions_only():
    """kvm-unit-tests lib/x86/pmu.c pmu_detect_intel_overcount_errata() (commit 3ffdf39c) and KVM selftests
    get_pmu_errata(): 0xDD sets only instructions_retired_overcount; 0xAF/0x4D/0x5F/0x86 set both."""
    cwf = bounds.overcount_errata(model_view(0xDD).caps)
    assert cwf == bounds.OvercountErrata(instructions=True, branches=False)
    for model in (0xAF, 0x4D, 0x5F, 0x86):
        assert bounds.overcount_errata(model_view(model).caps) == bounds.OvercountErrata(True, True)
    assert bounds.overcount_errata(intel_kvm_guest_view().caps) == bounds.NO_ERRATA
    assert bounds.overcount_errata(amd_kvm_guest_view().caps) == bounds.NO_ERRATA
    view = model_view(0xDD)
    over_insns = gp_group("instructions", INSNS + 3)
    over_branches = gp_group("branch_instructions", N + 3, fixed_index=None)
    assert arch_counters.gp_event(EXPECTED, view, over_insns, "instructions", cwf).status == "pass"
    v = arch_counters.gp_event(EXPECTED, view, over_branches, "branch_instructions", cwf)
    assert v.status == "fail" and "exact: one jnz per iteration" in v.reason


def test_errata_follow_the_host_silicon_under_a_named_cpu_model():
    """An erratum is the hardware's: a SapphireRapids-model guest on a Sierra Forest host still overcounts."""
    host_caps = {"vendor": "GenuineIntel", "family": 6, "model": 0xAF}
    assert bounds.overcount_errata(intel_kvm_guest_view().caps, host_caps) == bounds.OvercountErrata(True, True)


def test_exact_global_ctrl_splits_the_errata():
    record = {"probe": "msr", "kind": "enabled", "iterations": N, "instructions_n": 5003 + INSNS,
              "instructions_0": 5000, "branches_n": 301 + N, "branches_0": 300, "fixed0_n": 5002 + INSNS,
              "fixed0_0": 5000, "global_ctrl": 1, **windows()}  # fmt: skip
    cwf = bounds.OvercountErrata(instructions=True)
    v = arch_counters.exact_global_ctrl(EXPECTED, model_view(0xDD), [record], cwf)
    assert v.status == "fail" and "PMC1" in v.reason and "PMC0" not in v.reason and "FIXED_CTR0" not in v.reason
    both = bounds.OvercountErrata(True, True)
    assert arch_counters.exact_global_ctrl(EXPECTED, model_view(0xAF), [record], both).status == "pass"


def test_fixed_counter_0_uses_the_instructions_erratum_only():
    record = count("fixed0", 0, FIXED | 0, INSNS + 2, set_name="fixed")
    cwf = bounds.OvercountErrata(instructions=True)
    assert arch_counters.fixed_counter(EXPECTED, model_view(0xDD), [record], 0, cwf).status == "pass"
    assert arch_counters.fixed_counter(EXPECTED, model_view(0xDD), [record], 0).status == "fail"


def test_no_user_page_index_judges_values_without_placement():
    """perf publishes index 0 when user RDPMC is off (x86_pmu_event_idx()): values are still judged."""
    records = gp_group("instructions", INSNS)
    for r in records:
        r["rdpmc_index"] = -1
    v = arch_counters.gp_event(EXPECTED, intel_kvm_guest_view(), records, "instructions")
    assert v.status == "pass" and "placement unknown" in v.reason
    records[4]["value_n"] += 1
    assert arch_counters.gp_event(EXPECTED, intel_kvm_guest_view(), records, "instructions").status == "fail"


def test_ref_cycles_on_fixed_counter_2_leaves_one_gp_counter_unmeasured():
    """Regression: Golden Cove and later guests on Linux >= 6.7 ("perf/x86/intel: Extend the ref-cycles event to GP
    counters", FIXED_EVENT_CONSTRAINT(0x013c, 2)) put one of the 8 copies of 0x013C on fixed counter 2, and perf
    prefers a free fixed counter: GP7 gets no copy. That was a false "GP7: no member"."""
    view = intel_kvm_guest_view()
    tsc = dict(value_n=900_000, tsc=1_000_000, copies=8)
    records = [count("ref_cycles", i, i, 0, **tsc) for i in range(7)] + [count("ref_cycles", 7, FIXED | 2, 0, **tsc)]
    v = arch_counters.gp_event(EXPECTED, view, records, "ref_cycles")
    assert v.status == "pass", v.reason
    assert "7 of 8 GP counters and fixed counter 2" in v.reason
    assert "GP7 not measured: a copy landed on fixed counter 2" in v.reason
    assert v.observed["fixed2"] == 900_000
    # the member on the fixed counter is judged like the others
    records[7] = count("ref_cycles", 7, FIXED | 2, 0, value_n=2_000_000, tsc=1_000_000, copies=8)
    v = arch_counters.gp_event(EXPECTED, view, records, "ref_cycles")
    assert v.status == "fail" and "fixed 2: ref-cycles 2,000,000" in v.reason


def test_a_member_on_another_events_fixed_counter_fails():
    view = intel_kvm_guest_view()
    records = [count("ref_cycles", i, i, 0, value_n=900_000, tsc=1_000_000, copies=8) for i in range(7)]
    records.append(count("ref_cycles", 7, FIXED | 1, 0, value_n=900_000, tsc=1_000_000, copies=8))
    v = arch_counters.gp_event(EXPECTED, view, records, "ref_cycles")
    assert v.status == "fail" and "member 7: on fixed counter 1, which does not count ref_cycles" in v.reason


def test_fixed_counter_copy_with_an_extra_copy_must_still_cover_every_gp_counter():
    """instructions gets gp_counters + 1 copies, so a copy on fixed counter 0 excuses no GP counter."""
    records = [r for r in gp_group("instructions", INSNS) if r["rdpmc_index"] != 6]
    records.append(count("instructions", 6, 5, INSNS))  # two members on GP5, none on GP6
    v = arch_counters.gp_event(EXPECTED, intel_kvm_guest_view(), records, "instructions")
    assert v.status == "fail" and "GP5: members 5 and 6 both on it" in v.reason and "GP6: no group member" in v.reason


def test_held_back_copy_for_the_host_watchdog_is_accepted_and_named():
    """A default AMD host (nmi_watchdog=1, perf-based vPMU): the watchdog holds one of the 6 core counters, so the
    probe opens 5 copies and says so; the sixth guest counter is unmeasured, with the reason, not a FAIL."""
    view = amd_kvm_guest_view()
    amd = replace(EXPECTED, feature="amd_core_pmu")
    host = {"vpmu_mode": "perf-based", "sysctls": {"kernel.nmi_watchdog": "1"}}
    records = [count("instructions", i, i, INSNS, copies=5, held_back=1) for i in range(5)]
    v = arch_counters.gp_event(amd, view, records, "instructions", host=host)
    assert v.status == "pass", v.reason
    assert "GP5 not measured: host: nmi_watchdog=1 takes a host counter" in v.reason
    assert "echo 0 > /proc/sys/kernel/nmi_watchdog" in v.reason
    unexplained = [count("instructions", i, i, INSNS, copies=5) for i in range(5)]
    assert arch_counters.gp_event(amd, view, unexplained, "instructions").status == "fail"


def test_watchdog_decides_which_groups_hold_a_copy_back():
    """Intel: the watchdog's cycles event sits on host FC1, so only the cycles group that also uses guest FC1
    (gp + 1 copies) runs short; AMD: every group using all core counters. Mediated: nothing (the host counters are
    switched out at VM-entry, and the watchdog blocks a mediated vCPU altogether)."""
    from harness.probe.params import counters_params

    watchdog = {"vpmu_mode": "perf-based", "sysctls": {"kernel.nmi_watchdog": "1"}}

    def groups(view: GuestView, host: dict) -> dict[str, tuple[int, int]]:
        return {e["name"]: (e["copies"], e["held_back"]) for e in counters_params(view, host)["events"]}

    intel = groups(intel_kvm_guest_view(), watchdog)
    assert intel["core_cycles"] == (8, 1) and intel["instructions"] == (9, 0) and intel["ref_cycles"] == (8, 0)
    amd = groups(amd_kvm_guest_view(), watchdog)
    assert set(amd.values()) == {(5, 1)}
    for host in ({**watchdog, "vpmu_mode": "mediated"}, {**watchdog, "sysctls": {"kernel.nmi_watchdog": "0"}},
                 {"vpmu_mode": "perf-based", "perf": {"nmi_watchdog": "0"}}, {}):  # fmt: skip
        assert all(e["held_back"] == 0 for e in counters_params(amd_kvm_guest_view(), host)["events"])
    old_host_file = {"vpmu_mode": "perf-based", "perf": {"nmi_watchdog": "1"}}  # before the sysctls key
    assert all(e["held_back"] == 1 for e in counters_params(amd_kvm_guest_view(), old_host_file)["events"])
    roomy = {**watchdog, "cpu": {"caps": {"arch_perfmon": {"gp_counters": 10, "fixed_counters": 3}}}}
    assert all(e["held_back"] == 0 for e in counters_params(intel_kvm_guest_view(), roomy)["events"])


# --- fixed counters ------------------------------------------------------------------------------------------


def test_fixed_counter_on_its_fixed_counter_passes():
    record = count("fixed0", 0, FIXED | 0, INSNS, set_name="fixed")
    assert arch_counters.fixed_counter(EXPECTED, intel_kvm_guest_view(), [record], 0).status == "pass"


def test_fixed_event_on_a_gp_counter_fails():
    record = count("fixed0", 0, 2, INSNS, set_name="fixed")
    v = arch_counters.fixed_counter(EXPECTED, intel_kvm_guest_view(), [record], 0)
    assert v.status == "fail" and "landed on RDPMC index 0x2" in v.reason


def test_fixed_counter_3_not_enumerated_by_kvm_skips():
    v = arch_counters.fixed_counter(EXPECTED, intel_kvm_guest_view(), [], 3)
    assert v.status == "skip" and v.reason.startswith("not-enumerated: fixed counter 3")


def test_ref_cycles_bounded_by_tsc():
    good = count("fixed2", 0, FIXED | 2, 0, set_name="fixed", value_n=900_000, tsc=1_000_000)
    bad = count("fixed2", 0, FIXED | 2, 0, set_name="fixed", value_n=1_100_000, tsc=1_000_000)
    view = intel_kvm_guest_view()
    assert arch_counters.fixed_counter(EXPECTED, view, [good], 2).status == "pass"
    assert arch_counters.fixed_counter(EXPECTED, view, [bad], 2).status == "fail"


# --- MSR-level checks ----------------------------------------------------------------------------------------


def width_record(kind: str, written: int, read: int | None = None, err: int | None = None) -> dict:
    record = {"probe": "msr", "kind": kind, "write_msr": 0xC1, "read_msr": 0xC1, "written": written}
    if err:
        record.update(error="wrmsr", errno=err, strerror="Input/output error")
    else:
        record["read"] = read
    return record


def test_legacy_write_sign_extends_bit_31():
    # SDM Vol. 3B: a write to IA32_PMCx sign-extends bits 31:0 to the counter width (48 here).
    good = [width_record("width_legacy", 0x89ABCDEF12, 0xFFFFABCDEF12),
            width_record("width_full_over", 0xFFFFFF0123456789, err=errno.EIO)]  # fmt: skip
    assert arch_counters.counter_width(EXPECTED, intel_kvm_guest_view(), good).status == "pass"
    bad = [width_record("width_legacy", 0x89ABCDEF12, 0xABCDEF12)]
    assert arch_counters.counter_width(EXPECTED, intel_kvm_guest_view(), bad).status == "fail"


def test_full_width_write_above_width_must_fault():
    records = [width_record("width_full_over", 0xFFFFFF0123456789, 0x0123456789)]
    v = arch_counters.counter_width(EXPECTED, intel_kvm_guest_view(), records)
    assert v.status == "fail" and "must #GP" in v.reason


IGNORE_MSRS = Expectation("pmu_msrs_fault", False, "host: kvm.ignore_msrs=Y (KVM swallows the #GP)")


def bounds_record(msr: int, value: int | None = None) -> dict:
    """An msr-probe "bounds" record: rec_msr_op() with the value, or the EIO of a #GP."""
    record = {"probe": "msr", "kind": "bounds", "op": "rdmsr", "msr": msr}
    if value is None:
        record.update(error="rdmsr", errno=errno.EIO, strerror="Input/output error")
    else:
        record["value"] = value
    return record


def test_msr_bounds_is_gated_on_ignore_msrs():
    """Regression: with kvm.ignore_msrs=Y, kvm_do_msr_access() turns KVM_MSR_RET_UNSUPPORTED into a read of 0, so
    MSRs beyond the counters read as 0 on a healthy host; gate like enum.pmu_msrs_fault."""
    view = intel_kvm_guest_view()
    zeros = [bounds_record(0xC9, 0), bounds_record(0x18E, 0)]
    v = arch_counters.msr_bounds(EXPECTED, view, zeros, IGNORE_MSRS)
    assert v.status == "skip" and v.reason == IGNORE_MSRS.reason
    faults = Expectation("pmu_msrs_fault", True, "expected")
    assert arch_counters.msr_bounds(EXPECTED, view, zeros, faults).status == "fail"
    gp = [bounds_record(0xC9), bounds_record(0x18E)]
    assert arch_counters.msr_bounds(EXPECTED, view, gp, faults).status == "pass"


def test_msr_bounds_probe_never_reads_an_msr_kvm_answers_without_a_pmu():
    """Regression: on a legacy AMD guest (no PerfCtrExtCore) SEL(4) = 0xC0010004 is PerfCtr0 itself, readable: a
    false FAIL. The probe reads the PerfCtrExtCore pair instead, which KVM #GPs without that CPUID bit."""
    from harness.probe.params import msr_params
    from harness.probe.runner import ProbeBuilder

    view = amd_kvm_guest_view()
    legacy = replace(view, caps=replace(view.caps, amd=replace(view.caps.amd, perfctr_core=False, perfmon_v2=False,
                                                               core_counters=4)))  # fmt: skip
    source = ProbeBuilder().render("msr", msr_params(legacy))
    bounds = source[source.index("static void bounds") : source.index("static void rdpmc_vs_rdmsr")]
    assert "{ 0xC0010201, 0xC0010200 }" in bounds and "SEL(NCTR)" not in bounds
    compat = set(range(0xC0010000, 0xC0010008)) | {0xC1, 0xC2, 0x186, 0x187}  # kvm_get_msr_common() compat reads
    assert not {0xC0010201, 0xC0010200} & compat


def test_disabled_counters():
    counters = [{"probe": "counters", "kind": "disabled", "value": 0, "enabled": 0, "running": 0}]
    msr = [{"probe": "msr", "kind": "disabled_sel", "instructions": 0, "branches": 0, "fixed0": 0},
           {"probe": "msr", "kind": "disabled_global", "instructions": 0, "branches": 0, "fixed0": 0}]  # fmt: skip
    assert arch_counters.disabled_no_count(EXPECTED, intel_kvm_guest_view(), counters, msr).status == "pass"
    msr[1]["instructions"] = 5
    v = arch_counters.disabled_no_count(EXPECTED, intel_kvm_guest_view(), counters, msr)
    assert v.status == "fail" and "GLOBAL_CTRL bit clear" in v.reason


def rdpmc_records(
    mismatch: bool = False, invalid_signal: int = signal.SIGSEGV, beyond: int = 8
) -> tuple[list[dict], list[dict]]:
    msr = [{"probe": "msr", "kind": "rdpmc", "index": i, "rdmsr": 0x12345600 + i, "signal": 0,
            "rdpmc": 0x12345600 + i + (1 if mismatch and i == 2 else 0)} for i in range(8)]  # fmt: skip
    msr.append({"probe": "msr", "kind": "rdpmc_beyond", "index": beyond, "signal": invalid_signal, "rdpmc": 0})
    counters = [{"probe": "counters", "kind": "rdpmc_invalid", "index": 64, "signal": invalid_signal,
                 "control_index": 0, "control_signal": 0, "user_rdpmc": 1},
                *gp_group("instructions", INSNS)]  # fmt: skip
    msr.append({"probe": "msr", "kind": "rdpmc_setup", "perf_fd": 3, "mmapped": 1, "user_rdpmc": 1})  # fmt: skip
    return counters, msr


def test_rdpmc_checks():
    view = intel_kvm_guest_view()
    assert arch_counters.rdpmc(EXPECTED, view, *rdpmc_records()).status == "pass"
    v = arch_counters.rdpmc(EXPECTED, view, *rdpmc_records(mismatch=True))
    assert v.status == "fail" and "RDPMC(0x2)" in v.reason
    v = arch_counters.rdpmc(EXPECTED, view, *rdpmc_records(invalid_signal=0))
    assert v.status == "fail" and "did not #GP" in v.reason


def bracketed(member: int, index: int, read_before: int, rdpmc_count: int, read_after: int) -> dict:
    """A member whose user-page RDPMC came after ``member`` others: the probe reads the group, RDPMCs, reads again
    (offset 0, 48-bit counter: the RDPMC value is the count itself)."""
    record = count("instructions", member, index, INSNS)
    record.update(read_before_rdpmc=read_before, rdpmc_n=rdpmc_count, read_after_rdpmc=read_after)
    return record


def test_user_page_rdpmc_is_judged_between_the_reads_around_it():
    """Regression: the old rule wanted RDPMC - value_n <= 2000 although member i's RDPMC came after i calls of
    rdpmc_safe (sigaction + sigsetjmp, ~400 user instructions each): member 7 of 8 was a false FAIL. Now each RDPMC
    is bracketed by two group reads, however far from value_n it is."""
    view = intel_kvm_guest_view()
    counters_, msr = rdpmc_records()
    value_n = counters_[1]["value_n"]
    far = [bracketed(i, i, value_n + 450 * i, value_n + 450 * i + 35, value_n + 450 * i + 70) for i in range(8)]
    assert far[7]["rdpmc_n"] - value_n > 2000
    assert arch_counters.rdpmc(EXPECTED, view, [counters_[0], *far], msr).status == "pass"
    early = bracketed(3, 3, value_n + 1000, value_n + 999, value_n + 1070)  # RDPMC below the read before it
    v = arch_counters.rdpmc(EXPECTED, view, [counters_[0], early], msr)
    assert v.status == "fail" and "= 10,002,233, outside the reads around it [10,002,234, 10,002,304]" in v.reason
    faulted = bracketed(2, 2, value_n, 0, value_n + 70) | {"rdpmc_signal": signal.SIGSEGV, "rdpmc_n": 2**64 - 1}
    v = arch_counters.rdpmc(EXPECTED, view, [counters_[0], faulted], msr)
    assert v.status == "fail" and "raised SIGSEGV" in v.reason


def test_user_page_rdpmc_of_old_records_keeps_only_the_lower_bound():
    """Records from the probe before bracketing (no read_before/after): only RDPMC >= read() is decidable."""
    view = intel_kvm_guest_view()
    counters_, msr = rdpmc_records()
    old = [{k: v for k, v in r.items() if k not in ("read_before_rdpmc", "read_after_rdpmc", "rdpmc_signal")}
           for r in counters_[1:]]  # fmt: skip
    old[7]["rdpmc_n"] = old[7]["value_n"] + 3_200
    assert arch_counters.rdpmc(EXPECTED, view, [counters_[0], *old], msr).status == "pass"
    old[7]["rdpmc_n"] = old[7]["value_n"] - 1
    assert arch_counters.rdpmc(EXPECTED, view, [counters_[0], *old], msr).status == "fail"


def test_user_page_index_sign_extension():
    """perf_event_mmap_page: count = offset + (pmc sign-extended to pmc_width). A counter preset to -period shows
    a negative raw value that the offset compensates."""
    view = intel_kvm_guest_view()
    counters_, msr = rdpmc_records()
    record = bracketed(0, 0, 5_000, 0, 5_100)
    record.update(rdpmc_n=(1 << 48) - 100, offset_n=5_150)  # raw -100 + 5150 = 5050
    assert arch_counters.rdpmc(EXPECTED, view, [counters_[0], record], msr).status == "pass"


def test_rdpmc_beyond_on_amd_under_the_mediated_vpmu_is_not_required_to_fault():
    """With RDPMC passed through (kvm_need_rdpmc_intercept() false: guest counters match the host's), AMD hardware
    answers RDPMC(6..15) from the Data Fabric / L3 counters (arch/x86/events/amd/uncore.c RDPMC_BASE_NB = 6,
    RDPMC_BASE_LLC = 10); under the perf-based vPMU KVM's amd_check_rdpmc_early() must still #GP it."""
    view = amd_kvm_guest_view()
    amd = replace(EXPECTED, feature="amd_core_pmu")
    counters_, msr = rdpmc_records(beyond=6)
    msr = [r for r in msr if r["kind"] != "rdpmc" or r["index"] < 6]
    beyond = next(i for i, r in enumerate(msr) if r["kind"] == "rdpmc_beyond")
    msr[beyond] = {"probe": "msr", "kind": "rdpmc_beyond", "index": 6, "signal": 0, "rdpmc": 0x1234}
    counters_ = [counters_[0], *gp_group("instructions", INSNS, counters=6, fixed_index=None)]
    v = arch_counters.rdpmc(amd, view, counters_, msr, "mediated")
    assert v.status == "pass" and "RDPMC(6) not judged" in v.reason
    v = arch_counters.rdpmc(amd, view, counters_, msr, "perf-based")
    assert v.status == "fail" and "RDPMC(0x6) of an invalid index did not #GP" in v.reason


def test_rdpmc_without_user_rdpmc_is_an_error_not_a_fail():
    """cap_user_rdpmc=0 (guest sysfs rdpmc=0): CR4.PCE is clear and every RDPMC faults, whatever KVM does."""
    counters_, msr = rdpmc_records()
    counters_[0]["user_rdpmc"] = 0
    v = arch_counters.rdpmc(EXPECTED, intel_kvm_guest_view(), counters_, msr)
    assert v.status == "error" and "cap_user_rdpmc=0" in v.reason


def enabled_record(extra_n: int = 0, extra_branches: int = 0, **window) -> dict:
    """The msr probe's "enabled" record (counting() in msr.c.j2): N and 0 regions of PMC0/PMC1/FIXED_CTR0."""
    return {"probe": "msr", "kind": "enabled", "iterations": N, "instructions_n": 5000 + INSNS + extra_n,
            "instructions_0": 5000, "branches_n": 300 + N + extra_branches, "branches_0": 300,
            "fixed0_n": 5000 + INSNS + extra_n, "fixed0_0": 5000, "global_ctrl": 1, **windows(**window)}  # fmt: skip


def test_enabled_record_factory_emits_the_probe_keys():
    source = (PROBES_DIR / "msr.c.j2").read_text()
    body = source[source.index('rec_start("enabled");') : source.index("/* EN clear, global bits set")]
    assert "rec_windows(&wn, &w0);" in body
    keys = set(re.findall(r'rec_(?:u64|i64|str)\("(\w+)"', body)) | WINDOW_KEYS | {"probe", "kind"}
    assert set(enabled_record()) == keys


def test_exact_global_ctrl():
    record = enabled_record()
    assert arch_counters.exact_global_ctrl(EXPECTED, intel_kvm_guest_view(), [record]).status == "pass"
    record["fixed0_n"] += 1
    v = arch_counters.exact_global_ctrl(EXPECTED, intel_kvm_guest_view(), [record])
    assert v.status == "fail" and "FIXED_CTR0" in v.reason


def test_overflow_status():
    record = {"probe": "msr", "kind": "overflow", "counter": 9000, "status": 1, "status_after_clear": 0}
    assert arch_counters.overflow_status(EXPECTED, intel_kvm_guest_view(), [record]).status == "pass"
    assert arch_counters.overflow_status(EXPECTED, intel_kvm_guest_view(), [{**record, "status": 0}]).status == "fail"
    assert arch_counters.overflow_status(EXPECTED, intel_kvm_guest_view(),
                                    [{**record, "status_after_clear": 1}]).status == "fail"  # fmt: skip


def test_overflow_without_perfmon_v2_skips_on_amd():
    view = amd_kvm_guest_view()
    no_v2 = replace(view, caps=replace(view.caps, amd=replace(view.caps.amd, perfmon_v2=False)))
    v = arch_counters.overflow_status(EXPECTED, no_v2, [])
    assert v.status == "skip" and "PerfMonV2" in v.reason


PERIOD = 1_000_003  # harness.probe.params.PMI_SAMPLE_PERIOD
SAMPLED_LOOPS = 20


def sampling(samples: int, lost: int = 0, pmi: int | None = None, throttled: int = 0, elapsed_ns: int = 80_000_000,
             **kw) -> dict:  # fmt: skip
    """A counters-probe "sampling" record (keys as sampling() in counters.c.j2 prints them after a good run)."""
    count_ = SAMPLED_LOOPS * INSNS + 300
    return {"probe": "counters", "kind": "sampling", "period": PERIOD, "iterations": SAMPLED_LOOPS * N,
            "count": count_, "samples": samples, "lost": lost, "throttle": throttled, "other_records": 0,
            "throttled": throttled, "unthrottled": throttled, "in_loop": samples, "pmi_before": 10,
            "pmi_after": 10 + (samples if pmi is None else pmi), "elapsed_ns": elapsed_ns, "loop_start": 4096,
            "loop_end": 4131, **kw}  # fmt: skip


def sampling_setup(percent: int | None = 0, rate: int | None = 100_000, err: int | None = None) -> dict:
    """The "sampling_setup" record vpmu_prepare_sampling() (_common.h.j2) prints before any sampling."""
    record = {"probe": "counters", "kind": "sampling_setup", "perf_cpu_time_max_percent": percent,
              "perf_event_max_sample_rate": rate}  # fmt: skip
    if err is not None:
        record["errno"] = err
    return record


EXPECTED_SAMPLES = (SAMPLED_LOOPS * INSNS + 300) // PERIOD


def test_sampling_factories_emit_the_probe_keys():
    """sampling() and sampling_setup() carry exactly the keys the probe prints (rec_ring_stats and
    rec_throttle_stats included), so the verdict is tested on the real format."""
    common = (PROBES_DIR / "_common.h.j2").read_text()
    source = (PROBES_DIR / "counters.c.j2").read_text()
    body = source[source.index("static void sampling(void)") : source.index("int main(")]
    ring = common[common.index("static __attribute__((unused)) void rec_ring_stats") :]
    keys = set(re.findall(r'rec_(?:u64|i64|str|sysctl)\("(\w+)"', body + ring.split("/* --- sampling pre")[0]))
    assert set(sampling(5)) == keys | {"probe", "kind"}
    prepare = common[common.index("static __attribute__((unused)) void vpmu_prepare_sampling") :]
    setup_keys = set(re.findall(r'rec_(?:u64|i64|str|sysctl)\("(\w+)"', prepare))
    assert set(sampling_setup(err=13)) == setup_keys | {"probe", "kind"}


def test_pmi_sampling():
    view = intel_kvm_guest_view()
    assert arch_counters.pmi_sampling(EXPECTED, view, [sampling(EXPECTED_SAMPLES)]).status == "pass"
    assert arch_counters.pmi_sampling(EXPECTED, view, [sampling(EXPECTED_SAMPLES + 3)]).status == "fail"
    assert arch_counters.pmi_sampling(EXPECTED, view, [sampling(EXPECTED_SAMPLES, lost=1)]).status == "fail"
    v = arch_counters.pmi_sampling(EXPECTED, view, [sampling(EXPECTED_SAMPLES, pmi=EXPECTED_SAMPLES - 10)])
    assert v.status == "fail" and "PMI count rose" in v.reason


def test_guest_throttling_is_a_skip_never_a_lost_sample_fail():
    """kernel/events/core.c __perf_event_account_interrupt() stops the event for the rest of the tick and logs
    PERF_RECORD_THROTTLE (then UNTHROTTLE at the next tick): samples go missing, and that is not a PMI-path bug."""
    view = intel_kvm_guest_view()
    records = [sampling_setup(percent=25, err=errno.EINVAL), sampling(EXPECTED_SAMPLES - 40, throttled=3)]
    v = arch_counters.pmi_sampling(EXPECTED, view, records)
    assert v.status == "skip"
    assert v.reason.startswith("guest kernel throttled sampling: 3 PERF_RECORD_THROTTLE records")
    assert "__perf_event_account_interrupt" in v.reason and "perf_cpu_time_max_percent=25" in v.reason
    assert "EINVAL" in v.reason
    # records from before the "throttled" key (the ring walker's "throttle" count) are read the same way
    old = {k: val for k, val in sampling(EXPECTED_SAMPLES - 40, throttled=2).items() if k not in ("throttled",)}
    assert arch_counters.pmi_sampling(EXPECTED, view, [old]).status == "skip"


def test_host_throttling_of_the_backing_event_is_a_skip():
    """Under the perf-based vPMU a shortfall while the guest's PMI rate is near the host's perf_event_max_sample_rate
    is the host throttling KVM's backing event, not a guest PMI bug."""
    view = intel_kvm_guest_view()
    short = sampling(EXPECTED_SAMPLES - 30, pmi=EXPECTED_SAMPLES - 30, count=SAMPLED_LOOPS * INSNS - 5_000_000,
                     elapsed_ns=10_000_000)  # fmt: skip
    host = {"vpmu_mode": "perf-based", "sysctls": {"kernel.perf_event_max_sample_rate": "25000"}}
    v = arch_counters.pmi_sampling(EXPECTED, view, [short], host)
    assert v.status == "skip" and v.reason.startswith("host: kernel.perf_event_max_sample_rate=25000")
    calm = {"vpmu_mode": "perf-based", "sysctls": {"kernel.perf_event_max_sample_rate": "100000"}}
    assert arch_counters.pmi_sampling(EXPECTED, view, [short], calm).status == "fail"
    assert arch_counters.pmi_sampling(EXPECTED, view, [short], {**host, "vpmu_mode": "mediated"}).status == "fail"


def test_sampling_rate_stays_far_below_the_throttle():
    """At 1e10 user instructions/s the counters probe's period gives at most 10 PMIs per 1 ms tick, a tenth of
    max_samples_per_tick = DIV_ROUND_UP(100000, HZ=1000) (kernel/events/core.c)."""
    from harness.probe import params as probe_params

    pmis_per_tick = 1e10 / probe_params.PMI_SAMPLE_PERIOD / 1000
    assert pmis_per_tick <= 100_000 / 1000 / 10
    params = probe_params.counters_params(intel_kvm_guest_view())
    assert params["sample_period"] == PERIOD and params["sample_repeats"] == SAMPLED_LOOPS


# --- enumeration ---------------------------------------------------------------------------------------------


def test_pmu_visibility_both_ways():
    assert enumeration.pmu_visible(EXPECTED, intel_kvm_guest_view()).status == "pass"
    assert enumeration.pmu_visible(EXPECTED, no_pmu_view()).status == "fail"
    assert enumeration.pmu_visible(ABSENT, no_pmu_view()).status == "pass"
    assert enumeration.pmu_visible(ABSENT, intel_kvm_guest_view()).status == "fail"


#: harness.judge.expectations _pmu_off_reaches_kvm's reason, as kvm_features.toml [pmu_off_honoured] gives it on AMD.
PMU_OFF_NOT_HONOURED = Expectation("pmu_off_honoured", False, "qemu-limit: QEMU's pmu=off does not take an AMD "
                                   "guest's counters away: no CPUID bit for the legacy K7 counters")  # fmt: skip
PMU_OFF_HONOURED = Expectation("pmu_off_honoured", True, "expected: pmu=off takes the vPMU away")
PROFILE_OFF = Expectation("amd_core_pmu", False, "profile: pmu-off sets pmu=off")


def amd_legacy_view() -> GuestView:
    """An AMD pmu=off guest on a QEMU without KVM_PMU_CAP_DISABLE: no PerfCtrExtCore/PerfMonV2 in CPUID, but KVM's
    four legacy K7 counters (svm/pmu.c amd_pmu_refresh()) and the guest kernel's "AMD PMU driver"."""
    view = amd_kvm_guest_view()
    amd = replace(view.caps.amd, perfctr_core=False, perfmon_v2=False, core_counters=4)
    msrs = {m: MsrRead(m, 0, None) for m in NO_PMU_FAULTING_MSRS["amd"]}
    banner = "Performance Events: AMD PMU driver."
    return replace(view, caps=replace(view.caps, amd=amd), msrs=msrs, kernel_banner=banner)


def test_pmu_off_not_reaching_kvm_skips_with_the_data_files_reason():
    """Item: one rule for AMD pmu=off. kvm_features.toml [pmu_off_honoured] (condition pmu_off_reaches_kvm) says when
    QEMU's pmu=off cannot take KVM's counters away; enum.pmu_visible and enum.pmu_msrs_fault then SKIP with that
    reason, whatever the guest shows (legacy driver only, or PerfCtrExtCore left on by QEMU), the view kept."""
    faults = Expectation("pmu_msrs_fault", True, "expected")
    for view in (amd_legacy_view(), amd_kvm_guest_view()):
        v = enumeration.pmu_visible(PROFILE_OFF, view, PMU_OFF_NOT_HONOURED)
        assert (v.status, v.reason) == ("skip", PMU_OFF_NOT_HONOURED.reason)
        assert v.observed["kernel_pmus"] == ["cpu", "msr", "software"]
        v = enumeration.pmu_msrs_fault(PROFILE_OFF, faults, view, PMU_OFF_NOT_HONOURED)
        assert (v.status, v.reason) == ("skip", PMU_OFF_NOT_HONOURED.reason)
    # a QEMU that honours pmu=off: a visible PMU is a FAIL again, readable MSRs too
    assert enumeration.pmu_visible(PROFILE_OFF, amd_legacy_view(), PMU_OFF_HONOURED).status == "fail"
    v = enumeration.pmu_msrs_fault(PROFILE_OFF, faults, amd_legacy_view(), PMU_OFF_HONOURED)
    assert v.status == "fail" and "readable although the guest has no vPMU" in v.reason


def test_pmu_off_expectation_applies_only_when_the_profile_turned_the_pmu_off():
    """Under TCG, or with kvm.enable_pmu=N, the PMU is absent for another reason and KVM gives no counters at all:
    those are judged as before (the guest must show none), and a vPMU that is expected is judged as expected."""
    tcg = Expectation("amd_core_pmu", False, "accel: no vPMU under TCG (...)")
    assert enumeration.pmu_visible(tcg, amd_legacy_view(), PMU_OFF_NOT_HONOURED).status == "fail"
    off_module = Expectation("amd_core_pmu", False, "host: kvm.enable_pmu=N")
    faults = Expectation("pmu_msrs_fault", True, "expected")
    gp = MsrRead(0, None, errno.EIO)
    view = replace(amd_legacy_view(), msrs={m: replace(gp, msr=m) for m in NO_PMU_FAULTING_MSRS["amd"]})
    assert enumeration.pmu_msrs_fault(off_module, faults, view, PMU_OFF_NOT_HONOURED).status == "pass"
    on = Expectation("amd_core_pmu", True, "expected")
    assert enumeration.pmu_visible(on, amd_kvm_guest_view(), PMU_OFF_NOT_HONOURED).status == "pass"
    assert enumeration.pmu_off_unjudgeable(on, PMU_OFF_NOT_HONOURED) is None


def test_pmu_msrs_fault_without_pmu():
    faults = Expectation("pmu_msrs_fault", True, "expected")
    assert enumeration.pmu_msrs_fault(ABSENT, faults, no_pmu_view()).status == "pass"
    view = no_pmu_view()
    view.msrs[0x38F] = MsrRead(0x38F, 0, None)
    v = enumeration.pmu_msrs_fault(ABSENT, faults, view)
    assert v.status == "fail" and "0x38f" in v.reason


def test_guest_within_host_limits():
    host = decode_caps(load_cpuid_dump(CPUID_DIR / "GenuineIntel00806F8_SapphireRapids_05_CPUID.txt")).to_json()
    assert enumeration.guest_within_host("kvm", EXPECTED, intel_kvm_guest_view(), host).status == "pass"
    view = intel_kvm_guest_view()
    over = replace(view, caps=replace(view.caps, arch_perfmon=replace(view.caps.arch_perfmon, version=3)))
    v = enumeration.guest_within_host("kvm", EXPECTED, over, host)
    assert v.status == "fail" and "version 3 > 2" in v.reason
    assert enumeration.guest_within_host("tcg", EXPECTED, view, host).status == "skip"


def fixed_counters_view(fixed: int) -> GuestView:
    view = intel_kvm_guest_view()
    ap = replace(view.caps.arch_perfmon, fixed_counters=fixed, fixed_counter_mask=(1 << fixed) - 1)
    return replace(view, caps=replace(view.caps, arch_perfmon=ap))


def spr_host_caps() -> dict:
    return decode_caps(load_cpuid_dump(CPUID_DIR / "GenuineIntel00806F8_SapphireRapids_05_CPUID.txt")).to_json()


LIMITS = Expectation("arch_perfmon", True, "expected", {"version": 2, "gp_counters": 8, "fixed_counters": 3})


def test_fixed_counter_limit_depends_on_the_vpmu_mode():
    """Without a measured offer: 3 fixed counters for the perf-based vPMU (KVM_MAX_NR_FIXED_COUNTERS), up to 4 under
    the mediated vPMU (kvm_init_pmu_capability() keeps 3 only "if (!enable_mediated_pmu)" with the FC3 series)."""
    host, four = spr_host_caps(), fixed_counters_view(4)
    v = enumeration.guest_within_host("kvm", LIMITS, four, host, vpmu_mode="perf-based")
    assert v.status == "fail" and "fixed_counters 4 > 3" in v.reason and "kvm_features.toml limits" in v.reason
    assert enumeration.guest_within_host("kvm", LIMITS, four, host, vpmu_mode="mediated").status == "pass"


def test_measured_kvm_offer_wins_over_the_table():
    """host["kvm_offer"]["pmu"] is KVM_GET_SUPPORTED_CPUID decoded: what the running KVM really offers."""
    host = spr_host_caps()
    offer_caps = decode_caps(kvm_guest_table("GenuineIntel00806F8_SapphireRapids_05_CPUID.txt")).to_json()
    offer = {"source": "/dev/kvm", "pmu": offer_caps}
    three = intel_kvm_guest_view()
    v = enumeration.guest_within_host("kvm", LIMITS, three, host, kvm_offer=offer, vpmu_mode="mediated")
    assert v.status == "pass" and "KVM_GET_SUPPORTED_CPUID" in v.reason
    v = enumeration.guest_within_host(
        "kvm", LIMITS, fixed_counters_view(4), host, kvm_offer=offer, vpmu_mode="mediated"
    )
    assert v.status == "fail" and "fixed_counters 4 > 3" in v.reason and "KVM_GET_SUPPORTED_CPUID" in v.reason
    # a newer KVM offering version 3: the offer wins over the table's version limit of 2
    ap = offer_caps["arch_perfmon"]
    newer = {"pmu": {**offer_caps, "arch_perfmon": {**ap, "version": 3}}}
    v3 = replace(three, caps=replace(three.caps, arch_perfmon=replace(three.caps.arch_perfmon, version=3)))
    assert enumeration.guest_within_host("kvm", LIMITS, v3, host, kvm_offer=newer).status == "pass"
    no_vpmu = {"pmu": {**offer_caps, "arch_perfmon": None}}
    v = enumeration.guest_within_host("kvm", LIMITS, three, host, kvm_offer=no_vpmu)
    assert v.status == "fail" and "KVM offers no architectural PMU" in v.reason


# --- interrupts and exceptions in the counted windows (review-arch (1)-A) ----------------------------------------


def test_interrupts_in_the_window_are_allowed_one_count_each():
    """Weaver et al. (ISPASS 2013), rr-debugger/rr #610: every interrupt or exception taken while user-mode counting
    is on adds one user-mode instruction (the IRET retires partly at CPL3). Two timer ticks in the N window: the
    loop's count + 2 passes, + 3 fails, and without interrupts + 1 still fails."""
    view = intel_kvm_guest_view()
    ticks = gp_group("instructions", INSNS + 2, irq_n=2)
    v = arch_counters.gp_event(EXPECTED, view, ticks, "instructions")
    assert v.status == "pass", v.reason
    assert "+1 per interrupt/exception" in v.expected and "Weaver" in v.expected
    v = arch_counters.gp_event(EXPECTED, view, gp_group("instructions", INSNS + 3, irq_n=2), "instructions")
    assert v.status == "fail" and "10,000,003 outside [10,000,000, 10,000,002]" in v.reason
    v = arch_counters.gp_event(EXPECTED, view, gp_group("instructions", INSNS + 1), "instructions")
    assert v.status == "fail" and "no interrupt in either window" in v.reason


def test_interrupts_allow_the_same_for_branches_and_faults_and_switches_count_too():
    """All branches (0xC4) count the IRET as well (conditional branches would not). A page fault or a context switch
    (a KVM async page fault in user mode schedules away: arch/x86/kernel/kvm.c) adds to the allowance."""
    view = intel_kvm_guest_view()
    group = gp_group("branch_instructions", N + 3, fixed_index=None, irq_n=1, faults_n=1, switches_n=1)
    assert arch_counters.gp_event(EXPECTED, view, group, "branch_instructions").status == "pass"
    group = gp_group("branch_instructions", N + 4, fixed_index=None, irq_n=1, faults_n=1, switches_n=1)
    assert arch_counters.gp_event(EXPECTED, view, group, "branch_instructions").status == "fail"


def test_an_interrupt_in_the_zero_window_lowers_the_difference():
    """N-0: an interrupt in the 0 run raises value_0, so the difference may fall short by as many."""
    view = intel_kvm_guest_view()
    assert arch_counters.gp_event(EXPECTED, view, gp_group("instructions", INSNS - 1, irq_0=1), "instructions").status \
        == "pass"  # fmt: skip
    assert arch_counters.gp_event(EXPECTED, view, gp_group("instructions", INSNS - 2, irq_0=1), "instructions").status \
        == "fail"  # fmt: skip


def test_unknown_interrupt_counts_keep_the_exact_rule():
    """-1 (the probe could not read /proc/interrupts) or records from before the probe counted: exact, as before."""
    view = intel_kvm_guest_view()
    unknown = gp_group("instructions", INSNS + 1, irq_n=-1)
    v = arch_counters.gp_event(EXPECTED, view, unknown, "instructions")
    assert v.status == "fail" and "interrupt count unknown" in v.reason
    old = [{k: val for k, val in r.items() if k not in windows()} for r in gp_group("instructions", INSNS)]
    assert arch_counters.gp_event(EXPECTED, view, old, "instructions").status == "pass"


def test_fixed_counter_0_allows_the_windows_interrupts():
    record = count("fixed0", 0, FIXED | 0, INSNS + 3, set_name="fixed", irq_n=3)
    assert arch_counters.fixed_counter(EXPECTED, intel_kvm_guest_view(), [record], 0).status == "pass"
    record = count("fixed0", 0, FIXED | 0, INSNS + 3, set_name="fixed", irq_n=2)
    assert arch_counters.fixed_counter(EXPECTED, intel_kvm_guest_view(), [record], 0).status == "fail"


def test_amd_allowance_keeps_its_vmrun_slack_and_the_zero_window():
    view = amd_kvm_guest_view()
    amd = replace(EXPECTED, feature="amd_core_pmu")
    slack = bounds.AMD_ZERO_WINDOW_EXITS + 1  # the VMRUN allowance plus the guest interrupt in the 0 window
    group = gp_group("instructions", INSNS - slack, counters=6, fixed_index=None, irq_0=1)
    assert arch_counters.gp_event(amd, view, group, "instructions").status == "pass"
    group = gp_group("instructions", INSNS - slack - 1, counters=6, fixed_index=None, irq_0=1)
    assert arch_counters.gp_event(amd, view, group, "instructions").status == "fail"


def test_exact_global_ctrl_allows_the_regions_interrupts():
    """The msr probe's N and 0 regions are bracketed the same way (count_region() in msr.c.j2)."""
    view = intel_kvm_guest_view()
    v = arch_counters.exact_global_ctrl(EXPECTED, view, [enabled_record(2, 2, irq_n=1, faults_n=1)])
    assert v.status == "pass" and "within the interrupts of their windows" in v.reason, v.reason
    v = arch_counters.exact_global_ctrl(EXPECTED, view, [enabled_record(3, 0, irq_n=2)])
    assert v.status == "fail" and "PMC0" in v.reason and "FIXED_CTR0" in v.reason and "PMC1" not in v.reason
    v = arch_counters.exact_global_ctrl(EXPECTED, view, [enabled_record(1, 0)])
    assert v.status == "fail" and "no interrupt in either window" in v.reason


# --- RDPMC: a #GP proves something only next to a valid RDPMC that worked ((2)-A, (2)-B) -----------------------


def test_rdpmc_invalid_needs_its_control_rdpmc_to_succeed():
    """With CR4.PCE clear every RDPMC #GPs: the control RDPMC(0) in the same process faulting too turns the check
    into an ERROR that names it, never a PASS."""
    view = intel_kvm_guest_view()
    counters_, msr = rdpmc_records()
    counters_[0]["control_signal"] = signal.SIGSEGV
    v = arch_counters.rdpmc(EXPECTED, view, counters_, msr)
    assert v.status == "error" and "control RDPMC(0) in the same process raised SIGSEGV" in v.reason


def test_rdpmc_invalid_record_factory_emits_the_probe_keys():
    source = (PROBES_DIR / "counters.c.j2").read_text()
    keys = function_keys(source, "static void rdpmc_invalid(void)", "/* This CPU's column of the PMI row")
    assert set(rdpmc_records()[0][0]) | {"value"} == keys | {"probe", "kind"}
    setup = function_keys((PROBES_DIR / "msr.c.j2").read_text(), "CR4.PCE, which every RDPMC", "static void *buffer_")
    assert set(rdpmc_records()[1][-1]) == setup | {"probe", "kind"}


def test_rdpmc_beyond_needs_a_valid_rdpmc_in_the_msr_probe():
    """Every RDPMC in the msr probe faulting: the beyond-index #GP proves nothing, and the valid ones fail."""
    view = intel_kvm_guest_view()
    counters_, msr = rdpmc_records()
    for r in msr:
        if r["kind"] == "rdpmc":
            r["signal"] = signal.SIGSEGV
    v = arch_counters.rdpmc(EXPECTED, view, counters_, msr)
    assert v.status == "fail" and "RDPMC(0x0) raised SIGSEGV" in v.reason and "proves nothing" in v.reason


def test_rdpmc_without_a_mapping_in_the_msr_probe_is_an_error():
    view = intel_kvm_guest_view()
    counters_, msr = rdpmc_records()
    msr[-1].update(mmapped=0, user_rdpmc=0)
    v = arch_counters.rdpmc(EXPECTED, view, counters_, msr)
    assert v.status == "error" and "mmapped=0" in v.reason


def test_old_rdpmc_invalid_records_fall_back_to_the_members_rdpmc():
    """Records from before the control: a member's user-page RDPMC in the same process is the valid one; none
    succeeding (or user_rdpmc=0) leaves the #GP unproven."""
    view = intel_kvm_guest_view()
    counters_, msr = rdpmc_records()
    for key in ("control_index", "control_signal"):
        del counters_[0][key]
    assert arch_counters.rdpmc(EXPECTED, view, counters_, msr).status == "pass"
    v = arch_counters.rdpmc(EXPECTED, view, [counters_[0]], msr)
    assert v.status == "error" and "no valid-index RDPMC" in v.reason


def test_members_read_without_cap_user_rdpmc_are_not_compared():
    """(2)-B: with cap_user_rdpmc=0 the probe made no RDPMC and rdpmc_n is 0: not a gap, a note."""
    view = intel_kvm_guest_view()
    counters_, msr = rdpmc_records()
    counters_[3].update(cap_user_rdpmc=0, rdpmc_n=0)
    v = arch_counters.rdpmc(EXPECTED, view, counters_, msr)
    assert v.status == "pass" and "1 members not compared with perf's user page" in v.reason


# --- bounds checked against the real semantics ----------------------------------------------------------------


@pytest.mark.parametrize(("value", "status"), [(0, "fail"), (1, "pass"), (N, "pass"), (1_080_000, "pass"),
                                               (1_100_001, "fail")])  # fmt: skip
def test_llc_misses_allow_for_a_fully_flushed_buffer(value, status):
    """Every one of the N lines is flushed (flush_buffer), so ~N misses is the expectation, not the worst case as in
    kvm-unit-tests (one clflush per run); the SDM's LLC Misses event may include speculative misses."""
    records = gp_group("llc_misses", 0, fixed_index=None, value_n=value)
    assert arch_counters.gp_event(EXPECTED, intel_kvm_guest_view(), records, "llc_misses").status == status


def test_lbr_sampling_rate_stays_far_below_the_throttle():
    """The LBR probe's period is the PMI check's: <= 10 PMIs per 1 ms tick even at 1e10 instructions/s, and enough
    samples (12-instruction chain iterations) for the call-stack check."""
    from harness.probe import params as probe_params

    params = probe_params.lbr_params()
    assert 1e10 / params["sample_period"] / 1000 <= 100_000 / 1000 / 10
    assert params["iterations"] * 12 // params["sample_period"] >= params["max_samples"]
    source = (PROBES_DIR / "lbr.c.j2").read_text()
    assert "vpmu_prepare_sampling();" in source and "rec_throttle_stats(&c.t);" in source
