"""Ask the kernel itself whether it refuses a host perf event that counts guest time (the mediated vPMU).

While any VM holds a mediated PMU, kernel/events/core.c perf_event_alloc() -> mediated_pmu_account_event() fails
every new ``!exclude_guest`` event of a PMU with PERF_PMU_CAP_MEDIATED_VPMU with -EOPNOTSUPP
(``if (atomic_read(&nr_mediated_pmu_vms)) return -EOPNOTSUPP``). perf's own words cannot show that reliably:
tools/perf/builtin-stat.c stat_handle_error() prints ``<not supported>`` for a lone event and exits 0, and a group
leader gets tools/perf/util/evsel.c evsel__open_strerror()'s EOPNOTSUPP text ("No hardware sampling interrupt
available." on x86), which other causes print too. So before an include-guest load starts, the harness opens the
load's hardware event once with perf_event_open(2) (counting, disabled, closed at once) and reads errno:
EOPNOTSUPP for ``exclude_guest=0`` while the ``exclude_guest=1`` twin opens is the refusal, named by its errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: arch/x86/entry/syscalls/syscall_64.tbl: "298 common perf_event_open sys_perf_event_open".
SYS_PERF_EVENT_OPEN = {"x86_64": 298}
#: include/uapi/linux/perf_event.h enum perf_type_id.
PERF_TYPE_HARDWARE = 0
PERF_TYPE_SOFTWARE = 1
#: include/uapi/linux/perf_event.h: "#define PERF_ATTR_SIZE_VER0 64 /* sizeof first published struct */". Every
#: field the probe sets is in the first published layout, and every kernel accepts that size (perf_copy_attr()).
PERF_ATTR_SIZE_VER0 = 64
#: include/uapi/linux/perf_event.h: "#define PERF_FLAG_FD_CLOEXEC (1UL << 3)".
PERF_FLAG_FD_CLOEXEC = 1 << 3
#: Bit positions in the attr's flag word (include/uapi/linux/perf_event.h struct perf_event_attr, in order:
#: disabled:1, inherit:1, pinned:1, exclusive:1, exclude_user:1, exclude_kernel:1, exclude_hv:1, exclude_idle:1,
#: mmap:1, comm:1, freq:1, inherit_stat:1, enable_on_exec:1, task:1, watermark:1, precise_ip:2, mmap_data:1,
#: sample_id_all:1, exclude_host:1, exclude_guest:1, ...). x86-64 is little-endian: bit 0 is the lowest.
ATTR_DISABLED = 1 << 0
ATTR_EXCLUDE_HOST = 1 << 19
ATTR_EXCLUDE_GUEST = 1 << 20

#: perf's generic hardware event names -> PERF_COUNT_HW_* (include/uapi/linux/perf_event.h enum perf_hw_id; the
#: names and aliases as tools/perf/util/parse-events.c event_symbols_hw[] spells them).
HARDWARE_EVENTS = {
    "cycles": 0, "cpu-cycles": 0, "instructions": 1, "cache-references": 2, "cache-misses": 3, "branches": 4,
    "branch-instructions": 4, "branch-misses": 5, "bus-cycles": 6, "stalled-cycles-frontend": 7,
    "idle-cycles-frontend": 7, "stalled-cycles-backend": 8, "idle-cycles-backend": 8, "ref-cycles": 9,
}  # fmt: skip
#: perf's software event names -> PERF_COUNT_SW_* (enum perf_sw_ids; parse-events.c event_symbols_sw[]).
SOFTWARE_EVENTS = {
    "cpu-clock": 0, "task-clock": 1, "page-faults": 2, "faults": 2, "context-switches": 3, "cs": 3,
    "cpu-migrations": 4, "migrations": 4, "minor-faults": 5, "major-faults": 6, "alignment-faults": 7,
    "emulation-faults": 8, "dummy": 9, "bpf-output": 10, "cgroup-switches": 11,
}  # fmt: skip
#: The event the probe opens when the load's include-guest event has no generic encoding (a raw or PMU-specific
#: event): the refusal is per PMU (PERF_PMU_CAP_MEDIATED_VPMU), not per event, so cycles on the core PMU answers.
FALLBACK_EVENT = "cycles"


class PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr up to PERF_ATTR_SIZE_VER0 (include/uapi/linux/perf_event.h), field for field."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),  # union with sample_freq
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),  # the bitfield word: disabled ... __reserved_1
        ("wakeup_events", ctypes.c_uint32),  # union with wakeup_watermark
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),  # union with bp_addr, kprobe_func, uprobe_path
    ]


assert ctypes.sizeof(PerfEventAttr) == PERF_ATTR_SIZE_VER0


def make_attr(type_: int, config: int, exclude_guest: bool, exclude_host: bool = False) -> PerfEventAttr:
    """A counting (sample_period 0), disabled event: opening it counts nothing and samples nothing."""
    flags = ATTR_DISABLED | (ATTR_EXCLUDE_GUEST if exclude_guest else 0) | (ATTR_EXCLUDE_HOST if exclude_host else 0)
    return PerfEventAttr(type=type_, size=PERF_ATTR_SIZE_VER0, config=config, flags=flags)


#: An opener: (attr, pid, cpu) -> a file descriptor, or -errno. Tests substitute the kernel's answers.
Opener = Callable[[PerfEventAttr, int, int], int]


def perf_event_open(attr: PerfEventAttr, pid: int, cpu: int) -> int:
    """perf_event_open(2) with no group and O_CLOEXEC: the new fd, or -errno (-ENOSYS off x86-64)."""
    number = SYS_PERF_EVENT_OPEN.get(platform.machine())
    if number is None:
        return -errno.ENOSYS
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(number), ctypes.byref(attr), ctypes.c_int(pid), ctypes.c_int(cpu),
                      ctypes.c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))  # fmt: skip
    return int(fd) if fd >= 0 else -ctypes.get_errno()


def errno_name(code: int | None) -> str | None:
    """The kernel's name of an errno: 95 is EOPNOTSUPP (include/uapi/asm-generic/errno.h), which Python's
    errno.errorcode names by glibc's alias ENOTSUP (<bits/errno.h>: ENOTSUP is EOPNOTSUPP)."""
    if code is None:
        return None
    return "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode.get(code, f"E{code}")


def errno_text(code: int | None) -> str:
    """``EOPNOTSUPP (95)``; ``opened`` for None."""
    return "opened" if code is None else f"{errno_name(code)} ({code})"


@dataclass(frozen=True)
class RefusalProbe:
    """The kernel's answer to one include-guest open and, after EOPNOTSUPP, to its exclude_guest=1 twin."""

    event: str
    target: str
    errno: int | None  # None: the exclude_guest=0 event opened
    twin_errno: int | None = None  # None: the twin opened (or was not tried)
    twin_tried: bool = False

    @property
    def refused(self) -> bool:
        """EOPNOTSUPP only because the event counts the guest: the host-only twin of the same event opens."""
        return self.errno == errno.EOPNOTSUPP and self.twin_tried and self.twin_errno is None

    def describe(self) -> str:
        """One sentence, with the errno named, for the verdict and results.json."""
        what = f"perf_event_open(2) of {self.event} with exclude_guest=0 on {self.target}"
        if self.errno is None:
            return f"{what} opened: the kernel does not refuse include-guest events now"
        text = f"{what} failed with {errno_text(self.errno)}: {os.strerror(self.errno)}"
        if self.refused:
            return (f"{text}, while its exclude_guest=1 twin opened: the kernel refuses include-guest events while a "
                    "VM holds a mediated PMU (kernel/events/core.c mediated_pmu_account_event)")  # fmt: skip
        if self.twin_tried:
            return f"{text}; its exclude_guest=1 twin: {errno_text(self.twin_errno)} (the event itself is unusable)"
        return text

    def to_json(self) -> dict[str, Any]:
        return {"event": self.event, "target": self.target, "errno": self.errno,
                "errno_name": errno_name(self.errno), "twin_errno": self.twin_errno if self.twin_tried else None,
                "refused": self.refused, "detail": self.describe()}  # fmt: skip


def event_code(name: str) -> tuple[int, int] | None:
    """(type, config) of a generic perf event name, or None (raw and PMU-specific events)."""
    if name in HARDWARE_EVENTS:
        return PERF_TYPE_HARDWARE, HARDWARE_EVENTS[name]
    if name in SOFTWARE_EVENTS:
        return PERF_TYPE_SOFTWARE, SOFTWARE_EVENTS[name]
    return None


def _try(opener: Opener, attr: PerfEventAttr, pid: int, cpu: int) -> int | None:
    """Open and close at once; None when it opened, else the errno."""
    fd = opener(attr, pid, cpu)
    if fd < 0:
        return -fd
    os.close(fd)
    return None


def probe_include_guest(event: str, pid: int, cpu: int, opener: Opener | None = None) -> RefusalProbe:
    """Open ``event`` (a generic hardware name; anything else is probed as cycles) with exclude_guest=0 on
    ``pid``/``cpu`` (perf_event_open(2) semantics: pid -1 + cpu N is CPU-wide, pid T + cpu -1 follows thread T).
    After EOPNOTSUPP, open the exclude_guest=1 twin: if that opens, the refusal is the mediated vPMU's."""
    opener = opener or perf_event_open
    name = event if event in HARDWARE_EVENTS else FALLBACK_EVENT
    type_, config = event_code(name) or (PERF_TYPE_HARDWARE, 0)
    target = f"cpu {cpu}" if pid == -1 else f"thread {pid}"
    first = _try(opener, make_attr(type_, config, exclude_guest=False), pid, cpu)
    if first != errno.EOPNOTSUPP:
        return RefusalProbe(name, target, first)
    twin = _try(opener, make_attr(type_, config, exclude_guest=True), pid, cpu)
    return RefusalProbe(name, target, first, twin, twin_tried=True)
