"""The newc writer, checked by the real cpio(1) and by the kernel's format rules."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess

import pytest

from harness.guest import cpio


def test_archive_extracts_with_cpio(tmp_path):
    if shutil.which("cpio") is None:
        pytest.fail("cpio is not installed (Debian package cpio); scripts/install installs it")
    entries = [
        cpio.Entry.directory("etc"),
        cpio.Entry.file("etc/motd", b"hello\n"),
        cpio.Entry.directory("root", 0o700),
        cpio.Entry.file("root/key", b"secret" * 3, 0o600),
        cpio.Entry.file("bin/odd", b"x" * 5, 0o755),
        cpio.Entry.symlink("bin/sh", "/bin/busybox"),
    ]
    archive = tmp_path / "a.cpio.gz"
    cpio.write_initramfs(archive, entries)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=gzip.decompress(archive.read_bytes()), cwd=out, check=True)
    assert (out / "etc/motd").read_bytes() == b"hello\n"
    assert stat.S_IMODE((out / "root/key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "root").stat().st_mode) == 0o700
    assert (out / "bin/odd").read_bytes() == b"xxxxx"
    assert (out / "bin/sh").is_symlink() and str((out / "bin/sh").readlink()) == "/bin/busybox"


def test_reproducible_and_aligned():
    entries = [cpio.Entry.file("a", b"abc"), cpio.Entry.file("bb", b"")]
    packed = cpio.pack(entries)
    assert packed == cpio.pack(entries)
    assert packed.startswith(b"070701")
    assert len(packed) % 4 == 0
    assert b"TRAILER!!!" in packed[-128:]
