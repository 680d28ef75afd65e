"""Rejudge: give the checks of a stored run the values they read back then, so today's rules decide again.

A schema ``vpmu-results/2`` run keeps what its checks read: each probe's records by memo key (``probes``), the
guest view's inputs (``guest.view``: the enum records, kernel PMUs, banner, sysfs), the profile's table
(``profile_def``), the branch maps of the LBR probe (``branch_maps``) and the host load as the co-existence checks
saw it (``load_inputs``). :class:`ReplayRun` and :class:`ReplayLoad` offer the interface of ProfileRun and of the
host load that the guest tests use, backed by those records, so ``python -m harness rejudge`` runs the very same
test functions (harness.suite.pytest_plugin ``--vpmu-replay``). Where an input is not stored (schema /1, a probe that
failed, a guest that did not boot) the check keeps its stored verdict and says why (:class:`ReplayGap`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.cpu.profile import Profile
from harness.errors import HarnessError
from harness.host.loads import AFTER_BOOT, IDLE, HostLoad, LoadResult, LoadSpec
from harness.probe.branch_map import BranchMap, BranchSite
from harness.probe.guest_view import GuestView, view_from
from harness.probe.runner import ProbeRun
from harness.report.results import SCHEMA_V1
from harness.suite.profile_run import RunExpectations

SCHEMA_1_GAP = ("schema vpmu-results/1 stores no probe records, guest-view inputs or host-load reads; re-run the "
                "suite to re-judge it")  # fmt: skip
LOAD_RESULT_FIELDS = {f.name for f in dataclasses.fields(LoadResult)}


class ReplayGap(HarnessError):
    """A check needs an input the stored run does not have: it keeps its stored verdict, with this reason."""


def profile_json(profile: Profile) -> dict[str, Any]:
    """The profile's table as results.json keeps it (``profile_def``)."""
    return {"name": profile.name, "description": profile.description, "cpu": profile.cpu,
            "tcg_cpu": profile.tcg_cpu, "accels": list(profile.accels), "requires": list(profile.requires),
            "smp": profile.smp}  # fmt: skip


def profile_from(run: dict[str, Any]) -> Profile:
    """The stored profile of a run; a schema /1 run has none: a stand-in from its -cpu (nothing judges with it)."""
    table = run.get("profile_def")
    if table:
        return Profile(table["name"], table["description"], table["cpu"], table["tcg_cpu"], tuple(table["accels"]),
                       tuple(table.get("requires", ())), int(table.get("smp", 1)))  # fmt: skip
    cpu = (run.get("guest") or {}).get("cpu") or "host"
    return Profile(run["profile"], "(not stored)", cpu, cpu, (run["accel"],))


def load_spec_json(spec: LoadSpec) -> dict[str, Any]:
    return {"name": spec.name, "description": spec.description, "command": list(spec.command),
            "counts_guest": spec.counts_guest, "start": spec.start, "mux_sweep": list(spec.mux_sweep)}  # fmt: skip


class RecordingLoad:
    """The live host load as the checks see it; remembers what they read (the running summary, the load's state
    at that moment, the group's age) so a rejudge can give the same values back."""

    def __init__(self, load: HostLoad) -> None:
        self._load = load
        self.reads: dict[str, Any] = {}

    @property
    def spec(self) -> LoadSpec:
        return self._load.spec

    @property
    def result(self) -> LoadResult:
        return self._load.result

    @property
    def exits_before(self) -> int | None:
        return self._load.exits_before

    def snapshot(self) -> dict[str, dict[str, Any]]:
        found = self._load.snapshot()
        self.reads["snapshot"] = found
        self.reads["result"] = self._load.result.to_json()  # as the verdict sees it (snapshot may mark "died")
        return found

    def elapsed_s(self) -> float:
        value = self._load.elapsed_s()
        self.reads["elapsed_s"] = round(value, 3)
        return value

    def read(self, key: str, measure: Callable[[], Any]) -> Any:
        """A measurement a check makes through the load (e.g. coexist.mux_cost's sweep), made once and kept in
        ``reads[key]`` for rejudge."""
        if key not in self.reads:
            self.reads[key] = measure()
        return self.reads[key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._load, name)

    def inputs(self) -> dict[str, Any]:
        """``load_inputs`` of results.json (the VM exits a check read are added by the run)."""
        return {"spec": load_spec_json(self.spec), "exits_before": self.exits_before, "reads": self.reads}


class ReplayLoad:
    """The host load of a stored run, answering as the live one answered the checks."""

    def __init__(self, spec: LoadSpec, result: LoadResult, exits_before: int | None, reads: dict[str, Any]) -> None:
        self.spec = spec
        self.result = result
        self.exits_before = exits_before
        self.reads = reads

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.reads.get("snapshot") or {}

    def elapsed_s(self) -> float:
        return float(self.reads.get("elapsed_s") or 0.0)

    def read(self, key: str, measure: Callable[[], Any]) -> Any:
        """The stored measurement (``measure`` is never called: rejudge measures nothing).

        :raises ReplayGap: the original run stored none under ``key``.
        """
        if key not in self.reads:
            raise ReplayGap(f"the original run stored no {key} for load {self.spec.name}")
        return self.reads[key]


def _load_result(run: dict[str, Any], reads: dict[str, Any]) -> LoadResult:
    data = reads.get("result") or run.get("host_load") or {"name": run["load"]}
    return LoadResult(**{k: v for k, v in data.items() if k in LOAD_RESULT_FIELDS})


def _branch_map(stored: dict[str, Any] | None) -> BranchMap | None:
    if stored is None:
        return None
    sites = {int(a, 16): BranchSite(kind, target) for a, (kind, target) in stored["sites"].items()}
    return BranchMap(sites, {name: (lo, hi) for name, (lo, hi) in stored["ranges"].items()})


class ReplayRun(RunExpectations):
    """A profile's stored guest: the interface of harness.suite.profile_run.ProfileRun the guest tests use."""

    def __init__(self, runs: list[dict[str, Any]], host: dict[str, Any], gap: str | None) -> None:
        first = runs[0]
        guest = first.get("guest") or {}
        self.profile = profile_from(first)
        self.accel = first["accel"]
        self.host = host
        self.features = guest.get("features") or {}
        self.unavailable = guest.get("unavailable")
        self.boot_error = guest.get("boot_error")
        self.boot_s = first.get("boot_s")
        self.pinning = guest.get("pinning") or {}
        self.load = IDLE
        self.gap = gap
        self._guest_summary = guest
        self._probes: dict[str, dict[str, Any]] = {}
        self._maps: dict[str, dict[str, Any]] = {}
        self._exits: dict[str, int | None] = {}
        for run in runs:
            self._probes.update(run.get("probes") or {})
            self._maps.update(run.get("branch_maps") or {})
            self._exits[run["load"]] = (run.get("load_inputs") or {}).get("exits_read")
        self.view = self._view(guest.get("view")) if gap is None else None

    @staticmethod
    def _view(stored: dict[str, Any] | None) -> GuestView | None:
        if not stored or "records" not in stored:
            return None
        enum = ProbeRun("enum", stored["records"], "", 0.0)
        return view_from(enum, stored.get("kernel_pmus") or [], stored.get("kernel_banner") or "", stored.get("sysfs"))

    def probe(self, name: str, params: dict[str, Any] | None = None, key: str | None = None, cpu: int = 0) -> ProbeRun:
        """The stored run of probe ``name`` under the current load (``cpu`` is part of the stored ``key``).

        :raises ReplayGap: the probe did not run then (the check was gated before measuring) or it failed.
        """
        memo = f"{self.load}/{key or name}"
        entry = self._probes.get(memo)
        if entry is None:
            raise ReplayGap(f"probe {name} did not run under {self.load} in the original run (nothing measured)")
        if entry.get("error"):
            raise ReplayGap(f"probe {name} failed in the original run: {entry['error'].splitlines()[0]}")
        return ProbeRun(entry["name"], entry["records"], "", entry.get("duration_s") or 0.0)

    def measure(self, name: str, measure: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """What a life-cycle check measured in the original run (ProfileRun.measure), never measured again.

        :raises ReplayGap: nothing was stored under ``name`` for this load, or the step failed then.
        """
        return list(self.probe(name, key=name).records)

    def cached_probe(self, load: str, name: str) -> ProbeRun | None:
        entry = self._probes.get(f"{load}/{name}")
        if entry is None or entry.get("error"):
            return None
        return ProbeRun(entry["name"], entry["records"], "", entry.get("duration_s") or 0.0)

    def branch_map(
        self, probe: str, functions: tuple[str, ...], params: dict[str, Any] | None = None
    ) -> BranchMap | None:
        """The branch map the original run computed from the probe binary that ran in its guest.

        :raises ReplayGap: no map was stored for these functions.
        """
        stored = self._maps.get(f"{self.load}/{probe}")
        if stored is None or tuple(stored.get("functions", ())) != tuple(functions):
            raise ReplayGap(f"no branch map of {', '.join(functions)} in probe {probe} was stored")
        return _branch_map(stored.get("map"))

    def vm_exits(self) -> int | None:
        return self._exits.get(self.load)

    def vcpu_threads(self) -> tuple[list[int], list[int]]:
        tids = [int(v["thread"]) for v in self.pinning.get("vcpus", [])]
        cpus = [int(v["cpu"]) for v in self.pinning.get("vcpus", []) if v.get("cpu") is not None]
        return tids, cpus

    def summary(self) -> dict[str, Any]:
        return self._guest_summary


def _gap(schema: str, run: dict[str, Any]) -> str | None:
    """Why a stored run cannot be re-judged (None: it can)."""
    if schema == SCHEMA_V1:
        return SCHEMA_1_GAP
    guest = run.get("guest") or {}
    if guest.get("unavailable"):
        return f"the profile did not run then ({guest['unavailable'].splitlines()[0]})"
    if guest.get("boot_error") or not guest.get("view"):
        return "the guest did not boot or its view was not read in the original run"
    if "records" not in guest["view"] or run.get("probes") is None or run.get("load_inputs") is None:
        return "the run stores no guest-view records, probe records or host-load inputs"
    return None


class Replay:
    """A stored results document, as the pytest plugin replays it: runs by (profile, load) and what each lacks."""

    def __init__(self, document: dict[str, Any], source: Path, host: dict[str, Any] | None = None,
                 host_source: Path | None = None) -> None:  # fmt: skip
        self.document = document
        self.source = source
        self.schema = document["schema"]
        self.host = host if host is not None else document["host"]
        self.host_source = host_source
        self.runs: dict[tuple[str, str], dict[str, Any]] = {(r["profile"], r["load"]): r for r in document["runs"]}
        self.profile_names = list(dict.fromkeys(r["profile"] for r in document["runs"]))
        self.load_names = list(dict.fromkeys(r["load"] for r in document["runs"]))
        self._runs: dict[str, ReplayRun] = {}

    def gap(self, profile: str, load: str) -> str | None:
        return _gap(self.schema, self.runs[(profile, load)])

    def profiles(self) -> dict[str, Profile]:
        return {name: profile_from(next(r for r in self.document["runs"] if r["profile"] == name))
                for name in self.profile_names}  # fmt: skip

    def stored_check(self, profile: str, load: str, check_id: str) -> dict[str, Any] | None:
        run = self.runs.get((profile, load))
        return next((c for c in run["checks"] if c["id"] == check_id), None) if run else None

    def profile_run(self, profile: str) -> ReplayRun:
        if profile not in self._runs:
            runs = [r for r in self.document["runs"] if r["profile"] == profile]
            gaps = [_gap(self.schema, r) for r in runs]
            self._runs[profile] = ReplayRun(runs, self.host, next((g for g in gaps if g), None) if all(gaps) else None)
        return self._runs[profile]

    def host_load(self, profile: str, load: str) -> ReplayLoad | None:
        """The load of a run as its checks saw it; None where the guest did not run (as live)."""
        run = self.runs[(profile, load)]
        if _gap(self.schema, run) is not None:
            return None
        inputs = run.get("load_inputs") or {}
        spec_json = inputs.get("spec") or {"name": load, "description": ""}
        spec = LoadSpec(spec_json["name"], spec_json.get("description", ""), tuple(spec_json.get("command", ())),
                        bool(spec_json.get("counts_guest", False)), spec_json.get("start", AFTER_BOOT),
                        tuple(spec_json.get("mux_sweep", ())))  # fmt: skip
        reads = inputs.get("reads") or {}
        return ReplayLoad(spec, _load_result(run, reads), inputs.get("exits_before"), reads)
