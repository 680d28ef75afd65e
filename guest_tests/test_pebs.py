"""PEBS: format and precise_ip levels on a load event whose only load instruction is known, load-latency
sampling, and adaptive PEBS staying hidden while KVM disallows it."""

from __future__ import annotations

import pytest

from harness.judge import guest_kernel, pebs
from harness.probe.params import LDLAT, pebs_params
from harness.suite.profile_run import ProfileRun

pytestmark = [pytest.mark.feature("pebs"), pytest.mark.intel]


def records(run: ProfileRun) -> list[dict]:
    level = pebs.max_precise(run.view)
    return run.probe("pebs", pebs_params(level)).records if level else []


@pytest.mark.check("pebs.enumeration")
def test_enumeration(profile_run, check):
    """PEBS (DS, format >= 4, max_precise >= 1) appears exactly when expected."""
    view = profile_run.view
    release = guest_kernel.guest_kernel_release(profile_run)
    check.judge(pebs.pebs_enumeration(profile_run.expectation("pebs"), view, release), view.records)


@pytest.mark.expects("pmu")
@pytest.mark.check("pebs.no_adaptive")
def test_adaptive_pebs_hidden(profile_run, check):
    """PERF_CAPABILITIES[14] (baseline) stays clear while KVM disallows adaptive PEBS."""
    view = profile_run.view
    check.judge(pebs.pebs_no_adaptive(profile_run.pmu_expectation(), profile_run.expectation("pebs_adaptive"), view),
                view.records)  # fmt: skip


@pytest.mark.requires_pmu
@pytest.mark.expects("pebs")
@pytest.mark.check("pebs.precise_ip.{level}")
@pytest.mark.parametrize("level", [1, 2, 3])
def test_precise_ip(profile_run, host_load, check, level):
    """Sampled IPs land where the guest kernel puts them (pebs.pebs_ip_model): the load on PEBS format
    >= 4 without baseline (every KVM guest) and for precise_ip >= 2, the instruction after it for precise_ip=1 on
    format <= 3 or with baseline; a throttled event SKIPs, and so does a sample shortfall under a host load that
    uses the PMU (the host may switch guest PEBS off, pebs.pebs_competing_load)."""
    found = records(profile_run)
    check.judge(pebs.pebs_precise(profile_run.expectation("pebs"), profile_run.view, found, level,
                                host_load.spec if host_load else None, guest_kernel.guest_kernel_release(profile_run)),
                [r for r in found if r.get("precise_ip") == level])  # fmt: skip


@pytest.mark.requires_pmu
@pytest.mark.expects("pebs_ldlat")
@pytest.mark.check("pebs.ldlat")
def test_load_latency(profile_run, host_load, check):
    """mem-loads with ldlat: data addresses in the probe's buffer, weight >= ldlat."""
    found = records(profile_run)
    check.judge(pebs.pebs_ldlat(profile_run.expectation("pebs_ldlat"), profile_run.view, found, LDLAT,
                              host_load.spec if host_load else None, guest_kernel.guest_kernel_release(profile_run)),
                [r for r in found if r.get("kind") == "ldlat"])  # fmt: skip
