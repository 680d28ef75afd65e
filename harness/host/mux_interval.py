"""The host PMU's rotation interval (``perf_event_mux_interval_ms``), changed only under a guard that always puts it
back.

``/sys/bus/event_source/devices/<pmu>/perf_event_mux_interval_ms`` is per PMU and host-wide
(kernel/events/core.c perf_event_mux_interval_ms_store(): ``timer < 1`` is -EINVAL; a new value updates every online
CPU's cpc->hrtimer_interval and restarts its timer with perf_mux_hrtimer_restart_ipi()).

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.host.hostfacts import SYSFS_PMUS
from harness.paths import cache_root

LOG = logging.getLogger(__name__)

MUX_FILE = "perf_event_mux_interval_ms"
#: The x86 core PMUs (arch/x86/events/core.c "cpu"; hybrid: cpu_core, cpu_atom, cpu_lowpower in
#: arch/x86/events/intel/core.c). Only their hrtimers rotate the counters a vCPU's events use, and only they carry
#: PERF_PMU_CAP_MEDIATED_VPMU (harness.host.loads: events of other PMUs are never refused).
CORE_PMUS = ("cpu", "cpu_core", "cpu_atom", "cpu_lowpower")
JOURNAL_PREFIX = "vpmu-mux-restore-"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class MuxUnavailable(HarnessError):
    """The sweep cannot run here (no core PMU file, not writable, another run sweeping): the check SKIPs."""


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
