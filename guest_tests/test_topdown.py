"""Topdown (Intel perf metrics): fixed counter 3 (slots) and PERF_METRICS, read as a slots-led group.

The perf-based vPMU exposes neither (KVM clamps fixed counters to 3); guest topdown exists only with the mediated
vPMU plus a 2026 series, so today these checks SKIP with that reason and the enumeration check holds the guest to
showing nothing.
"""

from __future__ import annotations

import pytest

from harness.judge import guest_kernel, topdown
from harness.probe.params import topdown_params
from harness.suite.profile_run import ProfileRun

pytestmark = [pytest.mark.feature("topdown"), pytest.mark.intel]


def records(run: ProfileRun) -> list[dict]:
    """The topdown probe runs only when the guest enumerates topdown and its kernel registered the topdown events
    (otherwise the group cannot be opened, or its raw metric events are not metric events)."""
    return run.probe("topdown", topdown_params()).records if topdown.topdown_usable(run.view) else []


@pytest.mark.check("topdown.enumeration")
def test_enumeration(profile_run, check):
    """FC3 and PERF_CAPABILITIES[15] come together, and only when topdown is expected."""
    check.judge(
        topdown.topdown_enumeration(profile_run.expectation("topdown"), profile_run.view), profile_run.view.records
    )


@pytest.mark.requires_pmu
@pytest.mark.expects("topdown")
@pytest.mark.check("topdown.metrics")
def test_metrics_add_up(profile_run, check):
    """Each level-1 metric is a fraction of slots in [0, 1]; the four sum to slots within 2 %."""
    found = records(profile_run)
    check.judge(topdown.topdown_metrics(profile_run.expectation("topdown"), profile_run.view, found,
                                   guest_kernel.guest_kernel_release(profile_run)), found)  # fmt: skip


@pytest.mark.requires_pmu
@pytest.mark.expects("topdown")
@pytest.mark.check("topdown.width")
def test_slots_per_cycle(profile_run, check):
    """slots/cycles is the core's pipeline width (host CPU model), or between width/2 and width with a busy SMT
    sibling, which only the host can know about (then SKIP)."""
    found = records(profile_run)
    check.judge(topdown.topdown_width(profile_run.expectation("topdown"), profile_run.view, found, profile_run.host,
                                 guest_kernel.guest_kernel_release(profile_run)), found)  # fmt: skip


@pytest.mark.requires_pmu
@pytest.mark.expects("topdown")
@pytest.mark.check("topdown.workloads")
def test_workload_shapes(profile_run, check):
    """A cache-resident ALU loop is mostly retiring; a 64 MiB pointer chase is mostly backend bound."""
    found = records(profile_run)
    check.judge(topdown.topdown_workloads(profile_run.expectation("topdown"), profile_run.view, found,
                                     guest_kernel.guest_kernel_release(profile_run)), found)  # fmt: skip


@pytest.mark.requires_pmu
@pytest.mark.expects("topdown")
@pytest.mark.check("topdown.rdpmc")
def test_rdpmc_metrics(profile_run, check):
    """RDPMC with ECX bit 29 returns PERF_METRICS (bytes sum to 0xff) when allowed; a control RDPMC of fixed counter 3
    in the same task tells a guest kernel without user RDPMC (not-allowed) from a refused metrics index (kvm-limit)."""
    found = records(profile_run)
    check.judge(topdown.topdown_rdpmc(profile_run.expectation("topdown"), profile_run.view, found,
                                 guest_kernel.guest_kernel_release(profile_run)), found)  # fmt: skip
