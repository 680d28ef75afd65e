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

from harness import verdicts
from harness.caps import decode_caps
from harness.cpuid_dump import CpuidTable, Regs, load_cpuid_dump
from harness.expectations import Expectation
from harness.guest_view import GuestView, MsrRead
from harness.probes import PROBES_DIR
from harness.workloads import LOOP
from tests.helpers import CPUID_DIR

N = 1_000_000
INSNS = LOOP.delta_instructions(N)
EXPECTED = Expectation("arch_perfmon", True, "expected: Intel architectural PMU", {"version": 2, "gp_counters": 8})
ABSENT = Expectation("arch_perfmon", False, "accel: no vPMU under TCG (...)")
FIXED = verdicts.FIXED_INDEX_BIT


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
) -> dict:
    """A counters-probe "count" record (keys as emitted by group_event in counters.c.j2)."""
    return {"probe": "counters", "kind": "count", "set": set_name, "event": event, "config": 0xC0, "copies": 9,
            "member": member, "iterations": N, "rdpmc_index": index,
            "value_n": value_0 + delta if value_n is None else value_n, "value_0": value_0,
            "enabled_n": 1000, "running_n": running, "enabled_0": 900, "running_0": 900,
            "rdpmc_n": value_0 + delta + 40, "offset_n": 0, "pmc_width": 48, "tsc_n": tsc}  # fmt: skip


def gp_group(event: str, delta: int, counters: int = 8, fixed_index: int | None = 0, **kw) -> list[dict]:
    records = [count(event, i, i, delta, **kw) for i in range(counters)]
    if fixed_index is not None:
        records.append(count(event, counters, FIXED | fixed_index, delta, **kw))
    return records


def test_factories_emit_the_probe_keys():
    """count() produces exactly the keys group_event() in counters.c.j2 prints for a measured member."""
    source = (PROBES_DIR / "counters.c.j2").read_text()
    body = source[source.index("static void group_event") : source.index("/* An event that is opened but never")]
    per_member = body[body.index("for (int i = 0; i < n; i++) {") :]  # the loop that prints measured members
    keys = set(re.findall(r'rec_(?:u64|i64|str)\("(\w+)"', per_member)) | {"probe", "kind"}
    assert set(count("instructions", 0, 0, INSNS)) == keys


# --- GP counters ---------------------------------------------------------------------------------------------


def test_instructions_exact_on_every_gp_counter_passes():
    v = verdicts.gp_event(EXPECTED, intel_kvm_guest_view(), gp_group("instructions", INSNS), "instructions")
    assert v.status == "pass", v.reason
    assert v.observed == {f"gp{i}": INSNS for i in range(8)}


def test_instructions_off_by_one_fails_naming_the_counter():
    records = gp_group("instructions", INSNS)
    records[3] = count("instructions", 3, 3, INSNS + 1)
    v = verdicts.gp_event(EXPECTED, intel_kvm_guest_view(), records, "instructions")
    assert v.status == "fail" and "GP3" in v.reason and "10,000,001" in v.reason


def test_branches_exact():
    view = intel_kvm_guest_view()
    assert verdicts.gp_event(EXPECTED, view, gp_group("branch_instructions", N, fixed_index=None),
                             "branch_instructions").status == "pass"  # fmt: skip
    assert verdicts.gp_event(EXPECTED, view, gp_group("branch_instructions", N - 1, fixed_index=None),
                             "branch_instructions").status == "fail"  # fmt: skip


@pytest.mark.parametrize(("value", "status"), [(N - 1, "fail"), (N, "pass"), (7 * N, "pass"), (50 * N + 1, "fail")])
def test_cycles_range(value, status):
    # kvm-unit-tests x86/pmu.c: cycles in [N, 50N]
    records = gp_group("core_cycles", 0, fixed_index=1, value_n=value)
    assert verdicts.gp_event(EXPECTED, intel_kvm_guest_view(), records, "core_cycles").status == status


def test_missing_gp_member_fails():
    records = [r for r in gp_group("instructions", INSNS) if r["rdpmc_index"] != 5]
    v = verdicts.gp_event(EXPECTED, intel_kvm_guest_view(), records, "instructions")
    assert v.status == "fail" and "GP5: no group member landed" in v.reason


def test_guest_visible_multiplexing_fails():
    v = verdicts.gp_event(EXPECTED, intel_kvm_guest_view(), gp_group("instructions", INSNS, running=500),
                          "instructions")  # fmt: skip
    assert v.status == "fail" and "multiplexing" in v.reason


def open_error(event: str) -> dict:
    return {"probe": "counters", "kind": "count", "set": "gp", "event": event, "config": 0xC0, "copies": 9,
            "opened": 0, "error": "perf_event_open", "errno": 2, "strerror": "No such file or directory"}  # fmt: skip


def test_errno_is_a_fail_when_the_pmu_is_promised():
    v = verdicts.gp_event(EXPECTED, intel_kvm_guest_view(), [open_error("instructions")], "instructions")
    assert v.status == "fail" and "ENOENT" in v.reason


def test_errno_is_a_skip_when_no_pmu_is_expected():
    v = verdicts.gp_event(ABSENT, no_pmu_view(), [open_error("instructions")], "instructions")
    assert v.status == "skip" and v.reason == ABSENT.reason


def test_promised_but_not_enumerated_fails():
    v = verdicts.gp_event(EXPECTED, no_pmu_view(), [open_error("instructions")], "instructions")
    assert v.status == "fail" and "promised" in v.reason


def test_missing_records_are_an_error():
    assert verdicts.gp_event(EXPECTED, intel_kvm_guest_view(), [], "instructions").status == "error"


def test_amd_accepts_overcount_but_not_undercount():
    view = amd_kvm_guest_view()
    amd = replace(EXPECTED, feature="amd_core_pmu")
    ok = verdicts.gp_event(amd, view, gp_group("instructions", INSNS + 5, counters=6, fixed_index=None), "instructions")
    low = verdicts.gp_event(amd, view, gp_group("instructions", INSNS - 1, counters=6, fixed_index=None),
                            "instructions")  # fmt: skip
    assert (ok.status, low.status) == ("pass", "fail")


def test_atom_errata_relaxes_exactness():
    records = gp_group("instructions", INSNS + 3)
    assert verdicts.gp_event(EXPECTED, intel_kvm_guest_view(), records, "instructions", errata=True).status == "pass"
    assert verdicts.gp_event(EXPECTED, intel_kvm_guest_view(), records, "instructions").status == "fail"


# --- fixed counters ------------------------------------------------------------------------------------------


def test_fixed_counter_on_its_fixed_counter_passes():
    record = count("fixed0", 0, FIXED | 0, INSNS, set_name="fixed")
    assert verdicts.fixed_counter(EXPECTED, intel_kvm_guest_view(), [record], 0).status == "pass"


def test_fixed_event_on_a_gp_counter_fails():
    record = count("fixed0", 0, 2, INSNS, set_name="fixed")
    v = verdicts.fixed_counter(EXPECTED, intel_kvm_guest_view(), [record], 0)
    assert v.status == "fail" and "landed on RDPMC index 0x2" in v.reason


def test_fixed_counter_3_not_enumerated_by_kvm_skips():
    v = verdicts.fixed_counter(EXPECTED, intel_kvm_guest_view(), [], 3)
    assert v.status == "skip" and v.reason.startswith("not-enumerated: fixed counter 3")


def test_ref_cycles_bounded_by_tsc():
    good = count("fixed2", 0, FIXED | 2, 0, set_name="fixed", value_n=900_000, tsc=1_000_000)
    bad = count("fixed2", 0, FIXED | 2, 0, set_name="fixed", value_n=1_100_000, tsc=1_000_000)
    view = intel_kvm_guest_view()
    assert verdicts.fixed_counter(EXPECTED, view, [good], 2).status == "pass"
    assert verdicts.fixed_counter(EXPECTED, view, [bad], 2).status == "fail"


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
    assert verdicts.counter_width(EXPECTED, intel_kvm_guest_view(), good).status == "pass"
    bad = [width_record("width_legacy", 0x89ABCDEF12, 0xABCDEF12)]
    assert verdicts.counter_width(EXPECTED, intel_kvm_guest_view(), bad).status == "fail"


def test_full_width_write_above_width_must_fault():
    records = [width_record("width_full_over", 0xFFFFFF0123456789, 0x0123456789)]
    v = verdicts.counter_width(EXPECTED, intel_kvm_guest_view(), records)
    assert v.status == "fail" and "must #GP" in v.reason


def test_disabled_counters():
    counters = [{"probe": "counters", "kind": "disabled", "value": 0, "enabled": 0, "running": 0}]
    msr = [{"probe": "msr", "kind": "disabled_sel", "instructions": 0, "branches": 0, "fixed0": 0},
           {"probe": "msr", "kind": "disabled_global", "instructions": 0, "branches": 0, "fixed0": 0}]  # fmt: skip
    assert verdicts.disabled_no_count(EXPECTED, intel_kvm_guest_view(), counters, msr).status == "pass"
    msr[1]["instructions"] = 5
    v = verdicts.disabled_no_count(EXPECTED, intel_kvm_guest_view(), counters, msr)
    assert v.status == "fail" and "GLOBAL_CTRL bit clear" in v.reason


def rdpmc_records(mismatch: bool = False, invalid_signal: int = signal.SIGSEGV) -> tuple[list[dict], list[dict]]:
    msr = [{"probe": "msr", "kind": "rdpmc", "index": i, "rdmsr": 0x12345600 + i, "signal": 0,
            "rdpmc": 0x12345600 + i + (1 if mismatch and i == 2 else 0)} for i in range(8)]  # fmt: skip
    msr.append({"probe": "msr", "kind": "rdpmc_beyond", "index": 8, "signal": invalid_signal, "rdpmc": 0})
    counters = [{"probe": "counters", "kind": "rdpmc_invalid", "index": 64, "signal": invalid_signal,
                 "user_rdpmc": 1}, *gp_group("instructions", INSNS)]  # fmt: skip
    return counters, msr


def test_rdpmc_checks():
    view = intel_kvm_guest_view()
    assert verdicts.rdpmc(EXPECTED, view, *rdpmc_records()).status == "pass"
    v = verdicts.rdpmc(EXPECTED, view, *rdpmc_records(mismatch=True))
    assert v.status == "fail" and "RDPMC(0x2)" in v.reason
    v = verdicts.rdpmc(EXPECTED, view, *rdpmc_records(invalid_signal=0))
    assert v.status == "fail" and "did not #GP" in v.reason


def test_exact_global_ctrl():
    record = {"probe": "msr", "kind": "enabled", "iterations": N, "instructions_n": 5000 + INSNS,
              "instructions_0": 5000, "branches_n": 300 + N, "branches_0": 300, "fixed0_n": 5000 + INSNS,
              "fixed0_0": 5000, "global_ctrl": 1}  # fmt: skip
    assert verdicts.exact_global_ctrl(EXPECTED, intel_kvm_guest_view(), [record]).status == "pass"
    record["fixed0_n"] += 1
    v = verdicts.exact_global_ctrl(EXPECTED, intel_kvm_guest_view(), [record])
    assert v.status == "fail" and "FIXED_CTR0" in v.reason


def test_overflow_status():
    record = {"probe": "msr", "kind": "overflow", "counter": 9000, "status": 1, "status_after_clear": 0}
    assert verdicts.overflow_status(EXPECTED, intel_kvm_guest_view(), [record]).status == "pass"
    assert verdicts.overflow_status(EXPECTED, intel_kvm_guest_view(), [{**record, "status": 0}]).status == "fail"
    assert verdicts.overflow_status(EXPECTED, intel_kvm_guest_view(),
                                    [{**record, "status_after_clear": 1}]).status == "fail"  # fmt: skip


def test_overflow_without_perfmon_v2_skips_on_amd():
    view = amd_kvm_guest_view()
    no_v2 = replace(view, caps=replace(view.caps, amd=replace(view.caps.amd, perfmon_v2=False)))
    v = verdicts.overflow_status(EXPECTED, no_v2, [])
    assert v.status == "skip" and "PerfMonV2" in v.reason


def sampling(samples: int, lost: int = 0, pmi: int | None = None) -> dict:
    count_ = 10 * INSNS + 300
    return {"probe": "counters", "kind": "sampling", "period": 100_003, "iterations": 10 * N, "count": count_,
            "samples": samples, "in_loop": samples, "lost": lost, "throttle": 0, "other_records": 0,
            "pmi_before": 10, "pmi_after": 10 + (samples if pmi is None else pmi), "loop_start": 4096,
            "loop_end": 4131}  # fmt: skip


def test_pmi_sampling():
    expected_n = (10 * INSNS + 300) // 100_003
    view = intel_kvm_guest_view()
    assert verdicts.pmi_sampling(EXPECTED, view, [sampling(expected_n)]).status == "pass"
    assert verdicts.pmi_sampling(EXPECTED, view, [sampling(expected_n + 3)]).status == "fail"
    assert verdicts.pmi_sampling(EXPECTED, view, [sampling(expected_n, lost=1)]).status == "fail"
    v = verdicts.pmi_sampling(EXPECTED, view, [sampling(expected_n, pmi=expected_n - 10)])
    assert v.status == "fail" and "PMI count rose" in v.reason


# --- enumeration ---------------------------------------------------------------------------------------------


def test_pmu_visibility_both_ways():
    assert verdicts.pmu_visible(EXPECTED, intel_kvm_guest_view()).status == "pass"
    assert verdicts.pmu_visible(EXPECTED, no_pmu_view()).status == "fail"
    assert verdicts.pmu_visible(ABSENT, no_pmu_view()).status == "pass"
    assert verdicts.pmu_visible(ABSENT, intel_kvm_guest_view()).status == "fail"


def test_pmu_msrs_fault_without_pmu():
    faults = Expectation("pmu_msrs_fault", True, "expected")
    assert verdicts.pmu_msrs_fault(ABSENT, faults, no_pmu_view()).status == "pass"
    view = no_pmu_view()
    view.msrs[0x38F] = MsrRead(0x38F, 0, None)
    v = verdicts.pmu_msrs_fault(ABSENT, faults, view)
    assert v.status == "fail" and "0x38f" in v.reason


def test_guest_within_host_limits():
    host = decode_caps(load_cpuid_dump(CPUID_DIR / "GenuineIntel00806F8_SapphireRapids_05_CPUID.txt")).to_json()
    assert verdicts.guest_within_host("kvm", EXPECTED, intel_kvm_guest_view(), host).status == "pass"
    view = intel_kvm_guest_view()
    over = replace(view, caps=replace(view.caps, arch_perfmon=replace(view.caps.arch_perfmon, version=3)))
    v = verdicts.guest_within_host("kvm", EXPECTED, over, host)
    assert v.status == "fail" and "version 3 > 2" in v.reason
    assert verdicts.guest_within_host("tcg", EXPECTED, view, host).status == "skip"
