"""What KVM offers guests, asked from ``/dev/kvm`` with KVM's system ioctls (``doctor``'s ``kvm_offer``).

Two layers, so the decoding can be tested with recorded answers of hosts we do not have:

* the ioctl layer (:func:`get_api_version`, :func:`check_extension`, :func:`get_supported_cpuid`,
  :func:`get_msr_feature_index_list`, :func:`get_feature_msrs`) passes raw bytes in and out of the kernel, and
  the ``parse_*`` functions turn those bytes into numbers;
* :func:`offer_from` is pure: KVM_GET_SUPPORTED_CPUID entries + IA32_PERF_CAPABILITIES + KVM_CHECK_EXTENSION
  answers in, the ``kvm_offer`` JSON object out (the same capability decoder as ``harness caps``).

Sources: Documentation/virt/kvm/api.rst (the system ioctls), include/uapi/linux/kvm.h and
arch/x86/include/uapi/asm/kvm.h (numbers and struct layouts; re-checked against torvalds/linux and by compiling
against linux-libc-dev 6.1.192's copies, which print the request numbers written below),
include/uapi/asm-generic/ioctl.h (the _IOC encoding, which x86 uses unchanged).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path
from typing import Any

from harness.cpu.caps import decode_caps, decode_perf_capabilities
from harness.cpu.cpuid_dump import CpuidTable, Regs

KVM_DEVICE = Path("/dev/kvm")

# --- ioctl request encoding: include/uapi/asm-generic/ioctl.h -------------------------------------------------
# _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr  (_IOC_NRBITS 8, _IOC_TYPEBITS 8,
# _IOC_SIZEBITS 14); _IOC_NONE 0, _IOC_WRITE 1, _IOC_READ 2; _IOWR = _IOC(_IOC_READ | _IOC_WRITE, ...).
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
KVMIO = 0xAE  # include/uapi/linux/kvm.h: #define KVMIO 0xAE

# --- struct layouts: arch/x86/include/uapi/asm/kvm.h (all fields __u32 unless noted, no implicit padding) -----
# struct kvm_cpuid2 { __u32 nent; __u32 padding; struct kvm_cpuid_entry2 entries[]; }      header 8 bytes
# struct kvm_cpuid_entry2 { function, index, flags, eax, ebx, ecx, edx; __u32 padding[3]; } 40 bytes
# struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; }                                      header 4 bytes
# struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry entries[]; }                header 8 bytes
# struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; }                          16 bytes
CPUID2_HEADER = struct.Struct("<II")
CPUID_ENTRY2 = struct.Struct("<7I12x")
MSR_LIST_HEADER = struct.Struct("<I")
MSR_INDEX = struct.Struct("<I")
MSRS_HEADER = struct.Struct("<II")
MSR_ENTRY = struct.Struct("<IIQ")
CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


def _ioc(direction: int, nr: int, size: int) -> int:
    """Encode an ioctl request number the way include/uapi/asm-generic/ioctl.h's _IOC() does."""
    return (direction << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT) | (KVMIO << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)


# include/uapi/linux/kvm.h, "ioctls for /dev/kvm fds" and "ioctls for vcpu fds" (KVM_GET_MSRS is also a system
# ioctl: arch/x86/kvm/x86.c kvm_arch_dev_ioctl() reads feature MSRs with it). sizeof() is of the fixed header.
KVM_GET_API_VERSION = _ioc(_IOC_NONE, 0x00, 0)  # _IO(KVMIO, 0x00) = 0xae00
KVM_CHECK_EXTENSION = _ioc(_IOC_NONE, 0x03, 0)  # _IO(KVMIO, 0x03) = 0xae03
KVM_GET_SUPPORTED_CPUID = _ioc(_IOC_READ | _IOC_WRITE, 0x05, CPUID2_HEADER.size)  # _IOWR(.., kvm_cpuid2) 0xc008ae05
KVM_GET_MSR_FEATURE_INDEX_LIST = _ioc(_IOC_READ | _IOC_WRITE, 0x0A, MSR_LIST_HEADER.size)  # 0xc004ae0a
KVM_GET_MSRS = _ioc(_IOC_READ | _IOC_WRITE, 0x88, MSRS_HEADER.size)  # _IOWR(KVMIO, 0x88, kvm_msrs) = 0xc008ae88

KVM_API_VERSION = 12  # include/uapi/linux/kvm.h; api.rst: applications should refuse to run on any other version
# arch/x86/include/asm/kvm_host.h KVM_MAX_CPUID_ENTRIES; kvm_dev_ioctl_get_cpuid() (arch/x86/kvm/cpuid.c) clamps a
# larger nent to it, and answers E2BIG when the entries do not fit.
KVM_MAX_CPUID_ENTRIES = 256
CPUID_NENT_LIMIT = 4096  # api.rst says to retry bigger on E2BIG; stop somewhere
MSR_IA32_PERF_CAPABILITIES = 0x345  # arch/x86/include/asm/msr-index.h

# KVM_CHECK_EXTENSION numbers, include/uapi/linux/kvm.h. Values: PMU_CAPABILITY answers KVM_CAP_PMU_VALID_MASK
# (KVM_PMU_CAP_DISABLE, bit 0) when enable_pmu, else 0; EVENT_FILTER and MASKED_EVENTS answer 1 whenever the kernel
# has them (arch/x86/kvm/x86.c kvm_vm_ioctl_check_extension). An unknown number answers 0, so 0 also means "kernel
# too old" (MASKED_EVENTS: v6.3).
# Mediated vPMU: no capability. Searched include/uapi/linux/kvm.h up to KVM_CAP_S390_USER_OPEREXEC 246 and the
# mediated-PMU series (v4..v6, "KVM: x86/pmu: Introduce enable_mediated_pmu"): it is enumerated only by the
# kvm_intel/kvm_amd module parameter enable_mediated_pmu (selftests query that parameter, not a capability), which
# hostfacts reads from sysfs.
KVM_CAPABILITIES = {
    "KVM_CAP_PMU_CAPABILITY": 212,
    "KVM_CAP_PMU_EVENT_FILTER": 173,
    "KVM_CAP_PMU_EVENT_MASKED_EVENTS": 226,
}

# The CPUID leaves kept in the offer (the doctor JSON contract): every subleaf KVM returns for each of them.
# 40000000H is left out on purpose (the contract), so the decoded ``hypervisor`` reads "unknown".
OFFER_LEAVES = frozenset({0x0, 0x1, 0x7, 0xA, 0x1C, 0x23, 0x80000000, 0x80000001, 0x80000022, 0x8000001B})


# --- ioctl layer: bytes in, bytes out ---------------------------------------------------------------------------


def get_api_version(fd: int) -> int:
    """KVM_GET_API_VERSION: 12 (api.rst 4.1: applications should refuse to run on any other value)."""
    return fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)


def check_extension(fd: int, cap: int) -> int:
    """KVM_CHECK_EXTENSION on the system fd: 0 = absent, else a capability-specific positive value."""
    return fcntl.ioctl(fd, KVM_CHECK_EXTENSION, cap)


def get_supported_cpuid(fd: int, nent: int = KVM_MAX_CPUID_ENTRIES) -> bytes:
    """KVM_GET_SUPPORTED_CPUID: the raw struct kvm_cpuid2 KVM wrote (nent rewritten to the entries filled).

    api.rst, KVM_GET_SUPPORTED_CPUID: too few entries -> E2BIG (nent not written back: retry with twice as many).
    :raises OSError: the ioctl failed otherwise, or still E2BIG at CPUID_NENT_LIMIT entries.
    """
    while True:
        buf = bytearray(CPUID2_HEADER.pack(nent, 0)) + bytearray(nent * CPUID_ENTRY2.size)
        try:
            fcntl.ioctl(fd, KVM_GET_SUPPORTED_CPUID, buf, True)
        except OSError as exc:
            if exc.errno != errno.E2BIG or nent >= CPUID_NENT_LIMIT:
                raise
            nent *= 2
            continue
        return bytes(buf)


def get_msr_feature_index_list(fd: int) -> bytes:
    """KVM_GET_MSR_FEATURE_INDEX_LIST: the raw struct kvm_msr_list.

    arch/x86/kvm/x86.c kvm_arch_dev_ioctl(): KVM always writes back nmsrs = its count, then answers E2BIG when the
    caller's nmsrs was smaller; so ask once with 0, then with the count KVM wrote.
    :raises OSError: the ioctl failed (ENOTTY/EINVAL before KVM had feature MSRs, Linux 4.17).
    """
    nmsrs = 0
    for _ in range(3):  # the list is fixed at module load; a third round only guards against a reload in between
        buf = bytearray(MSR_LIST_HEADER.pack(nmsrs)) + bytearray(nmsrs * MSR_INDEX.size)
        try:
            fcntl.ioctl(fd, KVM_GET_MSR_FEATURE_INDEX_LIST, buf, True)
        except OSError as exc:
            if exc.errno != errno.E2BIG:
                raise
            nmsrs = MSR_LIST_HEADER.unpack_from(buf)[0]
            continue
        return bytes(buf)
    raise OSError(errno.E2BIG, os.strerror(errno.E2BIG))


def get_feature_msrs(fd: int, indices: list[int]) -> tuple[int, bytes]:
    """KVM_GET_MSRS on the system fd: (how many MSRs KVM read, the raw struct kvm_msrs).

    x86.c: the system-fd KVM_GET_MSRS is msr_io(NULL, argp, do_get_feature_msr, 1), which returns the number of
    entries processed; it stops at the first MSR KVM refuses.
    """
    buf = bytearray(MSRS_HEADER.pack(len(indices), 0))
    for index in indices:
        buf += MSR_ENTRY.pack(index, 0, 0)
    count = fcntl.ioctl(fd, KVM_GET_MSRS, buf, True)
    return count, bytes(buf)


def parse_cpuid2(buf: bytes) -> list[dict[str, int]]:
    """Decode a struct kvm_cpuid2 into its ``nent`` entries (dicts with the CPUID_FIELDS keys)."""
    nent = CPUID2_HEADER.unpack_from(buf)[0]
    offset = CPUID2_HEADER.size
    entries = (CPUID_ENTRY2.unpack_from(buf, offset + i * CPUID_ENTRY2.size) for i in range(nent))
    return [dict(zip(CPUID_FIELDS, values, strict=True)) for values in entries]


def parse_msr_list(buf: bytes) -> list[int]:
    """Decode a struct kvm_msr_list into its MSR indices."""
    nmsrs = MSR_LIST_HEADER.unpack_from(buf)[0]
    return list(struct.unpack_from(f"<{nmsrs}I", buf, MSR_LIST_HEADER.size))


def parse_msrs(buf: bytes, count: int) -> dict[int, int]:
    """Decode the first ``count`` entries of a struct kvm_msrs into {index: data}."""
    entries = (MSR_ENTRY.unpack_from(buf, MSRS_HEADER.size + i * MSR_ENTRY.size) for i in range(count))
    return {index: data for index, _reserved, data in entries}


# --- pure decoding ------------------------------------------------------------------------------------------------


def pmu_leaves(entries: list[dict[str, int]]) -> list[dict[str, int]]:
    """The entries of the PMU leaves (OFFER_LEAVES), every subleaf KVM returned, in KVM's order."""
    return [
        {field: int(entry[field]) for field in CPUID_FIELDS} for entry in entries if entry["function"] in OFFER_LEAVES
    ]


def cpuid_table(entries: list[dict[str, int]]) -> CpuidTable:
    """A CpuidTable of the entries, keyed (function, index) like harness.host.hostfacts.read_host_cpuid builds it."""
    leaves = {(e["function"], e["index"]): Regs(e["eax"], e["ebx"], e["ecx"], e["edx"]) for e in entries}
    return CpuidTable(leaves, "KVM_GET_SUPPORTED_CPUID")


def offer_from(
    entries: list[dict[str, int]] | None,
    perf_caps_raw: int | None,
    caps: dict[str, int] | None,
    *,
    reasons: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Build the ``kvm_offer`` object from KVM's answers; a None part stays None (its reason in ``reasons``).

    ``entries`` are KVM_GET_SUPPORTED_CPUID entries (all of them or only the PMU leaves), ``perf_caps_raw`` the
    IA32_PERF_CAPABILITIES feature MSR, ``caps`` the KVM_CHECK_EXTENSION answers by capability name. ``pmu`` is
    the same decoder and schema as ``harness caps --json``, fed only the kept leaves.
    """
    kept = pmu_leaves(entries) if entries is not None else None
    offer: dict[str, Any] = {
        "source": str(KVM_DEVICE),
        "cpuid": kept,
        "pmu": decode_caps(cpuid_table(kept)).to_json() if kept else None,
        "perf_capabilities": perf_caps_raw,
        "perf_capabilities_decoded": decode_perf_capabilities(perf_caps_raw) if perf_caps_raw is not None else None,
        "capabilities": dict(caps) if caps is not None else None,
    }
    offer.update(reasons or {})
    return offer


def describe(offer: dict[str, Any] | None, reason: str | None = None) -> str:
    """One line for ``doctor``: the vPMU KVM offers, its PERF_CAPABILITIES and the PMU capabilities."""
    if offer is None:
        return f"unavailable ({reason or 'not read'})"
    pmu = offer.get("pmu") or {}
    perfmon, amd = pmu.get("arch_perfmon"), pmu.get("amd")
    if not offer.get("cpuid"):
        cpu = f"no CPUID ({offer.get('cpuid_reason', 'not read')})"
    elif perfmon:
        cpu = (f"arch perfmon v{perfmon['version']}, {perfmon['gp_counters']} GP x {perfmon['gp_width']} bit, "
               f"{perfmon['fixed_counters']} fixed")  # fmt: skip
    elif amd:
        flags = [name for name, on in (("PerfCtrExtCore", amd["perfctr_core"]), ("PerfMonV2", amd["perfmon_v2"])) if on]
        cpu = f"AMD {amd['core_counters']} core counters ({', '.join(flags) or 'legacy only'})"
    else:
        cpu = "no arch perfmon (CPUID.0AH version 0)"
    raw = offer.get("perf_capabilities")
    perf_caps = f"{raw:#x}" if raw is not None else f"none ({offer.get('perf_capabilities_reason', 'not read')})"
    caps = offer.get("capabilities")
    caps_text = (" ".join(f"{name.removeprefix('KVM_CAP_')}={value}" for name, value in caps.items())
                 if caps is not None else f"unknown ({offer.get('capabilities_reason', 'not read')})")  # fmt: skip
    return f"{cpu}; PERF_CAPABILITIES {perf_caps}; caps {caps_text}"


# --- asking the device ------------------------------------------------------------------------------------------


def _read_capabilities(fd: int) -> tuple[dict[str, int] | None, str | None]:
    try:
        return {name: check_extension(fd, number) for name, number in KVM_CAPABILITIES.items()}, None
    except OSError as exc:
        return None, f"KVM_CHECK_EXTENSION: {exc.strerror}"


def _read_cpuid(fd: int) -> tuple[list[dict[str, int]] | None, str | None]:
    try:
        return parse_cpuid2(get_supported_cpuid(fd)), None
    except OSError as exc:
        return None, f"KVM_GET_SUPPORTED_CPUID: {exc.strerror}"


def _read_perf_capabilities(fd: int) -> tuple[int | None, str | None]:
    """IA32_PERF_CAPABILITIES as KVM offers it (kvm_get_feature_msr: kvm_caps.supported_perf_cap), or why not."""
    try:
        indices = parse_msr_list(get_msr_feature_index_list(fd))
    except OSError as exc:
        return None, f"KVM_GET_MSR_FEATURE_INDEX_LIST: {exc.strerror}"
    if MSR_IA32_PERF_CAPABILITIES not in indices:
        return None, "IA32_PERF_CAPABILITIES (MSR 0x345) is not in KVM_GET_MSR_FEATURE_INDEX_LIST"
    try:
        count, buf = get_feature_msrs(fd, [MSR_IA32_PERF_CAPABILITIES])
    except OSError as exc:
        return None, f"KVM_GET_MSRS (MSR 0x345, system fd): {exc.strerror}"
    if count != 1:
        return None, f"KVM_GET_MSRS (MSR 0x345, system fd) read {count} of 1 MSRs"
    return parse_msrs(buf, count)[MSR_IA32_PERF_CAPABILITIES], None


def read_offer(device: Path = KVM_DEVICE) -> tuple[dict[str, Any] | None, str | None]:
    """Ask ``device`` what KVM offers guests: (offer, None), or (None, one sentence why not).

    A failing part (CPUID, the feature MSR, the capabilities) is None inside the offer with a ``<part>_reason``.
    """
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return None, f"{device}: {exc.strerror} (cannot ask KVM what it offers guests)"
    try:
        try:
            version = get_api_version(fd)
        except OSError as exc:
            return None, f"{device}: KVM_GET_API_VERSION failed: {exc.strerror} (not a KVM device?)"
        if version != KVM_API_VERSION:
            return None, f"{device}: KVM API version {version}, expected {KVM_API_VERSION} (api.rst 4.1)"
        caps, caps_reason = _read_capabilities(fd)
        entries, cpuid_reason = _read_cpuid(fd)
        perf_caps, perf_caps_reason = _read_perf_capabilities(fd)
    finally:
        os.close(fd)
    reasons = {
        key: value
        for key, value in (
            ("cpuid_reason", cpuid_reason),
            ("perf_capabilities_reason", perf_caps_reason),
            ("capabilities_reason", caps_reason),
        )
        if value is not None
    }
    offer = offer_from(entries, perf_caps, caps, reasons=reasons)
    offer["api_version"] = version
    return offer, None
