"""The PMU across the VM's life: a reset (QMP system_reset, and a reboot the guest asks for), a save to a file and a
restore into a new QEMU, and a live migration to a second QEMU (mechanics: harness/lifecycle.py; verdicts:
harness/lifecycle_verdicts.py).

These checks change the guest (it reboots, or moves to a new QEMU), so they run last in each profile's idle group
(``lifecycle`` marker, harness/pytest_plugin.py), each on the guest the previous one left. The mechanics and the
enumeration are judged on every accelerator; the MSR values only where a vPMU is expected (under TCG they SKIP with
the reason, saying what the step itself did).
"""

from __future__ import annotations

import pytest

from harness import lifecycle
from harness import lifecycle_verdicts as lv
from harness.verdicts import overcount_errata

pytestmark = [pytest.mark.feature("lifecycle"), pytest.mark.lifecycle]


def _errata(run):
    return overcount_errata(run.view.caps, (run.host.get("cpu") or {}).get("caps"))


@pytest.mark.check("lifecycle.reset")
def test_reset(profile_run, check):
    """QMP system_reset with counters programmed: a new boot id, the same enumeration, no stale-PMU kernel lines,
    event selects and FIXED_CTR_CTRL 0, counters and GLOBAL_CTRL as after the cold boot."""
    records = profile_run.measure("lifecycle.reset", lambda: lifecycle.measure_reset(profile_run, "qmp"))
    check.judge(lv.reset_verdict(profile_run.pmu_expectation(), profile_run.view, records), records)


@pytest.mark.check("lifecycle.guest_reboot")
def test_guest_reboot(profile_run, check):
    """The same after a reboot the guest asks for (reboot -f: QMP RESET with guest=true)."""
    records = profile_run.measure("lifecycle.guest_reboot", lambda: lifecycle.measure_reset(profile_run, "guest"))
    check.judge(lv.reset_verdict(profile_run.pmu_expectation(), profile_run.view, records), records)


@pytest.mark.check("lifecycle.save_restore")
def test_save_restore(profile_run, check):
    """Save to a file, restore into a new QEMU: the same boot id and enumeration, control MSRs as saved, counters
    >= saved and counting a new loop exactly."""
    records = profile_run.measure("lifecycle.save_restore", lambda: lifecycle.measure_save_restore(profile_run))
    verdict = lv.save_restore_verdict(profile_run.pmu_expectation(), profile_run.view, records, _errata(profile_run),
                                      profile_run.cpu.props)  # fmt: skip
    check.judge(verdict, records)


@pytest.mark.check("lifecycle.migration")
def test_migration(profile_run, check):
    """Live migration over a unix socket with a loop counting across the switch-over: counts exact, MSRs and
    enumeration as before; a -cpu QEMU documents as unmigratable (migratable=no, lbr-fmt) may be refused instead."""
    records = profile_run.measure("lifecycle.migration", lambda: lifecycle.measure_migration(profile_run))
    verdict = lv.migration_verdict(profile_run.pmu_expectation(), profile_run.view, records, profile_run.cpu.props,
                                   _errata(profile_run))  # fmt: skip
    check.judge(verdict, records)
