"""Host perf load scenarios: load them from ``loads.toml``, and run one on the host around a check group.

A load is a real ``perf`` command in its own process group (and with PR_SET_PDEATHSIG, so it never outlives the
harness), its output kept in the load's log directory. Before starting:

- an include-guest load (``counts_guest``) first asks the kernel directly (harness/host/mediated_probe.py) whether it
  refuses include-guest events (the mediated vPMU: EOPNOTSUPP); perf's own words cannot tell that apart from other
  failures, so they are kept only as evidence;
- the load's events are tried once with ``perf stat -e EVENTS`` on the load's CPUs: events this host cannot count
  make the scenario unavailable with perf's own words, instead of a load that silently measures nothing (``perf
  stat`` keeps running with ``<not supported>``, ``perf record`` quietly falls back to cpu-clock).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.datafiles import check_table, read_toml
from harness.errors import UsageError
from harness.host import mediated_probe
from harness.host.mux_interval import CORE_PMUS, MuxGuard, restore_stale
from harness.host.perf_output import SampleCounter, error_message, event_key, parse_stat_csv, record_samples, summarize
from harness.lifetime import dies_with_parent, exit_text, phase, process_state
from harness.paths import GUEST_TESTS_DIR

LOG = logging.getLogger(__name__)
DEFAULT_LOADS_FILE = GUEST_TESTS_DIR / "loads.toml"
IDLE = "idle"
LOAD_KEYS: dict[str, tuple[type, bool, str]] = {
    "description": (str, True, "one line: what the load does to the host PMU"),
    "command": (list, False, 'argv of the perf command, e.g. ["perf", "stat", "-a", ...] (absent: no load)'),
    "counts_guest": (bool, False, "true exactly when a hardware event counts guest time (:G or :GH)"),
    "start": (str, False, '"after-boot" (default: the load starts once the guest runs) or "before-boot" (the load '
              "starts first, then KVM creates the VM: coexist.load_before_boot)"),
    "mux_sweep": (list, False, "perf_event_mux_interval_ms values in ms (>= 1, at least two) to sweep on every host "
                  "core PMU while this multiplexing load runs (coexist.mux_cost)"),
}  # fmt: skip
PLACEHOLDERS = ("vcpu_tids", "vcpu_cpus", "output")
#: Placeholders that also take an index, ``{vcpu_tids[0]}``: one vCPU's thread or host CPU (per-vCPU loads).
INDEXED_PLACEHOLDERS = ("vcpu_tids", "vcpu_cpus")
#: ``{name}`` or ``{name[i]}`` in a command word (a perf event group "{a,b}:D" is neither).
PLACEHOLDER_RE = re.compile(r"\{([a-z_]+)(?:\[(\d+)\])?\}")
AFTER_BOOT = "after-boot"
BEFORE_BOOT = "before-boot"
STARTS = (AFTER_BOOT, BEFORE_BOOT)
READY_TIMEOUT_S = 10.0
#: A load without interval output counts as started once it survives this long (a bad option exits at once).
READY_GRACE_S = 0.3
STOP_TIMEOUT_S = 10.0
PRECHECK_TIMEOUT_S = 20.0

#: Event modifiers perf accepts after ':' (tools/perf/util/parse-events.l ``modifier_event``; newer perf adds a
#: few letters, all accepted here). G and H set exclude_host/exclude_guest (parse-events.c get_event_modifier()).
MODIFIERS = re.compile(r"[ukhpPGHSDIWebRX]+")
#: perf's tool events (tools/perf/util/tool_pmu.c): counted by perf itself, no PMU.
TOOL_EVENTS = ("duration_time", "user_time", "system_time")


@dataclass(frozen=True)
class LoadEvent:
    """One event of a load's ``-e`` list, with the modifiers that apply to it (its own and its group's)."""

    text: str
    name: str
    pmu: str | None
    modifiers: str

    @property
    def kind(self) -> str:
        """``software`` (incl. perf's tool events), ``tracepoint``, ``core`` (the CPU's PMU) or ``other-pmu``."""
        if self.pmu is not None:
            inner = self.name[len(self.pmu) + 1 : -1]
            if self.pmu == "software" or inner in mediated_probe.SOFTWARE_EVENTS:
                return "software"
            # Only the core PMUs carry PERF_PMU_CAP_MEDIATED_VPMU; events of others (uncore, msr, power, ibs_op,
            # ...) are never refused and may reject exclusion bits altogether (PERF_PMU_CAP_NO_EXCLUDE,
            # kernel/events/core.c).
            return "core" if self.pmu in CORE_PMUS else "other-pmu"
        if self.name in mediated_probe.SOFTWARE_EVENTS or self.name in TOOL_EVENTS:
            return "software"
        if ":" in self.name:
            return "tracepoint"
        # Generic hardware and cache names, raw rNNNN and named (JSON) core events all go to the CPU's PMU.
        return "core"

    @property
    def explicit_guest_host(self) -> bool:
        return "G" in self.modifiers or "H" in self.modifiers

    @property
    def counts_guest(self) -> bool:
        """A core event without exclude_guest: ``G`` in its modifiers (``:G`` guest only, ``:GH`` both)."""
        return self.kind == "core" and "G" in self.modifiers


def _split_top(text: str) -> list[str]:
    """Split at commas outside ``{...}`` groups and ``pmu/.../`` terms (which contain commas themselves)."""
    parts: list[str] = []
    current: list[str] = []
    depth, in_terms = 0, False
    for ch in text:
        if ch == "/":
            in_terms = not in_terms
        elif ch == "{" and not in_terms:
            depth += 1
        elif ch == "}" and not in_terms:
            depth -= 1
        if ch == "," and depth == 0 and not in_terms:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _event(text: str, group_modifiers: str = "") -> LoadEvent:
    """One event: ``name[:mods]``, ``pmu/terms/[mods]`` or ``subsystem:tracepoint``."""
    if "/" in text:
        pmu = text[: text.index("/")]
        head, tail = text[: text.rindex("/") + 1], text[text.rindex("/") + 1 :].lstrip(":")
        return LoadEvent(text, head, pmu, tail + group_modifiers)
    if ":" in text:
        head, tail = text.rsplit(":", 1)
        if MODIFIERS.fullmatch(tail):
            return LoadEvent(text, head, None, tail + group_modifiers)
    return LoadEvent(text, text, None, group_modifiers)


def parse_events(argument: str) -> list[LoadEvent]:
    """The events of one ``-e`` argument; a group ``{a,b}:mods`` gives its members the group's modifiers
    (parse-events.y: group modifiers are applied to every member)."""
    events = []
    for token in _split_top(argument):
        group = re.fullmatch(r"\{(.*)\}(?::?([A-Za-z]*))", token)
        if group:
            events += [_event(member, group.group(2) or "") for member in _split_top(group.group(1))]
        else:
            events.append(_event(token))
    return events


def _option_values(command: tuple[str, ...] | list[str], short: str, long: str) -> list[str]:
    """Values of ``-x VALUE``, ``--long VALUE`` and ``--long=VALUE`` in a command."""
    values = []
    for i, word in enumerate(command):
        if word in (short, long) and i + 1 < len(command):
            values.append(command[i + 1])
        elif word.startswith(long + "="):
            values.append(word.split("=", 1)[1])
    return values


@dataclass(frozen=True)
class LoadSpec:
    name: str
    description: str
    command: tuple[str, ...] = ()
    counts_guest: bool = False
    #: AFTER_BOOT (the guest runs first) or BEFORE_BOOT (the load exists when KVM creates the VM).
    start: str = AFTER_BOOT
    #: perf_event_mux_interval_ms values to sweep while this load runs (empty: no sweep).
    mux_sweep: tuple[int, ...] = ()

    @property
    def idle(self) -> bool:
        return not self.command

    @property
    def before_boot(self) -> bool:
        return self.start == BEFORE_BOOT

    @property
    def sampling(self) -> bool:
        """A ``perf record`` load: its evidence is samples in its output file, not counts."""
        return len(self.command) > 1 and self.command[1] == "record"

    def events(self) -> str | None:
        """The ``-e`` arguments of the command, comma-joined (what the pre-check tries), if any."""
        values = _option_values(self.command, "-e", "--event")
        return ",".join(values) if values else None

    def event_list(self) -> list[LoadEvent]:
        return [event for value in _option_values(self.command, "-e", "--event") for event in parse_events(value)]

    def include_guest_event(self) -> LoadEvent | None:
        """The first core event that counts guest time (the one the mediated-vPMU probe opens)."""
        return next((e for e in self.event_list() if e.counts_guest), None)

    def uses(self, placeholder: str) -> bool:
        """Whether the command uses ``{placeholder}`` or one of its indexed forms ``{placeholder[i]}``."""
        return any(name == placeholder for word in self.command for name, _index in PLACEHOLDER_RE.findall(word))

    def indexes(self, placeholder: str) -> list[int]:
        """The indexes of ``{placeholder[i]}`` in the command (per-vCPU loads), in order."""
        return [int(index) for word in self.command for name, index in PLACEHOLDER_RE.findall(word)
                if name == placeholder and index]  # fmt: skip

    def uses_whole(self, placeholder: str) -> bool:
        """Whether the command uses ``{placeholder}`` itself (every vCPU), not only indexed forms."""
        return "{" + placeholder + "}" in " ".join(self.command)


def target_options(argv: list[str]) -> list[str]:
    """The CPU target of a filled-in perf command (``-a``, ``-C LIST``), for the pre-check: paranoid and CPU
    availability are then tried as the load will meet them. Thread targets (``-t``/``-p``) are not copied: a
    sleeping thread gives ``<not counted>``, which says nothing about the events."""
    if "-a" in argv or "--all-cpus" in argv:
        return ["-a"]
    cpus = _option_values(argv, "-C", "--cpu")
    return ["-C", cpus[0]] if cpus else []


def _check_output(where: str, spec: LoadSpec) -> None:
    """Where the load's evidence goes: ``perf record`` must write to {output} (else perf.data lands in the
    harness's working directory, unbounded and unseen), ``perf stat`` to its stderr (the harness reads its counts
    there; ``-o FILE`` would hide them)."""
    outputs = _option_values(spec.command, "-o", "--output")
    if spec.sampling and outputs != ["{output}"]:
        raise UsageError(f"{where}: field 'command': a perf record load must write to {{output}} (-o {{output}})")
    if len(spec.command) > 1 and spec.command[1] == "stat" and outputs:
        raise UsageError(f"{where}: field 'command': a perf stat load must not use -o (the harness reads its counts "
                         "from perf's stderr)")  # fmt: skip


def _check_events(where: str, spec: LoadSpec) -> None:
    """R7: every core-PMU event says G or H; ``counts_guest`` says exactly whether one counts guest time."""
    for event in spec.event_list():
        if event.kind == "core" and not event.explicit_guest_host:
            raise UsageError(f"{where}: field 'command': event '{event.text}' has no G/H modifier: without one, "
                             "perf >= 6.12 retries an include-guest event the kernel refuses as host-only "
                             "(tools/perf/util/evsel.c evsel__fallback), so write it as "
                             f"{event.text}:H or {event.text}:GH")  # fmt: skip
    guest = spec.include_guest_event()
    if spec.counts_guest and guest is None:
        raise UsageError(f"{where}: field 'counts_guest' is true but no hardware event counts guest time "
                         "(:G or :GH)")  # fmt: skip
    if guest is not None and not spec.counts_guest:
        raise UsageError(f"{where}: field 'counts_guest' must be true: event '{guest.text}' counts guest time")


def _spec(path: Path, name: str, table: object) -> LoadSpec:
    where = f"{path}: [{name}]"
    table = check_table(where, table, LOAD_KEYS)
    command = table.get("command", [])
    if command:
        if not all(isinstance(w, str) for w in command) or command[0] != "perf":
            raise UsageError(f"{where}: field 'command' must be a list of strings starting with \"perf\"")
        for word in command:
            for placeholder, index in PLACEHOLDER_RE.findall(word):
                if placeholder not in PLACEHOLDERS:
                    allowed = ["{" + p + "}" for p in PLACEHOLDERS] + ["{" + p + "[N]}" for p in INDEXED_PLACEHOLDERS]
                    raise UsageError(f"{where}: field 'command': unknown placeholder {{{placeholder}}} "
                                     f"(allowed: {', '.join(allowed)})")  # fmt: skip
                if index and placeholder not in INDEXED_PLACEHOLDERS:
                    raise UsageError(f"{where}: field 'command': {{{placeholder}[{index}]}} takes no index (only "
                                     f"{', '.join('{' + p + '}' for p in INDEXED_PLACEHOLDERS)} do)")  # fmt: skip
    elif name != IDLE:
        raise UsageError(f"{where}: missing field 'command' (only [{IDLE}] runs no command)")
    spec = LoadSpec(name, table["description"], tuple(command), bool(table.get("counts_guest", False)),
                    _start(where, table), _mux_sweep(where, table))  # fmt: skip
    _check_events(where, spec)
    _check_output(where, spec)
    _check_phase(where, spec)
    return spec


def _start(where: str, table: dict[str, Any]) -> str:
    start = table.get("start", AFTER_BOOT)
    if start not in STARTS:
        raise UsageError(f"{where}: field 'start' is {start!r} (allowed: {', '.join(STARTS)})")
    return start


def _mux_sweep(where: str, table: dict[str, Any]) -> tuple[int, ...]:
    """perf_event_mux_interval_ms values: integers >= 1 (kernel/events/core.c perf_event_mux_interval_ms_store()
    rejects ``timer < 1`` with -EINVAL), at least two distinct ones (a curve), swept in ascending order."""
    values = table.get("mux_sweep")
    if values is None:
        return ()
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values) or len(set(values)) < 2:
        raise UsageError(f"{where}: field 'mux_sweep' must list at least two integers >= 1 (milliseconds; the kernel "
                         "rejects 0), e.g. [1, 4, 16, 100]")  # fmt: skip
    return tuple(sorted(set(values)))


def _check_phase(where: str, spec: LoadSpec) -> None:
    """A before-boot load starts before any vCPU thread exists, so it cannot name one; a sweep needs core events
    that rotate on the vCPU's CPU (software events never multiplex: perf_event_mux_interval_ms is the core PMU's)."""
    if spec.idle and (spec.before_boot or spec.mux_sweep):
        raise UsageError(f"{where}: the idle baseline takes no 'start' or 'mux_sweep' (it runs no load)")
    if spec.before_boot:
        for placeholder in INDEXED_PLACEHOLDERS:
            if spec.uses(placeholder):
                raise UsageError(f"{where}: field 'command': a before-boot load cannot use {{{placeholder}}}: no vCPU "
                                 "exists when it starts (use -a or -C with host CPU numbers)")  # fmt: skip
    if spec.mux_sweep and not any(event.kind == "core" for event in spec.event_list()):
        raise UsageError(f"{where}: field 'mux_sweep' needs hardware (core PMU) events to multiplex; this load has "
                         "none")  # fmt: skip


def load_loads(path: Path = DEFAULT_LOADS_FILE) -> dict[str, LoadSpec]:
    """Parse and validate a loads file; ``idle`` always exists.

    :raises UsageError: syntax error, unknown key or placeholder, missing field, a hardware event without G/H, a
        ``counts_guest`` that contradicts the events (one line naming file, load and field).
    """
    path = Path(path)
    data = read_toml(path, "loads file")
    loads = {name: _spec(path, name, table) for name, table in data.items()}
    loads.setdefault(IDLE, LoadSpec(IDLE, "No host perf activity: the baseline"))
    return loads


def select_loads(loads: dict[str, LoadSpec], names: list[str], all_loads: bool, path: Path) -> list[str]:
    """``--load`` names (validated), every load with ``--all-loads``, else idle only. The idle baseline, when
    selected, always runs first: the co-existence checks compare every other load with it."""
    if all_loads:
        names = list(loads)
    for name in names:
        if name not in loads:
            raise UsageError(f"{path}: no load '{name}' (known: {', '.join(loads)})")
    ordered = list(dict.fromkeys(names)) or [IDLE]
    # Before-boot loads last: each shuts the profile's guest down and boots a new one under the load, so the loads
    # that share the first boot run before any of them.
    return sorted(ordered, key=lambda n: (n != IDLE, loads[n].before_boot))


@dataclass
class LoadResult:
    """What a load did: for results.json and the co-existence checks."""

    name: str
    status: str = "idle"  # idle | running | unavailable | refused | stopped | died
    reason: str = ""
    command: list[str] = field(default_factory=list)
    counts_guest: bool = False
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    min_pct_running: float | None = None
    start_s: float = 0.0
    stop_s: float = 0.0
    returncode: int | None = None
    output: str | None = None
    #: The direct perf_event_open(2) answer for an include-guest load (harness.host.mediated_probe.RefusalProbe).
    probe: dict[str, Any] | None = None
    #: A before-boot load: the boot of the guest under it (harness.suite.before_boot.start_before_boot).
    before_boot: dict[str, Any] | None = None
    #: A sweep load: the perf_event_mux_interval_ms files it changed and restored (harness.host.mux_interval.MuxGuard).
    mux: dict[str, Any] | None = None
    #: The vCPU threads and host CPUs the placeholders were filled from (a before-boot load's group boots a new
    #: guest, whose threads the run's ``guest.pinning`` shows afterwards).
    vcpu_tids: list[int] = field(default_factory=list)
    vcpu_cpus: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _interval_s(spec: LoadSpec) -> float:
    """The load's ``perf stat -I`` interval in seconds (0 without one)."""
    values = _option_values(spec.command, "-I", "--interval-print")
    return int(values[0]) / 1000 if values and values[0].isdigit() else 0.0


def precheck(events: str, perf: str = "perf", target: list[str] | None = None) -> str | None:
    """Try ``events`` once (on ``target``, e.g. ``-a``); return why they cannot be counted here (perf's words), or
    None when they can. ``<not counted>`` is fine (the event opened but did not run: the other PMU of a hybrid
    host, or counters held by pinned events); ``<not supported>`` on every PMU's row of an event is not."""
    argv = [perf, "stat", "-x", ",", *(target or []), "-e", events, "--", "true"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PRECHECK_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"perf stat -e {events} did not finish in {PRECHECK_TIMEOUT_S:.0f} s"
    rows = parse_stat_csv(done.stderr)
    if done.returncode != 0 or not rows:
        return f"perf: {error_message(done.stderr) or done.stderr.strip()[-200:] or f'exit {done.returncode}'}"
    by_event: dict[str, list[str]] = {}
    for row in rows:
        by_event.setdefault(event_key(row.event), []).append(row.status)
    missing = [f"{event} <not supported>" for event, statuses in by_event.items()
               if all(s == "<not supported>" for s in statuses)]  # fmt: skip
    return "perf: " + ", ".join(missing) if missing else None


class HostLoad:
    """One load around one check group. ``with HostLoad(...) as load:``; ``load.result`` after the block."""

    def __init__(self, spec: LoadSpec, log_dir: Path, vcpu_tids: list[int], vcpu_cpus: list[int],
                 mux_pmus_dir: Path | None = None, mux_journal_dir: Path | None = None) -> None:  # fmt: skip
        self.spec = spec
        self.log_dir = Path(log_dir)
        self.vcpu_tids = list(vcpu_tids)
        self.vcpu_cpus = list(vcpu_cpus)
        self.values = {"vcpu_tids": ",".join(map(str, vcpu_tids)), "vcpu_cpus": ",".join(map(str, vcpu_cpus)),
                       "output": str(self.log_dir / f"{spec.name}.data")}  # fmt: skip
        self.result = LoadResult(spec.name, counts_guest=spec.counts_guest, vcpu_tids=list(vcpu_tids),
                                 vcpu_cpus=list(vcpu_cpus))  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None
        self._out_path = self.log_dir / f"{spec.name}.out"
        self._samples = SampleCounter(Path(self.values["output"])) if spec.sampling else None
        #: The guest's total VM exits when the load started (set by whoever has QMP), for rates.
        self.exits_before: int | None = None
        self._created = time.monotonic()
        #: When perf was started (monotonic): the zero of its -I timestamps.
        self.launched: float | None = None
        #: Where the perf_event_mux_interval_ms files and the restore journals are (tests use their own).
        self._mux_dirs = (mux_pmus_dir, mux_journal_dir)
        self._mux: MuxGuard | None = None

    def elapsed_s(self) -> float:
        """Seconds since this check group's load was set up."""
        return time.monotonic() - self._created

    def argv(self) -> list[str]:
        """The command with its placeholders filled in; ``{vcpu_tids[i]}`` is vCPU i's thread (empty when the guest
        has no vCPU i: :meth:`_missing_placeholder` stops such a load first)."""
        lists = {"vcpu_tids": self.vcpu_tids, "vcpu_cpus": self.vcpu_cpus}

        def fill(match: re.Match[str]) -> str:
            name, index = match.group(1), match.group(2)
            if name not in PLACEHOLDERS:
                return match.group(0)
            if index is None:
                return self.values[name]
            values = lists[name]
            return str(values[int(index)]) if int(index) < len(values) else ""

        return [PLACEHOLDER_RE.sub(fill, word) for word in self.spec.command]

    def __enter__(self) -> HostLoad:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LoadResult:
        """Start the load and wait until it runs (or is known not to); never raises for an unusable load."""
        restore_stale(self._mux_dirs[0], self._mux_dirs[1])  # a crashed run's sweep is undone before anything runs
        if self.spec.idle:
            return self.result
        begin = time.monotonic()
        argv = self.argv()
        self.result.command = argv
        perf = shutil.which(argv[0])
        if perf is None:
            return self._unavailable("perf is not installed (Debian package linux-perf)", begin)
        reason = self._missing_placeholder()
        if reason:
            return self._unavailable(reason, begin)
        events = self.spec.events()
        if self.spec.counts_guest:
            probe = self._probe()
            self.result.probe = probe.to_json()
            if probe.refused:
                words = precheck(events, perf, target_options(argv)) if events else None
                return self._finish(begin, "refused", f"{probe.describe()}; perf's own words: {words or 'none'}")
        if events:
            reason = precheck(events, perf, target_options(argv))
            if reason is not None:
                return self._unavailable(reason, begin)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_output()
        self.launched = time.monotonic()
        with open(self._out_path, "wb") as out:
            self._proc = subprocess.Popen([perf, *argv[1:]], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                          start_new_session=True, preexec_fn=dies_with_parent())  # fmt: skip
        self.result.output = str(self._out_path)
        try:
            phase("load_start", load=self)
            self._wait_ready(begin)
        except BaseException:
            self.stop()  # interrupted (Ctrl-C, SIGTERM) while starting: the caller never gets to stop() it
            raise
        self.result.start_s = round(time.monotonic() - begin, 3)
        return self.result

    def _missing_placeholder(self) -> str | None:
        """An empty {vcpu_tids}/{vcpu_cpus} would become ``-t ""`` / ``-C ""`` (perf then targets the wrong thing
        or nothing): say which fact is missing instead."""
        if self.spec.uses("vcpu_tids") and not self.vcpu_tids:
            return "no vCPU thread ids to attach to (QMP query-cpus-fast gave none)"
        if self.spec.uses("vcpu_cpus") and not self.vcpu_cpus:
            return "the vCPUs are not pinned to host CPUs (sched_setaffinity failed), so there is no CPU for -C"
        for name, values in (("vcpu_tids", self.vcpu_tids), ("vcpu_cpus", self.vcpu_cpus)):
            beyond = [i for i in self.spec.indexes(name) if i >= len(values)]
            if beyond:
                return (f"{{{name}[{beyond[0]}]}} names vCPU {beyond[0]}, but the guest has {len(self.vcpu_tids)} "
                        "vCPU(s) (a per-vCPU load needs a profile with more: smp in profiles.toml)")  # fmt: skip
        return None

    def _probe(self) -> mediated_probe.RefusalProbe:
        """Open the load's include-guest event once, where the load will count: on a vCPU thread for ``-t``
        loads, else CPU-wide on the first vCPU's host CPU (or CPU 0 without pinning). The refusal is host-wide
        (nr_mediated_pmu_vms), so any target answers; the load's own keeps permissions comparable."""
        event = self.spec.include_guest_event()
        name = event.name if event is not None else mediated_probe.FALLBACK_EVENT
        if (self.spec.uses("vcpu_tids") or "-t" in self.spec.command) and self.vcpu_tids:
            index = next(iter(self.spec.indexes("vcpu_tids")), 0)  # a per-vCPU load's own thread
            tid = self.vcpu_tids[index] if index < len(self.vcpu_tids) else self.vcpu_tids[0]
            return mediated_probe.probe_include_guest(name, tid, -1)
        return mediated_probe.probe_include_guest(name, -1, self.vcpu_cpus[0] if self.vcpu_cpus else 0)

    def _remove_stale_output(self) -> None:
        """A reused log directory may hold an earlier run's perf.data (and --switch-output rotations): their
        samples must not count as this load's."""
        output = Path(self.values["output"])
        for stale in [output, *output.parent.glob(output.name + ".*")]:
            stale.unlink(missing_ok=True)

    def _finish(self, begin: float, status: str, reason: str) -> LoadResult:
        self.result.status = status
        self.result.reason = reason
        self.result.start_s = round(time.monotonic() - begin, 3)
        return self.result

    def _unavailable(self, reason: str, begin: float) -> LoadResult:
        return self._finish(begin, "unavailable", reason)

    def _output_tail(self, text: str) -> str:
        """perf's error text, else its last line (the Debian ``perf`` wrapper prints no ``Error:`` block)."""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return error_message(text) or (lines[-1][-200:] if lines else "")

    def _wait_ready(self, begin: float) -> None:
        """Running = still alive and counting (deadline READY_TIMEOUT_S): for ``perf stat -I`` every event counted
        something in an interval, for ``perf record`` the first sample is in its output, else READY_GRACE_S
        survived. Waiting for counts, not just the first line, keeps an event that is merely slow to be scheduled
        (an idle vCPU thread, host multiplexing) from reading as "counted nothing" in the group's first check."""
        assert self._proc is not None
        interval = "-I" in self.spec.command or "--interval-print" in self.spec.command
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                text = self._out_path.read_text(errors="replace")
                self.result.returncode = self._proc.returncode
                if self._proc.returncode < 0:  # killed (OOM killer, a user): this host can run it, this run could not
                    self._finish(begin, "died", f"perf {exit_text(self._proc.returncode)} while starting")
                    return
                tail = self._output_tail(text) or f"exited with code {self._proc.returncode}"
                self._unavailable(f"perf: {tail}", begin)
                return
            if self._samples is not None:
                started = self._samples.update() > 0
            elif interval:
                summary = summarize(parse_stat_csv(self._out_path.read_text(errors="replace")))
                started = bool(summary) and all(entry["max_value"] for entry in summary.values())
            else:
                started = time.monotonic() - begin >= READY_GRACE_S
            if started:
                self.result.status = "running"
                return
            time.sleep(0.05)
        self.result.status = "running"  # alive at the deadline: running, just slow to print

    def _record_summary(self) -> dict[str, dict[str, Any]]:
        """A ``perf record`` load's evidence in the summary's shape: the samples its output holds so far."""
        assert self._samples is not None
        count = self._samples.update()
        key = self.spec.events() or "samples"
        return {key: {"status": "counted" if count else "<no samples>", "value": count, "unit": "samples",
                      "min_pct_running": None, "max_value": count, "counted_rows": 1 if count else 0,
                      "rows": 1}}  # fmt: skip

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The load's per-event summary so far (it keeps running), e.g. its multiplexing while a check runs."""
        if self._proc is None or not self._out_path.exists():
            return {}
        text = self._out_path.read_text(errors="replace")
        if self._proc.poll() is not None and self.result.status == "running":
            self.result.status = "died"
            self.result.reason = f"perf {exit_text(self._proc.returncode)} during the check group: " + \
                (self._output_tail(text) or "no output") + self._gone_targets()  # fmt: skip
        if self._samples is not None:
            return self._record_summary()
        complete = text[: text.rfind("\n") + 1]  # perf may be mid-line: a cut row would parse as a smaller count
        return summarize(parse_stat_csv(complete))

    def _gone_targets(self) -> str:
        """Why a ``-t`` load may end by itself: perf stat stops once every thread it follows has exited."""
        if not self.spec.uses("vcpu_tids"):
            return ""
        gone = [tid for tid in self.vcpu_tids if not Path(f"/proc/{tid}").exists()]
        return f" (the vCPU threads {', '.join(map(str, gone))} it followed have exited)" if gone else ""

    def mux_guard(self) -> MuxGuard:
        """The guard of the host's perf_event_mux_interval_ms files for this load's sweep (created on first use; it
        records the original values, and a journal, before the first change). :meth:`stop` restores them."""
        if self._mux is None:
            pmus_dir, journal_dir = self._mux_dirs
            self._mux = MuxGuard(pmus_dir, journal_dir)
        return self._mux

    def window_share(self, since: float, until: float) -> float | None:
        """The lowest running share (%) of the load's counting events in perf's -I rows between two monotonic
        times: how much of the window the host's events got a counter (host-side multiplexing). None without
        interval rows in the window."""
        if self.launched is None or not self._out_path.exists():
            return None
        text = self._out_path.read_text(errors="replace")
        rows = parse_stat_csv(text[: text.rfind("\n") + 1])
        start, end = since - self.launched, until - self.launched + _interval_s(self.spec)
        shares = [r.pct_running for r in rows if r.time is not None and start < r.time <= end and r.pct_running]
        return min(shares) if shares else None

    def alive(self) -> bool:
        """Whether the load's perf process still runs (a before-boot load must still exist when KVM creates the VM)."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> LoadResult:
        """SIGINT the process group (perf prints its totals), SIGKILL after STOP_TIMEOUT_S; parse the output; and
        put back any perf_event_mux_interval_ms this load's sweep changed, whatever happened while stopping."""
        try:
            if self._proc is not None:
                phase("load_stop", load=self)
        finally:  # stopped also when the announcement raises (Ctrl-C)
            try:
                result = self._stop()
            finally:
                if self._mux is not None:
                    self.result.mux = self._mux.restore()
        return result

    def _end(self, proc: subprocess.Popen[Any]) -> None:
        """SIGINT, then SIGKILL after STOP_TIMEOUT_S; a perf that outlives even SIGKILL by STOP_TIMEOUT_S (stuck in
        the kernel, e.g. writing to a hung disk) is recorded as such and left to the kernel, not waited for."""
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:  # already gone: reap it below
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            why = f"perf survived SIGKILL for {STOP_TIMEOUT_S:g} s (process state {process_state(proc.pid)})"
            LOG.error("host load %s: %s", self.spec.name, why)
            self.result.reason = f"{self.result.reason}; {why}" if self.result.reason else why

    def _stop(self) -> LoadResult:
        begin = time.monotonic()
        proc = self._proc
        if proc is not None:
            self.snapshot()  # marks a load that died during the group
            if proc.poll() is None:
                self._end(proc)
            self.result.returncode = proc.returncode
            text = self._out_path.read_text(errors="replace")
            if self._samples is not None:
                summary = self._record_summary()
                total = record_samples(text)  # perf's own count, when it prints one
                if total is not None:
                    next(iter(summary.values()))["perf_samples"] = total
            else:
                summary = summarize(parse_stat_csv(text))
            self.result.events = summary
            pcts = [float(e["min_pct_running"]) for e in summary.values() if e["min_pct_running"] is not None]
            self.result.min_pct_running = min(pcts) if pcts else None
            if self.result.status == "running":
                self.result.status = "stopped"
            self._proc = None
        self.result.stop_s = round(time.monotonic() - begin, 3)
        return self.result
