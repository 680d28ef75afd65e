"""Probe pipeline: render a C template, compile it static on the host (cached), copy it into the guest, run it
pinned with a deadline, and parse its JSON lines.

A probe that crashes, times out, prints garbage or stops before its final ``done`` record raises
:class:`ProbeError` with its stderr: it is an ERROR, never a silent pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from harness.errors import GuestCommandError, HarnessError, ToolMissingError, tail
from harness.guest.ssh import GuestSession
from harness.lifetime import phase
from harness.paths import GUEST_TESTS_DIR, cache_root
from harness.probe.workloads import LOOP

PROBES_DIR = GUEST_TESTS_DIR / "probes"
CFLAGS = ("-static", "-O2", "-Wall", "-fno-strict-aliasing")
GUEST_PROBE_DIR = "/tmp/vpmu-probes"
DEFAULT_PROBE_TIMEOUT_S = 120.0
#: The guest kills a probe (busybox ``timeout -s KILL``) this many seconds before the harness gives up on it: dropbear
#: does not kill a command without a pty when its channel closes (svr-chansession.c), so a probe the harness
#: abandoned would otherwise keep spinning on its pinned vCPU and skew what runs after it.
GUEST_KILL_MARGIN_S = 5.0
#: Exit status dropbear/the guest shell reports for a process killed by signal N is 128 + N.
SIGNAL_BASE = 128


class ProbeError(HarnessError):
    """A probe did not produce a complete, well-formed result."""

    def __init__(self, probe: str, reason: str, stderr: str = "", records: list[dict[str, Any]] | None = None):
        self.probe = probe
        self.reason = reason
        self.stderr = stderr
        self.records = records or []
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"probe {self.probe}: {self.reason}"
        if self.stderr.strip():
            text += "\n  stderr: " + tail(self.stderr, 8).replace("\n", "\n          ")
        return text


@dataclass(frozen=True)
class BuiltProbe:
    """A compiled probe: its binary, the rendered source (kept as an artifact) and the content hash."""

    name: str
    key: str
    binary: Path
    source: Path


@dataclass
class ProbeRun:
    """What one probe run produced."""

    name: str
    records: list[dict[str, Any]]
    stderr: str
    duration_s: float
    copy_s: float = 0.0
    binary: Path | None = None

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ToolMissingError(f"C compiler `{cc}` not usable ({exc}); install the Debian package gcc") from None
    return out.splitlines()[0]


class ProbeBuilder:
    """Renders and compiles probes; the cache key covers the templates, the parameters and the compiler."""

    def __init__(self, probes_dir: Path = PROBES_DIR, cache_dir: Path | None = None, cc: str = "gcc") -> None:
        self.probes_dir = probes_dir
        self.cache_dir = cache_dir or cache_root() / "probes"
        self.cc = cc
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(probes_dir)),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
        )
        self._compiler = ""

    def render(self, name: str, params: dict[str, Any]) -> str:
        """Render ``probes/<name>.c.j2`` with ``params`` (plus ``probe`` and the workload)."""
        try:
            template = self._env.get_template(f"{name}.c.j2")
        except jinja2.TemplateNotFound:
            raise HarnessError(f"no probe template {self.probes_dir / (name + '.c.j2')}") from None
        return template.render(probe=name, workload=LOOP.template_params(), **params)

    def _key(self, name: str, params: dict[str, Any]) -> str:
        if not self._compiler:
            self._compiler = _compiler_version(self.cc)
        digest = hashlib.sha256()
        for path in sorted(self.probes_dir.glob("*.j2")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        payload = {"name": name, "params": params, "workload": LOOP.template_params(), "cc": self._compiler,
                   "cflags": CFLAGS}  # fmt: skip
        digest.update(json.dumps(payload, sort_keys=True, default=str).encode())
        return digest.hexdigest()

    def build(self, name: str, params: dict[str, Any] | None = None) -> BuiltProbe:
        """Return the compiled probe, compiling only when no cached binary has the same key.

        :raises ProbeError: the rendered source does not compile (the compiler's errors attached).
        """
        params = params or {}
        key = self._key(name, params)
        directory = self.cache_dir / key[:16]
        binary, source = directory / name, directory / f"{name}.c"
        if binary.is_file():
            return BuiltProbe(name, key, binary, source)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=directory) as tmp:
            src = Path(tmp) / f"{name}.c"
            src.write_text(self.render(name, params))
            out = Path(tmp) / name
            done = subprocess.run([self.cc, *CFLAGS, "-o", str(out), str(src)], capture_output=True, text=True,
                                  check=False)  # fmt: skip
            if done.returncode != 0:
                raise ProbeError(name, f"does not compile ({self.cc} exit {done.returncode})", done.stderr)
            os.replace(src, source)
            os.replace(out, binary)
        return BuiltProbe(name, key, binary, source)


def parse_records(name: str, stdout: str, stderr: str = "") -> list[dict[str, Any]]:
    """Parse a probe's stdout: JSON objects with ``probe`` and ``kind``, ending with a ``done`` record.

    :raises ProbeError: a line is not such an object, or the ``done`` record is missing.
    """
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(stdout.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ProbeError(name, f"line {lineno} is not JSON: {line[:100]!r}", stderr, records) from None
        if not isinstance(record, dict) or "probe" not in record or "kind" not in record:
            raise ProbeError(name, f"line {lineno} lacks 'probe'/'kind': {line[:100]!r}", stderr, records)
        records.append(record)
    if not records:
        raise ProbeError(name, "no output", stderr)
    if records[-1].get("kind") != "done":
        raise ProbeError(name, "output ends before the final 'done' record (truncated)", stderr, records)
    return records[:-1]


def guest_deadline_s(timeout_s: float) -> int:
    """Whole seconds the guest's ``timeout -s KILL`` gives a probe the harness waits ``timeout_s`` for."""
    return max(1, int(timeout_s - GUEST_KILL_MARGIN_S))


@dataclass
class ProbeRunner:
    """Builds probes and runs them in one guest; a probe binary is copied into the guest once."""

    session: GuestSession
    builder: ProbeBuilder = field(default_factory=ProbeBuilder)
    _copied: set[str] = field(default_factory=set)

    def run(
        self,
        name: str,
        params: dict[str, Any] | None = None,
        args: tuple[str, ...] = (),
        cpu: int = 0,
        timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
    ) -> ProbeRun:
        """Build (cached), copy (once per guest) and run a probe pinned to ``cpu``; return its records.

        :param timeout_s: seconds the probe may run; the guest kills it GUEST_KILL_MARGIN_S earlier (so it never
            outlives the harness's wait); a guest or QEMU that dies, freezes or drops the session ends the run
            earlier with the session's SshError (harness.guest.ssh: at once, or within its keepalive bound).
        :raises ProbeError: compile failure, crash (signal or non-zero exit), timeout, garbage or truncated output.
        :raises SshError: the copy or the run lost the guest (the reason names how).
        """
        probe = self.builder.build(name, params)
        remote = f"{GUEST_PROBE_DIR}/{probe.key[:16]}-{name}"
        copy_s = 0.0
        if remote not in self._copied:
            start = time.monotonic()
            self.session.check(f"mkdir -p {GUEST_PROBE_DIR}")
            phase("probe_copy", session=self.session)
            self.session.put(probe.binary, remote, mode=0o755)
            copy_s = time.monotonic() - start
            self._copied.add(remote)
        # "; exit $?" keeps the guest shell as the probe's parent (no exec), so a probe killed by a signal
        # reports 128 + N instead of an SSH exit-signal paramiko does not surface. busybox timeout execs the probe
        # (same pid) and kills it from a forked watcher.
        guest_s = guest_deadline_s(timeout_s)
        command = shlex.join(["timeout", "-s", "KILL", str(guest_s), remote, str(cpu), *args]) + "; exit $?"
        try:
            result = self.session.run(command, timeout_s=timeout_s, phase="probe_run")
        except GuestCommandError as exc:
            raise ProbeError(name, exc.reason, exc.stderr) from exc
        if result.rc != 0:
            why = f"exit code {result.rc}"
            if result.rc == SIGNAL_BASE + 9 and result.duration_s >= guest_s:
                why = f"timeout after {guest_s} s (killed in the guest by timeout -s KILL)"
            elif result.rc > SIGNAL_BASE:
                why = f"killed by signal {result.rc - SIGNAL_BASE}"
            elif result.rc < 0:
                why = "terminated by a signal (no exit status)"
            raise ProbeError(name, why, result.stderr)
        records = parse_records(name, result.stdout, result.stderr)
        return ProbeRun(name, records, result.stderr, result.duration_s, copy_s, probe.binary)
