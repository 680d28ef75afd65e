"""`python -m harness exec` end to end, including Ctrl-C, SIGTERM and SIGKILL of the harness itself."""

from __future__ import annotations

import os
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT
from tests.conftest import qemu_pids
from tests.helpers import run_cli

pytestmark = pytest.mark.integration


def test_exec_prints_guest_kernel_release(guest_image):
    proc = run_cli("exec", "--image", str(guest_image.directory), "--", "uname", "-r")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == guest_image.kernel_release


def test_exec_exit_code_and_streams(guest_image, tmp_path):
    proc = run_cli("exec", "--image", str(guest_image.directory), "--profile", "pmu-off", "--log-dir",
                   str(tmp_path), "--", "echo out; echo err >&2; exit 7")  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, "out\n", "err\n")
    assert "VPMU-GUEST-READY" in (tmp_path / "serial.log").read_text()
    assert (tmp_path / "qemu.log").exists()


def test_exec_command_timeout_reports_serial_tail(guest_image):
    proc = run_cli("exec", "--image", str(guest_image.directory), "--timeout", "1", "--", "sleep 30")
    assert proc.returncode == 1
    assert "timeout after 1 s" in proc.stderr and "VPMU-GUEST-READY" in proc.stderr


def test_exec_kvm_where_unusable_is_usage_error(host_facts):
    if host_facts["accel"] == "kvm":
        pytest.skip("host: KVM is usable here")
    proc = run_cli("exec", "--accel", "kvm", "--", "true")
    assert proc.returncode == 2 and "KVM is not usable here" in proc.stderr


def children_qemu(pid: int) -> set[int]:
    found = set()
    for qpid in qemu_pids():
        try:
            if int(Path(f"/proc/{qpid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(qpid)
        except (OSError, IndexError, ValueError):
            continue
    return found


def start_exec_and_wait_ready(image_dir: Path, command: str = "sleep 60") -> tuple[subprocess.Popen, int]:
    """Start `exec -- COMMAND` and return once the guest runs the command; also return QEMU's pid."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "-v", "exec", "--image", str(image_dir), "--", command],
        cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    seen = ""
    while "guest ready" not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"guest never became ready: {seen}"
        readable, _, _ = select.select([proc.stderr], [], [], remaining)
        if readable:
            line = proc.stderr.readline()
            assert line, f"exec exited early ({proc.wait()}): {seen}"
            seen += line
    qemu = children_qemu(proc.pid)
    assert len(qemu) == 1
    return proc, qemu.pop()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_interrupting_exec_leaves_nothing_behind(guest_image, sig, code):
    proc, qemu = start_exec_and_wait_ready(guest_image.directory)
    start = time.monotonic()
    proc.send_signal(sig)
    assert proc.wait(30) == code
    assert time.monotonic() - start < 15
    assert not Path(f"/proc/{qemu}").exists()


def test_sigkilled_harness_takes_qemu_with_it(guest_image):
    """Even SIGKILL (no cleanup possible) does not orphan QEMU: it has PR_SET_PDEATHSIG; the temp dir it leaves
    is swept by the next launch."""
    proc, qemu = start_exec_and_wait_ready(guest_image.directory)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{qemu}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{qemu}").exists()
    assert run_cli("exec", "--image", str(guest_image.directory), "--", "true").returncode == 0  # sweeps it


def test_exec_dry_run_prints_the_command_line(guest_image):
    proc = run_cli("exec", "--image", str(guest_image.directory), "--profile", "pmu-off", "--dry-run", "--", "true")
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[0].startswith("qemu-system-x86_64")
    assert argv[argv.index("-cpu") + 1] in ("max,pmu=off", "host,pmu=off")
    assert not children_qemu(os.getpid())
