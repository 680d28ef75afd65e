"""Failures of the guest's life-cycle steps, for real, on one shared boot (this host's accelerator, TCG here): the
destination dies during a restore, a migration that does not finish in time, the source dies mid-migration: each a
LifecycleError naming the step with both serial tails, with no QEMU, socket or save file left behind and the source
running on where it can; and the PMU path's probes and FIFO hand-shake across a real switch-over.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from harness import lifetime
from harness.errors import LifecycleError
from harness.judge import lifecycle as lifecycle_verdicts
from harness.report import results
from harness.suite import lifecycle
from harness.suite.profile_run import ProfileRun
from harness.suite.profiles import DEFAULT_PROFILES_FILE, load_profiles
from tests.conftest import qemu_pids
from tests.helpers import run_cli
from tests.test_verdicts import intel_kvm_guest_view

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def booted(guest_image, host_facts):
    """One guest for the module, booted before the first test's leak check (module-scoped autouse comes first)."""
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


def test_pmu_path_runs_for_real_where_msr_reads_fault(booted, monkeypatch):
    """The PMU path's probes and its FIFO hand-shake, for real, in a guest whose PMU MSRs fault (TCG): posing as the
    SPR guest of the verdict tests, the counting region starts before the switch-over, ends after it on the
    destination, and its records come back in the probe's format. Last in the module: the source died in the test
    before (the guest is booted again), and the guest ends in the destination QEMU, which the test shuts down."""
    if booted.view.cpuid_pmu:
        pytest.skip("host: this guest has a vPMU; the PMU path runs for real in the suite run")
    booted.ensure_alive()
    monkeypatch.setattr(booted, "view", intel_kvm_guest_view())
    records = lifecycle.measure_migration(booted)
    step = next(r for r in records if r["kind"] == "step")
    assert step["during"]["finished"] is True and step["during"]["repeats"] >= 1
    region = next(r for r in records if r["kind"] == "enabled")
    assert region["stage"] == "restored" and region["iterations"] == step["during"]["repeats"] * 1_000_000
    switch = next(r for r in records if r["kind"] == "switchover")
    assert region["region_start_ns"] < switch["guest_boottime_ns"] < region["region_end_ns"]  # spans the switch-over
    states = [r for r in records if r["kind"] == "state"]
    assert {r["stage"] for r in states} == {"saved", "restored"} and {r["point"] for r in states} >= {"before", "after"}
    # TCG reads an MSR it does not implement as 0 and ignores writes (target/i386/tcg/sysemu/misc_helper.c
    # helper_rdmsr/helper_wrmsr default cases): nothing took, and the verdict says so instead of judging zeros.
    assert all(r.get("value") == 0 or "errno" in r for r in states), states[:3]
    assert lifecycle_verdicts.programmed_problem(records).startswith("no event select had EN set")
    booted.close()


def test_a_failed_step_is_an_error_of_its_checks_in_a_run(tmp_path, guest_image):
    """End to end: the destination QEMU SIGKILLed while it restores (the fault plugin at phase ``restore``): both
    checks of the step are ERROR naming it, with both serial tails; the source ran on, so the migration after it
    passes; exit 1."""
    out = tmp_path / "out"
    proc = run_cli("run", "--image", str(guest_image.directory), "--profile", "pmu-on", "--out", str(out), "--",
                   "-p", "tests.fault_plugin", "--vpmu-inject-fault", "pmu-on:restore:qemu_sigkill",
                   "-k", "save_restore or migration", timeout_s=300)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:]
    checks = {c["id"]: c for c in results.load(out / "results.json")["runs"][0]["checks"]}
    step = checks["lifecycle.save_restore"]
    assert step["status"] == "error" and step["reason"].startswith("lifecycle step 'restore' failed: ")
    assert "killed by signal 9" in step["reason"].splitlines()[0]
    assert "--- source serial log (tail) ---" in step["reason"] and "--- destination serial log" in step["reason"]
    assert checks["lifecycle.migration"]["status"] == "pass", checks["lifecycle.migration"]
    pmu = checks["lifecycle.save_restore.pmu"]
    assert pmu["status"] == "skip" if not booted_has_pmu(out) else pmu["status"] == "error"


def booted_has_pmu(out: Path) -> bool:
    return bool(results.load(out / "results.json")["runs"][0]["guest"]["features"]["pmu"]["seen"])
