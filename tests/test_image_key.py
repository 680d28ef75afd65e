"""The image cache key's memo: answers remembered by the identities of their input files, recomputed when any
identity changes, and the key itself identical with and without the memo. Real files, real ldd, real apt-cache
(where the test needs them)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from harness.guest import image
from harness.guest.image import KeyMemo, identity


def settle(path: Path) -> None:
    """Age a file's mtime past the racy window (a just-written file is not memoized)."""
    old = time.time() - 10
    os.utime(path, (old, old))


@pytest.fixture
def memo(tmp_path: Path) -> KeyMemo:
    return KeyMemo(tmp_path / "cache" / image.KEY_MEMO)


def test_key_memo_sha256_follows_the_file_identity(tmp_path: Path, memo: KeyMemo, monkeypatch) -> None:
    path = tmp_path / "input"
    path.write_bytes(b"one")
    settle(path)
    first = memo.sha256(path)
    calls = []
    monkeypatch.setattr(image, "_sha256", lambda p: calls.append(p) or "recomputed")
    assert memo.sha256(path) == first and calls == []  # remembered
    path.write_bytes(b"two")  # same size, new mtime
    settle(path)
    os.utime(path, ns=(1, identity(path)[2] + 1))
    assert memo.sha256(path) == "recomputed"
    replacement = tmp_path / "other"
    replacement.write_bytes(b"two")
    shutil.copystat(path, replacement)
    os.replace(replacement, path)  # same size and mtime, new inode
    assert memo.sha256(path) == "recomputed" and len(calls) == 2


def test_key_memo_does_not_trust_a_file_modified_just_now(tmp_path: Path, memo: KeyMemo) -> None:
    """Within the racy window a second write could keep size and mtime: such a file is hashed every time."""
    path = tmp_path / "fresh"
    path.write_bytes(b"x")
    memo.sha256(path)
    assert memo.entries["sha256"] == {}


def test_key_memo_ldd_follows_the_binary_and_the_loader_cache(tmp_path: Path, memo: KeyMemo, monkeypatch) -> None:
    binary = tmp_path / "sh"
    shutil.copy2(shutil.which("sh") or "/bin/sh", binary)
    settle(binary)
    ld_cache = tmp_path / "ld.so.cache"
    ld_cache.write_bytes(b"1")
    monkeypatch.setattr(image, "LD_CACHE", ld_cache)
    real = memo.libraries(binary)
    assert real == image.shared_libraries(binary) and real  # a dynamic binary: libc and the loader at least
    calls = []
    monkeypatch.setattr(image, "shared_libraries", lambda b: calls.append(b) or [])
    assert memo.libraries(binary) == real and calls == []
    ld_cache.write_bytes(b"22")  # ldconfig ran: ask ldd again
    assert memo.libraries(binary) == [] and len(calls) == 1


def test_key_memo_apt_answer_follows_apt_state(tmp_path: Path, memo: KeyMemo, monkeypatch) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "Packages").write_text("a")
    monkeypatch.setattr(image, "APT_STATE", (lists, tmp_path / "status"))
    calls = []

    def apt_cache(meta: str) -> list[str]:
        calls.append(meta)
        return ["linux-image-1-cloud-amd64", f"1.{len(calls)}"]

    monkeypatch.setattr(image, "_resolve_with_apt_cache", apt_cache)
    first = image.resolve_debian_kernel(memo=memo)
    assert image.resolve_debian_kernel(memo=memo) == first and len(calls) == 1
    (lists / "Packages").write_text("apt-get update")
    assert image.resolve_debian_kernel(memo=memo).version == "1.2"
    (tmp_path / "status").write_text("a package was installed")
    assert image.resolve_debian_kernel(memo=memo).version == "1.3"


def test_key_memo_is_saved_atomically_and_a_damaged_one_is_ignored(tmp_path: Path, memo: KeyMemo) -> None:
    path = tmp_path / "input"
    path.write_bytes(b"x")
    settle(path)
    digest = memo.sha256(path)
    memo.save()
    assert memo.path is not None
    again = KeyMemo(memo.path)
    assert again.get("sha256", identity(path)) == digest
    assert [p.name for p in memo.path.parent.iterdir()] == [image.KEY_MEMO]
    memo.path.write_text("{garbage")
    assert KeyMemo(memo.path).entries["sha256"] == {}
    memo.path.write_text(json.dumps({"version": 0, "entries": {"sha256": {"x": "y"}}}))
    assert KeyMemo(memo.path).entries["sha256"] == {}


def test_key_memo_that_cannot_be_saved_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    memo = KeyMemo(tmp_path / "cache" / image.KEY_MEMO)
    memo.put("sha256", ["x"], "y")
    memo.save()  # no exception: the memo only saves time
    assert memo.dirty


@pytest.mark.integration
def test_key_is_the_same_with_and_without_the_memo(tmp_path: Path) -> None:
    """The memo changes the cost, never the key (real binaries, real ldd, a local kernel file)."""
    binaries = image._binaries()
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not really a kernel, but a file with an identity")
    settle(kernel)
    source = image.KernelSource("k", f"file:{image._sha256(kernel)}:r", kernel_path=kernel)
    memo = KeyMemo(tmp_path / image.KEY_MEMO)
    plain = image.cache_key(source, binaries)
    assert image.cache_key(source, binaries, memo) == plain
    memo.save()
    assert image.cache_key(source, binaries, KeyMemo(memo.path)) == plain


@pytest.mark.integration
def test_key_of_a_cached_image_needs_no_subprocess(guest_image, monkeypatch) -> None:
    """Once memoized, finding the default image runs neither apt-cache nor ldd (~1.5 s and ~0.1 s of every exec):
    with both made to fail, the cached image is still found."""
    assert image.build_image(log=lambda _m: None).image.directory == guest_image.directory  # memo warm

    def forbidden(*args, **kwargs):
        raise AssertionError(f"subprocess during a memoized key: {args}")

    monkeypatch.setattr(image, "_run", forbidden)
    monkeypatch.setattr(image, "shared_libraries", forbidden)
    start = time.monotonic()
    found = image.build_image(log=lambda _m: None)
    assert (found.image.directory, found.built) == (guest_image.directory, False)
    assert time.monotonic() - start < 1.0
