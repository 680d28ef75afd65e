"""The suite's fixtures: the host, the guest image, one booted guest per profile, the host load, and ``check``.

``profile_run`` boots a profile's guest once for the session; ``host_load`` runs a host perf load for the whole
check group of (profile, load) and records what it did; ``check`` is the recorder a check reports its verdict to, and
it SKIPs the check before any probe runs where the check cannot apply (the same gates ``plan`` uses). Registered by
the plugin (harness.suite.pytest_plugin's ``pytest_plugins``).

PYTEST_DONT_REWRITE: pytest marks a module its plugin names for assertion rewriting when it registers it; had
anything imported this module before (the vpmu command, a self-test), that mark would come too late and pytest would
warn on every run (PytestAssertRewriteWarning). Its asserts are internal invariants, not test assertions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from harness.errors import GuestError, HarnessError, UsageError
from harness.guest.image import Image, build_image, find_or_build_image
from harness.host.loads import HostLoad
from harness.judge import coexist, coexist_depth, plan
from harness.judge.verdict import Verdict
from harness.probe.runner import ProbeError
from harness.suite.before_boot import start_before_boot
from harness.suite.profile_run import ProfileRun
from harness.suite.replay import RecordingLoad, ReplayLoad, ReplayRun
from harness.suite.session import (
    CHECK_KEY,
    STATE_KEY,
    CheckError,
    CheckRecord,
    check_identity,
    offline,
    session_accel,
    session_host_facts,
)

#: The co-existence check that judges the host load itself; it runs even when the load could not start.
HOST_LOAD_CHECK = "coexist.host_load"


@dataclass
class CheckRecorder:
    """Given to each check: records the verdict and the raw measurements, and sets the pytest outcome."""

    record: CheckRecord

    def judge(self, verdict: Verdict, measurements: list[dict[str, Any]] | None = None) -> None:
        self.record.verdict = verdict
        self.record.measurements = list(measurements or [])
        # the reason results.json records (pytest_runtest_makereport), so junit.xml's message says the same words
        reason = verdict.reason + "".join(f" [offer: {note}]" for note in self.record.offer_notes)
        if verdict.status == "skip":
            pytest.skip(reason)
        if verdict.status == "fail":
            pytest.fail(reason, pytrace=False)
        if verdict.status == "error":
            raise CheckError(verdict.reason)


@pytest.fixture(scope="session")
def host_facts(pytestconfig: pytest.Config) -> dict[str, Any]:
    """The ``doctor`` facts of this host, collected once per session."""
    return session_host_facts(pytestconfig)


@pytest.fixture(scope="session")
def accel(pytestconfig: pytest.Config) -> str:
    """The accelerator guests use: ``--accel`` if given (kvm only where usable), else doctor's choice."""
    return session_accel(pytestconfig)


@pytest.fixture(scope="session")
def guest_image(pytestconfig: pytest.Config) -> Image:
    """The guest image: ``--image DIR``, an image built from ``--kernel``, or the default one (cached)."""
    try:
        kernel = pytestconfig.getoption("vpmu_kernel")
        if kernel is not None:
            return build_image(kernel=kernel, log=lambda _msg: None).image
        return find_or_build_image(pytestconfig.getoption("vpmu_image"), log=lambda _msg: None)
    except UsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    except HarnessError as exc:
        pytest.fail(f"cannot build the guest image: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def vpmu_profile(request: pytest.FixtureRequest) -> str:
    """The profile name this check runs under (parametrized by pytest_generate_tests)."""
    return request.param


@pytest.fixture(scope="session")
def profile_run(
    pytestconfig: pytest.Config, vpmu_profile: str, request: pytest.FixtureRequest
) -> Iterator[ProfileRun | ReplayRun]:
    """The profile's guest, booted once for the session (or 'unavailable' with the reason); under rejudge, the
    stored run that answers as the guest did."""
    state = pytestconfig.stash[STATE_KEY]
    if state.replay is not None:
        yield state.replay.profile_run(vpmu_profile)
        return
    if offline(pytestconfig):
        raise pytest.UsageError("--vpmu-plan only collects: no check runs")
    guest_image: Image = request.getfixturevalue("guest_image")
    accel: str = request.getfixturevalue("accel")
    host_facts: dict[str, Any] = request.getfixturevalue("host_facts")
    log_root = pytestconfig.getoption("vpmu_log_dir")
    run = ProfileRun(state.profiles[vpmu_profile], accel, host_facts, guest_image,
                     log_dir=log_root / vpmu_profile if log_root else None)  # fmt: skip
    state.runs[vpmu_profile] = run
    start = time.monotonic()
    try:
        run.start()
    except GuestError as exc:
        state.boot_failures[vpmu_profile] = str(exc)
        raise
    except ProbeError as exc:
        run.close()
        raise GuestError(f"guest booted in {time.monotonic() - start:.1f} s but enumeration failed: {exc}") from exc
    try:
        yield run
    finally:
        run.close()


@pytest.fixture(scope="session")
def vpmu_load(request: pytest.FixtureRequest) -> str:
    """The host load this check runs under (parametrized by pytest_generate_tests)."""
    return request.param


@pytest.fixture(scope="session")
def host_load(
    pytestconfig: pytest.Config,
    vpmu_load: str,
    profile_run: ProfileRun | ReplayRun,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RecordingLoad | ReplayLoad | None]:
    """The host perf load, running for the whole check group of (profile, load); stopped and recorded after. The
    checks get it through a recorder (what they read goes to results.json); under rejudge, the stored load."""
    state = pytestconfig.stash[STATE_KEY]
    profile_run.load = vpmu_load
    if state.replay is not None:
        yield state.replay.host_load(profile_run.profile.name, vpmu_load)
        return
    assert isinstance(profile_run, ProfileRun)
    spec = state.loads[vpmu_load]
    # A before-boot load boots its own guest (the one before it may have been refused under an earlier such load).
    if profile_run.unavailable or (profile_run._guest is None and not spec.before_boot):
        yield None
        return
    log_root = pytestconfig.getoption("vpmu_log_dir")
    log_dir = (log_root / profile_run.profile.name / "loads") if log_root else tmp_path_factory.mktemp("loads")
    if profile_run._guest is not None:
        profile_run.ensure_alive()  # a guest lost in the previous group is rebooted now: the load needs its threads
    tids, cpus = profile_run.vcpu_threads()
    exits_before = profile_run.vm_exits_now() if profile_run._guest is not None else None
    start = time.monotonic()
    load = HostLoad(spec, log_dir, tids, cpus)
    load.exits_before = exits_before
    recorder = RecordingLoad(load)
    if spec.before_boot:
        start_before_boot(load, profile_run)  # the guest is shut down and booted again under the load
        exits_before = load.exits_before
    else:
        load.start()
    lost = profile_run.lost()
    if lost is not None:  # the guest went away while the load started: every check of the group is an ERROR
        load.stop()
        raise GuestError(f"guest lost while host load {vpmu_load} started: {lost}\n--- serial log (tail) ---\n"
                         f"{profile_run.guest.machine.serial_tail()}")  # fmt: skip
    try:
        yield recorder
    finally:
        load.stop()
        seconds = time.monotonic() - start
        exits = profile_run.vm_exits_now() if profile_run._guest is not None else None
        delta = exits - exits_before if exits is not None and exits_before is not None else None
        key = (profile_run.profile.name, vpmu_load)
        if key not in state.load_results:  # the idle load again, for the life-cycle checks: the group's result stays
            state.load_results[key] = {
                **load.result.to_json(), "group_s": round(seconds, 3), "vm_exits": delta,
                "vm_exits_per_s": round(delta / seconds, 1) if delta is not None and seconds > 0 else None,
            }  # fmt: skip
            state.load_inputs[key] = recorder.inputs()


@pytest.fixture
def check(
    request: pytest.FixtureRequest,
    profile_run: ProfileRun | ReplayRun,
    host_load: RecordingLoad | ReplayLoad | None,
) -> CheckRecorder:
    """The recorder a check reports its verdict to. SKIPs at once, before any probe runs, where the check cannot
    apply: the profile cannot run here, the host load cannot run, the guest vendor is wrong for an intel/amd check,
    or an expectation of its ``expects`` marker does not hold (harness.judge.plan: ``plan`` decides with the same
    functions)."""
    node = request.node
    profile, load, check_id, feature = check_identity(node)
    record = CheckRecord(profile, load, check_id, feature)
    node.stash[CHECK_KEY] = record
    config = request.config
    replay = config.stash[STATE_KEY].replay
    if replay is not None:
        record.stored = replay.stored_check(profile, load, check_id)
        record.kept = replay.gap(profile, load)
        if record.kept is not None:
            return CheckRecorder(record)  # not judged again: pytest_pyfunc_call gives it its stored outcome
    if profile_run.unavailable:
        pytest.skip(profile_run.unavailable)
    if host_load is not None and host_load.result.status in ("unavailable", "refused") and check_id != HOST_LOAD_CHECK:
        # The scenario cannot run here: its checks SKIP with perf's own words (the load check itself still
        # judges the refusal, which the mediated vPMU requires for include-guest events).
        pytest.skip(f"host-load: {host_load.result.reason}")
    if host_load is not None and check_id not in (HOST_LOAD_CHECK, coexist_depth.LOAD_BEFORE_BOOT_CHECK):
        # A before-boot load whose guest did not boot: the mediated vPMU's refusal SKIPs the group, anything else is
        # its ERROR (coexist.load_before_boot judges the boot itself).
        unbooted = coexist_depth.unbooted_gate(host_load.spec, host_load.result,
                                               coexist.mediated_pmu_holder(profile_run.ctx))  # fmt: skip
        if unbooted is not None and unbooted[1]:
            pytest.skip(unbooted[0])
        if unbooted is not None:
            raise GuestError(unbooted[0])
    view = profile_run.view
    reason = plan.vendor_gate(node, view.caps.vendor if view is not None else None)
    if reason:
        pytest.skip(reason)
    expects = plan.marker_expects(node)
    reason = plan.gate_reason(expects, profile_run.ctx, host_load.spec if host_load else None)
    record.offer_notes = plan.gate_notes(expects, profile_run.ctx)
    if reason and config.getoption("vpmu_audit_pregate"):
        record.pregate = reason  # judged anyway: the self-tests compare the verdict with this reason
    elif reason:
        pytest.skip(reason)
    return CheckRecorder(record)
