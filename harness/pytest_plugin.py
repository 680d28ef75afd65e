"""pytest plugin of the vpmu suite: options, markers, one booted guest per profile, and the results file.

Order: options, configure, collection, report hooks, fixtures. Per-run state lives in ``config.stash``.
A check is a test that calls ``check.judge(verdict, measurements)``; the plugin turns the verdict into the pytest
outcome (PASS, SKIP with its reason, FAIL) and into a ``results.json`` entry. A probe or guest failure inside a
check, or a guest that does not boot (fixture setup), is recorded as ``error`` with the serial-log tail.

Before a check measures anything, the ``check`` fixture SKIPs it where it cannot apply: the profile cannot run, the
host load cannot run, the guest vendor is wrong, or an expectation its ``expects`` marker names does not hold
(harness.plan). Two more modes run the same collection and the same gates without booting: ``--vpmu-plan FILE``
writes what a run on the ``--vpmu-host-facts`` host would run and skip (``python -m harness plan``), and
``--vpmu-replay RESULTS`` re-decides every stored check from its stored inputs (``python -m harness rejudge``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _pytest import junitxml  # xml_key: pytest's junit writer, which writes in place

from harness import coexist, coexist_depth, hostfacts, matrix, outputs, plan, render, results, skip_summary
from harness.cpu_model import CpuModel
from harness.errors import GuestError, HarnessError, OutputError, UsageError
from harness.expectations import Context, first_unmet, host_offer_notes
from harness.image import Image, build_image, find_or_build_image
from harness.kvm_offer import describe as describe_offer
from harness.loads import DEFAULT_LOADS_FILE, IDLE, HostLoad, LoadSpec, load_loads, select_loads
from harness.probes import ProbeError
from harness.profile_run import ProfileRun
from harness.profiles import ACCELS, DEFAULT_PROFILES_FILE, Profile, load_profiles, select_profile
from harness.qemu_cpu import probe_cpu_caps
from harness.replay import RecordingLoad, Replay, ReplayGap, ReplayLoad, ReplayRun, profile_json
from harness.verdicts import Verdict

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

#: The co-existence check that judges the host load itself; it runs even when the load could not start.
HOST_LOAD_CHECK = "coexist.host_load"

HOST_FACTS_KEY = pytest.StashKey[dict[str, Any]]()
STATE_KEY = pytest.StashKey["SessionState"]()
CHECK_KEY = pytest.StashKey["CheckRecord"]()


@dataclass
class CheckRecord:
    """What a check reported (set by ``check.judge``), keyed to its item."""

    profile: str
    load: str
    check_id: str
    feature: str
    verdict: Verdict | None = None
    measurements: list[dict[str, Any]] = field(default_factory=list)
    #: Rejudge: the stored check, and why it keeps its stored verdict (None: it is judged again).
    stored: dict[str, Any] | None = None
    kept: str | None = None
    #: --vpmu-audit-pregate: the reason the pre-gate would have SKIPped the check with.
    pregate: str | None = None
    #: Where the KVM offer overrode kvm_features.toml for this check's expectations (appended to its reason).
    offer_notes: list[str] = field(default_factory=list)


@dataclass
class SessionState:
    profiles: dict[str, Profile] = field(default_factory=dict)
    selected: list[str] = field(default_factory=list)
    loads: dict[str, LoadSpec] = field(default_factory=dict)
    selected_loads: list[str] = field(default_factory=list)
    runs: dict[str, ProfileRun] = field(default_factory=dict)
    checks: dict[tuple[str, str], list[results.CheckResult]] = field(default_factory=dict)
    load_results: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    load_inputs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    boot_failures: dict[str, str] = field(default_factory=dict)
    usage_error: str | None = None
    #: Rejudge mode: the stored document, the checks collected per run, and the document written at the end.
    replay: Replay | None = None
    collected: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    rejudged: dict[str, Any] | None = None
    #: The results document written at the end (the terminal matrix shows it), and why an output could not be
    #: written (python -m harness run/rejudge print it as their one ERROR line and exit 2).
    document: dict[str, Any] | None = None
    output_error: str | None = None
    #: --junitxml: the path the user asked for; pytest's writer is pointed at a temporary file beside it.
    junit_target: str | None = None


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
        "host_cpu_model, host_load (harness/plan.py). Where one does not hold, the check SKIPs with its reason "
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


def _host_facts(config: pytest.Config) -> dict[str, Any]:
    """This host's doctor facts; a --vpmu-host-facts file, or the replayed document's host, instead where given
    (plan and rejudge never probe this host: no QEMU, no perf)."""
    if HOST_FACTS_KEY not in config.stash:
        replay = config.stash[STATE_KEY].replay
        path = config.getoption("vpmu_host_facts")
        if replay is not None:
            facts = replay.host
        elif path is not None:
            try:
                facts = plan.load_host_facts(path)
            except UsageError as exc:
                raise pytest.UsageError(str(exc)) from None
        else:
            facts = hostfacts.collect()
        config.stash[HOST_FACTS_KEY] = facts
    return config.stash[HOST_FACTS_KEY]


def _offline(config: pytest.Config) -> bool:
    """Plan or rejudge: nothing may boot, build an image or ask this host's QEMU."""
    return config.getoption("vpmu_plan") is not None or config.stash[STATE_KEY].replay is not None


def _accel(config: pytest.Config) -> str:
    facts = _host_facts(config)
    choice = hostfacts.AccelChoice(facts["accel"], facts["accel_reason"])
    try:
        return hostfacts.resolve_accel(config.getoption("vpmu_accel"), choice)
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None


def _selected_profiles(config: pytest.Config) -> list[str]:
    """--profile names (validated), or every profile that applies to this host and accelerator."""
    state = config.stash[STATE_KEY]
    if state.selected:
        return state.selected
    if state.replay is not None:
        state.profiles = state.replay.profiles()
        state.selected = list(state.replay.profile_names)
        return state.selected
    path = config.getoption("vpmu_profiles_file")
    try:
        state.profiles = load_profiles(path)
        names = config.getoption("vpmu_profiles")
        for name in names:
            select_profile(state.profiles, name, path)
    except UsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    if config.getoption("vpmu_plan") is not None:
        # The plan shows every profile (an unavailable one with its reason); it never asks this host's QEMU.
        state.selected = list(names or state.profiles)
        return state.selected
    if not names:
        accel, facts = _accel(config), _host_facts(config)
        names = [
            name
            for name, profile in state.profiles.items()
            if profile.applies_to(accel) and first_unmet(profile.requires, Context(accel, facts, profile)) is None
        ]
    _reject_property_typos(config, [state.profiles[n] for n in names], path)
    state.selected = names
    return names


def _selected_loads(config: pytest.Config) -> list[str]:
    state = config.stash[STATE_KEY]
    if state.replay is not None:
        state.selected_loads = list(state.replay.load_names)
    elif not state.selected_loads:
        path = config.getoption("vpmu_loads_file")
        try:
            state.loads = load_loads(path)
            names, all_loads = config.getoption("vpmu_loads"), config.getoption("vpmu_all_loads")
            if config.getoption("vpmu_plan") is not None:
                names, all_loads = [IDLE], False  # a plan is the idle baseline's
            state.selected_loads = select_loads(state.loads, names, all_loads, path)
        except UsageError as exc:
            raise pytest.UsageError(str(exc)) from None
    return state.selected_loads


def _reject_property_typos(config: pytest.Config, profiles: list[Profile], path: Path) -> None:
    """A -cpu property that neither this QEMU nor any QEMU we know has is a typo: a usage error, before any boot."""
    accel = _accel(config)
    for profile in profiles:
        if not profile.applies_to(accel):
            continue
        cpu_text = profile.cpu_for(accel)
        try:
            caps = probe_cpu_caps(cpu_text, accel)
        except HarnessError as exc:
            raise pytest.UsageError(f"{path}: [{profile.name}]: QEMU cannot check -cpu {cpu_text}: {exc}") from None
        typos = caps.typos(CpuModel.parse(cpu_text))
        if typos:
            field_name = "cpu" if accel == "kvm" else "tcg_cpu (default: cpu with host -> max)"
            raise pytest.UsageError(f"{path}: [{profile.name}]: field '{field_name}': unknown -cpu property "
                                    f"'{typos[0]}'{caps.suggestion(typos[0])}")  # fmt: skip


def pytest_report_header(config: pytest.Config) -> list[str]:
    facts = _host_facts(config)
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
    for argname, select in (("vpmu_profile", _selected_profiles), ("vpmu_load", _selected_loads)):
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
    facts = _host_facts(config)
    accel = config.getoption("vpmu_accel") or facts["accel"]
    if accel == "kvm" and facts["accel"] != "kvm":
        raise pytest.UsageError(f"--accel kvm: KVM is not usable on that host ({facts.get('accel_reason')})")
    nodes: dict[str, list[tuple[str, Any]]] = {name: [] for name in state.selected}
    for item in items:
        profile, _load, check_id, _feature = _check_identity(item)
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
        profile, load, check_id, _feature = _check_identity(item)
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


def _check_identity(item: pytest.Item) -> tuple[str, str, str, str]:
    """(profile, load, check id, feature) of an item, from its parameters and its check/feature markers."""
    params: dict[str, Any] = dict(getattr(item, "callspec", None).params) if hasattr(item, "callspec") else {}
    profile = str(params.pop("vpmu_profile", "-"))
    load = str(params.pop("vpmu_load", IDLE))
    marker = item.get_closest_marker("check")
    template = marker.args[0] if marker else getattr(item, "originalname", item.name).removeprefix("test_")
    check_id = template.format(**params)
    feature_marker = item.get_closest_marker("feature")
    feature = feature_marker.args[0] if feature_marker else "other"
    return profile, load, check_id, feature


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if "vpmu_profile" not in getattr(item, "fixturenames", ()):
        return
    state = item.config.stash[STATE_KEY]
    profile, load, check_id, feature = _check_identity(item)
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
    checks_by_run = _final_checks(state)
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


def _final_checks(state: SessionState) -> list[tuple[tuple[str, str], list[dict[str, Any]]]]:
    """The checks to report, per (profile, load): this session's, or (rejudge) the rejudged document's."""
    if state.rejudged is not None:
        return [((r["profile"], r["load"]), r["checks"]) for r in state.rejudged["runs"]]
    return [(key, [c.to_json() for c in checks]) for key, checks in state.checks.items()]


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
        _write_results(config, state)
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
            _publish_junit(state, Path(xml.logfile), finished)
            xml.logfile = state.junit_target
    if state.output_error:
        session.exitstatus = pytest.ExitCode.USAGE_ERROR


def _publish_junit(state: SessionState, written: Path, finished: bool) -> None:
    """Rename pytest's finished junit file over the target; remove it when pytest could not finish writing it."""
    assert state.junit_target is not None
    try:
        if finished and written.is_file():
            outputs.publish(written, Path(state.junit_target))
    except OutputError as exc:
        state.output_error = str(exc)
    finally:
        outputs.discard(written)


def _write_results(config: pytest.Config, state: SessionState) -> None:
    """results.json (this run's, or rejudge's document) and matrix.md / matrix.html beside it."""
    path = config.getoption("vpmu_results")
    if state.replay is not None:
        state.rejudged = _rejudged_document(config, state)
        if path:
            state.document = state.rejudged
            results.write(Path(path), state.rejudged)
            render.write(matrix.build([state.rejudged]), Path(path).parent)
        return
    if not path:
        return
    accel = _accel(config)
    log_root = config.getoption("vpmu_log_dir")
    runs = []
    for name in state.selected:
        run = state.runs.get(name)
        for load in state.selected_loads or [IDLE]:
            if (name, load) not in state.checks:
                continue
            inputs = run.stored_inputs(load) if run else {}
            load_inputs = state.load_inputs.get((name, load))
            if load_inputs is not None:
                load_inputs = {**load_inputs, "exits_read": inputs.get("exits_read")}
            runs.append({
                "profile": name,
                "load": load,
                "accel": accel,
                "boot_s": round(run.boot_s, 3) if run and run.boot_s is not None else None,
                "profile_def": profile_json(state.profiles[name]),
                "guest": run.summary() if run else {"boot_error": state.boot_failures.get(name)},
                "host_load": state.load_results.get((name, load)),
                "probes": inputs.get("probes"),
                "branch_maps": inputs.get("branch_maps"),
                "load_inputs": load_inputs,
                "logs_incomplete": outputs.incomplete_logs(log_root / name) if log_root else [],
                "checks": [c.to_json() for c in state.checks[(name, load)]],
            })  # fmt: skip
    document = results.build(_host_facts(config), runs)
    state.document = document
    results.write(Path(path), document)
    render.write(matrix.build([document]), Path(path).parent)


def _rejudged_document(config: pytest.Config, state: SessionState) -> dict[str, Any]:
    """The stored document with every check decided again where its inputs allow, kept (and marked) otherwise."""
    replay = state.replay
    assert replay is not None
    runs = []
    for stored_run in replay.document["runs"]:
        key = (stored_run["profile"], stored_run["load"])
        judged = {c.id: c.to_json() for c in state.checks.get(key, [])}
        gap = replay.gap(*key)
        checks = []
        for stored in stored_run["checks"]:
            if stored["id"] in judged:
                checks.append(judged[stored["id"]])
                continue
            if gap is not None:
                why = gap
            elif stored["id"] not in state.collected.get(key, set()):
                why = "no such check in today's suite (renamed or removed), or deselected (-k/-m)"
            else:
                why = "not judged in this session (interrupted?)"
            checks.append({**stored, "rejudged": False, "rejudge_reason": why})
        runs.append({**stored_run, "checks": checks})
    document = results.build(replay.host, runs)
    document["rejudge"] = {"source": str(replay.source), "source_schema": replay.schema,
                           "host_facts": str(replay.host_source) if replay.host_source else None}  # fmt: skip
    return document


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


# --- fixtures ---------------------------------------------------------------------------------------------


class CheckError(HarnessError):
    """A check could not be judged (its probe failed); reported as ERROR, not FAIL."""


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
    return _host_facts(pytestconfig)


@pytest.fixture(scope="session")
def accel(pytestconfig: pytest.Config) -> str:
    """The accelerator guests use: ``--accel`` if given (kvm only where usable), else doctor's choice."""
    return _accel(pytestconfig)


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
    if _offline(pytestconfig):
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
        coexist_depth.start_before_boot(load, profile_run)  # the guest is shut down and booted again under the load
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
    or an expectation of its ``expects`` marker does not hold (harness.plan: ``plan`` decides with the same
    functions)."""
    node = request.node
    profile, load, check_id, feature = _check_identity(node)
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
