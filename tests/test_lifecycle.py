"""The guest's life cycle for real, under this host's accelerator (TCG here): reset, guest reboot, save to a file and
restore into a new QEMU, live migration to a second QEMU; and the failures: the destination dies during a restore,
a migration that does not finish in time, the source dies mid-migration: each an ERROR naming the step with both
serial tails, with no QEMU, socket or save file left behind.

The successful steps are read from the shared suite run (tests/conftest.py ``suite_run``: every shipped profile,
lifecycle checks last in each), so they cost no boot of their own; the failures share one boot.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from harness import lifecycle, lifetime, results
from harness.errors import LifecycleError
from harness.profile_run import ProfileRun
from harness.profiles import DEFAULT_PROFILES_FILE, load_profiles
from tests.conftest import qemu_pids

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


@pytest.fixture(scope="module")
def booted(guest_image, host_facts):
    profile = load_profiles(DEFAULT_PROFILES_FILE)["pmu-on"]
    run = ProfileRun(profile, host_facts["accel"], host_facts, guest_image)
    run.start()
    yield run
    run.close()


def _fire(phase_name: str, sig: signal.Signals):
    """At the first announcement of ``phase_name``, send ``sig`` to the machine it names; return the remover and a
    list that receives the machine's pid."""
    hit: list[int] = []

    def observer(name, context):
        if name == phase_name and not hit:
            hit.append(context["machine"].pid)
            os.kill(context["machine"].pid, sig)

    return lifetime.observe_phases(observer), hit


def _lifecycle_dirs() -> set[Path]:
    return set(Path("/tmp").glob("vpmu-qemu-*-lifecycle-*"))


def test_destination_dies_during_restore(booted):
    before_id = lifecycle.boot_id(booted.guest.ssh)
    remove, hit = _fire("restore", signal.SIGKILL)
    start = time.monotonic()
    try:
        with pytest.raises(LifecycleError) as caught:
            lifecycle.save_restore(booted)
    finally:
        remove()
    assert time.monotonic() - start < 30
    text = str(caught.value)
    assert caught.value.step == "restore" and "killed by signal 9" in text, text
    assert "--- source serial log (tail) ---" in text and "--- destination serial log (tail) ---" in text
    assert hit and hit[0] not in qemu_pids() and not _lifecycle_dirs()
    # the source was resumed: the same guest answers, and stays the run's guest
    assert booted.lost() is None and lifecycle.boot_id(booted.guest.ssh) == before_id


def test_migration_that_does_not_finish_in_time_is_cancelled(booted):
    """A stopped destination takes no data: the source's migration hangs until the deadline, then it is cancelled
    and the source runs on."""
    before_id = lifecycle.boot_id(booted.guest.ssh)
    remove, hit = _fire("migration", signal.SIGSTOP)
    start = time.monotonic()
    try:
        with pytest.raises(LifecycleError) as caught:
            lifecycle.migrate(booted, timeout_s=3)
    finally:
        remove()
    assert time.monotonic() - start < 30
    text = str(caught.value)
    assert caught.value.step == "migration" and "no QMP event MIGRATION within 3 s (source)" in text, text
    assert "--- destination serial log (tail) ---" in text
    assert hit and hit[0] not in qemu_pids() and not _lifecycle_dirs()
    assert booted.lost() is None and lifecycle.boot_id(booted.guest.ssh) == before_id


def test_source_dies_mid_migration(booted):
    remove, hit = _fire("migration_source", signal.SIGKILL)
    start = time.monotonic()
    destinations_before = qemu_pids()
    try:
        with pytest.raises(LifecycleError) as caught:
            lifecycle.migrate(booted)
    finally:
        remove()
    assert time.monotonic() - start < 30
    text = str(caught.value)
    assert caught.value.step == "migration" and "killed by signal 9" in text, text
    assert "--- source serial log (tail) ---" in text and "--- destination serial log (tail) ---" in text
    assert not (qemu_pids() - destinations_before) and hit[0] not in qemu_pids() and not _lifecycle_dirs()
    assert booted.lost() is not None  # the source is gone: the next check would reboot it (ensure_alive)
