"""``python -m harness``: doctor, caps, image build, exec, run, report, plan and rejudge.

Every user mistake ends as one ``ERROR: ...`` line on stderr and exit code 2 — bad input, an output that cannot be
written (full, read-only, a file in the way: checked before anything boots), a host program that is not installed;
harness failures (a guest that does not boot or dies) as one error block and exit 1. Exit codes come from
:class:`ExitCode`. tests/test_cli_inputs.py runs every command over a table of such faults.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import outputs
from harness.cpu import caps as caps_mod
from harness.cpu.cpuid_dump import load_cpuid_dump
from harness.cpu.profile import ACCELS
from harness.errors import ExitCode, GuestError, HarnessError, OutputError, ToolMissingError, UsageError
from harness.guest.image import Image, build_image, find_or_build_image, kernel_release_of
from harness.host import hostfacts, hostpkg
from harness.paths import GUEST_TESTS_DIR
from harness.suite.profiles import DEFAULT_PROFILES_FILE, load_profiles, select_profile

if TYPE_CHECKING:
    import pytest

    from harness.host.loads import LoadSpec

#: guest_tests/loads.toml (harness.host.loads.DEFAULT_LOADS_FILE; that module is imported only by the commands
#: that read loads: it pulls in qemu.qmp and asyncio, a tenth of a second every other command need not pay).
DEFAULT_LOADS_NAME = "loads.toml"

DEFAULT_EXEC_TIMEOUT_S = 600.0
DEFAULT_BOOT_TIMEOUT_S = 120.0
#: What --dry-run shows as QMP's descriptor; a real launch passes one end of a fresh socket pair.
DRY_RUN_QMP_FD = 3


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad options through :class:`UsageError` (one line, exit 2), not its own exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _hex_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number (e.g. 0x33c5)") from None
    if not 0 <= value <= caps_mod.PERF_CAP_MAX:
        raise argparse.ArgumentTypeError(f"'{text}' does not fit a 64-bit MSR")
    return value


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse's float takes 'nan', 'inf' and negatives)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}': give a positive, finite number of seconds")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m harness",
        description="vpmu: guest-side virtual-PMU test suite for x86 KVM hosts.",
        epilog="Run the suite itself with `pytest guest_tests` (see README.md).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the harness does to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    doctor = sub.add_parser("doctor", help="show host facts: accelerator, KVM, host PMU, perf, QEMU")
    doctor.add_argument("--json", action="store_true", help="print the facts as one JSON object")

    caps = sub.add_parser("caps", help="decode PMU capabilities from a raw CPUID dump")
    caps.add_argument("--cpuid-dump", required=True, type=Path, metavar="FILE",
                      help="InstLatx64 text, `cpuid -r` output, or the guest probe's JSON lines")  # fmt: skip
    caps.add_argument("--perf-capabilities", type=_hex_int, metavar="0x...",
                      help="also decode this IA32_PERF_CAPABILITIES (MSR 0x345) value")  # fmt: skip
    caps.add_argument("--json", action="store_true", help="print the capabilities as one JSON object")

    image = sub.add_parser("image", help="guest image commands")
    image_sub = image.add_subparsers(dest="image_command", required=True, parser_class=_Parser)
    build = image_sub.add_parser("build", help="build the default guest image (a no-op when cached)")
    build.add_argument("--kernel", type=Path, metavar="PATH", help="bzImage to use instead of Debian's cloud kernel")
    build.add_argument("--modules", type=Path, metavar="DIR",
                       help="lib/modules/<release> of --kernel (default: /lib/modules/<release>)")  # fmt: skip
    build.add_argument("--out", type=Path, metavar="DIR", help="image directory (default: in the user cache)")

    execp = sub.add_parser(
        "exec",
        help="boot a guest, run a command in it over SSH, shut it down",
        description="Boot the guest, run CMD through the guest's shell (words joined by spaces, as ssh does), "
        "print its output and exit with its exit code.",
    )
    execp.add_argument("--profile", default="pmu-on", help="vPMU profile (default: pmu-on)")
    execp.add_argument("--profiles-file", type=Path, default=DEFAULT_PROFILES_FILE, metavar="FILE")
    execp.add_argument("--image", type=Path, metavar="DIR", help="guest image directory (default: build/use cache)")
    execp.add_argument("--accel", choices=ACCELS, help="override the accelerator doctor picks")
    execp.add_argument("--timeout", type=_seconds, default=DEFAULT_EXEC_TIMEOUT_S, metavar="S",
                       help=f"seconds the command may run (default {DEFAULT_EXEC_TIMEOUT_S:.0f})")  # fmt: skip
    execp.add_argument("--boot-timeout", type=_seconds, default=DEFAULT_BOOT_TIMEOUT_S, metavar="S",
                       help=f"seconds until SSH must work (default {DEFAULT_BOOT_TIMEOUT_S:.0f})")  # fmt: skip
    execp.add_argument("--log-dir", type=Path, metavar="DIR", help="keep serial.log and qemu.log here")
    execp.add_argument("--dry-run", action="store_true",
                       help="print the QEMU command line instead of booting (QMP: an inherited fd)")  # fmt: skip
    execp.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")

    run = sub.add_parser(
        "run",
        help="run the suite (pytest guest_tests); write results.json, junit.xml, matrix.md, matrix.html",
        description="Run every check under each selected profile; without --profile, every profile that applies "
        "to this host and accelerator. Exit 0 when no check failed or errored (skips are fine).",
    )
    run.add_argument("--profile", action="append", default=[], metavar="NAME", help="profile (repeatable)")
    run.add_argument("--profiles-file", type=Path, default=DEFAULT_PROFILES_FILE, metavar="FILE")
    run.add_argument("--load", action="append", default=[], metavar="NAME",
                     help="host perf load (repeatable; default: idle only)")  # fmt: skip
    run.add_argument("--all-loads", action="store_true", help="run under every load in the loads file")
    run.add_argument("--loads-file", type=Path, default=GUEST_TESTS_DIR / DEFAULT_LOADS_NAME, metavar="FILE")
    run.add_argument("--out", type=Path, default=Path("out"), metavar="DIR", help="report directory (default: out)")
    run.add_argument("--image", type=Path, metavar="DIR", help="guest image directory (default: build/use cache)")
    run.add_argument("--kernel", type=Path, metavar="PATH", help="build the guest image from this bzImage")
    run.add_argument("--accel", choices=ACCELS, help="override the accelerator doctor picks")
    run.add_argument("pytest_args", nargs=argparse.REMAINDER, help="-- extra pytest arguments (e.g. -k gp)")

    report = sub.add_parser("report", help="render, merge and diff results files")
    report_sub = report.add_subparsers(dest="report_command", required=True, parser_class=_Parser)
    render_p = report_sub.add_parser("render", help="write matrix.md and matrix.html from one results.json")
    render_p.add_argument("results", type=Path, metavar="RESULTS.json")
    render_p.add_argument("--out", type=Path, required=True, metavar="DIR")
    merge_p = report_sub.add_parser("merge", help="one matrix across hosts (a column per host x profile x load)")
    merge_p.add_argument("results", type=Path, nargs="+", metavar="RESULTS.json")
    merge_p.add_argument("--out", type=Path, required=True, metavar="DIR")
    diff_p = report_sub.add_parser("diff", help="list changes between two runs; exit 1 on any pass -> fail/error")
    diff_p.add_argument("old", type=Path, metavar="OLD.json")
    diff_p.add_argument("new", type=Path, metavar="NEW.json")
    diff_p.add_argument("--md", action="store_true", help="Markdown (for a CI comment)")
    kcidb_p = report_sub.add_parser("kcidb", help="write KCIDB I/O data (KernelCI's database) from one results.json",
                                    description="One KCIDB test per check x profile x load; the checkout and build "
                                    "describe the host kernel the run tested (see README, KernelCI).")  # fmt: skip
    kcidb_p.add_argument("results", type=Path, metavar="RESULTS.json")
    kcidb_p.add_argument("--origin", default="vpmu", metavar="NAME",
                         help="KCIDB origin: your CI system's name, [a-z0-9_]+ (default: vpmu)")  # fmt: skip
    kcidb_p.add_argument("--checkout-id", metavar="ID",
                         help="the CI's id of the kernel checkout under test, e.g. its commit (default: from the "
                         "host kernel release in RESULTS.json)")  # fmt: skip
    kcidb_p.add_argument("--out", type=Path, required=True, metavar="FILE", help="the KCIDB JSON file to write")

    plan_p = sub.add_parser(
        "plan",
        help="without booting: which checks a run on a host would measure, and each SKIP reason",
        description="Collect the suite (the same markers and the same gates as `run`) and decide, for the host "
        "whose `python -m harness doctor --json` output is DOCTOR.json, every profile x check of the idle load: "
        "RUN (it measures) or SKIP with the reason the run would record, word for word. A profile that cannot run "
        "there is listed as unavailable with its reason. The guest's CPU vendor (for Intel-/AMD-only checks) is "
        "predicted from the -cpu model and the accelerator; what only a booted guest shows (its CPUID, a -cpu "
        "property that host's QEMU lacks, what QEMU granted) can still make a RUN check SKIP in the run.",
        epilog="Exit 0; 2 on bad input (unreadable or malformed DOCTOR.json, unknown profile).",
    )
    plan_p.add_argument("--host-facts", type=Path, required=True, metavar="DOCTOR.json",
                        help="the host's facts: the output of `python -m harness doctor --json` there")  # fmt: skip
    plan_p.add_argument("--profile", action="append", default=[], metavar="NAME",
                        help="plan this profile (repeatable; default: every profile in the profiles file)")  # fmt: skip
    plan_p.add_argument("--profiles-file", type=Path, default=DEFAULT_PROFILES_FILE, metavar="FILE",
                        help="profiles file (default: guest_tests/profiles.toml)")  # fmt: skip
    plan_p.add_argument("--accel", choices=ACCELS, help="plan for this accelerator (default: the one doctor chose)")
    plan_p.add_argument("--json", action="store_true",
                        help='print {"host": {...}, "profiles": [{"profile", "unavailable", "checks": [{"id", '
                        '"runs", "reason"}]}]} instead of text')  # fmt: skip

    rejudge_p = sub.add_parser(
        "rejudge",
        help="decide the checks of a results.json again from its stored measurements, with today's rules",
        description="Re-decide every check of RESULTS.json (schema vpmu-results/2) from what its run stored (probe "
        "records, the guest's view, branch maps, the host load as the checks saw it), with today's rules and "
        "kvm_features.toml, without booting; write DIR/results.json, DIR/junit.xml, DIR/matrix.md and "
        'DIR/matrix.html. Each check is marked "rejudged": true (with "previous" when its verdict changed) or '
        'false with "rejudge_reason" where its inputs were not stored (a schema /1 file, a probe that failed, a '
        "guest that did not boot): such a check keeps its stored verdict.",
        epilog="Exit 0 when no check fails or errors after rejudging, 1 otherwise, 2 on bad input (not a results "
        "file, unknown schema, malformed DOCTOR.json).",
    )
    rejudge_p.add_argument("results", type=Path, metavar="RESULTS.json", help="a results.json written by run")
    rejudge_p.add_argument("--host-facts", type=Path, metavar="DOCTOR.json",
                           help="use these host facts (doctor --json) instead of the stored ones")  # fmt: skip
    rejudge_p.add_argument("--out", type=Path, required=True, metavar="DIR", help="report directory")
    return parser


def cmd_doctor(args: argparse.Namespace) -> int:
    facts = hostfacts.collect()
    print(json.dumps(facts, indent=2) if args.json else hostfacts.render_text(facts))
    return ExitCode.OK if facts["accel"] else ExitCode.FAILED


def render_caps(data: dict[str, Any]) -> str:
    """Human-readable summary of a ``caps --json`` object."""
    lines = [f"{data['vendor']} family {data['family']:#x} model {data['model']:#x} stepping {data['stepping']}"
             f"; hypervisor: {data['hypervisor'] or 'none'}; PDCM: {data['pdcm']}"]  # fmt: skip
    perf = data["arch_perfmon"]
    if perf:
        events = ", ".join(name for name, ok in perf["events"].items() if ok)
        lines.append(f"arch perfmon v{perf['version']}: {perf['gp_counters']} GP x {perf['gp_width']} bit, "
                     f"{perf['fixed_counters']} fixed x {perf['fixed_width']} bit "
                     f"(mask {perf['fixed_counter_mask']:#x}); events: {events or 'none'}")  # fmt: skip
    else:
        lines.append("arch perfmon: none (CPUID.0AH version 0)")
    lbr = data["arch_lbr"]
    lines.append(f"arch LBR: depths {lbr['depths']}, " + ", ".join(k for k, v in lbr.items() if v is True)
                 if lbr else "arch LBR: none")  # fmt: skip
    amd = data["amd"]
    if amd:
        flags = ", ".join(k for k, v in amd.items() if v is True)
        lines.append(f"AMD: {amd['core_counters']} core counters, {amd['nb_counters']} NB/DF counters, "
                     f"LBRv2 depth {amd['lbr_v2_depth']}; {flags or 'no extensions'}")  # fmt: skip
        ibs = amd["ibs"]
        lines.append(f"AMD IBS: caps {ibs['caps']:#x}: " + ", ".join(k for k, v in ibs.items() if v is True)
                     if ibs else "AMD IBS: none")  # fmt: skip
    if "perf_capabilities" in data:
        pc = data["perf_capabilities"]
        lines.append(f"IA32_PERF_CAPABILITIES {pc['raw']:#x}: LBR format {pc['lbr_format']}, PEBS format "
                     f"{pc['pebs_format']}; " + ", ".join(k for k, v in pc.items() if v is True))  # fmt: skip
    return "\n".join(lines)


def cmd_caps(args: argparse.Namespace) -> int:
    data = caps_mod.decode_caps(load_cpuid_dump(args.cpuid_dump)).to_json()
    if args.perf_capabilities is not None:
        data["perf_capabilities"] = caps_mod.decode_perf_capabilities(args.perf_capabilities)
    print(json.dumps(data, indent=2) if args.json else render_caps(data))
    return ExitCode.OK


def cmd_image_build(args: argparse.Namespace) -> int:
    result = build_image(kernel=args.kernel, modules_dir=args.modules, out=args.out,
                         log=lambda msg: print(msg, file=sys.stderr))  # fmt: skip
    image = result.image
    state = f"built in {result.seconds:.1f} s" if result.built else "up to date (cached)"
    print(f"guest image {image.directory}: {state}")
    print(f"  kernel   {image.kernel_release} ({image.manifest['kernel']})")
    print(f"  initrd   {image.initrd} ({image.initrd.stat().st_size // 1024} KiB)")
    print(f"  modules  {', '.join(Path(m).stem for m in image.manifest['modules'])}")
    print(f"  ssh      client key {image.client_key}; pinned host key {image.host_key[:40]}...")
    return ExitCode.OK


def _exec_accel(requested: str | None) -> str:
    """The accelerator exec boots with; a missing QEMU is :class:`ToolMissingError` (one line, exit 2)."""
    qemu = hostfacts.qemu_facts()
    choice = hostfacts.choose_accel(hostfacts.kvm_facts(), hostfacts.cpuinfo_flags(), qemu)
    if qemu.get("path") is None:
        raise ToolMissingError(choice.reason)
    return hostfacts.resolve_accel(requested, choice)


def cmd_exec(args: argparse.Namespace) -> int:
    from harness.guest.boot import boot_guest
    from harness.guest.qemu_argv import MachineConfig, build_argv

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise UsageError("exec: no command given (usage: python -m harness exec [--profile NAME] -- CMD...)")
    profiles = load_profiles(args.profiles_file)
    profile = select_profile(profiles, args.profile, args.profiles_file)
    accel = _exec_accel(args.accel)
    if not profile.applies_to(accel):
        raise UsageError(f"{args.profiles_file}: [{profile.name}] does not apply to accelerator {accel} "
                         f"(accels = {list(profile.accels)})")  # fmt: skip
    if args.log_dir is not None and not args.dry_run:  # before the image build and the boot: one line, exit 2
        outputs.prepare_dir(args.log_dir, "--log-dir", ("serial.log", "qemu.log"))
    image = find_or_build_image(args.image, log=lambda msg: print(msg, file=sys.stderr))
    config = MachineConfig(image=image, accel=accel, cpu=profile.cpu_for(accel))
    if args.dry_run:
        print(shlex.join(build_argv(config, qmp_fd=DRY_RUN_QMP_FD)))
        return ExitCode.OK
    with boot_guest(config, timeout_s=args.boot_timeout, log_dir=args.log_dir) as guest:
        logging.getLogger(__name__).info("guest ready in %.2f s (%s, -cpu %s)", guest.boot.ssh_ready_s, accel,
                                         config.cpu)  # fmt: skip
        try:
            result = guest.ssh.run(" ".join(command), timeout_s=args.timeout)
        except GuestError as exc:  # a timeout, or the guest gone (QEMU's exit, a panic, a frozen QEMU): with the tail
            raise HarnessError(f"{exc}\n--- serial log (tail) ---\n{guest.machine.serial_tail()}") from exc
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.rc


#: pytest's exit codes -> ours (pytest: 0 ok, 1 tests failed, 2 interrupted, 3 internal error, 4 usage error,
#: 5 no tests collected).
PYTEST_EXIT = {0: ExitCode.OK, 1: ExitCode.FAILED, 2: ExitCode.INTERRUPTED, 3: ExitCode.FAILED, 4: ExitCode.USAGE}


#: The vpmu plugin by name: loaded even where PYTEST_DISABLE_PLUGIN_AUTOLOAD turns off the pytest11 entry point of an
#: installed wheel (in a checkout, conftest.py then finds it registered).
PLUGIN = ("-p", "harness.suite.pytest_plugin")


def _reject_stale_install() -> None:
    """Before pytest starts: every pytest11 entry point of the installed vpmu names a module that exists. An editable
    install keeps the entry points of the day it was made (.venv/lib/.../vpmu-*.dist-info/entry_points.txt), so after
    a pull that moved the plugin pytest would stop at "Error while loading plugin" with a traceback; this says what to
    do instead, in one line.

    :raises UsageError: an entry point names a module this checkout does not have.
    """
    import importlib.metadata
    import importlib.util

    # Every distribution, as pytest loads them (pluggy's load_setuptools_entrypoints), not entry_points(), which
    # keeps only the first one of a name on sys.path (a checkout's own vpmu.egg-info hides a stale one).
    distributions = [dist for dist in importlib.metadata.distributions() if dist.metadata["Name"] == "vpmu"]
    for entry in (entry for dist in distributions for entry in dist.entry_points if entry.group == "pytest11"):
        try:
            found = importlib.util.find_spec(entry.module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise UsageError(
                f"the vpmu install is stale: its pytest plugin entry point names {entry.module}, "
                "which this checkout does not have; run scripts/install again (or pip install -e .)"
            )


#: What run and rejudge write into --out (each whole or not at all: harness.outputs).
REPORT_FILES = ("results.json", "junit.xml", "matrix.md", "matrix.html")


class _SessionConfig:
    """A pytest plugin object that keeps the session's config, to read what the vpmu plugin recorded after
    ``pytest.main`` returns (an output it could not write)."""

    config: pytest.Config | None = None

    def pytest_configure(self, config: pytest.Config) -> None:
        self.config = config

    def raise_output_error(self) -> None:
        """:raises OutputError: results.json, junit.xml or a report could not be written (one line, exit 2)."""
        from harness.suite.session import STATE_KEY

        state = self.config.stash.get(STATE_KEY, None) if self.config is not None else None
        if state is not None and state.output_error:
            raise OutputError(state.output_error)


def _check_guest_inputs(args: argparse.Namespace) -> None:
    """Before pytest starts: QEMU is installed, --image is an image, --kernel a bzImage (inside pytest these
    would surface as an error per check, after the suite has been collected)."""
    if shutil.which(hostfacts.QEMU_BINARY) is None:
        qemu = hostfacts.QEMU_BINARY
        raise ToolMissingError(f"{qemu} is not installed; {hostpkg.install_hint(qemu)}")
    if args.image is not None:
        Image.load(args.image)
    if args.kernel is not None:
        kernel_release_of(args.kernel)


def _check_load_programs(loads: list[LoadSpec]) -> None:
    """A selected host load whose program (perf) is not installed: one line before any boot, not a SKIP per check."""
    for spec in loads:
        if spec.command and shutil.which(spec.command[0]) is None:
            hint = f"; {hostpkg.install_hint('perf')}" if spec.command[0] == "perf" else ""
            raise ToolMissingError(f"load '{spec.name}' needs `{spec.command[0]}`, which is not installed{hint}")


def cmd_run(args: argparse.Namespace) -> int:
    import pytest

    from harness.paths import GUEST_TESTS_DIR

    profiles = load_profiles(args.profiles_file)
    for name in args.profile:
        select_profile(profiles, name, args.profiles_file)
    from harness.host.loads import load_loads, select_loads

    loads = load_loads(args.loads_file)
    selected_loads = select_loads(loads, args.load, args.all_loads, args.loads_file)
    if args.image is not None and args.kernel is not None:
        raise UsageError("run: give --image or --kernel, not both")
    extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    _reject_stale_install()
    _check_guest_inputs(args)
    _check_load_programs([loads[name] for name in selected_loads])
    out = outputs.prepare_dir(args.out, "--out", REPORT_FILES, subdirs=["logs"])  # before anything boots
    argv = [str(GUEST_TESTS_DIR), *PLUGIN, "-p", "no:cacheprovider", "-q", "--profiles-file", str(args.profiles_file),
            "--results", str(out / "results.json"), "--junitxml", str(out / "junit.xml"),
            "--vpmu-log-dir", str(out / "logs")]  # fmt: skip
    for name in args.profile:
        argv += ["--profile", name]
    argv += ["--loads-file", str(args.loads_file)] + [f"--load={name}" for name in args.load]
    if args.all_loads:
        argv.append("--all-loads")
    for option, value in (("--image", args.image), ("--kernel", args.kernel), ("--accel", args.accel)):
        if value is not None:
            argv += [option, str(value)]
    terminated: list[int] = []

    def interrupt_on_sigterm(signum: int, frame: object) -> None:
        # Inside pytest a SystemExit would only fail the current check; KeyboardInterrupt stops the session and
        # runs every teardown (guests, host loads), like Ctrl-C.
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    session = _SessionConfig()
    try:
        code = pytest.main([*argv, *extra], plugins=[session])
    except KeyboardInterrupt:
        # A SIGTERM during pytest_sessionfinish (report writing) escapes pytest.main; a Ctrl-C is re-raised (130).
        if not terminated:
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if terminated:
        return 128 + terminated[0]
    session.raise_output_error()
    if code == 5:
        print("ERROR: run: no checks selected (check -k/-m arguments)", file=sys.stderr)
        return ExitCode.USAGE
    return PYTEST_EXIT.get(int(code), ExitCode.FAILED)


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import diff, matrix, render, results

    if args.report_command == "kcidb":
        from harness.report import kcidb

        data, checked = kcidb.write(args.results, args.out, args.origin, args.checkout_id)
        print(f"wrote {args.out}: {kcidb.counts(data)} (KCIDB I/O {data['version']['major']}."
              f"{data['version']['minor']}; " + ("validated with kcidb-io" if checked else "kcidb-io not installed: "
              "not validated") + ")")  # fmt: skip
        return ExitCode.OK
    if args.report_command == "diff":
        changes = diff.compare(results.load(args.old), results.load(args.new))
        sys.stdout.write(diff.markdown(changes) if args.md else diff.text(changes))
        return ExitCode.FAILED if changes.regressions else ExitCode.OK
    paths = [args.results] if args.report_command == "render" else args.results
    documents = results.load_many(paths)
    outputs.prepare_dir(args.out, "--out", ("matrix.md", "matrix.html"))
    md_path, html_path = render.write(matrix.build(documents), args.out, "--out")
    print(f"wrote {md_path} and {html_path}")
    return ExitCode.OK


def _run_pytest_quietly(argv: list[str]) -> tuple[int, str]:
    """Run pytest in this process with its terminal output captured (plan prints its own)."""
    import pytest

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = pytest.main(argv)
    return int(code), out.getvalue()


@contextlib.contextmanager
def _temporary_directory(prefix: str) -> Iterator[str]:
    """tempfile.TemporaryDirectory, with "no usable temporary directory" (TMPDIR full, read-only, missing) as one
    OutputError line instead of a traceback."""
    try:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
    except OSError as exc:
        where = os.environ.get("TMPDIR") or tempfile.gettempdir()
        raise OutputError(f"TMPDIR {where}: cannot create a temporary directory: {outputs.reason(exc)}") from None
    with tmp as path:
        yield path


def cmd_plan(args: argparse.Namespace) -> int:
    from harness.judge import plan
    from harness.paths import GUEST_TESTS_DIR

    plan.load_host_facts(args.host_facts)  # one ERROR line before pytest starts
    _reject_stale_install()
    profiles = load_profiles(args.profiles_file)
    for name in args.profile:
        select_profile(profiles, name, args.profiles_file)
    with _temporary_directory("vpmu-plan-") as tmp:
        target = Path(tmp) / "plan.json"
        argv = [str(GUEST_TESTS_DIR), *PLUGIN, "-p", "no:cacheprovider", "-q", "--collect-only",
                "--vpmu-plan", str(target), "--vpmu-host-facts", str(args.host_facts),
                "--profiles-file", str(args.profiles_file)]  # fmt: skip
        for name in args.profile:
            argv += ["--profile", name]
        if args.accel:
            argv += ["--accel", args.accel]
        code, output = _run_pytest_quietly(argv)
        if code == 4:
            raise UsageError(next((line.removeprefix("ERROR: ") for line in output.splitlines()
                                   if line.startswith("ERROR: ")), "plan: pytest rejected the arguments"))  # fmt: skip
        if not target.exists():
            raise HarnessError(f"plan: collecting the suite failed (pytest exit {code}):\n{output[-3000:]}")
        document = json.loads(target.read_text())
    print(json.dumps(document, indent=2) if args.json else plan.render_text(document))
    return ExitCode.OK


def cmd_rejudge(args: argparse.Namespace) -> int:
    import pytest

    from harness.judge import plan
    from harness.paths import GUEST_TESTS_DIR
    from harness.report import results

    results.load(args.results)  # one ERROR line for a file that is no results file
    _reject_stale_install()
    if args.host_facts is not None:
        plan.load_host_facts(args.host_facts)
    out = outputs.prepare_dir(args.out, "--out", REPORT_FILES)
    # --tb=native: Python's own tracebacks; pytest's source-annotated ones cost a second per 100 errors here.
    argv = [str(GUEST_TESTS_DIR), *PLUGIN, "-p", "no:cacheprovider", "-q", "--tb=native",
            "--vpmu-replay", str(args.results), "--results", str(out / "results.json"),
            "--junitxml", str(out / "junit.xml")]  # fmt: skip
    if args.host_facts is not None:
        argv += ["--vpmu-host-facts", str(args.host_facts)]
    session = _SessionConfig()
    code = int(pytest.main(argv, plugins=[session]))
    session.raise_output_error()
    if code == 4:
        return ExitCode.USAGE
    if code not in (0, 1, 5) or not (out / "results.json").exists():
        return PYTEST_EXIT.get(code, ExitCode.FAILED)
    document = results.load(out / "results.json")
    bad = any(c["status"] in ("fail", "error") for run in document["runs"] for c in run["checks"])
    return ExitCode.FAILED if bad else ExitCode.OK


def _raise_on_sigterm(signum: int, frame: object) -> None:
    """Turn SIGTERM into an exception so every ``with`` block (QEMU, temp dirs) cleans up before exit."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; the only place that turns errors into exit codes."""
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        args = make_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
        handlers = {"doctor": cmd_doctor, "caps": cmd_caps, "exec": cmd_exec, "run": cmd_run, "report": cmd_report,
                    "plan": cmd_plan, "rejudge": cmd_rejudge}  # fmt: skip
        if args.command == "image":
            return cmd_image_build(args)
        return handlers[args.command](args)
    except (UsageError, ToolMissingError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except HarnessError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
