"""Write initramfs archives in the kernel's ``newc`` cpio format.

Written here rather than shelling out to cpio(1) so that the archive is byte-for-byte reproducible (fixed
owners and timestamps) and file modes are set explicitly, e.g. 0600 for the keys dropbear insists on.
Format: Documentation/driver-api/early-userspace/buffer-format.rst in the kernel tree.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass
from pathlib import Path

TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member: a directory, a regular file (``data``) or a symlink (``target``)."""

    name: str
    mode: int
    data: bytes = b""
    target: str = ""

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> Entry:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> Entry:
        return cls(name, stat.S_IFREG | perm, data=data)

    @classmethod
    def symlink(cls, name: str, target: str) -> Entry:
        return cls(name, stat.S_IFLNK | 0o777, target=target)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _member(ino: int, name: str, mode: int, body: bytes) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(body), 0, 0, 0, 0, len(encoded), 0)
    header = b"070701" + b"".join(f"{value:08X}".encode() for value in fields)
    return header + encoded + _pad4(len(header) + len(encoded)) + body + _pad4(len(body))


def pack(entries: list[Entry]) -> bytes:
    """Return the uncompressed newc archive of ``entries`` (parents must come before children)."""
    chunks = []
    for ino, entry in enumerate(entries, 1):
        body = entry.target.encode() if stat.S_ISLNK(entry.mode) else entry.data
        chunks.append(_member(ino, entry.name.lstrip("/"), entry.mode, body))
    chunks.append(_member(0, TRAILER, 0, b""))
    return b"".join(chunks)


def write_initramfs(path: Path, entries: list[Entry]) -> None:
    """Write ``entries`` gzip-compressed (the kernel's CONFIG_RD_GZIP is on in every distro kernel)."""
    with gzip.GzipFile(path, "wb", compresslevel=6, mtime=0) as out:
        out.write(pack(entries))
