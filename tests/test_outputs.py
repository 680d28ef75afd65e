"""Outputs are written whole or not at all, on real faulty file systems.

ENOSPC comes from a real tmpfs of 64 KiB filled to its last block; EROFS from a tmpfs remounted read-only. We run as
root, so EACCES cannot be produced with permissions (root bypasses them): EROFS and an immutable directory
(``chattr +i``, EPERM; where the file system supports it) stand for "cannot write here". A writer killed half-way
is a real child process SIGKILLed while it holds the temporary file open.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import cli, outputs
from harness.errors import OutputError
from harness.guest import console
from harness.paths import REPO_ROOT
from harness.report import matrix, render, results
from tests.helpers import assert_one_line_error, mount_tmpfs, run_cli
from tests.test_cli_inputs import fill


def remount(target: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(target)], check=True, capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 64 KiB tmpfs (empty; tests fill it or remount it read-only)."""
    target = tmp_path / "fs"
    mount_tmpfs(target, "size=64k,mode=0755")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def leftovers(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.name.startswith(outputs.TMP_PREFIX))


def document(padding: int = 0) -> dict:
    doc = results.build({"hostname": "h", "accel": "tcg", "padding": "x" * padding}, [])
    return doc


# --- atomic writes ---------------------------------------------------------------------------------------------


def test_results_on_a_full_disk_keep_the_previous_file(tmpfs: Path) -> None:
    """ENOSPC half-way through results.json: the previous file is untouched, the temporary file is gone, the error
    is one line naming the file and the errno."""
    target = tmpfs / "results.json"
    results.write(target, document())
    before = target.read_bytes()
    fill(tmpfs)
    with pytest.raises(OutputError) as err:
        results.write(target, document(padding=200_000))
    assert "No space left on device (ENOSPC)" in str(err.value) and "results.json" in str(err.value)
    assert "\n" not in str(err.value)
    assert target.read_bytes() == before
    assert leftovers(tmpfs) == []


def test_write_larger_than_the_free_space_fails_mid_write(tmpfs: Path) -> None:
    """Free space for the probe but not for the document: the write itself fails part-way (a short write, then
    ENOSPC), and nothing of it remains."""
    target = tmpfs / "matrix.md"
    outputs.prepare_dir(tmpfs, "--out")  # the up-front probe passes: the disk is not full yet
    with pytest.raises(OutputError, match="ENOSPC"):
        outputs.write_text(target, "x" * 200_000, "--out")
    assert not target.exists()
    assert leftovers(tmpfs) == []


def test_read_only_file_system(tmpfs: Path) -> None:
    target = tmpfs / "results.json"
    results.write(target, document())
    before = target.read_bytes()
    remount(tmpfs, "ro")
    with pytest.raises(OutputError, match=r"Read-only file system \(EROFS\)"):
        results.write(target, document(padding=10))
    with pytest.raises(OutputError, match="EROFS"):
        outputs.prepare_dir(tmpfs, "--out")
    assert target.read_bytes() == before


def test_immutable_directory(tmp_path: Path) -> None:
    """As root, EACCES cannot be produced with permissions; an immutable directory (chattr +i) refuses new files
    with EPERM, the same "cannot write here" case."""
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(["chattr", "+i", str(out)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"chattr +i not supported here: {done.stderr.strip()}")
    try:
        with pytest.raises(OutputError, match=r"Operation not permitted \(EPERM\)"):
            outputs.prepare_dir(out, "--out")
        with pytest.raises(OutputError, match="EPERM"):
            results.write(out / "results.json", document())
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=False)
    assert list(out.iterdir()) == []


def test_target_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "results.json").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        results.write(tmp_path / "results.json", document())
    with pytest.raises(OutputError, match=r"results\.json is a directory"):
        outputs.prepare_dir(tmp_path, "--out", ("results.json",))
    assert leftovers(tmp_path) == []


def test_out_that_is_a_file_or_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match=r"--out .*/f: is a file, not a directory"):
        outputs.prepare_dir(tmp_path / "f", "--out")
    with pytest.raises(OutputError, match=r"--out .*/f/sub: .*/f is a file, not a directory"):
        outputs.prepare_dir(tmp_path / "f" / "sub", "--out")
    with pytest.raises(OutputError, match="is a file"):
        results.write(tmp_path / "f" / "results.json", document())


def test_render_writes_both_reports_or_neither_is_cut(tmpfs: Path) -> None:
    """matrix.md and matrix.html: on ENOSPC each is the previous version or absent, never a prefix."""
    doc = document()
    render.write(matrix.build([doc]), tmpfs)
    before = {name: (tmpfs / name).read_bytes() for name in ("matrix.md", "matrix.html")}
    fill(tmpfs)
    with pytest.raises(OutputError, match="ENOSPC"):
        render.write(matrix.build([doc]), tmpfs)
    assert {name: (tmpfs / name).read_bytes() for name in before} == before
    assert leftovers(tmpfs) == []


def test_written_file_mode_follows_the_umask(tmp_path: Path) -> None:
    """Like open(..., "w"): 0666 & ~umask, not mkstemp's 0600 (CI artifact uploaders run as other users)."""
    old = os.umask(0o022)
    try:
        outputs.write_text(tmp_path / "x", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o644


def test_a_writer_killed_half_way_leaves_the_previous_file(tmp_path: Path) -> None:
    """SIGKILL while the temporary file is half written: the target is the previous version; the orphaned
    temporary file (its PID is dead) is removed by the next write into that directory."""
    target = tmp_path / "results.json"
    results.write(target, document())
    before = target.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from harness import outputs
        with outputs.atomic_file({str(target)!r}) as out:
            out.write('{{"schema": "vpmu-results/2", "host": {{')
            out.flush()
            print("half", flush=True)
            time.sleep(60)
        """)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout is not None and child.stdout.readline().strip() == "half"
    assert len(leftovers(tmp_path)) == 1  # the half-written temporary file
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    child.stdout.close()
    assert target.read_bytes() == before
    results.load(target)  # still a valid results file
    results.write(target, document(padding=5))
    assert leftovers(tmp_path) == []
    assert json.loads(target.read_text())["host"]["padding"] == "xxxxx"


def test_an_exception_while_writing_removes_the_temporary_file(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), outputs.atomic_file(tmp_path / "x") as out:
        out.write("partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# --- junit.xml (pytest writes it in place; the plugin makes it atomic) -------------------------------------------

TRIVIAL_SUITE = "def test_one():\n    pass\n"


def run_pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """A tiny suite under the vpmu plugin, in a fresh process (the plugin's session hooks run for real)."""
    suite = tmp_path / "suite"
    suite.mkdir(exist_ok=True)
    (suite / "test_trivial.py").write_text(TRIVIAL_SUITE)
    return subprocess.run([sys.executable, "-m", "pytest", str(suite), "-p", "harness.suite.pytest_plugin", "-p",
                           "no:cacheprovider", "--rootdir", str(suite), *args], capture_output=True, text=True,
                          cwd=suite, timeout=120, check=False)  # fmt: skip


def test_junit_is_renamed_into_place(tmp_path: Path) -> None:
    proc = run_pytest(tmp_path, "--junitxml", str(tmp_path / "out" / "junit.xml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "<testsuites" in (tmp_path / "out" / "junit.xml").read_text()
    assert f"generated xml file: {tmp_path / 'out' / 'junit.xml'}" in proc.stdout
    assert leftovers(tmp_path / "out") == []


def test_junit_on_a_full_disk_is_one_error_and_keeps_the_previous_file(tmp_path: Path, tmpfs: Path) -> None:
    target = tmpfs / "junit.xml"
    target.write_text("<previous/>")
    fill(tmpfs)
    proc = run_pytest(tmp_path, "--junitxml", str(target))
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "INTERNALERROR" not in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert f"ERROR: cannot write {target}: No space left on device (ENOSPC)" in proc.stdout
    assert target.read_text() == "<previous/>"
    assert leftovers(tmpfs) == []


def test_results_on_a_full_disk_through_the_plugin(tmp_path: Path, tmpfs: Path) -> None:
    """--results and --junitxml on a disk that fills: the session ends with one ERROR line (pytest exit 4, which
    `python -m harness run` turns into 2), no traceback, no temporary file, and the terminal matrix is skipped."""
    fill(tmpfs)
    proc = run_pytest(tmp_path, "--results", str(tmpfs / "results.json"), "--junitxml", str(tmpfs / "junit.xml"))
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"ERROR: cannot write {tmpfs / 'results.json'}: No space left on device (ENOSPC)" in proc.stdout
    assert "vpmu matrix" not in proc.stdout
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler", "filler-tail"]


def test_rejudge_on_a_disk_that_fills_during_the_run(tmp_path: Path, tmpfs: Path) -> None:
    """The up-front probe passes (the disk has room for it), the results do not fit: exit 2, one ERROR line naming
    results.json, and nothing half-written is left in --out."""
    source = tmp_path / "source.json"
    results.write(source, document(padding=100_000))
    proc = run_cli("rejudge", str(source), "--out", str(tmpfs), timeout_s=300)
    assert_one_line_error(proc, f"cannot write {tmpfs / 'results.json'}", "ENOSPC")
    assert leftovers(tmpfs) == []
    assert not (tmpfs / "results.json").exists()


def test_plan_without_a_usable_temporary_directory(tmp_path: Path, tmpfs: Path, monkeypatch, capsys) -> None:
    """tempfile finds no usable directory (here: the one it is told to use is read-only): one ERROR line."""
    remount(tmpfs, "ro")
    monkeypatch.setattr(tempfile, "tempdir", str(tmpfs))
    code = cli.main(["plan", "--host-facts", str(REPO_ROOT / "tests/data/hosts/spr-perf-based.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"ERROR: TMPDIR {tmpfs}:"), err
    assert "Read-only file system" in err


# --- logs that could not be written completely ------------------------------------------------------------------


def test_serial_log_on_a_full_disk_is_marked_and_the_console_keeps_draining(tmpfs: Path) -> None:
    """serial.log hits ENOSPC: the drain goes on (a stalled pipe would stall the guest; a dead reader would look
    like QEMU's EOF), the console text is complete in memory, and the log is listed as incomplete with the errno."""
    fill(tmpfs)
    read_fd, write_fd = os.pipe()
    log = console.ConsoleLog(read_fd, tmpfs / "serial.log")
    data = b"".join(b"line %06d of the guest console\n" % i for i in range(8000))  # 256 KiB > the pipe's 64 KiB
    with os.fdopen(write_fd, "wb") as pipe:
        pipe.write(data)
        pipe.write(b"VPMU-GUEST-READY\n")
    assert log.wait_for("VPMU-GUEST-READY", timeout_s=10).outcome == "match"
    assert log.wait_for("never", timeout_s=10).outcome == "eof"
    log.close()
    with contextlib.suppress(OSError):
        os.close(read_fd)
    assert log.text().encode() == data + b"VPMU-GUEST-READY\n"
    assert log.write_error is not None and "ENOSPC" in log.write_error
    marked = {entry["path"]: entry["reason"] for entry in outputs.incomplete_logs(tmpfs)}
    assert "serial console: No space left on device (ENOSPC)" in marked[str(tmpfs / "serial.log")]


def test_logs_of_other_writers_in_a_full_directory_are_marked_as_possibly_cut(tmpfs: Path, tmp_path: Path) -> None:
    (tmpfs / "loads").mkdir()
    (tmpfs / "loads" / "host-sampling.out").write_text("perf output")
    (tmpfs / "qemu.log").write_text("qemu")
    fill(tmpfs)
    marked = {Path(e["path"]).name: e["reason"] for e in outputs.incomplete_logs(tmpfs)}
    assert "No space left on device (ENOSPC) when the run ended" in marked["qemu.log"]
    assert "host-sampling.out" in marked
    (tmp_path / "fine").mkdir()
    (tmp_path / "fine" / "qemu.log").write_text("qemu")
    assert outputs.incomplete_logs(tmp_path / "fine") == []


@pytest.mark.integration
def test_run_marks_logs_cut_by_a_full_disk_in_results(guest_image, tmp_path: Path, tmpfs: Path) -> None:
    """A real run whose log directory is on a full file system: the checks still run, and results.json (written
    elsewhere) lists serial.log (the harness's own write failed: ENOSPC) and qemu.log (QEMU's may have) with the
    reason, instead of keeping silent about empty logs."""
    fill(tmpfs)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pytest", "guest_tests", "-p", "no:cacheprovider", "-q", "--image",
                           str(guest_image.directory), "--profile", "pmu-on", "-k", "pmu_visible", "--results",
                           str(out / "results.json"), "--vpmu-log-dir", str(tmpfs / "logs")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    (run,) = results.load(out / "results.json")["runs"]
    marked = {Path(entry["path"]).name: entry["reason"] for entry in run["logs_incomplete"]}
    assert marked["serial.log"].startswith("serial console: No space left on device (ENOSPC) after 0 bytes")
    assert "may be cut" in marked["qemu.log"]
