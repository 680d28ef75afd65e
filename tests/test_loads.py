"""Host loads: the loads file, and real perf processes started, stopped and cleaned up here."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.host.loads import IDLE, HostLoad, LoadSpec, load_loads, parse_events, precheck, select_loads
from harness.judge import coexist
from harness.paths import REPO_ROOT
from tests.helpers import child_processes

SW_LOAD = LoadSpec("sw", "software events", ("perf", "stat", "-a", "-x", ",", "-I", "200", "-e",
                                             "cpu-clock,task-clock,context-switches"))  # fmt: skip


def perf_children(pid: int) -> list[int]:
    """perf processes whose parent is ``pid`` (read from /proc)."""
    return [child for child, comm, _state in child_processes(pid) if comm.startswith("perf")]


def test_shipped_loads():
    loads = load_loads()
    assert loads[IDLE].idle
    assert any(not s.idle and "cpu-clock" in " ".join(s.command) for s in loads.values()), "a software-only load"
    for spec in loads.values():  # every hardware event says G or H (load_loads enforces it; R7)
        for event in spec.event_list():
            assert event.kind == "software" or event.explicit_guest_host, (spec.name, event.text)
        assert spec.counts_guest == (spec.include_guest_event() is not None), spec.name


#: perf's generic events each vendor's kernel maps (anything else is ``<not supported>``, x86_pmu_event_init ->
#: -ENOENT): arch/x86/events/intel/core.c intel_perfmon_event_map; arch/x86/events/amd/core.c
#: amd_zen2_perfmon_event_map (Zen 2/3: no bus-cycles, no ref-cycles; Zen 4 adds ref-cycles only).
INTEL_MAP = {"cycles", "instructions", "cache-references", "cache-misses", "branches", "branch-misses", "bus-cycles",
             "ref-cycles"}  # fmt: skip
AMD_ZEN2_MAP = {"cycles", "instructions", "cache-references", "cache-misses", "branches", "branch-misses",
                "stalled-cycles-frontend"}  # fmt: skip


def fake_perf(tmp_path: Path, supported: set[str]) -> str:
    """A ``perf`` that answers ``perf stat -x, [-a|-C L] -e EVENTS -- true`` as perf 6.1 does on a host whose
    kernel maps only ``supported``: counted rows, and ``<not supported>,,EVENT,0,100.00,,`` for the rest (the row
    perf 6.1 printed here, tests/data/perf-stat_x-I500_hw-not-supported_pvm-host.txt)."""
    script = tmp_path / "perf"
    script.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from harness.host.loads import parse_events
        args = sys.argv[1:]
        for event in parse_events(args[args.index("-e") + 1]):
            name = event.name
            if name in {sorted(supported)!r}:
                print(f"123456,,{{event.text}},1000000,100.00,,", file=sys.stderr)
            else:
                print(f"<not supported>,,{{event.text}},0,100.00,,", file=sys.stderr)
        """)
    )
    script.chmod(0o755)
    return str(script)


def test_multiplexing_load_runs_on_amd_and_intel(tmp_path):
    """F5: the old list (bus-cycles, ref-cycles) is unavailable on every AMD host; the shipped one counts on both
    vendors and still has more events than an x86 core has counters."""
    spec = load_loads()["host-multiplexing"]
    events = spec.event_list()
    assert len(events) > 16 and {e.name for e in events} <= INTEL_MAP & AMD_ZEN2_MAP
    (tmp_path / "amd").mkdir()
    (tmp_path / "intel").mkdir()
    amd = fake_perf(tmp_path / "amd", AMD_ZEN2_MAP)
    intel = fake_perf(tmp_path / "intel", INTEL_MAP)
    assert precheck(spec.events(), amd, ["-C", "3"]) is None
    assert precheck(spec.events(), intel, ["-C", "3"]) is None
    old = "cycles:H,instructions:H,branches:H,branch-misses:H,cache-references:H,cache-misses:H,bus-cycles:H," \
        "ref-cycles:H"  # fmt: skip
    assert precheck(old, amd) == "perf: bus-cycles:H <not supported>, ref-cycles:H <not supported>"


def test_not_counted_is_no_reason_to_skip_a_load(tmp_path):
    """A hybrid host prints one row per core PMU; the PMU the pre-check's task never ran on reads
    ``<not counted>`` (shared/data/perf-stat/json_not-counted_hybrid-cpu_atom.txt): the event is there."""
    script = tmp_path / "perf"
    script.write_text(f"#!{sys.executable}\nimport sys\n"
                      "print('812345,,cpu_core/cycles:H/,1000000,100.00,,', file=sys.stderr)\n"
                      "print('<not counted>,,cpu_atom/cycles:H/,0,0.00,,', file=sys.stderr)\n")  # fmt: skip
    script.chmod(0o755)
    assert precheck("cycles:H", str(script)) is None
    script.write_text(f"#!{sys.executable}\nimport sys\n"
                      "print('<not supported>,,cpu_core/cycles:H/,0,100.00,,', file=sys.stderr)\n"
                      "print('<not supported>,,cpu_atom/cycles:H/,0,100.00,,', file=sys.stderr)\n")  # fmt: skip
    assert precheck("cycles:H", str(script)) == "perf: cycles:H <not supported>"


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("cycles:GH,instructions:H", [("cycles", "GH", "core"), ("instructions", "H", "core")]),
        ("{cycles:GH,instructions:GH}:D", [("cycles", "GHD", "core"), ("instructions", "GHD", "core")]),
        ("{cycles,instructions}:H", [("cycles", "H", "core"), ("instructions", "H", "core")]),
        ("cpu/event=0x3c,umask=0x0/H,r01c2:G", [("cpu/event=0x3c,umask=0x0/", "H", "core"), ("r01c2", "G", "core")]),
        ("cpu_core/cycles/GH", [("cpu_core/cycles/", "GH", "core")]),
        ("power/energy-pkg/,msr/tsc/", [("power/energy-pkg/", "", "other-pmu"), ("msr/tsc/", "", "other-pmu")]),
        ("sched:sched_switch,cpu-clock,duration_time", [("sched:sched_switch", "", "tracepoint"),
                                                        ("cpu-clock", "", "software"),
                                                        ("duration_time", "", "software")]),
    ],
)  # fmt: skip
def test_event_lists_parse_as_perf_reads_them(argument, expected):
    """Commas inside pmu/terms/ and {groups} do not split; group modifiers reach every member
    (tools/perf/util/parse-events.y); tracepoints' ':' is no modifier."""
    assert [(e.name, e.modifiers, e.kind) for e in parse_events(argument)] == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[x]\ndescription = "d"\ncomand = ["perf"]\n', "unknown key 'comand'"),
        ('[x]\ncommand = ["perf", "stat"]\n', "missing field 'description'"),
        ('[x]\ndescription = "d"\ncommand = ["sh", "-c", "perf stat"]\n', 'starting with "perf"'),
        ('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-t", "{vcpu_tid}"]\n', "unknown placeholder {vcpu_tid}"),
        ('[x]\ndescription = "d"\n', "missing field 'command'"),
        ('[x]\ndescription = "d"\ncommand = "perf stat"\n', "field 'command' must be a list"),
        # R7: a hardware event without G/H: perf >= 6.12 retries a refused include-guest event as host-only
        ('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-e", "cycles"]\n',
         "field 'command': event 'cycles' has no G/H modifier"),
        ('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-e", "{cycles,instructions}:D"]\n',
         "event 'cycles' has no G/H modifier"),
        ('[x]\ndescription = "d"\ncommand = ["perf", "record", "-e", "cpu/event=0x3c/", "-o", "{output}"]\n',
         "event 'cpu/event=0x3c/' has no G/H modifier"),
        ('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-e", "cpu-clock,ref-cycles:u"]\n',
         "event 'ref-cycles:u' has no G/H modifier"),
        ('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-e", "cycles:H"]\ncounts_guest = true\n',
         "field 'counts_guest' is true but no hardware event counts guest time"),
        ('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-e", "cycles:H,instructions:GH"]\n',
         "field 'counts_guest' must be true: event 'instructions:GH' counts guest time"),
        # where the evidence goes: perf record into {output}, perf stat onto stderr
        ('[x]\ndescription = "d"\ncommand = ["perf", "record", "-a", "-e", "cycles:H"]\n',
         "a perf record load must write to {output}"),
        ('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-a", "-o", "/tmp/x", "-e", "cycles:H"]\n',
         "a perf stat load must not use -o"),
    ],
)  # fmt: skip
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
    """No PMU here: the kernel's answer to the include-guest probe (ENOENT, recorded) is no refusal, and perf's
    pre-check on the load's own CPUs (-a) makes the scenario unavailable with perf's words."""
    reason = precheck("cycles:GH", target=["-a"])
    if reason is None:
        pytest.skip("host: hardware events count here")
    spec = LoadSpec("hw", "d", ("perf", "stat", "-a", "-e", "cycles:GH"), counts_guest=True)
    with HostLoad(spec, tmp_path, [1], [0]) as load:
        assert load.result.status == "unavailable"
    assert load.result.reason == "perf: cycles:GH <not supported>"
    assert load.result.probe["errno"] == errno.ENOENT and load.result.probe["target"] == "cpu 0"


def test_empty_vcpu_placeholders_make_the_load_unavailable(tmp_path):
    """``-t ""`` or ``-C ""`` would make perf follow nothing (or everything): name the missing fact instead."""
    tids = LoadSpec("t", "d", ("perf", "stat", "-t", "{vcpu_tids}", "-e", "cpu-clock"))
    cpus = LoadSpec("c", "d", ("perf", "stat", "-C", "{vcpu_cpus}", "-e", "cpu-clock"))
    assert HostLoad(tids, tmp_path, [], [0]).start().reason.startswith("no vCPU thread ids")
    assert HostLoad(cpus, tmp_path, [1], []).start().reason.startswith("the vCPUs are not pinned")


def test_a_thread_load_whose_threads_exit_says_so(tmp_path):
    """``perf stat -t`` ends by itself once the threads it follows exit (e.g. the guest was restarted)."""
    child = subprocess.Popen(["sleep", "30"])
    spec = LoadSpec("t", "d", ("perf", "stat", "-t", "{vcpu_tids}", "-x", ",", "-I", "100", "-e", "task-clock"))
    load = HostLoad(spec, tmp_path, [child.pid], [0])
    try:
        load.start()
        assert load.result.status == "running", load.result.reason
        child.kill()
        child.wait()
        deadline = time.monotonic() + 10
        while load._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        load.snapshot()
    finally:
        load.stop()
        child.kill()
    assert load.result.status == "died"
    assert f"the vCPU threads {child.pid} it followed have exited" in load.result.reason


def test_a_sampling_load_really_records_and_counts_its_samples(tmp_path):
    """The shipped host-sampling options with a software event (no PMU needed): perf accepts them, the load is
    running once its first sample is in the file, a stale file from an earlier run is not counted, and the
    snapshot and the final summary count samples (perf's own count when it prints one)."""
    command = list(load_loads()["host-sampling"].command)
    command[command.index("cycles:GH")] = "cpu-clock"
    spec = LoadSpec("rec", "d", tuple(command))
    stale = tmp_path / "rec.data.2026010100000000"
    stale.write_bytes(b"PERFILE2")
    load = HostLoad(spec, tmp_path, [1], [0])
    result = load.start()
    try:
        assert result.status == "running", result.reason
        assert not stale.exists()
        time.sleep(0.3)
        seen = load.snapshot()["cpu-clock"]
        assert seen["status"] == "counted" and seen["value"] > 0 and seen["unit"] == "samples"
    finally:
        result = load.stop()
    final = result.events["cpu-clock"]
    assert final["value"] >= seen["value"] > 0
    assert coexist.host_load(spec, result, None, {}).status == "pass"


def test_a_load_that_exits_at_once_is_unavailable(tmp_path):
    spec = LoadSpec("bad", "d", ("perf", "stat", "--no-such-option"))
    with HostLoad(spec, tmp_path, [1], [0]) as load:
        pass
    assert load.result.status == "unavailable" and load.result.reason.startswith("perf:")


@pytest.mark.integration
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_leaves_no_perf_behind(guest_image, sig, code, tmp_path):
    """Ctrl-C or SIGTERM in the middle of a check group under a software load: the run stops with 130/143 and
    perf and QEMU are gone afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "run", "--image", str(guest_image.directory), "--profile", "pmu-on",
         "--load", "host-sw-counting", "--out", str(tmp_path / "out")],
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
    path.write_text('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-a", "-e", "cycles"]\n')
    assert_one_line_error(run_cli("run", "--loads-file", str(path), "--out", str(tmp_path)), str(path),
                          "[x]", "field 'command'", "event 'cycles' has no G/H modifier")  # fmt: skip


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
