"""coexist.host_load: for which VM the kernel refuses include-guest host events (review F1), how the refusal is
detected (P1: the kernel's own errno through perf_event_open(2), perf's words only as evidence), and that a load
judged as running really counted (P2).

Host facts are the shipped doctor outputs (tests/data/hosts); perf output is in the format perf prints (the
captures in tests/data and shared/data/perf-stat); kernel answers are the errnos kernel/events/core.c returns.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.host import mediated_probe
from harness.host.loads import HostLoad, LoadResult, load_loads, precheck
from harness.host.perf_output import error_message, parse_stat_csv, summarize
from harness.judge import coexist
from harness.judge.expectations import CONDITIONS, Context
from harness.suite.profiles import load_profiles
from tests.helpers import SHARED_DATA, TEST_DATA

PROFILES = load_profiles()
LOADS = load_loads()
GUEST = LOADS["host-counting-guest"]
HOST_ONLY = LOADS["host-counting-host-only"]
SAMPLING = LOADS["host-sampling"]
#: No hardware PMU here (kvm_pvm): perf_event_open of a hardware event fails with ENOENT.
NO_HOST_PMU = not Path("/sys/bus/event_source/devices/cpu").exists()


def host(name: str) -> dict:
    return json.loads((TEST_DATA / "hosts" / f"{name}.json").read_text())


def holder(host_name: str, profile: str = "pmu-on", accel: str = "kvm") -> coexist.MediatedHolder:
    return coexist.mediated_pmu_holder(Context(accel, host(host_name), PROFILES[profile]))


def interval_csv(values: dict[str, str], intervals: int = 2) -> str:
    """``perf stat -x, -I 500`` rows as perf 6.1 prints them (tests/data/perf-stat_x-I500_*_pvm-host.txt)."""
    lines = []
    for i in range(1, intervals + 1):
        for event, value in values.items():
            run, pct = ("0", "100.00") if value.startswith("<") else ("500000000", "100.00")
            lines.append(f"     {i * 0.5:.9f},{value},,{event},{run},{pct},,")
    return "\n".join(lines) + "\n"


def stat_events(values: dict[str, str]) -> dict:
    return summarize(parse_stat_csv(interval_csv(values)))


COUNTED_GH = stat_events({"cycles:GH": "1834521", "instructions:GH": "922013"})
COUNTED_H = stat_events({"cycles:H": "1834521", "instructions:H": "922013"})


def running(events: dict) -> LoadResult:
    return LoadResult("x", status="running", events=events)


#: What HostLoad records for a refused include-guest load (the probe's sentence, then perf 6.1's own words for a
#: lone event: tools/perf/builtin-stat.c stat_handle_error() counts EOPNOTSUPP as <not supported>).
REFUSAL = mediated_probe.RefusalProbe("cycles", "cpu 3", errno.EOPNOTSUPP, None, twin_tried=True)
REFUSED = LoadResult("host-counting-guest", status="refused", counts_guest=True, probe=REFUSAL.to_json(),
                     reason=f"{REFUSAL.describe()}; perf's own words: perf: cycles:GH <not supported>")  # fmt: skip


# --- F1: whose mediated PMU ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["spr-mediated", "genoa-mediated"])
def test_a_pmu_on_vm_on_a_mediated_host_holds_a_mediated_pmu(name):
    found = holder(name)
    assert found.holds and "kvm_arch_vcpu_precreate" in found.why
    assert coexist.host_load(GUEST, REFUSED, "mediated", COUNTED_GH, found).status == "pass"
    verdict = coexist.host_load(GUEST, running(COUNTED_GH), "mediated", COUNTED_GH, found)
    assert verdict.status == "fail" and "must be refused" in verdict.reason


def test_a_tcg_run_on_a_mediated_host_holds_none_and_its_load_simply_runs():
    """F1 (b): vpmu_mode describes the host; a TCG guest is no KVM VM and holds no mediated PMU."""
    found = holder("spr-mediated", accel="tcg")
    assert not found.holds and found.why.startswith("accel tcg")
    verdict = coexist.host_load(GUEST, running(COUNTED_GH), "mediated", COUNTED_GH, found)
    assert verdict.status == "pass", verdict.reason


def test_a_refusal_seen_by_a_vm_without_a_mediated_pmu_is_another_vms():
    """F1 (c): nr_mediated_pmu_vms is host-wide, so the refusal is not this run's to judge."""
    verdict = coexist.host_load(GUEST, REFUSED, "mediated", {}, holder("spr-mediated", accel="tcg"))
    assert verdict.status == "skip" and verdict.reason.startswith("not-applicable: the refusal is host-wide")
    assert "EOPNOTSUPP (95)" in verdict.reason


def test_pmu_off_on_intel_still_holds_a_mediated_pmu_with_released_qemu():
    """pmu=off hides the PMU through CPUID 0AH only; kvm_arch_vcpu_precreate() looks at kvm->arch.enable_pmu,
    which only KVM_PMU_CAP_DISABLE clears, and released QEMU does not set it: the refusal is still required."""
    found = holder("spr-mediated", profile="pmu-off")
    assert found.holds and "KVM_PMU_CAP_DISABLE" in found.why
    assert coexist.host_load(GUEST, REFUSED, "mediated", {}, found).status == "pass"
    assert coexist.host_load(GUEST, running(COUNTED_GH), "mediated", COUNTED_GH, found).status == "fail"


def test_pmu_off_on_amd_depends_on_qemu_passing_it_to_kvm(monkeypatch):
    """Expectation pmu_off_honoured: released QEMU gives an AMD pmu=off guest its counters anyway (so KVM
    creates the mediated PMU); a QEMU that sets KVM_PMU_CAP_DISABLE spares the VM, and its load simply runs."""
    assert holder("genoa-mediated", profile="pmu-off").holds
    monkeypatch.setitem(CONDITIONS, "pmu_off_reaches_kvm", lambda ctx: None)
    spared = holder("genoa-mediated", profile="pmu-off")
    assert not spared.holds and "KVM_PMU_CAP_DISABLE" in spared.why
    assert coexist.host_load(GUEST, running(COUNTED_GH), "mediated", COUNTED_GH, spared).status == "pass"
    assert coexist.host_load(GUEST, REFUSED, "mediated", {}, spared).status == "skip"


def test_perf_based_host_holds_none_and_a_refusal_there_is_a_failure():
    found = holder("spr-perf-based")
    assert not found.holds and found.why.startswith("vPMU mode perf-based")
    verdict = coexist.host_load(GUEST, REFUSED, "perf-based", {}, found)
    assert verdict.status == "fail" and "although the vPMU is perf-based" in verdict.reason


def test_host_only_loads_run_whatever_the_holder():
    assert coexist.host_load(HOST_ONLY, running(COUNTED_H), "mediated", COUNTED_H, holder("spr-mediated")).status \
        == "pass"  # fmt: skip


def test_callers_without_the_run_context_keep_the_host_mode_rule():
    """The 4-argument call (no holder) judges by the host's vPMU mode, as before."""
    assert coexist.host_load(GUEST, REFUSED, "mediated", {}).status == "pass"
    assert coexist.host_load(GUEST, running(COUNTED_GH), "mediated", COUNTED_GH).status == "fail"
    assert coexist.host_load(GUEST, REFUSED, "perf-based", {}).status == "fail"


# --- P1: the kernel's errno, not perf's text ---------------------------------------------------------------


def test_perf_event_attr_layout_matches_the_c_header(tmp_path):
    """The ctypes struct is byte-for-byte what the C compiler builds from include/uapi/linux/perf_event.h."""
    header = Path("/usr/include/linux/perf_event.h")
    if shutil.which("gcc") is None or not header.exists():
        pytest.skip("host: gcc or linux/perf_event.h missing")
    source = tmp_path / "attr.c"
    source.write_text(
        "#include <linux/perf_event.h>\n#include <stdio.h>\n#include <string.h>\n"
        "int main(void) { struct perf_event_attr a; memset(&a, 0, sizeof(a));\n"
        "  a.type = PERF_TYPE_HARDWARE; a.size = PERF_ATTR_SIZE_VER0; a.config = PERF_COUNT_HW_INSTRUCTIONS;\n"
        "  a.disabled = 1; a.exclude_guest = 1; a.exclude_host = 1;\n"
        "  const unsigned char *p = (const unsigned char *)&a;\n"
        '  for (int i = 0; i < PERF_ATTR_SIZE_VER0; i++) printf("%02x", p[i]);\n'
        '  printf("\\n%d\\n", PERF_ATTR_SIZE_VER0); return 0; }\n'
    )
    subprocess.run(["gcc", "-o", str(tmp_path / "attr"), str(source)], check=True, capture_output=True)
    c_bytes, size = subprocess.run([str(tmp_path / "attr")], check=True, capture_output=True,
                                   text=True).stdout.split()  # fmt: skip
    attr = mediated_probe.make_attr(mediated_probe.PERF_TYPE_HARDWARE, 1, exclude_guest=True, exclude_host=True)
    assert int(size) == mediated_probe.PERF_ATTR_SIZE_VER0 == len(bytes(attr))
    assert bytes(attr).hex() == c_bytes


def test_a_software_event_really_opens_here():
    attr = mediated_probe.make_attr(mediated_probe.PERF_TYPE_SOFTWARE, mediated_probe.SOFTWARE_EVENTS["cpu-clock"],
                                    exclude_guest=False)  # fmt: skip
    fd = mediated_probe.perf_event_open(attr, 0, -1)
    assert fd >= 0, os.strerror(-fd)
    os.close(fd)


def test_a_hardware_event_here_fails_with_enoent_and_is_no_refusal():
    """Recorded on this machine (kvm_pvm, Linux 6.18, no hardware PMU): cycles with exclude_guest=0 on this
    thread fails with ENOENT (2); ENOENT is no refusal, so no twin is opened."""
    probe = mediated_probe.probe_include_guest("cycles", 0, -1)
    if not NO_HOST_PMU:
        assert probe.errno in (None, errno.EOPNOTSUPP, errno.EACCES)
        return
    assert probe.errno == errno.ENOENT and not probe.twin_tried and not probe.refused
    assert "failed with ENOENT (2)" in probe.describe()
    assert probe.to_json()["errno_name"] == "ENOENT"


def kernel(refuse_include_guest: bool, twin_errno: int | None = None):
    """An opener answering as kernel/events/core.c does while a VM holds a mediated PMU: exclude_guest=0 ->
    -EOPNOTSUPP (mediated_pmu_account_event), exclude_guest=1 -> an fd (or ``twin_errno``)."""

    def opener(attr: mediated_probe.PerfEventAttr, pid: int, cpu: int) -> int:
        include_guest = not attr.flags & mediated_probe.ATTR_EXCLUDE_GUEST
        if include_guest and refuse_include_guest:
            return -errno.EOPNOTSUPP
        if not include_guest and twin_errno is not None:
            return -twin_errno
        return os.open(os.devnull, os.O_RDONLY)

    return opener


def test_eopnotsupp_with_an_opening_twin_is_the_refusal():
    probe = mediated_probe.probe_include_guest("instructions", -1, 3, kernel(True))
    assert probe.refused and probe.event == "instructions" and probe.target == "cpu 3"
    assert "EOPNOTSUPP (95)" in probe.describe() and "mediated_pmu_account_event" in probe.describe()
    assert mediated_probe.probe_include_guest("cycles", 1234, -1, kernel(False)).errno is None


def test_eopnotsupp_for_both_is_an_unusable_event_not_a_refusal():
    probe = mediated_probe.probe_include_guest("cycles", -1, 0, kernel(True, twin_errno=errno.EOPNOTSUPP))
    assert not probe.refused and "the event itself is unusable" in probe.describe()


def test_non_generic_events_are_probed_as_cycles():
    """The refusal is per PMU (PERF_PMU_CAP_MEDIATED_VPMU), so a raw event is probed as cycles on the core PMU."""
    assert mediated_probe.probe_include_guest("cpu/event=0x3c/", -1, 0, kernel(True)).event == "cycles"


def test_the_load_records_the_refusal_with_the_errno_and_perfs_words(tmp_path, monkeypatch):
    """HostLoad asks the kernel before starting an include-guest load: a refusal never starts perf, and the
    reason names the errno, then perf's own words (here perf 6.1: ``cycles:GH <not supported>``)."""
    if shutil.which("perf") is None:
        pytest.skip("host: perf is not installed")
    monkeypatch.setattr(mediated_probe, "perf_event_open", kernel(True))
    load = HostLoad(GUEST, tmp_path, [os.getpid()], [0])
    result = load.start()
    assert result.status == "refused" and result.output is None and load._proc is None
    assert result.probe["errno"] == errno.EOPNOTSUPP and result.probe["refused"] is True
    assert "EOPNOTSUPP (95)" in result.reason and "perf's own words: " in result.reason
    if NO_HOST_PMU:  # what perf 6.1 prints for a lone event it cannot open (ENOENT here, EOPNOTSUPP alike)
        assert result.reason.endswith("perf's own words: perf: cycles:GH <not supported>, instructions:GH "
                                      "<not supported>")  # fmt: skip
    assert coexist.host_load(GUEST, result, "mediated", {}, holder("spr-mediated")).status == "pass"


def test_a_group_leader_gets_perfs_fatal_text_not_a_row():
    """A group leader's open error is fatal in perf stat (evsel__open_strerror), so perf's text differs by errno
    and cannot identify the refusal: under EOPNOTSUPP it is "No hardware sampling interrupt available." on x86.
    Here, with ENOENT, the real capture and a live run agree."""
    capture = (TEST_DATA / "perf-stat_x_group-D_hw-enoent_pvm-host.txt").read_text()
    assert error_message(capture) == "The cycles:GH event is not supported."
    assert error_message("Error:\nNo hardware sampling interrupt available.\n") == \
        "No hardware sampling interrupt available."  # fmt: skip
    if shutil.which("perf") is None or not NO_HOST_PMU:
        return
    assert precheck("{cycles:GH,instructions:GH}:D") == "perf: The cycles:GH event is not supported."


# --- P2: running is not enough; the load must have counted ------------------------------------------------------


def test_a_load_whose_events_never_ran_is_no_pass():
    """Every event ``<not counted>`` (a pinned group holding the counters: the ICL capture in
    shared/data/perf-stat) is a load that did not load the PMU."""
    text = (SHARED_DATA / "perf-stat" / "intel-icl_csv_not-counted_group-vs-pinned-D-background.txt").read_text()
    events = summarize(parse_stat_csv(text))
    verdict = coexist.host_load(HOST_ONLY, running(events), "perf-based", events, holder("spr-perf-based"))
    assert verdict.status == "skip"
    assert verdict.reason.startswith("host-load: the load counted nothing for slots <not counted> throughout")


def test_a_load_reading_zero_is_no_pass():
    events = stat_events({"cycles:H": "0", "instructions:H": "922013"})
    verdict = coexist.host_load(HOST_ONLY, running(events), "perf-based", events, holder("spr-perf-based"))
    assert verdict.status == "skip" and verdict.reason == "host-load: the load counted nothing for cycles:H read " \
        "0 throughout"  # fmt: skip


def test_a_load_counted_in_a_later_interval_passes():
    """``<not counted>`` in one interval (multiplexed out) and counts in the next: it did load the PMU."""
    first = interval_csv({"cycles:H": "<not counted>", "instructions:H": "922013"}, 1)
    second = interval_csv({"cycles:H": "1834521", "instructions:H": "922013"}, 1).replace("0.500000000", "1.0000000")
    text = first + second
    events = summarize(parse_stat_csv(text))
    assert coexist.host_load(HOST_ONLY, running(events), "perf-based", events).status == "pass"


def test_no_output_yet_and_no_samples_are_named():
    nothing = coexist.host_load(HOST_ONLY, running({}), "perf-based", {})
    assert nothing.status == "skip" and nothing.reason == "host-load: perf printed no counts so far"
    samples = {"cycles:GH": {"status": "<no samples>", "value": 0, "unit": "samples", "min_pct_running": None,
                             "max_value": 0, "counted_rows": 0, "rows": 1}}  # fmt: skip
    verdict = coexist.host_load(SAMPLING, running(samples), "perf-based", samples, holder("spr-perf-based"))
    assert verdict.status == "skip" and verdict.reason == "host-load: the load counted nothing for cycles:GH " \
        "<no samples> throughout"  # fmt: skip
    samples["cycles:GH"].update(status="counted", value=412, max_value=412, counted_rows=1)
    assert coexist.host_load(SAMPLING, running(samples), "perf-based", samples).status == "pass"


def test_a_hybrid_event_counts_when_one_core_pmu_counted():
    """A hybrid host prints one row per core PMU (cpu_core/cycles:H/, cpu_atom/cycles:H/, as in
    shared/data/perf-stat/intel-hybrid_stat-a_multiplexed_csv.txt); a -C load on P-cores never runs the atom one."""
    events = stat_events({"cpu_core/cycles:H/": "1834521", "cpu_atom/cycles:H/": "<not counted>"})
    assert coexist.host_load(HOST_ONLY, running(events), "perf-based", events).status == "pass"
    events = stat_events({"cpu_core/cycles:H/": "<not counted>", "cpu_atom/cycles:H/": "<not counted>"})
    verdict = coexist.host_load(HOST_ONLY, running(events), "perf-based", events)
    assert (
        verdict.status == "skip" and "cpu_core/cycles:H/ <not counted> throughout, cpu_atom/cycles:H/" in verdict.reason
    )
