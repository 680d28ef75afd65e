"""What the guest kernel says and does, shared by the topdown, LBR, PEBS and IBS rules.

A feature that CPUID enumerates but the guest kernel's perf driver does not use (a CPU model it does not know,
"generic architected perfmon") is a guest-kernel SKIP, not a KVM FAIL; a sampling event the guest kernel throttled
says nothing about the vPMU. Also the enumeration rule every feature shares: shown exactly when expected.
"""

from __future__ import annotations

import errno as errno_mod
from typing import TYPE_CHECKING, Any

from harness.judge.expectations import Expectation
from harness.judge.verdict import Record, Verdict, failed, first_record, passed, skipped
from harness.probe.guest_view import GuestView

if TYPE_CHECKING:
    pass


USER_SPACE_END = 1 << 47  # x86-64 canonical user half (4-level paging): user addresses are below 0x8000_0000_0000


def errno_name_of(record: Record) -> str:
    return errno_mod.errorcode.get(record.get("errno", 0), str(record.get("errno")))


# --- the guest kernel's own words (review F3) ------------------------------------------------------------------
#: A CPU model the guest kernel's Intel perf driver does not know falls into the "default:" case of
#: arch/x86/events/intel/core.c intel_pmu_init(), which prints "generic architected perfmon" in the boot banner and
#: names the PMU "generic_arch_v1", "generic_arch_v2+" or "generic_arch_v5+" (sysfs cpu/caps/pmu_name). Only the
#: model cases set up legacy LBR (intel_pmu_lbr_init_*()), the topdown events (td_attr) and a PEBS constraint table
#: (x86_pmu.pebs_constraints), so such a kernel uses none of them whatever CPUID and PERF_CAPABILITIES say.
GENERIC_PMU_PREFIX = "generic_arch"
GENERIC_BANNER = "generic architected perfmon"


def guest_kernel_release(run: Any) -> str | None:
    """The guest kernel release of a run: the image's (live ProfileRun), or as results.json stored it (rejudge)."""
    image = getattr(run, "image", None)
    if image is not None:
        return getattr(image, "kernel_release", None)
    summary = run.summary() if hasattr(run, "summary") else None
    return (summary or {}).get("kernel_release")


def guest_kernel_words(view: GuestView, release: str | None) -> str:
    """How the guest kernel describes its PMU: its release, cpu/caps/pmu_name and "Performance Events:" line."""
    pmu_name = view.sysfs.get("cpu/caps/pmu_name")
    return (f"guest kernel {release or '(release not recorded)'}, cpu/caps/pmu_name={pmu_name or '(absent)'}, "
            f"boot banner {view.kernel_banner or '(none)'!r}")  # fmt: skip


def kernel_knows_model(view: GuestView) -> bool | None:
    """Whether the guest kernel's perf driver has a case for this CPU model (see GENERIC_PMU_PREFIX); None when
    neither cpu/caps/pmu_name nor the banner says."""
    pmu_name = view.sysfs.get("cpu/caps/pmu_name")
    if pmu_name:
        return not pmu_name.startswith(GENERIC_PMU_PREFIX)
    if GENERIC_BANNER in view.kernel_banner:
        return False
    return None


def guest_kernel_skip(feature: str, enumerated: str, evidence: str, view: GuestView, release: str | None) -> Verdict:
    """SKIP for a feature that CPUID / PERF_CAPABILITIES enumerate (so KVM and QEMU kept their promise) but the guest
    kernel does not use: a newer guest kernel (--kernel) is the remedy, not a host or KVM change."""
    return skipped(f"guest-kernel: {enumerated}, but the guest kernel does not use {feature}: {evidence} "
                   f"({guest_kernel_words(view, release)}); boot a guest kernel that knows this CPU (--kernel)",
                   feature, {"pmu_name": view.sysfs.get("cpu/caps/pmu_name"), "banner": view.kernel_banner,
                             "kernel_release": release})  # fmt: skip


def throttles(record: Record) -> int:
    """PERF_RECORD_THROTTLE records a sampler counted (the shared walker's "throttled", or its older "throttle")."""
    return int(record.get("throttled", record.get("throttle", 0)) or 0)


def throttle_skip(record: Record, records: list[Record]) -> Verdict | None:
    """SKIP when the guest kernel throttled the sampling event: its count and sample IPs no longer say anything
    about the vPMU (team contract: throttling is reported as such, never as a lost-sample FAIL)."""
    n = throttles(record)
    if not n:
        return None
    setup = first_record(records, "sampling_setup") or {}
    return skipped(f"guest kernel throttled sampling: {n} PERF_RECORD_THROTTLE record(s) (kernel/events/core.c "
                   "__perf_event_account_interrupt: more PMIs in one tick than max_samples_per_tick); the probe "
                   f"had set kernel.perf_cpu_time_max_percent={setup.get('perf_cpu_time_max_percent')}, "
                   f"perf_event_max_sample_rate={setup.get('perf_event_max_sample_rate')}",
                   "no throttling", {"throttled": n, "samples": record.get("samples")})  # fmt: skip


def absent_or_present(feature: str, expectation: Expectation, shown: bool, detail: dict[str, Any]) -> Verdict:
    """The enumeration rule shared by every feature: the guest shows the feature exactly when it is expected."""
    if expectation.available:
        if shown:
            return passed(f"guest enumerates {feature}, as expected", True, detail)
        return failed(f"{feature} is promised (host, KVM and profile provide it) but the guest does not enumerate it",
                      True, detail)  # fmt: skip
    if shown:
        return failed(f"guest enumerates {feature} although it is not expected ({expectation.reason})", False, detail)
    return passed(f"{feature} absent, as expected ({expectation.reason})", False, detail)


def decoded_perf_capabilities(view: GuestView) -> dict[str, Any]:
    return view.perf_capabilities() or {}
