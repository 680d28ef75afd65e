"""Decode PMU capabilities from CPUID (and IA32_PERF_CAPABILITIES) into one frozen record.

Every field is read through the table of named bit ranges below, so each bit position is written once, next to
its source. ``harness caps``, ``harness doctor`` and the guest checks all read the same :class:`PmuCaps`.

Sources (bit positions re-checked against the kernel headers named):
  SDM   = Intel SDM Vol. 2A, "CPUID—CPU Identification" (leaves 01H, 07H, 0AH, 1CH) and Vol. 3B ch. 20
          "Performance Monitoring" (architectural events, IA32_PERF_CAPABILITIES);
  APM   = AMD APM Vol. 3, Appendix E "Obtaining Processor Information Via the CPUID Instruction"
          (Fn8000_0001, Fn8000_001B, Fn8000_0022);
  Linux = arch/x86/include/asm/cpufeatures.h, msr-index.h (PERF_CAP_*), perf_event.h (union cpuid10_*,
          cpuid28_*), arch/x86/events/amd/{core,ibs,uncore}.c.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from harness.cpu.cpuid_dump import CpuidTable


class Field(NamedTuple):
    """One CPUID bit range: ``(leaf, subleaf, reg, lo, hi)``, inclusive."""

    leaf: int
    subleaf: int
    reg: str
    lo: int
    hi: int

    def read(self, table: CpuidTable) -> int:
        return table.field(self.leaf, self.subleaf, self.reg, self.lo, self.hi)


def _bit(leaf: int, subleaf: int, reg: str, bit: int) -> Field:
    return Field(leaf, subleaf, reg, bit, bit)


# --- leaf 01H (SDM Vol. 2A table "Feature Information Returned in the ECX Register"; Linux cpufeatures.h) ----
STEPPING = Field(0x1, 0, "eax", 0, 3)
BASE_MODEL = Field(0x1, 0, "eax", 4, 7)
BASE_FAMILY = Field(0x1, 0, "eax", 8, 11)
EXT_MODEL = Field(0x1, 0, "eax", 16, 19)
EXT_FAMILY = Field(0x1, 0, "eax", 20, 27)
PDCM = _bit(0x1, 0, "ecx", 15)  # X86_FEATURE_PDCM: IA32_PERF_CAPABILITIES exists
HYPERVISOR = _bit(0x1, 0, "ecx", 31)  # X86_FEATURE_HYPERVISOR: "reserved for use by hypervisors"
# --- leaf 07H sub-leaf 0 EDX -------------------------------------------------------------------------------
HYBRID = _bit(0x7, 0, "edx", 15)  # X86_FEATURE_HYBRID_CPU
ARCH_LBR = _bit(0x7, 0, "edx", 19)  # X86_FEATURE_ARCH_LBR
# --- leaf 0AH: architectural performance monitoring (SDM Vol. 2A; Linux union cpuid10_eax/ebx/edx) ---------
PERFMON_VERSION = Field(0xA, 0, "eax", 0, 7)
GP_COUNTERS = Field(0xA, 0, "eax", 8, 15)
GP_WIDTH = Field(0xA, 0, "eax", 16, 23)
EVENT_VECTOR_LEN = Field(0xA, 0, "eax", 24, 31)
EVENTS_UNAVAILABLE = Field(0xA, 0, "ebx", 0, 31)  # bit i set = architectural event i NOT available
FIXED_BITMAP = Field(0xA, 0, "ecx", 0, 31)  # v5+: bit i = fixed counter i supported
FIXED_CONTIGUOUS = Field(0xA, 0, "edx", 0, 4)  # v2+: number of contiguous fixed counters
FIXED_WIDTH = Field(0xA, 0, "edx", 5, 12)
# Architectural event index in EBX (SDM Vol. 3B, "Pre-defined Architectural Performance Events").
ARCH_EVENTS = {
    "core_cycles": 0,
    "instructions": 1,
    "ref_cycles": 2,
    "llc_references": 3,
    "llc_misses": 4,
    "branch_instructions": 5,
    "branch_misses": 6,
    "topdown_slots": 7,
}
# --- leaf 1CH: architectural LBR (SDM Vol. 2A; Linux union cpuid28_eax/ebx/ecx) ----------------------------
ARCH_LBR_DEPTH_MASK = Field(0x1C, 0, "eax", 0, 7)  # bit n set = depth 8*(n+1) supported
ARCH_LBR_CPL_FILTER = _bit(0x1C, 0, "ebx", 0)
ARCH_LBR_BRANCH_FILTER = _bit(0x1C, 0, "ebx", 1)
ARCH_LBR_CALL_STACK = _bit(0x1C, 0, "ebx", 2)
ARCH_LBR_MISPREDICT = _bit(0x1C, 0, "ecx", 0)
ARCH_LBR_TIMED = _bit(0x1C, 0, "ecx", 1)
ARCH_LBR_BRANCH_TYPE = _bit(0x1C, 0, "ecx", 2)
# --- AMD Fn8000_0001 ECX (APM Vol. 3 App. E; Linux cpufeatures.h word 6) -----------------------------------
AMD_IBS = _bit(0x80000001, 0, "ecx", 10)  # X86_FEATURE_IBS
AMD_PERFCTR_CORE = _bit(0x80000001, 0, "ecx", 23)  # X86_FEATURE_PERFCTR_CORE: 6 core counters
AMD_PERFCTR_NB = _bit(0x80000001, 0, "ecx", 24)  # X86_FEATURE_PERFCTR_NB
AMD_PERFCTR_LLC = _bit(0x80000001, 0, "ecx", 28)  # X86_FEATURE_PERFCTR_LLC
# --- AMD Fn8000_0022 (APM; Linux union cpuid_0x80000022_ebx) ------------------------------------------------
AMD_PERFMON_V2 = _bit(0x80000022, 0, "eax", 0)
AMD_LBR_V2 = _bit(0x80000022, 0, "eax", 1)
AMD_LBR_PMC_FREEZE = _bit(0x80000022, 0, "eax", 2)
AMD_NUM_CORE_PMC = Field(0x80000022, 0, "ebx", 0, 3)
AMD_LBR_V2_STACK_SZ = Field(0x80000022, 0, "ebx", 4, 9)
AMD_NUM_DF_PMC = Field(0x80000022, 0, "ebx", 10, 15)
# --- AMD Fn8000_001B EAX: IBS capabilities (APM; Linux IBS_CAPS_* in asm/perf_event.h) ---------------------
AMD_IBS_CAPS = Field(0x8000001B, 0, "eax", 0, 31)
IBS_CAP_BITS = {
    "avail": 0,  # IBSFFV: feature flags valid (the kernel's IBS_CAPS_AVAIL)
    "fetch": 1,
    "op": 2,
    "rd_wr_op_cnt": 3,
    "op_cnt": 4,
    "branch_target": 5,
    "op_cnt_ext": 6,
    "rip_invalid_chk": 7,
    "op_branch_fuse": 8,
    "fetch_ctl_extd": 9,
    "op_data4": 10,
    "zen4": 11,
}
# AMD core counter counts when CPUID does not give one (Linux arch/x86/events/amd/core.c: AMD64_NUM_COUNTERS
# = 4 legacy counters, AMD64_NUM_COUNTERS_CORE = 6 with PerfCtrExtCore); NB counters: NUM_COUNTERS_NB = 4
# (amd/uncore.c) unless PerfMonV2 reports the DF counter count.
AMD_LEGACY_COUNTERS = 4
AMD_CORE_EXT_COUNTERS = 6
AMD_NB_COUNTERS = 4


@dataclass(frozen=True)
class ArchPerfmon:
    """CPUID.0AH: Intel architectural performance monitoring."""

    version: int
    gp_counters: int
    gp_width: int
    fixed_counters: int
    fixed_width: int
    fixed_counter_mask: int
    events: dict[str, bool]


@dataclass(frozen=True)
class ArchLbr:
    """CPUID.1CH: architectural LBR, present only when CPUID.07H.0:EDX[19] is set."""

    depths: list[int]
    cpl_filter: bool
    branch_filter: bool
    call_stack: bool
    mispredict: bool
    timed: bool
    branch_type: bool


@dataclass(frozen=True)
class AmdIbs:
    """CPUID 8000001BH EAX: IBS feature bits; ``caps`` is the raw EAX."""

    fetch: bool
    op: bool
    rd_wr_op_cnt: bool
    op_cnt: bool
    branch_target: bool
    op_cnt_ext: bool
    rip_invalid_chk: bool
    op_branch_fuse: bool
    fetch_ctl_extd: bool
    op_data4: bool
    zen4: bool
    caps: int


@dataclass(frozen=True)
class AmdPmu:
    """AMD core/NB/LLC counter extensions, PerfMonV2, LBRv2 and IBS."""

    perfctr_core: bool
    perfctr_nb: bool
    perfctr_llc: bool
    perfmon_v2: bool
    lbr_v2: bool
    lbr_pmc_freeze: bool
    core_counters: int
    lbr_v2_depth: int
    nb_counters: int
    ibs: AmdIbs | None


@dataclass(frozen=True)
class PmuCaps:
    """Everything the suite decides from CPUID; the JSON form is the ``harness caps --json`` interface."""

    vendor: str
    family: int
    model: int
    stepping: int
    hypervisor: str | None
    pdcm: bool
    hybrid: bool
    arch_perfmon: ArchPerfmon | None
    arch_lbr: ArchLbr | None
    amd: AmdPmu | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def vendor_of(table: CpuidTable) -> str:
    """Return the 12-character vendor string from leaf 0 (EBX, EDX, ECX order)."""
    regs = table.get(0)
    raw = b"".join(v.to_bytes(4, "little") for v in (regs.ebx, regs.edx, regs.ecx))
    return raw.decode("ascii", errors="replace").rstrip("\0")


def display_family_model(table: CpuidTable, vendor: str) -> tuple[int, int]:
    """Return (family, model) with the extended fields folded in.

    SDM Vol. 2A, CPUID leaf 01H "Version Information": DisplayFamily = Family + ExtendedFamily when Family = 0FH;
    DisplayModel = ExtendedModel<<4 + Model when Family is 06H or 0FH. AMD APM Vol. 3 (CPUID Fn0000_0001_EAX)
    folds ExtendedModel in only when BaseFamily = 0FH.
    """
    base_family = BASE_FAMILY.read(table)
    family = base_family + (EXT_FAMILY.read(table) if base_family == 0xF else 0)
    ext_model_families = (0xF,) if vendor == "AuthenticAMD" else (0x6, 0xF)
    model = BASE_MODEL.read(table)
    if base_family in ext_model_families:
        model += EXT_MODEL.read(table) << 4
    return family, model


def hypervisor_of(table: CpuidTable) -> str | None:
    """Return the hypervisor signature (leaf 40000000H EBX..EDX) when CPUID.1:ECX[31] is set, else None."""
    if not HYPERVISOR.read(table):
        return None
    regs = table.leaves.get((0x40000000, 0))
    if regs is None:
        return "unknown"
    raw = b"".join(v.to_bytes(4, "little") for v in (regs.ebx, regs.ecx, regs.edx))
    return raw.decode("ascii", errors="replace").rstrip("\0") or "unknown"


def decode_arch_perfmon(table: CpuidTable) -> ArchPerfmon | None:
    """Decode CPUID.0AH; None when the leaf is absent or reports version 0 (no architectural PMU)."""
    version = PERFMON_VERSION.read(table)
    if version == 0:
        return None
    vector_len = EVENT_VECTOR_LEN.read(table)
    unavailable = EVENTS_UNAVAILABLE.read(table)
    # SDM: event i is available iff i < EAX[31:24] and EBX[i] = 0.
    events = {name: idx < vector_len and not (unavailable >> idx) & 1 for name, idx in ARCH_EVENTS.items()}
    # SDM: EDX (fixed counters) is valid for version > 1; ECX (fixed-counter bitmap) for version >= 5.
    # Fixed counter i exists iff ECX[i] or i < EDX[4:0].
    contiguous = FIXED_CONTIGUOUS.read(table) if version > 1 else 0
    bitmap = FIXED_BITMAP.read(table) if version >= 5 else 0
    mask = bitmap | ((1 << contiguous) - 1)
    return ArchPerfmon(
        version=version,
        gp_counters=GP_COUNTERS.read(table),
        gp_width=GP_WIDTH.read(table),
        fixed_counters=bin(mask).count("1"),
        fixed_width=FIXED_WIDTH.read(table) if version > 1 else 0,
        fixed_counter_mask=mask,
        events=events,
    )


def decode_arch_lbr(table: CpuidTable) -> ArchLbr | None:
    """Decode CPUID.1CH, only when CPUID.07H.0:EDX[19] (Arch LBR) is set."""
    if not ARCH_LBR.read(table):
        return None
    depth_mask = ARCH_LBR_DEPTH_MASK.read(table)
    return ArchLbr(
        depths=[8 * (n + 1) for n in range(8) if (depth_mask >> n) & 1],
        cpl_filter=bool(ARCH_LBR_CPL_FILTER.read(table)),
        branch_filter=bool(ARCH_LBR_BRANCH_FILTER.read(table)),
        call_stack=bool(ARCH_LBR_CALL_STACK.read(table)),
        mispredict=bool(ARCH_LBR_MISPREDICT.read(table)),
        timed=bool(ARCH_LBR_TIMED.read(table)),
        branch_type=bool(ARCH_LBR_BRANCH_TYPE.read(table)),
    )


def decode_amd_ibs(table: CpuidTable) -> AmdIbs | None:
    """Decode CPUID 8000001BH; None unless 80000001H:ECX[10] and 8000001BH EAX[0] (IBSFFV) are both set."""
    caps = AMD_IBS_CAPS.read(table)
    if not AMD_IBS.read(table) or not caps & 1:
        return None
    flags = {name: bool((caps >> bit) & 1) for name, bit in IBS_CAP_BITS.items() if name != "avail"}
    return AmdIbs(**flags, caps=caps)


def decode_amd(table: CpuidTable, vendor: str) -> AmdPmu | None:
    """Decode the AMD PMU leaves; None for other vendors (Hygon is treated as AMD: same leaves)."""
    if vendor not in ("AuthenticAMD", "HygonGenuine"):
        return None
    perfctr_core = bool(AMD_PERFCTR_CORE.read(table))
    perfctr_nb = bool(AMD_PERFCTR_NB.read(table))
    perfmon_v2 = bool(AMD_PERFMON_V2.read(table))
    lbr_v2 = bool(AMD_LBR_V2.read(table))
    # Linux amd/core.c: with PerfMonV2 the counter count is CPUID 80000022H EBX[3:0]; else 6 with
    # PerfCtrExtCore, else the 4 legacy counters.
    if perfmon_v2:
        core_counters = AMD_NUM_CORE_PMC.read(table)
    elif perfctr_core:
        core_counters = AMD_CORE_EXT_COUNTERS
    else:
        core_counters = AMD_LEGACY_COUNTERS
    nb_counters = AMD_NUM_DF_PMC.read(table) if perfmon_v2 else AMD_NB_COUNTERS if perfctr_nb else 0
    return AmdPmu(
        perfctr_core=perfctr_core,
        perfctr_nb=perfctr_nb,
        perfctr_llc=bool(AMD_PERFCTR_LLC.read(table)),
        perfmon_v2=perfmon_v2,
        lbr_v2=lbr_v2,
        lbr_pmc_freeze=bool(AMD_LBR_PMC_FREEZE.read(table)),
        core_counters=core_counters,
        lbr_v2_depth=AMD_LBR_V2_STACK_SZ.read(table) if lbr_v2 else 0,
        nb_counters=nb_counters,
        ibs=decode_amd_ibs(table),
    )


def decode_caps(table: CpuidTable) -> PmuCaps:
    """Decode every PMU-relevant CPUID field of one logical CPU."""
    vendor = vendor_of(table)
    family, model = display_family_model(table, vendor)
    return PmuCaps(
        vendor=vendor,
        family=family,
        model=model,
        stepping=STEPPING.read(table),
        hypervisor=hypervisor_of(table),
        pdcm=bool(PDCM.read(table)),
        hybrid=bool(HYBRID.read(table)),
        arch_perfmon=decode_arch_perfmon(table),
        arch_lbr=decode_arch_lbr(table),
        amd=decode_amd(table, vendor),
    )


# --- IA32_PERF_CAPABILITIES (MSR 0x345) --------------------------------------------------------------------
# SDM Vol. 3B, "IA32_PERF_CAPABILITIES"; Linux msr-index.h PERF_CAP_LBR_FMT (0x3f), PERF_CAP_PEBS_TRAP (bit 6),
# PERF_CAP_ARCH_REG (7), PERF_CAP_PEBS_FORMAT (0xf00), PERF_CAP_FREEZE_IN_SMM (12), PERF_CAP_FW_WRITES (13),
# PERF_CAP_PEBS_BASELINE (14), PERF_CAP_PERF_METRICS (15), PERF_CAP_PT_IDX (16), PERF_CAP_PEBS_TIMING_INFO (17).
PERF_CAP_FIELDS: dict[str, tuple[int, int]] = {
    "lbr_format": (0, 5),
    "pebs_trap": (6, 6),
    "pebs_arch_regs": (7, 7),
    "pebs_format": (8, 11),
    "smm_freeze": (12, 12),
    "full_width_write": (13, 13),
    "pebs_baseline": (14, 14),
    "perf_metrics": (15, 15),
    "pebs_output_pt": (16, 16),
    "pebs_timing_info": (17, 17),
}
PERF_CAP_MAX = (1 << 64) - 1


def decode_perf_capabilities(value: int) -> dict[str, int | bool]:
    """Decode IA32_PERF_CAPABILITIES; one-bit fields become booleans, wider ones integers. ``raw`` is kept."""
    out: dict[str, int | bool] = {"raw": value}
    for name, (lo, hi) in PERF_CAP_FIELDS.items():
        bits = (value >> lo) & ((1 << (hi - lo + 1)) - 1)
        out[name] = bool(bits) if lo == hi else bits
    return out
