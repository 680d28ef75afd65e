"""Writing the harness's outputs whole or not at all, and checking an output directory before any work starts.

Every output (results.json, junit.xml, matrix.md, matrix.html, the plan file, the image-key memo) is written to a
temporary file in the target's own directory and renamed over the target (rename(2) is atomic within one file
system), so a reader — or a run killed half-way — sees the previous file or the new one, never a truncated one.
The temporary file is removed on every failure (ENOSPC included); one left by a SIGKILLed process is swept by the
next write into that directory (its name carries the writer's PID).

A directory the user names with ``--out``/``--log-dir`` is checked first (:func:`prepare_dir`): created, a probe
file written and removed, and each target that exists must be a regular file. A failure there or at write time is
:class:`~harness.errors.OutputError`: one line naming the path and the reason (``No space left on device (ENOSPC)``,
``Read-only file system (EROFS)``, ``Permission denied (EACCES)``, ``is a file, not a directory``), exit 2.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from harness.errors import OutputError

#: Prefix of every temporary output file: ``.vpmu-tmp-<pid>-<token>-<target name>``.
TMP_PREFIX = ".vpmu-tmp-"
#: Bytes the directory probe writes: one page, so a file system with no free block fails it (an empty file only
#: needs an inode).
PROBE_BYTES = 4096


def reason(exc: OSError) -> str:
    """``strerror (ENAME)``: the words users know and the name scripts and search engines know."""
    name = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


def _tmp_name(target: Path) -> Path:
    """``.vpmu-tmp-<pid>-<token>-<name>`` beside ``target``."""
    return target.parent / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{target.name}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(directory: Path) -> None:
    """Remove temporary outputs in ``directory`` whose writer is gone (SIGKILL leaves them; nothing else does)."""
    try:
        names = [p for p in Path(directory).iterdir() if p.name.startswith(TMP_PREFIX)]
    except OSError:
        return
    for path in names:
        pid = path.name[len(TMP_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()


@contextlib.contextmanager
def atomic_file(target: Path, option: str = "", binary: bool = False) -> Iterator[IO]:
    """Yield a file open for writing; on a clean exit it is flushed, fsynced and renamed over ``target``.

    On any exception (the caller's, or an OSError while writing, syncing or renaming) the temporary file is
    removed and the target is left as it was. OSErrors become :class:`OutputError` naming ``target``.
    The file is created 0666 & ~umask, like ``open(target, "w")`` would.
    """
    target = Path(target)
    tmp = _tmp_name(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise OutputError(failure_message(target, option, exc)) from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        _remove(tmp)
        raise OutputError(failure_message(target, option, exc)) from None
    except BaseException:
        _remove(tmp)
        raise


def write_text(target: Path, text: str, option: str = "") -> Path:
    """Write ``text`` to ``target`` atomically (see :func:`atomic_file`); return ``target``."""
    with atomic_file(target, option) as out:
        out.write(text)
    return Path(target)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def failure_message(target: Path, option: str, exc: OSError) -> str:
    """One line naming the output that could not be written and why."""
    target = Path(target)
    where = f"{option} {target.parent}: cannot write {target.name}" if option else f"cannot write {target}"
    if exc.errno == errno.EISDIR:
        return f"{where}: {target} is a directory"
    return f"{where}: {reason(exc)}"


def temp_path(target: Path) -> Path:
    """A fresh temporary name beside ``target`` (same directory, so the final rename is atomic)."""
    return _tmp_name(Path(target))


def publish(written: Path, target: Path, option: str = "") -> None:
    """Sync a finished temporary file written by someone else (pytest's junit writer) and rename it over
    ``target``.

    :raises OutputError: the sync or the rename failed (the caller removes ``written``).
    """
    try:
        fd = os.open(written, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(written, target)
    except OSError as exc:
        raise OutputError(failure_message(Path(target), option, exc)) from None


def discard(path: Path) -> None:
    """Remove a temporary file if it is still there."""
    _remove(Path(path))


def make_dir(directory: Path, option: str = "") -> Path:
    """``mkdir -p`` whose failure is one line: a file where a directory must be, or the OS's reason.

    :raises OutputError: naming the directory (and the file in the way).
    """
    directory = Path(directory)
    where = f"{option} {directory}".strip()
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{where}: is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            blocker = next((p for p in directory.parents if p.exists() and not p.is_dir()), directory)
            raise OutputError(f"{where}: {blocker} is a file, not a directory") from None
        raise OutputError(f"{where}: cannot create the directory: {reason(exc)}") from None
    return directory


def prepare_parent(target: Path, option: str = "") -> None:
    """Create ``target``'s directory and sweep temporary files killed writers left there."""
    make_dir(Path(target).parent, option)
    sweep_stale(Path(target).parent)


def prepare_dir(directory: Path, option: str, targets: Iterable[str] = (), subdirs: Iterable[str] = ()) -> Path:
    """Make sure outputs can be written into ``directory`` before any work starts (booting takes seconds).

    Creates it (and its parents), writes and removes a probe file of :data:`PROBE_BYTES`, checks that each name of
    ``targets`` that exists is a regular file and each of ``subdirs`` that exists is a directory, and sweeps
    temporary files of killed writers.

    :raises OutputError: one line naming the path and the reason.
    """
    directory = make_dir(directory, option)
    where = f"{option} {directory}".strip()
    for name in targets:
        path = directory / name
        if path.is_dir():
            raise OutputError(f"{where}: cannot write {name}: {path} is a directory")
    for name in subdirs:
        path = directory / name
        if path.exists() and not path.is_dir():
            raise OutputError(f"{where}: {path} is a file, not a directory")
    sweep_stale(directory)
    problem = writable_problem(directory)
    if problem:
        raise OutputError(f"{where}: cannot write there: {problem}")
    return directory


def writable_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot take more data right now (full, read-only), or None: used after a run to tell
    whether logs written there by other processes (QEMU, perf), which cannot report a failed write to us, may
    be cut."""
    probe = _tmp_name(Path(directory) / "probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
        finally:
            os.close(fd)
    except OSError as exc:
        return reason(exc)
    finally:
        _remove(probe)
    return None


# --- logs that could not be written completely ----------------------------------------------------------------

#: log path -> why it is incomplete, recorded by the harness's own log writers (the serial console drain).
_INCOMPLETE: dict[str, str] = {}
_INCOMPLETE_LOCK = threading.Lock()


def record_incomplete(path: Path, why: str) -> None:
    """A log the harness writes itself lost data (e.g. ENOSPC): remember it for results.json's ``logs_incomplete``.
    The first reason recorded for a path is kept (it is the cause; later ones follow from it)."""
    with _INCOMPLETE_LOCK:
        _INCOMPLETE.setdefault(str(path), why)


def incomplete_logs(directory: Path) -> list[dict[str, str]]:
    """``[{"path", "reason"}]``: the logs under ``directory`` that are not complete.

    Logs the harness writes report their own failures (:func:`record_incomplete`). QEMU (qemu.log) and perf (the
    host-load output) write theirs through inherited descriptors and cannot tell us of a failed write, so every
    file in a directory that cannot take more data when the run ends (full, read-only) is listed as possibly cut.
    """
    directory = Path(directory)
    with _INCOMPLETE_LOCK:
        found = {p: why for p, why in _INCOMPLETE.items() if Path(p).is_relative_to(directory)}
    if directory.is_dir():
        for sub in [directory, *sorted(p for p in directory.rglob("*") if p.is_dir())]:
            problem = writable_problem(sub)
            if problem is None:
                continue
            for path in sorted(p for p in sub.iterdir() if p.is_file() and not p.name.startswith(TMP_PREFIX)):
                found.setdefault(str(path), f"{problem} when the run ended: written by QEMU or perf, which cannot "
                                            "report a failed write, so it may be cut")  # fmt: skip
    return [{"path": path, "reason": why} for path, why in sorted(found.items())]
