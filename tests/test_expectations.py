"""The expectation engine over host facts of hosts we have (TCG here) and do not have (Intel/AMD KVM hosts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cpu.caps import decode_caps
from harness.cpu.cpuid_dump import load_cpuid_dump
from harness.cpu.profile import Profile
from harness.errors import UsageError
from harness.judge.expectations import CONDITIONS, Context, expect, load_rules, offer_notes, pmu_feature
from harness.suite.profiles import load_profiles
from tests.helpers import CPUID_DIR


def host(vendor="GenuineIntel", accel="kvm", enable_pmu="Y", present=True, hybrid=False, ignore_msrs="N"):
    dump = "GenuineIntel00806F8_SapphireRapids_05_CPUID.txt" if vendor == "GenuineIntel" else \
        "AuthenticAMD0A10F11_K19_Genoa_01_CPUID.txt"  # fmt: skip
    return {"accel": accel, "accel_reason": "KVM unusable: the KVM module is kvm_pvm (...); no vmx/svm",
            "cpu": {"vendor": vendor, "caps": decode_caps(load_cpuid_dump(CPUID_DIR / dump)).to_json()},
            "kvm": {"enable_pmu": enable_pmu, "ignore_msrs": ignore_msrs},
            "host_pmu": {"present": present, "hybrid": hybrid}}  # fmt: skip


PMU_ON = Profile("pmu-on", "d", "host,pmu=on", "max,pmu=on", ("kvm", "tcg"))
PMU_OFF = Profile("pmu-off", "d", "host,pmu=off", "max,pmu=off", ("kvm", "tcg"))
NAMED = Profile("skylake", "d", "Skylake-Server", "Skylake-Server", ("kvm",))
RULES = load_rules()


def test_shipped_rules_and_profiles_load():
    assert {"arch_perfmon", "amd_core_pmu", "pmu_msrs_fault"} <= set(RULES)
    assert all(rule.sources for rule in RULES.values()), "every rule cites its source"
    assert {"pmu-off", "pmu-on"} <= set(load_profiles())


def test_intel_kvm_host_expects_arch_perfmon():
    e = expect(RULES["arch_perfmon"], Context("kvm", host(), PMU_ON))
    assert e.available and e.limits == {"version": 2, "gp_counters": 8, "fixed_counters": 3}


@pytest.mark.parametrize(
    ("ctx", "reason"),
    [
        (Context("tcg", host(accel="tcg"), PMU_ON), "accel: no vPMU under TCG"),
        (Context("kvm", host(enable_pmu="N"), PMU_ON), "host: kvm.enable_pmu=N"),
        (Context("kvm", host(present=False), PMU_ON), "host: no hardware PMU"),
        (Context("kvm", host(hybrid=True), PMU_ON), "kvm-limit: KVM disables the vPMU on hybrid hosts"),
        (Context("kvm", host(), PMU_OFF), "profile: pmu-off sets pmu=off"),
        (Context("kvm", host(), NAMED), "profile: skylake uses model 'Skylake-Server'"),
        (Context("kvm", host(vendor="AuthenticAMD"), PMU_ON), "host: CPU vendor is AuthenticAMD"),
    ],
)
def test_skip_reasons_name_the_fact(ctx, reason):
    e = expect(RULES["arch_perfmon"], ctx)
    assert not e.available and e.reason.startswith(reason), e.reason


def test_tcg_reason_carries_why_kvm_is_not_used():
    e = expect(RULES["arch_perfmon"], Context("tcg", host(accel="tcg"), PMU_ON))
    assert "the KVM module is kvm_pvm" in e.reason


def test_amd_host_uses_the_amd_rule():
    ctx = Context("kvm", host(vendor="AuthenticAMD"), PMU_ON)
    assert pmu_feature(ctx) == "amd_core_pmu"
    assert expect(RULES["amd_core_pmu"], ctx).available


def test_ignore_msrs_disables_the_fault_expectation():
    e = expect(RULES["pmu_msrs_fault"], Context("kvm", host(ignore_msrs="Y"), PMU_OFF))
    assert not e.available and "ignore_msrs=Y" in e.reason


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[f]\ndescription = "d"\nneeds = ["accel_kvm", "acel_kvm"]\n', "unknown condition 'acel_kvm'"),
        ('[f]\ndescription = "d"\nneeds = []\nsource = []\n', "unknown key 'source'"),
        ("[f]\nneeds = []\n", "missing field 'description'"),
    ],
)
def test_bad_rules_file(tmp_path, text, message):
    path = tmp_path / "kvm_features.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_rules(path)


def test_profile_requires_uses_the_same_vocabulary(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[lbr]\ndescription = "d"\ncpu = "host,pmu=on"\nrequires = ["host_intel", "acel_kvm"]\n')
    with pytest.raises(UsageError, match=r"\[lbr\]: unknown condition 'acel_kvm' in 'requires'"):
        load_profiles(path)


# --- expectations from the measured KVM offer (doctor's kvm_offer) -------------------------------------------
# Offers are built the way KVM computes them: arch/x86/kvm/pmu.c kvm_init_pmu_capability() caps the host's
# CPUID.0AH (perf-based vPMU: version <= 2, <= 8 GP, <= 3 fixed); arch/x86/kvm/vmx/vmx.c vmx_get_perf_capabilities()
# gives FW_WRITES (bit 13), the host's LBR format only on legacy-LBR hosts, the PEBS fields only when
# vmx_pebs_supported(), and never PEBS baseline (bit 14, "Disallow adaptive PEBS", 2024).

FW_WRITES = 1 << 13
SPR_PEBS = 0x4C0  # PEBS format 4 (bits 11:8), pebs_trap (6), pebs_arch_regs (7): PEBS fields of an SPR host


def offer(caps: dict, *, version=2, gp=8, fixed=3, perf_caps=None, arch_lbr=False, perf_caps_listed=True):
    """A kvm_offer object as doctor reports it (same keys as harness/host/kvm_offer.py writes)."""
    pmu = {**caps, "arch_lbr": caps.get("arch_lbr") if arch_lbr else None}
    if caps["vendor"] == "GenuineIntel":
        pmu["arch_perfmon"] = None if version == 0 else {
            **caps["arch_perfmon"], "version": version, "gp_counters": gp, "fixed_counters": fixed,
            "fixed_counter_mask": (1 << fixed) - 1}  # fmt: skip
    raw = perf_caps if perf_caps_listed else None
    return {"source": "/dev/kvm", "cpuid": [], "pmu": pmu, "capabilities": {}, "perf_capabilities": raw,
            "perf_capabilities_decoded": None}  # fmt: skip


def kvm_host(dump="GenuineIntel00806F8_SapphireRapids_05_CPUID.txt", host_perf_caps=None, **offer_args):
    caps = decode_caps(load_cpuid_dump(CPUID_DIR / dump)).to_json()
    facts = host(vendor=caps["vendor"], accel="kvm")
    facts["cpu"]["caps"] = caps
    if host_perf_caps is not None:
        from harness.cpu.caps import decode_perf_capabilities

        facts["cpu"]["perf_capabilities"] = {"value": decode_perf_capabilities(host_perf_caps), "reason": None}
    if offer_args.pop("no_offer", False):
        return facts
    facts["kvm_offer"] = offer(caps, **offer_args)
    return facts


def test_offer_gives_the_limits():
    e = expect(RULES["arch_perfmon"], Context("kvm", kvm_host(perf_caps=FW_WRITES, fixed=4, gp=8), PMU_ON))
    assert e.available and e.limits == {"version": 2, "gp_counters": 8, "fixed_counters": 4}
    assert "KVM_GET_SUPPORTED_CPUID 0AH: version 2, 8 GP" in e.reason


def test_offer_without_a_pmu_wins_over_the_table():
    """Table: every condition holds; KVM's leaf 0AH is zero (e.g. a kernel that disabled the vPMU): expected absent."""
    e = expect(RULES["arch_perfmon"], Context("kvm", kvm_host(version=0), PMU_ON))
    assert not e.available
    assert e.reason.startswith("kvm-offer: KVM_GET_SUPPORTED_CPUID leaf 0AH is zero")
    assert "the offer wins" in e.reason and e.note


def test_offer_overrides_a_table_limit_and_says_so():
    """A backport: the table says no guest topdown upstream, KVM offers fixed counter 3 and PERF_METRICS."""
    facts = kvm_host(fixed=4, perf_caps=FW_WRITES | 1 << 15)
    facts["cpu"]["perf_capabilities"] = {"value": {"perf_metrics": True}, "reason": None}
    ctx = Context("kvm", facts, Profile("td", "d", "host,pmu=on,migratable=no,+perf-metrics", None, ("kvm",)))
    e = expect(RULES["topdown"], ctx)
    assert e.available, e.reason
    assert "kvm_features.toml says 'kvm-limit: needs the mediated vPMU" in e.note
    assert any(note.startswith("topdown: the KVM offer shows it") for note in offer_notes(ctx, RULES))


def test_accelerator_still_comes_first():
    e = expect(RULES["arch_perfmon"], Context("tcg", {**kvm_host(), "accel": "tcg"}, PMU_ON))
    assert e.reason.startswith("accel: no vPMU under TCG")


def test_host_condition_reason_kept_when_the_offer_agrees():
    """enable_pmu=N: KVM zeroes its offer too; the precise host reason stays."""
    facts = kvm_host(version=0)
    facts["kvm"]["enable_pmu"] = "N"
    assert expect(RULES["arch_perfmon"], Context("kvm", facts, PMU_ON)).reason == "host: kvm.enable_pmu=N"


LBR_PROFILE = Profile("lbr", "d", "host,pmu=on,migratable=no", None, ("kvm",))
SKX = "GenuineIntel0050654_SkylakeXeon_CPUID.txt"
SKX_PERF_CAPS = 0x33C5  # LBR format 5, PEBS format 3 + trap/arch_regs, FW_WRITES, SMM_FREEZE (Skylake server)


def test_legacy_lbr_from_the_offer():
    offered = kvm_host(SKX, host_perf_caps=SKX_PERF_CAPS, perf_caps=FW_WRITES | 0x5)
    assert expect(RULES["legacy_lbr"], Context("kvm", offered, LBR_PROFILE)).available
    # Mediated vPMU (vmx_get_perf_capabilities: no LBR format with enable_mediated_pmu): the offer says no LBR.
    withheld = kvm_host(SKX, host_perf_caps=SKX_PERF_CAPS, perf_caps=FW_WRITES)
    e = expect(RULES["legacy_lbr"], Context("kvm", withheld, LBR_PROFILE))
    assert not e.available and e.reason.startswith("kvm-offer: KVM's IA32_PERF_CAPABILITIES 0x2000: lbr_format=0")


def test_unknown_perf_capabilities_leave_the_table_to_decide():
    facts = kvm_host(SKX, host_perf_caps=SKX_PERF_CAPS, perf_caps_listed=False)
    assert expect(RULES["legacy_lbr"], Context("kvm", facts, LBR_PROFILE)).available


def test_lbr_and_pebs_formats_pass_through_separately():
    only_lbr = Profile("l", "d", "host,pmu=on,lbr-fmt=0x5", None, ("kvm",))
    facts = kvm_host(perf_caps=FW_WRITES | SPR_PEBS, host_perf_caps=0x2000 | SPR_PEBS)
    e = expect(RULES["pebs"], Context("kvm", facts, only_lbr))
    assert not e.available and "without pebs-fmt" in e.reason


def test_pebs_from_the_offer_not_a_model_list():
    spr = kvm_host(perf_caps=FW_WRITES | SPR_PEBS, host_perf_caps=0x2000 | SPR_PEBS)
    assert expect(RULES["pebs"], Context("kvm", spr, LBR_PROFILE)).available
    mediated = kvm_host(perf_caps=FW_WRITES, host_perf_caps=0x2000 | SPR_PEBS)
    e = expect(RULES["pebs"], Context("kvm", mediated, LBR_PROFILE))
    assert not e.available and "pebs_format=0" in e.reason


@pytest.mark.parametrize(("perf_caps", "model_ok"), [(0x2000 | SPR_PEBS, True), (SKX_PERF_CAPS, False)])
def test_pebs_ept_fallback_without_an_offer(perf_caps, model_ok):
    """No offer: intel_ds_pebs_init() gives pebs_ept to PEBS format 5/6 (SPR) but not to Skylake's format 3."""
    dump = "GenuineIntel00806F8_SapphireRapids_05_CPUID.txt" if model_ok else SKX
    facts = kvm_host(dump, host_perf_caps=perf_caps, no_offer=True)
    reason = CONDITIONS["host_pebs_ept"](Context("kvm", facts, LBR_PROFILE))
    assert (reason is None) == model_ok, reason


ARCH_LBR_PROFILE = Profile("alb", "d", "host,pmu=on,+arch-lbr", None, ("kvm",))


def test_qemu_grant_is_part_of_the_expectation():
    """KVM offers arch LBR (a kernel with the series) but QEMU filtered it: QEMU is named."""
    ctx = Context("kvm", kvm_host(arch_lbr=True), ARCH_LBR_PROFILE, granted={"arch-lbr": False})
    e = expect(RULES["arch_lbr"], ctx)
    assert not e.available and e.reason.startswith("qemu: QEMU did not grant +arch-lbr"), e.reason


def test_kvm_limit_named_the_same_before_and_after_boot():
    """KVM does not offer arch LBR, so QEMU filters it: the reason blames KVM both in `plan` and in the run."""
    before = expect(RULES["arch_lbr"], Context("kvm", kvm_host(), ARCH_LBR_PROFILE))
    after = expect(RULES["arch_lbr"], Context("kvm", kvm_host(), ARCH_LBR_PROFILE, granted={"arch-lbr": False}))
    assert before.reason == after.reason and before.reason.startswith("kvm-limit: upstream KVM has no guest arch")


def test_topdown_needs_perf_metrics_passed_through():
    """QEMU drops PERF_CAPABILITIES[15] with migratable=on unless +perf-metrics names it (2026 series)."""
    facts = kvm_host(fixed=4, perf_caps=FW_WRITES | 1 << 15)
    facts["cpu"]["perf_capabilities"] = {"value": {"perf_metrics": True}, "reason": None}
    e = expect(RULES["topdown"], Context("kvm", facts, PMU_ON))
    assert not e.available and "without perf-metrics" in e.reason


def test_lbr_fmt_zero_hides_lbr():
    profile = Profile("l0", "d", "host,pmu=on,lbr-fmt=0", None, ("kvm",))
    facts = kvm_host(SKX, host_perf_caps=SKX_PERF_CAPS, perf_caps=FW_WRITES | 0x5)
    e = expect(RULES["legacy_lbr"], Context("kvm", facts, profile))
    assert not e.available and "sets lbr-fmt=0" in e.reason


@pytest.mark.parametrize(("sysctls", "perf", "held"), [
    ({"kernel.nmi_watchdog": "1"}, {}, False), ({"kernel.nmi_watchdog": "0"}, {"nmi_watchdog": "1"}, True),
    ({}, {"nmi_watchdog": "1"}, False), ({}, {}, True)])  # fmt: skip
def test_nmi_watchdog_condition(sysctls, perf, held):
    facts = {**kvm_host(), "sysctls": sysctls, "perf": perf}
    reason = CONDITIONS["host_nmi_watchdog_off"](Context("kvm", facts, PMU_ON))
    assert (reason is None) == held
    if not held:
        assert "echo 0 > /proc/sys/kernel/nmi_watchdog" in reason


def test_bad_offer_name(tmp_path):
    path = tmp_path / "kvm_features.toml"
    path.write_text('[f]\ndescription = "d"\nneeds = []\noffer = "arch_perfmn"\n')
    with pytest.raises(UsageError, match="unknown offer 'arch_perfmn'"):
        load_rules(path)


def test_hybrid_host_is_named_although_kvm_forced_enable_pmu_off():
    """kvm_init_pmu_capability() sets enable_pmu = false on hybrid CPUs: sysfs reads N, the cause is hybrid."""
    e = expect(RULES["arch_perfmon"], Context("kvm", host(enable_pmu="N", hybrid=True), PMU_ON))
    assert e.reason.startswith("kvm-limit: KVM disables the vPMU on hybrid hosts"), e.reason
    for name in ("arch_lbr", "pebs_adaptive", "pebs_ldlat", "topdown", "legacy_lbr", "pebs"):
        reason = expect(RULES[name], Context("kvm", host(hybrid=True), LBR_PROFILE)).reason
        assert reason.startswith("kvm-limit: KVM disables the vPMU on hybrid hosts"), (name, reason)


def test_no_call_stack_lbr_means_no_guest_lbr():
    """Ivy Bridge (model 0x3A, snb LBR select map: no call stack): vmx_get_perf_capabilities() gives no LBR."""
    facts = kvm_host(SKX, host_perf_caps=SKX_PERF_CAPS, no_offer=True)
    facts["cpu"]["caps"]["model"] = 0x3A
    e = expect(RULES["legacy_lbr"], Context("kvm", facts, LBR_PROFILE))
    assert not e.available and "no call-stack LBR" in e.reason


def test_pmu_off_is_not_honoured_on_amd_hosts():
    """QEMU's pmu=off zeroes leaf 0AH, which only Intel guests use; AMD's legacy counters stay (qemu-limit)."""
    assert expect(RULES["pmu_off_honoured"], Context("kvm", host(), PMU_OFF)).available
    e = expect(RULES["pmu_off_honoured"], Context("kvm", host(vendor="AuthenticAMD"), PMU_OFF))
    assert not e.available and e.reason.startswith("qemu-limit: QEMU's pmu=off does not take an AMD guest")


def test_hygon_is_virtualized_like_amd():
    facts = host(vendor="AuthenticAMD")
    facts["cpu"]["vendor"] = "HygonGenuine"
    ctx = Context("kvm", facts, PMU_ON)
    assert pmu_feature(ctx) == "amd_core_pmu" and expect(RULES["amd_core_pmu"], ctx).available


def test_old_host_without_enable_pmu_parameter(tmp_path):
    """Linux < 5.17 has no kvm.enable_pmu: the vPMU is on (Intel), or kvm_amd.pmu says (AMD)."""
    from harness.host.hostfacts import effective_enable_pmu

    (tmp_path / "kvm" / "parameters").mkdir(parents=True)
    assert effective_enable_pmu(["kvm", "kvm_intel"], tmp_path)[0] == "Y"
    (tmp_path / "kvm_amd" / "parameters").mkdir(parents=True)
    (tmp_path / "kvm_amd" / "parameters" / "pmu").write_text("N\n")
    assert effective_enable_pmu(["kvm", "kvm_amd"], tmp_path) == ("N", "kvm_amd.pmu (kernel before 5.17)")
    (tmp_path / "kvm" / "parameters" / "enable_pmu").write_text("Y\n")
    assert effective_enable_pmu(["kvm", "kvm_amd"], tmp_path) == ("Y", "kvm.enable_pmu")


def test_mediated_host_with_the_nmi_watchdog_cannot_create_a_pmu_vm():
    facts = {**kvm_host(), "vpmu_mode": "mediated", "sysctls": {"kernel.nmi_watchdog": "1"}}
    reason = CONDITIONS["mediated_vm_creatable"](Context("kvm", facts, PMU_ON))
    assert reason.startswith("host: mediated vPMU and nmi_watchdog=1 holds a pinned cycles event"), reason
    assert reason.endswith("(echo 0 > /proc/sys/kernel/nmi_watchdog)") and "-EBUSY" in reason
    assert CONDITIONS["mediated_vm_creatable"](Context("kvm", {**facts, "vpmu_mode": "perf-based"}, PMU_ON)) is None
    assert CONDITIONS["mediated_vm_creatable"](Context("kvm", {**facts, "sysctls": {"kernel.nmi_watchdog": "0"}},
                                                       PMU_OFF)) is None  # fmt: skip


# --- the shipped representative hosts (tests/data/hosts, built from real CPUID dumps and KVM's rules) ---------
HOSTS_DIR = Path(__file__).parent / "data" / "hosts"
PASSTHROUGH = Profile("pt", "d", "host,pmu=on,migratable=no", None, ("kvm",))


def host_file(name: str) -> dict:
    return json.loads((HOSTS_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize(("name", "rule", "available", "reason"), [
    ("spr-perf-based", "arch_perfmon", True, "expected: Intel architectural PMU"),
    ("spr-perf-based", "pebs", True, "expected: Intel PEBS"),
    ("spr-perf-based", "pebs_ldlat", False, "kvm-limit: KVM disallows adaptive PEBS"),
    ("spr-perf-based", "legacy_lbr", False, "kvm-limit: KVM gives no guest LBR on arch-LBR hosts"),
    ("spr-perf-based", "topdown", False, "kvm-limit: needs the mediated vPMU"),
    ("spr-mediated", "pebs", False, "kvm-limit: no guest PEBS with the mediated vPMU"),
    ("spr-mediated", "topdown", False, "kvm-limit: guest fixed counter 3"),
    ("icx", "legacy_lbr", True, "expected: Intel legacy LBR"),
    ("icx", "pebs", True, "expected: Intel PEBS"),
    ("skl", "legacy_lbr", True, "expected: Intel legacy LBR"),
    ("skl", "pebs", False, "host: no PEBS-via-EPT"),
    ("adl-hybrid", "arch_perfmon", False, "kvm-limit: KVM disables the vPMU on hybrid hosts"),
    ("genoa-perf-based", "amd_core_pmu", True, "expected: AMD core performance counters"),
    ("genoa-mediated", "amd_core_pmu", True, "expected: AMD core performance counters"),
    ("rome", "amd_core_pmu", True, "expected: AMD core performance counters"),
    ("spr-ignore-msrs", "pmu_msrs_fault", False, "host: kvm.ignore_msrs=Y"),
])  # fmt: skip
def test_representative_hosts(name, rule, available, reason):
    """What each shipped host's KVM offer (and the table where the offer is silent) makes of the main rules."""
    e = expect(RULES[rule], Context("kvm", host_file(name), PASSTHROUGH))
    assert (e.available, e.reason[: len(reason)]) == (available, reason), e.reason
