"""coexist.mux_cost's mechanics for real, on a perf_event_mux_interval_ms tree the test owns: the original value is
recorded and journalled before any change, restored when the load stops (also on Ctrl-C and SIGTERM in a real child
process running a real perf load), and by the next launch after a SIGKILL; the sweep measures per setting with KVM
statistics in QMP's own reply format."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.host import mux_interval
from harness.host.loads import HostLoad, LoadSpec
from harness.host.mux_interval import JOURNAL_PREFIX, MUX_FILE, MuxGuard, MuxUnavailable, restore_stale
from harness.judge import mux_curve
from harness.paths import REPO_ROOT
from harness.probe.runner import ProbeError, ProbeRun
from harness.suite import mux_sweep

SW_LOAD = LoadSpec("sw", "software events", ("perf", "stat", "-a", "-x", ",", "-I", "100", "-e", "cpu-clock"),
                   mux_sweep=(1, 4, 16, 100))  # fmt: skip


def sysfs(tmp_path: Path, **values: int) -> Path:
    """A /sys/bus/event_source/devices lookalike: <pmu>/perf_event_mux_interval_ms holding each value, plus a
    software PMU (never swept)."""
    root = tmp_path / "devices"
    for pmu, value in {**values, "software": 0}.items():
        (root / pmu).mkdir(parents=True)
        (root / pmu / MUX_FILE).write_text(f"{value}\n")
    return root


def value(root: Path, pmu: str = "cpu") -> int:
    return int((root / pmu / MUX_FILE).read_text())


def journals(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{JOURNAL_PREFIX}*.json")) if directory.is_dir() else []


# --- the guard ------------------------------------------------------------------------------------------------------


def test_the_original_is_journalled_before_the_first_change_and_restored(tmp_path):
    root, jdir = sysfs(tmp_path, cpu_core=4, cpu_atom=4), tmp_path / "journal"
    guard = MuxGuard(root, jdir)
    guard.set(1)
    (journal,) = journals(jdir)
    saved = json.loads(journal.read_text())
    assert saved["originals"] == {"cpu_core": 4, "cpu_atom": 4} and saved["written"] == [1]
    assert saved["pid"] == os.getpid() and saved["pmus_dir"] == str(root)
    assert value(root, "cpu_core") == value(root, "cpu_atom") == 1 and value(root, "software") == 0
    guard.set(100)
    assert json.loads(journal.read_text())["written"] == [1, 100]
    outcome = guard.restore()
    assert outcome["restored"] and value(root, "cpu_core") == value(root, "cpu_atom") == 4
    assert not journals(jdir)
    assert guard.restore() is outcome  # idempotent: the load's stop() calls it again


def test_a_value_someone_else_set_during_the_sweep_is_left_as_found(tmp_path):
    root, jdir = sysfs(tmp_path, cpu=4), tmp_path / "journal"
    guard = MuxGuard(root, jdir)
    guard.set(16)
    (root / "cpu" / MUX_FILE).write_text("10\n")  # the administrator, meanwhile
    outcome = guard.restore()
    assert not outcome["restored"] and value(root) == 10
    assert "holds 10, which this run never wrote" in outcome["pmus"]["cpu"]["error"]


def test_no_core_pmu_and_unwritable_files_say_why(tmp_path, monkeypatch):
    root = sysfs(tmp_path)  # only the software PMU: no host PMU here
    with pytest.raises(MuxUnavailable, match=f"host: no core PMU {MUX_FILE} under"):
        MuxGuard(root, tmp_path / "j").set(1)
    root = sysfs(tmp_path / "b", cpu=4)
    real = Path.write_text

    def denied(self, text, *args, **kwargs):
        if self.name == MUX_FILE:
            raise PermissionError(13, "Permission denied")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", denied)
    guard = MuxGuard(root, tmp_path / "j2")
    with pytest.raises(MuxUnavailable, match=r"cannot write .*: Permission denied \(the sweep needs root\)"):
        guard.set(1)
    monkeypatch.undo()
    assert guard.restore()["restored"] and value(root) == 4


def test_a_second_live_run_does_not_record_the_first_runs_value_as_original(tmp_path):
    """A live journal of another process on the same tree: this run refuses to sweep (its 'original' would be the
    other run's setting)."""
    root, jdir = sysfs(tmp_path, cpu=4), tmp_path / "journal"
    other = subprocess.Popen(["sleep", "30"])
    try:
        jdir.mkdir()
        start = mux_interval.process_start(other.pid)
        (jdir / f"{JOURNAL_PREFIX}{other.pid}-{start}.json").write_text(json.dumps({
            "pid": other.pid, "start": start, "boot_id": mux_interval._boot_id(), "pmus_dir": str(root),
            "originals": {"cpu": 4}, "written": [1]}))  # fmt: skip
        with pytest.raises(MuxUnavailable, match=f"another vpmu run \\(pid {other.pid}\\)"):
            MuxGuard(root, jdir).set(1)
        assert value(root) == 4
    finally:
        other.kill()
        other.wait()


# --- crash, Ctrl-C, SIGTERM: real child processes -------------------------------------------------------------------

CRASH = textwrap.dedent("""\
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from harness.host.mux_interval import MuxGuard
    MuxGuard(Path(sys.argv[1]), Path(sys.argv[2])).set(1)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs
    """)


def test_a_harness_killed_mid_sweep_is_undone_by_the_next_launch(tmp_path):
    root, jdir = sysfs(tmp_path, cpu=4), tmp_path / "journal"
    child = subprocess.run([sys.executable, "-c", CRASH.format(repo=str(REPO_ROOT)), str(root), str(jdir)],
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert value(root) == 1 and len(journals(jdir)) == 1  # left changed, with the journal that says so
    done = restore_stale(root, jdir)
    assert value(root) == 4 and not journals(jdir)
    assert done[0]["pmus"]["cpu"] == {"original": 4, "found": 1, "restored": True}


def test_a_journal_from_before_a_reboot_is_dropped_unreplayed(tmp_path):
    root, jdir = sysfs(tmp_path, cpu=4), tmp_path / "journal"
    jdir.mkdir()
    (jdir / f"{JOURNAL_PREFIX}999999-1.json").write_text(json.dumps({
        "pid": 999999, "start": 1, "boot_id": "another-boot", "pmus_dir": str(root), "originals": {"cpu": 10},
        "written": [4]}))  # fmt: skip
    assert restore_stale(root, jdir)[0]["skipped"].startswith("written before the last reboot")
    assert value(root) == 4 and not journals(jdir)


@pytest.mark.skipif(os.geteuid() != 0, reason="host: chown of the forged journal needs root")
def test_a_journal_of_another_user_is_never_replayed(tmp_path):
    root, jdir = sysfs(tmp_path, cpu=4), tmp_path / "journal"
    jdir.mkdir()
    forged = jdir / f"{JOURNAL_PREFIX}999999-1.json"
    forged.write_text(json.dumps({"pid": 999999, "start": 1, "boot_id": mux_interval._boot_id(), "pmus_dir": str(root),
                                  "originals": {"cpu": 999}, "written": [4]}))  # fmt: skip
    os.chown(forged, 65534, 65534)
    assert restore_stale(root, jdir) == [] and value(root) == 4 and forged.exists()


INTERRUPTED = textwrap.dedent("""\
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from harness.cli import _raise_on_sigterm
    from harness.host.loads import HostLoad, LoadSpec
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # what python -m harness installs
    spec = LoadSpec("sw", "d", ("perf", "stat", "-a", "-x", ",", "-I", "100", "-e", "cpu-clock"), mux_sweep=(1, 4))
    load = HostLoad(spec, Path(sys.argv[3]), [os.getpid()], [0], mux_pmus_dir=Path(sys.argv[1]),
                    mux_journal_dir=Path(sys.argv[2]))
    load.start()
    try:
        load.mux_guard().set(1)
        print("swept", load._proc.pid, flush=True)
        time.sleep(60)
    finally:
        load.stop()  # the host_load fixture's cleanup: stops perf and puts the interval back
    """)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_restore_in_the_cleanup_that_stops_the_load(tmp_path, sig):
    root, jdir = sysfs(tmp_path, cpu=4), tmp_path / "journal"
    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED.format(repo=str(REPO_ROOT)), str(root), str(jdir),
                              str(tmp_path / "logs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    line = child.stdout.readline()
    assert line.startswith("swept"), child.stderr.read()
    perf_pid = int(line.split()[1])
    assert value(root) == 1 and journals(jdir)
    child.send_signal(sig)
    child.wait(60)
    assert value(root) == 4 and not journals(jdir)
    assert not Path(f"/proc/{perf_pid}").exists()


# --- the sweep, with QMP replies in QEMU's format -------------------------------------------------------------------

SCHEMAS = [
    {"provider": "kvm", "target": "vm", "stats": [{"name": "max_mmu_page_hash_collisions", "type": "peak",
                                                   "exponent": 0}]},
    {"provider": "kvm", "target": "vcpu", "stats": [
        {"name": "guest_mode", "type": "instant", "exponent": 0},
        {"name": "halt_poll_fail_ns", "unit": "seconds", "base": 10, "type": "cumulative", "exponent": -9},
        {"name": "exits", "type": "cumulative", "exponent": 0},
        {"name": "irq_exits", "type": "cumulative", "exponent": 0},
        {"name": "nmi_injections", "type": "cumulative", "exponent": 0}]},
]  # fmt: skip


class FakeMachine:
    """QMP as QEMU 7.2+ answers query-cpus-fast / query-stats / query-stats-schemas (qapi/machine.json,
    qapi/stats.json). vCPU 0 takes 100 exits/s of background plus one irq exit per rotation of the tree's interval:
    the perf-based vPMU's worst case, one timer interrupt per rotation while in guest mode."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.exits = {0: 0.0, 1: 0.0}
        self.irq = 0.0
        self.last = time.monotonic()
        self.seen: list[int] = []

    def _advance(self) -> None:
        now = time.monotonic()
        rate = 1000.0 / value(self.root)
        self.irq += rate * (now - self.last)
        self.exits[0] += (100 + rate) * (now - self.last)
        self.exits[1] += 100 * (now - self.last)
        self.last = now

    def qmp(self, command: str, **args):
        if command == "query-stats-schemas":
            assert args == {"provider": "kvm"}
            return SCHEMAS
        if command == "query-cpus-fast":
            return [{"thread-id": 4000 + i, "props": {"core-id": 0, "thread-id": 0, "socket-id": i},
                     "qom-path": f"/machine/unattached/device[{i}]", "cpu-index": i, "target": "x86_64"}
                    for i in (0, 1)]  # fmt: skip
        assert command == "query-stats" and args["target"] == "vcpu"
        self._advance()
        self.seen.append(value(self.root))
        return [{"provider": "kvm", "qom-path": f"/machine/unattached/device[{i}]",
                 "stats": [{"name": "exits", "value": int(self.exits[i])},
                           {"name": "irq_exits", "value": int(self.irq) if i == 0 else 0},
                           {"name": "nmi_injections", "value": 0},
                           {"name": "halt_wait_hist", "value": [0, 3, 1]}]}
                for i in (1, 0)]  # fmt: skip


class FakeRunner:
    """ProbeRunner for the loop: ``counters <cpu> workload N`` takes N ns here (a 1 GHz loop)."""

    def __init__(self, session) -> None:
        self.calls: list[tuple] = []

    def run(self, name, params=None, args=(), cpu=0, timeout_s=0.0):
        self.calls.append((name, args, cpu))
        time.sleep(int(args[1]) / 1e9)
        return ProbeRun(name, [], "", 0.0)


class FakeRun:
    """The parts of ProfileRun the sweep uses; the canary probe records what setting it ran at."""

    def __init__(self, machine: FakeMachine, fail_at: int | None = None) -> None:
        self.guest = type("G", (), {"machine": machine, "ssh": None})()
        self.canaries: dict[str, int] = {}
        self.fail_at = fail_at

    def probe(self, name, params=None, key=None, cpu=0):
        interval = value(self.guest.machine.root)
        if interval == self.fail_at:
            raise ProbeError(name, "killed by signal 11")
        self.canaries[key] = interval
        return ProbeRun(name, [], "", 0.0)


@pytest.fixture
def sweep_load(tmp_path, monkeypatch):
    monkeypatch.setattr("harness.probe.runner.ProbeRunner", FakeRunner)
    root = sysfs(tmp_path, cpu=4)
    load = HostLoad(SW_LOAD, tmp_path / "logs", [os.getpid()], [0], mux_pmus_dir=root,
                    mux_journal_dir=tmp_path / "journal")  # fmt: skip
    assert load.start().status == "running", load.result.reason
    yield root, load
    load.stop()


def test_a_sweep_measures_each_setting_in_order_and_puts_the_original_back(sweep_load):
    root, load = sweep_load
    machine = FakeMachine(root)
    run = FakeRun(machine)
    sweep = mux_sweep.measure(run, load, {"events": []}, window_s=0.3)
    assert sweep["unavailable"] is None and sweep["originals"] == {"cpu": 4}
    assert [p["interval_ms"] for p in sweep["points"]] == [1, 4, 16, 100]
    assert run.canaries == {f"counters@mux{ms}ms": ms for ms in (1, 4, 16, 100)}  # each canary at its setting
    assert machine.seen[-8:] == [1, 1, 4, 4, 16, 16, 100, 100]  # the stats window of each setting
    assert value(root) == 4 and sweep["restore"]["restored"] and not journals(root.parent / "journal")
    assert {s["name"] for s in sweep["schemas"]["pmu_relevant"]} == {"exits", "irq_exits", "nmi_injections"}
    assert sweep["schemas"]["offered"]["vm"] == ["max_mmu_page_hash_collisions"]
    for point in sweep["points"]:
        assert 0.2 < point["window_s"] < 2.0 and set(point["stats"]) == {"exits", "irq_exits", "nmi_injections"}
        assert point["host_running_pct"] == 100.0  # software events never multiplex
    rows = mux_curve.curve(sweep)
    assert rows[0]["rotations_per_s"] == 1000.0 and rows[-1]["rotations_per_s"] == 10.0
    assert 0.8 < mux_curve.slope(rows) < 1.2  # one exit per rotation, as the fake machine charges
    assert 0.8 < mux_curve.slope(rows, "irq_exits_per_s") < 1.2


def test_a_canary_that_fails_mid_sweep_stops_it_and_the_original_is_back(sweep_load):
    root, load = sweep_load
    sweep = mux_sweep.measure(FakeRun(FakeMachine(root), fail_at=16), load, {"events": []}, window_s=0.1)
    assert [p["interval_ms"] for p in sweep["points"]] == [1, 4, 16]
    assert sweep["points"][-1]["error"] == "probe counters: killed by signal 11"
    assert value(root) == 4 and sweep["restore"]["restored"]


def test_the_loads_stop_restores_what_a_sweep_left_changed(sweep_load):
    """The sweep restores itself; should it be cut short (an exception out of the check), the load's stop() does."""
    root, load = sweep_load
    load.mux_guard().set(16)
    assert value(root) == 16
    result = load.stop()
    assert value(root) == 4 and result.mux["restored"] and result.mux["written"] == [16]


def test_without_kvm_statistics_the_points_have_none(tmp_path, sweep_load):
    """TCG: query-stats answers with no KVM provider; the sweep still runs and says nothing about exits."""
    root, load = sweep_load

    class Tcg(FakeMachine):
        def qmp(self, command, **args):
            return [] if command.startswith("query-stats") else super().qmp(command, **args)

    sweep = mux_sweep.measure(FakeRun(Tcg(root)), load, {"events": []}, window_s=0.05)
    assert all(p["stats"] == {} for p in sweep["points"]) and sweep["schemas"]["pmu_relevant"] == []
    assert all(row.get("exits_per_s") is None for row in mux_curve.curve(sweep))
