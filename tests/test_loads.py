"""Host loads: the loads file, and real perf processes started, stopped and cleaned up here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.loads import IDLE, HostLoad, LoadSpec, load_loads, precheck, select_loads
from harness.paths import REPO_ROOT

SW_LOAD = LoadSpec("sw", "software events", ("perf", "stat", "-a", "-x", ",", "-I", "200", "-e",
                                             "cpu-clock,task-clock,context-switches"))  # fmt: skip


def perf_children(pid: int) -> list[int]:
    """perf processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        if comm.startswith("perf") and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(proc.name))
    return found


def test_shipped_loads():
    loads = load_loads()
    assert loads[IDLE].idle
    assert any(not s.idle and "cpu-clock" in " ".join(s.command) for s in loads.values()), "a software-only load"
    modifiers_explicit = [s for s in loads.values() if "-e" in s.command]
    for spec in modifiers_explicit:  # newer perf counts the guest unless told: every hardware event says :H/:G
        for event in spec.events().strip("{}:D").split(","):
            assert event.split(":")[0] in ("cpu-clock", "task-clock", "context-switches") or ":" in event, event


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[x]\ndescription = "d"\ncomand = ["perf"]\n', "unknown key 'comand'"),
        ('[x]\ncommand = ["perf", "stat"]\n', "missing field 'description'"),
        ('[x]\ndescription = "d"\ncommand = ["sh", "-c", "perf stat"]\n', 'starting with "perf"'),
        ('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-t", "{vcpu_tid}"]\n', "unknown placeholder {vcpu_tid}"),
        ('[x]\ndescription = "d"\n', "missing field 'command'"),
        ('[x]\ndescription = "d"\ncommand = "perf stat"\n', "field 'command' must be a list"),
    ],
)
def test_bad_loads_file(tmp_path, text, fragment):
    path = tmp_path / "loads.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_loads(path)
    assert fragment in str(info.value) and str(info.value).startswith(f"{path}: [x]")


def test_event_groups_are_not_placeholders(tmp_path):
    path = tmp_path / "loads.toml"
    path.write_text('[pinned]\ndescription = "d"\ncommand = ["perf", "stat", "-e", "{cycles:H,instructions:H}:D"]\n')
    assert load_loads(path)["pinned"].events() == "{cycles:H,instructions:H}:D"
    assert IDLE in load_loads(path)  # idle always exists


def test_select_loads():
    loads = load_loads()
    assert select_loads(loads, [], False, Path("l")) == [IDLE]
    assert select_loads(loads, ["host-sw-counting", IDLE], False, Path("l")) == [IDLE, "host-sw-counting"]
    assert select_loads(loads, [], True, Path("l"))[0] == IDLE and len(select_loads(loads, [], True, Path("l"))) > 3
    with pytest.raises(UsageError, match="no load 'nope'"):
        select_loads(loads, ["nope"], False, Path("l"))


def test_software_load_really_runs_and_stops(tmp_path):
    load = HostLoad(SW_LOAD, tmp_path, [os.getpid()], [0])
    result = load.start()
    assert result.status == "running", result.reason
    pid = load._proc.pid
    assert Path(f"/proc/{pid}").exists()
    time.sleep(0.5)
    assert set(load.snapshot()) == {"cpu-clock", "task-clock", "context-switches"}
    result = load.stop()
    assert result.status == "stopped" and result.returncode is not None
    assert not Path(f"/proc/{pid}").exists()
    assert result.min_pct_running == 100.0 and (tmp_path / "sw.out").read_text()  # output kept


def test_placeholders_are_filled(tmp_path):
    spec = LoadSpec("t", "d", ("perf", "stat", "-t", "{vcpu_tids}", "-C", "{vcpu_cpus}", "-o", "{output}"))
    assert HostLoad(spec, tmp_path, [11, 12], [0, 1]).argv() == \
        ["perf", "stat", "-t", "11,12", "-C", "0,1", "-o", str(tmp_path / "t.data")]  # fmt: skip


def test_hardware_load_without_pmu_is_unavailable_with_perfs_words(tmp_path):
    reason = precheck("cycles:GH")
    if reason is None:
        pytest.skip("host: hardware events count here")
    spec = LoadSpec("hw", "d", ("perf", "stat", "-a", "-e", "cycles:GH"), counts_guest=True)
    with HostLoad(spec, tmp_path, [1], [0]) as load:
        assert load.result.status == "unavailable"
    assert load.result.reason == "perf: cycles:GH <not supported>"


def test_a_load_that_exits_at_once_is_unavailable(tmp_path):
    spec = LoadSpec("bad", "d", ("perf", "stat", "--no-such-option"))
    with HostLoad(spec, tmp_path, [1], [0]) as load:
        pass
    assert load.result.status == "unavailable" and load.result.reason.startswith("perf:")


@pytest.mark.integration
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_leaves_no_perf_behind(guest_image, sig, code):
    """Ctrl-C or SIGTERM in the middle of a check group under a software load: the run stops with 130/143 and
    perf and QEMU are gone afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "run", "--image", str(guest_image.directory), "--profile", "pmu-on",
         "--load", "host-sw-counting", "--out", "/tmp/vpmu-interrupt-test"],
        cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    seen_perf: list[int] = []
    while time.monotonic() < deadline and not seen_perf:
        seen_perf = perf_children(proc.pid)
        time.sleep(0.05)
    assert seen_perf, "the host load never started"
    proc.send_signal(sig)
    assert proc.wait(60) == code
    time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in seen_perf)
    assert not perf_children(proc.pid)


def test_cli_bad_loads_file_and_unknown_load(tmp_path):
    from tests.helpers import assert_one_line_error, run_cli

    path = tmp_path / "loads.toml"
    path.write_text('[x]\ndescription = "d"\ncommand = ["perf", "stat"]\ncount_guest = true\n')
    assert_one_line_error(run_cli("run", "--loads-file", str(path), "--out", str(tmp_path)), str(path),
                          "[x]", "unknown key 'count_guest'")  # fmt: skip
    assert_one_line_error(run_cli("run", "--load", "nope", "--out", str(tmp_path)), "no load 'nope'")


def test_interrupt_while_the_load_starts_stops_it(tmp_path, monkeypatch):
    """Ctrl-C can land between starting perf and the caller's stop(): start() must stop what it started."""
    load = HostLoad(SW_LOAD, tmp_path, [1], [0])
    started: list[int] = []
    real_wait = HostLoad._wait_ready

    def interrupted(self, begin):
        started.append(self._proc.pid)
        real_wait(self, begin)
        raise KeyboardInterrupt

    monkeypatch.setattr(HostLoad, "_wait_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load.start()
    assert started and not Path(f"/proc/{started[0]}").exists()
