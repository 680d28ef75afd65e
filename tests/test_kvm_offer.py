"""kvm_offer: what KVM offers guests, asked from /dev/kvm for real here, and decoded from recorded answers.

The recorded answers are built the way KVM builds them from a host's CPUID (the real dumps in shared/data/cpuid):
arch/x86/kvm/cpuid.c __do_cpuid_func() and kvm_set_cpu_caps(), arch/x86/kvm/pmu.c kvm_init_pmu_capability(),
arch/x86/events/core.c perf_get_x86_pmu_capability(), arch/x86/kvm/svm/svm.c svm_set_cpu_caps() and
arch/x86/kvm/vmx/vmx.c vmx_get_perf_capabilities() (read in torvalds/linux, kvm-x86/linux and the KVM list's
patches). Bits of registers the PMU decoder never reads are left zero: the fixtures claim nothing they do not model.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from harness.cpu.caps import decode_caps
from harness.cpu.cpuid_dump import CpuidTable, load_cpuid_dump
from harness.host import kvm_offer
from tests.helpers import CPUID_DIR

SPR = "GenuineIntel00806F8_SapphireRapids_05_CPUID.txt"
GENOA = "AuthenticAMD0A10F11_K19_Genoa_01_CPUID.txt"

# struct kvm_cpuid_entry2 (arch/x86/include/uapi/asm/kvm.h), packed here independently of the module under test:
# function, index, flags, eax, ebx, ecx, edx, padding[3].
ENTRY2 = "<7I3I"
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # sic, the uapi spelling
HYPERVISOR = 1 << 31  # CPUID.1:ECX[31], EMULATED_F(HYPERVISOR) in kvm_set_cpu_caps(CPUID_1_ECX)
PDCM = 1 << 15  # CPUID.1:ECX[15], F(PDCM) in kvm_set_cpu_caps(CPUID_1_ECX)
# Fn8000_0001 ECX PMU bits (APM Vol. 3 App. E; Linux cpufeatures.h word 6).
IBS, PERFCTR_CORE, PERFCTR_NB, PERFCTR_LLC = 1 << 10, 1 << 23, 1 << 24, 1 << 28
# IA32_PERF_CAPABILITIES fields, arch/x86/include/asm/msr-index.h.
PERF_CAP_LBR_FMT = 0x3F
PERF_CAP_PEBS_TRAP, PERF_CAP_ARCH_REG, PERF_CAP_PEBS_FORMAT = 1 << 6, 1 << 7, 0xF00
PERF_CAP_FW_WRITES, PERF_CAP_PEBS_BASELINE, PERF_CAP_PERF_METRICS = 1 << 13, 1 << 14, 1 << 15
PERF_CAP_PEBS_TIMING_INFO = 1 << 17
PERF_CAP_PEBS_MASK = (PERF_CAP_PEBS_TRAP | PERF_CAP_ARCH_REG | PERF_CAP_PEBS_FORMAT | PERF_CAP_PEBS_BASELINE
                      | PERF_CAP_PEBS_TIMING_INFO)  # fmt: skip


def entry(function: int, index: int = 0, eax: int = 0, ebx: int = 0, ecx: int = 0, edx: int = 0, flags: int = 0):
    """One struct kvm_cpuid_entry2 as KVM writes it (padding zero)."""
    return struct.pack(ENTRY2, function, index, flags, eax, ebx, ecx, edx, 0, 0, 0)


def kvm_cpuid2(entries: list[bytes]) -> bytes:
    """struct kvm_cpuid2 as KVM_GET_SUPPORTED_CPUID leaves it: nent rewritten to the entries filled."""
    return struct.pack("<II", len(entries), 0) + b"".join(entries)


def host(dump: str) -> CpuidTable:
    return load_cpuid_dump(CPUID_DIR / dump)


# --- KVM's transformations, one function per kernel function ------------------------------------------------------


def perf_pmu_capability_intel(table: CpuidTable) -> dict[str, int]:
    """arch/x86/events/core.c perf_get_x86_pmu_capability() on a non-hybrid Intel host.

    intel_pmu_init() takes version, GP count, counter width (cntval_bits), event mask length and EBX mask from
    CPUID.0AH; the fixed-counter count is the weight of the fixed counter mask (ECX bitmap | EDX[4:0] contiguous);
    bit_width_fixed is cntval_bits too, not EDX[12:5].
    """
    regs = table.get(0xA)
    version = regs.eax & 0xFF
    mask = (regs.ecx if version >= 5 else 0) | ((1 << (regs.edx & 0x1F)) - 1)
    width = (regs.eax >> 16) & 0xFF
    return {"version": version, "num_counters_gp": (regs.eax >> 8) & 0xFF, "num_counters_fixed": bin(mask).count("1"),
            "bit_width_gp": width, "bit_width_fixed": width, "events_mask": regs.ebx,
            "events_mask_len": regs.eax >> 24}  # fmt: skip


def kvm_init_pmu_capability(cap: dict[str, int], max_gp: int, max_fixed: int = 3) -> dict[str, int]:
    """arch/x86/kvm/pmu.c kvm_init_pmu_capability(), perf-based vPMU: version <= 2, GP <= pmu_ops->MAX_NR_GP_COUNTERS
    (KVM_MAX_NR_INTEL_GP_COUNTERS 8, KVM_MAX_NR_AMD_GP_COUNTERS 6), fixed <= KVM_MAX_NR_FIXED_COUNTERS (3)."""
    return {**cap, "version": min(cap["version"], 2), "num_counters_gp": min(cap["num_counters_gp"], max_gp),
            "num_counters_fixed": min(cap["num_counters_fixed"], max_fixed)}  # fmt: skip


def kvm_leaf_0xa(cap: dict[str, int]) -> tuple[int, int, int, int]:
    """arch/x86/kvm/cpuid.c __do_cpuid_func() case 0xa: union cpuid10_eax/edx from kvm_pmu_cap, ECX = 0,
    EDX[15] (AnyThread deprecated) set when version != 0."""
    eax = cap["version"] | cap["num_counters_gp"] << 8 | cap["bit_width_gp"] << 16 | cap["events_mask_len"] << 24
    edx = cap["num_counters_fixed"] | cap["bit_width_fixed"] << 5 | (1 << 15 if cap["version"] else 0)
    return eax, cap["events_mask"], 0, edx


def vmx_get_perf_capabilities(host_value: int, *, arch_lbr: bool, lbr_callstack: bool, pebs_supported: bool) -> int:
    """arch/x86/kvm/vmx/vmx.c vmx_get_perf_capabilities(), perf-based vPMU (enable_mediated_pmu off).

    FW_WRITES always; the host's LBR format only without arch LBR and with LBR call stack (x86_perf_get_lbr);
    the host's PEBS fields only when vmx_pebs_supported() (PEBS and perf's pebs_ept), and never PEBS baseline
    ("Disallow adaptive PEBS").
    """
    value = PERF_CAP_FW_WRITES
    if not arch_lbr and lbr_callstack:
        value |= host_value & PERF_CAP_LBR_FMT
    if pebs_supported:
        value |= host_value & PERF_CAP_PEBS_MASK
        value &= ~PERF_CAP_PEBS_BASELINE
    return value


# --- recorded answers ---------------------------------------------------------------------------------------------

# The SPR host's IA32_PERF_CAPABILITIES is not in the dump; this value has the fields the rule reads: LBR format
# 0x3f, PEBS trap + arch regs, PEBS format 4, full-width writes, PEBS baseline, perf metrics. The exact PEBS format
# number does not change what the rule keeps (bits 11:8 pass through).
SPR_HOST_PERF_CAPS = (0x3F | PERF_CAP_PEBS_TRAP | PERF_CAP_ARCH_REG | 4 << 8 | PERF_CAP_FW_WRITES
                      | PERF_CAP_PEBS_BASELINE | PERF_CAP_PERF_METRICS)  # fmt: skip


def spr_answer() -> tuple[bytes, int]:
    """KVM_GET_SUPPORTED_CPUID and PERF_CAPABILITIES of a perf-based KVM (enable_pmu=Y) on the SPR dump's host."""
    t = host(SPR)
    leaf0, leaf1, ext0, ext1 = t.get(0), t.get(1), t.get(0x80000000), t.get(0x80000001)
    cap = kvm_init_pmu_capability(perf_pmu_capability_intel(t), max_gp=8)
    sub7 = min(t.get(7).eax, 2)  # case 7: max_idx = min(eax, 2)
    entries = [
        entry(0, eax=min(leaf0.eax, 0x24), ebx=leaf0.ebx, ecx=leaf0.ecx, edx=leaf0.edx),  # case 0: min(eax, 0x24U)
        entry(1, eax=leaf1.eax, ebx=leaf1.ebx, ecx=(leaf1.ecx & PDCM) | HYPERVISOR),
        entry(2, eax=1),  # a leaf outside the PMU set: must not reach the offer's cpuid list
        # case 7: CPUID_7_EDX lists neither ARCH_LBR (19) nor HYBRID_CPU (15): both cleared.
        *(entry(7, i, eax=sub7 if i == 0 else 0, flags=KVM_CPUID_FLAG_SIGNIFCANT_INDEX) for i in range(sub7 + 1)),
        entry(0xA, 0, *kvm_leaf_0xa(cap)),
        entry(0x1C),  # no case 0x1c: the default case zeroes it (no arch LBR for guests)
        entry(0x40000000, eax=0x40000001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),  # KVM_CPUID_SIGNATURE
        entry(0x80000000, eax=min(ext0.eax, 0x80000022)),
        # LAHF_LM, ABM, 3DNOWPREFETCH / SYSCALL, NX, GBPAGES, RDTSCP, LM: all in KVM's 8000_0001 lists.
        entry(0x80000001, ecx=ext1.ecx, edx=ext1.edx),
    ]
    # SPR has arch LBR (CPUID.7.0:EDX[19]) and perf sets pebs_ept in intel_pmu_init()'s SPR case.
    perf_caps = vmx_get_perf_capabilities(SPR_HOST_PERF_CAPS, arch_lbr=True, lbr_callstack=True, pebs_supported=True)
    return kvm_cpuid2(entries), perf_caps


def genoa_answer(enable_pmu: bool = True) -> tuple[bytes, int]:
    """KVM_GET_SUPPORTED_CPUID and PERF_CAPABILITIES of a perf-based KVM on the Genoa dump's host."""
    t = host(GENOA)
    leaf0, leaf1, ext0, ext1, ext22 = t.get(0), t.get(1), t.get(0x80000000), t.get(0x80000001), t.get(0x80000022)
    # perf (amd_pmu_v2 init): version 2 with PerfMonV2, 80000022H EBX[3:0] core counters; kvm_init_pmu_capability
    # caps at KVM_MAX_NR_AMD_GP_COUNTERS = 6. svm_set_cpu_caps(): PERFCTR_CORE when >= AMD64_NUM_COUNTERS_CORE (6)
    # counters, PERFMON_V2 kept only with version 2 and PERFCTR_CORE; nothing of it without enable_pmu.
    gp = min(ext22.ebx & 0xF, 6) if enable_pmu else 0
    perfctr_core = enable_pmu and gp >= 6 and bool(ext1.ecx & PERFCTR_CORE)
    perfmon_v2 = perfctr_core and bool(ext22.eax & 1)
    sub7 = min(t.get(7).eax, 2)
    ext_max = min(ext0.eax, 0x80000022)  # case 0x80000000 (stays >= 0x80000021 when >= 0x8000001d)
    entries = [
        entry(0, eax=min(leaf0.eax, 0x24), ebx=leaf0.ebx, ecx=leaf0.ecx, edx=leaf0.edx),
        entry(1, eax=leaf1.eax, ebx=leaf1.ebx, ecx=(leaf1.ecx & PDCM) | HYPERVISOR),
        *(entry(7, i, eax=sub7 if i == 0 else 0, flags=KVM_CPUID_FLAG_SIGNIFCANT_INDEX) for i in range(sub7 + 1)),
        # case 0xa: zero without X86_FEATURE_ARCH_PERFMON (Genoa's own CPUID.0AH is all zero).
        entry(0xA),
        entry(0x80000000, eax=ext_max, ebx=ext0.ebx, ecx=ext0.ecx, edx=ext0.edx),
        # CPUID_8000_0001_ECX: "/* IBS */" is left out, PerfCtrExtNB/LLC are not listed, PERFCTR_CORE is VENDOR_F.
        entry(0x80000001, eax=ext1.eax, ecx=PERFCTR_CORE if perfctr_core else 0),
        entry(0x8000001B),  # no case 0x8000001b: the default case zeroes it
        # case 0x80000022: ECX = EDX = 0; EAX = host & CPUID_8000_0022_EAX (PERFMON_V2 only: LbrExtV2 and
        # LbrAndPmcFreeze dropped); EBX.num_core_pmc = kvm_pmu_cap.num_counters_gp; zero when PERFMON_V2 is off.
        entry(0x80000022, eax=1 if perfmon_v2 else 0, ebx=gp if perfmon_v2 else 0),
    ]
    # x86.c kvm_get_feature_msr(): MSR_IA32_PERF_CAPABILITIES answers kvm_caps.supported_perf_cap, which only
    # vmx_set_cpu_caps() fills: 0 on AMD.
    return kvm_cpuid2(entries), 0


def offer_of(answer: tuple[bytes, int], caps: dict[str, int] | None = None) -> dict:
    raw, perf_caps = answer
    return kvm_offer.offer_from(kvm_offer.parse_cpuid2(raw), perf_caps, caps or {})


def test_spr_perf_based_offer():
    raw, perf_caps = spr_answer()
    leaves = [struct.unpack_from(ENTRY2, raw, 8 + i * 40) for i in range(struct.unpack_from("<I", raw)[0])]
    assert next(e[3:7] for e in leaves if e[0] == 0xA) == (0x08300802, 0, 0, 0x8603)  # leaf 0AH as KVM writes it
    o = offer_of((raw, perf_caps))
    pmu = o["pmu"]
    assert (pmu["vendor"], pmu["family"], pmu["model"]) == ("GenuineIntel", 6, 0x8F)
    # Host: v5, 8 GP x 48, 4 fixed (ECX bitmap 0xf). KVM: v2, 8 GP x 48, 3 fixed x 48, bitmap ignored below v5.
    assert decode_caps(host(SPR)).arch_perfmon.fixed_counters == 4
    assert pmu["arch_perfmon"] == {
        "version": 2, "gp_counters": 8, "gp_width": 48, "fixed_counters": 3, "fixed_width": 48,
        "fixed_counter_mask": 0b111, "events": dict.fromkeys(
            ("core_cycles", "instructions", "ref_cycles", "llc_references", "llc_misses", "branch_instructions",
             "branch_misses", "topdown_slots"), True),
    }  # fmt: skip
    assert decode_caps(host(SPR)).arch_lbr is not None and pmu["arch_lbr"] is None  # KVM gives no arch LBR
    assert pmu["pdcm"] is True and pmu["hybrid"] is False and pmu["amd"] is None
    assert pmu["hypervisor"] == "unknown"  # 40000000H is not among the kept leaves (the contract)
    assert [(e["function"], e["index"]) for e in o["cpuid"]] == [
        (0, 0), (1, 0), (7, 0), (7, 1), (7, 2), (0xA, 0), (0x1C, 0), (0x80000000, 0), (0x80000001, 0)]  # fmt: skip
    # PERF_CAPABILITIES: FW_WRITES + the PEBS fields; no LBR format (arch LBR host), no baseline, no perf metrics.
    assert o["perf_capabilities"] == PERF_CAP_FW_WRITES | PERF_CAP_PEBS_TRAP | PERF_CAP_ARCH_REG | 4 << 8
    decoded = o["perf_capabilities_decoded"]
    assert decoded["full_width_write"] and decoded["pebs_format"] == 4 and decoded["lbr_format"] == 0
    assert not decoded["pebs_baseline"] and not decoded["perf_metrics"]


def test_genoa_perf_based_offer():
    o = offer_of(genoa_answer())
    host_amd = decode_caps(host(GENOA)).amd
    assert host_amd.ibs is not None and host_amd.perfctr_nb and host_amd.lbr_v2  # the host has them, KVM drops them
    assert o["pmu"]["vendor"] == "AuthenticAMD" and o["pmu"]["arch_perfmon"] is None
    assert o["pmu"]["amd"] == {
        "perfctr_core": True, "perfctr_nb": False, "perfctr_llc": False, "perfmon_v2": True, "lbr_v2": False,
        "lbr_pmc_freeze": False, "core_counters": 6, "lbr_v2_depth": 0, "nb_counters": 0, "ibs": None,
    }  # fmt: skip
    assert [e["function"] for e in o["cpuid"]] == [0, 1, 7, 7, 0xA, 0x80000000, 0x80000001, 0x8000001B, 0x80000022]
    assert o["perf_capabilities"] == 0 and o["perf_capabilities_decoded"]["raw"] == 0


def test_genoa_without_enable_pmu_decodes_to_legacy_counters():
    """kvm.enable_pmu=N on AMD: no PerfCtrExtCore, no PerfMonV2, so CPUID alone reads as the 4 legacy counters
    (AMD has no CPUID bit for "no PMU"); only KVM_CAP_PMU_CAPABILITY = 0 (x86.c: enable_pmu ? mask : 0) says so."""
    o = offer_of(genoa_answer(enable_pmu=False), {"KVM_CAP_PMU_CAPABILITY": 0})
    amd = o["pmu"]["amd"]
    assert not amd["perfctr_core"] and not amd["perfmon_v2"] and amd["core_counters"] == 4
    assert o["capabilities"]["KVM_CAP_PMU_CAPABILITY"] == 0


def test_offer_parts_missing_keep_their_reasons():
    o = kvm_offer.offer_from(None, None, None, reasons={"cpuid_reason": "KVM_GET_SUPPORTED_CPUID: E2BIG"})
    assert o["cpuid"] is None and o["pmu"] is None and o["perf_capabilities_decoded"] is None
    assert o["capabilities"] is None and o["cpuid_reason"] == "KVM_GET_SUPPORTED_CPUID: E2BIG"
    assert o["source"] == "/dev/kvm"


def test_describe():
    spr = offer_of(spr_answer(), {"KVM_CAP_PMU_CAPABILITY": 1})
    assert kvm_offer.describe(spr) == (
        "arch perfmon v2, 8 GP x 48 bit, 3 fixed; PERF_CAPABILITIES 0x24c0; caps PMU_CAPABILITY=1")  # fmt: skip
    genoa = kvm_offer.describe(offer_of(genoa_answer()))
    assert genoa.startswith("AMD 6 core counters (PerfCtrExtCore, PerfMonV2); PERF_CAPABILITIES 0x0")
    assert kvm_offer.describe(None, "/dev/kvm: Permission denied") == "unavailable (/dev/kvm: Permission denied)"
    missing = kvm_offer.describe(kvm_offer.offer_from(None, None, None, reasons={"cpuid_reason": "x: EIO"}))
    assert missing.startswith("no CPUID (x: EIO); PERF_CAPABILITIES none (not read); caps unknown")


def test_request_numbers_and_layouts_match_the_uapi_headers():
    """Values printed by a C program compiled against linux-libc-dev 6.1.192's <linux/kvm.h> (sizeof, _IOWR)."""
    assert kvm_offer.KVM_GET_API_VERSION == 0xAE00
    assert kvm_offer.KVM_CHECK_EXTENSION == 0xAE03
    assert kvm_offer.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert kvm_offer.KVM_GET_MSR_FEATURE_INDEX_LIST == 0xC004AE0A
    assert kvm_offer.KVM_GET_MSRS == 0xC008AE88
    assert (kvm_offer.CPUID2_HEADER.size, kvm_offer.CPUID_ENTRY2.size) == (8, 40)
    assert (kvm_offer.MSR_LIST_HEADER.size, kvm_offer.MSRS_HEADER.size, kvm_offer.MSR_ENTRY.size) == (4, 8, 16)
    assert struct.calcsize(ENTRY2) == kvm_offer.CPUID_ENTRY2.size


def test_msr_parsers():
    assert kvm_offer.parse_msr_list(struct.pack("<5I", 4, 0x8B, 0x10A, 0x345, 0xCE)) == [0x8B, 0x10A, 0x345, 0xCE]
    msrs = struct.pack("<II", 1, 0) + struct.pack("<IIQ", 0x345, 0, 0x24C0)
    assert kvm_offer.parse_msrs(msrs, 1) == {0x345: 0x24C0}


# --- the real /dev/kvm of this machine ---------------------------------------------------------------------------


@pytest.fixture
def kvm_fd():
    try:
        fd = os.open(kvm_offer.KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        pytest.skip(f"host: cannot open {kvm_offer.KVM_DEVICE} ({exc.strerror}); these checks ask the real KVM")
    yield fd
    os.close(fd)


def _enable_pmu() -> str | None:
    path = Path("/sys/module/kvm/parameters/enable_pmu")
    return path.read_text().strip() if path.exists() else None


def test_real_kvm_answers_the_system_ioctls(kvm_fd):
    assert kvm_offer.get_api_version(kvm_fd) == 12
    for number in kvm_offer.KVM_CAPABILITIES.values():
        assert isinstance(kvm_offer.check_extension(kvm_fd, number), int)
    entries = kvm_offer.parse_cpuid2(kvm_offer.get_supported_cpuid(kvm_fd))
    assert entries and entries[0]["function"] == 0 and entries[0]["index"] == 0
    assert {0x0, 0x1, 0xA} <= {e["function"] for e in entries}


def test_real_kvm_cpuid_retries_on_e2big(kvm_fd):
    """nent=1 is too small: KVM answers E2BIG (cpuid.c get_next_cpuid) and the reader doubles until it fits."""
    import fcntl

    with pytest.raises(OSError) as info:
        fcntl.ioctl(kvm_fd, kvm_offer.KVM_GET_SUPPORTED_CPUID, bytearray(struct.pack("<II", 1, 0) + bytes(40)), True)
    assert info.value.errno == errno.E2BIG
    small = kvm_offer.parse_cpuid2(kvm_offer.get_supported_cpuid(kvm_fd, nent=1))
    assert small == kvm_offer.parse_cpuid2(kvm_offer.get_supported_cpuid(kvm_fd))


def test_real_kvm_feature_msrs(kvm_fd):
    indices = kvm_offer.parse_msr_list(kvm_offer.get_msr_feature_index_list(kvm_fd))
    assert indices and all(isinstance(i, int) for i in indices)
    if kvm_offer.MSR_IA32_PERF_CAPABILITIES in indices:
        count, buf = kvm_offer.get_feature_msrs(kvm_fd, [kvm_offer.MSR_IA32_PERF_CAPABILITIES])
        assert count == 1 and kvm_offer.MSR_IA32_PERF_CAPABILITIES in kvm_offer.parse_msrs(buf, count)


def test_real_offer_here(kvm_fd):
    offer, reason = kvm_offer.read_offer()
    assert reason is None and offer is not None and offer["api_version"] == 12
    assert all(isinstance(v, int) for v in offer["capabilities"].values())
    assert set(offer["capabilities"]) == set(kvm_offer.KVM_CAPABILITIES)
    assert {e["function"] for e in offer["cpuid"]} <= kvm_offer.OFFER_LEAVES
    if _enable_pmu() != "N":
        pytest.skip(f"host: kvm.enable_pmu={_enable_pmu()}; the rest checks what KVM offers with enable_pmu=N")
    # cpuid.c case 0xa: all zero without enable_pmu; x86.c: KVM_CAP_PMU_CAPABILITY = enable_pmu ? mask : 0.
    leaf_a = next(e for e in offer["cpuid"] if e["function"] == 0xA)
    assert (leaf_a["eax"], leaf_a["ebx"], leaf_a["ecx"], leaf_a["edx"]) == (0, 0, 0, 0)
    assert offer["pmu"]["arch_perfmon"] is None
    assert offer["capabilities"]["KVM_CAP_PMU_CAPABILITY"] == 0
    if offer["perf_capabilities"] is not None:  # vmx_get_perf_capabilities(): 0 without enable_pmu
        assert offer["perf_capabilities"] == 0


def test_real_offer_survives_a_failing_ioctl(kvm_fd, monkeypatch):
    def refuse(_fd):
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    monkeypatch.setattr(kvm_offer, "get_msr_feature_index_list", refuse)
    monkeypatch.setattr(kvm_offer, "get_supported_cpuid", refuse)
    offer, reason = kvm_offer.read_offer()
    assert reason is None and offer["capabilities"] is not None
    assert offer["perf_capabilities"] is None and "Inappropriate ioctl" in offer["perf_capabilities_reason"]
    assert offer["cpuid"] is None and offer["pmu"] is None and "KVM_GET_SUPPORTED_CPUID" in offer["cpuid_reason"]


def test_unopenable_or_wrong_device(tmp_path):
    offer, reason = kvm_offer.read_offer(tmp_path / "kvm")
    assert offer is None and reason.startswith(f"{tmp_path / 'kvm'}: No such file or directory")
    offer, reason = kvm_offer.read_offer(Path("/dev/null"))
    assert offer is None and "KVM_GET_API_VERSION failed" in reason and "Inappropriate ioctl" in reason
