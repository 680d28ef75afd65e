"""pytest plugin of the vpmu suite: options, markers, one booted guest per profile, and the results file.

Order: options, configure, collection, report hooks, fixtures. Per-run state lives in ``config.stash``.
A check is a test that calls ``check.judge(verdict, measurements)``; the plugin turns the verdict into the pytest
outcome (PASS, SKIP with its reason, FAIL) and into a ``results.json`` entry. A probe or guest failure inside a
check, or a guest that does not boot (fixture setup), is recorded as ``error`` with the serial-log tail.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness import hostfacts, matrix, render, results
from harness.cpu_model import CpuModel
from harness.errors import GuestError, HarnessError, UsageError
from harness.expectations import Context, first_unmet
from harness.image import Image, build_image, find_or_build_image
from harness.loads import DEFAULT_LOADS_FILE, IDLE, HostLoad, LoadSpec, load_loads, select_loads
from harness.probes import ProbeError
from harness.profile_run import ProfileRun
from harness.profiles import ACCELS, DEFAULT_PROFILES_FILE, Profile, load_profiles, select_profile
from harness.qemu_cpu import probe_cpu_caps
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


@dataclass
class SessionState:
    profiles: dict[str, Profile] = field(default_factory=dict)
    selected: list[str] = field(default_factory=list)
    loads: dict[str, LoadSpec] = field(default_factory=dict)
    selected_loads: list[str] = field(default_factory=list)
    runs: dict[str, ProfileRun] = field(default_factory=dict)
    checks: dict[tuple[str, str], list[results.CheckResult]] = field(default_factory=dict)
    load_results: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    boot_failures: dict[str, str] = field(default_factory=dict)
    usage_error: str | None = None


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


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "integration: boots a real guest under QEMU (TCG here, KVM where usable)",
        "requires_pmu: the check needs a vPMU in the guest (SKIPs with the reason where there is none)",
        "intel: the check applies to Intel guests only",
        "amd: the check applies to AMD guests only",
        "feature(name): the vPMU feature the check belongs to (a row group of the matrix)",
        "check(id): the check's id in results.json; {param} placeholders take the test's parameters",
    ):
        config.addinivalue_line("markers", line)
    config.stash[STATE_KEY] = SessionState()


def _host_facts(config: pytest.Config) -> dict[str, Any]:
    if HOST_FACTS_KEY not in config.stash:
        config.stash[HOST_FACTS_KEY] = hostfacts.collect()
    return config.stash[HOST_FACTS_KEY]


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
    path = config.getoption("vpmu_profiles_file")
    try:
        state.profiles = load_profiles(path)
        names = config.getoption("vpmu_profiles")
        for name in names:
            select_profile(state.profiles, name, path)
    except UsageError as exc:
        raise pytest.UsageError(str(exc)) from None
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
    if not state.selected_loads:
        path = config.getoption("vpmu_loads_file")
        try:
            state.loads = load_loads(path)
            state.selected_loads = select_loads(state.loads, config.getoption("vpmu_loads"),
                                                config.getoption("vpmu_all_loads"), path)  # fmt: skip
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
    cpu = facts["cpu"]
    caps = cpu.get("caps") or {}
    return [
        f"vpmu: accel={facts['accel']} ({facts['accel_reason']})",
        f"vpmu: host {cpu.get('vendor')} family {caps.get('family', '?')} model {caps.get('model', '?')}, "
        f"kernel {facts['kernel']}, QEMU {facts['qemu']['version']}, kvm.enable_pmu={facts['kvm']['enable_pmu']}, "
        f"nmi_watchdog={facts['perf']['nmi_watchdog']}, vPMU mode {facts['vpmu_mode']}",
    ]


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
    """Profile-major, then load: each guest boots once and each host load starts once per profile."""
    state = config.stash[STATE_KEY]

    def rank(item: pytest.Item) -> tuple[int, int]:
        params = getattr(getattr(item, "callspec", None), "params", {})
        profile, load = params.get("vpmu_profile"), params.get("vpmu_load")
        p = state.selected.index(profile) if profile in state.selected else -1
        q = state.selected_loads.index(load) if load in state.selected_loads else -1
        return p, q

    items.sort(key=rank)


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
            result = results.CheckResult(check_id, record.feature, v.status, v.reason, v.expected, v.observed,
                                         round(report.duration, 3), record.measurements)  # fmt: skip
        elif report.failed:
            result = results.CheckResult(check_id, feature, "error", _exception_text(call.excinfo),
                                         duration_s=round(report.duration, 3))  # fmt: skip
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            result = results.CheckResult(check_id, feature, "skip", reason.removeprefix("Skipped: "))
        else:
            result = results.CheckResult(check_id, feature, "error", "check recorded no verdict")
    if result is not None:
        state.checks.setdefault((profile, load), []).append(result)


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
    if not state.checks:
        return
    counts = dict.fromkeys(results.STATUSES, 0)
    terminalreporter.section("vpmu checks")
    for (profile, load), checks in state.checks.items():
        for c in checks:
            counts[c.status] += 1
            reason = c.reason.splitlines()[0] if c.reason else ""
            terminalreporter.write_line(f"{c.status.upper():5} {profile}/{load}  {c.id}  {reason}"[:200])
    total = sum(counts.values())
    terminalreporter.write_line(
        f"SUMMARY: {total} checks, {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped, "
        f"{counts['error']} errors"
    )
    path = config.getoption("vpmu_results")
    if path:
        terminalreporter.section("vpmu matrix")
        for line in render.compact(matrix.build([results.load(Path(path))])):
            terminalreporter.write_line(line)
        out = Path(path).parent
        terminalreporter.write_line(f"reports: {path} {out / 'matrix.md'} {out / 'matrix.html'}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    path = config.getoption("vpmu_results")
    if not path or STATE_KEY not in config.stash:
        return
    state = config.stash[STATE_KEY]
    accel = _accel(config)
    runs = []
    for name in state.selected:
        run = state.runs.get(name)
        for load in state.selected_loads or [IDLE]:
            if (name, load) not in state.checks:
                continue
            runs.append({
                "profile": name,
                "load": load,
                "accel": accel,
                "boot_s": round(run.boot_s, 3) if run and run.boot_s is not None else None,
                "guest": run.summary() if run else {"boot_error": state.boot_failures.get(name)},
                "host_load": state.load_results.get((name, load)),
                "checks": [c.to_json() for c in state.checks[(name, load)]],
            })  # fmt: skip
    document = results.build(_host_facts(config), runs)
    results.write(Path(path), document)
    render.write(matrix.build([document]), Path(path).parent)


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
        if verdict.status == "skip":
            pytest.skip(verdict.reason)
        if verdict.status == "fail":
            pytest.fail(verdict.reason, pytrace=False)
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
    pytestconfig: pytest.Config, vpmu_profile: str, guest_image: Image, accel: str, host_facts: dict[str, Any]
) -> Iterator[ProfileRun]:
    """The profile's guest, booted once for the session (or 'unavailable' with the reason)."""
    state = pytestconfig.stash[STATE_KEY]
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
    pytestconfig: pytest.Config, vpmu_load: str, profile_run: ProfileRun, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HostLoad | None]:
    """The host perf load, running for the whole check group of (profile, load); stopped and recorded after."""
    state = pytestconfig.stash[STATE_KEY]
    profile_run.load = vpmu_load
    if profile_run.unavailable or profile_run._guest is None:
        yield None
        return
    log_root = pytestconfig.getoption("vpmu_log_dir")
    log_dir = (log_root / profile_run.profile.name / "loads") if log_root else tmp_path_factory.mktemp("loads")
    tids, cpus = profile_run.vcpu_threads()
    exits_before = profile_run.vm_exits()
    start = time.monotonic()
    load = HostLoad(state.loads[vpmu_load], log_dir, tids, cpus)
    load.exits_before = exits_before
    load.start()
    try:
        yield load
    finally:
        load.stop()
        seconds = time.monotonic() - start
        exits = profile_run.vm_exits() if profile_run._guest is not None else None
        delta = exits - exits_before if exits is not None and exits_before is not None else None
        state.load_results[(profile_run.profile.name, vpmu_load)] = {
            **load.result.to_json(), "group_s": round(seconds, 3), "vm_exits": delta,
            "vm_exits_per_s": round(delta / seconds, 1) if delta is not None and seconds > 0 else None,
        }  # fmt: skip


@pytest.fixture
def check(request: pytest.FixtureRequest, profile_run: ProfileRun, host_load: HostLoad | None) -> CheckRecorder:
    """The recorder a check reports its verdict to; SKIPs at once when the profile cannot run here."""
    profile, load, check_id, feature = _check_identity(request.node)
    record = CheckRecord(profile, load, check_id, feature)
    request.node.stash[CHECK_KEY] = record
    if profile_run.unavailable:
        pytest.skip(profile_run.unavailable)
    if host_load is not None and host_load.result.status in ("unavailable", "refused") and check_id != HOST_LOAD_CHECK:
        # The scenario cannot run here: its checks SKIP with perf's own words (the load check itself still
        # judges the refusal, which the mediated vPMU requires for include-guest events).
        pytest.skip(f"host-load: {host_load.result.reason}")
    view = profile_run.view
    if view is not None:
        if request.node.get_closest_marker("intel") and not view.intel:
            pytest.skip(f"not-applicable: Intel-only check (guest vendor {view.caps.vendor})")
        if request.node.get_closest_marker("amd") and not view.amd:
            pytest.skip(f"not-applicable: AMD-only check (guest vendor {view.caps.vendor})")
    return CheckRecorder(record)
