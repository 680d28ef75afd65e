"""AMD IBS in the guest: enumeration, and op / fetch sampling decoded from the raw IBS register dump.
Mainline KVM exposes no IBS; the VIBS series builds on the mediated vPMU."""

from __future__ import annotations

import pytest

from harness.judge import ibs
from harness.probe.params import ibs_params
from harness.suite.profile_run import ProfileRun

pytestmark = [pytest.mark.feature("ibs"), pytest.mark.amd]


def records(run: ProfileRun) -> list[dict]:
    sysfs = run.view.sysfs
    if "ibs_op/type" not in sysfs or "ibs_fetch/type" not in sysfs:
        return []
    return run.probe("ibs", ibs_params(sysfs)).records


@pytest.mark.check("ibs.enumeration")
def test_enumeration(profile_run, check):
    """CPUID and the guest kernel's ibs_op/ibs_fetch PMUs show IBS exactly when expected."""
    view = profile_run.view
    check.judge(ibs.ibs_enumeration(profile_run.expectation("amd_ibs"), view), view.records)


@pytest.mark.requires_pmu
@pytest.mark.expects("amd_ibs")
@pytest.mark.check("ibs.{pmu}_sampling")
@pytest.mark.parametrize("pmu", ["ibs_op", "ibs_fetch"])
def test_sampling(profile_run, check, pmu):
    """Valid IBS samples whose addresses fall in the loop; the sample IP equals IbsOpRip / IbsFetchLinAd. Opened per
    task, or CPU-wide filtered by the probe's TID on guest kernels before 6.2 (no per-task IBS there)."""
    found = records(profile_run)
    check.judge(ibs.ibs_sampling(profile_run.expectation("amd_ibs"), profile_run.view, found, pmu),
                [r for r in found if r.get("pmu") == pmu])  # fmt: skip
