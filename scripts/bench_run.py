#!/usr/bin/env python3
"""Benchmark `python -m harness run` with the shipped profiles: wall time with a cold and a warm probe cache,
boot time per profile, and per-probe overhead in the guest (copy + run). A measurement, not a test.
    .venv/bin/python scripts/bench_run.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.guest.image import build_image
from harness.paths import REPO_ROOT


def run(cache: str, out: Path, image: Path) -> tuple[float, dict]:
    start = time.monotonic()
    argv = [sys.executable, "-m", "harness", "run", "--image", str(image), "--out", str(out)]
    env = {**os.environ, "VPMU_CACHE_DIR": cache}
    subprocess.run(argv, cwd=REPO_ROOT, check=True, capture_output=True, env=env)
    return time.monotonic() - start, json.loads((out / "results.json").read_text())


def main() -> int:
    image = build_image(log=lambda _m: None).image.directory
    with tempfile.TemporaryDirectory(prefix="vpmu-bench-") as tmp:
        cold, _ = run(tmp, Path(tmp) / "cold", image)  # empty probe cache: every probe is compiled
        warm, document = run(tmp, Path(tmp) / "warm", image)
    print(f"run wall time, cold probe cache  {cold:.2f} s")
    print(f"run wall time, warm probe cache  {warm:.2f} s")
    for r in document["runs"]:
        statuses = {}
        for c in r["checks"]:
            statuses[c["status"]] = statuses.get(c["status"], 0) + 1
        print(f"{r['profile']:10} boot {r['boot_s']} s; checks {statuses}")
        for probe, t in r["guest"]["probe_timings"].items():  # keys: "<load>/<probe>"
            print(f"{'':10} probe {probe:9} copy {t['copy_s'] * 1000:6.0f} ms  run {t['run_s'] * 1000:6.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
