"""The guest's life cycle for real, under this host's accelerator (TCG here): reset, guest reboot, save to a file and
restore into a new QEMU, live migration to a second QEMU, in every shipped profile. Read from the shared suite run
(tests/conftest.py ``suite_run``: life-cycle checks last in each profile), so they cost no boot of their own; the
failures are in tests/test_lifecycle_faults.py.
"""

from __future__ import annotations

import pytest

from harness.report import results

pytestmark = pytest.mark.integration
STEPS = ("lifecycle.reset", "lifecycle.guest_reboot", "lifecycle.save_restore", "lifecycle.migration")
PMU = tuple(f"{step}.pmu" for step in STEPS)


def test_every_profile_goes_through_its_life_cycle(suite_run, host_facts):
    _proc, out = suite_run
    document = results.load(out / "results.json")
    for run in document["runs"]:
        assert [c["id"] for c in run["checks"][-8:]] == [*STEPS, *PMU], run["profile"]  # last: nothing measured after
        checks = {c["id"]: c for c in run["checks"]}
        ids = []
        for check_id in STEPS:
            check = checks[check_id]
            assert check["status"] == "pass", check  # the step itself holds on every accelerator
            step = next(r for r in check["measurements"] if r["kind"] == "step")
            ids.append((step["boot_id_before"], step["boot_id_after"]))
            pmu = checks[f"{check_id}.pmu"]
            if host_facts["accel"] == "tcg":  # pre-gated like every PMU check: the plan predicts it
                assert pmu["status"] == "skip" and pmu["reason"].startswith("accel: no vPMU under TCG"), pmu
            else:
                assert pmu["status"] in ("pass", "skip"), pmu
        (r0, r1), (g0, g1), (s0, s1), (m0, m1) = ids
        assert r0 != r1 and r1 == g0 and g0 != g1 and g1 == s0 == s1 == m0 == m1, ids  # reboots, then the same guest
        steps = {i: next(r for r in checks[i]["measurements"] if r["kind"] == "step") for i in STEPS}
        assert steps["lifecycle.reset"]["reset_event"] == {"guest": False, "reason": "host-qmp-system-reset"}
        assert steps["lifecycle.guest_reboot"]["reset_event"] == {"guest": True, "reason": "guest-reset"}
        assert steps["lifecycle.save_restore"]["state_bytes"] > 1 << 20
        migration = steps["lifecycle.migration"]
        assert migration["downtime_ms"] is not None and migration["during"]["finished"] is True
        for name in ("restore", "migration"):  # the destinations' own consoles are kept beside the source's
            assert (out / "logs" / run["profile"] / name / "serial.log").is_file()
    html = (out / "matrix.html").read_text()
    assert "PMU state across the VM" in html and "lifecycle.migration.pmu: SKIP" in html
