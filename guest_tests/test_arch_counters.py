"""Architectural counters, measured in the guest as kvm-unit-tests x86/pmu.c measures them on bare metal.

Counting goes through perf_event_open with raw configs (one group per event, one copy per counter) and, for
register semantics, through /dev/cpu/N/msr on an idle PMU. Exact expectations come from the generated loop
(harness/probe/workloads.py). Without a vPMU every check SKIPs with the reason the expectation engine gives.
"""

from __future__ import annotations

import pytest

from harness.judge import arch_counters, bounds, coexist
from harness.probe.params import ARCH_EVENTS, counters_params, msr_params
from harness.suite.profile_run import ProfileRun

pytestmark = [pytest.mark.feature("arch_counters"), pytest.mark.requires_pmu, pytest.mark.expects("pmu")]
GP_EVENTS = list(ARCH_EVENTS)


def counters(run: ProfileRun) -> list[dict]:
    """The counters probe's records (one run per guest, shared by every check); the host facts decide which groups
    hold a copy back for the host NMI watchdog's counter (host_watchdog.host_watchdog_starves)."""
    return run.probe("counters", counters_params(run.view, run.host)).records


def msr_records(run: ProfileRun) -> list[dict]:
    """The msr probe's records; not run when the guest enumerates no PMU (nothing to program)."""
    if not run.view.cpuid_pmu:
        return []
    return run.probe("msr", msr_params(run.view)).records


def errata(run: ProfileRun) -> bounds.OvercountErrata:
    """Overcount errata of the guest's model and of the host's silicon (a named -cpu model can hide the latter)."""
    return bounds.overcount_errata(run.view.caps, (run.host.get("cpu") or {}).get("caps"))


def contention(run: ProfileRun, host_load) -> str | None:
    """The host load of this check group, when it competes with KVM's backing events for the counters under the
    perf-based vPMU (coexist.perf_based_contention): a count that falls short then SKIPs as that vPMU's documented
    loss instead of failing."""
    return coexist.perf_based_contention(host_load.spec if host_load else None, run.host.get("vpmu_mode"))


@pytest.mark.check("arch.gp.{event}")
@pytest.mark.parametrize("event", GP_EVENTS)
def test_gp_event(profile_run, host_load, check, event):
    """Every GP counter counts the event over the loop within its bounds (exact for instructions/branches, up to one
    count per interrupt or exception in the window)."""
    records = counters(profile_run)
    verdict = arch_counters.gp_event(profile_run.pmu_expectation(), profile_run.view, records, event,
                                     errata(profile_run), profile_run.host,
                                     contention(profile_run, host_load))  # fmt: skip
    check.judge(verdict, [r for r in records if r.get("event") == event])


@pytest.mark.intel
@pytest.mark.check("arch.fixed.{index}")
@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_fixed_counter(profile_run, host_load, check, index):
    """Fixed counter i counts its event (0 instructions, 1 cycles, 2 ref cycles, 3 slots) on the fixed counter."""
    records = counters(profile_run)
    verdict = arch_counters.fixed_counter(profile_run.pmu_expectation(), profile_run.view, records, index,
                                     errata(profile_run), contention(profile_run, host_load))  # fmt: skip
    check.judge(verdict, [r for r in records if r.get("event") == f"fixed{index}"])


@pytest.mark.check("arch.disabled")
def test_disabled_counter_does_not_count(profile_run, check):
    """A never-enabled perf event, a counter with EN=0 and one with its GLOBAL_CTRL bit clear all stay at 0."""
    records, msr = counters(profile_run), msr_records(profile_run)
    check.judge(arch_counters.disabled_no_count(profile_run.pmu_expectation(), profile_run.view, records, msr),
                [r for r in records + msr if r["kind"] in ("disabled", "disabled_sel", "disabled_global")])  # fmt: skip


@pytest.mark.check("arch.counter_width")
def test_counter_width(profile_run, check):
    """Legacy writes sign-extend bit 31, full-width writes keep the width and #GP above it, fixed writes keep it."""
    msr = msr_records(profile_run)
    check.judge(arch_counters.counter_width(profile_run.pmu_expectation(), profile_run.view, msr),
                [r for r in msr if r["kind"].startswith("width")])  # fmt: skip


@pytest.mark.expects("pmu", "pmu_msrs_fault")
@pytest.mark.check("arch.msr_bounds")
def test_msr_bounds(profile_run, check):
    """Counter MSRs beyond the enumerated number #GP (SKIP with kvm.ignore_msrs=Y, like enum.pmu_msrs_fault)."""
    msr = msr_records(profile_run)
    check.judge(arch_counters.msr_bounds(profile_run.pmu_expectation(), profile_run.view, msr,
                                    profile_run.expectation("pmu_msrs_fault")),
                [r for r in msr if r["kind"] == "bounds"])  # fmt: skip


@pytest.mark.check("arch.rdpmc")
def test_rdpmc(profile_run, check):
    """RDPMC agrees with RDMSR (GP, and fixed with ECX bit 30) and with perf's user page; a bad index #GPs."""
    records, msr = counters(profile_run), msr_records(profile_run)
    check.judge(arch_counters.rdpmc(profile_run.pmu_expectation(), profile_run.view, records, msr,
                               profile_run.host.get("vpmu_mode")),
                [r for r in records + msr if r["kind"].startswith("rdpmc") or r["kind"] == "count"])  # fmt: skip


@pytest.mark.check("arch.exact_global_ctrl")
def test_exact_global_ctrl(profile_run, host_load, check):
    """Counters enabled only through GLOBAL_CTRL count the loop exactly (the analogue of KUT's 10N+17), up to one
    count per interrupt or exception in the two regions."""
    msr = msr_records(profile_run)
    check.judge(arch_counters.exact_global_ctrl(profile_run.pmu_expectation(), profile_run.view, msr,
                                                errata(profile_run), contention(profile_run, host_load)),
                [r for r in msr if r["kind"] == "enabled"])  # fmt: skip


@pytest.mark.check("arch.overflow_status")
def test_overflow_status(profile_run, check):
    """Overflow sets GLOBAL_STATUS bit 0; writing the clear MSR clears it."""
    msr = msr_records(profile_run)
    check.judge(arch_counters.overflow_status(profile_run.pmu_expectation(), profile_run.view, msr),
                [r for r in msr if r["kind"] == "overflow"])  # fmt: skip


@pytest.mark.check("arch.pmi_sampling")
def test_pmi_sampling(profile_run, host_load, check):
    """Fixed-period sampling: one sample per period, each with a PMI, IPs in the loop, nothing lost (SKIP when the
    guest or host kernel throttled the PMIs)."""
    records = counters(profile_run)
    check.judge(arch_counters.pmi_sampling(profile_run.pmu_expectation(), profile_run.view, records, profile_run.host,
                                      contention(profile_run, host_load)),
                [r for r in records if r["kind"] in ("sampling", "sampling_setup")])  # fmt: skip
