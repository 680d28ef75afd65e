"""Ask QEMU about CPU models: which ``-cpu`` properties this binary has, what it would grant, what it granted.

Capabilities are asked of the running QEMU (QMP ``qom-list-properties``, ``query-cpu-model-expansion``,
``qom-get``), never inferred from its version string: a profile that names a property this QEMU lacks is
skipped with that reason instead of letting QEMU die at start-up.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import ExecuteError

from harness.cpu.model import CpuModel
from harness.guest.machine import QemuMachine
from harness.guest.qemu_argv import MachineConfig

#: vPMU-related ``-cpu`` properties that exist in some QEMU release or posted series. A profile naming one that
#: this QEMU lacks is skipped ("QEMU too old"); a name in neither this list nor this QEMU is a typo (exit 2).
#: Sources: QEMU target/i386/cpu.c feature_word_info names (pdcm, arch-lbr, perfmon-v2, perfctr-core,
#: perfctr-nb, ibs, full-width-write, pebs-baseline, ds, dtes64), the lbr-fmt property (QEMU 7.1), and the
#: 2026 series "target/i386: Misc PMU fixes and enabling" (pebs-fmt, pebs-trap, pebs-arch-reg, pebs-timing-info,
#: perf-metrics).
KNOWN_VPMU_PROPERTIES = frozenset({
    "pmu", "lbr-fmt", "pdcm", "arch-lbr", "perfmon-v2", "perfctr-core", "perfctr-nb", "ibs", "full-width-write",
    "pebs-fmt", "pebs-trap", "pebs-arch-reg", "pebs-baseline", "pebs-timing-info", "perf-metrics", "ds", "dtes64",
    "migratable", "amd-lbr-v2", "lbrv",
})  # fmt: skip

#: QMP ``qom-get`` property of an x86 CPU that lists the CPUID feature bits QEMU had to drop (libvirt reads it).
FILTERED_FEATURES = "filtered-features"


@dataclass(frozen=True)
class QemuCpuCaps:
    """What this QEMU binary says about one CPU model under one accelerator."""

    model: str
    accel: str
    properties: frozenset[str]
    #: ``query-cpu-model-expansion`` (type full) of the requested model: what QEMU would give.
    expansion: dict[str, Any] = field(default_factory=dict)
    expansion_error: str | None = None

    def missing(self, cpu: CpuModel) -> list[str]:
        """Requested properties this QEMU's model does not have."""
        return [name for name in cpu.props if name not in self.properties]

    def typos(self, cpu: CpuModel) -> list[str]:
        """Missing properties that no QEMU we know of has either: almost certainly misspelt."""
        return [name for name in self.missing(cpu) if name not in KNOWN_VPMU_PROPERTIES]

    def suggestion(self, name: str) -> str:
        close = difflib.get_close_matches(name, sorted(self.properties | KNOWN_VPMU_PROPERTIES), n=1)
        return f" (did you mean '{close[0]}'?)" if close else ""


@functools.lru_cache(maxsize=32)
def probe_cpu_caps(cpu_text: str, accel: str, qemu_binary: str = "qemu-system-x86_64") -> QemuCpuCaps:
    """Start QEMU without a guest (``-machine none``) and ask it about ``cpu_text``'s model; cached per process.

    :raises LaunchError: QEMU could not start at all (e.g. the accelerator is unusable).
    """
    cpu = CpuModel.parse(cpu_text)
    config = MachineConfig(image=None, accel=accel, cpu=cpu.name, machine="none", qemu_binary=qemu_binary)
    with QemuMachine(config, name="vpmu-qemu-caps") as qemu:
        props = qemu.qmp("qom-list-properties", typename=cpu.qom_type())
        names = frozenset(p["name"] for p in props)
        known = {k: v for k, v in cpu.props.items() if k in names}
        try:
            expanded = qemu.qmp("query-cpu-model-expansion", type="full", model={"name": cpu.name, "props": known})
            return QemuCpuCaps(cpu.name, accel, names, expanded["model"].get("props", {}))
        except ExecuteError as exc:
            return QemuCpuCaps(cpu.name, accel, names, {}, str(exc))


def granted_props(machine: QemuMachine, cpu: CpuModel) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read back each requested property from the realized vCPU 0, plus its ``filtered-features``."""
    path = machine.qmp("query-cpus-fast")[0]["qom-path"]
    granted: dict[str, Any] = {}
    for name in cpu.props:
        try:
            granted[name] = machine.qmp("qom-get", path=path, property=name)
        except ExecuteError as exc:
            granted[name] = f"error: {exc}"
    try:
        filtered = machine.qmp("qom-get", path=path, property=FILTERED_FEATURES)
    except ExecuteError:
        filtered = []
    return granted, [f for f in filtered if f.get("features")]
