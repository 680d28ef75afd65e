"""What the guest itself sees: CPUID (decoded once with harness.cpu.caps), PMU MSRs, and its kernel's perf PMUs.

Built from the ``enum`` probe's records plus two shell reads in the guest (sysfs PMU list, the kernel's
"Performance Events" boot line). This is the third view of a feature, after "requested" (the profile) and
"granted" (QEMU).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from harness.cpu.caps import PmuCaps, decode_caps, decode_perf_capabilities
from harness.cpu.cpuid_dump import parse_cpuid_text
from harness.guest.ssh import GuestSession
from harness.probe.runner import ProbeRun

# MSR numbers the enum probe reads (Linux msr-index.h / SDM Vol. 4; AMD APM Vol. 2).
MSR_PERF_CAPABILITIES = 0x345
MSR_IA32_PMC0 = 0xC1
MSR_IA32_PMC2 = 0xC3
MSR_IA32_PERFEVTSEL0 = 0x186
MSR_PERF_GLOBAL_CTRL = 0x38F
MSR_FIXED_CTR0 = 0x309
MSR_K7_PERFCTR0 = 0xC0010004
MSR_K7_EVNTSEL0 = 0xC0010000
MSR_F15H_PERF_CTR0 = 0xC0010201
MSR_AMD_GLOBAL_CTL = 0xC0000301
ENUM_MSRS = (
    MSR_PERF_CAPABILITIES, MSR_IA32_PMC0, MSR_IA32_PMC2, MSR_IA32_PERFEVTSEL0, MSR_PERF_GLOBAL_CTRL, MSR_FIXED_CTR0,
    MSR_K7_PERFCTR0, MSR_K7_EVNTSEL0, MSR_F15H_PERF_CTR0, MSR_AMD_GLOBAL_CTL,
)  # fmt: skip
#: PMU MSRs that must #GP when the guest has no vPMU. The legacy P6/K7 MSRs (0xC1-0xC2, 0x186-0x187,
#: 0xC0010000-0xC0010007) are left out on purpose: kvm_get_msr_common() reads them as 0 without a PMU for old
#: guests' sake (arch/x86/kvm/x86.c, "case MSR_K7_EVNTSEL0 ... MSR_P6_EVNTSEL1"), so they prove nothing.
NO_PMU_FAULTING_MSRS = {
    "intel": (MSR_IA32_PMC2, MSR_FIXED_CTR0, MSR_PERF_GLOBAL_CTRL),
    "amd": (MSR_F15H_PERF_CTR0, MSR_AMD_GLOBAL_CTL),
}
#: The guest kernel's perf core PMU names (x86; hybrid parts use cpu_core/cpu_atom).
CORE_PMUS = ("cpu", "cpu_core", "cpu_atom")


@dataclass(frozen=True)
class MsrRead:
    """One MSR read in the guest: a value, or the errno (EIO = the guest kernel caught a #GP)."""

    msr: int
    value: int | None
    errno: int | None

    @property
    def faulted(self) -> bool:
        return self.errno is not None


@dataclass
class GuestView:
    """The guest's view of its PMU."""

    caps: PmuCaps
    msrs: dict[int, MsrRead]
    kernel_pmus: list[str]
    kernel_banner: str
    records: list[dict[str, Any]] = field(default_factory=list)
    #: sysfs facts of the guest's perf PMUs, e.g. "cpu/caps/branches" -> "32", "ibs_op/type" -> "9".
    sysfs: dict[str, str] = field(default_factory=dict)

    @property
    def intel(self) -> bool:
        return self.caps.vendor == "GenuineIntel"

    @property
    def amd(self) -> bool:
        return self.caps.amd is not None

    @property
    def cpuid_pmu(self) -> bool:
        """Whether CPUID enumerates a PMU: CPUID.0AH version > 0 (Intel) or PerfCtrExtCore/PerfMonV2 (AMD)."""
        if self.amd:
            assert self.caps.amd is not None
            return self.caps.amd.perfctr_core or self.caps.amd.perfmon_v2
        return self.caps.arch_perfmon is not None

    @property
    def kernel_pmu(self) -> bool:
        """Whether the guest kernel registered a hardware perf PMU."""
        return any(name in self.kernel_pmus for name in CORE_PMUS)

    def perf_capabilities(self) -> dict[str, int | bool] | None:
        """IA32_PERF_CAPABILITIES decoded, when CPUID.1:ECX.PDCM is set and the read did not fault."""
        read = self.msrs.get(MSR_PERF_CAPABILITIES)
        if not self.caps.pdcm or read is None or read.value is None:
            return None
        return decode_perf_capabilities(read.value)

    def summary(self) -> dict[str, Any]:
        return {
            "caps": self.caps.to_json(),
            "perf_capabilities": self.perf_capabilities(),
            "kernel_pmus": self.kernel_pmus,
            "kernel_banner": self.kernel_banner,
            "sysfs": self.sysfs,
            "msrs": {
                f"{m.msr:#x}": (m.value if m.value is not None else f"errno {m.errno}") for m in self.msrs.values()
            },
        }


def view_from(
    run: ProbeRun, kernel_pmus: list[str], kernel_banner: str, sysfs: dict[str, str] | None = None
) -> GuestView:
    """Decode the ``enum`` probe's records (CPUID leaves through the same parser as ``harness caps``)."""
    leaves = "\n".join(json.dumps(r) for r in run.of_kind("leaf"))
    caps = decode_caps(parse_cpuid_text(leaves, "guest enum probe"))
    msrs = {
        r["msr"]: MsrRead(r["msr"], r.get("value"), r.get("errno") if "error" in r else None)
        for r in run.of_kind("msr")
    }
    return GuestView(caps, msrs, kernel_pmus, kernel_banner, run.records, sysfs or {})


#: sysfs files of the guest's perf PMUs the checks read (relative to /sys/bus/event_source/devices).
SYSFS_FILES = (
    "cpu/type", "cpu/caps/branches", "cpu/caps/max_precise", "cpu/caps/pmu_name", "cpu/rdpmc",
    "cpu/events/slots", "cpu/events/topdown-retiring", "cpu/events/topdown-bad-spec", "cpu/events/topdown-fe-bound",
    "cpu/events/topdown-be-bound", "cpu/events/mem-loads", "ibs_op/type", "ibs_fetch/type",
    "ibs_op/caps/zen4_ibs_extensions", "ibs_op/format/cnt_ctl",
)  # fmt: skip


def kernel_pmu_facts(session: GuestSession) -> tuple[list[str], str, dict[str, str]]:
    """The guest kernel's registered perf PMUs, its "Performance Events:" boot line and the PMU sysfs facts."""
    pmus = session.check("ls /sys/bus/event_source/devices").stdout.split()
    banner = session.run("dmesg | grep -m1 'Performance Events'").stdout.strip()
    files = " ".join(SYSFS_FILES)
    out = session.run(
        f'cd /sys/bus/event_source/devices && for f in {files}; do [ -r $f ] && echo "$f=$(cat $f)"; done'
    )
    sysfs = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return sorted(pmus), banner.split("] ", 1)[-1], sysfs
