"""One pytest session of the suite: its state, which profiles and loads it runs, and each check's identity.

The state lives in ``config.stash`` (STATE_KEY) and is shared by the plugin's hooks, its fixtures and the results
they write. Profiles and loads are selected once per session: ``--profile`` / ``--load`` names are validated against
their files, and a profile's ``-cpu`` properties are checked against this QEMU before anything boots (a typo is a
usage error, not a SKIP). Plan (``--vpmu-plan``) and rejudge (``--vpmu-replay``) read the host facts from a file
and never ask this host's QEMU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.cpu.model import CpuModel
from harness.cpu.profile import Profile
from harness.errors import HarnessError, UsageError
from harness.guest.qemu_cpu import probe_cpu_caps
from harness.host import hostfacts
from harness.host.loads import IDLE, LoadSpec, load_loads, select_loads
from harness.judge import plan
from harness.judge.expectations import Context, first_unmet
from harness.judge.verdict import Verdict
from harness.report import results
from harness.suite.profile_run import ProfileRun
from harness.suite.profiles import load_profiles, select_profile
from harness.suite.replay import Replay

HOST_FACTS_KEY = pytest.StashKey[dict[str, Any]]()
STATE_KEY = pytest.StashKey["SessionState"]()
CHECK_KEY = pytest.StashKey["CheckRecord"]()


class CheckError(HarnessError):
    """A check could not be judged (its probe failed); reported as ERROR, not FAIL."""


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


def session_host_facts(config: pytest.Config) -> dict[str, Any]:
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


def offline(config: pytest.Config) -> bool:
    """Plan or rejudge: nothing may boot, build an image or ask this host's QEMU."""
    return config.getoption("vpmu_plan") is not None or config.stash[STATE_KEY].replay is not None


def session_accel(config: pytest.Config) -> str:
    facts = session_host_facts(config)
    choice = hostfacts.AccelChoice(facts["accel"], facts["accel_reason"])
    try:
        return hostfacts.resolve_accel(config.getoption("vpmu_accel"), choice)
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None


def selected_profiles(config: pytest.Config) -> list[str]:
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
        accel, facts = session_accel(config), session_host_facts(config)
        names = [
            name
            for name, profile in state.profiles.items()
            if profile.applies_to(accel) and first_unmet(profile.requires, Context(accel, facts, profile)) is None
        ]
    _reject_property_typos(config, [state.profiles[n] for n in names], path)
    state.selected = names
    return names


def selected_loads(config: pytest.Config) -> list[str]:
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
    accel = session_accel(config)
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


def check_identity(item: pytest.Item) -> tuple[str, str, str, str]:
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
