"""Co-existence in depth: before-boot loads, per-vCPU loads and the mux-cost verdict over inputs in their real
formats (probe records from tests/test_verdicts' factories, QEMU's own error text, host facts from tests/data/hosts,
sweeps made by harness.suite.mux_sweep.measure itself); and one real run here that boots two vCPUs, pins them, starts a
software load before the VM and one bound to vCPU 0's thread."""

from __future__ import annotations

import errno
import json
from dataclasses import replace
from pathlib import Path

import pytest

from harness.errors import BootError, LaunchError, UsageError
from harness.host.loads import IDLE, HostLoad, LoadResult, LoadSpec, load_loads, select_loads
from harness.judge import coexist, coexist_depth, plan
from harness.judge.expectations import Context
from harness.report import results
from harness.suite import mux_sweep
from harness.suite.profiles import load_profiles
from tests.helpers import TEST_DATA, assert_one_line_error, run_cli
from tests.test_verdicts import ABSENT, EXPECTED, INSNS, count, gp_group, intel_kvm_guest_view

PROFILES = load_profiles()
LOADS = load_loads()
BEFORE = LOADS["host-counting-guest-before-boot"]
VCPU0 = LOADS["host-pinned-vcpu0"]
MUX = LOADS["host-multiplexing"]
PINNING = {"vcpus": [{"vcpu": 0, "thread": 4100, "cpu": 2}, {"vcpu": 1, "thread": 4101, "cpu": 3}]}
#: What QEMU prints when KVM_CREATE_VCPU fails with EBUSY (accel/kvm/kvm-all.c kvm_init_vcpu, strerror(EBUSY)).
QEMU_EBUSY = "qemu-system-x86_64: kvm_init_vcpu: kvm_create_vcpu failed (0): Device or resource busy"


def host(name: str) -> dict:
    return json.loads((TEST_DATA / "hosts" / f"{name}.json").read_text())


def ctx(host_name: str, profile: str = "pmu-on", accel: str = "kvm") -> Context:
    return Context(accel, host(host_name), PROFILES[profile])


def holder(host_name: str, profile: str = "pmu-on") -> coexist.MediatedHolder:
    return coexist.mediated_pmu_holder(ctx(host_name, profile))


def booted(**record) -> LoadResult:
    base = {"load_status": "running", "load_ready_s": 0.41, "boot_started_s": 0.42, "qemu_launched_s": 0.45,
            "booted": True, "boot_error": None, "vcpu_create_refused": False}  # fmt: skip
    return LoadResult(BEFORE.name, status="stopped", counts_guest=True, before_boot={**base, **record})


def refused_boot(error: str) -> LoadResult:
    return booted(booted=False, qemu_launched_s=None, boot_error=error,
                  vcpu_create_refused=coexist_depth.vcpu_create_refused(error))  # fmt: skip


# --- loads.toml: start, mux_sweep, per-vCPU placeholders ------------------------------------------------------------


def test_shipped_loads_of_this_issue():
    assert BEFORE.before_boot and BEFORE.counts_guest and not BEFORE.uses("vcpu_tids")
    assert MUX.mux_sweep == (1, 4, 16, 100)
    assert VCPU0.indexes("vcpu_tids") == [0] and not VCPU0.uses_whole("vcpu_tids")
    order = select_loads(LOADS, [], True, Path("loads.toml"))
    assert order[0] == IDLE and order[-1] == BEFORE.name  # before-boot loads reboot the guest: last


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-a", "-e", "cpu-clock"]\nstart = "early"\n',
         "field 'start' is 'early' (allowed: after-boot, before-boot)"),
        ('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-t", "{vcpu_tids[0]}", "-e", "cpu-clock"]\n'
         'start = "before-boot"\n', "a before-boot load cannot use {vcpu_tids}"),
        ('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-a", "-e", "cycles:H"]\nmux_sweep = [0, 4]\n',
         "field 'mux_sweep' must list at least two integers >= 1"),
        ('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-a", "-e", "cycles:H"]\nmux_sweep = [4]\n',
         "at least two integers"),
        ('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-a", "-e", "cpu-clock"]\nmux_sweep = [1, 4]\n',
         "field 'mux_sweep' needs hardware (core PMU) events"),
        ('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-o", "{output[0]}", "-e", "cpu-clock"]\n',
         "{output[0]} takes no index"),
        ('[idle]\ndescription = "d"\nstart = "before-boot"\n', "the idle baseline takes no 'start' or 'mux_sweep'"),
    ],
)  # fmt: skip
def test_bad_loads_of_this_issue_are_one_line_errors(tmp_path, text, fragment):
    path = tmp_path / "loads.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=None) as caught:
        load_loads(path)
    assert fragment in str(caught.value) and str(path) in str(caught.value)


def test_cli_rejects_a_before_boot_load_naming_a_vcpu(tmp_path):
    path = tmp_path / "loads.toml"
    path.write_text('[x]\ndescription = "d"\ncommand = ["perf", "stat", "-C", "{vcpu_cpus}", "-e", "cpu-clock"]\n'
                    'start = "before-boot"\n')  # fmt: skip
    assert_one_line_error(run_cli("run", "--loads-file", str(path), "--out", str(tmp_path / "o")), str(path), "[x]",
                          "a before-boot load cannot use {vcpu_cpus}")  # fmt: skip


def test_indexed_placeholders_name_one_vcpu(tmp_path):
    spec = LoadSpec("v", "d", ("perf", "stat", "-t", "{vcpu_tids[1]}", "-C", "{vcpu_cpus[0]}", "-e", "{a,b}:D"))
    assert HostLoad(spec, tmp_path, [11, 12], [2, 3]).argv() == ["perf", "stat", "-t", "12", "-C", "2", "-e",
                                                                  "{a,b}:D"]  # fmt: skip
    result = HostLoad(spec, tmp_path, [11], [2]).start()
    assert result.status == "unavailable"
    assert result.reason == ("{vcpu_tids[1]} names vCPU 1, but the guest has 1 vCPU(s) (a per-vCPU load needs a "
                             "profile with more: smp in profiles.toml)")  # fmt: skip


def test_profiles_take_smp(tmp_path):
    assert PROFILES["pmu-on-2vcpu"].smp == 2 and PROFILES["pmu-on"].smp == 1
    assert PROFILES["pmu-on-2vcpu"].applies_to("tcg")
    for bad in ("0", "9", "true", '"2"'):
        path = tmp_path / "p.toml"
        path.write_text(f'[p]\ndescription = "d"\ncpu = "host"\nsmp = {bad}\n')
        with pytest.raises(UsageError, match="field 'smp'"):
            load_profiles(path)


# --- before boot ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        str(LaunchError("QEMU exited before QMP was ready (EOFError)", 1, ["qemu-system-x86_64", "-accel", "kvm"],
                        f"{QEMU_EBUSY}\n")),
        str(BootError(f"QMP 'qom-get': QEMU (pid 4242) exited with code 1; QEMU said: {QEMU_EBUSY}", "")),
        str(BootError("QMP 'qom-get': QEMU (pid 4242) exited with code 1; QEMU said: qemu-system-x86_64: "
                      "kvm_init_vcpu: kvm_get_vcpu failed (0): Device or resource busy", "")),  # older QEMU
    ],
)  # fmt: skip
def test_vcpu_creation_refused_with_ebusy_is_recognised_in_qemus_words(error):
    assert coexist_depth.vcpu_create_refused(error)


def test_other_boot_failures_are_not_the_refusal():
    assert not coexist_depth.vcpu_create_refused("qemu-system-x86_64: kvm_init_vcpu: kvm_create_vcpu failed (0): "
                                                 "Invalid argument")  # fmt: skip
    assert not coexist_depth.vcpu_create_refused("guest kernel panicked: Kernel panic - not syncing: VFS")
    assert not coexist_depth.vcpu_create_refused(None)


def test_mediated_vpmu_refusing_the_vm_under_an_include_guest_load_is_the_pass():
    mediated = holder("spr-mediated")
    assert mediated.holds
    v = coexist_depth.load_before_boot(BEFORE, refused_boot(f"QEMU said: {QEMU_EBUSY}"), mediated)
    assert v.status == "pass" and "perf_create_mediated_pmu() returns -EBUSY" in v.reason
    assert v.reason.endswith("Device or resource busy") and v.expected == "VM creation refused with EBUSY"
    # ...and the group's other checks SKIP, while a boot failure of another kind is their ERROR
    reason, expected = coexist_depth.unbooted_gate(BEFORE, refused_boot(QEMU_EBUSY), mediated)
    assert expected and reason.startswith("not-applicable: KVM refused to create the VM")
    reason, expected = coexist_depth.unbooted_gate(BEFORE, refused_boot("guest kernel panicked"), mediated)
    assert not expected and "guest kernel panicked" in reason


def test_a_mediated_host_that_creates_the_vm_anyway_fails():
    v = coexist_depth.load_before_boot(BEFORE, booted(), holder("spr-mediated"))
    assert v.status == "fail" and "yet KVM created the VM" in v.reason
    other_errno = "qemu-system-x86_64: kvm_init_vcpu: kvm_create_vcpu failed (0): Cannot allocate memory"
    other = coexist_depth.load_before_boot(BEFORE, refused_boot(other_errno), holder("spr-mediated"))
    assert other.status == "fail" and "not with EBUSY: kvm_init_vcpu: kvm_create_vcpu failed (0)" in other.reason
    # a boot that failed for another reason (a panic, a timeout) is no KVM verdict: ERROR, like the group's checks
    panic = coexist_depth.load_before_boot(BEFORE, refused_boot("guest kernel panicked: Oops"), holder("spr-mediated"))
    assert panic.status == "error" and "not because KVM refused the vCPU" in panic.reason
    # a load that died before KVM created the vCPU tested nothing
    gone = booted()
    gone.before_boot["load_alive_after_boot"] = False
    assert coexist_depth.load_before_boot(BEFORE, gone, holder("spr-mediated")).status == "error"


def test_ebusy_is_recognised_in_every_libc_and_qemu_wording():
    for text in (
        QEMU_EBUSY,
        "kvm_init_vcpu: kvm_get_vcpu failed (0): Device or resource busy",
        "kvm_init_vcpu: kvm_create_vcpu failed (1): Resource busy",  # musl
        "kvm_init_vcpu failed: Device or resource busy",
    ):  # before QEMU reported through errp
        assert coexist_depth.vcpu_create_refused(text), text
    assert not coexist_depth.vcpu_create_refused("kvm_init_vcpu: kvm_create_vcpu failed (0): Invalid argument")


def test_a_pmu_off_vm_created_under_the_load_is_no_verdict():
    """Released QEMU does not pass pmu=off to KVM; one that does (KVM_PMU_CAP_DISABLE) spares the VM."""
    uncertain = coexist.MediatedHolder(True, "pmu=off guest", certain=False)
    v = coexist_depth.load_before_boot(BEFORE, booted(), uncertain)
    assert v.status == "skip" and v.reason.startswith("qemu-limit: ") and "KVM_PMU_CAP_DISABLE" in v.reason


def test_perf_based_vpmu_boots_under_the_load_and_runs_the_group():
    perf_based = holder("spr-perf-based")
    v = coexist_depth.load_before_boot(BEFORE, booted(), perf_based)
    assert v.status == "pass" and "QEMU launched at 0.45 s" in v.reason
    assert coexist_depth.unbooted_gate(BEFORE, booted(), perf_based) is None
    v = coexist_depth.load_before_boot(BEFORE, refused_boot(QEMU_EBUSY), perf_based)
    assert v.status == "fail" and "nothing should refuse it" in v.reason
    v = coexist_depth.load_before_boot(BEFORE, refused_boot("boot: no console marker within 120 s"), perf_based)
    assert v.status == "error" and "not for a KVM refusal" in v.reason
    # the load itself ran, so coexist.host_load judges it as running, not as a missing refusal
    events = {"cycles:GH": {"status": "counted", "value": 9e8, "max_value": 9e8, "min_pct_running": 100.0}}
    result = replace(booted(), events=events)
    assert coexist.host_load(BEFORE, result, "mediated", {}, holder("spr-mediated")).status == "pass"
    refused = LoadResult(BEFORE.name, status="refused", reason="EOPNOTSUPP (95)")
    v = coexist.host_load(BEFORE, refused, "mediated", {}, holder("spr-mediated"))
    assert v.status == "skip" and "another VM's mediated PMU" in v.reason


def test_before_boot_skips_and_errors():
    idle = LOADS[IDLE]
    assert coexist_depth.load_before_boot(idle, LoadResult(IDLE), holder("spr-mediated")).reason == \
        plan.IDLE_LOAD_REASON  # fmt: skip
    v = coexist_depth.load_before_boot(MUX, LoadResult(MUX.name, status="stopped"), holder("spr-mediated"))
    assert v.reason == 'not-applicable: host-multiplexing starts after the guest boots (loads.toml start = ' \
        '"after-boot")'  # fmt: skip
    assert coexist_depth.load_before_boot(BEFORE, LoadResult(BEFORE.name), holder("spr-mediated")).status == "error"


# --- per-vCPU loads -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "pinning", "reached"),
    [
        (("perf", "stat", "-a", "-e", "cycles:H"), PINNING, {0, 1}),
        (("perf", "stat", "-t", "{vcpu_tids}", "-e", "cycles:H"), PINNING, {0, 1}),
        (("perf", "stat", "-t", "{vcpu_tids[0]}", "-e", "cycles:H"), PINNING, {0}),
        (("perf", "stat", "-C", "{vcpu_cpus[1]}", "-e", "cycles:H"), PINNING, {1}),
        (("perf", "stat", "-C", "3", "-e", "cycles:H"), PINNING, {1}),
        (("perf", "stat", "-C", "0-1", "-e", "cycles:H"), PINNING, set()),
        # one host CPU for both vCPUs: a CPU-bound load reaches both, a thread-bound one only its thread
        (("perf", "stat", "-C", "{vcpu_cpus[0]}", "-e", "cycles:H"),
         {"vcpus": [{"vcpu": 0, "thread": 1, "cpu": 0}, {"vcpu": 1, "thread": 2, "cpu": 0}]}, {0, 1}),
        (("perf", "stat", "-t", "{vcpu_tids[0]}", "-e", "cycles:H"),
         {"vcpus": [{"vcpu": 0, "thread": 1, "cpu": 0}, {"vcpu": 1, "thread": 2, "cpu": 0}]}, {0}),
        # an unpinned vCPU may run anywhere
        (("perf", "stat", "-C", "{vcpu_cpus[0]}", "-e", "cycles:H"),
         {"vcpus": [{"vcpu": 0, "thread": 1, "cpu": None}, {"vcpu": 1, "thread": 2, "cpu": None}]}, {0, 1}),
    ],
)  # fmt: skip
def test_load_reach(command, pinning, reached):
    assert set(coexist_depth.load_reach(LoadSpec("l", "d", command), pinning).vcpus) == reached


def vcpu_canary(vcpu, records, spec=VCPU0, host_name="spr-perf-based", profile="pmu-on-2vcpu", idle=None):
    return coexist_depth.vcpu_canary(vcpu, ctx(host_name, profile), EXPECTED, intel_kvm_guest_view(), records, idle,
                                     spec, LoadResult(spec.name, status="stopped"), PINNING)  # fmt: skip


def lossy(vcpu_records: list[dict]) -> list[dict]:
    records = list(vcpu_records)
    records[2] = count("instructions", 2, 2, INSNS - 4_000)  # running == enabled: a silent loss
    return records


def test_both_vcpus_exact_under_a_vcpu0_load():
    zero = vcpu_canary(0, gp_group("instructions", INSNS))
    one = vcpu_canary(1, gp_group("instructions", INSNS))
    assert zero.status == one.status == "pass"
    assert zero.reason.startswith("vCPU 0, reached by the load: vCPU 0 (per-vCPU targets of host-pinned-vcpu0)")
    assert one.reason.startswith("vCPU 1, not reached by the load") and one.observed["reached"] is False


def test_a_loss_on_the_vcpu_the_load_does_not_reach_is_a_failure():
    v = vcpu_canary(1, lossy(gp_group("instructions", INSNS)))
    assert v.status == "fail" and "yet the load disturbed it" in v.reason and "counts lost silently" in v.reason


def test_a_loss_on_the_loaded_vcpu_under_a_pinned_load_is_the_perf_based_vpmus_documented_behaviour():
    v = vcpu_canary(0, lossy(gp_group("instructions", INSNS)))
    assert v.status == "skip" and "pins hardware events" in v.reason and "silently dropped guest events" in v.reason
    # the mediated vPMU "eliminates lost guest events": the same loss is a failure there
    assert vcpu_canary(0, lossy(gp_group("instructions", INSNS)), host_name="spr-mediated").status == "fail"


def test_a_probe_that_could_not_pin_itself_is_an_error():
    pin = {"probe": "counters", "kind": "pin", "error": "sched_setaffinity", "errno": errno.EINVAL,
           "strerror": "Invalid argument"}  # fmt: skip
    v = vcpu_canary(1, [pin, *gp_group("instructions", INSNS)])
    assert v.status == "error" and "could not pin itself to guest CPU 1" in v.reason


def test_one_vcpu_profiles_skip_with_the_pregates_words():
    c = ctx("spr-perf-based", "pmu-on")
    v = coexist_depth.vcpu_canary(1, c, EXPECTED, intel_kvm_guest_view(), [], None, VCPU0, None, PINNING)
    assert v.status == "skip" and v.reason == plan.gate_reason(("pmu", "two_vcpus"), c)
    assert v.reason.startswith("profile: pmu-on has 1 vCPU")
    tcg = ctx("spr-perf-based", "pmu-on-2vcpu", "tcg")
    v = coexist_depth.vcpu_canary(1, tcg, ABSENT, intel_kvm_guest_view(), [], None, VCPU0, None, PINNING)
    assert v.status == "skip" and v.reason == ABSENT.reason


# --- mux cost: the verdict over a sweep measure() made -----------------------------------------------------------


def sweep(points: list[tuple[int, float, float | None]], **extra) -> dict:
    """A sweep as mux_sweep.measure() stores it: (interval ms, vCPU 0 exits/s, host running share) per setting over a
    2 s window, the restore outcome of a guard that put 4 ms back."""
    return {"intervals": [p[0] for p in points], "window_s": 2.0, "vcpu": 0, "unavailable": None,
            "schemas": {"error": None, "offered": {"vcpu": ["exits"]}, "pmu_relevant": []},
            "points": [{"interval_ms": ms, "window_s": 2.0, "stats": {"exits": int(rate * 2), "irq_exits": int(rate)},
                        "host_running_pct": share, "canary_key": mux_sweep.canary_key(ms), "error": None}
                       for ms, rate, share in points],
            "restore": {"originals": {"cpu": 4}, "written": [p[0] for p in points],
                        "pmus": {"cpu": {"original": 4, "found": 100, "restored": True}}, "restored": True},
            **extra}  # fmt: skip


def mux_cost(data: dict, canaries: dict | None = None) -> object:
    exact = {ms: gp_group("instructions", INSNS) for ms in data["intervals"]}
    return coexist_depth.mux_cost(MUX, EXPECTED, intel_kvm_guest_view(), data, canaries or exact,
                                  gp_group("instructions", INSNS), LoadResult(MUX.name, status="stopped"))  # fmt: skip


PERF_BASED_CURVE = [(1, 1150.0, 33.3), (4, 400.0, 33.3), (16, 212.0, 33.4), (100, 160.0, 33.3)]
#: More than one exit per rotation: what FLAG_EXITS_PER_ROTATION is for (slope 2).
ANOMALOUS_CURVE = [(1, 2150.0, 33.3), (4, 650.0, 33.3), (16, 275.0, 33.4), (100, 170.0, 33.3)]
FLAT_CURVE = [(1, 152.0, 33.3), (4, 150.0, 33.3), (16, 151.0, 33.3), (100, 150.0, 33.3)]


def test_exact_counts_pass_and_a_rise_with_the_rotation_rate_is_flagged():
    # one exit per rotation is inherent (a hard-IRQ hrtimer on the vCPU's CPU): reported, not flagged
    v = mux_cost(sweep(PERF_BASED_CURVE))
    assert v.status == "pass" and "1.00 exits per rotation/s (flagged above 1.5)" in v.reason
    assert not v.observed["flagged"] and [p["interval_ms"] for p in v.observed["points"]] == [1, 4, 16, 100]
    assert v.observed["points"][0]["exits_per_s"] == 1150.0 and v.observed["points"][0]["canary"] == "pass"
    v = mux_cost(sweep(ANOMALOUS_CURVE))
    assert v.status == "pass" and "FLAGGED: exits/s rise by 2.00 per rotation/s, above 1.5" in v.reason
    assert v.observed["flagged"]
    flat = mux_cost(sweep(FLAT_CURVE))
    assert flat.status == "pass" and not flat.observed["flagged"] and "FLAGGED" not in flat.reason


def test_a_count_error_at_any_setting_fails_naming_it():
    canaries = {ms: gp_group("instructions", INSNS) for ms in (1, 4, 16, 100)}
    canaries[16] = lossy(canaries[16])
    v = mux_cost(sweep(FLAT_CURVE), canaries)
    assert v.status == "fail" and v.reason.startswith("guest counts not exact under host multiplexing at 16 ms")
    assert v.observed["points"][2]["canary"] == "fail" and v.observed["points"][2]["count_error_pct"] < 0


def test_mux_cost_skips_and_errors_say_why():
    unloaded = mux_cost(sweep([(1, 150.0, 100.0), (4, 150.0, 100.0)]))
    assert unloaded.reason.startswith("host-load: host-multiplexing did not multiplex on the vCPU's CPU (running "
                                      "share 100 %")  # fmt: skip
    assert mux_cost(sweep(FLAT_CURVE, unavailable="host: no core PMU perf_event_mux_interval_ms under /sys")).reason \
        == "host: no core PMU perf_event_mux_interval_ms under /sys"  # fmt: skip
    no_stats = sweep(FLAT_CURVE)
    for point in no_stats["points"]:
        point["stats"] = {}
    v = mux_cost(no_stats)  # the canaries are still judged: exact, so PASS, and the curve is said to be missing
    assert v.status == "pass" and "exits curve unavailable: QMP query-stats gave no KVM 'exits' statistic" in v.reason
    lossy_no_stats = sweep(FLAT_CURVE)
    for point in lossy_no_stats["points"]:
        point["stats"] = {}
    canaries = {ms: gp_group("instructions", INSNS) for ms in (1, 4, 16, 100)}
    canaries[4] = lossy(canaries[4])
    assert mux_cost(lossy_no_stats, canaries).status == "fail"
    lost = sweep(FLAT_CURVE)
    left = {"original": 4, "found": 10, "restored": False, "error": "/sys/.../cpu holds 10, which this run never wrote"}
    lost["restore"] = {"restored": False, "pmus": {"cpu": left}}
    v = mux_cost(lost)
    assert v.status == "error" and "could not be put back" in v.reason


def test_mux_cost_gate_reasons_are_the_pregates():
    view = intel_kvm_guest_view()
    facts = host("spr-perf-based")
    assert coexist_depth.mux_cost_gate(LOADS[IDLE], EXPECTED, view, facts).reason == plan.IDLE_LOAD_REASON
    assert coexist_depth.mux_cost_gate(MUX, ABSENT, view, facts).reason == ABSENT.reason
    v = coexist_depth.mux_cost_gate(VCPU0, EXPECTED, view, facts)
    assert v.reason == "not-applicable: host-pinned-vcpu0 sweeps no perf_event_mux_interval_ms (no mux_sweep in " \
        "loads.toml)"  # fmt: skip
    no_pmu = {**facts, "sysctls": {**facts["sysctls"], "perf_event_mux_interval_ms": {}}}
    assert coexist_depth.mux_cost_gate(MUX, EXPECTED, view, no_pmu).reason.startswith("host: no core PMU")
    assert coexist_depth.mux_cost_gate(MUX, EXPECTED, view, facts) is None


# --- a real run here ------------------------------------------------------------------------------------------------

LOADS_TOML = """\
[sw-before-boot]
description = "System-wide software counting started before the VM is created"
command = ["perf", "stat", "-a", "-x", ",", "-I", "200", "-e", "cpu-clock,task-clock"]
start = "before-boot"

[sw-vcpu0]
description = "Software counting bound to vCPU 0's thread"
command = ["perf", "stat", "-t", "{vcpu_tids[0]}", "-x", ",", "-I", "200", "-e", "task-clock"]
"""


@pytest.mark.integration
def test_two_vcpus_booted_pinned_and_a_load_started_before_the_vm(tmp_path, guest_image, host_facts):
    """pmu-on-2vcpu under idle, a load on vCPU 0's thread and a software load started before the VM: two vCPU threads
    pinned to host CPUs, the per-vCPU load follows vCPU 0's thread only, the before-boot load runs before QEMU is
    launched and the guest boots under it; the per-vCPU and sweep checks SKIP with their reasons under TCG."""
    loads = tmp_path / "loads.toml"
    loads.write_text(LOADS_TOML)
    out = tmp_path / "out"
    proc = run_cli("run", "--image", str(guest_image.directory), "--profile", "pmu-on-2vcpu", "--loads-file",
                   str(loads), "--load", "sw-before-boot", "--load", "sw-vcpu0", "--load", "idle", "--out", str(out),
                   timeout_s=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    document = results.load(out / "results.json")
    runs = {r["load"]: r for r in document["runs"]}
    assert list(runs) == ["idle", "sw-vcpu0", "sw-before-boot"]  # the before-boot load last
    # two vCPUs, each pinned (to distinct host CPUs where there are two)
    vcpus = runs["idle"]["guest"]["pinning"]["vcpus"]
    assert [v["vcpu"] for v in vcpus] == [0, 1] and len({v["thread"] for v in vcpus}) == 2
    assert all(v["cpu"] is not None for v in vcpus), vcpus
    assert runs["idle"]["profile_def"]["smp"] == 2
    # the per-vCPU load followed vCPU 0's thread, and it ran (task-clock counted)
    vcpu0 = runs["sw-vcpu0"]["host_load"]
    assert len(set(vcpu0["vcpu_tids"])) == 2 and vcpu0["vcpu_cpus"] == [v["cpu"] for v in vcpus]
    assert vcpu0["command"][vcpu0["command"].index("-t") + 1] == str(vcpu0["vcpu_tids"][0])
    assert vcpu0["events"]["task-clock"]["max_value"]
    # the before-boot load: running before the guest was booted again, the guest booted under it
    before = runs["sw-before-boot"]
    record = before["host_load"]["before_boot"]
    assert record["booted"] and record["load_status"] == "running" and not record["vcpu_create_refused"]
    assert record["load_ready_s"] <= record["boot_started_s"] < record["qemu_launched_s"]
    checks = {c["id"]: c for c in before["checks"]}
    assert checks["coexist.load_before_boot"]["status"] == "pass", checks["coexist.load_before_boot"]
    assert checks["coexist.host_load"]["status"] == "pass" and checks["enum.pmu_visible"]["status"] == "pass"
    new_threads = {v["thread"] for v in before["guest"]["pinning"]["vcpus"]}
    assert len(new_threads) == 2 and not new_threads & set(vcpu0["vcpu_tids"])  # a new VM, booted under the load
    for run in document["runs"]:
        by_id = {c["id"]: c for c in run["checks"]}
        for vcpu in (0, 1):
            check = by_id[f"coexist.vcpu_canary.{vcpu}"]
            if host_facts["accel"] == "tcg":
                assert check["status"] == "skip" and check["reason"].startswith("accel: no vPMU under TCG"), check
        mux = by_id["coexist.mux_cost"]
        assert mux["status"] == "skip", mux
        if run["load"] == "idle":
            assert by_id["coexist.load_before_boot"]["reason"] == plan.IDLE_LOAD_REASON
    assert "Host multiplexing cost" not in (out / "matrix.md").read_text()  # nothing swept here


# --- rejudge: the sweep and the per-vCPU probes are stored, and decided again -------------------------------------


def stored_sweep_run(reads: dict) -> dict:
    """A pmu-on-2vcpu run under host-multiplexing as the plugin writes it (schema /2): the canary probe at each
    setting and on each vCPU among its probes, the sweep among the host load's reads."""
    from harness.suite.replay import load_spec_json
    from tests.test_rejudge import probe, stored_check, stored_run

    exact = gp_group("instructions", INSNS)
    probes = {f"host-multiplexing/{mux_sweep.canary_key(ms)}": probe("counters", exact) for ms in (1, 4, 16, 100)}
    probes |= {"host-multiplexing/counters": probe("counters", exact),
               "host-multiplexing/counters@cpu1": probe("counters", lossy(exact))}  # fmt: skip
    ids = ("coexist.mux_cost", "coexist.vcpu_canary.0", "coexist.vcpu_canary.1", "coexist.load_before_boot")
    checks = [stored_check(check_id, feature="coexistence") for check_id in ids]
    run = stored_run("pmu-on-2vcpu", checks, probes)
    run["load"] = MUX.name
    run["guest"]["pinning"] = PINNING
    run["host_load"] = {**LoadResult(MUX.name, status="stopped").to_json(), "group_s": 30.0}
    run["load_inputs"] = {"spec": load_spec_json(MUX), "exits_before": 100, "exits_read": None, "reads": reads}
    return run


def test_rejudge_decides_the_sweep_and_the_vcpu_canaries_again_from_what_the_run_stored(tmp_path):
    from tests.test_rejudge import checks_by_id, rejudge

    proc, out = rejudge(tmp_path, results.build(host("spr-perf-based"), [stored_sweep_run(
        {"mux_sweep": sweep(ANOMALOUS_CURVE)})]))  # fmt: skip
    checks = checks_by_id(out)
    mux = checks["coexist.mux_cost"]
    assert (mux["status"], mux["rejudged"]) == ("pass", True) and mux["observed"]["flagged"], mux
    assert checks["coexist.vcpu_canary.0"]["status"] == "pass"
    one = checks["coexist.vcpu_canary.1"]  # -C {vcpu_cpus} reaches both vCPUs; the loss is a flexible load's: FAIL
    assert one["status"] == "fail" and one["reason"].startswith("vCPU 1, reached by the load: every vCPU"), one
    assert checks["coexist.load_before_boot"]["reason"].startswith("not-applicable: host-multiplexing starts after")
    assert proc.returncode == 1  # the failing canary
    _proc, out = rejudge(tmp_path, results.build(host("spr-perf-based"), [stored_sweep_run({})]), name="old.json")
    kept = checks_by_id(out)["coexist.mux_cost"]
    assert kept["rejudged"] is False
    assert kept["rejudge_reason"] == "the original run stored no mux_sweep for load host-multiplexing"
