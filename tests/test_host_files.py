"""The shipped doctor outputs of real hosts (tests/data/hosts): reproducible, complete, and what KVM would offer.

The offer expectations below are worked out by hand from the dumps' registers and the kernel sources named next to
each value (arch/x86/kvm/pmu.c kvm_init_pmu_capability(), arch/x86/kvm/cpuid.c __do_cpuid_func(),
arch/x86/kvm/vmx/vmx.c vmx_get_perf_capabilities(), arch/x86/kvm/svm/svm.c svm_set_cpu_caps()), not taken from the
generator's output.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from harness.cpu.caps import decode_caps
from harness.cpu.cpuid_dump import load_cpuid_dump
from harness.host import hostfacts
from tests.helpers import CPUID_DIR, TEST_DATA

HOSTS_DIR = TEST_DATA / "hosts"
HOST_FILES = sorted(HOSTS_DIR.glob("*.json"))

SPR = "GenuineIntel00806F8_SapphireRapids_05_CPUID.txt"
TGL = "GenuineIntel00806C1_TigerLake_01_CPUID.txt"
ADL = "GenuineIntel0090672_AlderLake_02_CPUID.txt"
SKX = "GenuineIntel0050654_SkylakeXeon_CPUID.txt"
GENOA = "AuthenticAMD0A10F11_K19_Genoa_01_CPUID.txt"
MILAN = "AuthenticAMD0A00F11_K19_Milan_02_CPUID.txt"
ROME = "AuthenticAMD0830F10_K17_Rome_CPUID.txt"

# host file -> (dump, vendor, family, model, stepping). Family/model/stepping are read off the dumps' CPUID.1:EAX
# by hand (SDM Vol. 2A / APM "Version Information"), except ICX: the README's substitution 0x000606A6 (Xeon Gold
# 6338, 06_6AH stepping 6) on the Tiger Lake dump (0x000806C1).
EXPECTED_FMS = {
    "spr-perf-based": (SPR, "GenuineIntel", 6, 0x8F, 8),  # 000806F8
    "spr-mediated": (SPR, "GenuineIntel", 6, 0x8F, 8),
    "spr-nmi-watchdog": (SPR, "GenuineIntel", 6, 0x8F, 8),
    "spr-ignore-msrs": (SPR, "GenuineIntel", 6, 0x8F, 8),
    "icx": (TGL, "GenuineIntel", 6, 0x6A, 6),  # substituted 000606A6
    "adl-hybrid": (ADL, "GenuineIntel", 6, 0x97, 2),  # 00090672
    "skl": (SKX, "GenuineIntel", 6, 0x55, 4),  # 00050654
    "genoa-perf-based": (GENOA, "AuthenticAMD", 0x19, 0x11, 1),  # 00A10F11: 0xF + 0xA, model 1 << 4 | 1
    "genoa-mediated": (GENOA, "AuthenticAMD", 0x19, 0x11, 1),
    "milan": (MILAN, "AuthenticAMD", 0x19, 0x01, 1),  # 00A00F11
    "rome": (ROME, "AuthenticAMD", 0x17, 0x31, 0),  # 00830F10: 0xF + 0x8, model 3 << 4 | 1
}
# Fields of cpu.caps the README says were substituted (everything else must equal the dump's own decoding).
SUBSTITUTED = {"icx": {"model", "stepping"}, "adl-hybrid": {"hybrid"}}

# Register bits (SDM Vol. 2A CPUID 01H/0AH; APM Fn8000_0001).
ECX1_DTES64, ECX1_PDCM, ECX1_HYPERVISOR, EDX1_DS = 1 << 2, 1 << 15, 1 << 31, 1 << 21
ECX_EXT1_IBS, ECX_EXT1_PERFCTR_CORE = 1 << 10, 1 << 23


def load(name: str) -> dict[str, Any]:
    return json.loads((HOSTS_DIR / f"{name}.json").read_text())


def leaf(facts: dict[str, Any], function: int, index: int = 0) -> dict[str, int] | None:
    """The offered KVM_GET_SUPPORTED_CPUID entry, None when KVM did not return it."""
    found = [e for e in facts["kvm_offer"]["cpuid"] if e["function"] == function and e["index"] == index]
    assert len(found) <= 1
    return found[0] if found else None


def regs(facts: dict[str, Any], function: int, index: int = 0) -> tuple[int, int, int, int]:
    entry = leaf(facts, function, index)
    assert entry is not None, f"KVM returns leaf {function:#x}.{index}"
    return entry["eax"], entry["ebx"], entry["ecx"], entry["edx"]


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    if not CPUID_DIR.is_dir():
        pytest.skip(f"{CPUID_DIR}: shared CPUID dumps not present")
    spec = importlib.util.spec_from_file_location("make_hosts", HOSTS_DIR / "make_hosts.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


@pytest.fixture(scope="module")
def this_machine() -> dict[str, Any]:
    """The reference schema: this machine's own doctor object."""
    return hostfacts.collect()


# --- the files are the generator's output -------------------------------------------------------------------------


def test_generator_reproduces_the_committed_files(generator: ModuleType) -> None:
    built = generator.build_all()
    assert sorted(built) == [p.name for p in HOST_FILES], "run tests/data/hosts/make_hosts.py"
    for name, text in built.items():
        assert (HOSTS_DIR / name).read_text() == text, f"{name} drifted: run tests/data/hosts/make_hosts.py"


def test_every_host_of_the_brief_is_shipped() -> None:
    assert {p.stem for p in HOST_FILES} == set(EXPECTED_FMS)


def test_hostname_is_the_file_stem() -> None:
    for path in HOST_FILES:
        assert json.loads(path.read_text())["hostname"] == path.stem


# --- same schema as this machine's doctor -----------------------------------------------------------------------


VENDOR_SECTIONS = ("amd", "arch_perfmon", "arch_lbr")


def null_by_design(path: str) -> bool:
    """Whether doctor writes None at this path on some healthy host (see missing_keys)."""
    sections = tuple(f"{parent}.{name}" for parent in ("caps", "pmu") for name in VENDOR_SECTIONS)
    return path == "cpu.perf_capabilities" or path.endswith(sections)


def missing_keys(reference: Any, host: Any, path: str = "") -> list[str]:
    """Keys of the reference dict (recursively through dicts) that the host dict lacks.

    Lists are machine specific (PMU names, CPUID entries) and not compared. A host value None where the reference
    has a dict is allowed only where doctor writes None by design: cpu.perf_capabilities on AMD, and the
    vendor-specific sections of a capability decoding (``amd`` on Intel, ``arch_perfmon``/``arch_lbr`` on AMD),
    since this machine may be of either vendor. kvm_offer's
    ``*_reason`` keys appear only when a part of the offer could not be read, so they are not required.
    """
    if not isinstance(reference, dict) or not isinstance(host, dict):
        return []
    missing = []
    for key, value in reference.items():
        here = f"{path}.{key}" if path else key
        if path == "kvm_offer" and key.endswith("_reason"):
            continue
        if path == "sysctls.perf_event_mux_interval_ms":
            continue  # keyed by this machine's core PMU names
        if key not in host:
            missing.append(here)
        elif isinstance(value, dict) and host[key] is None and not null_by_design(here):
            missing.append(f"{here} (null)")
        else:
            missing += missing_keys(value, host[key], here)
    return missing


@pytest.mark.parametrize("path", HOST_FILES, ids=lambda p: p.stem)
def test_host_file_has_every_doctor_key(path: Path, this_machine: dict[str, Any]) -> None:
    assert missing_keys(this_machine, json.loads(path.read_text())) == []


@pytest.mark.parametrize("path", HOST_FILES, ids=lambda p: p.stem)
def test_new_contract_keys_are_present(path: Path) -> None:
    """The doctor contract of issue 10 (kvm_offer, sysctls, the new kvm keys), whatever this machine has."""
    facts = json.loads(path.read_text())
    for key in ("kvm_offer", "kvm_offer_reason", "sysctls"):
        assert key in facts
    assert set(facts["kvm_offer"]) >= {"source", "cpuid", "pmu", "perf_capabilities", "perf_capabilities_decoded",
                                       "capabilities"}  # fmt: skip
    assert set(facts["kvm"]) >= {"force_emulation_prefix", "enable_mediated_pmu", "ignore_msrs", "vendor_module"}
    assert set(facts["sysctls"]) == {f"kernel.{name}" for name in hostfacts.HOST_SYSCTLS} | {
        "perf_event_mux_interval_ms"
    }


# --- host facts decode to the dump ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED_FMS))
def test_vendor_family_model_stepping(name: str) -> None:
    _dump, vendor, family, model, stepping = EXPECTED_FMS[name]
    caps = load(name)["cpu"]["caps"]
    assert (caps["vendor"], caps["family"], caps["model"], caps["stepping"]) == (vendor, family, model, stepping)
    # KVM passes CPUID.1:EAX through (__do_cpuid_func case 1 overrides only ECX/EDX): the offer decodes the same.
    offered = load(name)["kvm_offer"]["pmu"]
    assert (offered["vendor"], offered["family"], offered["model"], offered["stepping"]) == (
        vendor, family, model, stepping)  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED_FMS))
def test_caps_are_the_dumps_own_except_documented_substitutions(name: str) -> None:
    if not CPUID_DIR.is_dir():
        pytest.skip(f"{CPUID_DIR}: shared CPUID dumps not present")
    dump = EXPECTED_FMS[name][0]
    own = decode_caps(load_cpuid_dump(CPUID_DIR / dump)).to_json()
    shipped = load(name)["cpu"]["caps"]
    differing = {key for key in own if own[key] != shipped[key]}
    assert differing == SUBSTITUTED.get(name, set())


def test_hybrid_alder_lake_is_hybrid_and_gets_no_vpmu() -> None:
    facts = load("adl-hybrid")
    assert facts["cpu"]["caps"]["hybrid"] is True
    assert facts["host_pmu"]["hybrid"] is True
    assert facts["host_pmu"]["core_pmus"] == ["cpu_core", "cpu_atom"]
    # kvm_init_pmu_capability(): cpu_feature_enabled(X86_FEATURE_HYBRID_CPU) -> enable_pmu = false; enable_pmu is
    # the kvm.enable_pmu module parameter itself, so sysfs reads N and doctor's vpmu_mode is None.
    assert facts["kvm"]["enable_pmu"] == "N"
    assert facts["vpmu_mode"] is None
    # __do_cpuid_func case 0xa: !enable_pmu -> eax = ebx = ecx = edx = 0.
    assert regs(facts, 0xA) == (0, 0, 0, 0)
    assert facts["kvm_offer"]["pmu"]["arch_perfmon"] is None
    # vmx_set_cpu_caps(): !enable_pmu -> kvm_cpu_cap_clear(PDCM); vmx_get_perf_capabilities(): !enable_pmu -> 0.
    assert facts["kvm_offer"]["pmu"]["pdcm"] is False
    assert facts["kvm_offer"]["perf_capabilities"] == 0
    # kvm_vm_ioctl_check_extension(): KVM_CAP_PMU_CAPABILITY = enable_pmu ? KVM_CAP_PMU_VALID_MASK : 0.
    assert facts["kvm_offer"]["capabilities"]["KVM_CAP_PMU_CAPABILITY"] == 0
    # KVM never advertises X86_FEATURE_HYBRID_CPU (not in kvm_cpu_cap_init(CPUID_7_EDX, ...)).
    assert facts["kvm_offer"]["pmu"]["hybrid"] is False


# --- the offers, derived by hand --------------------------------------------------------------------------------

# Intel v5 host leaf 0AH (SPR; Tiger Lake stands in for ICX) = 08300805-00000000-0000000F-00008604.
# kvm_init_pmu_capability(): version min(5, 2) = 2; GP min(8, 8) = 8; fixed = weight(ECX 0xF) = 4 -> min(4, 3) = 3;
# width 48 (0x30); mask length 8; events_mask = EBX = 0.
# __do_cpuid_func case 0xa: EAX = 8 << 24 | 48 << 16 | 8 << 8 | 2 = 0x08300802; EBX = 0; ECX = 0;
# EDX = 3 | 48 << 5 | AnyThread-deprecated (bit 15, set whenever version != 0) = 0x8603.
V5_HOST_OFFER_0A = (0x08300802, 0, 0, 0x8603)


@pytest.mark.parametrize("name", ["spr-perf-based", "spr-nmi-watchdog", "spr-ignore-msrs"])
def test_spr_perf_based_offer(name: str) -> None:
    facts = load(name)
    assert regs(facts, 0xA) == V5_HOST_OFFER_0A
    perfmon = facts["kvm_offer"]["pmu"]["arch_perfmon"]
    assert (perfmon["version"], perfmon["gp_counters"], perfmon["fixed_counters"]) == (2, 8, 3)
    # vmx_get_perf_capabilities(): FW_WRITES (0x2000); no LBR format: the host has X86_FEATURE_ARCH_LBR (dump
    # 7.0 EDX 0xFFDD4430 bit 19) and KVM has no arch-LBR support; PEBS via EPT (pebs_ept for SAPPHIRERAPIDS_X):
    # host 0xf4ff & (trap 0x40 | arch-reg 0x80 | format 0xf00 | baseline 0x4000) = 0x44c0, baseline cleared ->
    # 0x2000 | 0x04c0 = 0x24c0.
    assert facts["kvm_offer"]["perf_capabilities"] == 0x24C0
    decoded = facts["kvm_offer"]["perf_capabilities_decoded"]
    assert (decoded["lbr_format"], decoded["pebs_format"], decoded["pebs_baseline"]) == (0, 4, False)
    # Leaf 1: PDCM with enable_pmu; DS and DTES64 because vmx_pebs_supported() (vmx_set_cpu_caps()); no HYPERVISOR
    # bit before 6.14.
    _, _, ecx, edx = regs(facts, 0x1)
    assert ecx == ECX1_PDCM | ECX1_DTES64
    assert edx == EDX1_DS
    assert facts["kvm_offer"]["pmu"]["hypervisor"] is None
    assert facts["kvm_offer"]["capabilities"] == {
        "KVM_CAP_PMU_CAPABILITY": 1, "KVM_CAP_PMU_EVENT_FILTER": 1, "KVM_CAP_PMU_EVENT_MASKED_EVENTS": 1}  # fmt: skip
    assert facts["vpmu_mode"] == "perf-based"
    assert facts["kvm"]["enable_mediated_pmu"] is None  # no such kvm_intel parameter in 6.12


def test_spr_variants_differ_only_in_their_knob() -> None:
    base = load("spr-perf-based")
    watchdog, ignore = load("spr-nmi-watchdog"), load("spr-ignore-msrs")
    assert watchdog["sysctls"]["kernel.nmi_watchdog"] == "1" and watchdog["perf"]["nmi_watchdog"] == "1"
    assert base["sysctls"]["kernel.nmi_watchdog"] == "0"
    assert ignore["kvm"]["ignore_msrs"] == "Y" and base["kvm"]["ignore_msrs"] == "N"
    for variant in (watchdog, ignore):
        assert variant["kvm_offer"] == base["kvm_offer"]


def test_spr_mediated_offer() -> None:
    facts = load("spr-mediated")
    assert facts["vpmu_mode"] == "mediated"
    assert facts["kvm"]["enable_mediated_pmu"] == "Y"  # kept: v5 >= 4 and host FW_WRITES (intel_pmu_is_mediated_...)
    # 7.0 still clamps version to 2 and fixed counters to KVM_MAX_NR_FIXED_COUNTERS = 3.
    assert regs(facts, 0xA) == V5_HOST_OFFER_0A
    # vmx_get_perf_capabilities(): LBR skipped under enable_mediated_pmu, vmx_pebs_supported() false under it:
    # FW_WRITES only.
    assert facts["kvm_offer"]["perf_capabilities"] == 0x2000
    # Leaf 1: PDCM, and EMULATED_F(HYPERVISOR) (advertised since 6.14); no DS/DTES64 without PEBS.
    _, _, ecx, edx = regs(facts, 0x1)
    assert (ecx, edx) == (ECX1_PDCM | ECX1_HYPERVISOR, 0)
    assert facts["kvm_offer"]["pmu"]["hypervisor"] == "unknown"  # 40000000H is not among the kept leaves


def test_icx_offer() -> None:
    facts = load("icx")
    assert regs(facts, 0xA) == V5_HOST_OFFER_0A
    # vmx_get_perf_capabilities(): FW_WRITES 0x2000 | legacy LBR format 5 (no arch LBR: dump 7.0 EDX 0xFC100510
    # bit 19 clear; 32-deep LBR with call stacks) | PEBS (pebs_ept for ICELAKE_X): 0xf4c5 & 0x4fc0 = 0x44c0 minus
    # baseline = 0x04c0 -> 0x24c5.
    assert facts["kvm_offer"]["perf_capabilities"] == 0x24C5
    decoded = facts["kvm_offer"]["perf_capabilities_decoded"]
    assert (decoded["lbr_format"], decoded["pebs_format"], decoded["pebs_trap"]) == (5, 4, True)
    assert leaf(facts, 0x1C) is None  # Tiger Lake/ICX max basic leaf 1BH


def test_skl_offer() -> None:
    facts = load("skl")
    # Host 0AH = 07300404-00000000-00000000-00000603: v4 -> 2; 4 GP; fixed = EDX[4:0] = 3 (v < 5: no bitmap);
    # width 48; mask length 7. EAX = 7 << 24 | 48 << 16 | 4 << 8 | 2 = 0x07300402; EDX = 3 | 48 << 5 | 1 << 15.
    assert regs(facts, 0xA) == (0x07300402, 0, 0, 0x8603)
    perfmon = facts["kvm_offer"]["pmu"]["arch_perfmon"]
    assert (perfmon["version"], perfmon["gp_counters"], perfmon["fixed_counters"]) == (2, 4, 3)
    assert perfmon["events"]["topdown_slots"] is False
    # FW_WRITES | legacy LBR format 5; PEBS format 3 and no EPT-friendly PEBS on SKX -> no PEBS fields, no DS.
    assert facts["kvm_offer"]["perf_capabilities"] == 0x2005
    _, _, ecx, edx = regs(facts, 0x1)
    assert (ecx, edx) == (ECX1_PDCM, 0)


@pytest.mark.parametrize("name", ["genoa-perf-based", "genoa-mediated"])
def test_genoa_offer(name: str) -> None:
    facts = load(name)
    # Host 8000_0022H = 00000007-00304106: PerfMonV2 + LbrExtV2 + LbrAndPmcFreeze, 6 core counters.
    # svm_set_cpu_caps(): 6 counters -> PERFCTR_CORE; version 2 -> PERFMON_V2 kept. Case 0x80000022: EAX = host &
    # PERFMON_V2 = 1; EBX.num_core_pmc = kvm_pmu_cap.num_counters_gp = min(6, 6) = 6; LBRv2 and DF counts not
    # offered; ECX = EDX = 0.
    assert regs(facts, 0x80000022) == (1, 6, 0, 0)
    amd = facts["kvm_offer"]["pmu"]["amd"]
    assert (amd["perfmon_v2"], amd["core_counters"], amd["perfctr_core"]) == (True, 6, True)
    assert (amd["lbr_v2"], amd["nb_counters"]) == (False, 0)
    # IBS is not in kvm_set_cpu_caps(CPUID_8000_0001_ECX) ("/* IBS */"); 8000_001BH falls to the default case.
    _, _, ecx, _ = regs(facts, 0x80000001)
    assert ecx == ECX_EXT1_PERFCTR_CORE and not ecx & ECX_EXT1_IBS
    assert regs(facts, 0x8000001B) == (0, 0, 0, 0)
    assert amd["ibs"] is None
    # AMD: no leaf 0AH PMU (no X86_FEATURE_ARCH_PERFMON), PERF_CAPABILITIES feature MSR 0.
    assert regs(facts, 0xA) == (0, 0, 0, 0)
    assert facts["kvm_offer"]["perf_capabilities"] == 0
    assert facts["cpu"]["perf_capabilities"] is None


def test_genoa_mediated_is_mediated_with_the_same_counters() -> None:
    perf_based, mediated = load("genoa-perf-based"), load("genoa-mediated")
    assert (perf_based["vpmu_mode"], mediated["vpmu_mode"]) == ("perf-based", "mediated")
    assert mediated["kvm"]["enable_mediated_pmu"] == "Y"  # amd_pmu_is_mediated_pmu_supported(): version >= 2
    assert mediated["kvm_offer"]["pmu"]["amd"] == perf_based["kvm_offer"]["pmu"]["amd"]


def test_milan_offer() -> None:
    facts = load("milan")
    # Host max extended leaf 8000_0023H -> min(…, 0x80000022): 8000_0022H is returned, all zero (no PerfMonV2).
    assert regs(facts, 0x80000000)[0] == 0x80000022
    assert regs(facts, 0x80000022) == (0, 0, 0, 0)
    amd = facts["kvm_offer"]["pmu"]["amd"]
    assert (amd["perfmon_v2"], amd["core_counters"], amd["perfctr_core"]) == (False, 6, True)


def test_rome_offer() -> None:
    facts = load("rome")
    # Host max extended leaf 8000_0020H; case 0x80000000 raises it to 8000_0021H (LFENCE is serializing on Zen 2),
    # never to 8000_0022H: KVM returns no 8000_0022H entry.
    assert regs(facts, 0x80000000)[0] == 0x80000021
    assert leaf(facts, 0x80000022) is None
    amd = facts["kvm_offer"]["pmu"]["amd"]
    assert (amd["perfmon_v2"], amd["core_counters"], amd["perfctr_core"]) == (False, 6, True)


@pytest.mark.parametrize("path", HOST_FILES, ids=lambda p: p.stem)
def test_decoded_fields_match_the_raw_ones(path: Path) -> None:
    """pmu and perf_capabilities_decoded are the decoders' view of the raw values in the same file."""
    from harness.cpu.caps import decode_perf_capabilities
    from harness.host.kvm_offer import cpuid_table

    offer = json.loads(path.read_text())["kvm_offer"]
    assert decode_caps(cpuid_table(offer["cpuid"])).to_json() == offer["pmu"]
    assert decode_perf_capabilities(offer["perf_capabilities"]) == offer["perf_capabilities_decoded"]
