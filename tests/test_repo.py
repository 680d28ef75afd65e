"""Repository hygiene that CI must enforce: lint, and README and .ci/run telling the same story."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from harness.paths import REPO_ROOT


def readme_commands() -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", (REPO_ROOT / "README.md").read_text(), re.S)


def test_readme_has_exactly_two_commands():
    commands = readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert commands[0].startswith("scripts/install")


def test_ci_runs_the_readme_test_command():
    ci = [ln for ln in (REPO_ROOT / ".ci/run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert "scripts/install" in ci
    assert ci[-1] == readme_commands()[1]


def test_ruff_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.fail("ruff is not installed; `pip install -e '.[test]'` installs it")
    for args in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
