"""Enumeration verdicts (guest_tests/test_enumeration.py): does the guest see the PMU it was given, and no more?

CPUID leaf 0xA / AMD PerfMonV2 leaves against what the host and KVM offer, the PMU MSRs a PMU-less guest must not
reach, IA32_PERF_CAPABILITIES, and the guest within the host's bounds.
"""

from __future__ import annotations

from typing import Any

from harness.judge.expectations import Expectation
from harness.judge.verdict import Verdict, errored, failed, passed, skipped
from harness.probe.guest_view import NO_PMU_FAULTING_MSRS, GuestView

#: The reason prefix of a PMU expectation that is unmet only because the profile turns the PMU off
#: (expectations._profile_pmu: "profile: NAME sets pmu=off" or a model whose pmu defaults to off). The rule's
#: earlier needs (accel_kvm, kvm_enable_pmu, host_pmu, ...) all held, so KVM would otherwise give a vPMU.
PROFILE_PREFIX = "profile:"


def pmu_off_unjudgeable(pmu: Expectation, pmu_off: Expectation | None) -> Expectation | None:
    """The ``pmu_off_honoured`` expectation when it makes a "no PMU" check unjudgeable here, else None.

    A profile's pmu=off reaches KVM only as CPUID: on Intel a zero CPUID.0AH gives KVM PMU version 0
    (arch/x86/kvm/vmx/pmu_intel.c intel_pmu_refresh()), but AMD has no CPUID bit for the four legacy K7 counters,
    KVM's amd_pmu_refresh() (arch/x86/kvm/svm/pmu.c) gives them whatever CPUID says, and only
    KVM_CAP_PMU_CAPABILITY(KVM_PMU_CAP_DISABLE) removes them, which released QEMUs do not set for pmu=off. The data
    file says when that is so (kvm_features.toml [pmu_off_honoured], condition pmu_off_reaches_kvm), with its reason;
    it applies only when the profile's pmu=off is what makes the PMU unexpected (PROFILE_PREFIX).
    """
    if pmu.available or pmu_off is None or pmu_off.available or not pmu.reason.startswith(PROFILE_PREFIX):
        return None
    return pmu_off


def pmu_visible(expectation: Expectation, view: GuestView, pmu_off: Expectation | None = None) -> Verdict:
    """CPUID and the guest kernel show a PMU exactly when one is expected.

    When the profile's pmu=off does not reach KVM on this host (``pmu_off``, the pmu_off_honoured expectation: AMD
    keeps KVM's legacy counters whatever QEMU does to CPUID), what the guest shows is not the profile's to promise:
    SKIP with the data file's reason, the guest's view kept as the observation (pmu_off_unjudgeable).
    """
    observed = {"cpuid_pmu": view.cpuid_pmu, "kernel_pmus": view.kernel_pmus, "banner": view.kernel_banner}
    if expectation.available:
        if not view.cpuid_pmu:
            return failed(f"{expectation.feature} expected but guest CPUID enumerates no PMU", True, observed)
        if not view.kernel_pmu:
            return failed(f"guest CPUID enumerates a PMU but the guest kernel registered none: {view.kernel_banner}",
                          True, observed)  # fmt: skip
        return passed("guest CPUID and kernel show the vPMU", True, observed)
    unjudgeable = pmu_off_unjudgeable(expectation, pmu_off)
    if unjudgeable is not None:
        return skipped(unjudgeable.reason, False, observed)
    if view.cpuid_pmu or view.kernel_pmu:
        return failed(f"guest sees a PMU although none is expected ({expectation.reason})", False, observed)
    return passed(f"no PMU visible, as expected ({expectation.reason})", False, observed)


def pmu_msrs_fault(
    pmu: Expectation, faults: Expectation, view: GuestView, pmu_off: Expectation | None = None
) -> Verdict:
    """Without a vPMU, PMU MSR reads must #GP (EIO through /dev/cpu/N/msr).

    Not judged where the profile's pmu=off leaves KVM's counters in place (``pmu_off``, the pmu_off_honoured
    expectation: AMD's legacy K7 counters stay readable), with the data file's reason (pmu_off_unjudgeable)."""
    if pmu.available:
        return skipped("profile: the vPMU is on; counter MSR bounds are checked by arch.msr_bounds")
    unjudgeable = pmu_off_unjudgeable(pmu, pmu_off)
    if unjudgeable is not None:
        return skipped(unjudgeable.reason)
    if not faults.available:
        return skipped(faults.reason)
    msrs = NO_PMU_FAULTING_MSRS["amd" if view.amd else "intel"]
    reads = {f"{m:#x}": view.msrs.get(m) for m in msrs}
    missing = [name for name, read in reads.items() if read is None]
    if missing:
        return errored(f"enum probe did not read MSR {', '.join(missing)}")
    ok = [name for name, read in reads.items() if read is not None and not read.faulted]
    observed = {
        name: ("#GP" if read and read.faulted else read.value if read else None) for name, read in reads.items()
    }
    if ok:
        return failed(f"MSR {', '.join(ok)} readable although the guest has no vPMU (expected #GP; "
                      "arch/x86/kvm/x86.c kvm_get_msr_common default case)", "#GP", observed)  # fmt: skip
    return passed("PMU MSRs #GP without a vPMU", "#GP", observed)


def perf_capabilities(pmu: Expectation, faults: Expectation, view: GuestView) -> Verdict:
    """IA32_PERF_CAPABILITIES is readable iff CPUID.1:ECX.PDCM (SDM Vol. 4: the MSR exists iff PDCM)."""
    if not view.intel:
        return skipped(f"not-applicable: IA32_PERF_CAPABILITIES is Intel-only (guest vendor {view.caps.vendor})")
    if not faults.available:
        return skipped(faults.reason)
    read = view.msrs.get(0x345)
    if read is None:
        return errored("enum probe did not read IA32_PERF_CAPABILITIES")
    if view.caps.pdcm:
        if read.faulted:
            return failed("CPUID.1:ECX.PDCM=1 but IA32_PERF_CAPABILITIES #GPs", "readable", "#GP")
        return passed("PDCM set and IA32_PERF_CAPABILITIES readable", "readable", view.perf_capabilities())
    if not read.faulted:
        return failed("CPUID.1:ECX.PDCM=0 but IA32_PERF_CAPABILITIES is readable (SDM: the MSR exists iff PDCM)",
                      "#GP", read.value)  # fmt: skip
    return passed("PDCM clear and IA32_PERF_CAPABILITIES #GPs", "#GP", "#GP")


#: Fixed counters the mediated vPMU may give a guest: the Intel fixed counter 3 (TOPDOWN.SLOTS) series makes
#: KVM_MAX_NR_INTEL_FIXED_COUNTERS 4 and keeps 3 only "if (!enable_mediated_pmu)" in kvm_init_pmu_capability()
#: ("KVM: x86/pmu: Support Intel fixed counter 3 on mediated vPMU", Zide Chen/Dapeng Mi, 2026-02-26). The perf-based
#: vPMU stays at 3 (KVM_MAX_NR_FIXED_COUNTERS, BUILD_BUG_ON in kvm_init_msr_lists()). Used only when the host
#: facts carry no measured KVM offer; a kernel without the series still offers 3, which the check accepts.
MEDIATED_FIXED_COUNTERS = 4


def _kvm_bounds(pmu: Expectation, vpmu_mode: str | None) -> dict[str, int]:
    """KVM's limits from kvm_features.toml, with the fixed-counter limit of the mediated vPMU where it applies."""
    limits = dict(pmu.limits)
    if vpmu_mode == "mediated" and "fixed_counters" in limits:
        limits["fixed_counters"] = max(limits["fixed_counters"], MEDIATED_FIXED_COUNTERS)
    return limits


def guest_within_host(
    accel: str,
    pmu: Expectation,
    view: GuestView,
    host_caps: dict[str, Any] | None,
    kvm_offer: dict[str, Any] | None = None,
    vpmu_mode: str | None = None,
) -> Verdict:
    """The guest never sees more than the host has, nor more than KVM offers.

    KVM's offer is measured when the host facts have it (``host["kvm_offer"]["pmu"]``: KVM_GET_SUPPORTED_CPUID,
    decoded like the guest's CPUID): that is what kvm_init_pmu_capability() left after its clamps, in whichever vPMU
    mode the module runs, so it wins over the table. Without it (old host files) the table limits apply, with the
    mediated vPMU's fixed-counter limit (MEDIATED_FIXED_COUNTERS) when the host runs it.
    """
    if accel != "kvm":
        return skipped(f"accel: under {accel.upper()} the guest CPU model is QEMU's own, not derived from the host")
    if host_caps is None:
        return skipped("host: CPUID not readable (no /dev/cpu/0/cpuid access and CPUID not executable)")
    offer = (kvm_offer or {}).get("pmu")
    problems: list[str] = []
    guest = view.caps
    limits = {} if offer is not None else _kvm_bounds(pmu, vpmu_mode)
    source = "KVM_GET_SUPPORTED_CPUID" if offer is not None else "kvm_features.toml limits"
    if guest.arch_perfmon is not None:
        host = host_caps.get("arch_perfmon") or {}
        offered = offer.get("arch_perfmon") if offer is not None else None
        if offer is not None and offered is None:
            problems.append("KVM offers no architectural PMU (KVM_GET_SUPPORTED_CPUID leaf 0AH version 0)")
        ap = guest.arch_perfmon
        for key in ("version", "gp_counters", "gp_width", "fixed_counters", "fixed_width"):
            candidates = (host.get(key, 0), limits.get(key), (offered or {}).get(key, 0) if offer is not None else None)
            bound = min(v for v in candidates if v is not None)
            if getattr(ap, key) > bound:
                problems.append(f"{key} {getattr(ap, key)} > {bound}")
        have = [host.get("events", {})] + ([offered.get("events", {})] if offered else [])
        extra = [e for e, ok in ap.events.items() if ok and not all(events.get(e) for events in have)]
        if extra:
            problems.append(f"events the host or KVM lacks: {', '.join(extra)}")
    if guest.amd is not None and host_caps.get("amd"):
        offered_amd = (offer or {}).get("amd") or {}
        candidates = (host_caps["amd"]["core_counters"], limits.get("core_counters"), offered_amd.get("core_counters"))
        bound = min(v for v in candidates if v is not None)
        if guest.amd.core_counters > bound:
            problems.append(f"core_counters {guest.amd.core_counters} > {bound}")
    observed = view.summary()["caps"]
    if problems:
        return failed(f"guest PMU exceeds the host or what KVM offers ({source}): " + "; ".join(problems),
                      "guest <= host", observed)  # fmt: skip
    return passed(f"guest PMU enumeration within the host's and KVM's limits ({source})", "guest <= host", observed)
