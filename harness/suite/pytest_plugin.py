"""pytest plugin of the vpmu suite: options, markers, collection order, check outcomes, and the session's end.

Order: options, configure, collection, report hooks, session end. Per-run state lives in ``config.stash``
(harness.suite.session); the fixtures (one booted guest per profile, the host load, ``check``) are
harness.suite.fixtures, registered with this plugin by ``pytest_plugins``; the files a session writes are
harness.suite.session_results.
A check is a test that calls ``check.judge(verdict, measurements)``; the plugin turns the verdict into the pytest
outcome (PASS, SKIP with its reason, FAIL) and into a ``results.json`` entry. A probe or guest failure inside a
check, or a guest that does not boot (fixture setup), is recorded as ``error`` with the serial-log tail.

Before a check measures anything, the ``check`` fixture SKIPs it where it cannot apply: the profile cannot run, the
host load cannot run, the guest vendor is wrong, or an expectation its ``expects`` marker names does not hold
(harness.judge.plan). Two more modes run the same collection and the same gates without booting: ``--vpmu-plan FILE``
writes what a run on the ``--vpmu-host-facts`` host would run and skip (``python -m harness plan``), and
``--vpmu-replay RESULTS`` re-decides every stored check from its stored inputs (``python -m harness rejudge``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _pytest import junitxml  # xml_key: pytest's junit writer, which writes in place

from harness import outputs
from harness.cpu.profile import ACCELS
from harness.errors import GuestError, HarnessError, OutputError, UsageError
from harness.host.kvm_offer import describe as describe_offer
from harness.host.loads import DEFAULT_LOADS_FILE, IDLE
from harness.judge import plan
from harness.judge.expectations import host_offer_notes
from harness.report import matrix, render, results, skip_summary
from harness.suite.profiles import DEFAULT_PROFILES_FILE
from harness.suite.replay import Replay, ReplayGap
from harness.suite.session import (
    CHECK_KEY,
    STATE_KEY,
    CheckError,
    CheckRecord,
    SessionState,
    check_identity,
    selected_loads,
    selected_profiles,
    session_host_facts,
)
from harness.suite.session_results import final_checks, publish_junit, write_results

#: The fixtures come with the plugin wherever it is loaded from (entry point, ``-p``, conftest.py): pytest registers
#: the modules a plugin's ``pytest_plugins`` names (PytestPluginManager.register -> consider_module).
pytest_plugins = ["harness.suite.fixtures"]

IMAGE_HELP = "guest image directory (default: the default image, built into the user cache on first use)"
KERNEL_HELP = "build the guest image from this bzImage (modules from /lib/modules/<release>)"
ACCEL_HELP = "accelerator: kvm or tcg (default: what `python -m harness doctor` picks for this host)"
PROFILE_HELP = "vPMU profile to run (repeatable; default: every profile that applies to this host)"
PROFILES_FILE_HELP = "profiles file (default: guest_tests/profiles.toml)"
RESULTS_HELP = "write results.json here"
LOG_DIR_HELP = "keep each profile's serial.log, qemu.log and host-load output under DIR/<profile>/"
LOAD_HELP = "host perf load to run the checks under (repeatable; default: idle only)"
ALL_LOADS_HELP = "run the checks under every load in the loads file"
LOADS_FILE_HELP = "host loads file (default: guest_tests/loads.toml)"
PLAN_HELP = ("collect the suite and write to FILE which check a run would measure and each SKIP reason, for the "
             "--vpmu-host-facts host, without booting (python -m harness plan)")  # fmt: skip
REPLAY_HELP = ("re-decide the checks of this results.json from its stored measurements with today's rules, without "
               "booting (python -m harness rejudge)")  # fmt: skip
HOST_FACTS_HELP = "host facts (python -m harness doctor --json output) to use instead of this host's"
AUDIT_HELP = ("judge every check even where its expects marker SKIPs it first, and record the pre-gate's reason "
              "as 'pregate' (the self-tests compare the two)")  # fmt: skip


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vpmu", "vpmu guest-side vPMU suite")
    group.addoption("--image", dest="vpmu_image", type=Path, metavar="DIR", help=IMAGE_HELP)
    group.addoption("--kernel", dest="vpmu_kernel", type=Path, metavar="PATH", help=KERNEL_HELP)
    group.addoption("--accel", dest="vpmu_accel", choices=ACCELS, help=ACCEL_HELP)
    group.addoption("--profile", dest="vpmu_profiles", action="append", default=[], metavar="NAME",
                    help=PROFILE_HELP)  # fmt: skip
    group.addoption("--profiles-file", dest="vpmu_profiles_file", type=Path, default=DEFAULT_PROFILES_FILE,
                    metavar="FILE", help=PROFILES_FILE_HELP)  # fmt: skip
    group.addoption("--load", dest="vpmu_loads", action="append", default=[], metavar="NAME", help=LOAD_HELP)
    group.addoption("--all-loads", dest="vpmu_all_loads", action="store_true", help=ALL_LOADS_HELP)
    group.addoption("--loads-file", dest="vpmu_loads_file", type=Path, default=DEFAULT_LOADS_FILE, metavar="FILE",
                    help=LOADS_FILE_HELP)  # fmt: skip
    group.addoption("--results", dest="vpmu_results", type=Path, metavar="FILE", help=RESULTS_HELP)
    group.addoption("--vpmu-log-dir", dest="vpmu_log_dir", type=Path, metavar="DIR", help=LOG_DIR_HELP)
    group.addoption("--vpmu-plan", dest="vpmu_plan", type=Path, metavar="FILE", help=PLAN_HELP)
    group.addoption("--vpmu-replay", dest="vpmu_replay", type=Path, metavar="RESULTS", help=REPLAY_HELP)
    group.addoption("--vpmu-host-facts", dest="vpmu_host_facts", type=Path, metavar="FILE", help=HOST_FACTS_HELP)
    group.addoption("--vpmu-audit-pregate", dest="vpmu_audit_pregate", action="store_true", help=AUDIT_HELP)


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "integration: boots a real guest under QEMU (TCG here, KVM where usable)",
        "requires_pmu: the check needs a vPMU in the guest (SKIPs with the reason where there is none)",
        "intel(what): the check applies to Intel guests only; elsewhere it SKIPs 'not-applicable: <what, default "
        "Intel-only check> (guest vendor V)'",
        "amd(what): the check applies to AMD guests only (SKIP text as for intel)",
        "expects(name, ...): the expectations that gate the check: kvm_features.toml rules, or pmu, lbr, pmu_absent, "
        "host_cpu_model, host_load (harness/judge/plan.py). Where one does not hold, the check SKIPs with its reason "
        "before any probe runs; the closest marker wins",
        "feature(name): the vPMU feature the check belongs to (a row group of the matrix)",
        "check(id): the check's id in results.json; {param} placeholders take the test's parameters",
        "lifecycle: the check resets, restores or migrates the guest: it runs under the idle load only, after every "
        "other check of its profile (under every load)",
    ):
        config.addinivalue_line("markers", line)
    state = SessionState()
    config.stash[STATE_KEY] = state
    source = config.getoption("vpmu_replay", None)
    if source is not None:
        facts_path = config.getoption("vpmu_host_facts")
        try:
            document = results.load(source)
            facts = plan.load_host_facts(facts_path) if facts_path else None
        except UsageError as exc:
            raise pytest.UsageError(str(exc)) from None
        state.replay = Replay(document, source, facts, facts_path)
        config.pluginmanager.register(KeptChecks(), "vpmu-kept-checks")


def pytest_report_header(config: pytest.Config) -> list[str]:
    facts = session_host_facts(config)
    cpu = facts.get("cpu") or {}
    caps = cpu.get("caps") or {}
    lines = [
        f"vpmu: accel={facts.get('accel')} ({facts.get('accel_reason')})",
        f"vpmu: host {cpu.get('vendor')} family {caps.get('family', '?')} model {caps.get('model', '?')}, "
        f"kernel {facts.get('kernel')}, QEMU {(facts.get('qemu') or {}).get('version')}, "
        f"kvm.enable_pmu={(facts.get('kvm') or {}).get('enable_pmu')}, "
        f"nmi_watchdog={(facts.get('perf') or {}).get('nmi_watchdog')}, vPMU mode {facts.get('vpmu_mode')}",
    ]
    if "kvm_offer" in facts:
        lines.append(f"vpmu: KVM offer: {describe_offer(facts['kvm_offer'], facts.get('kvm_offer_reason'))}")
    lines += [f"vpmu: offer vs kvm_features.toml: {note}" for note in host_offer_notes(facts)]
    replay = config.stash[STATE_KEY].replay
    if replay is not None:
        lines.append(f"vpmu: rejudge of {replay.source} ({replay.schema})"
                     + (f", host facts from {replay.host_source}" if replay.host_source else ""))  # fmt: skip
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every check runs once per selected profile; the profile is a session-scoped parameter, so pytest
    groups the checks of one profile together and boots its guest once."""
    state = metafunc.config.stash[STATE_KEY]
    for argname, select in (("vpmu_profile", selected_profiles), ("vpmu_load", selected_loads)):
        if argname not in metafunc.fixturenames:
            continue
        try:
            names = select(metafunc.config)
        except pytest.UsageError as exc:
            # Raised here it would become a collection error per module; re-raised once, after collection, it is
            # pytest's one-line "ERROR: ..." and exit 4 (harness run maps that to 2).
            state.usage_error = state.usage_error or str(exc)
            names = []
        # indirect: one real session fixture shared by every module, so pytest groups all checks of a profile
        # (a direct session-scoped parametrization makes a pseudo-fixture per module and reboots per module).
        metafunc.parametrize(argname, names, scope="session", indirect=True)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Profile-major, then load: each guest boots once and each host load starts once per profile. Life-cycle checks
    (they reboot or move the guest) come last in their profile, after every load's checks, so every other check
    measures the booted guest and a failed step cannot change their results."""
    state = config.stash[STATE_KEY]

    def rank(item: pytest.Item) -> tuple[int, int, int]:
        params = getattr(getattr(item, "callspec", None), "params", {})
        profile, load = params.get("vpmu_profile"), params.get("vpmu_load")
        p = state.selected.index(profile) if profile in state.selected else -1
        q = state.selected_loads.index(load) if load in state.selected_loads else -1
        return p, 1 if item.get_closest_marker("lifecycle") is not None else 0, q

    items.sort(key=rank)
    # A life-cycle step runs under the idle load only (not at all when --load leaves idle out).
    off_idle = [item for item in items if item.get_closest_marker("lifecycle") is not None
                and getattr(getattr(item, "callspec", None), "params", {}).get("vpmu_load", IDLE) != IDLE]  # fmt: skip
    if off_idle:
        config.hook.pytest_deselected(items=off_idle)
        items[:] = [item for item in items if item not in off_idle]
    if config.getoption("vpmu_plan") is not None and not state.usage_error:
        _write_plan(config, items)
        config.hook.pytest_deselected(items=list(items))
        items[:] = []
    elif state.replay is not None:
        _select_stored(config, items)


def _write_plan(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The plan document (python -m harness plan): every profile x check of the idle load, decided by the gates the
    ``check`` fixture applies, for the --vpmu-host-facts host."""
    state = config.stash[STATE_KEY]
    facts = session_host_facts(config)
    accel = config.getoption("vpmu_accel") or facts["accel"]
    if accel == "kvm" and facts["accel"] != "kvm":
        raise pytest.UsageError(f"--accel kvm: KVM is not usable on that host ({facts.get('accel_reason')})")
    nodes: dict[str, list[tuple[str, Any]]] = {name: [] for name in state.selected}
    for item in items:
        profile, _load, check_id, _feature = check_identity(item)
        if profile in nodes:
            nodes[profile].append((check_id, item))
    idle = state.loads[IDLE]
    profiles = [plan.plan_profile(state.profiles[name], accel, facts, nodes[name], idle).to_json()
                for name in state.selected]  # fmt: skip
    source = config.getoption("vpmu_host_facts")
    document = {"host": plan.host_summary(facts, str(source) if source else None), "profiles": profiles}
    outputs.write_text(Path(config.getoption("vpmu_plan")), json.dumps(document, indent=1) + "\n", "--vpmu-plan")


def _select_stored(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Rejudge runs the items of the stored checks only (a check that is new today has no stored inputs)."""
    state = config.stash[STATE_KEY]
    assert state.replay is not None
    keep, drop = [], []
    for item in items:
        profile, load, check_id, _feature = check_identity(item)
        if state.replay.stored_check(profile, load, check_id) is None:
            drop.append(item)
            continue
        state.collected.setdefault((profile, load), set()).add(check_id)
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_collection_finish(session: pytest.Session) -> None:
    error = session.config.stash[STATE_KEY].usage_error
    if error:
        raise pytest.UsageError(error)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if "vpmu_profile" not in getattr(item, "fixturenames", ()):
        return
    state = item.config.stash[STATE_KEY]
    profile, load, check_id, feature = check_identity(item)
    record = item.stash.get(CHECK_KEY, None)
    result: results.CheckResult | None = None
    if report.when == "setup" and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        result = results.CheckResult(check_id, feature, "skip", reason.removeprefix("Skipped: "))
    elif report.when == "setup" and report.failed:
        reason = _exception_text(call.excinfo) if call.excinfo else report.longreprtext
        result = results.CheckResult(check_id, feature, "error", reason)
    elif report.when == "call":
        if record is not None and record.verdict is not None:
            v = record.verdict
            reason = v.reason + "".join(f" [offer: {note}]" for note in record.offer_notes)
            result = results.CheckResult(check_id, record.feature, v.status, reason, v.expected, v.observed,
                                         round(report.duration, 3), record.measurements)  # fmt: skip
        elif report.failed:
            result = results.CheckResult(check_id, feature, "error", _exception_text(call.excinfo),
                                         duration_s=round(report.duration, 3))  # fmt: skip
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            result = results.CheckResult(check_id, feature, "skip", reason.removeprefix("Skipped: "))
        else:
            result = results.CheckResult(check_id, feature, "error", "check recorded no verdict")
    if result is not None and record is not None:
        if record.kept is not None and record.stored is not None:
            result = results.CheckResult.from_json(record.stored)
            result.extra = {"rejudged": False, "rejudge_reason": record.kept}
        elif record.stored is not None:
            result.extra = _rejudged(record.stored, result)
        if record.pregate is not None:
            result.extra["pregate"] = record.pregate
    if result is not None:
        state.checks.setdefault((profile, load), []).append(result)


def _rejudged(stored: dict[str, Any], result: results.CheckResult) -> dict[str, Any]:
    """Rejudge's marks on a check decided again: ``previous`` where the verdict (status or reason) changed."""
    extra: dict[str, Any] = {"rejudged": True}
    if (stored["status"], stored["reason"]) != (result.status, result.reason):
        extra["previous"] = {"status": stored["status"], "reason": stored["reason"]}
    return extra


def _stored_outcome(record: CheckRecord) -> bool:
    """Give a kept check its stored outcome (rejudge does not judge it again), as a pytest outcome."""
    assert record.stored is not None
    status, reason = record.stored["status"], record.stored["reason"]
    if status == "skip":
        pytest.skip(reason)
    if status == "fail":
        pytest.fail(reason, pytrace=False)
    if status == "error":
        raise CheckError(reason)
    return True


class KeptChecks:
    """Rejudge (registered only then): a check whose inputs are not stored is not called; it keeps its stored
    outcome. A plugin object of its own, because the module's pytest_pyfunc_call is the wrapper below."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_pyfunc_call(self, pyfuncitem: pytest.Function) -> bool | None:
        record = pyfuncitem.stash.get(CHECK_KEY, None)
        if record is not None and record.kept is not None:
            return _stored_outcome(record)
        return None


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Iterator[bool | None]:
    """Rejudge: a check that asks for an input the stored run lacks (ReplayGap) keeps its stored outcome."""
    try:
        return (yield)
    except ReplayGap as gap:
        record = pyfuncitem.stash.get(CHECK_KEY, None)
        if record is None or record.stored is None:
            raise
        record.kept = str(gap)
        record.verdict = None
        return _stored_outcome(record)


def _exception_text(excinfo: pytest.ExceptionInfo[BaseException] | None) -> str:
    if excinfo is None:
        return "unknown error"
    exc = excinfo.value
    if isinstance(exc, (HarnessError, CheckError)):
        return str(exc)
    if isinstance(exc, pytest.fail.Exception):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """One line per check (status, profile/load, id, reason) and a summary line that shows every count."""
    state = config.stash[STATE_KEY]
    checks_by_run = final_checks(state)
    if not checks_by_run:
        if state.output_error:
            terminalreporter.write_line(f"ERROR: {state.output_error}")
        return
    counts = dict.fromkeys(results.STATUSES, 0)
    marks = {"rejudged": 0, "changed": 0, "kept": 0}
    terminalreporter.section("vpmu checks")
    for (profile, load), checks in checks_by_run:
        for c in checks:
            counts[c["status"]] += 1
            reason = c["reason"].splitlines()[0] if c["reason"] else ""
            tag = ""
            if c.get("rejudged") is False:
                marks["kept"] += 1
                tag = "[kept as stored] "
            elif c.get("rejudged"):
                marks["rejudged"] += 1
                previous = c.get("previous")
                if previous:
                    marks["changed"] += 1
                    changed = previous["status"] != c["status"]
                    tag = f"[was {previous['status'].upper()}] " if changed else "[new reason] "
            line = f"{c['status'].upper():5} {profile}/{load}  {c['id']}  {tag}{reason}"
            terminalreporter.write_line(line[:200])
    total = sum(counts.values())
    terminalreporter.write_line(
        f"SUMMARY: {total} checks, {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped, "
        f"{counts['error']} errors"
    )
    reasons = skip_summary.group((f"{profile}/{load}", c["id"], c["status"], c["reason"])
                                 for (profile, load), checks in checks_by_run for c in checks)  # fmt: skip
    if reasons:
        terminalreporter.section("vpmu SKIP and ERROR reasons")
        for line in skip_summary.lines(reasons, len(checks_by_run)):
            terminalreporter.write_line(line)
    if state.replay is not None:
        terminalreporter.write_line(f"REJUDGE: {marks['rejudged']} checks judged again ({marks['changed']} changed), "
                                    f"{marks['kept']} kept as stored (inputs not stored)")  # fmt: skip
    path = config.getoption("vpmu_results")
    if state.output_error:
        terminalreporter.write_line(f"ERROR: {state.output_error}")
    elif path and state.document is not None:
        terminalreporter.section("vpmu matrix")
        for line in render.compact(matrix.build([state.document])):
            terminalreporter.write_line(line)
        out = Path(path).parent
        terminalreporter.write_line(f"reports: {path} {out / 'matrix.md'} {out / 'matrix.html'}")


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """--junitxml: point pytest's writer at a temporary file beside the target (it writes in place); the file is
    renamed over the target once complete (pytest_sessionfinish), so junit.xml is never half-written."""
    xml = session.config.stash.get(junitxml.xml_key, None)
    if xml is None or STATE_KEY not in session.config.stash:
        return
    state = session.config.stash[STATE_KEY]
    state.junit_target = xml.logfile
    xml.logfile = str(outputs.temp_path(Path(xml.logfile)))


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Iterator[None]:
    """Write results.json and the matrix reports, then let pytest write junit.xml to its temporary name and rename
    it; each whole or not at all. A file that cannot be written (ENOSPC, EROFS, ...) is recorded, not raised:
    ``python -m harness run`` prints it as one ERROR line and exits 2."""
    config = session.config
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return (yield)
    try:
        write_results(config, state)
    except OutputError as exc:
        state.output_error = str(exc)
    xml = config.stash.get(junitxml.xml_key, None)
    finished = False
    try:
        yield
        finished = True
    except OSError as exc:  # pytest's junit writer (open/write of its temporary file)
        if xml is None or state.junit_target is None:
            raise
        state.output_error = state.output_error or outputs.failure_message(Path(state.junit_target), "", exc)
    finally:
        if xml is not None and state.junit_target is not None:
            publish_junit(state, Path(xml.logfile), finished)
            xml.logfile = state.junit_target
    if state.output_error:
        session.exitstatus = pytest.ExitCode.USAGE_ERROR


def pytest_unconfigure(config: pytest.Config) -> None:
    """Shut down every guest a fixture teardown left behind: pytest stops a teardown at a KeyboardInterrupt (Ctrl-C,
    SIGTERM in ``harness run``) raised by one finalizer without running the others (its SetupState catches only
    Exception), so a load stopped by Ctrl-C would otherwise leave its profile's guest to the garbage collector."""
    state = config.stash.get(STATE_KEY, None)
    for run in state.runs.values() if state is not None else ():
        try:
            run.close()
        except GuestError as exc:  # QEMU had to be killed: nothing is left to do about it
            logging.getLogger(__name__).warning("closing the guest of %s: %s", run.profile.name, exc)
