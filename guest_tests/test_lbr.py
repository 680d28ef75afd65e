"""LBR: legacy (PERF_CAPABILITIES[5:0]) and architectural (CPUID.1CH), exercised through perf branch stacks over a
known call chain. KVM gives legacy LBR only on legacy-LBR hosts with the host's CPU model and format; arch LBR not
at all upstream."""

from __future__ import annotations

import pytest

from harness.judge import guest_kernel, lbr
from harness.probe.params import lbr_params
from harness.suite.profile_run import ProfileRun

pytestmark = [pytest.mark.feature("lbr"), pytest.mark.intel]


def expectation(run: ProfileRun):
    return lbr.lbr_expectation(run.expectation("legacy_lbr"), run.expectation("arch_lbr"))


WORKLOAD_FUNCTIONS = ("vpmu_chain", "vpmu_f1", "vpmu_f2", "vpmu_f3")


def records(run: ProfileRun) -> list[dict]:
    return run.probe("lbr", lbr_params()).records if lbr.lbr_depth(run.view) else []


def branches(run: ProfileRun):
    """The workload's branch instructions, from objdump of the very binary that ran in the guest."""
    if not lbr.lbr_depth(run.view):
        return None
    return run.branch_map("lbr", WORKLOAD_FUNCTIONS, lbr_params())


@pytest.mark.check("lbr.legacy_enumeration")
def test_legacy_enumeration(profile_run, check):
    """A legacy LBR format and depth appear exactly when expected."""
    view = profile_run.view
    check.judge(lbr.legacy_lbr_enumeration(profile_run.expectation("legacy_lbr"), view,
                                          guest_kernel.guest_kernel_release(profile_run)), view.records)  # fmt: skip


@pytest.mark.check("lbr.arch_enumeration")
def test_arch_enumeration(profile_run, check):
    """Arch LBR (CPUID.07H:EDX[19], leaf 1CH) appears exactly when expected; the kernel's depth is enumerated."""
    view = profile_run.view
    check.judge(lbr.arch_lbr_enumeration(profile_run.expectation("arch_lbr"), view), view.records)


@pytest.mark.requires_pmu
@pytest.mark.expects("lbr")
@pytest.mark.check("lbr.records")
def test_branch_records(profile_run, check):
    """ANY|USER stacks hold only the probe's own branches and reach the enumerated depth."""
    found = records(profile_run)
    check.judge(lbr.lbr_records(expectation(profile_run), profile_run.view, found, branches(profile_run),
                               guest_kernel.guest_kernel_release(profile_run)), found)  # fmt: skip


@pytest.mark.requires_pmu
@pytest.mark.expects("lbr")
@pytest.mark.check("lbr.call_stack")
def test_call_stack(profile_run, check):
    """CALL_STACK mode inside f3 shows the calls f2->f3, f1->f2, loop->f1."""
    found = records(profile_run)
    check.judge(lbr.lbr_call_stack(expectation(profile_run), profile_run.view, found,
                                  guest_kernel.guest_kernel_release(profile_run)), found)  # fmt: skip
