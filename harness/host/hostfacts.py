"""Host facts for ``harness doctor``: which accelerator the suite can use, and what PMU the host has.

Every fact is read from the system (sysfs, /proc, the host's CPUID through /dev/cpu/0/cpuid, what KVM offers
guests through /dev/kvm's system ioctls (harness.host.kvm_offer), the binaries themselves) at call time; nothing is
assumed. The accelerator decision is a pure function of those facts (:func:`choose_accel`), so it can be
unit-tested with the facts of hosts we do not have.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.cpu.caps import PmuCaps, decode_caps, decode_perf_capabilities
from harness.cpu.cpuid_dump import CpuidTable, Regs
from harness.errors import HarnessError, UsageError
from harness.host import kvm_offer

SYSFS_MODULES = Path("/sys/module")
SYSFS_PMUS = Path("/sys/bus/event_source/devices")
PROC_SYS_KERNEL = Path("/proc/sys/kernel")
KVM_DEVICE = kvm_offer.KVM_DEVICE
CPUID_DEVICE = Path("/dev/cpu/0/cpuid")
SMT_ACTIVE = Path("/sys/devices/system/cpu/smt/active")
# Module names that provide hardware-assisted KVM for normal guests.
KVM_VENDOR_MODULES = ("kvm_intel", "kvm_amd")
# Paravirtual nested KVM (PVM): /dev/kvm works, but only for PVM-aware guest kernels, so a stock distro kernel
# cannot boot under it. Seen on this project's CI machines.
KVM_PARAVIRT_MODULES = ("kvm_pvm",)
# The x86 perf core PMU appears under one of these names (hybrid parts register cpu_core and cpu_atom).
CORE_PMU_NAMES = ("cpu", "cpu_core", "cpu_atom")
# Leaves read from the host's CPUID for the capability decoder (harness.cpu.caps).
HOST_CPUID_LEAVES = (
    (0x0, 0), (0x1, 0), (0x7, 0), (0xA, 0), (0x1C, 0),
    (0x40000000, 0), (0x80000000, 0), (0x80000001, 0), (0x8000001B, 0), (0x80000022, 0),
)  # fmt: skip
# Host sysctls that change what a guest's counters see (Documentation/admin-guide/sysctl/kernel.rst):
# nmi_watchdog keeps a pinned cycles event on every CPU (kernel/watchdog_perf.c), which competes with KVM's pinned
# backing events; perf_event_paranoid gates host perf (the load generator); perf_cpu_time_max_percent and
# perf_event_max_sample_rate drive the sampling throttle (kernel/events/core.c perf_sample_event_took()).
HOST_SYSCTLS = ("nmi_watchdog", "perf_event_paranoid", "perf_cpu_time_max_percent", "perf_event_max_sample_rate")
QEMU_BINARY = "qemu-system-x86_64"
PROBE_TIMEOUT_S = 20.0


def _read(path: Path) -> str | None:
    """Return the stripped contents of a sysfs/procfs file, or None when it does not exist or is unreadable."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _run(argv: list[str], timeout_s: float = PROBE_TIMEOUT_S) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def read_host_cpuid(device: Path = CPUID_DEVICE) -> CpuidTable | None:
    """Read the host's CPUID through the ``cpuid`` driver (offset = leaf | subleaf << 32), or None.

    Needs the ``cpuid`` module and root; the caller falls back to /proc/cpuinfo flags without it.
    """
    try:
        fd = os.open(device, os.O_RDONLY)
    except OSError:
        return None
    leaves: dict[tuple[int, int], Regs] = {}
    try:
        for leaf, sub in HOST_CPUID_LEAVES:
            data = os.pread(fd, 16, leaf | (sub << 32))
            if len(data) == 16:
                leaves[(leaf, sub)] = Regs(*(int.from_bytes(data[i : i + 4], "little") for i in range(0, 16, 4)))
    except OSError:
        return None
    finally:
        os.close(fd)
    return CpuidTable(leaves, str(device))


# x86-64 System V function ``void cpuid(uint32 leaf, uint32 subleaf, uint32 out[4])``: the CPUID instruction
# is unprivileged, so this reads CPUID without root or the cpuid module (used when /dev/cpu/0/cpuid is not
# readable). push rbx; mov eax,edi; mov ecx,esi; mov r8,rdx; cpuid; mov [r8],eax; mov [r8+4],ebx;
# mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex("53 89f8 89f1 4989d0 0fa2 418900 41895804 41894808 4189500c 5b c3")


def read_cpuid_instruction(cpu: int = 0) -> CpuidTable | None:
    """Execute CPUID in-process (pinned to ``cpu``, since hybrid parts differ per core); None if not possible."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):
        return None  # W^X policy: no executable anonymous memory
    saved = os.sched_getaffinity(0)
    try:
        page.write(_CPUID_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        function = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))(address)
        out = (ctypes.c_uint32 * 4)()
        os.sched_setaffinity(0, {cpu})
        leaves: dict[tuple[int, int], Regs] = {}
        for leaf, sub in HOST_CPUID_LEAVES:
            function(leaf, sub, out)
            leaves[(leaf, sub)] = Regs(*out)
        del function
        return CpuidTable(leaves, "CPUID instruction")
    except OSError:
        return None
    finally:
        os.sched_setaffinity(0, saved)


def read_host_perf_capabilities(caps: PmuCaps | None) -> dict[str, Any]:
    """Host IA32_PERF_CAPABILITIES (MSR 0x345) through /dev/cpu/0/msr, decoded; the reason when unreadable.

    The MSR exists only when CPUID.1:ECX.PDCM is set (SDM Vol. 4); reading it needs the msr module and root.
    """
    if caps is None or not caps.pdcm:
        return {"value": None, "reason": "CPUID.1:ECX.PDCM clear or CPUID unreadable: no IA32_PERF_CAPABILITIES"}
    try:
        fd = os.open("/dev/cpu/0/msr", os.O_RDONLY)
    except OSError as exc:
        return {"value": None, "reason": f"/dev/cpu/0/msr: {exc.strerror} (load the msr module, run as root)"}
    try:
        raw = os.pread(fd, 8, 0x345)
    except OSError as exc:
        return {"value": None, "reason": f"rdmsr 0x345: {exc.strerror}"}
    finally:
        os.close(fd)
    return {"value": decode_perf_capabilities(int.from_bytes(raw, "little")), "reason": None}


def cpuinfo_flags(text: str | None = None) -> set[str]:
    """Return the first CPU's flags from /proc/cpuinfo."""
    if text is None:
        text = _read(Path("/proc/cpuinfo")) or ""
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return set(match.group(1).split()) if match else set()


def kvm_facts() -> dict[str, Any]:
    """Return facts about /dev/kvm, the loaded KVM modules and the parameters that change guest PMU behaviour.

    ``force_emulation_prefix`` (kvm.ko) lets a guest force instruction emulation (``ud2; .ascii "kvm"``), which
    KVM counts in software (kvm_pmu_instruction_retired()); ``ignore_msrs`` turns #GP on unknown MSRs into
    reads of 0 (x86.c kvm_msr_ignored_check()).
    """
    modules = sorted(m.name for m in SYSFS_MODULES.glob("kvm*") if m.is_dir())
    vendor_params: dict[str, str | None] = {}
    for module in KVM_VENDOR_MODULES:
        if module in modules:
            vendor_params[module] = _read(SYSFS_MODULES / module / "parameters" / "enable_mediated_pmu")
    mediated = next((v for v in vendor_params.values() if v is not None), None)
    enable_pmu, enable_pmu_source = effective_enable_pmu(modules, SYSFS_MODULES)
    return {
        "device": str(KVM_DEVICE),
        "device_present": KVM_DEVICE.exists(),
        "device_access": KVM_DEVICE.exists() and os.access(KVM_DEVICE, os.R_OK | os.W_OK),
        "modules": modules,
        "vendor_module": next((m for m in KVM_VENDOR_MODULES if m in modules), None),
        "enable_pmu": enable_pmu,
        "enable_pmu_source": enable_pmu_source,
        "enable_mediated_pmu": mediated,
        "ignore_msrs": _read(SYSFS_MODULES / "kvm" / "parameters" / "ignore_msrs"),
        "force_emulation_prefix": _read(SYSFS_MODULES / "kvm" / "parameters" / "force_emulation_prefix"),
    }


def effective_enable_pmu(modules: list[str], sysfs_modules: Path) -> tuple[str | None, str]:
    """Whether KVM gives VMs a vPMU at all, and where that answer comes from.

    ``kvm.enable_pmu`` exists since Linux 5.17 (commit 4732f2444acd "KVM: x86: Making the module parameter of vPMU
    more common"). Before it, kvm_amd had its own ``pmu`` parameter (5.7-5.16) and Intel's vPMU was always on, so a
    missing parameter on an old host means "on", not "off".
    """
    value = _read(sysfs_modules / "kvm" / "parameters" / "enable_pmu")
    if value is not None or "kvm" not in modules:
        return value, "kvm.enable_pmu"
    amd = _read(sysfs_modules / "kvm_amd" / "parameters" / "pmu") if "kvm_amd" in modules else None
    if amd is not None:
        return amd, "kvm_amd.pmu (kernel before 5.17)"
    return "Y", "default: no kvm.enable_pmu before Linux 5.17; the vPMU is always on"


def sysctl_facts(proc_sys_kernel: Path = PROC_SYS_KERNEL, pmus_dir: Path = SYSFS_PMUS) -> dict[str, Any]:
    """Return the host sysctls of HOST_SYSCTLS and each core PMU's multiplexing interval.

    perf_event_mux_interval_ms is per PMU (kernel/events/core.c perf_event_mux_interval_ms_store(), default
    PERF_CPU_HRTIMER = 1000/HZ ms): how often perf rotates events that do not all fit on the counters, host and
    guest-backing events alike.
    """
    facts: dict[str, Any] = {f"kernel.{name}": _read(proc_sys_kernel / name) for name in HOST_SYSCTLS}
    mux: dict[str, int] = {}
    for pmu in CORE_PMU_NAMES:
        value = _read(pmus_dir / pmu / "perf_event_mux_interval_ms")
        if value is not None and value.isdigit():
            mux[pmu] = int(value)
    facts["perf_event_mux_interval_ms"] = mux
    return facts


def perf_facts() -> dict[str, Any]:
    """Return facts about the host ``perf`` tool, and whether hardware events really count here."""
    path = shutil.which("perf")
    facts: dict[str, Any] = {"path": path, "version": None, "hw_events_count": False, "hw_events_detail": None}
    facts["paranoid"] = _read(Path("/proc/sys/kernel/perf_event_paranoid"))
    facts["nmi_watchdog"] = _read(Path("/proc/sys/kernel/nmi_watchdog"))
    if path is None:
        facts["hw_events_detail"] = "perf is not installed (Debian package linux-perf)"
        return facts
    version = _run([path, "--version"])
    if version is not None and version.returncode == 0:
        facts["version"] = version.stdout.strip().removeprefix("perf version ").strip()
    # Count user-mode instructions of `true`: the CSV's first field is the count, or "<not supported>" /
    # "<not counted>" when no hardware counter is available (perf stat -x output, see shared/data/perf-stat).
    probe = _run([path, "stat", "-x", ",", "-e", "instructions:u", "--", "true"])
    if probe is None:
        facts["hw_events_detail"] = "perf stat did not finish"
        return facts
    line = next((ln for ln in probe.stderr.splitlines() if "instructions" in ln), probe.stderr.strip())
    first = line.split(",", 1)[0].strip()
    facts["hw_events_count"] = first.isdigit()
    facts["hw_events_detail"] = f"perf stat -e instructions:u: {line.strip() or 'no output'}"
    return facts


def host_pmu_facts(caps: PmuCaps | None) -> dict[str, Any]:
    """Return which perf PMUs the host kernel registered, and the host's architectural PMU from CPUID."""
    pmus = sorted(p.name for p in SYSFS_PMUS.iterdir()) if SYSFS_PMUS.is_dir() else []
    core = [name for name in CORE_PMU_NAMES if name in pmus]
    return {
        "present": bool(core),
        "core_pmus": core,
        "pmus": pmus,
        "hybrid": bool(caps and caps.hybrid) or "cpu_atom" in pmus,
        "arch_perfmon_version": caps.arch_perfmon.version if caps and caps.arch_perfmon else 0,
    }


def qemu_facts(binary: str = QEMU_BINARY) -> dict[str, Any]:
    """Return the QEMU binary's path, version and the accelerators it was built with."""
    path = shutil.which(binary)
    facts: dict[str, Any] = {"path": path, "version": None, "accels": []}
    if path is None:
        return facts
    version = _run([path, "--version"])
    if version is not None:
        match = re.search(r"version (\S+)", version.stdout)
        facts["version"] = match.group(1) if match else version.stdout.strip()
    accels = _run([path, "-accel", "help"])
    if accels is not None:
        facts["accels"] = [ln.strip() for ln in accels.stdout.splitlines()[1:] if ln.strip()]
    return facts


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator the suite will use and one sentence saying why."""

    accel: str | None
    reason: str


def choose_accel(kvm: dict[str, Any], cpu_flags: set[str], qemu: dict[str, Any]) -> AccelChoice:
    """Pick ``kvm`` when it can boot a normal guest here, else ``tcg``; None when QEMU itself is missing."""
    if qemu.get("path") is None:
        return AccelChoice(None, f"{QEMU_BINARY} is not installed (Debian package qemu-system-x86)")
    why_not: list[str] = []
    paravirt = [m for m in kvm["modules"] if m in KVM_PARAVIRT_MODULES]
    vendor = [m for m in kvm["modules"] if m in KVM_VENDOR_MODULES]
    if not kvm["device_present"]:
        why_not.append("/dev/kvm does not exist")
    elif not kvm["device_access"]:
        why_not.append("/dev/kvm is not readable and writable by this user")
    if paravirt:
        why_not.append(
            f"the KVM module is {', '.join(paravirt)} (paravirtual nested KVM, cannot boot a stock guest kernel)"
        )
    elif not vendor:
        why_not.append("neither kvm_intel nor kvm_amd is loaded")
    if not cpu_flags & {"vmx", "svm"}:
        why_not.append("the CPU has no vmx/svm flag")
    if "kvm" not in qemu.get("accels", []):
        why_not.append("QEMU was built without KVM")
    if not why_not:
        return AccelChoice(
            "kvm",
            f"KVM usable: {', '.join(vendor)} loaded, /dev/kvm accessible, CPU has "
            f"{'vmx' if 'vmx' in cpu_flags else 'svm'}",
        )
    if "tcg" not in qemu.get("accels", []):
        return AccelChoice(None, "KVM unusable (" + "; ".join(why_not) + ") and QEMU has no TCG")
    return AccelChoice("tcg", "KVM unusable: " + "; ".join(why_not) + "; using TCG (no vPMU)")


def resolve_accel(requested: str | None, choice: AccelChoice) -> str:
    """The accelerator to use: ``requested`` (``--accel``) if it can run here, else doctor's choice.

    :raises UsageError: kvm was requested where KVM is not usable.
    :raises HarnessError: nothing was requested and no accelerator is usable at all.
    """
    if requested == "kvm" and choice.accel != "kvm":
        raise UsageError(f"--accel kvm: KVM is not usable here ({choice.reason})")
    chosen = requested or choice.accel
    if chosen is None:
        raise HarnessError(f"no usable accelerator: {choice.reason}")
    return chosen


def vpmu_mode(accel: str | None, kvm: dict[str, Any]) -> str | None:
    """Return ``mediated``, ``perf-based`` or None (no KVM, or ``kvm.enable_pmu=N``).

    ``enable_mediated_pmu`` is a kvm_intel/kvm_amd parameter since Linux 6.20/7.0 (tag kvm-x86-pmu-6.20); without
    it, a KVM with ``enable_pmu=Y`` backs guest counters with host perf events.
    """
    if accel != "kvm" or kvm.get("enable_pmu") not in ("Y", "1"):
        return None
    return "mediated" if kvm.get("enable_mediated_pmu") in ("Y", "1") else "perf-based"


def collect() -> dict[str, Any]:
    """Gather every host fact; this is the ``doctor --json`` object (and the ``host`` of results.json)."""
    table = read_host_cpuid() or read_cpuid_instruction()
    caps = decode_caps(table) if table is not None else None
    flags = cpuinfo_flags()
    kvm = kvm_facts()
    offer, offer_reason = kvm_offer.read_offer(KVM_DEVICE)
    qemu = qemu_facts()
    choice = choose_accel(kvm, flags, qemu)
    cpuinfo = _read(Path("/proc/cpuinfo")) or ""
    model_name = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    vendor = re.search(r"^vendor_id\s*:\s*(.*)$", cpuinfo, re.M)
    microcode = re.search(r"^microcode\s*:\s*(.*)$", cpuinfo, re.M)
    smt = _read(SMT_ACTIVE)
    cpu: dict[str, Any] = {
        "model_name": model_name.group(1) if model_name else None,
        "vendor": caps.vendor if caps else (vendor.group(1) if vendor else None),
        "microcode": microcode.group(1) if microcode else None,
        "virt_flags": sorted(flags & {"vmx", "svm", "hypervisor"}),
        # SMT siblings share TOPDOWN.SLOTS (and, per core, other counters): the topdown width rule reads this.
        "smt_active": None if smt is None else smt == "1",
        "cpuid_source": table.source if table else "none (no /dev/cpu/0/cpuid access, CPUID not executable)",
        "caps": caps.to_json() if caps else None,
        "perf_capabilities": read_host_perf_capabilities(caps) if caps and caps.vendor == "GenuineIntel" else None,
    }
    return {
        "accel": choice.accel,
        "accel_reason": choice.reason,
        "vpmu_mode": vpmu_mode(choice.accel, kvm),
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu,
        "kvm": kvm,
        "kvm_offer": offer,
        "kvm_offer_reason": offer_reason,
        "sysctls": sysctl_facts(),
        "host_pmu": host_pmu_facts(caps),
        "perf": perf_facts(),
        "qemu": qemu,
    }


def _render_sysctls(facts: dict[str, Any]) -> str:
    """The sysctl line; facts from before ``sysctls`` existed only have perf.nmi_watchdog and perf.paranoid."""
    sysctls = facts.get("sysctls")
    if sysctls is None:
        perf = facts["perf"]
        return f"nmi_watchdog={perf['nmi_watchdog']} perf_event_paranoid={perf['paranoid']}"
    values = " ".join(f"{name}={sysctls.get(f'kernel.{name}')}" for name in HOST_SYSCTLS)
    mux = sysctls.get("perf_event_mux_interval_ms") or {}
    mux_text = ", ".join(f"{pmu}={ms}" for pmu, ms in mux.items()) or "no core PMU"
    return f"{values} perf_event_mux_interval_ms: {mux_text}"


def render_text(facts: dict[str, Any]) -> str:
    """Render the facts for a human: one fact per line, the decision first."""
    kvm, pmu, perf, qemu, cpu = facts["kvm"], facts["host_pmu"], facts["perf"], facts["qemu"], facts["cpu"]
    caps = cpu.get("caps") or {}
    lines = [
        f"accelerator:   {facts['accel'] or 'none'} ({facts['accel_reason']})",
        f"vPMU mode:     {facts['vpmu_mode'] or 'none'}",
        f"host kernel:   {facts['kernel']}",
        f"CPU:           {cpu['model_name']} ({caps.get('vendor', '?')} family {caps.get('family', '?')} "
        f"model {caps.get('model', '?')}; CPUID via {cpu['cpuid_source']})",
        f"KVM:           /dev/kvm {'present' if kvm['device_present'] else 'absent'}"
        f"{', accessible' if kvm['device_access'] else ''}; modules {', '.join(kvm['modules']) or 'none'}; "
        f"enable_pmu={kvm['enable_pmu']}; enable_mediated_pmu={kvm['enable_mediated_pmu']}",
        f"KVM knobs:     ignore_msrs={kvm.get('ignore_msrs')} force_emulation_prefix="
        f"{kvm.get('force_emulation_prefix')} vendor_module={kvm.get('vendor_module')}",
        f"KVM offer:     {kvm_offer.describe(facts.get('kvm_offer'), facts.get('kvm_offer_reason'))}",
        f"host PMU:      {'present: ' + ', '.join(pmu['core_pmus']) if pmu['present'] else 'absent'} "
        f"(CPUID.0AH version {pmu['arch_perfmon_version']}; perf PMUs: {', '.join(pmu['pmus']) or 'none'})",
        f"perf:          {perf['path'] or 'missing'} {perf['version'] or ''}; hardware events "
        f"{'count' if perf['hw_events_count'] else 'do not count'} ({perf['hw_events_detail']})",
        f"sysctl:        {_render_sysctls(facts)}",
        f"QEMU:          {qemu['path'] or 'missing'} {qemu['version'] or ''} (accels: {', '.join(qemu['accels'])})",
    ]
    return "\n".join(lines)
