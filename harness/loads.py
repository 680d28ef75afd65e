"""Host perf load scenarios: load them from ``loads.toml``, and run one on the host around a check group.

A load is a real ``perf`` command in its own process group (and with PR_SET_PDEATHSIG, so it never outlives the
harness), its output kept in the load's log directory. Before starting, the load's events are tried once with
``perf stat -e EVENTS -- true``: events this host cannot count make the scenario unavailable with perf's own
words, instead of a load that silently measures nothing (``perf stat`` keeps running with ``<not supported>``,
``perf record`` quietly falls back to cpu-clock).
"""

from __future__ import annotations

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
from harness.lifetime import die_with_parent
from harness.paths import GUEST_TESTS_DIR
from harness.perf_output import error_message, parse_stat_csv, summarize

DEFAULT_LOADS_FILE = GUEST_TESTS_DIR / "loads.toml"
IDLE = "idle"
LOAD_KEYS: dict[str, tuple[type, bool, str]] = {
    "description": (str, True, "one line: what the load does to the host PMU"),
    "command": (list, False, 'argv of the perf command, e.g. ["perf", "stat", "-a", ...] (absent: no load)'),
    "counts_guest": (bool, False, "whether its events also count guest time (no :H modifier)"),
}
PLACEHOLDERS = ("vcpu_tids", "vcpu_cpus", "output")
READY_TIMEOUT_S = 10.0
#: A load without interval output counts as started once it survives this long (a bad option exits at once).
READY_GRACE_S = 0.3
STOP_TIMEOUT_S = 10.0
PRECHECK_TIMEOUT_S = 20.0
EOPNOTSUPP_TEXT = "Operation not supported"


@dataclass(frozen=True)
class LoadSpec:
    name: str
    description: str
    command: tuple[str, ...] = ()
    counts_guest: bool = False

    @property
    def idle(self) -> bool:
        return not self.command

    def events(self) -> str | None:
        """The ``-e`` argument of the command (what the pre-check tries), if any."""
        for i, word in enumerate(self.command[:-1]):
            if word == "-e":
                return self.command[i + 1]
        return None


def _spec(path: Path, name: str, table: object) -> LoadSpec:
    where = f"{path}: [{name}]"
    table = check_table(where, table, LOAD_KEYS)
    command = table.get("command", [])
    if command:
        if not all(isinstance(w, str) for w in command) or command[0] != "perf":
            raise UsageError(f"{where}: field 'command' must be a list of strings starting with \"perf\"")
        for word in command:
            for placeholder in _placeholders(word):
                if placeholder not in PLACEHOLDERS:
                    raise UsageError(f"{where}: field 'command': unknown placeholder {{{placeholder}}} "
                                     f"(allowed: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})")  # fmt: skip
    elif name != IDLE:
        raise UsageError(f"{where}: missing field 'command' (only [{IDLE}] runs no command)")
    return LoadSpec(name, table["description"], tuple(command), bool(table.get("counts_guest", False)))


def _placeholders(word: str) -> list[str]:
    """Names in {braces} that are placeholders (a perf event group "{a,b}:D" is not one)."""
    return re.findall(r"\{([a-z_]+)\}", word)


def load_loads(path: Path = DEFAULT_LOADS_FILE) -> dict[str, LoadSpec]:
    """Parse and validate a loads file; ``idle`` always exists.

    :raises UsageError: syntax error, unknown key or placeholder, missing field (one line).
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
    return sorted(ordered, key=lambda n: n != IDLE)


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

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def precheck(events: str, perf: str = "perf") -> str | None:
    """Try ``events`` once; return why they cannot be counted here (perf's words), or None when they can."""
    try:
        done = subprocess.run([perf, "stat", "-x", ",", "-e", events, "--", "true"], capture_output=True, text=True,
                              timeout=PRECHECK_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"perf stat -e {events} did not finish in {PRECHECK_TIMEOUT_S:.0f} s"
    rows = parse_stat_csv(done.stderr)
    missing = [f"{r.event} {r.status}" for r in rows if r.status != "counted"]
    if done.returncode != 0 or not rows:
        return f"perf: {error_message(done.stderr) or done.stderr.strip()[-200:] or f'exit {done.returncode}'}"
    if missing:
        return "perf: " + ", ".join(missing)
    return None


class HostLoad:
    """One load around one check group. ``with HostLoad(...) as load:``; ``load.result`` after the block."""

    def __init__(self, spec: LoadSpec, log_dir: Path, vcpu_tids: list[int], vcpu_cpus: list[int]) -> None:
        self.spec = spec
        self.log_dir = Path(log_dir)
        self.values = {"vcpu_tids": ",".join(map(str, vcpu_tids)), "vcpu_cpus": ",".join(map(str, vcpu_cpus)),
                       "output": str(self.log_dir / f"{spec.name}.data")}  # fmt: skip
        self.result = LoadResult(spec.name, counts_guest=spec.counts_guest)
        self._proc: subprocess.Popen[bytes] | None = None
        self._out_path = self.log_dir / f"{spec.name}.out"
        #: The guest's total VM exits when the load started (set by whoever has QMP), for rates.
        self.exits_before: int | None = None
        self._created = time.monotonic()

    def elapsed_s(self) -> float:
        """Seconds since this check group's load was set up."""
        return time.monotonic() - self._created

    def argv(self) -> list[str]:
        out = []
        for word in self.spec.command:
            for name in PLACEHOLDERS:
                word = word.replace("{" + name + "}", self.values[name])
            out.append(word)
        return out

    def __enter__(self) -> HostLoad:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LoadResult:
        """Start the load and wait until it runs (or is known not to); never raises for an unusable load."""
        if self.spec.idle:
            return self.result
        begin = time.monotonic()
        argv = self.argv()
        self.result.command = argv
        perf = shutil.which(argv[0])
        if perf is None:
            return self._unavailable("perf is not installed (Debian package linux-perf)", begin)
        events = self.spec.events()
        if events:
            reason = precheck(events, perf)
            if reason is not None:
                return self._unavailable(reason, begin)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self._out_path, "wb") as out:
            self._proc = subprocess.Popen([perf, *argv[1:]], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                          start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip
        self.result.output = str(self._out_path)
        try:
            self._wait_ready(begin)
        except BaseException:
            self.stop()  # interrupted (Ctrl-C, SIGTERM) while starting: the caller never gets to stop() it
            raise
        self.result.start_s = round(time.monotonic() - begin, 3)
        return self.result

    def _unavailable(self, reason: str, begin: float) -> LoadResult:
        self.result.status = "refused" if EOPNOTSUPP_TEXT in reason or "(95)" in reason else "unavailable"
        self.result.reason = reason
        self.result.start_s = round(time.monotonic() - begin, 3)
        return self.result

    def _wait_ready(self, begin: float) -> None:
        """Running = still alive and, for ``perf stat -I``, its first interval printed (deadline READY_TIMEOUT_S)."""
        assert self._proc is not None
        interval = "-I" in self.spec.command
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                text = self._out_path.read_text(errors="replace")
                self.result.returncode = self._proc.returncode
                self._unavailable(f"perf: {error_message(text) or f'exited with code {self._proc.returncode}'}",
                                  begin)  # fmt: skip
                return
            started = (time.monotonic() - begin >= READY_GRACE_S) if not interval else \
                bool(parse_stat_csv(self._out_path.read_text(errors="replace")))  # fmt: skip
            if started:
                self.result.status = "running"
                return
            time.sleep(0.05)
        self.result.status = "running"  # alive at the deadline: running, just slow to print

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The load's per-event summary so far (it keeps running), e.g. its multiplexing while a check runs."""
        if self._proc is None or not self._out_path.exists():
            return {}
        text = self._out_path.read_text(errors="replace")
        if self._proc.poll() is not None and self.result.status == "running":
            self.result.status = "died"
            self.result.reason = (f"perf exited during the check group (code {self._proc.returncode}): "
                                  f"{error_message(text) or text.strip()[-200:]}")  # fmt: skip
        return summarize(parse_stat_csv(text))

    def stop(self) -> LoadResult:
        """SIGINT the process group (perf prints its totals), SIGKILL after STOP_TIMEOUT_S; parse the output."""
        begin = time.monotonic()
        proc = self._proc
        if proc is not None:
            self.snapshot()  # marks a load that died during the group
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGINT)
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(STOP_TIMEOUT_S)
                except ProcessLookupError:
                    proc.wait(STOP_TIMEOUT_S)
            self.result.returncode = proc.returncode
            text = self._out_path.read_text(errors="replace")
            summary = summarize(parse_stat_csv(text))
            self.result.events = summary
            pcts = [float(e["min_pct_running"]) for e in summary.values() if e["min_pct_running"] is not None]
            self.result.min_pct_running = min(pcts) if pcts else None
            if self.result.status == "running":
                self.result.status = "stopped"
            self._proc = None
        self.result.stop_s = round(time.monotonic() - begin, 3)
        return self.result
