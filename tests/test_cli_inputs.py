"""Every user-facing command over a table of bad inputs and faults: exit 2 with exactly one ``ERROR:`` line naming
the culprit, never a traceback, and never a guest boot first (each case ends before QEMU starts a guest).

Faults covered: missing, unreadable (a directory, a symlink loop) and garbage files (text and binary), wrong types in
the TOML files (--profiles-file, --loads-file; kvm_features.toml and others given in their place), unknown names, a
PATH without QEMU or perf, a non-kernel --kernel, and output directories that are a file, under a file, read-only
(a read-only tmpfs: as root, EACCES cannot be produced by permissions, so EROFS stands for "cannot write here") or
full (a 64 KiB tmpfs filled to the last block: a real ENOSPC).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.paths import GUEST_TESTS_DIR, cache_root
from tests.helpers import TEST_DATA, assert_one_line_error, mount_tmpfs, run_cli

#: A case must end well before a guest could boot (TCG: ~3 s) or a QEMU property probe could finish twice.
FAST_S = 15.0
#: A doctor --json file of a real host (tests/data/hosts).
SPR = TEST_DATA / "hosts" / "spr-perf-based.json"
RESULTS = {"schema": "vpmu-results/2", "host": {"hostname": "h", "accel": "tcg"}, "runs": []}


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def fill(directory: Path) -> None:
    """Write into ``directory`` until the file system says ENOSPC (every block used; unbuffered, so the error comes
    from the write itself and not from a close)."""
    for name, size in (("filler", 4096), ("filler-tail", 1)):
        with open(directory / name, "wb", buffering=0) as out, contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * size)


@pytest.fixture(scope="module")
def mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A full 64 KiB tmpfs and a read-only tmpfs, unmounted after the module."""
    root = tmp_path_factory.mktemp("mounts")
    full, readonly = root / "full", root / "ro"
    mount_tmpfs(full, "size=64k,mode=0755")
    try:
        fill(full)
        mount_tmpfs(readonly, "ro,size=64k,mode=0755")
        try:
            yield {"full": full, "ro": readonly}
        finally:
            _umount(readonly)
    finally:
        _umount(full)


def path_without(tmp_path: Path, *names: str) -> str:
    """A PATH with every program of this PATH except those named (exactly, or ``name_*``: Debian's perf_6.1)."""
    shadow = tmp_path / "bin"
    shadow.mkdir(exist_ok=True)
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            name = entry.name
            if any(name == n or name.startswith(n + "_") or name.startswith(n + "-") for n in names):
                continue
            link = shadow / name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(entry.path)
    return str(shadow)


@dataclass
class Files:
    """The inputs the cases point at."""

    tmp: Path
    mounts: dict[str, Path] | None = None

    def write(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return str(path)

    @property
    def missing(self) -> str:
        return str(self.tmp / "missing.file")

    @property
    def a_dir(self) -> str:
        (self.tmp / "a-dir").mkdir(exist_ok=True)
        return str(self.tmp / "a-dir")

    @property
    def loop(self) -> str:
        link = self.tmp / "loop"
        if not link.is_symlink():
            link.symlink_to(link)
        return str(link)

    @property
    def garbage(self) -> str:
        return self.write("garbage.txt", "this is [[[ not what you think = \n")

    @property
    def binary(self) -> str:
        return self.write("binary.bin", b"\x00\xff\xfe\x80garbage\xc3\x28" * 64)

    @property
    def results(self) -> str:
        return self.write("results.json", json.dumps(RESULTS))

    @property
    def a_file(self) -> str:
        return self.write("a-file", "x")

    def full(self) -> str:
        """An output directory on the full tmpfs (one per case: the mount is shared by the module)."""
        assert self.mounts is not None
        return str(self.mounts["full"] / self.tmp.name)

    def ro(self) -> str:
        assert self.mounts is not None
        return str(self.mounts["ro"] / self.tmp.name)


@dataclass
class Case:
    """One command with one bad input: its argv (built from the files), environment, and the words the error
    line must contain. ``{x}`` in fragments is replaced by the path the argv used."""

    argv: Callable[[Files], list[str]]
    fragments: tuple[str, ...] = ()
    env: Callable[[Files], dict[str, str]] | None = None
    mounts: bool = False


def toml(text: str) -> Callable[[Files], str]:
    return lambda f: f.write("bad.toml", text)


# fmt: off
PROFILE_TYPES = {
    "description-int": ('[p]\ndescription = 1\ncpu = "max"\n', "field 'description' must be a str"),
    "cpu-list": ('[p]\ndescription = "d"\ncpu = ["max"]\n', "field 'cpu' must be a str"),
    "accels-str": ('[p]\ndescription = "d"\ncpu = "max"\naccels = "tcg"\n', "field 'accels' must be a list"),
    "accels-int": ('[p]\ndescription = "d"\ncpu = "max"\naccels = [1]\n', "field 'accels'"),
    "requires-int": ('[p]\ndescription = "d"\ncpu = "max"\nrequires = [1]\n', "unknown condition"),
    "not-a-table": ("p = 3\n", "must be a table"),
    "empty": ("", "defines no profile"),
    "unknown-key": ('[p]\ndescription = "d"\ncpu = "max"\nlbr_fmt = 1\n', "unknown key 'lbr_fmt'"),
    "cpu-garbage": ('[p]\ndescription = "d"\ncpu = ",,=,"\n', "[p]"),
}
LOAD_TYPES = {
    "command-str": ('[l]\ndescription = "d"\ncommand = "perf stat -a"\n', "'command'"),
    "command-ints": ('[l]\ndescription = "d"\ncommand = [1, 2]\n', "'command'"),
    "counts-guest-str": ('[l]\ndescription = "d"\ncommand = ["perf", "stat", "-e", "cycles:H", "-a"]\n'
                         'counts_guest = "yes"\n', "'counts_guest'"),
    "not-a-table": ("l = 3\n", "must be a table"),
    "description-table": ('[l]\ndescription = {a = 1}\ncommand = ["true"]\n', "'description'"),
}

CASES: dict[str, Case] = {
    # --- doctor / caps -----------------------------------------------------------------------------------------
    "doctor-bad-option": Case(lambda f: ["doctor", "--bogus"], ("unrecognized arguments: --bogus",)),
    "caps-missing": Case(lambda f: ["caps", "--cpuid-dump", f.missing], ("missing.file", "No such file")),
    "caps-dir": Case(lambda f: ["caps", "--cpuid-dump", f.a_dir], ("a-dir",)),
    "caps-loop": Case(lambda f: ["caps", "--cpuid-dump", f.loop], ("loop",)),
    "caps-garbage": Case(lambda f: ["caps", "--cpuid-dump", f.garbage], ("garbage.txt",)),
    "caps-binary": Case(lambda f: ["caps", "--cpuid-dump", f.binary], ("binary.bin",)),
    "caps-empty": Case(lambda f: ["caps", "--cpuid-dump", f.write("empty", "")], ("empty",)),
    "caps-perf-capabilities": Case(lambda f: ["caps", "--cpuid-dump", f.garbage, "--perf-capabilities", "zz"],
                                   ("'zz' is not a number",)),
    # --- image build -------------------------------------------------------------------------------------------
    "image-kernel-missing": Case(lambda f: ["image", "build", "--kernel", f.missing], ("missing.file",)),
    "image-kernel-not-kernel": Case(lambda f: ["image", "build", "--kernel", "/etc/passwd"],
                                    ("/etc/passwd", "not an x86 bzImage")),
    "image-kernel-empty": Case(lambda f: ["image", "build", "--kernel", f.write("vmlinuz", "")],
                               ("vmlinuz", "not an x86 bzImage")),
    "image-kernel-dir": Case(lambda f: ["image", "build", "--kernel", f.a_dir], ("a-dir",)),
    "image-no-busybox": Case(lambda f: ["image", "build"], ("busybox", "busybox-static"),
                             env=lambda f: {"PATH": path_without(f.tmp, "busybox")}),
    "image-out-file": Case(lambda f: ["image", "build", "--out", f.a_file], ("a-file", "not a directory")),
    "image-out-under-file": Case(lambda f: ["image", "build", "--out", f.a_file + "/img"], ("a-file",)),
    "image-out-ro": Case(lambda f: ["image", "build", "--out", f.ro()], ("Read-only file system",), mounts=True),
    "image-out-full": Case(lambda f: ["image", "build", "--out", f.full()], ("No space left",), mounts=True),
    # --- exec --------------------------------------------------------------------------------------------------
    "exec-no-command": Case(lambda f: ["exec"], ("no command given",)),
    "exec-unknown-profile": Case(lambda f: ["exec", "--profile", "nope", "--", "true"], ("no profile 'nope'",)),
    "exec-profiles-missing": Case(lambda f: ["exec", "--profiles-file", f.missing, "--", "true"], ("missing.file",)),
    "exec-profiles-garbage": Case(lambda f: ["exec", "--profiles-file", f.garbage, "--", "true"],
                                  ("garbage.txt", "not valid TOML")),
    "exec-profiles-binary": Case(lambda f: ["exec", "--profiles-file", f.binary, "--", "true"], ("binary.bin",)),
    "exec-profiles-is-kvm-features": Case(
        lambda f: ["exec", "--profiles-file", str(GUEST_TESTS_DIR / "kvm_features.toml"), "--", "true"],
        ("kvm_features.toml",)),
    "exec-image-missing": Case(lambda f: ["exec", "--image", f.missing, "--", "true"], ("missing.file",)),
    "exec-image-file": Case(lambda f: ["exec", "--image", f.a_file, "--", "true"], ("a-file",)),
    "exec-image-incomplete": Case(lambda f: ["exec", "--image", f.a_dir, "--", "true"], ("not a vpmu guest image",)),
    "exec-timeout-negative": Case(lambda f: ["exec", "--timeout", "-1", "--", "true"], ("--timeout",)),
    "exec-timeout-nan": Case(lambda f: ["exec", "--timeout", "nan", "--", "true"], ("--timeout",)),
    "exec-boot-timeout-zero": Case(lambda f: ["exec", "--boot-timeout", "0", "--", "true"], ("--boot-timeout",)),
    "exec-log-dir-file": Case(lambda f: ["exec", "--log-dir", f.a_file, "--", "true"], ("--log-dir", "a-file")),
    "exec-log-dir-ro": Case(lambda f: ["exec", "--log-dir", f.ro(), "--", "true"], ("Read-only",), mounts=True),
    "exec-log-dir-full": Case(lambda f: ["exec", "--log-dir", f.full(), "--", "true"], ("No space left",),
                              mounts=True),
    "exec-no-qemu": Case(lambda f: ["exec", "--", "true"], ("qemu-system-x86_64",),
                         env=lambda f: {"PATH": path_without(f.tmp, "qemu-system")}),
    # --- run ---------------------------------------------------------------------------------------------------
    "run-out-file": Case(lambda f: ["run", "--out", f.a_file], ("--out", "a-file", "is a file, not a directory")),
    "run-out-under-file": Case(lambda f: ["run", "--out", f.a_file + "/sub"], ("a-file", "is a file")),
    "run-out-ro": Case(lambda f: ["run", "--out", f.ro()], ("--out", "Read-only file system (EROFS)"), mounts=True),
    "run-out-full": Case(lambda f: ["run", "--out", f.full()], ("--out", "No space left on device (ENOSPC)"),
                         mounts=True),
    "run-results-is-dir": Case(lambda f: ["run", "--out", str(Path(f.a_dir).parent / "o")],
                               ("results.json", "is a directory")),
    "run-unknown-profile": Case(lambda f: ["run", "--profile", "nope"], ("no profile 'nope'",)),
    "run-unknown-load": Case(lambda f: ["run", "--load", "nope"], ("no load 'nope'",)),
    "run-loads-missing": Case(lambda f: ["run", "--loads-file", f.missing], ("missing.file",)),
    "run-loads-garbage": Case(lambda f: ["run", "--loads-file", f.garbage], ("not valid TOML",)),
    "run-loads-binary": Case(lambda f: ["run", "--loads-file", f.binary], ("binary.bin",)),
    "run-loads-is-profiles": Case(lambda f: ["run", "--loads-file", str(GUEST_TESTS_DIR / "profiles.toml")],
                                  ("profiles.toml",)),
    "run-profiles-is-loads": Case(lambda f: ["run", "--profiles-file", str(GUEST_TESTS_DIR / "loads.toml")],
                                  ("loads.toml",)),
    "run-image-and-kernel": Case(lambda f: ["run", "--image", f.a_dir, "--kernel", f.a_file], ("not both",)),
    "run-kernel-not-kernel": Case(lambda f: ["run", "--kernel", "/etc/passwd", "--out", str(f.tmp / "o")],
                                  ("/etc/passwd", "not an x86 bzImage")),
    "run-kernel-missing": Case(lambda f: ["run", "--kernel", f.missing, "--out", str(f.tmp / "o")],
                               ("missing.file",)),
    "run-image-incomplete": Case(lambda f: ["run", "--image", f.a_dir, "--out", str(f.tmp / "o")],
                                 ("not a vpmu guest image",)),
    "run-image-bad-manifest": Case(lambda f: ["run", "--image", _bad_manifest_image(f), "--out", str(f.tmp / "o")],
                                   ("manifest.json",)),
    "run-no-qemu": Case(lambda f: ["run", "--out", str(f.tmp / "o")], ("qemu-system-x86_64",),
                        env=lambda f: {"PATH": path_without(f.tmp, "qemu-system")}),
    "run-no-perf": Case(lambda f: ["run", "--load", "host-counting-guest", "--out", str(f.tmp / "o")],
                        ("perf", "host-counting-guest"), env=lambda f: {"PATH": path_without(f.tmp, "perf")}),
    # --- report ------------------------------------------------------------------------------------------------
    "render-missing": Case(lambda f: ["report", "render", f.missing, "--out", str(f.tmp / "o")], ("missing.file",)),
    "render-garbage": Case(lambda f: ["report", "render", f.garbage, "--out", str(f.tmp / "o")], ("not valid JSON",)),
    "render-binary": Case(lambda f: ["report", "render", f.binary, "--out", str(f.tmp / "o")], ("binary.bin",)),
    "render-dir": Case(lambda f: ["report", "render", f.a_dir, "--out", str(f.tmp / "o")], ("a-dir",)),
    "render-doctor-json": Case(lambda f: ["report", "render", str(SPR),
                                          "--out", str(f.tmp / "o")], ("not a vpmu results file",)),
    "render-runs-not-list": Case(lambda f: ["report", "render", f.write("r.json", json.dumps({**RESULTS, "runs": 5})),
                                            "--out", str(f.tmp / "o")], ("runs",)),
    "render-run-not-object": Case(lambda f: ["report", "render", f.write("r.json", json.dumps({**RESULTS,
                                  "runs": [1]})), "--out", str(f.tmp / "o")], ("runs[0]",)),
    "render-checks-not-list": Case(lambda f: ["report", "render", f.write("r.json", json.dumps({**RESULTS, "runs": [
        {"profile": "p", "load": "idle", "accel": "tcg", "boot_s": 1, "guest": {}, "checks": {}}]})),
        "--out", str(f.tmp / "o")], ("checks",)),
    "render-check-not-object": Case(lambda f: ["report", "render", f.write("r.json", json.dumps({**RESULTS, "runs": [
        {"profile": "p", "load": "idle", "accel": "tcg", "boot_s": 1, "guest": {}, "checks": ["x"]}]})),
        "--out", str(f.tmp / "o")], ("checks[0]",)),
    "render-host-not-object": Case(lambda f: ["report", "render", f.write("r.json", json.dumps({**RESULTS,
                                   "host": [1]})), "--out", str(f.tmp / "o")], ("host",)),
    "render-out-file": Case(lambda f: ["report", "render", f.results, "--out", f.a_file], ("a-file", "not a dir")),
    "render-out-ro": Case(lambda f: ["report", "render", f.results, "--out", f.ro()], ("Read-only",), mounts=True),
    "render-out-full": Case(lambda f: ["report", "render", f.results, "--out", f.full()], ("No space left",),
                            mounts=True),
    "merge-missing": Case(lambda f: ["report", "merge", f.results, f.missing, "--out", str(f.tmp / "o")],
                          ("missing.file",)),
    "merge-out-full": Case(lambda f: ["report", "merge", f.results, f.results, "--out", f.full()],
                           ("No space left",), mounts=True),
    "diff-missing": Case(lambda f: ["report", "diff", f.missing, f.results], ("missing.file",)),
    "diff-garbage": Case(lambda f: ["report", "diff", f.results, f.garbage], ("garbage.txt",)),
    "diff-json-list": Case(lambda f: ["report", "diff", f.results, f.write("l.json", "[]")], ("l.json",)),
    "kcidb-missing": Case(lambda f: ["report", "kcidb", f.missing, "--out", str(f.tmp / "k.json")], ("missing.file",)),
    "kcidb-garbage": Case(lambda f: ["report", "kcidb", f.garbage, "--out", str(f.tmp / "k.json")],
                          ("garbage.txt", "not valid JSON")),
    "kcidb-doctor-json": Case(lambda f: ["report", "kcidb", str(SPR), "--out", str(f.tmp / "k.json")],
                              ("not a vpmu results file",)),
    "kcidb-no-out": Case(lambda f: ["report", "kcidb", f.results], ("--out",)),
    "kcidb-bad-origin": Case(lambda f: ["report", "kcidb", f.results, "--origin", "Acme-Lab",
                                        "--out", str(f.tmp / "k.json")], ("--origin 'Acme-Lab'",)),
    "kcidb-empty-checkout-id": Case(lambda f: ["report", "kcidb", f.results, "--checkout-id", "",
                                               "--out", str(f.tmp / "k.json")], ("--checkout-id",)),
    "kcidb-out-dir": Case(lambda f: ["report", "kcidb", f.results, "--out", f.a_dir], ("a-dir", "is a directory")),
    "kcidb-out-under-file": Case(lambda f: ["report", "kcidb", f.results, "--out", f.a_file + "/k.json"],
                                 ("a-file", "not a directory")),
    "kcidb-out-ro": Case(lambda f: ["report", "kcidb", f.results, "--out", f.ro() + "/k.json"], ("Read-only",),
                         mounts=True),
    "kcidb-out-full": Case(lambda f: ["report", "kcidb", f.results, "--out", f.full() + "/k.json"],
                           ("No space left",), mounts=True),
    # --- plan --------------------------------------------------------------------------------------------------
    "plan-facts-missing": Case(lambda f: ["plan", "--host-facts", f.missing], ("missing.file",)),
    "plan-facts-garbage": Case(lambda f: ["plan", "--host-facts", f.garbage], ("not valid JSON",)),
    "plan-facts-binary": Case(lambda f: ["plan", "--host-facts", f.binary], ("binary.bin",)),
    "plan-facts-list": Case(lambda f: ["plan", "--host-facts", f.write("l.json", "[1]")], ("JSON object",)),
    "plan-facts-accel-int": Case(lambda f: ["plan", "--host-facts", f.write("h.json", json.dumps(
        {**json.loads(SPR.read_text()), "accel": 3}))], ("'accel'",)),
    "plan-unknown-profile": Case(lambda f: ["plan", "--host-facts", str(SPR),
                                            "--profile", "nope"], ("no profile 'nope'",)),
    "plan-profiles-garbage": Case(lambda f: ["plan", "--host-facts", str(SPR),
                                             "--profiles-file", f.garbage], ("not valid TOML",)),
    # --- rejudge -----------------------------------------------------------------------------------------------
    "rejudge-missing": Case(lambda f: ["rejudge", f.missing, "--out", str(f.tmp / "o")], ("missing.file",)),
    "rejudge-garbage": Case(lambda f: ["rejudge", f.garbage, "--out", str(f.tmp / "o")], ("not valid JSON",)),
    "rejudge-facts-garbage": Case(lambda f: ["rejudge", f.results, "--host-facts", f.garbage, "--out",
                                             str(f.tmp / "o")], ("garbage.txt",)),
    "rejudge-out-file": Case(lambda f: ["rejudge", f.results, "--out", f.a_file], ("a-file", "not a directory")),
    "rejudge-out-ro": Case(lambda f: ["rejudge", f.results, "--out", f.ro()], ("Read-only",), mounts=True),
    "rejudge-out-full": Case(lambda f: ["rejudge", f.results, "--out", f.full()], ("No space left",), mounts=True),
}
# fmt: on
for _name, (_text, _fragment) in PROFILE_TYPES.items():
    CASES[f"run-profiles-{_name}"] = Case(lambda f, t=_text: ["run", "--profiles-file", toml(t)(f)], (_fragment,))
    CASES[f"plan-profiles-{_name}"] = Case(
        lambda f, t=_text: ["plan", "--host-facts", str(SPR),
                            "--profiles-file", toml(t)(f)], (_fragment,))  # fmt: skip
CASES["exec-profiles-accels-str"] = Case(lambda f: ["exec", "--profiles-file", toml(PROFILE_TYPES["accels-str"][0])(f),
                                                    "--profile", "p", "--", "true"], ("must be a list",))  # fmt: skip
for _name, (_text, _fragment) in LOAD_TYPES.items():
    CASES[f"run-loads-{_name}"] = Case(lambda f, t=_text: ["run", "--loads-file", toml(t)(f)], (_fragment,))


def _bad_manifest_image(f: Files) -> str:
    """An image directory with every file, but a manifest.json that is not JSON."""
    image = f.tmp / "bad-image"
    image.mkdir(exist_ok=True)
    for name in ("vmlinuz", "initramfs.cpio.gz", "id_ed25519", "id_ed25519.pub", "host_key.pub"):
        (image / name).write_text("x")
    (image / "manifest.json").write_text("{not json")
    return str(image)


@pytest.fixture
def files(tmp_path: Path, request: pytest.FixtureRequest) -> Files:
    case = CASES[request.node.callspec.params["name"]]
    return Files(tmp_path, request.getfixturevalue("mounts") if case.mounts else None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_error(name: str, files: Files) -> None:
    case = CASES[name]
    if name == "run-results-is-dir":
        (files.tmp / "o" / "results.json").mkdir(parents=True)
    env = {"VPMU_CACHE_DIR": str(cache_root()), **(case.env(files) if case.env else {})}
    start = time.monotonic()
    proc = run_cli(*case.argv(files), env=env, timeout_s=120)
    seconds = time.monotonic() - start
    assert_one_line_error(proc, *case.fragments)
    assert seconds < FAST_S, f"{name} took {seconds:.1f} s: did it boot a guest before checking its input?"
    assert not list(files.tmp.rglob(".vpmu-tmp-*")), "a temporary output file was left behind"


def test_doctor_without_qemu_reports_it(tmp_path: Path) -> None:
    """doctor's job is to report a missing QEMU, not to refuse: its facts, exit 1 (no accelerator), no traceback."""
    proc = run_cli("doctor", env={"PATH": path_without(tmp_path, "qemu-system")})
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "qemu-system-x86_64 is not installed" in proc.stdout


def test_the_table_covers_every_command() -> None:
    """Each user-facing command has cases in the table (a new command must add its own)."""
    commands = {"doctor", "caps", "image", "exec", "run", "render", "merge", "diff", "kcidb", "plan", "rejudge"}
    covered = {name.split("-")[0] for name in CASES}
    assert commands <= covered, commands - covered


def test_mount_helpers_give_real_faults(mounts: dict[str, Path]) -> None:
    """The fixtures are what they claim: the full tmpfs refuses one more page, the read-only one any file."""
    with pytest.raises(OSError, match="No space left"), open(mounts["full"] / "more", "wb", buffering=0) as out:
        out.write(b"\0" * 4096)
    with pytest.raises(OSError, match="Read-only"):
        (mounts["ro"] / "x").write_text("x")
    assert shutil.disk_usage(mounts["full"]).free < 4096


def test_run_default_loads_file_is_the_shipped_one() -> None:
    """cli names guest_tests/loads.toml without importing harness.host.loads (which pulls in qemu.qmp and asyncio)."""
    from harness import cli
    from harness.host import loads

    assert cli.make_parser().parse_args(["run"]).loads_file == loads.DEFAULT_LOADS_FILE
