#!/usr/bin/env python3
"""Benchmark report rendering: 10 hosts x 12 profile/load columns x 80 checks (synthetic results in the real
schema), merged into one matrix and written as Markdown and HTML. A measurement, not a test."""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.report import matrix, render, results

HOSTS, PROFILES, LOADS, CHECKS = 10, 4, 3, 80


def synthetic(host: int, rng: random.Random) -> dict:
    runs = []
    for p in range(PROFILES):
        for load in ("idle", "host-counting", "host-sampling")[:LOADS]:
            checks = [{"id": f"feature{c // 10}.check{c}", "feature": f"feature{c // 10}",
                       "status": rng.choice(["pass", "pass", "pass", "skip", "fail", "error"]),
                       "reason": "a reason of typical length " * 3, "expected": 10_000_000,
                       "observed": 10_000_000 + rng.randint(-5, 5), "duration_s": 0.1, "measurements": []}
                      for c in range(CHECKS)]  # fmt: skip
            runs.append({"profile": f"profile{p}", "load": load, "accel": "kvm", "boot_s": 0.9,
                         "guest": {"kernel_release": "6.1.0", "features": {}}, "checks": checks})  # fmt: skip
    return results.build({"hostname": f"host{host}", "accel": "kvm", "cpu": {}, "kvm": {}, "qemu": {}}, runs)


def main() -> int:
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for h in range(HOSTS):
            path = Path(tmp) / f"host{h}.json"
            results.write(path, synthetic(h, rng))
            paths.append(path)
        times = []
        for _ in range(5):
            start = time.monotonic()
            m = matrix.build(results.load_many(paths))
            md, html = render.write(m, Path(tmp) / "out")
            times.append(time.monotonic() - start)
        print(f"{HOSTS} hosts x {len(m.columns) // HOSTS} columns x {CHECKS} checks = {len(m.cells)} cells")
        print(f"load + merge + render md and html: best {min(times):.3f} s, median {sorted(times)[2]:.3f} s")
        print(f"matrix.md {md.stat().st_size // 1024} KiB, matrix.html {html.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
