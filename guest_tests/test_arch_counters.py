"""Architectural counters, measured in the guest as kvm-unit-tests x86/pmu.c measures them on bare metal.

Counting goes through perf_event_open with raw configs (one group per event, one copy per counter) and, for
register semantics, through /dev/cpu/N/msr on an idle PMU. Exact expectations come from the generated loop
(harness/workloads.py). Without a vPMU every check SKIPs with the reason the expectation engine gives.
"""

from __future__ import annotations

import pytest

from harness import verdicts
from harness.probe_params import ARCH_EVENTS, counters_params, msr_params
from harness.profile_run import ProfileRun

pytestmark = [pytest.mark.feature("arch_counters"), pytest.mark.requires_pmu]
GP_EVENTS = list(ARCH_EVENTS)


def counters(run: ProfileRun) -> list[dict]:
    """The counters probe's records (one run per guest, shared by every check)."""
    return run.probe("counters", counters_params(run.view)).records


def msr_records(run: ProfileRun) -> list[dict]:
    """The msr probe's records; not run when the guest enumerates no PMU (nothing to program)."""
    if not run.view.cpuid_pmu:
        return []
    return run.probe("msr", msr_params(run.view)).records


def errata(run: ProfileRun) -> bool:
    return verdicts.overcount_errata(run.view.caps)


@pytest.mark.check("arch.gp.{event}")
@pytest.mark.parametrize("event", GP_EVENTS)
def test_gp_event(profile_run, check, event):
    """Every GP counter counts the event over the loop within its bounds (exact for instructions/branches)."""
    records = counters(profile_run)
    verdict = verdicts.gp_event(profile_run.pmu_expectation(), profile_run.view, records, event, errata(profile_run))
    check.judge(verdict, [r for r in records if r.get("event") == event])


@pytest.mark.intel
@pytest.mark.check("arch.fixed.{index}")
@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_fixed_counter(profile_run, check, index):
    """Fixed counter i counts its event (0 instructions, 1 cycles, 2 ref cycles, 3 slots) on the fixed counter."""
    records = counters(profile_run)
    verdict = verdicts.fixed_counter(profile_run.pmu_expectation(), profile_run.view, records, index,
                                     errata(profile_run))  # fmt: skip
    check.judge(verdict, [r for r in records if r.get("event") == f"fixed{index}"])


@pytest.mark.check("arch.disabled")
def test_disabled_counter_does_not_count(profile_run, check):
    """A never-enabled perf event, a counter with EN=0 and one with its GLOBAL_CTRL bit clear all stay at 0."""
    records, msr = counters(profile_run), msr_records(profile_run)
    check.judge(verdicts.disabled_no_count(profile_run.pmu_expectation(), profile_run.view, records, msr),
                [r for r in records + msr if r["kind"] in ("disabled", "disabled_sel", "disabled_global")])  # fmt: skip


@pytest.mark.check("arch.counter_width")
def test_counter_width(profile_run, check):
    """Legacy writes sign-extend bit 31, full-width writes keep the width and #GP above it, fixed writes keep it."""
    msr = msr_records(profile_run)
    check.judge(verdicts.counter_width(profile_run.pmu_expectation(), profile_run.view, msr),
                [r for r in msr if r["kind"].startswith("width")])  # fmt: skip


@pytest.mark.check("arch.msr_bounds")
def test_msr_bounds(profile_run, check):
    """Counter MSRs beyond the enumerated number #GP."""
    msr = msr_records(profile_run)
    check.judge(verdicts.msr_bounds(profile_run.pmu_expectation(), profile_run.view, msr),
                [r for r in msr if r["kind"] == "bounds"])  # fmt: skip


@pytest.mark.check("arch.rdpmc")
def test_rdpmc(profile_run, check):
    """RDPMC agrees with RDMSR (GP, and fixed with ECX bit 30) and with perf's user page; a bad index #GPs."""
    records, msr = counters(profile_run), msr_records(profile_run)
    check.judge(verdicts.rdpmc(profile_run.pmu_expectation(), profile_run.view, records, msr),
                [r for r in records + msr if r["kind"].startswith("rdpmc")])  # fmt: skip


@pytest.mark.check("arch.exact_global_ctrl")
def test_exact_global_ctrl(profile_run, check):
    """Counters enabled only through GLOBAL_CTRL count the loop exactly (the analogue of KUT's 10N+17)."""
    msr = msr_records(profile_run)
    check.judge(verdicts.exact_global_ctrl(profile_run.pmu_expectation(), profile_run.view, msr, errata(profile_run)),
                [r for r in msr if r["kind"] == "enabled"])  # fmt: skip


@pytest.mark.check("arch.overflow_status")
def test_overflow_status(profile_run, check):
    """Overflow sets GLOBAL_STATUS bit 0; writing the clear MSR clears it."""
    msr = msr_records(profile_run)
    check.judge(verdicts.overflow_status(profile_run.pmu_expectation(), profile_run.view, msr),
                [r for r in msr if r["kind"] == "overflow"])  # fmt: skip


@pytest.mark.check("arch.pmi_sampling")
def test_pmi_sampling(profile_run, check):
    """Fixed-period sampling: one sample per period, each with a PMI, IPs in the loop, nothing lost."""
    records = counters(profile_run)
    check.judge(verdicts.pmi_sampling(profile_run.pmu_expectation(), profile_run.view, records),
                [r for r in records if r["kind"] == "sampling"])  # fmt: skip
