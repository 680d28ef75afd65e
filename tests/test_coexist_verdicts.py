"""Co-existence verdicts over records in the probes' format and load results as the runner produces them."""

from __future__ import annotations

from dataclasses import replace

from harness.host.loads import LoadResult, LoadSpec, load_loads
from harness.judge import arch_counters, coexist
from harness.judge.bounds import OvercountErrata
from tests.test_verdicts import EXPECTED, FIXED, INSNS, amd_kvm_guest_view, count, gp_group, intel_kvm_guest_view

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
    assert v.status == "fail" and "counter 0x2" in v.reason and "; 4,000 counts lost silently" in v.reason


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


# --- interrupts in the windows, overcount wording, and losses the perf-based vPMU documents ---------------------

LOADS = load_loads()


def test_canary_allows_the_windows_interrupts_and_compares_with_idle_only_when_both_are_quiet():
    """One count per interrupt/exception in the N window (Weaver et al., ISPASS 2013; rr #610). The idle run's
    count differs from this one's by its own interrupts, so the idle comparison needs both runs free of them."""
    view = intel_kvm_guest_view()
    ticked = gp_group("instructions", INSNS + 2, irq_n=2)
    v = coexist.canary(EXPECTED, view, ticked, gp_group("instructions", INSNS), running(), EXITS)
    assert v.status == "pass" and "within the allowance" in v.reason, v.reason
    assert v.observed["window_events"] == {"n": 2, "zero": 0}
    idle_ticked = gp_group("instructions", INSNS + 1, irq_n=1)
    assert coexist.canary(EXPECTED, view, gp_group("instructions", INSNS), idle_ticked, running(), EXITS).status \
        == "pass"  # fmt: skip
    v = coexist.canary(EXPECTED, view, gp_group("instructions", INSNS + 3, irq_n=2), None, running(), EXITS)
    assert v.status == "fail" and "overcount by 1 beyond the allowance" in v.reason


def test_canary_overcount_is_not_called_a_loss():
    """Review-arch (3): an overcount printed "-k counts lost"."""
    records = gp_group("instructions", INSNS)
    records[4] = count("instructions", 4, 4, INSNS + 12)
    v = coexist.canary(EXPECTED, intel_kvm_guest_view(), records, None, running(), EXITS)
    assert v.status == "fail" and "overcount by 12" in v.reason
    assert "lost" not in v.reason and not v.reason.startswith("host-induced loss")


def loss_records() -> list[dict]:
    """Counter 0x2 short by 4,000 with time_running == time_enabled: a silent loss."""
    records = gp_group("instructions", INSNS)
    records[2] = count("instructions", 2, 2, INSNS - 4_000)
    return records


def test_loss_under_a_pinned_host_load_is_the_perf_based_vpmus_documented_behaviour():
    """kernel-parameters.txt (kvm-{amd,intel}.enable_mediated_pmu): the perf-based vPMU "can result in silently
    dropped guest events (due to resource contention)". host-pinned pins hardware events on the vCPU's CPUs, which
    take counters before KVM's pinned per-task events (kernel/events/core.c): SKIP with the measured loss, the
    counts kept for the matrix."""
    view = intel_kvm_guest_view()
    contention = coexist.perf_based_contention(LOADS["host-pinned"], "perf-based")
    v = coexist.canary(EXPECTED, view, loss_records(), None, running(), EXITS, contention=contention)
    assert v.status == "skip", v.reason
    assert v.reason.startswith("host-load: host-pinned pins hardware events cycles:GH, instructions:GH")
    assert "silently dropped guest events" in v.reason and "4,000 counts lost silently" in v.reason
    assert v.observed["counts"]["0x2"] == INSNS - 4_000 and v.observed["count_error_pct"] == -0.04
    assert v.expected == f"exactly {INSNS:,} on every counter"


def test_loss_under_a_load_that_does_not_compete_stays_a_fail():
    """Flexible host events never displace pinned ones, software events take no counter, and the mediated vPMU
    "eliminates lost guest events": a loss there is a defect."""
    view = intel_kvm_guest_view()
    for name in ("idle", "host-sw-counting", "host-counting-guest", "host-counting-host-only", "host-multiplexing",
                 "host-sampling", "host-counting-vcpu"):  # fmt: skip
        contention = coexist.perf_based_contention(LOADS[name], "perf-based")
        assert contention is None, name
        v = coexist.canary(EXPECTED, view, loss_records(), None, running(), EXITS, contention=contention)
        assert v.status == "fail" and "host-induced loss" in v.reason, name
    assert coexist.perf_based_contention(LOADS["host-pinned"], "mediated") is None
    assert coexist.perf_based_contention(LOADS["host-pinned"], None) is None
    # an overcount under the pinned load is no contention effect
    over = gp_group("instructions", INSNS)
    over[1] = count("instructions", 1, 1, INSNS + 9)
    contention = coexist.perf_based_contention(LOADS["host-pinned"], "perf-based")
    v = coexist.canary(EXPECTED, view, over, None, running(), EXITS, contention=contention)
    assert v.status == "fail" and "overcount by 9" in v.reason


def test_only_pinned_hardware_events_that_reach_the_vcpu_compete():
    assert [n for n, spec in LOADS.items() if coexist.competing_load(spec)] == ["host-pinned-vcpu0", "host-pinned"]
    pinned_sw = LoadSpec("x", "d", ("perf", "stat", "-a", "-e", "{cpu-clock,task-clock}:D"))
    assert coexist.competing_load(pinned_sw) is None
    own_task = LoadSpec("x", "d", ("perf", "stat", "-e", "cycles:HD", "--", "true"))
    assert coexist.competing_load(own_task) is None
    system = LoadSpec("x", "d", ("perf", "stat", "-a", "-e", "instructions:HD"))
    assert coexist.competing_load(system) == "pins hardware events instructions:HD on every CPU (-a), the vCPU's " \
        "included"  # fmt: skip
    vcpu = LoadSpec("x", "d", ("perf", "stat", "-t", "{vcpu_tids}", "-e", "cycles:GHD"))
    assert "on the vCPU threads" in coexist.competing_load(vcpu)


def test_arch_counts_under_a_competing_load_skip_the_documented_loss_too():
    """The arch checks run under the same load: a stopped guest counter under host-pinned on the perf-based vPMU is
    the same documented loss for arch.gp.*, arch.fixed.*, arch.exact_global_ctrl and arch.pmi_sampling; an
    overcount or a misplaced member is still a FAIL."""
    from tests.test_verdicts import enabled_record, sampling

    view = intel_kvm_guest_view()
    contention = coexist.perf_based_contention(LOADS["host-pinned"], "perf-based")
    v = arch_counters.gp_event(EXPECTED, view, loss_records(), "instructions", contention=contention)
    assert v.status == "skip" and "GP2: instructions" in v.reason and "silently dropped" in v.reason
    assert v.observed["gp2"] == INSNS - 4_000
    assert arch_counters.gp_event(EXPECTED, view, loss_records(), "instructions").status == "fail"
    misplaced = [r for r in loss_records() if r["rdpmc_index"] != 5]
    assert arch_counters.gp_event(EXPECTED, view, misplaced, "instructions", contention=contention).status == "fail"
    short_fixed = count("fixed0", 0, FIXED | 0, INSNS - 50, set_name="fixed")
    assert arch_counters.fixed_counter(EXPECTED, view, [short_fixed], 0, contention=contention).status == "skip"
    over_fixed = count("fixed0", 0, FIXED | 0, INSNS + 50, set_name="fixed")
    assert arch_counters.fixed_counter(EXPECTED, view, [over_fixed], 0, contention=contention).status == "fail"
    v = arch_counters.exact_global_ctrl(EXPECTED, view, [enabled_record(-900, -90)], contention=contention)
    assert v.status == "skip" and "PMC0" in v.reason
    stopped = sampling(150, count=150 * 1_000_003)
    v = arch_counters.pmi_sampling(EXPECTED, view, [stopped], contention=contention)
    assert v.status == "skip" and "event counted 150,000,450 < the loop's 200,000,000" in v.reason
    assert arch_counters.pmi_sampling(EXPECTED, view, [stopped]).status == "fail"
