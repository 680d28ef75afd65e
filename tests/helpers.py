"""Shared helpers of the self-tests: where the reference data lives, and how to run the CLI for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
