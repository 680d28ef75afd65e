"""doctor: the accelerator decision over facts of hosts we have and do not have, and the live facts here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness.host import hostfacts, kvm_offer
from tests.helpers import run_cli

QEMU = {"path": "/usr/bin/qemu-system-x86_64", "version": "7.2.22", "accels": ["tcg", "kvm"]}


def kvm(modules, present=True, access=True, enable_pmu="Y", mediated=None):
    return {"device": "/dev/kvm", "device_present": present, "device_access": access, "modules": modules,
            "enable_pmu": enable_pmu, "enable_mediated_pmu": mediated, "ignore_msrs": "N"}  # fmt: skip


def test_paravirtual_nested_kvm_is_not_usable():
    # This project's machines: /dev/kvm exists and is accessible, but the module is kvm_pvm and the CPU has no
    # vmx/svm flag.
    choice = hostfacts.choose_accel(kvm(["kvm", "kvm_pvm"], enable_pmu="N"), {"hypervisor", "sse2"}, QEMU)
    assert choice.accel == "tcg"
    assert "kvm_pvm" in choice.reason and "no vmx/svm" in choice.reason


@pytest.mark.parametrize(("module", "flag"), [("kvm_intel", "vmx"), ("kvm_amd", "svm")])
def test_hardware_kvm_host_picks_kvm(module, flag):
    choice = hostfacts.choose_accel(kvm(["kvm", module]), {flag}, QEMU)
    assert choice.accel == "kvm"
    assert module in choice.reason


@pytest.mark.parametrize(
    ("facts", "flags", "why"),
    [
        (kvm([], present=False), {"vmx"}, "/dev/kvm does not exist"),
        (kvm(["kvm", "kvm_intel"], access=False), {"vmx"}, "not readable and writable"),
        (kvm(["kvm"]), {"vmx"}, "neither kvm_intel nor kvm_amd"),
        (kvm(["kvm", "kvm_intel"]), {"sse2"}, "no vmx/svm flag"),
    ],
)
def test_reasons_kvm_is_not_usable(facts, flags, why):
    choice = hostfacts.choose_accel(facts, flags, QEMU)
    assert choice.accel == "tcg" and why in choice.reason


def test_no_qemu_means_no_accelerator():
    choice = hostfacts.choose_accel(kvm(["kvm", "kvm_intel"]), {"vmx"}, {"path": None, "accels": []})
    assert choice.accel is None and "qemu-system-x86" in choice.reason


def test_qemu_without_kvm_support():
    choice = hostfacts.choose_accel(kvm(["kvm", "kvm_intel"]), {"vmx"}, {**QEMU, "accels": ["tcg"]})
    assert choice.accel == "tcg" and "built without KVM" in choice.reason


@pytest.mark.parametrize(
    ("accel", "facts", "mode"),
    [
        ("tcg", kvm(["kvm"]), None),
        ("kvm", kvm(["kvm", "kvm_intel"], enable_pmu="N"), None),
        ("kvm", kvm(["kvm", "kvm_intel"]), "perf-based"),
        ("kvm", kvm(["kvm", "kvm_intel"], mediated="N"), "perf-based"),
        ("kvm", kvm(["kvm", "kvm_amd"], mediated="Y"), "mediated"),
    ],
)
def test_vpmu_mode(accel, facts, mode):
    assert hostfacts.vpmu_mode(accel, facts) == mode


def test_cpuinfo_flags_first_cpu():
    text = "processor : 0\nflags\t\t: fpu vmx pdcm\n\nprocessor : 1\nflags\t\t: fpu\n"
    assert hostfacts.cpuinfo_flags(text) == {"fpu", "vmx", "pdcm"}


def test_doctor_json_matches_this_host():
    """The live facts agree with what the system itself says (read independently here)."""
    proc = run_cli("doctor", "--json")
    facts = json.loads(proc.stdout)
    assert {"accel", "accel_reason", "kvm", "host_pmu", "perf", "qemu", "vpmu_mode"} <= set(facts)
    assert proc.returncode == (0 if facts["accel"] else 1)
    modules = {p.name for p in Path("/sys/module").glob("kvm*")}
    assert set(facts["kvm"]["modules"]) == modules
    flags = hostfacts.cpuinfo_flags()
    if "kvm_pvm" in modules or not flags & {"vmx", "svm"}:
        assert facts["accel"] == "tcg"
        assert facts["vpmu_mode"] is None
    sysfs = Path("/sys/bus/event_source/devices")
    assert facts["host_pmu"]["present"] == any((sysfs / n).exists() for n in ("cpu", "cpu_core", "cpu_atom"))
    enable_pmu = Path("/sys/module/kvm/parameters/enable_pmu")
    assert facts["kvm"]["enable_pmu"] == (enable_pmu.read_text().strip() if enable_pmu.exists() else None)
    assert facts["qemu"]["version"] and "tcg" in facts["qemu"]["accels"]
    assert isinstance(facts["perf"]["hw_events_count"], bool) and facts["perf"]["hw_events_detail"]
    if not facts["host_pmu"]["present"]:
        assert facts["perf"]["hw_events_count"] is False


def test_doctor_text():
    proc = run_cli("doctor")
    assert proc.stdout.startswith("accelerator:")
    assert "QEMU:" in proc.stdout and "host PMU:" in proc.stdout


def test_cpuid_instruction_agrees_with_cpuid_device():
    """The in-process CPUID (no root needed) reads what the kernel's cpuid driver reads on CPU 0."""
    device = hostfacts.read_host_cpuid()
    if device is None:
        pytest.skip("host: /dev/cpu/0/cpuid is not readable (needs root and the cpuid module)")
    instruction = hostfacts.read_cpuid_instruction(0)
    assert instruction is not None
    assert instruction.leaves == device.leaves


# --- the doctor JSON contract additions: kvm_offer, kvm_offer_reason, sysctls, kvm knobs ----------------------

CONTRACT_TOP = {"accel", "accel_reason", "vpmu_mode", "hostname", "kernel", "cpu", "kvm", "host_pmu", "perf", "qemu",
                "kvm_offer", "kvm_offer_reason", "sysctls"}  # fmt: skip
CONTRACT_KVM = {"device", "device_present", "device_access", "modules", "enable_pmu", "enable_mediated_pmu",
                "ignore_msrs", "force_emulation_prefix", "vendor_module"}  # fmt: skip
CONTRACT_OFFER = {"source", "cpuid", "pmu", "perf_capabilities", "perf_capabilities_decoded", "capabilities"}
CONTRACT_SYSCTLS = {"kernel.nmi_watchdog", "kernel.perf_event_paranoid", "kernel.perf_cpu_time_max_percent",
                    "kernel.perf_event_max_sample_rate", "perf_event_mux_interval_ms"}  # fmt: skip


def _proc(name: str) -> str | None:
    path = Path("/proc/sys/kernel") / name
    return path.read_text().strip() if path.exists() else None


def test_collect_has_every_contract_key():
    facts = hostfacts.collect()
    json.dumps(facts)  # the doctor --json object and results.json's host must serialise
    assert set(facts) >= CONTRACT_TOP
    assert set(facts["kvm"]) >= CONTRACT_KVM
    assert set(facts["sysctls"]) == CONTRACT_SYSCTLS
    assert "nmi_watchdog" in facts["perf"] and "paranoid" in facts["perf"]  # kept for old readers
    for name in ("nmi_watchdog", "perf_event_paranoid", "perf_cpu_time_max_percent", "perf_event_max_sample_rate"):
        assert facts["sysctls"][f"kernel.{name}"] == _proc(name)
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as exc:
        assert facts["kvm_offer"] is None and exc.strerror in facts["kvm_offer_reason"]
    else:
        assert facts["kvm_offer_reason"] is None and set(facts["kvm_offer"]) >= CONTRACT_OFFER
        assert facts["kvm_offer"]["source"] == "/dev/kvm"
    modules = {p.name for p in Path("/sys/module").glob("kvm*")}
    assert facts["kvm"]["vendor_module"] == next((m for m in ("kvm_intel", "kvm_amd") if m in modules), None)


def test_render_text_shows_the_offer_and_the_knobs():
    facts = hostfacts.collect()
    lines = hostfacts.render_text(facts).splitlines()
    offer_line = next(line for line in lines if line.startswith("KVM offer:"))
    assert offer_line.split(":", 1)[1].strip() == kvm_offer.describe(facts["kvm_offer"], facts["kvm_offer_reason"])
    knobs = next(line for line in lines if line.startswith("KVM knobs:"))
    assert f"force_emulation_prefix={facts['kvm']['force_emulation_prefix']}" in knobs
    sysctl = next(line for line in lines if line.startswith("sysctl:"))
    assert f"perf_cpu_time_max_percent={_proc('perf_cpu_time_max_percent')}" in sysctl
    assert "perf_event_mux_interval_ms:" in sysctl


def test_render_text_of_facts_from_before_the_offer():
    """A results.json host written before these keys existed still renders (absent = unknown)."""
    facts = hostfacts.collect()
    for key in ("kvm_offer", "kvm_offer_reason", "sysctls"):
        del facts[key]
    for key in ("force_emulation_prefix", "vendor_module"):
        del facts["kvm"][key]
    text = hostfacts.render_text(facts)
    assert "KVM offer:     unavailable (not read)" in text
    assert f"sysctl:        nmi_watchdog={facts['perf']['nmi_watchdog']} " in text


def test_sysctl_facts_reads_core_pmus_only(tmp_path):
    kernel = tmp_path / "kernel"
    kernel.mkdir()
    (kernel / "nmi_watchdog").write_text("1\n")
    (kernel / "perf_cpu_time_max_percent").write_text("25\n")
    for pmu, ms in (("cpu_core", "4"), ("cpu_atom", "4"), ("uncore_imc_0", "1"), ("cpu", "")):
        (tmp_path / "pmus" / pmu).mkdir(parents=True)
        if ms:
            (tmp_path / "pmus" / pmu / "perf_event_mux_interval_ms").write_text(ms + "\n")
    facts = hostfacts.sysctl_facts(kernel, tmp_path / "pmus")
    assert facts["kernel.nmi_watchdog"] == "1" and facts["kernel.perf_event_paranoid"] is None
    assert facts["kernel.perf_cpu_time_max_percent"] == "25"
    assert facts["perf_event_mux_interval_ms"] == {"cpu_core": 4, "cpu_atom": 4}


def test_kvm_facts_vendor_module_and_knobs(tmp_path, monkeypatch):
    for module, params in (("kvm", {"enable_pmu": "Y", "ignore_msrs": "N", "force_emulation_prefix": "1"}),
                           ("kvm_amd", {"enable_mediated_pmu": "Y"})):  # fmt: skip
        (tmp_path / module / "parameters").mkdir(parents=True)
        for name, value in params.items():
            (tmp_path / module / "parameters" / name).write_text(value + "\n")
    monkeypatch.setattr(hostfacts, "SYSFS_MODULES", tmp_path)
    facts = hostfacts.kvm_facts()
    assert facts["vendor_module"] == "kvm_amd" and facts["enable_mediated_pmu"] == "Y"
    assert facts["force_emulation_prefix"] == "1" and facts["modules"] == ["kvm", "kvm_amd"]
