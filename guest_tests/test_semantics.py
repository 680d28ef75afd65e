"""Counter semantics kvm-unit-tests x86/pmu.c and the KVM selftests assert at the register level, checked from a
Linux guest through /dev/cpu/N/msr on an idle guest PMU (guest_tests/probes/semantics.c.j2): overflow of every
counter, WRMSR to a running counter, every counter at once, fixed counters that do not exist, guest writes to
IA32_PERF_CAPABILITIES, AMD's K7 aliases. Rules and sources: harness/judge/semantics.py. Without a vPMU every
check SKIPs with the reason the expectation engine gives, before the probe runs.
"""

from __future__ import annotations

import pytest

from harness.judge import bounds, coexist
from harness.judge import semantics as semantics_verdicts
from harness.probe.params import semantics_params
from harness.suite.profile_run import ProfileRun

pytestmark = [pytest.mark.feature("arch_counters"), pytest.mark.requires_pmu, pytest.mark.expects("pmu")]


def semantics(run: ProfileRun) -> list[dict]:
    """The semantics probe's records (one run per guest and load, shared by every check); not run when the guest
    enumerates no PMU (nothing to program)."""
    if not run.view.cpuid_pmu:
        return []
    return run.probe("semantics", semantics_params(run.view, run.host)).records


def errata(run: ProfileRun) -> bounds.OvercountErrata:
    return bounds.overcount_errata(run.view.caps, (run.host.get("cpu") or {}).get("caps"))


def contention(run: ProfileRun, host_load) -> str | None:
    return coexist.perf_based_contention(host_load.spec if host_load else None, run.host.get("vpmu_mode"))


def kinds(records: list[dict], *names: str) -> list[dict]:
    return [r for r in records if r.get("kind") in names]


@pytest.mark.check("arch.overflow_every_counter")
def test_overflow_every_counter(profile_run, host_load, check):
    """Every GP counter and fixed counter 0 wrap exactly once to 1; GLOBAL_STATUS gets its bit, and the clear MSR
    clears exactly that bit."""
    records = semantics(profile_run)
    check.judge(semantics_verdicts.overflow_every_counter(profile_run.pmu_expectation(), profile_run.view, records,
                                                          errata(profile_run), contention(profile_run, host_load)),
                kinds(records, "overflow"))  # fmt: skip


@pytest.mark.check("arch.running_write")
def test_running_write(profile_run, host_load, check):
    """WRMSR 0 to a running counter resets it; WRMSR -1 to a running counter makes it wrap with its status bit set."""
    records = semantics(profile_run)
    check.judge(semantics_verdicts.running_write(profile_run.pmu_expectation(), profile_run.view, records,
                                                 errata(profile_run), contention(profile_run, host_load)),
                kinds(records, "running_write", "running_overflow"))  # fmt: skip


@pytest.mark.check("arch.all_counters")
def test_all_counters(profile_run, host_load, check):
    """Every GP counter with a different architectural event plus every fixed counter, all in one window, each within
    its own bounds."""
    records = semantics(profile_run)
    check.judge(semantics_verdicts.all_counters(profile_run.pmu_expectation(), profile_run.view, records,
                                                errata(profile_run), profile_run.host,
                                                contention(profile_run, host_load)),
                kinds(records, "all_counters"))  # fmt: skip


@pytest.mark.intel
@pytest.mark.check("arch.fixed_absent")
def test_fixed_absent(profile_run, check):
    """Enabling a fixed counter the guest does not have (FIXED_CTR_CTRL, GLOBAL_CTRL) #GPs, and so does its MSR
    (KST guest_test_fixed_counters() and guest_rd_wr_counters())."""
    records = semantics(profile_run)
    check.judge(semantics_verdicts.fixed_absent(profile_run.pmu_expectation(), profile_run.view, records,
                                                profile_run.expectation("pmu_msrs_fault")),
                kinds(records, "fixed_absent"))  # fmt: skip


@pytest.mark.intel("IA32_PERF_CAPABILITIES is Intel-only")
@pytest.mark.expects("pmu", "pmu_msrs_fault")
@pytest.mark.check("arch.perfcap_write")
def test_perfcap_write(profile_run, check):
    """A guest WRMSR to IA32_PERF_CAPABILITIES #GPs and leaves the value unchanged (SKIP with kvm.ignore_msrs=Y)."""
    records = semantics(profile_run)
    check.judge(semantics_verdicts.perfcap_write(profile_run.pmu_expectation(), profile_run.view, records,
                                                 profile_run.expectation("pmu_msrs_fault")),
                kinds(records, "perfcap_write", "perfcap_after"))  # fmt: skip


@pytest.mark.amd("the K7 legacy counter MSRs are AMD's")
@pytest.mark.check("arch.k7_alias")
def test_k7_alias(profile_run, check):
    """With PerfCtrExtCore the K7 MSRs alias F15H counters 0-3: a write through one name reads back through the
    other."""
    records = semantics(profile_run)
    check.judge(semantics_verdicts.k7_alias(profile_run.pmu_expectation(), profile_run.view, records),
                kinds(records, "alias"))  # fmt: skip


@pytest.mark.check("arch.event_filters")
def test_event_filters(profile_run, host_load, check):
    """EVTSEL USR/OS, CMASK, INV and EDGE over the user-mode loop, four counters in one window."""
    records = semantics(profile_run)
    check.judge(semantics_verdicts.event_filters(profile_run.pmu_expectation(), profile_run.view, records,
                                                 errata(profile_run), profile_run.host,
                                                 contention(profile_run, host_load)),
                kinds(records, "filters"))  # fmt: skip


@pytest.mark.check("arch.rdpmc_fast")
def test_rdpmc_fast(profile_run, check):
    """RDPMC with ECX[31] ("fast") #GPs (Linux >= 6.9, mediated vPMU) or, on older KVM, returns bits 31:0; fixed
    counter 0 keeps the full-width value written to it."""
    records = semantics(profile_run)
    check.judge(semantics_verdicts.rdpmc_fast(profile_run.pmu_expectation(), profile_run.view, records,
                                              profile_run.host),
                kinds(records, "rdpmc_fast"))  # fmt: skip


@pytest.mark.check("arch.emulated_cpuid")
def test_emulated_cpuid(profile_run, host_load, check):
    """A user-mode CPUID loop (every CPUID exits to KVM) counts its instructions and branches exactly: counting
    survives VM exits (SKIP on hosts before Linux 5.17, which did not count skipped instructions)."""
    records = semantics(profile_run)
    check.judge(semantics_verdicts.emulated_cpuid(profile_run.pmu_expectation(), profile_run.view, records,
                                                  errata(profile_run), profile_run.host,
                                                  contention(profile_run, host_load)),
                kinds(records, "cpuid_loop"))  # fmt: skip


@pytest.mark.check("arch.branch_miss_floor")
def test_branch_miss_floor(profile_run, host_load, check):
    """Conditional branches on pseudo-random bits mispredict: branch misses >= N/20 (and <= the branches)."""
    records = semantics(profile_run)
    check.judge(semantics_verdicts.branch_miss_floor(profile_run.pmu_expectation(), profile_run.view, records,
                                                     errata(profile_run), contention(profile_run, host_load)),
                kinds(records, "branch_misses"))  # fmt: skip


@pytest.mark.check("arch.emulated_fep")
def test_emulated_fep(profile_run, host_load, check):
    """Instructions KVM emulates behind the forced-emulation prefix are counted exactly (SKIP unless the host sets
    kvm.force_emulation_prefix)."""
    records = semantics(profile_run)
    check.judge(semantics_verdicts.emulated_fep(profile_run.pmu_expectation(), profile_run.view, records,
                                                errata(profile_run), profile_run.host,
                                                contention(profile_run, host_load)),
                kinds(records, "fep_loop"))  # fmt: skip


@pytest.mark.intel("IN_TX / IN_TXCP are Intel's")
@pytest.mark.check("arch.tsx_cycles")
def test_tsx_cycles(profile_run, host_load, check):
    """With RTM in the guest and transactions that reach their xabort: IN_TX (GP0) and IN_TXCP (GP2) cycles count
    within the transactional and non-transactional shares of plain cycles (GP1); SKIP when no transaction ran."""
    records = semantics(profile_run)
    check.judge(semantics_verdicts.tsx_cycles(profile_run.pmu_expectation(), profile_run.view, records,
                                              contention(profile_run, host_load)),
                kinds(records, "tsx"))  # fmt: skip


@pytest.mark.intel("IA32_MISC_ENABLE's PEBS bit is Intel's")
@pytest.mark.check("arch.misc_enable_pebs")
def test_misc_enable_pebs(profile_run, check):
    """Where the guest enumerates PEBS, IA32_MISC_ENABLE.PEBS_UNAVAIL (bit 12) is clear (the VMM's setting since
    Linux 6.0, KVM's before)."""
    records = semantics(profile_run)
    check.judge(semantics_verdicts.misc_enable_pebs(profile_run.pmu_expectation(), profile_run.view, records,
                                                    profile_run.host),
                kinds(records, "misc_enable"))  # fmt: skip
