"""Self-test fixtures: the leak check every integration test runs under."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.machine import TMPDIR_PREFIX
from harness.paths import cache_root
from tests.helpers import run_cli

#: Every process this self-test session starts (QEMU, perf, harness subprocesses) inherits this variable, so the leak
#: check counts only those, even orphaned ones, and not the QEMUs of other test sessions on a shared host.
SESSION_TAG = f"VPMU_SELFTEST_SESSION={os.environ.setdefault('VPMU_SELFTEST_SESSION', str(os.getpid()))}"


def pids_named(prefix: str) -> set[int]:
    """PIDs of every process of this self-test session whose command name starts with ``prefix`` (read from /proc,
    not our bookkeeping)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().startswith(prefix) and \
                        SESSION_TAG.encode() in (proc / "environ").read_bytes().split(b"\0"):  # fmt: skip
                    pids.add(int(proc.name))
            except OSError:
                continue
    return pids


def qemu_pids() -> set[int]:
    return pids_named("qemu-system")


def perf_pids() -> set[int]:
    return pids_named("perf")


def _other_session(path: Path) -> bool:
    """Whether a launcher temp dir (``vpmu-qemu-<pid>-*``) belongs to a live process of another test session."""
    pid = path.name[len(TMPDIR_PREFIX) :].split("-", 1)[0]
    try:
        return SESSION_TAG.encode() not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False  # gone: a leak of ours as far as we can tell


def leftovers() -> set[Path]:
    """Temp dirs the harness creates (launcher dirs, half-built images), not those of another live session."""
    found = {p for p in Path(tempfile.gettempdir()).glob(f"{TMPDIR_PREFIX}*") if not _other_session(p)}
    images = cache_root() / "images"
    if images.is_dir():
        found |= set(images.glob(".vpmu-image-*"))
    return found


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every integration test: no new QEMU or perf process and no new harness temp dir."""
    if request.node.get_closest_marker("integration") is None:
        yield
        return
    before_pids, before_perf, before_dirs = qemu_pids(), perf_pids(), leftovers()
    yield
    deadline = time.monotonic() + 5  # a killed process may take a moment to be reaped by its parent
    while (qemu_pids() - before_pids or perf_pids() - before_perf) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not qemu_pids() - before_pids, "QEMU processes outlived the test"
    assert not perf_pids() - before_perf, "perf processes outlived the test"
    assert not leftovers() - before_dirs, "harness temp dirs outlived the test"


@pytest.fixture(scope="session")
def suite_run(tmp_path_factory, guest_image):
    """One real `python -m harness run` of the shipped profiles, shared by the tests that read its reports."""
    out = tmp_path_factory.mktemp("run")
    proc = run_cli("run", "--image", str(guest_image.directory), "--out", str(out), timeout_s=600)
    return proc, out
