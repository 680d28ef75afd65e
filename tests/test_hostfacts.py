"""doctor: the accelerator decision over facts of hosts we have and do not have, and the live facts here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import hostfacts
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
