"""Co-existence verdicts over records in the probes' format and load results as the runner produces them."""

from __future__ import annotations

from dataclasses import replace

from harness import coexist
from harness.loads import LoadResult, LoadSpec
from harness.verdicts import OvercountErrata
from tests.test_verdicts import EXPECTED, INSNS, amd_kvm_guest_view, count, gp_group, intel_kvm_guest_view

HW = LoadSpec("host-counting-guest", "d", ("perf", "stat", "-a", "-e", "cycles:GH"), counts_guest=True)
HOST_ONLY = LoadSpec("host-counting-host-only", "d", ("perf", "stat", "-a", "-e", "cycles:H"))
IDLE = LoadSpec("idle", "d")


def running(events=None) -> LoadResult:
    return LoadResult("x", status="stopped", events=events or {"cycles:GH": {"status": "counted", "value": 1e9,
                                                                             "min_pct_running": 60.0}})  # fmt: skip


def test_host_load_verdicts():
    assert coexist.host_load(IDLE, LoadResult("idle"), "perf-based", {}).status == "skip"
    ok = coexist.host_load(HW, running(), "perf-based", {})
    assert ok.status == "pass" and "lowest running share 60%" in ok.reason
    unavailable = LoadResult("x", status="unavailable", reason="perf: cycles:GH <not supported>")
    v = coexist.host_load(HW, unavailable, None, {})
    assert v.status == "skip" and v.reason == "host-load: perf: cycles:GH <not supported>"
    died = LoadResult("x", status="died", reason="perf exited during the check group (code 1)")
    assert coexist.host_load(HW, died, "perf-based", {}).status == "error"


def test_mediated_vpmu_must_refuse_include_guest_events():
    refused = LoadResult("x", status="refused", reason="perf: ... returned with 95 (Operation not supported)")
    assert coexist.host_load(HW, refused, "mediated", {}).status == "pass"
    v = coexist.host_load(HW, running(), "mediated", {})
    assert v.status == "fail" and "must be refused" in v.reason
    # a host-only (:H) load is fine under the mediated vPMU
    assert coexist.host_load(HOST_ONLY, running(), "mediated", {}).status == "pass"
    # under the perf-based vPMU a refusal is a failure of the host, not an expectation
    assert coexist.host_load(HW, refused, "perf-based", {}).status == "fail"


EXITS = {"total": 12345, "during_group": 800}


def test_canary_exact_under_load_passes():
    v = coexist.canary(EXPECTED, intel_kvm_guest_view(), gp_group("instructions", INSNS),
                       gp_group("instructions", INSNS), running(), EXITS)  # fmt: skip
    assert v.status == "pass" and v.observed["vm_exits"] == EXITS


def test_canary_silent_loss_is_named():
    records = gp_group("instructions", INSNS)
    records[2] = count("instructions", 2, 2, INSNS - 4_000)  # running == enabled: the guest was not told
    v = coexist.canary(EXPECTED, intel_kvm_guest_view(), records, None, running(), EXITS)
    assert v.status == "fail" and "counter 0x2" in v.reason and "+4,000 counts lost silently" in v.reason


def test_canary_loss_with_multiplexing_is_distinguished():
    records = gp_group("instructions", INSNS)
    records[0] = count("instructions", 0, 0, INSNS - 10, running=400)
    v = coexist.canary(EXPECTED, intel_kvm_guest_view(), records, None, running(), EXITS)
    assert v.status == "fail" and "with guest-visible multiplexing" in v.reason


def test_canary_differs_from_idle():
    idle = gp_group("instructions", INSNS)
    idle[1] = count("instructions", 1, 1, INSNS + 1)
    # under the load the count is exact but idle was not: still exact now -> only the idle mismatch is reported
    v = coexist.canary(EXPECTED, intel_kvm_guest_view(), gp_group("instructions", INSNS), idle, running(), EXITS)
    assert v.status == "fail" and "differs from the idle run" in v.reason


def test_canary_on_amd_accepts_overcount():
    view = amd_kvm_guest_view()
    amd = replace(EXPECTED, feature="amd_core_pmu")
    records = gp_group("instructions", INSNS + 7, counters=6, fixed_index=None)
    assert coexist.canary(amd, view, records, None, running(), EXITS).status == "pass"


def test_canary_skips_when_the_load_could_not_run():
    unavailable = LoadResult("x", status="unavailable", reason="perf: cycles:GH <not supported>")
    v = coexist.canary(EXPECTED, intel_kvm_guest_view(), [], None, unavailable, EXITS)
    assert v.status == "skip" and v.reason.startswith("host-load:")


def test_guest_multiplexing():
    view = intel_kvm_guest_view()
    assert coexist.guest_multiplexing(EXPECTED, view, gp_group("instructions", INSNS)).status == "pass"
    v = coexist.guest_multiplexing(EXPECTED, view, gp_group("instructions", INSNS, running=500))
    assert v.status == "fail" and "ran 50%" in v.reason


def test_canary_uses_only_the_instructions_erratum():
    """Clearwater Forest (0xDD) overcounts instructions (kvm-unit-tests lib/x86/pmu.c, commit 3ffdf39c): the canary
    accepts ">=" there; a branches-only erratum set does not relax it."""
    records = gp_group("instructions", INSNS + 4)
    cwf = OvercountErrata(instructions=True)
    assert coexist.canary(EXPECTED, intel_kvm_guest_view(), records, None, running(), EXITS, cwf).status == "pass"
    branches_only = OvercountErrata(branches=True)
    v = coexist.canary(EXPECTED, intel_kvm_guest_view(), records, None, running(), EXITS, branches_only)
    assert v.status == "fail" and "counter 0x0" in v.reason


def test_canary_with_a_copy_held_back_for_the_host_watchdog():
    """A default AMD host holds one core counter for its NMI watchdog: the probe opens 5 copies; the canary judges
    the 5 it has (a sixth copy would have stopped silently and failed here)."""
    view = amd_kvm_guest_view()
    amd = replace(EXPECTED, feature="amd_core_pmu")
    records = [count("instructions", i, i, INSNS, copies=5, held_back=1) for i in range(5)]
    v = coexist.canary(amd, view, records, None, running(), EXITS)
    assert v.status == "pass" and "on 5 counters" in v.reason and "nmi_watchdog" in v.reason
