"""The probe pipeline: render, compile (cached by content), copy, run, parse; and every way a probe can fail."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from harness.guest.boot import Guest, boot_guest
from harness.guest.qemu_argv import MachineConfig
from harness.host.hostfacts import read_cpuid_instruction
from harness.probe.runner import PROBES_DIR, ProbeBuilder, ProbeError, ProbeRunner, parse_records


def test_records_parse():
    text = '{"probe":"p","kind":"a","x":1}\n\n{"probe":"p","kind":"done"}\n'
    assert parse_records("p", text) == [{"probe": "p", "kind": "a", "x": 1}]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no output"),
        ('{"probe":"p","kind":"a"}\n', "truncated"),
        ('{"probe":"p","kind":"a"}\nSegmentation fault\n{"probe":"p","kind":"done"}\n', "line 2 is not JSON"),
        ('{"kind":"a"}\n{"probe":"p","kind":"done"}\n', "lacks 'probe'/'kind'"),
        ("[1, 2]\n", "lacks 'probe'/'kind'"),
    ],
)
def test_bad_output_is_a_probe_error(text, reason):
    with pytest.raises(ProbeError, match=reason):
        parse_records("p", text, "some stderr")


@pytest.fixture
def probes_dir(tmp_path):
    """A copy of the real probe templates plus test-only ones that misbehave on purpose."""
    directory = tmp_path / "probes"
    shutil.copytree(PROBES_DIR, directory)
    common = '{% include "_common.h.j2" %}\n'
    (directory / "crash.c.j2").write_text(common + 'int main(void) { rec_start("x"); rec_end(); raise(SIGSEGV); }\n')
    (directory / "hang.c.j2").write_text(common + "int main(void) { sleep(600); return 0; }\n")
    (directory / "garbage.c.j2").write_text(common + 'int main(void) { puts("hello"); return 0; }\n')
    (directory / "short.c.j2").write_text(common + 'int main(void) { rec_start("x"); rec_end(); return 0; }\n')
    (directory / "fails.c.j2").write_text(common + 'int main(void) { fputs("boom\\n", stderr); return 3; }\n')
    (directory / "broken.c.j2").write_text(common + "int main(void) { this is not C; }\n")
    return directory


def test_build_is_cached_by_content(probes_dir, tmp_path):
    builder = ProbeBuilder(probes_dir, tmp_path / "cache")
    first = builder.build("enum", {"msrs": [0x345]})
    mtime = first.binary.stat().st_mtime_ns
    again = ProbeBuilder(probes_dir, tmp_path / "cache").build("enum", {"msrs": [0x345]})
    assert again.binary == first.binary and again.binary.stat().st_mtime_ns == mtime
    assert builder.build("enum", {"msrs": [0x346]}).key != first.key  # parameters are part of the key
    (probes_dir / "_common.h.j2").write_text((probes_dir / "_common.h.j2").read_text() + "\n/* changed */\n")
    assert ProbeBuilder(probes_dir, tmp_path / "cache").build("enum", {"msrs": [0x345]}).key != first.key
    assert "#include <linux/perf_event.h>" in first.source.read_text()  # the rendered source is kept


def test_compile_error_carries_the_compiler_output(probes_dir, tmp_path):
    with pytest.raises(ProbeError, match="does not compile") as info:
        ProbeBuilder(probes_dir, tmp_path / "cache").build("broken")
    assert "error" in info.value.stderr


def test_enum_probe_on_the_host_reads_the_host_cpuid(tmp_path):
    """The static probe runs on the host too: its CPUID records equal the in-process CPUID of CPU 0."""
    probe = ProbeBuilder(cache_dir=tmp_path / "cache").build("enum", {"msrs": [0x345]})
    out = subprocess.run([str(probe.binary), "0"], capture_output=True, text=True, check=True)
    records = parse_records("enum", out.stdout)
    host = read_cpuid_instruction(0)
    assert host is not None
    by_leaf = {(r["leaf"], r["subleaf"]): r for r in records if r["kind"] == "leaf"}
    for (leaf, sub), regs in host.leaves.items():
        if (leaf, sub) in by_leaf and leaf != 1:  # leaf 1 EBX carries the APIC ID, fine, but keep it simple
            r = by_leaf[(leaf, sub)]
            assert (r["eax"], r["ebx"], r["ecx"], r["edx"]) == (regs.eax, regs.ebx, regs.ecx, regs.edx)
    msr = [r for r in records if r["kind"] == "msr"]
    assert len(msr) == 1 and ("value" in msr[0] or "errno" in msr[0])


@pytest.fixture(scope="module")
def guest(guest_image, accel) -> Iterator[Guest]:
    config = MachineConfig(image=guest_image, accel=accel, cpu="host" if accel == "kvm" else "max")
    with boot_guest(config) as booted:
        yield booted


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("crash", "killed by signal 11"),
        ("garbage", "line 1 is not JSON"),
        ("short", "truncated"),
        ("fails", "exit code 3"),
    ],
)
def test_probe_failures_in_the_guest_are_errors(guest, probes_dir, tmp_path, name, reason):
    runner = ProbeRunner(guest.ssh, ProbeBuilder(probes_dir, tmp_path / "cache"))
    with pytest.raises(ProbeError, match=reason) as info:
        runner.run(name)
    if name == "fails":
        assert "boom" in info.value.stderr


@pytest.mark.integration
def test_probe_timeout_in_the_guest(guest, probes_dir, tmp_path):
    """The guest kills a probe GUEST_KILL_MARGIN_S before the harness's deadline (dropbear would leave a probe whose
    channel the harness closed running): the error says so, and no probe is left running in the guest."""
    runner = ProbeRunner(guest.ssh, ProbeBuilder(probes_dir, tmp_path / "cache"))
    start = time.monotonic()
    with pytest.raises(ProbeError, match=r"timeout after 2 s \(killed in the guest by timeout -s KILL\)"):
        runner.run("hang", timeout_s=7)
    assert time.monotonic() - start < 6
    assert "-hang" not in guest.ssh.check("ps").stdout
    assert guest.ssh.check("echo still here").stdout == "still here\n"


@pytest.mark.integration
def test_probe_is_copied_once_per_guest(guest, tmp_path):
    runner = ProbeRunner(guest.ssh, ProbeBuilder(cache_dir=tmp_path / "cache"))
    first = runner.run("enum", {"msrs": [0x345]})
    second = runner.run("enum", {"msrs": [0x345]})
    assert first.copy_s > 0 and second.copy_s == 0
    assert any(r["kind"] == "leaf" and r["leaf"] == 0 for r in second.records)


def test_every_probe_compiles_without_warnings(tmp_path):
    """Each shipped template, rendered with representative parameters, compiles with -Werror (a warning in a probe
    is usually a measurement bug: an unused result, a truncated constant)."""
    from harness.probe import params as pp
    from tests.test_verdicts import amd_kvm_guest_view, intel_kvm_guest_view

    intel, amd = intel_kvm_guest_view(), amd_kvm_guest_view()
    # A pre-Zen AMD guest: the four K7 counters only, no global MSRs (the semantics probe's other variant).
    amd_k7 = replace(amd, caps=replace(amd.caps, amd=replace(amd.caps.amd, perfctr_core=False, perfmon_v2=False,
                                                             core_counters=4)))  # fmt: skip
    cases = {
        "enum": {"msrs": [0x345, 0xC1]},
        "counters": pp.counters_params(intel),
        "msr": pp.msr_params(intel),
        "topdown": pp.topdown_params(),
        "lbr": pp.lbr_params(),
        "pebs": pp.pebs_params(3),
        "ibs": pp.ibs_params({"ibs_op/type": "11", "ibs_fetch/type": "10"}),
        "semantics": pp.semantics_params(intel),
    }
    builder = ProbeBuilder(cache_dir=tmp_path / "cache")
    assert {p.name.removesuffix(".c.j2") for p in PROBES_DIR.glob("*.c.j2")} == set(cases)
    for name, params in [
        *cases.items(),
        ("counters", pp.counters_params(amd)),
        ("msr", pp.msr_params(amd)),
        ("semantics", pp.semantics_params(amd)),
        ("semantics", pp.semantics_params(amd_k7)),
    ]:
        source = tmp_path / f"{name}.c"
        source.write_text(builder.render(name, params))
        done = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror",
                               "-fsyntax-only", str(source)], capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, f"{name}: {done.stderr[:2000]}"
