"""Self-test fixtures: the leak check every integration test runs under."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.guest.machine import TMPDIR_PREFIX
from harness.paths import cache_root
from tests.helpers import run_cli

#: Set in this process's environment, so every process it starts (the harness CLI, QEMU, perf) inherits it: the leak
#: check counts only those, not the guests of another self-test run sharing the machine.
RUN_MARKER = "VPMU_SELFTEST_RUN"
os.environ.setdefault(RUN_MARKER, str(os.getpid()))


def _ours(pid: int) -> bool | None:
    """Whether process ``pid`` is this self-test run or was started by it (it carries RUN_MARKER; /proc shows the
    environment a process started with, so this process itself is recognised by its pid); None when it is gone."""
    if pid == os.getpid():
        return True
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    return f"{RUN_MARKER}={os.environ[RUN_MARKER]}".encode() in environ.split(b"\0")


def listeners(port: int) -> dict[int, bool | None]:
    """The processes listening on TCP port ``port`` (IPv4), each with whether it is this run's (see _ours)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: TCP_LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    found: dict[int, bool | None] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                found[int(proc.name)] = _ours(int(proc.name))
        except OSError:
            continue
    return found


def pids_named(prefix: str) -> set[int]:
    """PIDs of every process of this run whose command name starts with ``prefix`` (read from /proc, not our
    bookkeeping)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().startswith(prefix) and _ours(int(proc.name)):
                    pids.add(int(proc.name))
            except OSError:
                continue
    return pids


def qemu_pids() -> set[int]:
    return pids_named("qemu-system")


def perf_pids() -> set[int]:
    return pids_named("perf")


def _launcher_ours(path: Path) -> bool:
    """A launcher's temp dir (``vpmu-qemu-<pid>-*``) counts unless its launcher runs and is another run's."""
    pid = path.name[len(TMPDIR_PREFIX) :].split("-", 1)[0]
    return not pid.isdigit() or _ours(int(pid)) is not False


def leftovers() -> set[Path]:
    """Temp dirs the harness creates (launcher dirs, half-built images)."""
    found = {path for path in Path(tempfile.gettempdir()).glob(f"{TMPDIR_PREFIX}*") if _launcher_ours(path)}
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
