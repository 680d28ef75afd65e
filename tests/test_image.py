"""Guest image build: the real Debian cloud kernel, real busybox/dropbear, checked by real tools."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.guest.image import READY_MARKER, Image, build_image, kernel_release_of
from harness.paths import cache_root
from tests.helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rootfs(guest_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default image's initramfs, unpacked with the real cpio(1)."""
    out = tmp_path_factory.mktemp("rootfs")
    data = gzip.decompress(guest_image.initrd.read_bytes())
    subprocess.run(["cpio", "-idm", "--quiet"], input=data, cwd=out, check=True)
    return out


def test_manifest_matches_kernel(guest_image):
    assert guest_image.kernel_release == kernel_release_of(guest_image.kernel)
    assert guest_image.manifest["kernel"].startswith("linux-image-")
    assert guest_image.manifest["ready_marker"] == READY_MARKER


def test_modules_are_dependency_ordered(guest_image, rootfs):
    """Every module's dependencies (read from the .ko itself with modinfo) are loaded before it."""
    order = guest_image.manifest["modules"]
    names = [Path(m).stem.replace("-", "_") for m in order]
    for expected in ("virtio_net", "virtio_pci", "msr", "cpuid"):
        assert expected in names
    rc = (rootfs / "etc/vpmu/rc.sysinit").read_text()
    for index, module in enumerate(order):
        assert (rootfs / module).is_file()
        assert f"insmod /{module}" in rc
        deps = subprocess.run(["modinfo", "-F", "depends", str(rootfs / module)], capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
        for dep in filter(None, deps.split(",")):
            assert dep in names[:index], f"{names[index]} needs {dep} first"


def test_dynamic_binaries_have_their_libraries(rootfs):
    for binary in ("usr/sbin/dropbear", "usr/lib/sftp-server"):
        out = subprocess.run(["ldd", str(rootfs / binary)], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if "=>" in line and "/" in line:
                lib = line.split("=>")[1].split()[0]
                assert (rootfs / lib.lstrip("/")).is_file(), f"{binary} needs {lib}"
    assert (rootfs / "bin/busybox").is_file() and (rootfs / "sbin/init").is_symlink()


def test_keys_are_pinned_and_private(guest_image, rootfs):
    assert (rootfs / "root/.ssh/authorized_keys").read_text().split()[:2] == \
        (guest_image.directory / "id_ed25519.pub").read_text().split()[:2]  # fmt: skip
    shown = subprocess.run(["dropbearkey", "-y", "-f", str(rootfs / "etc/dropbear/dropbear_ed25519_host_key")],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert guest_image.host_key in shown
    assert (rootfs / "etc/dropbear/dropbear_ed25519_host_key").stat().st_mode & 0o077 == 0
    assert guest_image.client_key.stat().st_mode & 0o077 == 0


def test_second_build_is_a_noop(guest_image):
    start = time.monotonic()
    proc = run_cli("image", "build")
    assert proc.returncode == 0, proc.stderr
    assert "up to date (cached)" in proc.stdout
    assert str(guest_image.directory) in proc.stdout
    assert time.monotonic() - start < 20
    assert json.loads((guest_image.directory / "manifest.json").read_text()) == guest_image.manifest


def test_build_with_given_kernel_and_modules(guest_image, tmp_path):
    """--kernel PATH --modules DIR: the same kernel unpacked by hand gives an image with the same modules
    but fresh keys; building it again is a no-op."""
    deb = next((cache_root() / "downloads").glob("linux-image-*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path / "k")], check=True)
    vmlinuz = next((tmp_path / "k" / "boot").glob("vmlinuz-*"))
    modules = tmp_path / "k" / "lib" / "modules" / guest_image.kernel_release
    out = tmp_path / "img"
    proc = run_cli("image", "build", "--kernel", str(vmlinuz), "--modules", str(modules), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "built in" in proc.stdout
    image = Image.load(out)
    assert image.kernel_release == guest_image.kernel_release
    assert image.manifest["modules"] == guest_image.manifest["modules"]
    assert image.host_key != guest_image.host_key  # a fresh host key per image
    again = run_cli("image", "build", "--kernel", str(vmlinuz), "--modules", str(modules), "--out", str(out))
    assert "up to date (cached)" in again.stdout


def test_bad_kernel_is_a_one_line_error(tmp_path):
    bogus = tmp_path / "vmlinuz"
    bogus.write_bytes(b"\0" * 4096)
    assert_one_line_error(run_cli("image", "build", "--kernel", str(bogus)), str(bogus), "not an x86 bzImage")


def test_out_dir_with_other_content_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    assert_one_line_error(run_cli("image", "build", "--out", str(tmp_path)), "refusing to overwrite")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_load_incomplete_image(tmp_path):
    with pytest.raises(UsageError, match="not a vpmu guest image"):
        Image.load(tmp_path)


def test_broken_image_is_rebuilt(guest_image, tmp_path):
    out = tmp_path / "img"
    shutil.copytree(guest_image.directory, out)
    (out / "initramfs.cpio.gz").unlink()
    result = build_image(out=out, log=lambda _msg: None)
    assert result.built and Image.load(out).initrd.is_file()
