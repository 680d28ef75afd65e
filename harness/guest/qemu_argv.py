"""Build QEMU command lines as argv lists (never shell strings).

One function per concern, each returning a list, so the differences between accelerators, machines and
vPMU profiles stay visible in one place (compare virtme-ng's architectures.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.guest.image import Image

#: Kernel options measured on this project's machines (DESIGN.md, "Booting under TCG"): with these a Debian
#: cloud kernel reaches userspace about 1 s sooner under TCG. nmi_watchdog=0 keeps the guest watchdog off a
#: PMU counter (kvm-unit-tests' pmu tests require the same of the host); panic=-1 with -no-reboot turns a
#: guest panic into a QEMU exit, so a panicking boot fails fast instead of hanging until the deadline.
BASE_CMDLINE = (
    "console=ttyS0 quiet mitigations=off nokaslr tsc=reliable no_timer_check cryptomgr.notests "
    "nmi_watchdog=0 panic=-1 rdinit=/sbin/init"
)
#: q35 booted reliably under TCG here; microvm hung in 6 of 9 boots (DESIGN.md), so it is not the default.
DEFAULT_MACHINE = "q35"


def quote_optarg(value: str) -> str:
    """Escape a value for a QEMU ``key=value,...`` option: a comma is written as two commas."""
    return value.replace(",", ",,")


@dataclass(frozen=True)
class MachineConfig:
    """Everything that decides the QEMU command line of one guest."""

    #: None starts QEMU without a guest (``-machine none``), e.g. to ask it which CPU properties exist.
    image: Image | None
    accel: str
    cpu: str
    memory_mb: int = 512
    smp: int = 1
    machine: str = DEFAULT_MACHINE
    extra_cmdline: str = ""
    #: Replaces the whole kernel command line (tests use it to make a guest panic on purpose).
    cmdline: str | None = None
    qemu_binary: str = "qemu-system-x86_64"
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    #: Start with the CPU stopped (-S), so QMP can read what QEMU granted before the guest runs.
    paused: bool = False
    #: Wait for an incoming migration (``-incoming defer``; the source is given later with QMP migrate-incoming):
    #: the guest's state then comes from a saved file or a migrating QEMU instead of a boot.
    incoming: bool = False

    def kernel_cmdline(self) -> str:
        if self.cmdline is not None:
            return self.cmdline
        return f"{BASE_CMDLINE} {self.extra_cmdline}".strip()


def machine_args(config: MachineConfig) -> list[str]:
    if config.image is None:
        return ["-machine", config.machine, "-accel", config.accel]  # no vCPU to configure
    return ["-machine", config.machine, "-accel", config.accel, "-cpu", config.cpu,
            "-m", str(config.memory_mb), "-smp", str(config.smp)]  # fmt: skip


def boot_args(config: MachineConfig) -> list[str]:
    image = config.image
    if image is None:
        return []
    return ["-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", config.kernel_cmdline()]


def console_args() -> list[str]:
    """Serial console on QEMU's stdout, which the launcher drains to the serial log (no socket race)."""
    return ["-chardev", "stdio,id=console0,signal=off", "-serial", "chardev:console0"]


def qmp_args(fd: int) -> list[str]:
    """QMP on an inherited, already connected socket: no path to race on, and EOF when QEMU dies."""
    return ["-chardev", f"socket,id=qmp0,fd={fd}", "-mon", "chardev=qmp0,mode=control"]


def network_args() -> list[str]:
    """User-mode network; SSH forwarded from 127.0.0.1 only. Port 0 lets the host kernel pick a free port,
    which the launcher reads back over QMP, so two guests can never race for one port."""
    return ["-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:0-:22", "-device", "virtio-net-pci,netdev=net0"]


def build_argv(config: MachineConfig, qmp_fd: int) -> list[str]:
    """Return the full QEMU argv for ``config`` with QMP on ``qmp_fd``."""
    guest = config.image is not None
    return [
        config.qemu_binary,
        "-name", "vpmu-guest",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        *machine_args(config),
        *boot_args(config),
        *console_args(),
        *qmp_args(qmp_fd),
        *(network_args() if guest else []),
        *(["-S"] if config.paused else []),
        *(["-incoming", "defer"] if config.incoming else []),
        *config.extra_args,
    ]  # fmt: skip


def image_files(config: MachineConfig) -> list[Path]:
    """The files QEMU reads; the launcher checks them before starting so a missing one is a clear error."""
    return [config.image.kernel, config.image.initrd] if config.image else []
