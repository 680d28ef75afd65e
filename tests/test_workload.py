"""The generated loop executes exactly the instructions and branches harness/workloads.py declares.

Checked with valgrind's callgrind on the compiled probe (DESIGN.md, "Exact expectations without a PMU"):
``--toggle-collect=vpmu_loop`` counts only inside the loop function; ``Ir`` = instructions executed, ``Bc`` =
conditional branches. This is what makes the exact in-guest expectations (N-0 differential) trustworthy.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from harness.probe_params import counters_params
from harness.probes import ProbeBuilder
from harness.workloads import LOOP
from tests.test_verdicts import intel_kvm_guest_view


@pytest.fixture(scope="module")
def counters_probe():
    if shutil.which("valgrind") is None:
        pytest.fail("valgrind is not installed (Debian package valgrind); scripts/install installs it")
    return ProbeBuilder().build("counters", counters_params(intel_kvm_guest_view()))


def callgrind_totals(binary, iterations, tmp_path) -> dict[str, int]:
    out = tmp_path / f"cg.{iterations}"
    subprocess.run(
        ["valgrind", "--tool=callgrind", "--toggle-collect=vpmu_loop", "--branch-sim=yes",
         f"--callgrind-out-file={out}", str(binary), "0", "workload", str(iterations)],
        check=True, capture_output=True,
    )  # fmt: skip
    text = out.read_text()
    events = re.search(r"^events: (.*)$", text, re.M).group(1).split()
    totals = [int(v) for v in re.search(r"^totals: (.*)$", text, re.M).group(1).split()]
    return dict(zip(events, totals + [0] * (len(events) - len(totals)), strict=True))


@pytest.mark.parametrize("iterations", [0, 1, 1000, 100_000])
def test_loop_instruction_and_branch_counts(counters_probe, iterations, tmp_path):
    totals = callgrind_totals(counters_probe.binary, iterations, tmp_path)
    assert totals["Ir"] == LOOP.instructions(iterations)
    assert totals["Bc"] == LOOP.conditional_branches(iterations)


def test_differential_expectation():
    # What the in-guest checks assert: N minus 0 iterations.
    assert LOOP.delta_instructions(1_000_000) == 10_000_000
    assert LOOP.delta_branches(1_000_000) == 1_000_000


def test_loop_symbols_bracket_the_code(counters_probe):
    """The sampling check's "IP inside the loop" range comes from the probe's own symbols."""
    out = subprocess.run(["nm", str(counters_probe.binary)], capture_output=True, text=True, check=True).stdout
    symbols = {line.split()[2]: int(line.split()[0], 16) for line in out.splitlines() if len(line.split()) == 3}
    size = symbols["vpmu_loop_end"] - symbols["vpmu_loop"]
    # mov(3) test(3) jz(2) + body: mov(3) add(4) nops dec(3) nop(1) jnz(2) + ret(1), in bytes
    assert size == 3 + 3 + 2 + 3 + 4 + LOOP.nops + 3 + 1 + 2 + 1
