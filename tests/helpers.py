"""Shared helpers of the self-tests: where the reference data lives, and how to run the CLI for real."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT

#: shared/ sits beside the checkout (../shared); CI lays a copy there too.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
CPUID_DIR = SHARED_DATA / "cpuid"
TEST_DATA = Path(__file__).parent / "data"


def run_cli(*args: str, timeout_s: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m harness ARGS`` as a user would, from the checkout; return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user mistake: exit 2, exactly one ``ERROR:`` line on stderr naming the fragments, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ERROR: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def child_processes(parent: int) -> list[tuple[int, str, str]]:
    """(pid, comm, state) of every process whose parent is ``parent``, from /proc (proc(5) stat fields 2-4)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if int(rest[1]) == parent:
            found.append((int(proc.name), comm, rest[0]))
    return found


def mount_tmpfs(target: Path, options: str) -> None:
    """Mount a tmpfs with ``options`` on ``target`` (a full or read-only disk made real); SKIP with mount's own
    words where that is not allowed."""
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) on {target}: {done.stderr.strip() or done.returncode}")


def chromium_render(page: Path, work: Path, height: int) -> tuple[bytes, str]:
    """Open ``page`` in headless Chromium (its profile under ``work``): its PNG screenshot, 1200 px wide, and the DOM
    Chromium built from it."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed (Debian package chromium); scripts/install installs it")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={work / 'profile'}", f"--window-size=1200,{height}"]  # fmt: skip
    shot = work / "matrix.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout  # fmt: skip
    return shot.read_bytes(), dom
