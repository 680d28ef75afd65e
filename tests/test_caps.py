"""PMU capability decoding of every reference CPUID dump, against expectations derived by hand from the bits.

Each expectation below is worked out from the raw register values in the dump and the bit definitions in
SDM Vol. 2A (CPUID leaves 01H, 07H, 0AH, 1CH) and AMD APM Vol. 3 App. E (Fn8000_0001, Fn8000_001B,
Fn8000_0022), not from the decoder's output. The derivation is written next to each value.
"""

from __future__ import annotations

import json

import pytest

from harness.cpu.caps import decode_caps, decode_perf_capabilities
from harness.cpu.cpuid_dump import CpuidTable, Regs, load_cpuid_dump
from tests.helpers import CPUID_DIR, TEST_DATA, assert_one_line_error, run_cli

ALL_EVENTS = [
    "core_cycles", "instructions", "ref_cycles", "llc_references", "llc_misses",
    "branch_instructions", "branch_misses", "topdown_slots",
]  # fmt: skip
# Leaf 0AH EAX[31:24] = 7 (Nehalem, Skylake) means events 0..6 are enumerated; topdown slots (index 7) is not.
SEVEN_EVENTS = {name: name != "topdown_slots" for name in ALL_EVENTS}
EIGHT_EVENTS = dict.fromkeys(ALL_EVENTS, True)

# Intel v5 leaf 0AH = 08300805-00000000-0000000F-00008604 (Tiger Lake, Sapphire Rapids, Alder Lake):
# EAX: version 5, 8 GP counters, width 0x30 = 48, event vector length 8; EBX = 0: all 8 events available;
# ECX = 0xF: fixed counters 0..3 (v5 bitmap); EDX[4:0] = 4 contiguous, EDX[12:5] = 0x8604>>5 & 0xff = 0x30 = 48.
V5_PERFMON = {"version": 5, "gp_counters": 8, "gp_width": 48, "fixed_counters": 4, "fixed_width": 48,
              "fixed_counter_mask": 0xF, "events": EIGHT_EVENTS}  # fmt: skip
# Arch LBR leaf 1CH = 4000000B-00000007-00000007 (SPR, ADL): EAX[7:0] = 0x0B -> bits 0,1,3 -> depths 8,16,32;
# EBX bits 0..2 -> CPL filter, branch filter, call stack; ECX bits 0..2 -> mispredict, timed LBR, branch type.
ARCH_LBR_SPR = {"depths": [8, 16, 32], "cpl_filter": True, "branch_filter": True, "call_stack": True,
                "mispredict": True, "timed": True, "branch_type": True}  # fmt: skip
# AMD IBS Fn8000_001B EAX = 0x3FF: bits 0..9 set (IBSFFV, FetchSam, OpSam, RdWrOpCnt, OpCnt, BrnTrgt, OpCntExt,
# RipInvalidChk, OpBrnFuse, IbsFetchCtlExtd); bit 10 (OpData4) and bit 11 (Zen4 extensions) clear.
IBS_3FF = {"fetch": True, "op": True, "rd_wr_op_cnt": True, "op_cnt": True, "branch_target": True,
           "op_cnt_ext": True, "rip_invalid_chk": True, "op_branch_fuse": True, "fetch_ctl_extd": True,
           "op_data4": False, "zen4": False, "caps": 0x3FF}  # fmt: skip
# AMD Fn8000_0001 ECX = 75C237FF on all four AMD dumps: bit 10 IBS; bits 23 PerfCtrExtCore, 24 PerfCtrExtNB,
# 28 PerfCtrExtLLC (0x75C2 in ECX[31:16] = bits 17,22,23,24,26,28,29,30).
AMD_ZEN2_3 = {"perfctr_core": True, "perfctr_nb": True, "perfctr_llc": True, "perfmon_v2": False,
              "lbr_v2": False, "lbr_pmc_freeze": False, "core_counters": 6, "lbr_v2_depth": 0, "nb_counters": 4,
              "ibs": IBS_3FF}  # fmt: skip

EXPECTED = {
    # 1:EAX 00830F10: base family F + ext family 8 = 0x17; base family F, so model = ext model 3 << 4 + base
    # model 1 = 0x31; stepping 0. 1:ECX 7EF8320B: bit 15 (PDCM) 0, bit 31 (hypervisor) 0. Max ext leaf
    # 0x80000020 < 0x80000022: no PerfMonV2 -> 6 counters (PerfCtrExtCore).
    "AuthenticAMD0830F10_K17_Rome_CPUID": dict(
        vendor="AuthenticAMD", family=0x17, model=0x31, stepping=0, hypervisor=None, pdcm=False, hybrid=False,
        arch_perfmon=None, arch_lbr=None, amd=AMD_ZEN2_3),
    # 00A00F11: family F+A = 0x19, model 0x01, stepping 1. Fn8000_0022 is all zero -> no PerfMonV2.
    "AuthenticAMD0A00F11_K19_Milan_02_CPUID": dict(
        vendor="AuthenticAMD", family=0x19, model=0x01, stepping=1, hypervisor=None, pdcm=False, hybrid=False,
        arch_perfmon=None, arch_lbr=None, amd=AMD_ZEN2_3),
    # 00A10F11: family 0x19, model 0x11, stepping 1. Fn8000_0022 = 00000007-00304106: EAX bits 0..2 PerfMonV2,
    # LbrExtV2, LbrAndPmcFreeze; EBX[3:0] = 6 core counters, EBX[9:4] = 0x10 = 16 LBR entries, EBX[15:10] = 0x10
    # = 16 DF counters. Fn8000_001B = 0xBFF: as 0x3FF plus bit 11 (Zen4 IBS extensions), bit 10 clear.
    "AuthenticAMD0A10F11_K19_Genoa_01_CPUID": dict(
        vendor="AuthenticAMD", family=0x19, model=0x11, stepping=1, hypervisor=None, pdcm=False, hybrid=False,
        arch_perfmon=None, arch_lbr=None,
        amd={**AMD_ZEN2_3, "perfmon_v2": True, "lbr_v2": True, "lbr_pmc_freeze": True, "core_counters": 6,
             "lbr_v2_depth": 16, "nb_counters": 16, "ibs": {**IBS_3FF, "zen4": True, "caps": 0xBFF}}),
    # 00A20F12: family 0x19, model 0x21, stepping 2.
    "AuthenticAMD0A20F12_K19_Vermeer_00_CPUID": dict(
        vendor="AuthenticAMD", family=0x19, model=0x21, stepping=2, hypervisor=None, pdcm=False, hybrid=False,
        arch_perfmon=None, arch_lbr=None, amd=AMD_ZEN2_3),
    # 000106A2: family 6, model 0xA + (1<<4) = 0x1A, stepping 2; 1:ECX 00BCE3BD bit 15 set -> PDCM.
    # 0AH = 07300403-0-0-00000603: v3, 4 GP x 48, vector length 7; EDX[4:0] = 3 fixed, EDX[12:5] = 0x30 = 48;
    # ECX is not a bitmap before v5 -> mask 0b111.
    "GenuineIntel00106A2_Nehalem-EP_CPUID": dict(
        vendor="GenuineIntel", family=6, model=0x1A, stepping=2, hypervisor=None, pdcm=True, hybrid=False,
        arch_perfmon={"version": 3, "gp_counters": 4, "gp_width": 48, "fixed_counters": 3, "fixed_width": 48,
                      "fixed_counter_mask": 0x7, "events": SEVEN_EVENTS},
        arch_lbr=None, amd=None),
    # 00050654: family 6, model 5 + (5<<4) = 0x55, stepping 4; 0AH = 07300404-...-00000603: v4, otherwise as above.
    "GenuineIntel0050654_SkylakeXeon_CPUID": dict(
        vendor="GenuineIntel", family=6, model=0x55, stepping=4, hypervisor=None, pdcm=True, hybrid=False,
        arch_perfmon={"version": 4, "gp_counters": 4, "gp_width": 48, "fixed_counters": 3, "fixed_width": 48,
                      "fixed_counter_mask": 0x7, "events": SEVEN_EVENTS},
        arch_lbr=None, amd=None),
    # 000806C1: model 0xC + (8<<4) = 0x8C. 07H EDX = FC100510: bit 19 clear -> legacy LBR only, no arch LBR.
    "GenuineIntel00806C1_TigerLake_01_CPUID": dict(
        vendor="GenuineIntel", family=6, model=0x8C, stepping=1, hypervisor=None, pdcm=True, hybrid=False,
        arch_perfmon=V5_PERFMON, arch_lbr=None, amd=None),
    # 000806F8: model 0xF + (8<<4) = 0x8F, stepping 8. 07H EDX = FFDD4430: bit 19 set -> arch LBR, bit 15 clear.
    "GenuineIntel00806F8_SapphireRapids_05_CPUID": dict(
        vendor="GenuineIntel", family=6, model=0x8F, stepping=8, hypervisor=None, pdcm=True, hybrid=False,
        arch_perfmon=V5_PERFMON, arch_lbr=ARCH_LBR_SPR, amd=None),
    # 00090672: model 7 + (9<<4) = 0x97, stepping 2. 07H EDX = FC984510: bit 19 set (arch LBR); bit 15 (hybrid)
    # is clear in this dump, so it is decoded as not hybrid.
    "GenuineIntel0090672_AlderLake_02_CPUID": dict(
        vendor="GenuineIntel", family=6, model=0x97, stepping=2, hypervisor=None, pdcm=True, hybrid=False,
        arch_perfmon=V5_PERFMON, arch_lbr=ARCH_LBR_SPR, amd=None),
}  # fmt: skip


def test_every_reference_dump_has_an_expectation():
    assert sorted(p.stem for p in CPUID_DIR.glob("*.txt")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_decode_reference_dump(name):
    caps = decode_caps(load_cpuid_dump(CPUID_DIR / f"{name}.txt")).to_json()
    assert caps == EXPECTED[name]


def test_this_machine_recorded_with_cpuid_r():
    # Recorded here with `cpuid -r -1`: AMD Zen 4 (00A10F11) under a hypervisor whose 40000000H signature is
    # "KVMKVMKVM"; 80000001H ECX = 004003F3 has neither IBS (bit 10) nor PerfCtrExtCore (bit 23), so the APM's
    # 4 legacy counters; 0AH is zero.
    caps = decode_caps(load_cpuid_dump(TEST_DATA / "cpuid-r_amd-epyc-zen4_pvm-host.txt"))
    assert (caps.vendor, caps.family, caps.model, caps.hypervisor) == ("AuthenticAMD", 0x19, 0x11, "KVMKVMKVM")
    assert caps.arch_perfmon is None
    assert caps.amd is not None and caps.amd.core_counters == 4 and caps.amd.ibs is None


def _table(**leaves: Regs) -> CpuidTable:
    base = {(0, 0): Regs(eax=0x1C, ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69), (1, 0): Regs(eax=0x000806F8)}
    base.update({(int(k[1:], 16), 0): v for k, v in leaves.items()})
    return CpuidTable(base)


def test_v5_fixed_bitmap_with_gap():
    # SDM: fixed counter i exists iff ECX[i] or i < EDX[4:0]. EDX[4:0] = 3 and ECX = 0b1001 -> counters 0..3,
    # and ECX = 0b10000000 with EDX[4:0] = 0 -> only counter 7.
    caps = decode_caps(_table(LA=Regs(eax=0x08300805, ecx=0b1001, edx=3 | (48 << 5))))
    assert caps.arch_perfmon and caps.arch_perfmon.fixed_counter_mask == 0b1111
    caps = decode_caps(_table(LA=Regs(eax=0x08300805, ecx=0x80, edx=48 << 5)))
    assert caps.arch_perfmon and (caps.arch_perfmon.fixed_counter_mask, caps.arch_perfmon.fixed_counters) == (0x80, 1)


def test_event_unavailable_bit_and_short_vector():
    # EBX bit 2 set: ref cycles not available; vector length 5: events 5.. not enumerated at all.
    caps = decode_caps(_table(LA=Regs(eax=0x05300402, ebx=0b100, edx=3)))
    assert caps.arch_perfmon is not None
    events = caps.arch_perfmon.events
    assert [events[n] for n in ALL_EVENTS] == [True, True, False, True, True, False, False, False]


def test_v1_ignores_edx_and_ecx():
    # SDM: EDX fixed-counter fields are valid from version 2, the ECX bitmap from version 5.
    caps = decode_caps(_table(LA=Regs(eax=0x07280201, ecx=0xF, edx=0x603)))
    assert caps.arch_perfmon and (caps.arch_perfmon.fixed_counters, caps.arch_perfmon.fixed_width) == (0, 0)


def test_kvm_guest_signature():
    table = _table(L1=Regs(eax=0x000806F8, ecx=1 << 31))
    table.leaves[(0x40000000, 0)] = Regs(eax=0x40000001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D)
    assert decode_caps(table).hypervisor == "KVMKVMKVM"


def test_perf_capabilities_decoding():
    # 0x33C5 = 0b0011_0011_1100_0101: LBR format 5 (bits 5:0 = 000101), bit 6 PEBS trap, bit 7 PEBS arch regs,
    # PEBS format 3 (bits 11:8 = 0011), bit 12 SMM freeze, bit 13 full-width writes; bits 14..17 clear.
    pc = decode_perf_capabilities(0x33C5)
    assert pc == {"raw": 0x33C5, "lbr_format": 5, "pebs_trap": True, "pebs_arch_regs": True, "pebs_format": 3,
                  "smm_freeze": True, "full_width_write": True, "pebs_baseline": False, "perf_metrics": False,
                  "pebs_output_pt": False, "pebs_timing_info": False}  # fmt: skip
    # Sapphire Rapids-like: format 4 baseline PEBS (bit 14), perf metrics (bit 15), PEBS-to-PT (bit 16), timing
    # info (bit 17), LBR format 0x3f (arch LBR hosts report 0x3f).
    pc = decode_perf_capabilities((1 << 14) | (1 << 15) | (1 << 16) | (1 << 17) | (4 << 8) | 0x3F)
    assert (pc["pebs_format"], pc["lbr_format"]) == (4, 0x3F)
    assert pc["pebs_baseline"] and pc["perf_metrics"] and pc["pebs_output_pt"] and pc["pebs_timing_info"]


def test_cli_caps_json_interface():
    proc = run_cli("caps", "--cpuid-dump", str(CPUID_DIR / "GenuineIntel00806F8_SapphireRapids_05_CPUID.txt"),
                   "--perf-capabilities", "0x33c5", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    required = {"vendor", "family", "model", "stepping", "hypervisor", "pdcm", "arch_perfmon", "arch_lbr", "amd"}
    assert required <= set(data)
    assert data["arch_perfmon"]["events"]["topdown_slots"] is True
    assert data["perf_capabilities"]["lbr_format"] == 5


def test_cli_caps_text():
    proc = run_cli("caps", "--cpuid-dump", str(CPUID_DIR / "AuthenticAMD0A10F11_K19_Genoa_01_CPUID.txt"))
    assert proc.returncode == 0, proc.stderr
    assert "6 core counters" in proc.stdout and "zen4" in proc.stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--cpuid-dump", "/nonexistent.txt"], ["/nonexistent.txt", "cannot read"]),
        (["--cpuid-dump", "/etc/hostname"], ["/etc/hostname", "no CPUID records"]),
        (["--cpuid-dump", "x", "--perf-capabilities", "zz"], ["--perf-capabilities", "'zz' is not a number"]),
        (["--cpuid-dump", "x", "--perf-capabilities", "0x1" + "0" * 16], ["does not fit a 64-bit MSR"]),
        ([], ["--cpuid-dump"]),
    ],
)
def test_cli_caps_bad_input(args, fragments):
    assert_one_line_error(run_cli("caps", *args), *fragments)


def test_cli_caps_truncated_dump(tmp_path):
    text = (CPUID_DIR / "GenuineIntel00806C1_TigerLake_01_CPUID.txt").read_text()
    cut = tmp_path / "tgl.txt"
    cut.write_text(text[: text.index("CPUID 0000000A:") + 20])
    assert_one_line_error(run_cli("caps", "--cpuid-dump", str(cut)), str(cut), "malformed or truncated")
