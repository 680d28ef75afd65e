"""The expectation engine over host facts of hosts we have (TCG here) and do not have (Intel/AMD KVM hosts)."""

from __future__ import annotations

import pytest

from harness.caps import decode_caps
from harness.cpuid_dump import load_cpuid_dump
from harness.errors import UsageError
from harness.expectations import Context, expect, load_rules, pmu_feature
from harness.profiles import Profile, load_profiles
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
