"""The generated loop executes exactly the instructions and branches harness/probe/workloads.py declares.

Checked with valgrind's callgrind on the compiled probe (DESIGN.md, "Exact expectations without a PMU"):
``--toggle-collect=vpmu_loop`` counts only inside the loop function; ``Ir`` = instructions executed, ``Bc`` =
conditional branches. This is what makes the exact in-guest expectations (N-0 differential) trustworthy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.probe.params import counters_params
from harness.probe.runner import PROBES_DIR, ProbeBuilder
from harness.probe.workloads import LOOP
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


#: A test-only probe: the window bookkeeping of _common.h.j2 (window_sample/window_delta/rec_windows) on its own,
#: around a sleep that lets the host's own tick and a page fault in.
WINDOW_PROBE = """{% include "_common.h.j2" %}
int main(int argc, char **argv)
{
	struct irq_window a, b, d;
	char *page;
	pin(argc, argv);
	window_sample(&a);
	page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	page[0] = 1; /* one minor fault */
	usleep(30000); /* a context switch, and a tick or two on this CPU */
	window_sample(&b);
	window_delta(&a, &b, &d);
	rec_start("window");
	rec_i64("cpu_irqs", b.irqs);
	rec_windows(&d, &d);
	rec_end();
	done();
	return 0;
}
"""


def proc_interrupts_column(cpu: int) -> int:
    """The same sum in Python: CPU ``cpu``'s column over every row of /proc/interrupts that has one."""
    lines = Path("/proc/interrupts").read_text().splitlines()
    column = lines[0].split().index(f"CPU{cpu}")
    total = 0
    for line in lines[1:]:
        fields = line.split(":", 1)[1].split() if ":" in line else []
        numbers = []
        for field in fields[: column + 1]:
            if not field.isdigit():
                break
            numbers.append(int(field))
        if len(numbers) > column:
            total += numbers[column]
    return total


def test_window_bookkeeping_reads_this_cpus_interrupts(tmp_path):
    """Review-arch (1)-A: the probes bracket every counted window with window_sample(). On this host the parsed column
    lies between two Python readings of /proc/interrupts taken around the probe, and the fault and the sleep show."""
    if not Path("/proc/interrupts").exists():
        pytest.skip("no /proc/interrupts on this host")
    probes = tmp_path / "probes"
    shutil.copytree(PROBES_DIR, probes)
    (probes / "window.c.j2").write_text(WINDOW_PROBE)
    probe = ProbeBuilder(probes, tmp_path / "cache").build("window")
    cpu = min(os.sched_getaffinity(0))
    before = proc_interrupts_column(cpu)
    out = subprocess.run([str(probe.binary), str(cpu)], capture_output=True, text=True, check=True).stdout
    after = proc_interrupts_column(cpu)
    record = next(r for r in map(json.loads, out.splitlines()) if r["kind"] == "window")
    assert before <= record["cpu_irqs"] <= after
    assert record["irq_n"] >= 0 and record["faults_n"] >= 1 and record["switches_n"] >= 1
