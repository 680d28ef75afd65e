"""Which package provides a program vpmu needs, in the host's own package manager's names.

Debian/Ubuntu (apt) and Fedora, CentOS Stream and RHEL (dnf) are told apart by ``/etc/os-release`` (``ID`` and
``ID_LIKE``). scripts/install installs the same lists; a program that is missing is reported with the package
that provides it here (``install the Debian package busybox-static`` / ``dnf install busybox``).

Where the names come from: Debian's package lists (this machine); Fedora's spec files (``busybox``: a statically
linked binary in /usr/sbin; ``dropbear``: /usr/sbin/dropbear, /usr/bin/dropbearkey, built with
SFTPSERVER_PATH=/usr/libexec/openssh/sftp-server, which ``openssh-server`` provides); RHEL and CentOS Stream ship
QEMU as ``qemu-kvm`` (/usr/libexec/qemu-kvm) and leave dropbear (and busybox, where packaged at all) to EPEL.
"""

from __future__ import annotations

from pathlib import Path

OS_RELEASE = Path("/etc/os-release")

#: program -> (Debian package, Fedora/CentOS Stream/RHEL package; None where those distributions have none).
PACKAGES: dict[str, tuple[str, str | None]] = {
    "qemu-system-x86_64": ("qemu-system-x86", "qemu-system-x86"),
    "busybox": ("busybox-static", "busybox"),
    "dropbear": ("dropbear-bin", "dropbear"),
    "dropbearkey": ("dropbear-bin", "dropbear"),
    "sftp-server": ("openssh-sftp-server", "openssh-server"),
    "depmod": ("kmod", "kmod"),
    "modprobe": ("kmod", "kmod"),
    "ldd": ("libc-bin", "glibc-common"),
    "objdump": ("binutils", "binutils"),
    "perf": ("linux-perf", "perf"),
    "apt-get": ("apt", None),
    "apt-cache": ("apt", None),
    "dpkg-deb": ("dpkg", None),
}
#: What a dnf host needs beyond the package (RHEL and CentOS Stream keep these in EPEL).
EPEL = {"busybox", "dropbear", "cpuid", "chromium"}
#: apt is only needed to fetch Debian's cloud kernel for the default image; a dnf host builds from its own kernel.
KERNEL_HINT = ("the default image uses Debian's cloud kernel, fetched with apt; here, build from a kernel you have: "
               "`python -m harness image build --kernel /boot/vmlinuz-$(uname -r)`")  # fmt: skip


def os_release(path: Path | None = None) -> dict[str, str]:
    """The key=value pairs of /etc/os-release ({} when it cannot be read)."""
    try:
        text = (path or OS_RELEASE).read_text()
    except OSError:
        return {}
    pairs = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            pairs[key.strip()] = value.strip().strip("\"'")
    return pairs


def family(path: Path | None = None) -> str:
    """``debian`` (Debian, Ubuntu), ``fedora``, ``rhel`` (RHEL, CentOS Stream, Rocky, Alma) or ``unknown``."""
    facts = os_release(path)
    ids = {facts.get("ID", ""), *facts.get("ID_LIKE", "").split()}
    if ids & {"debian", "ubuntu"}:
        return "debian"
    if ids & {"rhel", "centos"}:
        return "rhel"
    if "fedora" in ids:
        return "fedora"
    return "unknown"


def install_hint(program: str, path: Path | None = None) -> str:
    """What to install for ``program`` on this host, as the end of a "`X` not found; ..." line."""
    debian, dnf = PACKAGES.get(program, (program, program))
    kind = family(path)
    if kind == "debian":
        return f"install the Debian package {debian}"
    if kind in ("fedora", "rhel"):
        if dnf is None:
            return KERNEL_HINT if program.startswith(("apt", "dpkg")) else f"{program} is Debian's; not needed here"
        if kind == "rhel" and program == "qemu-system-x86_64":
            return ("RHEL/CentOS Stream ship QEMU as qemu-kvm: dnf install qemu-kvm, then "
                    "ln -s /usr/libexec/qemu-kvm /usr/local/bin/qemu-system-x86_64")  # fmt: skip
        epel = " (from EPEL: dnf install epel-release first)" if kind == "rhel" and dnf in EPEL else ""
        return f"install the package {dnf}: dnf install {dnf}{epel}"
    other = f"; Fedora/CentOS Stream/RHEL: {dnf}" if dnf else ""
    return f"install the package that provides it (Debian/Ubuntu: {debian}{other})"
