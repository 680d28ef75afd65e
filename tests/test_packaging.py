"""The wheel works from any directory: built from this checkout, installed into a fresh venv in a temp dir, and
run there as a user would (vpmu doctor, plan, image build, run --profile pmu-off, report kcidb; pytest --pyargs).

Offline and quick: the wheel is built with --no-build-isolation from this venv's setuptools, installed with
--no-index --no-deps, and the fresh venv reaches the dependencies through a .pth line naming this venv's
site-packages (the editable checkout install there is not activated: .pth files of a directory named by a .pth line
are not run), so nothing is downloaded and the vpmu it runs is the wheel's, not the checkout's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import venv
import zipfile
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT, cache_root

pytestmark = pytest.mark.integration

#: What a source tree copy leaves out (local state, not part of the project).
IGNORED = shutil.ignore_patterns(".venv", ".git", "build", "dist", "out", "*.egg-info", "__pycache__", ".tox",
                                 ".ruff_cache", ".pytest_cache")  # fmt: skip


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, check=False)  # fmt: skip


def _data_files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_wheel_installs_and_runs_from_anywhere(tmp_path, guest_image):
    start = time.monotonic()
    src, dist, work = tmp_path / "src", tmp_path / "dist", tmp_path / "work"
    shutil.copytree(REPO_ROOT, src, ignore=IGNORED)  # a clean tree: no build/ or egg-info of the checkout's
    pip = [sys.executable, "-m", "pip", "--isolated"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PIP_")}
    env["VPMU_CACHE_DIR"] = str(cache_root())
    built = _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir", "-w",
                  str(dist), str(src)], tmp_path, env)  # fmt: skip
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = dist.glob("vpmu-*.whl")

    # Every file of the library, of the suite and of the image recipe is in the wheel, under harness/ (a new data
    # file type or subpackage needs its line in pyproject.toml).
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("harness", "guest_tests", "images"):
        inside = "harness" if folder == "harness" else f"harness/{folder}"
        missing = {f"{inside}/{name}" for name in _data_files(REPO_ROOT / folder)} - names
        assert not missing, f"not in the wheel (pyproject.toml packages/package-data): {sorted(missing)}"
    assert "harness/report/templates/matrix.html.j2" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "[pytest11]" in zipfile.ZipFile(wheel).read(entry_points).decode()

    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    installed = _run([*pip, "--python", str(python), "install", "--no-index", "--no-deps", "--ignore-installed",
                      "--no-cache-dir", str(wheel)], tmp_path, env)  # fmt: skip
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                     env).stdout.strip())  # fmt: skip
    (site / "_vpmu_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work.mkdir()
    vpmu = str(target / "bin" / "vpmu")

    where = _run([str(python), "-c", "import harness.paths as p; print(p.GUEST_TESTS_DIR, p.INSTALLED)"], work, env)
    assert where.stdout.split() == [str(site / "harness" / "guest_tests"), "True"], where.stdout + where.stderr
    registering = [p for p in site.rglob("conftest.py") if "pytest_plugins" in p.read_text()]
    assert not registering, f"the plugin must load from the pytest11 entry point, not from {registering}"

    text = _run([vpmu, "doctor"], work, env)
    assert text.returncode == 0 and "QEMU" in text.stdout, text.stdout + text.stderr
    doctor = _run([vpmu, "doctor", "--json"], work, env)
    assert doctor.returncode == 0, doctor.stderr
    (work / "doctor.json").write_text(doctor.stdout)
    assert json.loads(doctor.stdout)["accel"] in ("kvm", "tcg")

    # without the entry point too (some CI environments turn plugin autoload off): vpmu names its plugin itself
    plan = _run([vpmu, "plan", "--host-facts", "doctor.json", "--profile", "pmu-off", "--json"], work,
                {**env, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
                 "PYTEST_ADDOPTS": "-W error::pytest.PytestWarning"})  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)["profiles"][0]
    assert planned["profile"] == "pmu-off" and planned["checks"], planned

    image = _run([vpmu, "image", "build"], work, env)
    assert image.returncode == 0, image.stderr
    # the packaged recipe hashes like the checkout's: the same cached image, not a rebuild
    assert f"guest image {guest_image.directory}: up to date (cached)" in image.stdout, image.stdout + image.stderr

    run = _run([vpmu, "run", "--profile", "pmu-off", "--out", "out"], work, env, timeout_s=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "PytestAssertRewriteWarning" not in run.stdout + run.stderr
    document = json.loads((work / "out" / "results.json").read_text())
    assert [r["profile"] for r in document["runs"]] == ["pmu-off"]
    assert {c["id"] for c in document["runs"][0]["checks"]} == {c["id"] for c in planned["checks"]}
    assert all(c["status"] in ("pass", "skip") for c in document["runs"][0]["checks"])
    assert {"matrix.md", "matrix.html", "junit.xml"} <= {p.name for p in (work / "out").iterdir()}

    kcidb = _run([vpmu, "report", "kcidb", "out/results.json", "--out", "kcidb.json"], work, env)
    assert kcidb.returncode == 0 and "validated with kcidb-io" in kcidb.stdout, kcidb.stdout + kcidb.stderr

    # the suite's own modules, by package name, with the plugin from the entry point (no conftest.py anywhere)
    collected = _run([str(python), "-m", "pytest", "--pyargs", "harness.guest_tests", "--profile", "pmu-off",
                      "--collect-only", "-q", "-p", "no:cacheprovider"], work, env)  # fmt: skip
    assert f"{len(planned['checks'])} tests collected" in collected.stdout, collected.stdout[-2000:]
    seconds = time.monotonic() - start
    print(f"wheel {wheel.name}: {wheel.stat().st_size} bytes; build + install + all commands: {seconds:.1f} s")
