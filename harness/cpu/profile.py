"""A profile: one named vPMU feature set, the CPU a guest is asked for (model and properties per accelerator,
vCPUs, the host conditions it needs).

A plain value, below every floor that reads it: the expectation engine judges against it, the guest boots with it,
the suite loads it from ``profiles.toml`` (harness.suite.profiles, which validates every key).
"""

from __future__ import annotations

from dataclasses import dataclass

ACCELS = ("kvm", "tcg")


@dataclass(frozen=True)
class Profile:
    """One named vPMU feature set."""

    name: str
    description: str
    cpu: str
    tcg_cpu: str
    accels: tuple[str, ...]
    requires: tuple[str, ...] = ()
    #: vCPUs (QEMU -smp).
    smp: int = 1

    def cpu_for(self, accel: str) -> str:
        """Return the -cpu value for ``accel``."""
        return self.cpu if accel == "kvm" else self.tcg_cpu

    def applies_to(self, accel: str) -> bool:
        return accel in self.accels
