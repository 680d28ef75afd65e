"""The PMU across the VM's life: a reset (QMP system_reset, and a reboot the guest asks for), a save to a file and a
restore into a new QEMU, and a live migration to a second QEMU (mechanics: harness/suite/lifecycle.py; verdicts:
harness/judge/lifecycle.py).

These checks change the guest (it reboots, or moves to a new QEMU), so they run last in each profile, under the idle
load only (``lifecycle`` marker, suite/pytest_plugin.py), each step on the guest the previous one left. Per step,
``lifecycle.<step>`` judges the step itself on every accelerator (boot id, QMP's account, enumeration) and
``lifecycle.<step>.pmu`` the PMU MSRs around it where a vPMU is expected; both read one measurement
(ProfileRun.measure), made by whichever of the two runs first.
"""

from __future__ import annotations

import pytest

from harness.judge import lifecycle as lv
from harness.judge.bounds import overcount_errata
from harness.suite import lifecycle

pytestmark = [pytest.mark.feature("lifecycle"), pytest.mark.lifecycle]
MEASURE = {
    "reset": lambda run: lifecycle.measure_reset(run, "qmp"),
    "guest_reboot": lambda run: lifecycle.measure_reset(run, "guest"),
    "save_restore": lifecycle.measure_save_restore,
    "migration": lifecycle.measure_migration,
}


def _errata(run):
    return overcount_errata(run.view.caps, (run.host.get("cpu") or {}).get("caps"))


def _records(run, step: str) -> list[dict]:
    return run.measure(f"lifecycle.{step}", lambda: MEASURE[step](run))


@pytest.mark.check("lifecycle.{step}")
@pytest.mark.parametrize("step", list(MEASURE))
def test_step(profile_run, check, step):
    """The step itself: a reset gives a new boot id and a QMP RESET event from the side that asked (system_reset:
    guest=false; reboot -f in the guest: guest=true); a save/restore or a live migration keeps the boot id and a
    guest process running across the switch-over finishes; the PMU enumeration is unchanged (with lbr-fmt: the LBR
    format); QEMU refusing a migratable=no vCPU with its non-migratable-CPU blocker is what QEMU documents."""
    records = _records(profile_run, step)
    check.judge(lv.mechanics_verdict(records, profile_run.cpu.props), records)


@pytest.mark.expects("pmu")
@pytest.mark.check("lifecycle.{step}.pmu")
@pytest.mark.parametrize("step", list(MEASURE))
def test_pmu_state(profile_run, check, step):
    """The PMU MSRs around the step: after a reset, event selects and FIXED_CTR_CTRL 0, counters and GLOBAL_STATUS as
    after the cold boot (GLOBAL_CTRL reported only: the guest kernel writes it at boot), no stale-PMU kernel line
    the boot before had not printed; after a restore or a migration, control MSRs and GLOBAL_STATUS as before,
    counters >= before and a loop counted exactly (across the switch-over, for a migration; SKIP when the probe was
    switched out in its windows)."""
    records = _records(profile_run, step)
    expectation, view = profile_run.pmu_expectation(), profile_run.view
    if step in ("reset", "guest_reboot"):
        qemu_version = (profile_run.host.get("qemu") or {}).get("version")
        verdict = lv.reset_verdict(expectation, view, records, qemu_version)
    elif step == "save_restore":
        verdict = lv.save_restore_verdict(expectation, view, records, _errata(profile_run), profile_run.cpu.props)
    else:
        verdict = lv.migration_verdict(expectation, view, records, profile_run.cpu.props, _errata(profile_run))
    check.judge(verdict, records)
