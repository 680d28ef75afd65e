"""The VM-exit cost of host multiplexing (coexist.mux_cost): sweep the host PMU's rotation interval, always put it
back, and measure what the guest pays per setting.

``/sys/bus/event_source/devices/<pmu>/perf_event_mux_interval_ms`` is per PMU and host-wide
(kernel/events/core.c perf_event_mux_interval_ms_store(): ``timer < 1`` is -EINVAL; a new value updates every online
CPU's cpc->hrtimer_interval and restarts its timer with perf_mux_hrtimer_restart_ipi()). While a CPU has more
flexible events than counters, perf_mux_hrtimer_handler() calls perf_rotate_context() every interval and re-arms the
timer only while rotations are needed; the timer is HRTIMER_MODE_ABS_PINNED_HARD, a hard interrupt on that CPU, so a
vCPU running there in guest mode takes a VM exit (KVM's ``irq_exits``) each time it fires.

Changing a host-wide knob is only acceptable if it is always put back: :class:`MuxGuard` reads the original values
and writes a journal **before** the first change, restores in the cleanup that stops the load (HostLoad.stop(), also
on Ctrl-C and SIGTERM, which the harness turns into exceptions) and deletes the journal; a harness that dies without
cleanup (SIGKILL, a crash) leaves the journal, and the next launch replays it (:func:`restore_stale`, called when any
host load starts) before it reads any value, like the launcher's sweep of stale temp dirs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qemu.qmp import QMPError

from harness.errors import HarnessError
from harness.paths import cache_root

if TYPE_CHECKING:
    from harness.loads import HostLoad
    from harness.profile_run import ProfileRun

LOG = logging.getLogger(__name__)

SYSFS_PMUS = Path("/sys/bus/event_source/devices")
MUX_FILE = "perf_event_mux_interval_ms"
#: The x86 core PMUs (arch/x86/events/core.c "cpu"; hybrid: cpu_core, cpu_atom, cpu_lowpower in
#: arch/x86/events/intel/core.c). Only their hrtimers rotate the counters a vCPU's events use.
CORE_PMUS = ("cpu", "cpu_core", "cpu_atom", "cpu_lowpower")
JOURNAL_PREFIX = "vpmu-mux-restore-"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

#: Seconds the guest keeps vCPU 0 busy per setting while its KVM statistics are read before and after.
WINDOW_S = 2.0
#: Iterations of the probe's loop (10 instructions each, harness.workloads) the window is calibrated from.
CALIBRATION_ITERATIONS = 20_000_000
MAX_ITERATIONS = 10**11
#: Let the new interval take effect (the store restarts every CPU's timer by IPI) before the window opens.
SETTLE_S = 0.1
#: A rise of the vCPU's exits/s by more than this many exits per additional rotation per second (least-squares slope
#: over the sweep) is flagged. About one is inherent under both vPMUs: the rotation timer is a hard-IRQ hrtimer pinned
#: to the vCPU's host CPU (kernel/events/core.c __perf_mux_hrtimer_init, HRTIMER_MODE_ABS_PINNED_HARD), and a host
#: interrupt while the vCPU runs in guest mode is one external-interrupt exit; the mediated vPMU re-arms it after each
#: exit too (perf_put_guest_context -> perf_event_sched_in -> perf_mux_hrtimer_restart). Rotations that fire while
#: the vCPU thread is out of guest mode bring it below one. More than 1.5 is more than one exit per expiry: extra
#: IPIs or KVM reprogramming its backing events per rotation, the cost a maintainer would want to know of. Flagged is
#: a report, not a verdict: the check fails only when guest counts are not exact. (Adversarial review of issue 14:
#: the first threshold, 0.5, would have flagged every healthy host.)
FLAG_EXITS_PER_ROTATION = 1.5

#: KVM vCPU statistics worth recording for the PMU (arch/x86/kvm/x86.c kvm_vcpu_stats_desc[]), with why. Only those
#: this host's QEMU offers (QMP query-stats-schemas) are read.
PMU_STATS = {
    "exits": "every VM exit",
    # vmx.c handle_external_interrupt() / svm.c intr_interception(): ++vcpu->stat.irq_exits
    "irq_exits": "external-interrupt exits: the host's mux hrtimer expiring on the vCPU's CPU lands here",
    "nmi_injections": "NMIs injected: guest PMIs (LVTPC in NMI mode, kvm_pmu_deliver_pmi)",
    "irq_injections": "interrupts injected into the guest",
    "nmi_window_exits": "exits waiting to inject an NMI (PMI delivery)",
    "irq_window_exits": "exits waiting to inject an interrupt",
    "req_event": "KVM_REQ_EVENT processing (pending PMIs and interrupts)",
    "host_state_reload": "host state reloads (vCPU put/load around scheduling)",
    "halt_exits": "HLT exits: the vCPU idled inside the window",
    "signal_exits": "exits to deliver a signal to the vCPU thread",
    "preemption_reported": "the vCPU thread was preempted (reported to the guest)",
    "preemption_other": "the vCPU thread was preempted (not reported)",
}


class MuxUnavailable(HarnessError):
    """The sweep cannot run here (no core PMU file, not writable, another run sweeping): the check SKIPs."""


# --- the journal -----------------------------------------------------------------------------------------------


def default_journal_dir() -> Path:
    """Per-user and not world-writable (a journal names values a root process writes back)."""
    return cache_root() / "mux-restore"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22, proc(5)); None when it is gone.
    With the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


@contextlib.contextmanager
def _locked(journal_dir: Path) -> Iterator[None]:
    """Serialize journal work of concurrent harness runs (flock on a lock file in the journal directory)."""
    journal_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(journal_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _journals(journal_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Readable journals of this user (a foreign or symlinked file is ignored: its values are not ours to write)."""
    found = []
    for path in sorted(journal_dir.glob(f"{JOURNAL_PREFIX}*.json")):
        try:
            st = path.lstat()
            if not path.is_file() or path.is_symlink() or st.st_uid != os.geteuid():
                continue
            found.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return found


def _alive(journal: dict[str, Any]) -> bool:
    pid, start = journal.get("pid"), journal.get("start")
    return isinstance(pid, int) and start is not None and process_start(pid) == start


def _core_files(pmus_dir: Path) -> dict[str, Path]:
    return {pmu: pmus_dir / pmu / MUX_FILE for pmu in CORE_PMUS if (pmus_dir / pmu / MUX_FILE).is_file()}


def _put_back(pmus_dir: Path, originals: dict[str, int], written: list[int]) -> dict[str, dict[str, Any]]:
    """Write each original value back where the file still holds one we wrote; leave a value someone else set since
    (the administrator's change wins), saying so. Returns per PMU what it holds afterwards."""
    outcome: dict[str, dict[str, Any]] = {}
    for pmu, original in originals.items():
        if pmu not in CORE_PMUS or not isinstance(original, int) or original < 1:
            continue  # only core PMU files, only values the kernel accepts: a journal cannot point elsewhere
        path = pmus_dir / pmu / MUX_FILE
        current = _read_int(path)
        entry: dict[str, Any] = {"original": original, "found": current}
        if current == original:
            entry["restored"] = True
        elif current in written:
            try:
                path.write_text(str(original))
            except OSError as exc:
                entry["error"] = f"cannot write {path}: {exc.strerror}"
            entry["restored"] = _read_int(path) == original
        else:
            entry["restored"] = False
            entry["error"] = (f"{path} holds {current}, which this run never wrote: someone else changed it during "
                              "the sweep, so it is left as found")  # fmt: skip
        outcome[pmu] = entry
    return outcome


def restore_stale(pmus_dir: Path | None = None, journal_dir: Path | None = None) -> list[dict[str, Any]]:
    """Replay the journals of harness runs that died while sweeping (their process is gone): put their original
    values back, then delete the journal. A journal from an earlier boot is deleted unreplayed (a reboot resets the
    sysfs value). Returns what was done, one entry per journal."""
    pmus_dir = pmus_dir or SYSFS_PMUS
    journal_dir = journal_dir or default_journal_dir()
    if not journal_dir.is_dir():
        return []
    done = []
    with _locked(journal_dir):
        for path, journal in _journals(journal_dir):
            if _alive(journal) or Path(str(journal.get("pmus_dir"))) != pmus_dir:
                continue  # a live run's, or another sysfs root's (a self-test's)
            entry: dict[str, Any] = {"journal": str(path), "pid": journal.get("pid")}
            if journal.get("boot_id") != _boot_id():
                entry["skipped"] = "written before the last reboot, which reset the values"
            else:
                entry["pmus"] = _put_back(pmus_dir, journal.get("originals") or {}, journal.get("written") or [])
                LOG.warning("restored perf_event_mux_interval_ms left changed by vpmu pid %s: %s", journal.get("pid"),
                            entry["pmus"])  # fmt: skip
            path.unlink(missing_ok=True)
            done.append(entry)
    return done


@dataclass
class MuxGuard:
    """The perf_event_mux_interval_ms files of the host's core PMUs while one load sweeps them: originals recorded
    and journalled before the first write, every value written journalled before it is written, all put back by
    :meth:`restore` (idempotent)."""

    pmus_dir: Path | None = None
    journal_dir: Path | None = None
    originals: dict[str, int] = field(default_factory=dict)
    written: list[int] = field(default_factory=list)
    journal: Path | None = None
    outcome: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.pmus_dir = self.pmus_dir or SYSFS_PMUS
        self.journal_dir = self.journal_dir or default_journal_dir()

    def begin(self) -> None:
        """Record the original values and write the journal (once).

        :raises MuxUnavailable: no core PMU file here, or another live harness run is sweeping.
        """
        if self.journal is not None:
            return
        assert self.pmus_dir is not None and self.journal_dir is not None
        files = _core_files(self.pmus_dir)
        if not files:
            raise MuxUnavailable(f"host: no core PMU {MUX_FILE} under {self.pmus_dir} (no host PMU to multiplex)")
        restore_stale(self.pmus_dir, self.journal_dir)  # a dead run's change must not be recorded as the original
        with _locked(self.journal_dir):
            for _path, other in _journals(self.journal_dir):
                mine = Path(str(other.get("pmus_dir"))) == self.pmus_dir and other.get("pid") != os.getpid()
                if mine and _alive(other):
                    raise MuxUnavailable(f"host: another vpmu run (pid {other['pid']}) is sweeping {MUX_FILE}; its "
                                         "originals would be recorded as this run's")  # fmt: skip
            originals = {pmu: _read_int(path) for pmu, path in files.items()}
            unreadable = [str(files[pmu]) for pmu, value in originals.items() if value is None]
            if unreadable:
                raise MuxUnavailable(f"host: cannot read {unreadable[0]}")
            self.originals = {pmu: int(value) for pmu, value in originals.items() if value is not None}
            self.journal = self.journal_dir / f"{JOURNAL_PREFIX}{os.getpid()}-{process_start(os.getpid())}.json"
            self._save()

    def _save(self) -> None:
        """Write the journal atomically (a reader never sees half of it)."""
        assert self.journal is not None
        data = {"pid": os.getpid(), "start": process_start(os.getpid()), "boot_id": _boot_id(),
                "pmus_dir": str(self.pmus_dir), "originals": self.originals, "written": self.written}  # fmt: skip
        tmp = self.journal.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.journal)

    def set(self, interval_ms: int) -> None:
        """Set every core PMU's interval to ``interval_ms`` (journalled first).

        :raises MuxUnavailable: the file cannot be written (not root) or does not take the value.
        """
        self.begin()
        if interval_ms not in self.written:
            self.written.append(interval_ms)
            self._save()
        assert self.pmus_dir is not None
        for pmu in self.originals:
            path = self.pmus_dir / pmu / MUX_FILE
            try:
                path.write_text(str(interval_ms))
            except OSError as exc:
                raise MuxUnavailable(f"host: cannot write {path}: {exc.strerror} (the sweep needs root)") from None
            if _read_int(path) != interval_ms:
                raise MuxUnavailable(f"host: {path} reads {_read_int(path)} after writing {interval_ms}")

    def restore(self) -> dict[str, Any] | None:
        """Put the original values back and delete the journal; None when nothing was recorded. Idempotent."""
        if self.journal is None:
            return None
        if self.outcome is None:
            assert self.pmus_dir is not None
            pmus = _put_back(self.pmus_dir, self.originals, self.written)
            self.outcome = {"originals": dict(self.originals), "written": list(self.written), "pmus": pmus,
                            "restored": all(entry.get("restored") for entry in pmus.values())}  # fmt: skip
            self.journal.unlink(missing_ok=True)
        return self.outcome


# --- KVM statistics over QMP --------------------------------------------------------------------------------------


def stats_schemas(machine: Any) -> dict[str, Any]:
    """What QMP ``query-stats-schemas`` offers for the KVM provider (qapi/stats.json StatsSchema: provider, target,
    stats[name, type, unit, base, exponent]): every name per target, and the PMU-relevant vCPU ones in full."""
    try:
        schemas = machine.qmp("query-stats-schemas", provider="kvm")
    except (QMPError, HarnessError) as exc:
        return {"error": f"query-stats-schemas: {exc}", "offered": {}, "pmu_relevant": []}
    offered: dict[str, list[str]] = {}
    relevant = []
    for schema in schemas or []:
        names = [stat.get("name") for stat in schema.get("stats", [])]
        offered[schema.get("target", "?")] = names
        if schema.get("target") == "vcpu":
            relevant += [{**stat, "why": PMU_STATS[stat["name"]]} for stat in schema.get("stats", [])
                         if stat.get("name") in PMU_STATS]  # fmt: skip
    return {"error": None, "offered": offered, "pmu_relevant": relevant}


def vcpu_stats(machine: Any, names: list[str]) -> dict[int, dict[str, int]]:
    """KVM's ``names`` per vCPU index (QMP query-stats, target vcpu; the qom-path of each StatsResult matched to
    query-cpus-fast's cpu-index). Empty without KVM statistics (TCG, QEMU < 7.1)."""
    try:
        cpus = machine.qmp("query-cpus-fast")
        stats = machine.qmp("query-stats", target="vcpu", providers=[{"provider": "kvm"}])
    except (QMPError, HarnessError):
        return {}
    index = {cpu.get("qom-path"): cpu.get("cpu-index") for cpu in cpus or []}
    found: dict[int, dict[str, int]] = {}
    for entry in stats or []:
        vcpu = index.get(entry.get("qom-path"))
        if vcpu is None:
            continue
        found[vcpu] = {s["name"]: s["value"] for s in entry.get("stats", [])
                       if s.get("name") in names and isinstance(s.get("value"), int)}  # fmt: skip
    return found


# --- the sweep ------------------------------------------------------------------------------------------------------


def canary_key(interval_ms: int) -> str:
    """The probe memo key of the canary run at one setting (kept with the run's probes for rejudge)."""
    return f"counters@mux{interval_ms}ms"


def measure(run: ProfileRun, load: HostLoad, params: dict[str, Any],
            window_s: float = WINDOW_S) -> dict[str, Any]:  # fmt: skip
    """Sweep ``load.spec.mux_sweep`` while ``load`` multiplexes: per setting, vCPU 0's KVM statistics over a window in
    which the guest runs the probe's loop on vCPU 0, the load's running share in that window, then the canary probe
    (memo key :func:`canary_key`). The original values are back when this returns (and again when the load stops).

    Returns the sweep as results.json keeps it (``load_inputs.reads.mux_sweep``); ``unavailable`` says why nothing
    was measured.
    """
    from harness.probes import ProbeError, ProbeRunner  # the guest side, imported where it is used

    guard = load.mux_guard()
    machine = run.guest.machine
    schemas = stats_schemas(machine)
    names = [s["name"] for s in schemas["pmu_relevant"]] or ["exits"]
    sweep: dict[str, Any] = {"intervals": list(load.spec.mux_sweep), "window_s": window_s, "vcpu": 0,
                             "schemas": schemas, "points": [], "unavailable": None}  # fmt: skip
    runner = ProbeRunner(run.guest.ssh)
    try:
        guard.begin()
        sweep["originals"] = dict(guard.originals)
        iterations = _calibrate(lambda n: runner.run("counters", params, args=("workload", str(n)), cpu=0), window_s)
        sweep["iterations"] = iterations
        for interval in load.spec.mux_sweep:
            guard.set(interval)
            time.sleep(SETTLE_S)
            before, start = vcpu_stats(machine, names), time.monotonic()
            runner.run("counters", params, args=("workload", str(iterations)), cpu=0)
            end, after = time.monotonic(), vcpu_stats(machine, names)
            point: dict[str, Any] = {"interval_ms": interval, "window_s": round(end - start, 3),
                                     "stats": _delta(before.get(0), after.get(0)),
                                     "host_running_pct": load.window_share(start, end),
                                     "canary_key": canary_key(interval), "error": None}  # fmt: skip
            try:
                run.probe("counters", params, key=canary_key(interval))
            except ProbeError as exc:
                point["error"] = str(exc).splitlines()[0]
            sweep["points"].append(point)
            if point["error"]:
                break
    except MuxUnavailable as exc:
        sweep["unavailable"] = str(exc)
    except ProbeError as exc:
        sweep["error"] = f"the guest's loop could not run: {str(exc).splitlines()[0]}"
    finally:
        sweep["restore"] = guard.restore()
    return sweep


def _calibrate(run_loop: Callable[[int], Any], window_s: float) -> int:
    """Loop iterations that keep the vCPU busy for about ``window_s`` (measured once on this guest)."""
    start = time.monotonic()
    run_loop(CALIBRATION_ITERATIONS)
    took = max(time.monotonic() - start, 1e-3)
    return int(min(MAX_ITERATIONS, max(CALIBRATION_ITERATIONS, CALIBRATION_ITERATIONS * window_s / took)))


def _delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int]:
    if not before or not after:
        return {}
    return {name: after[name] - before[name] for name in after if name in before}


# --- the curve ------------------------------------------------------------------------------------------------------


def rotations_per_s(interval_ms: float) -> float:
    """Timer expiries per second on a CPU that needs rotation (one per interval: perf_mux_hrtimer_handler)."""
    return 1000.0 / interval_ms


def curve(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per setting: rotations/s and the rates of the PMU-relevant statistics (per second of window)."""
    rows = []
    for point in sweep.get("points", []):
        window = point.get("window_s") or 0.0
        stats = point.get("stats") or {}
        rates = {f"{name}_per_s": round(value / window, 1) if window > 0 else None for name, value in stats.items()}
        rows.append({"interval_ms": point["interval_ms"], "rotations_per_s": rotations_per_s(point["interval_ms"]),
                     **rates, "host_running_pct": point.get("host_running_pct")})  # fmt: skip
    return rows


def slope(rows: list[dict[str, Any]], key: str = "exits_per_s") -> float | None:
    """Least-squares slope of ``key`` over rotations/s: extra exits per extra rotation. None with < 2 points."""
    pairs = [(row["rotations_per_s"], row[key]) for row in rows if row.get(key) is not None]
    if len(pairs) < 2:
        return None
    mean_x = sum(x for x, _y in pairs) / len(pairs)
    mean_y = sum(y for _x, y in pairs) / len(pairs)
    var = sum((x - mean_x) ** 2 for x, _y in pairs)
    if var == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in pairs) / var
