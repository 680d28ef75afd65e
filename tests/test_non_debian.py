"""Fedora, CentOS Stream and RHEL hosts: package names in errors and in scripts/install, and an image built from
a host whose busybox, dropbear and sftp-server sit where Fedora puts them.

This machine is Debian: the dnf branch of scripts/install runs here against stub ``dnf``/``rpm``/``python3``
programs that record what they are asked, and the Fedora layout is laid out with this host's own binaries.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from harness.errors import ToolMissingError
from harness.guest import image
from harness.host import hostpkg
from harness.paths import REPO_ROOT
from tests.test_cli_inputs import path_without

FEDORA = 'NAME="Fedora Linux"\nID=fedora\nVERSION_ID=41\n'
CENTOS = 'NAME="CentOS Stream"\nID="centos"\nID_LIKE="rhel fedora"\nVERSION_ID="9"\n'
DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n'
UBUNTU = "ID=ubuntu\nID_LIKE=debian\n"


def os_release(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "os-release"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "family"), [(FEDORA, "fedora"), (CENTOS, "rhel"), (DEBIAN, "debian"),
                                              (UBUNTU, "debian"), ("ID=arch\n", "unknown")])  # fmt: skip
def test_family(tmp_path, text, family):
    assert hostpkg.family(os_release(tmp_path, text)) == family


def test_install_hints_name_each_distributions_package(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "c").mkdir()
    fedora, centos = os_release(tmp_path / "f", FEDORA), os_release(tmp_path / "c", CENTOS)
    debian = os_release(tmp_path, DEBIAN)
    assert hostpkg.install_hint("busybox", debian) == "install the Debian package busybox-static"
    assert hostpkg.install_hint("busybox", fedora) == "install the package busybox: dnf install busybox"
    assert "dnf install dropbear (from EPEL" in hostpkg.install_hint("dropbear", centos)
    assert hostpkg.install_hint("sftp-server", fedora).endswith("dnf install openssh-server")
    assert "qemu-kvm" in hostpkg.install_hint("qemu-system-x86_64", centos)
    assert "--kernel /boot/vmlinuz-$(uname -r)" in hostpkg.install_hint("apt-cache", fedora)
    unknown = hostpkg.install_hint("dropbear", tmp_path / "missing")
    assert "Debian/Ubuntu: dropbear-bin" in unknown and "Fedora/CentOS Stream/RHEL: dropbear" in unknown


def test_missing_tool_names_the_fedora_package(tmp_path, monkeypatch):
    monkeypatch.setattr(hostpkg, "OS_RELEASE", os_release(tmp_path, FEDORA))
    monkeypatch.setenv("PATH", path_without(tmp_path, "busybox"))
    with pytest.raises(ToolMissingError, match=r"^`busybox` not found; install the package busybox: dnf install"):
        image._binaries()


def test_fedora_layout_is_found_and_the_guest_gets_sftp_where_dropbear_looks(tmp_path, monkeypatch):
    """busybox and dropbear in /usr/sbin, dropbearkey in /usr/bin, sftp-server in /usr/libexec/openssh, and a
    dropbear built with SFTPSERVER_PATH=/usr/libexec/openssh/sftp-server (Fedora's spec)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    debian_dropbear = Path(shutil.which("dropbear") or "/usr/sbin/dropbear")
    dropbear = bin_dir / "dropbear"
    dropbear.write_bytes(debian_dropbear.read_bytes().replace(b"\0/usr/lib/sftp-server\0",
                                                              b"\0/usr/libexec/openssh/sftp-server\0"))  # fmt: skip
    dropbear.chmod(0o755)
    for name in ("busybox", "dropbearkey"):
        (bin_dir / name).symlink_to(shutil.which(name) or f"/usr/sbin/{name}")
    sftp = tmp_path / "libexec" / "openssh" / "sftp-server"
    sftp.parent.mkdir(parents=True)
    sftp.symlink_to(image.HOST_SFTP_SERVER)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(image, "HOST_SFTP_SERVERS", (tmp_path / "no" / "sftp-server", sftp))
    found = image._binaries()
    assert found == {"busybox": bin_dir / "busybox", "dropbear": dropbear, "dropbearkey": bin_dir / "dropbearkey",
                     "sftp-server": sftp}  # fmt: skip
    assert image.guest_sftp_server(found["dropbear"]) == "usr/libexec/openssh/sftp-server"
    assert image.guest_sftp_server(debian_dropbear) == image.GUEST_SFTP_SERVER


STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
{body}
"""


def _stub(directory: Path, name: str, log: Path, body: str = "exit 0") -> None:
    path = directory / name
    path.write_text(STUB.format(log=log, body=body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run_install(tmp_path: Path, release: str | None, have_dnf: bool = True) -> tuple[subprocess.CompletedProcess,
                                                                                      str]:  # fmt: skip
    """scripts/install in a copy of the checkout's scripts/, with apt-get hidden and dnf, rpm, python3 stubbed."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "scripts" / "install", checkout / "scripts" / "install")
    stubs, log = tmp_path / "stubs", tmp_path / "calls.log"
    stubs.mkdir()
    log.touch()
    if have_dnf:
        # dnf list: found except the packages a CentOS host without EPEL lacks
        _stub(stubs, "dnf", log, 'case "$*" in *"list busybox"*|*"list dropbear"*|*"list cpuid"*) exit 1;; esac')
    _stub(stubs, "rpm", log, "exit 1")
    _stub(stubs, "sudo", log, 'exec "$@"')  # a non-root run must not reach the real sudo
    _stub(stubs, "python3", log, 'mkdir -p .venv/bin && printf "#!/bin/sh\\nexit 0\\n" > .venv/bin/python '
                                 "&& chmod +x .venv/bin/python")  # fmt: skip
    path = f"{stubs}{os.pathsep}{path_without(tmp_path, 'apt-get', 'dnf', 'python3', 'rpm', 'sudo')}"
    env = {"PATH": path, "HOME": str(tmp_path)}
    if release is not None:
        env["VPMU_OS_RELEASE"] = str(os_release(tmp_path, release))
    proc = subprocess.run(["bash", str(checkout / "scripts" / "install")], env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    return proc, log.read_text()


def test_install_on_fedora_uses_dnf_names(tmp_path):
    proc, calls = _run_install(tmp_path, FEDORA)
    assert proc.returncode == 0, proc.stderr
    (install,) = [line for line in calls.splitlines() if line.startswith("dnf install")]
    assert install.split()[4:8] == ["qemu-system-x86", "openssh-server", "cpio", "kmod"]
    assert "glibc-static" in install and "busybox" not in install
    assert "not in this host's dnf repositories: busybox dropbear cpuid" in proc.stderr
    assert "epel-release" not in proc.stderr  # Fedora has no EPEL
    assert "image build --kernel /boot/vmlinuz-$(uname -r)" in proc.stderr
    assert "python3 -m venv .venv" in calls


def test_install_on_centos_stream_names_qemu_kvm_and_epel(tmp_path):
    proc, calls = _run_install(tmp_path, CENTOS)
    assert proc.returncode == 0, proc.stderr
    (install,) = [line for line in calls.splitlines() if line.startswith("dnf install")]
    assert "qemu-kvm" in install.split() and "qemu-system-x86" not in install.split()
    assert "epel-release" in proc.stderr and "crb" in proc.stderr


def test_install_without_apt_or_dnf_lists_both_names(tmp_path):
    proc, _calls = _run_install(tmp_path, None, have_dnf=False)
    assert proc.returncode == 1
    assert "(Debian names): qemu-system-x86 busybox-static" in proc.stderr
    assert "(Fedora names): qemu-system-x86 busybox dropbear openssh-server" in proc.stderr


def test_compressed_modules_reach_the_guest_as_plain_ko(tmp_path):
    """Fedora and RHEL ship modules as .ko.xz, newer Ubuntu as .ko.zst; busybox insmod in the guest takes .ko."""
    plain = b"\x7fELF module bytes " * 100
    kernel = tmp_path / "lib" / "modules" / "6.9.0" / "kernel"
    kernel.mkdir(parents=True)
    (kernel / "msr.ko.xz").write_bytes(lzma.compress(plain))
    (kernel / "cpuid.ko.gz").write_bytes(gzip.compress(plain))
    (kernel / "virtio.ko").write_bytes(plain)
    subprocess.run(["zstd", "-q", "--rm", str(kernel / "virtio.ko"), "-o", str(kernel / "virtio.ko.zst")], check=True)
    (kernel / "virtio.ko").write_bytes(plain)
    for name in ("msr.ko.xz", "cpuid.ko.gz", "virtio.ko.zst", "virtio.ko"):
        guest, data = image.module_payload(tmp_path, f"lib/modules/6.9.0/kernel/{name}")
        assert guest == f"lib/modules/6.9.0/kernel/{name.split('.ko')[0]}.ko" and data == plain, name
