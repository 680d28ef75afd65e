#!/usr/bin/env python3
"""Measure `python -m harness exec -- true` against the floor: a bare QEMU boot of the same kernel to init.

The floor is QEMU started with exec's own argv (`exec --dry-run`) minus QMP and the SSH port forward (the NIC
stays, so the guest's init does the same work), timed from launch until the image's console marker, then QEMU is
stopped with SIGTERM and waited for. `exec` is timed end to end as a user runs it (a fresh Python process, the
default image from the cache, so the image cache key is part of it) and with `--image DIR` (no key at all).
A measurement, not a test. Usage:
    .venv/bin/python scripts/bench_exec.py [--runs 5] [--profile pmu-on]
Prints one line per number and a JSON summary with the medians and the ratio exec / floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.guest.image import READY_MARKER
from harness.paths import REPO_ROOT

#: Options of exec's argv that only serve QMP or SSH (each takes one value).
QMP_SSH_OPTIONS = ("-mon",)
QMP_CHARDEV = "socket,id=qmp0"
BOOT_TIMEOUT_S = 120.0


def exec_argv(profile: str) -> list[str]:
    """exec's QEMU command line, from `exec --dry-run` (the same code path that launches it)."""
    out = subprocess.run([sys.executable, "-m", "harness", "exec", "--profile", profile, "--dry-run", "--", "true"],
                         cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout  # fmt: skip
    return shlex.split(out.strip().splitlines()[-1])


def bare_argv(argv: list[str]) -> list[str]:
    """exec's argv minus QMP (its chardev and -mon) and the SSH host forward (the user-mode NIC stays)."""
    bare: list[str] = []
    skip = False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if word in QMP_SSH_OPTIONS or (word == "-chardev" and nxt.startswith(QMP_CHARDEV)):
            skip = True
            continue
        bare.append(word.split(",hostfwd=")[0] if word.startswith("user,") else word)
    return bare


def bare_boot(argv: list[str]) -> float:
    """Seconds from launch to the console marker, plus stopping QEMU (SIGTERM) and reaping it."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen = b""
    try:
        while READY_MARKER.encode() not in seen:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk or time.monotonic() - start > BOOT_TIMEOUT_S:
                raise SystemExit(f"bare boot did not reach {READY_MARKER}:\n{seen[-2000:].decode(errors='replace')}")
            seen += chunk
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        proc.stdout.close()
    return time.monotonic() - start


def timed_exec(*args: str) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "harness", "exec", *args, "--", "true"], cwd=REPO_ROOT, check=True,
                   capture_output=True)  # fmt: skip
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", default="pmu-on")
    args = parser.parse_args()
    argv = exec_argv(args.profile)
    image_dir = str(Path(argv[argv.index("-kernel") + 1]).parent)
    bare = bare_argv(argv)
    floor, execs, execs_image = [], [], []
    for _ in range(args.runs):  # interleaved, so a busy moment on the shared machine hits all three alike
        floor.append(bare_boot(bare))
        execs.append(timed_exec("--profile", args.profile))
        execs_image.append(timed_exec("--profile", args.profile, "--image", image_dir))
    summary = {
        "accel": argv[argv.index("-accel") + 1],
        "bare_boot_s": [round(x, 2) for x in floor],
        "exec_true_s": [round(x, 2) for x in execs],
        "exec_true_image_s": [round(x, 2) for x in execs_image],
        "bare_boot_median_s": round(statistics.median(floor), 2),
        "exec_true_median_s": round(statistics.median(execs), 2),
        "exec_true_image_median_s": round(statistics.median(execs_image), 2),
    }
    summary["ratio"] = round(summary["exec_true_median_s"] / summary["bare_boot_median_s"], 2)
    summary["ratio_image"] = round(summary["exec_true_image_median_s"] / summary["bare_boot_median_s"], 2)
    # Each round's exec over the same round's floor: steadier than a ratio of medians on a shared machine.
    summary["ratio_paired_median"] = round(statistics.median(e / f for e, f in zip(execs, floor, strict=True)), 2)
    for key, value in summary.items():
        print(f"{key:26} {value}")
    print("bare argv:", shlex.join(bare))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
