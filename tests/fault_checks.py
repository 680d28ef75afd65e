"""Test-only checks the fault matrix (tests/test_faults.py) adds to its runs: under TCG every shipped check reads the
guest view taken at boot, so without these no probe would be copied or run while a check group (and its host load)
runs. Not collected by ``pytest tests`` (the name does not match ``test_*.py``); passed explicitly to
``python -m harness run -- tests/fault_checks.py``.
"""

from __future__ import annotations

import pytest

from harness.judge import verdict
from harness.probe.runner import ProbeBuilder
from tests.helpers import TEST_DATA

pytestmark = pytest.mark.feature("selftest")

#: Long enough for a fault fired as the probe starts (harness.lifetime "probe_run") to hit it mid-run.
PROBE_MS = 1000
BUILDER = ProbeBuilder(probes_dir=TEST_DATA / "probes")


@pytest.mark.check("selftest.guest_probe")
def test_guest_probe(profile_run, host_load, check):
    """Copy (a binary of its own per load) and run a probe in the guest while the group's host load runs, through the
    harness's own probe path (ProfileRun.probe: memo, the guest's loss named, one reboot)."""
    profile_run.ensure_alive()  # may reboot: the runner it makes gets the self-test probes next
    profile_run._runner.builder = BUILDER
    run = profile_run.probe("selftest_sleep", {"milliseconds": PROBE_MS + len(profile_run.load)})
    check.judge(verdict.passed(f"the guest ran the probe for {run.duration_s:.1f} s"))
