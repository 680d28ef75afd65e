"""Co-existence: every check group runs while a host perf load runs; these checks measure what the load did.

The load is started by the harness before the group's first check and stopped after its last (host_load
fixture); the checks here judge the load itself, the exact-count canary against the idle run, and guest-visible
multiplexing. The architectural checks of the same group run under the same load with unchanged tolerances.
"""

from __future__ import annotations

import pytest

from harness.judge import coexist
from harness.judge.bounds import overcount_errata
from harness.probe.params import counters_params
from harness.suite.profile_run import ProfileRun

pytestmark = pytest.mark.feature("coexistence")


def counters(run: ProfileRun) -> list[dict]:
    """The same counters probe run as the arch checks (same parameters, so one run serves both)."""
    return run.probe("counters", counters_params(run.view, run.host)).records


@pytest.mark.expects("host_load")
@pytest.mark.check("coexist.host_load")
def test_host_load(profile_run, host_load, check):
    """The host load runs and counts (or, when this run's VM holds a mediated PMU, an include-guest load is
    refused)."""
    # host_load is None only for a profile that cannot run here, and `check` has skipped that already.
    ctx = profile_run.ctx  # the run's accelerator, profile and host facts (the stored ones under rejudge)
    verdict = coexist.host_load(host_load.spec, host_load.result, ctx.host.get("vpmu_mode"), host_load.snapshot(),
                                coexist.mediated_pmu_holder(ctx))  # fmt: skip
    check.judge(verdict, [host_load.result.to_json()])


@pytest.mark.requires_pmu
@pytest.mark.expects("pmu")
@pytest.mark.check("coexist.canary")
def test_exact_count_canary(profile_run, host_load, check):
    """The loop's exact user-mode instruction count holds on every counter under this load (and equals idle)."""
    records = counters(profile_run)
    idle = profile_run.cached_probe("idle", "counters")
    exits_now = profile_run.vm_exits()
    before = host_load.exits_before if host_load else None
    during = exits_now - before if exits_now is not None and before is not None else None
    elapsed = host_load.elapsed_s() if host_load else 0.0
    vm_exits = {"total": exits_now, "during_group": during,
                "per_s": round(during / elapsed, 1) if during is not None and elapsed > 0 else None}  # fmt: skip
    errata = overcount_errata(profile_run.view.caps, (profile_run.host.get("cpu") or {}).get("caps"))
    contention = coexist.perf_based_contention(host_load.spec if host_load else None,
                                               profile_run.host.get("vpmu_mode"))  # fmt: skip
    verdict = coexist.canary(profile_run.pmu_expectation(), profile_run.view, records,
                             idle.records if idle else None, host_load.result if host_load else None, vm_exits,
                             errata, contention=contention)  # fmt: skip
    check.judge(verdict, [r for r in records if r.get("event") == "instructions"])


@pytest.mark.requires_pmu
@pytest.mark.expects("pmu")
@pytest.mark.check("coexist.guest_multiplexing")
def test_no_guest_visible_multiplexing(profile_run, host_load, check):
    """With no more guest events than counters, the guest never sees time_running < time_enabled."""
    records = counters(profile_run)
    check.judge(coexist.guest_multiplexing(profile_run.pmu_expectation(), profile_run.view, records),
                [r for r in records if r.get("kind") == "count"])  # fmt: skip
