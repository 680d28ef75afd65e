"""Co-existence in depth: a host load that exists before KVM creates the VM, the VM-exit cost of host
multiplexing, and host loads bound to one vCPU (verdicts: harness/judge/coexist_depth.py;
the sweep: harness/suite/mux_sweep.py).

Each check decides what it cannot judge before it measures (the same reasons as its ``expects`` pre-gate), so
``python -m harness plan`` and ``rejudge`` agree with the run.
"""

from __future__ import annotations

import pytest

from harness.judge import coexist, coexist_depth
from harness.judge.bounds import overcount_errata
from harness.probe.params import counters_params
from harness.suite import mux_sweep
from harness.suite.profile_run import ProfileRun

pytestmark = pytest.mark.feature("coexistence")
#: The vCPUs the per-vCPU canary runs on (a profile with fewer SKIPs the rest: the two_vcpus pre-gate).
VCPUS = (0, 1)


def _errata(run: ProfileRun):
    return overcount_errata(run.view.caps, (run.host.get("cpu") or {}).get("caps"))


@pytest.mark.expects("host_load")
@pytest.mark.check("coexist.load_before_boot")
def test_load_before_boot(profile_run, host_load, check):
    """A load started before the VM: the mediated vPMU refuses VM creation (EBUSY) under an include-guest one;
    otherwise the guest boots under it."""
    verdict = coexist_depth.load_before_boot(host_load.spec, host_load.result,
                                             coexist.mediated_pmu_holder(profile_run.ctx))  # fmt: skip
    check.judge(verdict, [host_load.result.to_json()])


@pytest.mark.requires_pmu
@pytest.mark.expects("host_load", "pmu")
@pytest.mark.check("coexist.mux_cost")
def test_mux_cost(profile_run, host_load, check):
    """Sweep perf_event_mux_interval_ms under a multiplexing host load: guest counts exact at every setting, the
    exits/s curve reported and a rise beyond the threshold flagged; the original value restored."""
    view, expectation = profile_run.view, profile_run.pmu_expectation()
    verdict = coexist_depth.mux_cost_gate(host_load.spec, expectation, view, profile_run.host)
    if verdict:
        check.judge(verdict)  # a SKIP (or the gate's FAIL) ends the check here
        return
    params = counters_params(view, profile_run.host)
    sweep = host_load.read("mux_sweep", lambda: mux_sweep.measure(profile_run, host_load, params))
    canaries = {point["interval_ms"]: profile_run.probe("counters", params, key=point["canary_key"]).records
                for point in sweep.get("points", []) if not point.get("error")}  # fmt: skip
    idle = profile_run.cached_probe("idle", "counters")
    contention = coexist.perf_based_contention(host_load.spec, profile_run.host.get("vpmu_mode"))
    verdict = coexist_depth.mux_cost(host_load.spec, expectation, view, sweep, canaries, idle.records if idle else None,
                                     host_load.result, _errata(profile_run), contention)  # fmt: skip
    check.judge(verdict, [{**r, "mux_interval_ms": ms} for ms, records in canaries.items() for r in records
                          if r.get("event") == "instructions"])  # fmt: skip


@pytest.mark.requires_pmu
@pytest.mark.expects("pmu", "two_vcpus")
@pytest.mark.check("coexist.vcpu_canary.{vcpu}")
@pytest.mark.parametrize("vcpu", VCPUS)
def test_vcpu_canary(profile_run, host_load, check, vcpu):
    """The exact-count canary on each vCPU: the one a per-vCPU load reaches and the one it does not are judged
    separately, and the load must not disturb the other's counts."""
    view, expectation, ctx = profile_run.view, profile_run.pmu_expectation(), profile_run.ctx
    verdict = coexist_depth.vcpu_gate(ctx, expectation, view)
    if verdict:
        check.judge(verdict)  # a SKIP (or the gate's FAIL) ends the check here
        return
    params = counters_params(view, profile_run.host)
    key = coexist_depth.vcpu_probe_key(vcpu)
    records = profile_run.probe("counters", params, key=key, cpu=vcpu).records
    idle = profile_run.cached_probe("idle", key)
    verdict = coexist_depth.vcpu_canary(vcpu, ctx, expectation, view, records, idle.records if idle else None,
                                        host_load.spec if host_load else None, host_load.result if host_load else None,
                                        profile_run.pinning, _errata(profile_run))  # fmt: skip
    check.judge(verdict, [r for r in records if r.get("event") == "instructions" or r.get("kind") == "pin"])
