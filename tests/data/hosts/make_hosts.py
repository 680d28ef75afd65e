"""Write the ``harness doctor --json`` objects of representative real hosts into tests/data/hosts/.

Run by hand after changing a rule or the doctor schema (the files are committed; tests/test_host_files.py re-runs
:func:`build_all` and fails when a committed file differs from what this script writes)::

    .venv/bin/python tests/data/hosts/make_hosts.py

Each host is a real CPUID dump from ``shared/data/cpuid`` (parsed with harness.cpu.cpuid_dump, as ``harness caps
--cpuid-dump`` does) plus what the dump cannot say: the host's IA32_PERF_CAPABILITIES, what its perf driver makes
of it, the kernel version, module parameters and sysctls. From those, every doctor key is computed the way
harness.host.hostfacts.collect() computes it on the machine itself: kvm, sysctls and host_pmu by hostfacts' own readers
pointed at a temporary sysfs/procfs tree holding that host's files, the rest with its pure helpers; and
``kvm_offer`` is the KVM_GET_SUPPORTED_CPUID / feature-MSR / KVM_CHECK_EXTENSION answer that KVM builds from that
host, modelled one kernel function at a time below, each with the file and function it follows. The kernel
sources were read through the code index: a full v6.15-era arch/x86/kvm/cpuid.c and x86.c, the ZideChen0/linux-kernel
tree (the mediated vPMU as merged for 7.0, plus the later fixed-counter-3 series, which is left out here) and the
patches and pull requests on the KVM list; "6.12" and "7.0" below mean the behaviour of those releases.

What is modelled in the CPUID answer: every field the PMU decoder (harness.cpu.caps) reads, plus the leaf/subleaf
structure KVM returns. Feature bits that have nothing to do with the PMU (SSE, AVX, NX, ...) are left zero: the
files claim nothing they do not model. README.md (next to this file) lists, per host, the dump and every value
that was substituted or assumed.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from harness.cpu.caps import decode_caps, decode_perf_capabilities  # noqa: E402
from harness.cpu.cpuid_dump import ZERO, CpuidTable, Regs, load_cpuid_dump  # noqa: E402
from harness.host import hostfacts, kvm_offer  # noqa: E402

#: shared/ sits beside the checkout, like tests/helpers.py's CPUID_DIR.
CPUID_DIR = REPO_ROOT.parent / "shared" / "data" / "cpuid"

# --- register bits (SDM Vol. 2A CPUID; AMD APM Vol. 3 App. E; Linux cpufeatures.h) -------------------------------
ECX1_DTES64 = 1 << 2  # X86_FEATURE_DTES64
ECX1_VMX = 1 << 5  # X86_FEATURE_VMX
ECX1_PDCM = 1 << 15  # X86_FEATURE_PDCM
ECX1_HYPERVISOR = 1 << 31  # X86_FEATURE_HYPERVISOR
EDX1_DS = 1 << 21  # X86_FEATURE_DS
EDX7_HYBRID = 1 << 15  # X86_FEATURE_HYBRID_CPU
EDX7_ARCH_LBR = 1 << 19  # X86_FEATURE_ARCH_LBR
ECX_EXT1_SVM = 1 << 2  # X86_FEATURE_SVM
ECX_EXT1_PERFCTR_CORE = 1 << 23  # X86_FEATURE_PERFCTR_CORE
EAX_EXT22_PERFMON_V2 = 1 << 0  # X86_FEATURE_PERFMON_V2 (KVM-only leaf word CPUID_8000_0022_EAX)
EDX_A_ANYTHREAD_DEPRECATED = 1 << 15  # union cpuid10_edx.anythread_deprecated

# --- IA32_PERF_CAPABILITIES fields (SDM Vol. 3B; arch/x86/include/asm/msr-index.h PERF_CAP_*) ---------------------
PERF_CAP_LBR_FMT = 0x3F
PERF_CAP_PEBS_TRAP = 1 << 6
PERF_CAP_ARCH_REG = 1 << 7
PERF_CAP_PEBS_FORMAT = 0xF00
PERF_CAP_SMM_FREEZE = 1 << 12
PERF_CAP_FW_WRITES = 1 << 13
PERF_CAP_PEBS_BASELINE = 1 << 14
PERF_CAP_PERF_METRICS = 1 << 15
#: msr-index.h PERF_CAP_PEBS_MASK (6.12 and 7.0 add PERF_CAP_PEBS_TIMING_INFO, bit 17, which no host here sets).
PERF_CAP_PEBS_MASK = PERF_CAP_PEBS_TRAP | PERF_CAP_ARCH_REG | PERF_CAP_PEBS_FORMAT | PERF_CAP_PEBS_BASELINE
LBR_FORMAT_INFO = 0x05  # arch/x86/events/intel/lbr.c: LBR_FORMAT_INFO (Skylake and later legacy LBR)
LBR_FORMAT_ARCH = 0x3F  # SDM: LBR format 3FH = architectural LBR (CPUID.(EAX=1CH))

# --- KVM limits (arch/x86/include/asm/kvm_host.h) -----------------------------------------------------------------
KVM_MAX_NR_INTEL_GP_COUNTERS = 8
KVM_MAX_NR_AMD_GP_COUNTERS = 6
#: KVM_MAX_NR_INTEL_FIXED_COUNTERS is 3 in 6.12 and 7.0: the patch raising it to 4 for the mediated vPMU
#: ("KVM: x86/pmu: Support Intel fixed counter 3 on mediated vPMU", kvm list 2026-02-26) came after 7.0's merge window.
KVM_MAX_NR_FIXED_COUNTERS = 3
AMD64_NUM_COUNTERS = 4  # arch/x86/include/asm/perf_event.h; also amd_pmu_ops.MIN_NR_GP_COUNTERS
AMD64_NUM_COUNTERS_CORE = 6
#: cpuid.c __do_cpuid_func() case 0 / 0x80000000: highest leaves KVM implements. The basic limit is 0x24 since
#: AVX10.1 (v6.12; later kernels raise it), above every host here, so KVM returns each host's own maximum.
KVM_MAX_BASIC_LEAF = 0x24
KVM_MAX_EXT_LEAF = 0x80000022
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # include/uapi/asm/kvm.h (sic)
KVM_PMU_CAP_DISABLE = 1  # KVM_CAP_PMU_VALID_MASK

KERNEL_6_12 = "6.12.0"
KERNEL_7_0 = "7.0.0"
QEMU = {"path": "/usr/bin/qemu-system-x86_64", "version": "10.1.0", "accels": ["tcg", "kvm"]}  # `-accel help` order
PERF_PATH = "/usr/bin/perf"


@dataclass(frozen=True)
class HostCpu:
    """One real CPU: its CPUID dump and the host facts the dump cannot carry (sources in README.md)."""

    dump: str
    model_name: str
    microcode: str  # /proc/cpuinfo "microcode": a plausible revision, not read from a real machine
    #: host IA32_PERF_CAPABILITIES (Intel only), composed field by field in :func:`perf_capabilities`
    perf_capabilities: int | None
    #: perf's x86_pmu.pebs_ept (EPT-friendly PEBS): intel_pmu_init() sets it for ICELAKE_X/D and SAPPHIRERAPIDS_X
    #: by model; intel_ds_init() for PEBS format 5 and 6 (arch/x86/events/intel/{core,ds}.c).
    pebs_ept: bool = False
    #: x86_perf_get_lbr(): legacy LBR depth and call-stack support (lbr.c; Haswell and later have call stacks)
    lbr_nr: int = 0
    lbr_callstack: bool = False
    #: (leaf, subleaf, register) -> new value: fields replaced because no dump of this exact CPU exists
    substitutions: dict[tuple[int, int, str], int] = field(default_factory=dict)
    #: (leaf, subleaf, register) -> bits set on top of the dump's value, for the same reason
    set_bits: dict[tuple[int, int, str], int] = field(default_factory=dict)
    host_pmus: tuple[str, ...] = ()  # /sys/bus/event_source/devices (plausible, machine specific)


@dataclass(frozen=True)
class Host:
    """One host file: a CPU, a kernel and the knobs doctor reports."""

    name: str
    cpu: HostCpu
    kernel: str
    mediated_param: bool = False  # kvm_intel/kvm_amd enable_mediated_pmu=Y on the modprobe line (7.0+)
    nmi_watchdog: str = "0"
    ignore_msrs: str = "N"

    @property
    def kernel_version(self) -> tuple[int, int]:
        major, minor = self.kernel.split(".")[:2]
        return int(major), int(minor)


def perf_capabilities(lbr_format: int, pebs_format: int, *fields: int) -> int:
    """Compose an IA32_PERF_CAPABILITIES value from the SDM fields (LBR format [5:0], PEBS format [11:8], flags)."""
    value = lbr_format | pebs_format << 8
    for bit in fields:
        value |= bit
    return value


# Host IA32_PERF_CAPABILITIES. No raw rdmsr 0x345 dump of these CPUs was found, so each value is composed from the
# SDM field definitions, with every field's evidence: the kernel's boot banner prints the PEBS format with '+' for
# PEBS trap and "-baseline" (intel_ds_init()), "full-width counters" for FW_WRITES, "XSAVE Architectural LBR"
# (README.md cites real boot logs of each generation). PEBS arch-regs (bit 7) and SMM freeze (bit 12) are not
# printed; they are assumed set, as on every Intel core since Nehalem that reports PEBS. PERF_METRICS (bit 15)
# exists from Ice Lake on (the topdown perf-metrics support of intel_pmu_init()). PEBS-via-PT (16) and PEBS timing
# info (17) are assumed clear: no banner of these CPUs prints "PEBS-via-PT", and KVM never passes either on.
SKX_PERF_CAPABILITIES = perf_capabilities(
    LBR_FORMAT_INFO, 3, PERF_CAP_PEBS_TRAP, PERF_CAP_ARCH_REG, PERF_CAP_SMM_FREEZE, PERF_CAP_FW_WRITES
)  # "PEBS fmt3+, Skylake events, 32-deep LBR, full-width counters" -> 0x33c5
ICX_PERF_CAPABILITIES = perf_capabilities(
    LBR_FORMAT_INFO, 4, PERF_CAP_PEBS_TRAP, PERF_CAP_ARCH_REG, PERF_CAP_SMM_FREEZE, PERF_CAP_FW_WRITES,
    PERF_CAP_PEBS_BASELINE, PERF_CAP_PERF_METRICS,
)  # fmt: skip  # "PEBS fmt4+-baseline, ..., Icelake events, 32-deep LBR, full-width counters" -> 0xf4c5
GLC_PERF_CAPABILITIES = perf_capabilities(
    LBR_FORMAT_ARCH, 4, PERF_CAP_PEBS_TRAP, PERF_CAP_ARCH_REG, PERF_CAP_SMM_FREEZE, PERF_CAP_FW_WRITES,
    PERF_CAP_PEBS_BASELINE, PERF_CAP_PERF_METRICS,
)  # fmt: skip  # Golden Cove (SPR, ADL P-core): "XSAVE Architectural LBR, PEBS fmt4+-baseline, ..." -> 0xf4ff

INTEL_PMUS = ("breakpoint", "cpu", "cstate_core", "cstate_pkg", "intel_bts", "intel_pt", "kprobe", "msr", "power",
              "software", "tracepoint", "uncore_imc_0", "uprobe")  # fmt: skip
HYBRID_PMUS = ("breakpoint", "cpu_atom", "cpu_core", "cstate_core", "cstate_pkg", "intel_bts", "intel_pt", "kprobe",
               "msr", "power", "software", "tracepoint", "uncore_imc_free_running_0", "uprobe")  # fmt: skip
AMD_PMUS = ("amd_df", "amd_iommu_0", "amd_l3", "breakpoint", "cpu", "ibs_fetch", "ibs_op", "kprobe", "msr", "power",
            "software", "tracepoint", "uprobe")  # fmt: skip

SPR = HostCpu(
    dump="GenuineIntel00806F8_SapphireRapids_05_CPUID.txt",
    model_name="Intel(R) Xeon(R) w7-2475X",
    microcode="0x2b000620",
    perf_capabilities=GLC_PERF_CAPABILITIES,
    pebs_ept=True,  # intel_pmu_init(): case INTEL_SAPPHIRERAPIDS_X: x86_pmu.pebs_ept = 1
    lbr_nr=32,  # arch LBR depth (CPUID.1CH EAX); legacy-LBR path unused: X86_FEATURE_ARCH_LBR
    lbr_callstack=True,
    host_pmus=INTEL_PMUS,
)
ICX = HostCpu(
    # No Ice Lake server dump exists: the Tiger Lake dump is the same PMU generation (Sunny/Willow Cove: arch
    # perfmon v5, 8 GP, fixed counters 0-3, 8 architectural events, legacy 32-deep LBR, PEBS format 4). Only
    # CPUID.1:EAX is replaced, by a Xeon Gold 6338 (06_6AH stepping 6): the model is what perf keys PEBS-via-EPT on.
    dump="GenuineIntel00806C1_TigerLake_01_CPUID.txt",
    model_name="Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz",
    microcode="0xd0003e7",
    perf_capabilities=ICX_PERF_CAPABILITIES,
    pebs_ept=True,  # intel_pmu_init(): case INTEL_ICELAKE_X / INTEL_ICELAKE_D: x86_pmu.pebs_ept = 1
    lbr_nr=32,
    lbr_callstack=True,
    substitutions={(0x1, 0, "eax"): 0x000606A6},
    host_pmus=INTEL_PMUS,
)
SKX = HostCpu(
    dump="GenuineIntel0050654_SkylakeXeon_CPUID.txt",
    model_name="Intel(R) Xeon(R) Gold 6154 CPU @ 3.00GHz",
    microcode="0x2007006",
    perf_capabilities=SKX_PERF_CAPABILITIES,
    pebs_ept=False,  # PEBS format 3, not an ICX/SPR model: no EPT-friendly PEBS
    lbr_nr=32,
    lbr_callstack=True,
    host_pmus=INTEL_PMUS,
)
ADL_HYBRID = HostCpu(
    # The only Alder Lake dump is an i5-12400 (C0 die with its E-cores fused off: CPUID.07H.0:EDX[15] = 0). The
    # 8P+8E i9-12900K has the same family/model/stepping (06_97H, C0) and sets the hybrid bit; CPU 0 is a P-core.
    dump="GenuineIntel0090672_AlderLake_02_CPUID.txt",
    model_name="12th Gen Intel(R) Core(TM) i9-12900K",
    microcode="0x37",
    perf_capabilities=GLC_PERF_CAPABILITIES,
    pebs_ept=False,  # hybrid: KVM disables the vPMU before PEBS matters
    lbr_nr=32,
    lbr_callstack=True,
    set_bits={(0x7, 0, "edx"): EDX7_HYBRID},
    host_pmus=HYBRID_PMUS,
)
GENOA = HostCpu(
    dump="AuthenticAMD0A10F11_K19_Genoa_01_CPUID.txt",
    model_name="AMD EPYC 9654 96-Core Processor",
    microcode="0xa101148",
    perf_capabilities=None,
    host_pmus=tuple(sorted((*AMD_PMUS, "amd_umc_0"))),
)
MILAN = HostCpu(
    dump="AuthenticAMD0A00F11_K19_Milan_02_CPUID.txt",
    model_name="AMD EPYC 7763 64-Core Processor",
    microcode="0xa0011d5",
    perf_capabilities=None,
    host_pmus=AMD_PMUS,
)
ROME = HostCpu(
    dump="AuthenticAMD0830F10_K17_Rome_CPUID.txt",
    model_name="AMD EPYC 7742 64-Core Processor",
    microcode="0x830107c",
    perf_capabilities=None,
    host_pmus=AMD_PMUS,
)

SPR_PERF_BASED = Host("spr-perf-based", SPR, KERNEL_6_12)
HOSTS = (
    SPR_PERF_BASED,
    Host("spr-mediated", SPR, KERNEL_7_0, mediated_param=True),
    replace(SPR_PERF_BASED, name="spr-nmi-watchdog", nmi_watchdog="1"),
    replace(SPR_PERF_BASED, name="spr-ignore-msrs", ignore_msrs="Y"),
    Host("icx", ICX, KERNEL_6_12),
    Host("adl-hybrid", ADL_HYBRID, KERNEL_6_12),
    Host("skl", SKX, KERNEL_6_12),
    Host("genoa-perf-based", GENOA, KERNEL_6_12),
    Host("genoa-mediated", GENOA, KERNEL_7_0, mediated_param=True),
    Host("milan", MILAN, KERNEL_6_12),
    Host("rome", ROME, KERNEL_6_12),
)


# --- the host's CPUID -------------------------------------------------------------------------------------------


def host_cpuid(cpu: HostCpu) -> CpuidTable:
    """The dump (first logical CPU, as harness caps reads it) with the documented substitutions applied."""
    table = load_cpuid_dump(CPUID_DIR / cpu.dump)
    leaves = dict(table.leaves)
    for (leaf, sub, reg), value in cpu.substitutions.items():
        leaves[(leaf, sub)] = replace(leaves.get((leaf, sub), Regs()), **{reg: value})
    for (leaf, sub, reg), bits in cpu.set_bits.items():
        regs = leaves.get((leaf, sub), Regs())
        leaves[(leaf, sub)] = replace(regs, **{reg: regs.reg(reg) | bits})
    return CpuidTable(leaves, str(CPUID_DIR / cpu.dump))


def doctor_cpuid(table: CpuidTable) -> CpuidTable:
    """The leaves hostfacts.read_host_cpuid() reads (HOST_CPUID_LEAVES), as /dev/cpu/0/cpuid would give them."""
    leaves = {(leaf, sub): table.get(leaf, sub) for leaf, sub in hostfacts.HOST_CPUID_LEAVES}
    return CpuidTable(leaves, str(hostfacts.CPUID_DEVICE))


def is_intel(table: CpuidTable) -> bool:
    return decode_caps(table).vendor == "GenuineIntel"


# --- the host perf driver: arch/x86/events/core.c perf_get_x86_pmu_capability() ----------------------------------


@dataclass(frozen=True)
class PmuCapability:
    """struct x86_pmu_capability (arch/x86/include/asm/perf_event.h), as perf or KVM fills it."""

    version: int = 0
    num_counters_gp: int = 0
    num_counters_fixed: int = 0
    bit_width_gp: int = 0
    bit_width_fixed: int = 0
    events_mask: int = 0
    events_mask_len: int = 0
    pebs_ept: bool = False
    mediated: bool = False  # PERF_PMU_CAP_MEDIATED_VPMU on the core PMU (7.0)


def perf_pmu_capability(cpu: HostCpu, table: CpuidTable, kernel: tuple[int, int]) -> PmuCapability:
    """What perf tells KVM about the core PMU (perf_get_x86_pmu_capability()), from CPUID as the driver reads it."""
    return intel_perf_capability(cpu, table, kernel) if is_intel(table) else amd_perf_capability(table, kernel)


def intel_perf_capability(cpu: HostCpu, table: CpuidTable, kernel: tuple[int, int]) -> PmuCapability:
    """intel_pmu_init() (arch/x86/events/intel/core.c) on a non-hybrid view of CPU 0.

    Version, GP count, counter width (cntval_bits), event mask and its length come from CPUID.0AH; the fixed
    counters are the v5 bitmap ECX or, before v5, EDX[4:0] contiguous counters. perf_get_x86_pmu_capability()
    reports cntval_bits for both widths. 7.0: intel_pmu_init() marks the core PMU PERF_PMU_CAP_MEDIATED_VPMU.
    """
    regs = table.get(0xA)
    version = regs.eax & 0xFF
    fixed_mask = regs.ecx if version >= 5 else (1 << (regs.edx & 0x1F)) - 1
    width = (regs.eax >> 16) & 0xFF
    return PmuCapability(
        version=version,
        num_counters_gp=(regs.eax >> 8) & 0xFF,
        num_counters_fixed=bin(fixed_mask).count("1"),
        bit_width_gp=width,
        bit_width_fixed=width,
        events_mask=regs.ebx,
        events_mask_len=regs.eax >> 24,
        pebs_ept=cpu.pebs_ept,
        mediated=kernel >= (7, 0),
    )


def amd_perf_capability(table: CpuidTable, kernel: tuple[int, int]) -> PmuCapability:
    """amd_core_pmu_init() (arch/x86/events/amd/core.c): 6 counters with PerfCtrExtCore; with PerfMonV2 version 2
    and CPUID 80000022H EBX[3:0] counters, and (7.0) PERF_PMU_CAP_MEDIATED_VPMU. Width 48 (AMD64 cntval_bits).
    Without PerfMonV2 the driver reports no version (only version == 2 matters to KVM, svm_set_cpu_caps())."""
    amd = decode_caps(table).amd
    assert amd is not None
    if amd.perfmon_v2:
        return PmuCapability(version=2, num_counters_gp=amd.core_counters, bit_width_gp=48, mediated=kernel >= (7, 0))
    return PmuCapability(num_counters_gp=amd.core_counters, bit_width_gp=48)


# --- KVM's view: arch/x86/kvm/pmu.c kvm_init_pmu_capability() ------------------------------------------------------


@dataclass(frozen=True)
class KvmPmu:
    """KVM's module-global PMU state after kvm_init_pmu_capability() and the vendor set_cpu_caps()."""

    enable_pmu: bool
    enable_mediated_pmu: bool
    cap: PmuCapability  # kvm_pmu_cap
    perfctr_core: bool = False  # AMD: X86_FEATURE_PERFCTR_CORE in kvm_cpu_caps
    perfmon_v2: bool = False  # AMD: X86_FEATURE_PERFMON_V2 in kvm_cpu_caps


def kvm_init_pmu_capability(host: Host, table: CpuidTable) -> KvmPmu:
    """kvm_init_pmu_capability(): decide enable_pmu / enable_mediated_pmu and clamp perf's capability.

    * hybrid CPUs (X86_FEATURE_HYBRID_CPU): enable_pmu = false (since 6.2, stable-backported): the vPMU is off;
    * no GP counters, or an Intel host without an architectural PMU: enable_pmu = false;
    * 7.0: the mediated vPMU stays on only with enable_pmu, the module parameter, perf's
      PERF_PMU_CAP_MEDIATED_VPMU and the vendor check (Intel: version >= 4 and PERF_CAP_FW_WRITES,
      intel_pmu_is_mediated_pmu_supported(); AMD: version >= 2, amd_pmu_is_mediated_pmu_supported());
    * version <= 2, GP <= MAX_NR_GP_COUNTERS (8 Intel, 6 AMD), fixed <= KVM_MAX_NR_FIXED_COUNTERS (3).
    """
    caps = decode_caps(table)
    intel = caps.vendor == "GenuineIntel"
    perf = perf_pmu_capability(host.cpu, table, host.kernel_version)
    enable_pmu = not caps.hybrid and perf.num_counters_gp >= (1 if intel else AMD64_NUM_COUNTERS)
    if intel and not perf.version:
        enable_pmu = False
    vendor_ok = (
        perf.version >= 4 and bool((host.cpu.perf_capabilities or 0) & PERF_CAP_FW_WRITES)
        if intel
        else perf.version >= 2
    )
    mediated = enable_pmu and host.mediated_param and host.kernel_version >= (7, 0) and perf.mediated and vendor_ok
    if not enable_pmu:
        return KvmPmu(False, False, PmuCapability())
    max_gp = KVM_MAX_NR_INTEL_GP_COUNTERS if intel else KVM_MAX_NR_AMD_GP_COUNTERS  # pmu_ops->MAX_NR_GP_COUNTERS
    cap = replace(
        perf,
        version=min(perf.version, 2),
        num_counters_gp=min(perf.num_counters_gp, max_gp),
        num_counters_fixed=min(perf.num_counters_fixed, KVM_MAX_NR_FIXED_COUNTERS),
    )
    pmu = KvmPmu(True, mediated, cap)
    return pmu if intel else svm_set_cpu_caps(pmu, table)


def svm_set_cpu_caps(pmu: KvmPmu, table: CpuidTable) -> KvmPmu:
    """svm_set_cpu_caps() (arch/x86/kvm/svm/svm.c), PMU part, with enable_pmu:

    fewer than 6 counters -> clamp to AMD64_NUM_COUNTERS, else kvm_cpu_cap_check_and_set(PERFCTR_CORE) (only if
    the host has it); PERFMON_V2 (kvm_cpu_cap_init(CPUID_8000_0022_EAX, F(PERFMON_V2)), masked by the host) is
    cleared unless kvm_pmu_cap.version == 2 and PERFCTR_CORE.
    """
    amd = decode_caps(table).amd
    assert amd is not None
    cap = pmu.cap
    perfctr_core = False
    if cap.num_counters_gp < AMD64_NUM_COUNTERS_CORE:
        cap = replace(cap, num_counters_gp=min(AMD64_NUM_COUNTERS, cap.num_counters_gp))
    else:
        perfctr_core = amd.perfctr_core
    perfmon_v2 = amd.perfmon_v2 and cap.version == 2 and perfctr_core
    return replace(pmu, cap=cap, perfctr_core=perfctr_core, perfmon_v2=perfmon_v2)


# --- IA32_PERF_CAPABILITIES KVM offers: arch/x86/kvm/vmx/vmx.c vmx_get_perf_capabilities() -------------------------


def vmx_pebs_supported(host: Host, pmu: KvmPmu) -> bool:
    """vmx/capabilities.h vmx_pebs_supported(): boot_cpu_has(X86_FEATURE_PEBS) && kvm_pmu_cap.pebs_ept, and (7.0)
    !enable_mediated_pmu ("Disable PEBS and LBRs if mediated PMU support is enabled"). Every Intel host here has
    X86_FEATURE_PEBS (DS + PEBS available)."""
    return pmu.cap.pebs_ept and not pmu.enable_mediated_pmu


def vmx_get_perf_capabilities(host: Host, table: CpuidTable, pmu: KvmPmu) -> int:
    """kvm_caps.supported_perf_cap on Intel.

    0 without enable_pmu; else PERF_CAP_FW_WRITES always; the host's LBR format only with legacy LBR (not
    X86_FEATURE_ARCH_LBR), not under the mediated vPMU (7.0), and only when x86_perf_get_lbr() reports LBRs with
    call-stack support (commit "KVM: VMX: Disable LBR virtualization if the CPU doesn't support LBR callstacks");
    the host's PEBS fields (PERF_CAP_PEBS_MASK) when vmx_pebs_supported(), minus PEBS baseline ("Disallow adaptive
    PEBS", v6.9, stable-backported).
    """
    if not pmu.enable_pmu:
        return 0
    host_cap = host.cpu.perf_capabilities or 0
    perf_cap = PERF_CAP_FW_WRITES
    arch_lbr = bool(table.get(0x7).edx & EDX7_ARCH_LBR)
    if not arch_lbr and not pmu.enable_mediated_pmu and host.cpu.lbr_callstack and host.cpu.lbr_nr:
        perf_cap |= host_cap & PERF_CAP_LBR_FMT
    if vmx_pebs_supported(host, pmu):
        perf_cap |= host_cap & PERF_CAP_PEBS_MASK
        perf_cap &= ~PERF_CAP_PEBS_BASELINE
    return perf_cap


def supported_perf_capabilities(host: Host, table: CpuidTable, pmu: KvmPmu) -> int:
    """The feature MSR 0x345 on the system fd: x86.c kvm_get_feature_msr() answers kvm_caps.supported_perf_cap on
    both vendors (the MSR is always in msr_based_features_all_except_vmx); svm_set_cpu_caps() leaves it 0."""
    return vmx_get_perf_capabilities(host, table, pmu) if is_intel(table) else 0


# --- KVM_GET_SUPPORTED_CPUID: arch/x86/kvm/cpuid.c __do_cpuid_func() ----------------------------------------------


def cpuid_entry(function: int, index: int = 0, regs: Regs = ZERO, flags: int = 0) -> dict[str, int]:
    """One struct kvm_cpuid_entry2, in harness.host.kvm_offer's field order."""
    return {"function": function, "index": index, "flags": flags, "eax": regs.eax, "ebx": regs.ebx,
            "ecx": regs.ecx, "edx": regs.edx}  # fmt: skip


def leaf_1(host: Host, table: CpuidTable, pmu: KvmPmu) -> Regs:
    """Leaf 01H: EAX (family/model/stepping) and EBX pass through; ECX/EDX = host & kvm_cpu_caps, PMU bits only.

    kvm_set_cpu_caps(): F(PDCM) (cleared by vmx_set_cpu_caps() without enable_pmu); VENDOR_F(DS) and
    VENDOR_F(DTES64), set by vmx_set_cpu_caps() only when vmx_pebs_supported(); EMULATED_F(HYPERVISOR) since
    v6.14 (commit 9aa470f5ddb2 "KVM: x86: Advertise HYPERVISOR in KVM_GET_SUPPORTED_CPUID").
    """
    raw = table.get(0x1)
    ecx = edx = 0
    if is_intel(table):
        if pmu.enable_pmu:
            ecx |= raw.ecx & ECX1_PDCM
        if vmx_pebs_supported(host, pmu):
            ecx |= raw.ecx & ECX1_DTES64
            edx |= raw.edx & EDX1_DS
    if host.kernel_version >= (6, 14):
        ecx |= ECX1_HYPERVISOR
    return Regs(raw.eax, raw.ebx, ecx, edx)


def leaf_7(table: CpuidTable) -> list[dict[str, int]]:
    """Leaf 07H: subleaves 0..min(host EAX, 2), each flagged KVM_CPUID_FLAG_SIGNIFCANT_INDEX.

    No PMU bit survives: X86_FEATURE_HYBRID_CPU (EDX[15]) and X86_FEATURE_ARCH_LBR (EDX[19]) are not in
    kvm_cpu_cap_init(CPUID_7_EDX, ...) (KVM's arch-LBR series was never merged).
    """
    max_idx = min(table.get(0x7).eax, 2)
    entries = [cpuid_entry(0x7, 0, Regs(eax=max_idx), KVM_CPUID_FLAG_SIGNIFCANT_INDEX)]
    entries += [cpuid_entry(0x7, sub, flags=KVM_CPUID_FLAG_SIGNIFCANT_INDEX) for sub in range(1, max_idx + 1)]
    return entries


def leaf_a(table: CpuidTable, pmu: KvmPmu) -> Regs:
    """Leaf 0AH: zero without enable_pmu or X86_FEATURE_ARCH_PERFMON (never set on AMD); else kvm_pmu_cap's version,
    GP count/width, mask length, EBX = events_mask, ECX = 0, EDX fixed count/width plus AnyThread-deprecated
    whenever version != 0."""
    if not pmu.enable_pmu or not is_intel(table):
        return Regs()
    cap = pmu.cap
    eax = cap.version | cap.num_counters_gp << 8 | cap.bit_width_gp << 16 | cap.events_mask_len << 24
    edx = cap.num_counters_fixed | cap.bit_width_fixed << 5 | (EDX_A_ANYTHREAD_DEPRECATED if cap.version else 0)
    return Regs(eax, cap.events_mask, 0, edx)


def ext_max_leaf(table: CpuidTable) -> int:
    """Case 0x80000000: min(host, 0x80000022); raised to 0x80000021 when the host has 8000001DH and LFENCE is
    serializing (X86_FEATURE_LFENCE_RDTSC, which the kernel sets on every AMD family 10h+ CPU here)."""
    host_max = table.get(0x80000000).eax
    limit = min(host_max, KVM_MAX_EXT_LEAF)
    if limit >= 0x8000001D and not is_intel(table):
        limit = max(limit, 0x80000021)
    return limit


def leaf_80000001(table: CpuidTable, pmu: KvmPmu) -> Regs:
    """8000_0001H: EAX passes, EBX loses bits 27:16; ECX keeps PERFCTR_CORE when svm_set_cpu_caps() set it. IBS
    (ECX[10]) is commented out in kvm_set_cpu_caps() (IBS virtualization is not upstream); PERFCTR_NB/LLC are not
    in KVM's list."""
    raw = table.get(0x80000001)
    ecx = ECX_EXT1_PERFCTR_CORE if pmu.perfctr_core else 0
    return Regs(raw.eax, raw.ebx & ~0x0FFF0000, ecx, 0)


def leaf_80000022(table: CpuidTable, pmu: KvmPmu) -> Regs:
    """8000_0022H: ECX = EDX = 0; zero without enable_pmu or PERFMON_V2; else EAX = host & {PERFMON_V2} and
    EBX.num_core_pmc = kvm_pmu_cap.num_counters_gp (LBRv2 and DF counters are not offered)."""
    if not pmu.enable_pmu or not pmu.perfmon_v2:
        return Regs()
    return Regs(table.get(0x80000022).eax & EAX_EXT22_PERFMON_V2, pmu.cap.num_counters_gp, 0, 0)


def supported_cpuid(host: Host, table: CpuidTable, pmu: KvmPmu) -> list[dict[str, int]]:
    """The KVM_GET_SUPPORTED_CPUID entries of the PMU leaves (harness.host.kvm_offer.OFFER_LEAVES), in KVM's order.

    get_cpuid_func() walks every function from 0 to min(host max, 0x24) and from 0x80000000 to
    :func:`ext_max_leaf`; leaves without a case (1CH, 8000_001BH) fall to the default and read zero.
    """
    basic_max = min(table.get(0x0).eax, KVM_MAX_BASIC_LEAF)
    ext_max = ext_max_leaf(table)
    leaf0 = table.get(0x0)
    ext0 = table.get(0x80000000)
    entries: list[dict[str, int]] = [cpuid_entry(0x0, regs=replace(leaf0, eax=basic_max))]
    for function in sorted(kvm_offer.OFFER_LEAVES):
        if function == 0x0 or (function < 0x80000000 and function > basic_max) or function > ext_max:
            continue
        if function == 0x1:
            entries.append(cpuid_entry(0x1, regs=leaf_1(host, table, pmu)))
        elif function == 0x7:
            entries += leaf_7(table)
        elif function == 0xA:
            entries.append(cpuid_entry(0xA, regs=leaf_a(table, pmu)))
        elif function == 0x80000000:
            entries.append(cpuid_entry(0x80000000, regs=replace(ext0, eax=ext_max)))
        elif function == 0x80000001:
            entries.append(cpuid_entry(0x80000001, regs=leaf_80000001(table, pmu)))
        elif function == 0x80000022:
            entries.append(cpuid_entry(0x80000022, regs=leaf_80000022(table, pmu)))
        else:  # 1CH, 23H (never reached here: no host has it), 8000_001BH: default case, all zero
            entries.append(cpuid_entry(function))
    return entries


def kvm_check_extensions(pmu: KvmPmu) -> dict[str, int]:
    """kvm_vm_ioctl_check_extension(): PMU_CAPABILITY = enable_pmu ? KVM_CAP_PMU_VALID_MASK : 0 (enable_pmu after
    kvm_init_pmu_capability(), so 0 on hybrid hosts); EVENT_FILTER and MASKED_EVENTS are in the "r = 1" list."""
    return {
        "KVM_CAP_PMU_CAPABILITY": KVM_PMU_CAP_DISABLE if pmu.enable_pmu else 0,
        "KVM_CAP_PMU_EVENT_FILTER": 1,
        "KVM_CAP_PMU_EVENT_MASKED_EVENTS": 1,
    }


def offer(host: Host, table: CpuidTable) -> dict[str, Any]:
    """The ``kvm_offer`` object, through harness.host.kvm_offer.offer_from() like doctor builds it from /dev/kvm."""
    pmu = kvm_init_pmu_capability(host, table)
    built = kvm_offer.offer_from(
        supported_cpuid(host, table, pmu), supported_perf_capabilities(host, table, pmu), kvm_check_extensions(pmu)
    )
    built["api_version"] = kvm_offer.KVM_API_VERSION
    return built


# --- the rest of doctor ------------------------------------------------------------------------------------------


def module_flag(value: bool) -> str:
    """How sysfs prints a bool module parameter (param_get_bool)."""
    return "Y" if value else "N"


def sysfs_values(host: Host, table: CpuidTable) -> dict[str, str]:
    """The files hostfacts reads, relative to /sys/module, /proc/sys/kernel and /sys/bus/event_source/devices.

    Module parameters are the variables after module init: kvm_init_pmu_capability() writes enable_pmu = false on
    a hybrid CPU and enable_mediated_pmu = false where unsupported, so sysfs reads N (param_get_bool prints Y/N).
    enable_mediated_pmu exists only from 7.0. force_emulation_prefix is an int parameter (x86.c
    module_param(force_emulation_prefix, int, 0644)), so it reads "0", not "N". Sysctls are kernel defaults
    (perf_event_paranoid 2, perf_cpu_time_max_percent 25, perf_event_max_sample_rate 100000) except nmi_watchdog,
    0 as kvm-unit-tests' PMU tests require (1 in the nmi-watchdog variant); each core PMU's mux interval is
    PERF_CPU_HRTIMER = 1000/HZ ms, HZ=250 (Debian/Ubuntu configs): 4.
    """
    vendor = "kvm_intel" if is_intel(table) else "kvm_amd"
    pmu = kvm_init_pmu_capability(host, table)
    files = {
        "module/kvm/parameters/enable_pmu": module_flag(pmu.enable_pmu),
        "module/kvm/parameters/ignore_msrs": host.ignore_msrs,
        "module/kvm/parameters/force_emulation_prefix": "0",
        "sys_kernel/nmi_watchdog": host.nmi_watchdog,
        "sys_kernel/perf_event_paranoid": "2",
        "sys_kernel/perf_cpu_time_max_percent": "25",
        "sys_kernel/perf_event_max_sample_rate": "100000",
    }
    if host.kernel_version >= (7, 0):
        files[f"module/{vendor}/parameters/enable_mediated_pmu"] = module_flag(pmu.enable_mediated_pmu)
    for name in host.cpu.host_pmus:
        files[f"pmus/{name}/type"] = "0"
        if name in hostfacts.CORE_PMU_NAMES:
            files[f"pmus/{name}/perf_event_mux_interval_ms"] = "4"
    return files


@contextmanager
def fake_host(host: Host, table: CpuidTable) -> Iterator[Path]:
    """Lay the host's sysfs/procfs files out in a temporary tree and point hostfacts at it, so kvm, sysctls and
    host_pmu come from hostfacts' own readers (kvm_facts(), sysctl_facts(), host_pmu_facts())."""
    with tempfile.TemporaryDirectory(prefix="vpmu-host-") as tmp:
        root = Path(tmp)
        vendor = "kvm_intel" if is_intel(table) else "kvm_amd"
        (root / "module" / vendor / "parameters").mkdir(parents=True)  # loaded even without a parameter we read
        for relative, text in sysfs_values(host, table).items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
        (root / "kvm").touch()  # /dev/kvm: present and read-write for the user running doctor
        with (
            mock.patch.object(hostfacts, "SYSFS_MODULES", root / "module"),
            mock.patch.object(hostfacts, "SYSFS_PMUS", root / "pmus"),
            mock.patch.object(hostfacts, "KVM_DEVICE", root / "kvm"),
        ):
            yield root


def kvm_facts(root: Path) -> dict[str, Any]:
    """hostfacts.kvm_facts() over the fake tree; the device path is the real one."""
    facts = hostfacts.kvm_facts()
    facts["device"] = str(kvm_offer.KVM_DEVICE)
    return facts


def cpuinfo_flags(table: CpuidTable) -> set[str]:
    """The /proc/cpuinfo flags choose_accel() looks at: vmx (CPUID.1:ECX[5]), svm (8000_0001H ECX[2])."""
    flags = set()
    if table.get(0x1).ecx & ECX1_VMX:
        flags.add("vmx")
    if not is_intel(table) and table.get(0x80000001).ecx & ECX_EXT1_SVM:
        flags.add("svm")
    return flags


def perf_facts(host: Host) -> dict[str, Any]:
    """hostfacts.perf_facts(): the distribution's perf of the running kernel; `perf stat -x, -e instructions:u --
    true` counts (on a hybrid host the P-core event, where `true` ran, is the line shown)."""
    event = "cpu_core/instructions:u/" if "cpu_atom" in host.cpu.host_pmus else "instructions:u"
    line = f"203548,,{event},412036,100.00,,"
    return {
        "path": PERF_PATH,
        "version": host.kernel,
        "hw_events_count": True,
        "hw_events_detail": f"perf stat -e instructions:u: {line}",
        "paranoid": "2",
        "nmi_watchdog": host.nmi_watchdog,
    }


def cpu_facts(host: Host, table: CpuidTable) -> dict[str, Any]:
    """The ``cpu`` object of hostfacts.collect(), read as root (CPUID through /dev/cpu/0/cpuid, MSR 0x345)."""
    caps = decode_caps(doctor_cpuid(table))
    perf_caps = None
    if caps.vendor == "GenuineIntel":
        assert host.cpu.perf_capabilities is not None
        perf_caps = {"value": decode_perf_capabilities(host.cpu.perf_capabilities), "reason": None}
    return {
        "model_name": host.cpu.model_name,
        "vendor": caps.vendor,
        "microcode": host.cpu.microcode,
        "virt_flags": sorted(cpuinfo_flags(table) & {"vmx", "svm", "hypervisor"}),
        # /sys/devices/system/cpu/smt/active: every modelled host runs with SMT on (the distribution default).
        "smt_active": True,
        "cpuid_source": str(hostfacts.CPUID_DEVICE),
        "caps": caps.to_json(),
        "perf_capabilities": perf_caps,
    }


def doctor(host: Host) -> dict[str, Any]:
    """The whole ``doctor --json`` object of one host, keys in hostfacts.collect()'s order."""
    table = host_cpuid(host.cpu)
    with fake_host(host, table) as root:
        kvm = kvm_facts(root)
        sysctls = hostfacts.sysctl_facts(root / "sys_kernel", root / "pmus")
        host_pmu = hostfacts.host_pmu_facts(decode_caps(doctor_cpuid(table)))
    choice = hostfacts.choose_accel(kvm, cpuinfo_flags(table), QEMU)
    return {
        "accel": choice.accel,
        "accel_reason": choice.reason,
        "vpmu_mode": hostfacts.vpmu_mode(choice.accel, kvm),
        "hostname": host.name,
        "kernel": host.kernel,
        "cpu": cpu_facts(host, table),
        "kvm": kvm,
        "kvm_offer": offer(host, table),
        "kvm_offer_reason": None,
        "sysctls": sysctls,
        "host_pmu": host_pmu,
        "perf": perf_facts(host),
        "qemu": dict(QEMU),
    }


def render(facts: dict[str, Any]) -> str:
    """The file text: indented JSON, as `doctor --json` prints it, plus a final newline."""
    return json.dumps(facts, indent=2) + "\n"


def build_all() -> dict[str, str]:
    """{file name: file text} of every host."""
    return {f"{host.name}.json": render(doctor(host)) for host in HOSTS}


def main() -> int:
    if not CPUID_DIR.is_dir():
        print(f"{CPUID_DIR}: the shared CPUID dumps are missing", file=sys.stderr)
        return 1
    files = build_all()
    for stale in set(p.name for p in HERE.glob("*.json")) - set(files):
        (HERE / stale).unlink()
    for name, text in files.items():
        (HERE / name).write_text(text)
    print(f"wrote {len(files)} host files to {HERE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
