"""Enumeration: what the guest's CPUID, MSRs and kernel say about its PMU, against what is expected.

These hold (and PASS) under TCG too where TCG defines the answer, e.g. a guest with pmu=off sees no PMU.
"""

from __future__ import annotations

import pytest

from harness.judge import enumeration

pytestmark = pytest.mark.feature("enumeration")


@pytest.mark.expects("pmu_off_judged")
@pytest.mark.check("enum.pmu_visible")
def test_pmu_visible(profile_run, check):
    """CPUID (0AH on Intel, 80000001H/80000022H on AMD) and the guest kernel show a PMU iff one is expected (SKIP
    where the profile's pmu=off does not reach KVM: the pmu_off_honoured expectation)."""
    view = profile_run.view
    verdict = enumeration.pmu_visible(profile_run.pmu_expectation(), view, profile_run.expectation("pmu_off_honoured"))
    check.judge(verdict, view.records)


@pytest.mark.expects("pmu_absent", "pmu_off_judged", "pmu_msrs_fault")
@pytest.mark.check("enum.pmu_msrs_fault")
def test_pmu_msrs_fault_without_pmu(profile_run, check):
    """With no vPMU, counter MSRs outside KVM's legacy compat set raise #GP (SKIP where the profile's pmu=off does not
    reach KVM: the pmu_off_honoured expectation)."""
    view = profile_run.view
    verdict = enumeration.pmu_msrs_fault(profile_run.pmu_expectation(), profile_run.expectation("pmu_msrs_fault"), view,
                                      profile_run.expectation("pmu_off_honoured"))  # fmt: skip
    check.judge(verdict, view.records)


@pytest.mark.intel("IA32_PERF_CAPABILITIES is Intel-only")
@pytest.mark.expects("pmu_msrs_fault")
@pytest.mark.check("enum.perf_capabilities")
def test_perf_capabilities(profile_run, check):
    """IA32_PERF_CAPABILITIES exists exactly when CPUID.1:ECX.PDCM says so; its value is decoded and recorded."""
    view = profile_run.view
    verdict = enumeration.perf_capabilities(
        profile_run.pmu_expectation(), profile_run.expectation("pmu_msrs_fault"), view
    )
    check.judge(verdict, view.records)


@pytest.mark.expects("host_cpu_model")
@pytest.mark.check("enum.guest_within_host")
def test_guest_within_host(profile_run, check, host_facts):
    """The guest's PMU enumeration never exceeds the host's, nor KVM's limits (version <= 2, <= 8 GP, <= 3 fixed)."""
    view = profile_run.view
    verdict = enumeration.guest_within_host(
        profile_run.accel, profile_run.pmu_expectation(), view, host_facts["cpu"].get("caps"),
        kvm_offer=host_facts.get("kvm_offer"), vpmu_mode=host_facts.get("vpmu_mode"),
    )  # fmt: skip
    check.judge(verdict, view.records)
