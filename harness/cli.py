"""``python -m harness``: doctor, caps, image build and exec.

Every user mistake ends as one ``ERROR: ...`` line on stderr and exit code 2; harness failures (a guest that
does not boot, a missing tool) as one error block and exit 1. Exit codes come from :class:`ExitCode`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from harness import caps as caps_mod
from harness import hostfacts
from harness.cpuid_dump import load_cpuid_dump
from harness.errors import ExitCode, GuestCommandError, HarnessError, UsageError
from harness.image import build_image, find_or_build_image
from harness.loads import DEFAULT_LOADS_FILE, load_loads, select_loads
from harness.profiles import ACCELS, DEFAULT_PROFILES_FILE, load_profiles, select_profile

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
    execp.add_argument("--timeout", type=float, default=DEFAULT_EXEC_TIMEOUT_S, metavar="S",
                       help=f"seconds the command may run (default {DEFAULT_EXEC_TIMEOUT_S:.0f})")  # fmt: skip
    execp.add_argument("--boot-timeout", type=float, default=DEFAULT_BOOT_TIMEOUT_S, metavar="S",
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
    run.add_argument("--loads-file", type=Path, default=DEFAULT_LOADS_FILE, metavar="FILE")
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
    choice = hostfacts.choose_accel(hostfacts.kvm_facts(), hostfacts.cpuinfo_flags(), hostfacts.qemu_facts())
    return hostfacts.resolve_accel(requested, choice)


def cmd_exec(args: argparse.Namespace) -> int:
    from harness.guest import boot_guest
    from harness.qemu_argv import MachineConfig, build_argv

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise UsageError("exec: no command given (usage: python -m harness exec [--profile NAME] -- CMD...)")
    profiles = load_profiles(args.profiles_file)
    profile = select_profile(profiles, args.profile, args.profiles_file)
    accel = _exec_accel(args.accel)
    if not profile.applies_to(accel):
        raise UsageError(f"{args.profiles_file}: [{profile.name}] does not apply to accelerator {accel} "
                         f"(accels = {list(profile.accels)})")  # fmt: skip
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
        except GuestCommandError as exc:
            raise HarnessError(f"{exc}\n--- serial log (tail) ---\n{guest.machine.serial_tail()}") from exc
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.rc


#: pytest's exit codes -> ours (pytest: 0 ok, 1 tests failed, 2 interrupted, 3 internal error, 4 usage error,
#: 5 no tests collected).
PYTEST_EXIT = {0: ExitCode.OK, 1: ExitCode.FAILED, 2: ExitCode.INTERRUPTED, 3: ExitCode.FAILED, 4: ExitCode.USAGE}


def cmd_run(args: argparse.Namespace) -> int:
    import pytest

    from harness.paths import GUEST_TESTS_DIR

    profiles = load_profiles(args.profiles_file)
    for name in args.profile:
        select_profile(profiles, name, args.profiles_file)
    select_loads(load_loads(args.loads_file), args.load, args.all_loads, args.loads_file)
    if args.image is not None and args.kernel is not None:
        raise UsageError("run: give --image or --kernel, not both")
    extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    argv = [str(GUEST_TESTS_DIR), "-p", "no:cacheprovider", "-q", "--profiles-file", str(args.profiles_file),
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
    try:
        code = pytest.main([*argv, *extra])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if terminated:
        return 128 + terminated[0]
    if code == 5:
        print("ERROR: run: no checks selected (check -k/-m arguments)", file=sys.stderr)
        return ExitCode.USAGE
    return PYTEST_EXIT.get(int(code), ExitCode.FAILED)


def cmd_report(args: argparse.Namespace) -> int:
    from harness import diff, matrix, render, results

    if args.report_command == "diff":
        changes = diff.compare(results.load(args.old), results.load(args.new))
        sys.stdout.write(diff.markdown(changes) if args.md else diff.text(changes))
        return ExitCode.FAILED if changes.regressions else ExitCode.OK
    paths = [args.results] if args.report_command == "render" else args.results
    documents = results.load_many(paths)
    md_path, html_path = render.write(matrix.build(documents), args.out)
    print(f"wrote {md_path} and {html_path}")
    return ExitCode.OK


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
        handlers = {"doctor": cmd_doctor, "caps": cmd_caps, "exec": cmd_exec, "run": cmd_run, "report": cmd_report}
        if args.command == "image":
            return cmd_image_build(args)
        return handlers[args.command](args)
    except UsageError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except HarnessError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
