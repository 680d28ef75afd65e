"""Test-only pytest plugin: fire a named fault at a named phase of a real ``python -m harness run``.

It can never fire in a user's run unless asked twice: the plugin lives in ``tests/`` and is loaded only with
``-p tests.fault_plugin`` (nothing loads it by default), and it fires only what ``--vpmu-inject-fault`` names.

``--vpmu-inject-fault PROFILE:PHASE:FAULT[:N]`` (repeatable) fires FAULT the N-th time (default 1) the harness
announces PHASE (harness.lifetime.PHASES) while a check of PROFILE runs (``*``: any profile). Faults are real:

* ``qemu_sigkill`` / ``qemu_sigstop``: the signal to the current guest's QEMU;
* ``guest_panic``: ``echo c > /proc/sysrq-trigger`` in the guest (the kernel panics; ``panic=-1`` and
  ``-no-reboot`` end QEMU);
* ``sshd_killed``: ``killall dropbear`` in the guest (the listener and the session's server; init respawns the
  listener);
* ``perf_killed``: SIGKILL to the process group of the running host perf load;
* ``harness_sigint`` / ``harness_sigterm``: the signal to the harness itself (Ctrl-C, a CI job's timeout).

``--vpmu-fault-log FILE`` appends one JSON line per fired fault (written before it fires, so an interrupted run
keeps it) and per announced phase (``{"phase", "profile", "n", "t", "pid"}``, at ``ssh_ready`` also the forwarded
SSH ``port``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import lifetime
from harness.errors import GuestError

FAULTS = ("qemu_sigkill", "qemu_sigstop", "guest_panic", "sshd_killed", "perf_killed", "harness_sigint",
          "harness_sigterm")  # fmt: skip
#: The guest commands of the guest faults; each kills the very session that runs it, so its SshError is expected.
GUEST_COMMANDS = {"guest_panic": "echo c > /proc/sysrq-trigger", "sshd_killed": "killall dropbear"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vpmu-faults", "vpmu self-test fault injection (tests/fault_plugin.py)")
    group.addoption("--vpmu-inject-fault", dest="vpmu_faults", action="append", default=[],
                    metavar="PROFILE:PHASE:FAULT[:N]", help="fire FAULT at the N-th PHASE of PROFILE")  # fmt: skip
    group.addoption("--vpmu-fault-log", dest="vpmu_fault_log", type=Path, metavar="FILE",
                    help="append a JSON line per announced phase and per fired fault")  # fmt: skip


def parse_spec(text: str) -> tuple[str, str, str, int]:
    """``PROFILE:PHASE:FAULT[:N]`` -> its parts; a phase or fault this plugin does not know is a usage error."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[1] not in lifetime.PHASES or parts[2] not in FAULTS:
        raise pytest.UsageError(f"--vpmu-inject-fault {text!r}: want PROFILE:PHASE:FAULT[:N] with PHASE one of "
                                f"{', '.join(lifetime.PHASES)} and FAULT one of {', '.join(FAULTS)}")  # fmt: skip
    return parts[0], parts[1], parts[2], int(parts[3]) if len(parts) == 4 else 1


def pytest_configure(config: pytest.Config) -> None:
    specs = [parse_spec(text) for text in config.getoption("vpmu_faults")]
    if specs or config.getoption("vpmu_fault_log"):
        injector = Injector(specs, config.getoption("vpmu_fault_log"))
        config.pluginmanager.register(injector, "vpmu-fault-injector")
        config.add_cleanup(lifetime.observe_phases(injector.on_phase))


class Injector:
    """Tracks the current profile (from the item being set up), guest and host load (from the announcements' context)
    and fires each requested fault once, at its occurrence of its phase."""

    def __init__(self, specs: list[tuple[str, str, str, int]], log: Path | None) -> None:
        self.pending = list(specs)
        self.log = log
        self.profile = "-"
        self.machine: Any = None
        self.session: Any = None
        self.load: Any = None
        self.seen: dict[tuple[str, str], int] = {}
        #: The profile each guest and load belongs to: a profile's guest and load are torn down while the next
        #: profile's first check is set up, so "the current item's profile" is wrong for load_stop and shutdown.
        self.owner: dict[int, str] = {}

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        params = getattr(getattr(item, "callspec", None), "params", {})
        self.profile = str(params.get("vpmu_profile", self.profile))

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Iterator[None]:
        self.on_phase("report", {})  # the outermost wrapper: before the vpmu plugin writes results.json and reports
        return (yield)

    def _write(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            with open(self.log, "a") as out:
                out.write(json.dumps(record) + "\n")

    def on_phase(self, name: str, context: dict[str, Any]) -> None:
        self.machine = context.get("machine", self.machine)
        self.session = context.get("session", self.session)
        self.load = context.get("load", self.load)
        owners = [self.owner.setdefault(id(obj), self.profile) for obj in context.values()]
        profile = owners[0] if owners else self.profile
        key = (profile, name)
        self.seen[key] = self.seen.get(key, 0) + 1
        record = {"phase": name, "profile": profile, "n": self.seen[key], "t": time.time(), "pid": os.getpid()}
        if name == "ssh_ready":
            record["port"] = self.session.port  # the forwarded SSH port: closed once the run is over
        self._write(record)
        for spec in list(self.pending):
            wanted, phase, fault, nth = spec
            if phase == name and wanted in (profile, "*") and self.seen[key] == nth:
                self.pending.remove(spec)
                self._write({"fired": fault, "phase": name, "profile": profile, "t": time.time(),
                             "pid": os.getpid()})  # fmt: skip
                self.fire(fault)

    def fire(self, fault: str) -> None:
        if fault == "harness_sigint":
            os.kill(os.getpid(), signal.SIGINT)
        elif fault == "harness_sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif fault in ("qemu_sigkill", "qemu_sigstop"):
            os.kill(self.machine.pid, signal.SIGKILL if fault == "qemu_sigkill" else signal.SIGSTOP)
        elif fault == "perf_killed":
            proc = getattr(self.load, "_proc", None)
            if proc is None or proc.poll() is not None:
                raise AssertionError(f"perf_killed: no host perf load runs (load {self.load!r})")
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            with contextlib.suppress(GuestError):  # the command takes the session (or the whole guest) with it
                self.session.run(GUEST_COMMANDS[fault], timeout_s=30)
