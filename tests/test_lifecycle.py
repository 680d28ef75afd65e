"""The guest's life cycle for real, under this host's accelerator (TCG here): reset, guest reboot, save to a file and
restore into a new QEMU, live migration to a second QEMU, in every shipped profile. Read from the shared suite run
(tests/conftest.py ``suite_run``: life-cycle checks last in each profile), so they cost no boot of their own; the
failures are in tests/test_lifecycle_faults.py.
"""

from __future__ import annotations

import pytest

from harness import results

pytestmark = pytest.mark.integration
STEPS = ("lifecycle.reset", "lifecycle.guest_reboot", "lifecycle.save_restore", "lifecycle.migration")


def test_every_profile_goes_through_its_life_cycle(suite_run, host_facts):
    _proc, out = suite_run
    document = results.load(out / "results.json")
    for run in document["runs"]:
        checks = [c for c in run["checks"] if c["id"].startswith("lifecycle.")]
        assert [c["id"] for c in checks] == list(STEPS), run["profile"]
        assert [c["id"] for c in run["checks"][-4:]] == list(STEPS)  # last in the profile: nothing measured after
        ids = []
        for check in checks:
            step = next(r for r in check["measurements"] if r["kind"] == "step")
            ids.append((step["boot_id_before"], step["boot_id_after"]))
            if host_facts["accel"] == "tcg":
                assert check["status"] == "skip", check
                assert check["reason"].startswith("accel: no vPMU under TCG") and "itself held" in check["reason"]
                assert "enumeration unchanged" in check["reason"]
            else:
                assert check["status"] in ("pass", "skip"), check
        (r0, r1), (g0, g1), (s0, s1), (m0, m1) = ids
        assert r0 != r1 and r1 == g0 and g0 != g1 and g1 == s0 == s1 == m0 == m1, ids  # reboots, then the same guest
        steps = {c["id"]: next(r for r in c["measurements"] if r["kind"] == "step") for c in checks}
        assert steps["lifecycle.reset"]["reset_event"] == {"guest": False, "reason": "host-qmp-system-reset"}
        assert steps["lifecycle.guest_reboot"]["reset_event"] == {"guest": True, "reason": "guest-reset"}
        assert steps["lifecycle.save_restore"]["state_bytes"] > 1 << 20
        migration = steps["lifecycle.migration"]
        assert migration["downtime_ms"] is not None and migration["during"]["finished"] is True
        # the destinations' own consoles are kept beside the source's
        for name in ("restore", "migration"):
            assert (out / "logs" / run["profile"] / name / "serial.log").is_file()
    html = (out / "matrix.html").read_text()
    assert "PMU state across the VM&#39;s life" in html or "PMU state across the VM's life" in html
