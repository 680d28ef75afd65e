"""Fault-injection matrix: every fault at every phase of a real ``python -m harness run`` ends cleanly, in bounded time.

Real processes only: each cell is one profile (a copy of ``pmu-on``) of a real run, and its fault is real (a signal
to QEMU, perf or the harness; a command in the guest), fired by the test-only plugin ``tests/fault_plugin.py`` at
the phase the harness announces (harness.lifetime.PHASES). The runs add ``tests/fault_checks.py``, whose check
copies and runs a probe (1 s) in the guest while the group's host load (``host-sw-counting``) runs; a cell
``probe_copy``/``probe_run`` hits that check's probe (the 2nd copy/run of the guest: the 1st is the boot-time
enumeration). Per cell: the fault fired; the affected checks are ERROR with a reason naming the fault (and, for a
guest fault, the serial tail); the others are not; the next profile of the run still runs; results.json is valid;
the fault's consequences end within CELL_BOUND_S; and after all runs no process outlived its run (the test process
is the children's subreaper, so a QEMU or perf left behind would be re-parented to it), no harness temp dir, no
temp file under ``--out`` and no forwarded SSH port remain.

Not meaningful, so not in the matrix (rows: phases; columns: QEMU SIGKILL K, QEMU SIGSTOP S, guest panic P, guest
sshd killed D, host perf load killed L, harness SIGINT I, harness SIGTERM T):

* P and D at boot, capability_probe and ssh_ready: there is no guest shell yet to panic the kernel or kill sshd
  from (a kernel command line that panics is tests/test_guest.py::test_kernel_panic_is_a_boot_failure...).
* L at boot, capability_probe, ssh_ready and shutdown: no host load runs then (loads start after boot and stop
  before the guest shuts down).
* K, S, P, D, L at report: every guest and load is gone before results.json is written (pytest tears the
  session's fixtures down first).
* P and D at shutdown: the SSH session is closed before QMP ``quit``; QMP does not use the guest.

So 45 cells: K, S, I, T at boot, capability_probe, ssh_ready and shutdown (16); K, S, P, D, L, I, T at
probe_copy, probe_run, load_start and load_stop (28); I, T at report (2) -- 46 with both report cells, the 18
I/T cells each end their run, so the 28 others ride in those runs (before the terminating profile) and the matrix
is 18 processes, 3 at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.errors import UsageError
from harness.guest.machine import TMPDIR_PREFIX
from harness.paths import REPO_ROOT
from harness.report import results
from tests.conftest import listeners
from tests.helpers import child_processes

pytestmark = pytest.mark.integration

PR_SET_CHILD_SUBREAPER = 36  # include/uapi/linux/prctl.h
#: From a fault to the moment its profile is done with (the next profile boots, or the report is written).
CELL_BOUND_S = 45.0
#: From a harness SIGINT/SIGTERM to the harness's exit.
INTERRUPT_BOUND_S = 30.0
#: One run (2-3 boots under TCG, on a shared 2-core machine).
RUN_TIMEOUT_S = 240.0
PARALLEL_RUNS = 3
LOAD = "host-sw-counting"
CHECKS = "guest_probe or host_load or pmu_visible"
GUEST_PROBE = "selftest.guest_probe"
SERIAL = "--- serial log (tail) ---"

#: What names each fault in a reason.
FAULT_WORDS = {
    "qemu_sigkill": "killed by signal 9 (SIGKILL)",
    "qemu_sigstop": "SIGSTOP",
    "guest_panic": "Kernel panic - not syncing: sysrq triggered crash",
    "sshd_killed": "sshd died",
    "perf_killed": "SIGKILL",
}
TERMINATING = {"harness_sigint": 130, "harness_sigterm": 128 + signal.SIGTERM}


@dataclass(frozen=True)
class Cell:
    """One fault at one phase, and what it must do to the checks of its profile:

    ``profile``: every check ERRORs (the guest was lost before any check ran); ``probe``: the self-test probe's
    check ERRORs, the others do not; ``load_check``: coexist.host_load ERRORs; ``load``: no check ERRORs, the host
    load's record shows perf's death; ``none``: no check ERRORs; ``interrupt``: the run ends with 128 + signal.
    """

    phase: str
    fault: str
    expect: str
    nth: int = 1

    @property
    def name(self) -> str:
        return f"{self.phase}-{self.fault}".replace("_", "-")


def _matrix() -> list[Cell]:
    cells = []
    for phase in ("boot", "capability_probe", "ssh_ready"):
        cells += [Cell(phase, "qemu_sigkill", "profile"), Cell(phase, "qemu_sigstop", "profile")]
    for phase in ("probe_copy", "probe_run"):
        cells += [Cell(phase, fault, "probe", 2) for fault in ("qemu_sigkill", "qemu_sigstop", "guest_panic",
                                                                 "sshd_killed")]  # fmt: skip
        cells.append(Cell(phase, "perf_killed", "load", 2))
    cells += [Cell("load_start", fault, "profile") for fault in ("qemu_sigkill", "qemu_sigstop", "guest_panic")]
    cells += [Cell("load_start", "sshd_killed", "none"), Cell("load_start", "perf_killed", "load_check")]
    cells += [Cell("load_stop", fault, "none") for fault in ("qemu_sigkill", "qemu_sigstop", "guest_panic",
                                                               "sshd_killed")]  # fmt: skip
    cells.append(Cell("load_stop", "perf_killed", "load"))
    cells += [Cell("shutdown", "qemu_sigkill", "none"), Cell("shutdown", "qemu_sigstop", "none")]
    for phase in ("boot", "capability_probe", "ssh_ready", "probe_copy", "probe_run", "load_start", "load_stop",
                  "report", "shutdown"):  # fmt: skip
        nth = 2 if phase.startswith("probe_") else 1
        cells += [Cell(phase, fault, "interrupt", nth) for fault in TERMINATING]
    return cells


MATRIX = _matrix()


@dataclass
class Run:
    """One ``harness run``: profiles in order (each a cell; the last one's fault ends the run)."""

    cells: list[Cell]
    out: Path = Path()
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    ended_at: float = 0.0
    pid: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    document: dict[str, Any] | None = None

    def profile(self, cell: Cell) -> str:
        return f"{self.cells.index(cell):02d}-{cell.name}"


def _plan() -> list[Run]:
    """Each terminating cell ends a run; the other cells ride in the runs that write results.json with them (not the
    report-phase ones), spread evenly."""
    terminal = [c for c in MATRIX if c.expect == "interrupt"]
    riders = [c for c in MATRIX if c.expect != "interrupt"]
    runs = [Run([c]) for c in terminal]
    hosts = [r for r in runs if r.cells[0].phase != "report"]
    for i, cell in enumerate(riders):
        hosts[i % len(hosts)].cells.insert(-1, cell)
    return runs


def _execute(run: Run, root: Path) -> Run:
    run.out = root / f"run-{run.cells[-1].name}"
    run.out.mkdir()
    profiles = "".join(f'[{run.profile(c)}]\ndescription = "fault cell {c.name}"\ncpu = "host,pmu=on"\n'
                       f'accels = ["kvm", "tcg"]\n\n' for c in run.cells)  # fmt: skip
    (run.out / "profiles.toml").write_text(profiles)
    log = run.out / "faults.jsonl"
    argv = [sys.executable, "-m", "harness", "run", "--profiles-file", str(run.out / "profiles.toml"), "--load", LOAD,
            "--out", str(run.out / "out"), "--", "-p", "tests.fault_plugin", "--vpmu-fault-log", str(log),
            str(REPO_ROOT / "tests" / "fault_checks.py"), "-k", CHECKS]  # fmt: skip
    for cell in run.cells:
        argv += ["--vpmu-inject-fault", f"{run.profile(cell)}:{cell.phase}:{cell.fault}:{cell.nth}"]
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    run.pid = proc.pid
    try:
        run.stdout, run.stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        run.stdout, run.stderr = proc.communicate()
    run.ended_at = time.time()
    run.wall_s = time.monotonic() - start
    run.returncode = proc.returncode
    run.log = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    path = run.out / "out" / "results.json"
    if path.exists():
        try:
            run.document = results.load(path)
        except UsageError as exc:
            run.document = {"invalid": str(exc)}
    return run


def _children() -> list[tuple[int, str]]:
    """Our child processes (with the subreaper set: also every orphan of our runs), reaping the dead ones."""
    found = []
    for pid, comm, state in child_processes(os.getpid()):
        found.append((pid, comm))
        if state == "Z":
            os.waitpid(pid, os.WNOHANG)
    return found


@dataclass
class MatrixResult:
    runs: list[Run]
    wall_s: float
    orphans: list[tuple[int, str]]


@pytest.fixture(scope="module")
def matrix(guest_image, tmp_path_factory) -> MatrixResult:
    """All runs of the matrix, PARALLEL_RUNS at a time, with this process as the subreaper of their orphans."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    root = tmp_path_factory.mktemp("faults")
    before = set(_children())
    start = time.monotonic()
    try:
        with ThreadPoolExecutor(PARALLEL_RUNS) as pool:
            runs = list(pool.map(lambda run: _execute(run, root), _plan()))
        wall = time.monotonic() - start
        deadline = time.monotonic() + 5  # a process killed by PR_SET_PDEATHSIG needs a moment to be re-parented
        orphans = [c for c in _children() if c not in before]
        while orphans and time.monotonic() < deadline:
            time.sleep(0.1)
            orphans = [c for c in _children() if c not in before]
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    print(f"\nfault matrix: {len(MATRIX)} cells in {len(runs)} runs, {wall:.0f} s wall", file=sys.stderr)
    return MatrixResult(runs, wall, orphans)


def _run_of(matrix: MatrixResult, cell: Cell) -> Run:
    return next(run for run in matrix.runs if cell in run.cells)


def _checks(run: Run, profile: str) -> list[dict[str, Any]]:
    assert run.document is not None and "invalid" not in run.document, (run.document, run.stderr[-2000:])
    return [c for r in run.document["runs"] if r["profile"] == profile for c in r["checks"]]


#: Known defects, each a strict xfail so that its fix is noticed (and the mark removed).
KNOWN: dict[str, str] = {}


def _cell_param(cell: Cell) -> Any:
    marks = [pytest.mark.xfail(reason=KNOWN[cell.name], strict=True)] if cell.name in KNOWN else []
    return pytest.param(cell, id=cell.name, marks=marks)


@pytest.mark.parametrize("cell", [_cell_param(c) for c in MATRIX])
def test_fault_cell(matrix, cell):
    run = _run_of(matrix, cell)
    profile = run.profile(cell)
    fired = [r for r in run.log if r.get("fired") == cell.fault and r["profile"] == profile]
    assert fired, (f"{cell.name}: the fault never fired; phases seen: {[r for r in run.log if 'phase' in r]}; "
                   f"run exit {run.returncode}, stderr: {run.stderr[-3000:]}")  # fmt: skip
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    if cell.expect == "interrupt":
        assert run.returncode == TERMINATING[cell.fault], (run.returncode, run.stderr[-2000:])
        assert run.ended_at - fired[0]["t"] < INTERRUPT_BOUND_S
        if run.document is not None:
            assert "invalid" not in run.document, run.document
        return
    # The next profile of the run still ran (reached its boot), within the bound.
    later = run.cells[run.cells.index(cell) + 1]
    booted = [r for r in run.log if r.get("phase") == "boot" and r["profile"] == run.profile(later)]
    assert booted, f"the profile after {cell.name} never booted"
    assert booted[0]["t"] - fired[0]["t"] < CELL_BOUND_S, booted[0]["t"] - fired[0]["t"]
    checks = _checks(run, profile)
    assert checks, f"no checks recorded for {profile}"
    errors = [c for c in checks if c["status"] == "error"]
    words = FAULT_WORDS[cell.fault]
    if cell.expect == "profile":
        assert len(errors) == len(checks), checks
        for check in errors:
            assert words in check["reason"] and SERIAL in check["reason"], check["reason"]
    elif cell.expect == "probe":
        assert [c["id"] for c in errors] == [GUEST_PROBE], errors
        assert words in errors[0]["reason"] and SERIAL in errors[0]["reason"], errors[0]["reason"]
    elif cell.expect == "load_check":
        assert [c["id"] for c in errors] == ["coexist.host_load"], errors
        assert words in errors[0]["reason"], errors[0]["reason"]
    else:
        assert not errors, errors
    if cell.expect == "load":
        load = next(r["host_load"] for r in run.document["runs"] if r["profile"] == profile)
        assert load["returncode"] == -signal.SIGKILL, load


def test_runs_leave_nothing_behind(matrix):
    """No process outlived its run, no harness temp dir, no temp file under --out, every forwarded port closed."""
    assert not matrix.orphans, f"processes outlived their harness: {matrix.orphans}"
    tmp = Path(tempfile.gettempdir())
    for run in matrix.runs:
        assert not list(tmp.glob(f"{TMPDIR_PREFIX}{run.pid}-*")), f"temp dir of run {run.pid} left behind"
        out = run.out / "out"
        stray = [p for p in out.rglob(".*")] if out.exists() else []
        assert not stray, f"temp files left under --out: {stray}"
        for port in [r["port"] for r in run.log if "port" in r]:
            with socket.socket() as probe:
                try:
                    probe.connect(("127.0.0.1", port))
                except ConnectionRefusedError:
                    continue
            # The kernel may have given the port to another self-test run's guest on this machine since.
            holders = listeners(port)
            assert holders and not any(holders.values()), f"port {port} of run {run.pid} still open: {holders}"


def test_matrix_wall_time(matrix):
    """The matrix's budget: about 4 minutes of the self-test suite's 15 on a 2-core machine."""
    assert matrix.wall_s < 300, matrix.wall_s


# --- the issue's own repro and the frozen-guest bound, outside the matrix -------------------------------------------


#: A SIGTERMed QEMU exits with 0 after saying who sent it (qemu_kill_report): the reason quotes that, not "code 0".
MID_COMMAND = [(signal.SIGKILL, "killed by signal 9 (SIGKILL)", 5.0), (signal.SIGSTOP, "SIGSTOP", 30.0),
               (signal.SIGTERM, "terminating on signal 15 from pid", 5.0)]  # fmt: skip


@pytest.mark.parametrize(("sig", "words", "bound_s"), MID_COMMAND, ids=["sigkill", "sigstop", "sigterm"])
def test_exec_notices_qemu_fault_mid_command(guest_image, sig, words, bound_s):
    """`exec -- sleep 60`, then QEMU is killed (or stopped) while the command runs: exec ends at once (a frozen QEMU:
    within the keepalive bound) with the reason and the serial tail, instead of spinning until its 600 s timeout."""
    from tests.test_exec_cli import start_exec_and_wait_ready

    proc, qemu = start_exec_and_wait_ready(guest_image.directory)
    time.sleep(1.0)  # the command runs in the guest by now
    start = time.monotonic()
    os.kill(qemu, sig)
    assert proc.wait(60) == 1
    elapsed = time.monotonic() - start
    stderr = proc.stderr.read() if proc.stderr else ""
    print(f"\nexec after QEMU {signal.Signals(sig).name}: exit in {elapsed:.2f} s", file=sys.stderr)
    assert elapsed < bound_s, elapsed
    assert words in stderr and SERIAL in stderr and "Traceback" not in stderr, stderr
    assert not Path(f"/proc/{qemu}").exists()


def test_locked_up_guest_is_noticed_within_30_s(guest_image, accel):
    """A guest whose vCPUs stop (QMP ``stop``: QEMU still answers, the guest does not) is noticed through unanswered
    SSH keepalives, and a command's wait costs no CPU meanwhile (it sleeps on the channel, not in a poll loop)."""
    from harness.errors import SshError
    from harness.guest.boot import boot_guest
    from harness.guest.qemu_argv import MachineConfig

    config = MachineConfig(image=guest_image, accel=accel, cpu="host" if accel == "kvm" else "max")
    with boot_guest(config) as guest:
        cpu = time.process_time()
        assert guest.ssh.run("sleep 3").rc == 0
        assert time.process_time() - cpu < 0.5  # a 50 ms poll loop plus paramiko costs far less; a spin costs 3 s
        guest.machine.qmp("stop")
        start = time.monotonic()
        with pytest.raises(SshError) as info:
            guest.ssh.run("sleep 60", timeout_s=120)
        elapsed = time.monotonic() - start
    print(f"\nlocked-up guest noticed after {elapsed:.1f} s: {info.value}", file=sys.stderr)
    assert elapsed < 30
    assert "did not answer an SSH keepalive" in str(info.value) and "paused" in str(info.value)


def test_harness_paused_while_a_keepalive_waits_keeps_its_guest(guest_image):
    """The harness stopped for 13 s (Ctrl-Z, a cgroup freeze) while its keepalive waits on a QEMU that is stopped
    too, and QEMU continued only after the harness: the keepalive's 10 s deadline passed while the harness could not
    run, so it asks again instead of declaring the guest dead, and the command ends normally."""
    from tests.test_exec_cli import start_exec_and_wait_ready

    proc, qemu = start_exec_and_wait_ready(guest_image.directory, "sleep 2; echo done")
    try:
        os.kill(qemu, signal.SIGSTOP)
        time.sleep(3.5)  # the next keepalive (every 3 s) is sent and waits on the stopped QEMU
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(13.0)  # longer than the keepalive's 10 s (+ 2 s slack) deadline
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.5)  # the harness looks at its keepalive before QEMU can answer
        with contextlib.suppress(ProcessLookupError):  # a harness that gave up on the guest has killed it by now
            os.kill(qemu, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        for pid in (proc.pid, qemu):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout == "done\n" and "the harness was paused; asking again" in stderr, stderr[-3000:]
