#!/usr/bin/env python3
"""Benchmark the guest lifecycle: cold/warm image build, boot-to-SSH-ready, `exec -- true` end to end.

A measurement, not a test: prints one line per number and a JSON summary. Usage:
    .venv/bin/python scripts/bench_guest.py [--boots 5] [--execs 3]
The cold build uses an empty temporary cache (so it includes `apt-get download` of the kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.guest.boot import boot_guest
from harness.guest.image import build_image
from harness.guest.qemu_argv import MachineConfig
from harness.host import hostfacts
from harness.paths import REPO_ROOT


def timed_cli(*args: str, env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO_ROOT, check=True, capture_output=True,
                   env={**os.environ, **(env or {})})  # fmt: skip
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--execs", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="vpmu-bench-") as cache:
        results["image_build_cold_s"] = round(timed_cli("image", "build", env={"VPMU_CACHE_DIR": cache}), 2)
        results["image_build_warm_s"] = round(timed_cli("image", "build", env={"VPMU_CACHE_DIR": cache}), 2)
    image = build_image(log=lambda _m: None).image
    accel = hostfacts.collect()["accel"]
    config = MachineConfig(image=image, accel=accel, cpu="host" if accel == "kvm" else "max")
    console, ready = [], []
    for _ in range(args.boots):
        with boot_guest(config) as guest:
            console.append(guest.boot.console_ready_s)
            ready.append(guest.boot.ssh_ready_s)
    results["accel"] = accel
    results["boot_console_ready_s"] = [round(x, 2) for x in console]
    results["boot_ssh_ready_s"] = [round(x, 2) for x in ready]
    results["boot_ssh_ready_median_s"] = round(statistics.median(ready), 2)
    execs = [timed_cli("exec", "--image", str(image.directory), "--", "true") for _ in range(args.execs)]
    results["exec_true_s"] = [round(x, 2) for x in execs]
    results["exec_true_median_s"] = round(statistics.median(execs), 2)
    for key, value in results.items():
        print(f"{key:28} {value}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
