"""Topdown, LBR, PEBS and IBS verdicts over records in the probes' exact format (keys checked against the
templates), with guest views built from the real Sapphire Rapids / Genoa dumps as KVM would present them."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from harness.cpu.caps import ArchLbr
from harness.host.loads import DEFAULT_LOADS_FILE, load_loads
from harness.judge import guest_kernel, ibs, lbr, pebs, topdown
from harness.judge.expectations import Expectation
from harness.probe.guest_view import MsrRead
from harness.probe.params import IBS_OP_CNT_CTL, TOPDOWN_METRICS, ibs_params, lbr_params
from harness.probe.runner import PROBES_DIR, ProbeBuilder
from tests.test_verdicts import amd_kvm_guest_view, intel_kvm_guest_view

ON = Expectation("feature", True, "expected: the feature")
OFF = Expectation("feature", False, "kvm-limit: not upstream")
HOSTS_DIR = Path(__file__).parent / "data" / "hosts"
#: The shipped host loads (guest_tests/loads.toml), as the harness reads them.
LOADS = load_loads(DEFAULT_LOADS_FILE)


def template_keys(probe: str, kind: str, error_path: tuple[str, ...] = ()) -> set[str]:
    """Keys a probe template prints into records of ``kind``: the rec_* and printf'ed keys between rec_start(kind)
    and the next rec_start, minus keys only its error path prints (``error_path``)."""
    source = (PROBES_DIR / f"{probe}.c.j2").read_text()
    keys: set[str] = set()
    for block in re.split(r"rec_start\(", source)[1:]:
        if block.startswith(f'"{kind}"') or (block.startswith("kind") and kind in ("precise", "ldlat")):
            keys |= set(re.findall(r'rec_(?:u64|i64|str)\("(\w+)"', block))
            keys |= set(re.findall(r'printf\(",\\"(\w+)\\":', block))
    return keys - set(error_path)


def with_perf_caps(view, value: int, **sysfs):
    return replace(view, msrs={**view.msrs, 0x345: MsrRead(0x345, value, None)}, sysfs={**view.sysfs, **sysfs})


# --- topdown ------------------------------------------------------------------------------------------------


#: sysfs of a 6.1 guest kernel that knows Sapphire Rapids: its topdown events (core.c spr_td_events_attrs, shown by
#: td_is_visible() because PERF_METRICS is enumerated) and its PMU name.
TOPDOWN_SYSFS = {"cpu/events/slots": "event=0x00,umask=0x4", "cpu/events/topdown-retiring": "event=0x00,umask=0x80",
                 "cpu/caps/pmu_name": "sapphire_rapids", "cpu/rdpmc": "1"}  # fmt: skip


def topdown_view(**sysfs):
    view = intel_kvm_guest_view()
    perfmon = replace(view.caps.arch_perfmon, fixed_counter_mask=0xF, fixed_counters=4)
    view = replace(view, caps=replace(view.caps, arch_perfmon=perfmon))
    return with_perf_caps(view, 0x2000 | (1 << 15), **{**TOPDOWN_SYSFS, **sysfs})


def topdown_record(workload, slots, retiring, bad, fe, be, cycles, raw=0xE60A030C, signal=0, fixed3=0, cap_user=1):
    """A topdown record as the probe prints it. ``raw`` is PERF_METRICS as RDPMC(1<<29) returns it: bytes 0-3 are
    retiring, bad speculation, frontend, backend and sum to 0xff (tools/perf/Documentation/topdown.txt); the default
    0x0c + 0x03 + 0x0a + 0xe6 = 0xff is a backend-bound split. ``fixed3`` is the control RDPMC(1<<30 | 3) made just
    before it, ``cap_user`` the slots event's perf_event_mmap_page.cap_user_rdpmc."""
    return {"probe": "topdown", "kind": "topdown", "workload": workload, "slots": slots, "retiring": retiring,
            "bad_spec": bad, "fe_bound": fe, "be_bound": be, "cycles": cycles, "rdpmc_metrics_signal": signal,
            "rdpmc_metrics": raw, "rdpmc_fixed3_signal": fixed3, "rdpmc_cap_user": cap_user}  # fmt: skip


def topology(siblings="0"):
    return {"probe": "topdown", "kind": "topology", "cpu": 0, "thread_siblings": siblings}


#: Sapphire Rapids (the guest view's CPU model 06_8FH) is 6 wide: 6 slots per unhalted cycle without SMT sharing.
GOOD_TOPDOWN = [topology(),
                topdown_record("alu", 6_000_000, 4_800_000, 150_000, 450_000, 600_000, 1_000_000, raw=0x1A1306CC),
                topdown_record("chase", 6_000_000, 300_000, 75_000, 225_000, 5_400_000, 1_000_000)]  # fmt: skip


def alu_ratio(ratio, siblings="0"):
    slots = int(ratio * 1_000_000)
    return [topology(siblings), topdown_record("alu", slots, slots * 8 // 10, 0, 0, slots - slots * 8 // 10, 1_000_000)]


def test_topdown_factory_matches_the_template():
    # metric values are printed under the names the template is rendered with (probe_params.TOPDOWN_METRICS)
    metric_names = {name for name, _config in TOPDOWN_METRICS}
    keys = template_keys("topdown", "topdown", ("event", "read_bytes"))
    assert set(GOOD_TOPDOWN[1]) == keys | {"probe", "kind"} | metric_names
    assert set(topology()) == template_keys("topdown", "topology") | {"probe", "kind"}


def test_topdown_fixture_metrics_sum_to_0xff():
    for record in GOOD_TOPDOWN[1:]:
        raw = record["rdpmc_metrics"]
        assert sum((raw >> (8 * i)) & 0xFF for i in range(4)) == 0xFF


def test_topdown_enumeration():
    assert topdown.topdown_enumeration(ON, topdown_view()).status == "pass"
    assert topdown.topdown_enumeration(OFF, intel_kvm_guest_view()).status == "pass"  # KVM today: absent, as expected
    assert topdown.topdown_enumeration(OFF, topdown_view()).status == "fail"
    metrics_only = with_perf_caps(intel_kvm_guest_view(), 1 << 15)
    v = topdown.topdown_enumeration(ON, metrics_only)
    assert v.status == "fail" and "without fixed counter 3" in v.reason


def test_topdown_metrics_and_shapes():
    view = topdown_view()
    assert topdown.topdown_metrics(ON, view, GOOD_TOPDOWN).status == "pass"
    assert topdown.topdown_width(ON, view, GOOD_TOPDOWN).status == "pass"  # 6 slots per cycle on a 6-wide core
    assert topdown.topdown_workloads(ON, view, GOOD_TOPDOWN).status == "pass"
    off_sum = [topdown_record("alu", 4_000_000, 3_200_000, 100_000, 300_000, 600_000, 1_000_000), GOOD_TOPDOWN[2]]
    v = topdown.topdown_metrics(ON, view, off_sum)
    assert v.status == "fail" and "sum to 4,200,000" in v.reason
    wrong = [GOOD_TOPDOWN[1], topdown_record("chase", 4_000_000, 3_000_000, 0, 0, 1_000_000, 1_000_000)]
    assert "backend bound 25%" in topdown.topdown_workloads(ON, view, wrong).reason


def test_topdown_width_follows_the_core_and_smt():
    """TOPDOWN.SLOTS is distributed among the unhalted SMT threads of a core: with the sibling busy a thread sees
    about width/2 per cycle, never more than the width."""
    view = topdown_view()
    assert topdown.topdown_width(ON, view, alu_ratio(6.1)).status == "pass"
    v = topdown.topdown_width(ON, view, alu_ratio(3.1))  # a busy sibling on the host core: the guest cannot tell
    assert v.status == "skip" and v.reason.startswith("host:") and "between 6/2 and 6" in v.reason
    assert v.observed["host_smt_active"] is None and v.observed["guest_thread_siblings"] == "0"
    no_smt_host = {"cpu": {"smt_active": False}}
    v = topdown.topdown_width(ON, view, alu_ratio(3.1), no_smt_host)
    assert v.status == "fail" and "without SMT" in v.reason
    assert "exceeds the core's width 6" in topdown.topdown_width(ON, view, alu_ratio(7.0)).reason
    assert "below half the pipeline width" in topdown.topdown_width(ON, view, alu_ratio(2.0)).reason
    assert topdown.topdown_width(ON, view, alu_ratio(3.1, siblings="0-1")).observed["guest_smt_sibling"] is True


@pytest.mark.parametrize("smt_active", [True, False])
def test_topdown_width_reads_the_doctor_smt_fact(smt_active):
    """hostfacts.collect() puts /sys/devices/system/cpu/smt/active into cpu.smt_active (the shipped host files set
    it true). Active: a ratio between width/2 and width may be a busy sibling (SKIP, "host SMT active: True");
    inactive: no sibling can share the core (FAIL)."""
    host = json.loads((HOSTS_DIR / "spr-mediated.json").read_text())
    assert host["cpu"]["smt_active"] is True
    host["cpu"]["smt_active"] = smt_active
    v = topdown.topdown_width(ON, topdown_view(), alu_ratio(3.5), host)
    assert v.observed["host_smt_active"] is smt_active and v.observed["width_source"] == "host CPU model 06_8FH"
    if smt_active:
        assert v.status == "skip" and "host SMT active: True" in v.reason
    else:
        assert v.status == "fail" and "without SMT" in v.reason
    assert topdown.topdown_width(ON, topdown_view(), alu_ratio(6.0), host).status == "pass"


def test_topdown_width_uses_the_host_model_first():
    """A guest running a named CPU model still counts the host core's slots: Ice Lake-SP is 5 wide."""
    icx_host = {"cpu": {"caps": {"vendor": "GenuineIntel", "family": 6, "model": 0x6A}}}
    v = topdown.topdown_width(ON, topdown_view(), alu_ratio(5.0), icx_host)
    assert v.status == "pass" and v.observed["width"] == 5 and v.observed["width_source"].startswith("host")
    unknown = {"cpu": {"caps": {"vendor": "GenuineIntel", "family": 6, "model": 0x01}}}
    view = replace(topdown_view(), caps=replace(topdown_view().caps, model=0x02))
    v = topdown.topdown_width(ON, view, alu_ratio(4.0), unknown)
    assert v.status == "pass" and "only the loose bound" in v.reason
    assert topdown.topdown_width(ON, view, alu_ratio(9.0), unknown).status == "fail"


def test_topdown_read_error_is_not_a_stale_errno():
    """read() of the group returning 0 or a short count is EIO with the byte count, not whatever errno held."""
    source = (PROBES_DIR / "topdown.c.j2").read_text()
    assert "errno ? errno : EIO" not in source
    assert "got < 0" in source and 'rec_i64("read_bytes", got)' in source
    short = {"probe": "topdown", "kind": "topdown", "workload": "alu", "error": "read", "errno": 5,
             "strerror": "Input/output error", "read_bytes": 0, "cycles": 0, "rdpmc_metrics_signal": -1,
             "rdpmc_metrics": 0, "rdpmc_fixed3_signal": -1, "rdpmc_cap_user": -1}  # fmt: skip
    v = topdown.topdown_metrics(ON, topdown_view(), [short])
    assert v.status == "fail" and "EIO" in v.reason


def test_topdown_rdpmc():
    view = topdown_view()
    assert topdown.topdown_rdpmc(ON, view, GOOD_TOPDOWN).status == "pass"  # 0xcc+0x06+0x13+0x1a = 0xff
    gp = [topdown_record("alu", 4_000_000, 3_200_000, 100_000, 300_000, 400_000, 1_000_000, signal=11)]
    v = topdown.topdown_rdpmc(ON, view, gp)
    assert v.reason.startswith("kvm-limit: RDPMC of PERF_METRICS") and "fixed counter 3 in the same task worked" in \
        v.reason  # fmt: skip
    bad = [topdown_record("alu", 4_000_000, 3_200_000, 100_000, 300_000, 400_000, 1_000_000, raw=0x10101010)]
    assert topdown.topdown_rdpmc(ON, view, bad).status == "fail"


def test_topdown_rdpmc_control_tells_a_disabled_user_rdpmc_apart():
    """Review R3: with cpu/rdpmc=0 the guest kernel never sets CR4.PCE (x86_pmu_event_mapped() needs
    PERF_EVENT_FLAG_USER_READ_CNT, reported as cap_user_rdpmc=0), so RDPMC of fixed counter 3 faults as well:
    not-allowed, not kvm-limit. FC3 faulting although the kernel enabled user RDPMC is the vPMU's fault."""
    record = topdown_record("alu", 4_000_000, 3_200_000, 100_000, 300_000, 400_000, 1_000_000, signal=11, fixed3=11,
                     cap_user=0)  # fmt: skip
    v = topdown.topdown_rdpmc(ON, topdown_view(**{"cpu/rdpmc": "0"}), [record])
    assert v.status == "skip" and v.reason.startswith("not-allowed: the guest kernel gave this task no user RDPMC")
    assert "cap_user_rdpmc=0" in v.reason and "cpu/rdpmc=0" in v.reason
    enabled = {**record, "rdpmc_cap_user": 1}
    v = topdown.topdown_rdpmc(ON, topdown_view(), [enabled])
    assert v.status == "fail" and "fixed counter 3 (ECX=0x40000003) #GPs" in v.reason
    old = {k: v for k, v in record.items() if k not in ("rdpmc_fixed3_signal", "rdpmc_cap_user")}
    assert "no control read in this record" in topdown.topdown_rdpmc(ON, topdown_view(), [old]).reason
    unmapped = topdown_record("alu", 4_000_000, 3_200_000, 100_000, 300_000, 400_000, 1_000_000, signal=-1, fixed3=-1,
                       cap_user=-1)  # fmt: skip
    assert topdown.topdown_rdpmc(ON, topdown_view(), [unmapped]).status == "error"


def test_topdown_probe_reads_the_control_before_the_metrics():
    """The control RDPMC runs in the same task under the same fault guard, right before the metrics read."""
    source = (PROBES_DIR / "topdown.c.j2").read_text()
    assert source.index("rdpmc_guarded((1U << 30) | 3") < source.index("rdpmc_guarded(1U << 29")
    assert "cap_user_rdpmc" in source


def test_topdown_needs_the_guest_kernels_topdown_events():
    """Review F3: FC3 and PERF_METRICS enumerated, but a guest kernel without topdown for this model (6.1 on a CPU
    it does not know: pmu_name generic_arch_v5+) registers no topdown-* events: SKIP in its own words."""
    view = topdown_view(**{"cpu/caps/pmu_name": "generic_arch_v5+"})
    view = replace(view, sysfs={k: v for k, v in view.sysfs.items() if k != "cpu/events/topdown-retiring"},
                   kernel_banner="Performance Events: generic architected perfmon, full-width counters, Intel PMU "
                                 "driver.")  # fmt: skip
    assert topdown.topdown_enumeration(ON, view).status == "pass"  # KVM and QEMU kept the promise
    assert not topdown.topdown_usable(view) and topdown.topdown_usable(topdown_view())
    for check in (topdown.topdown_metrics, topdown.topdown_workloads, topdown.topdown_rdpmc):
        v = check(ON, view, GOOD_TOPDOWN, "6.1.0-28-amd64")
        assert v.status == "skip" and v.reason.startswith("guest-kernel: ")
        assert "guest kernel 6.1.0-28-amd64" in v.reason and "cpu/caps/pmu_name=generic_arch_v5+" in v.reason
        assert "generic architected perfmon" in v.reason and "cpu/events/topdown-retiring" in v.reason
    assert topdown.topdown_width(ON, view, GOOD_TOPDOWN, None, "6.1.0-28-amd64").reason.startswith("guest-kernel: ")


def test_topdown_needs_both_fc3_and_perf_metrics():
    """Fixed counter 3 without PERF_METRICS (a mediated vPMU may expose more fixed counters) is not topdown: the
    measurements are not taken on it, and a promised topdown that shows only FC3 FAILs."""
    fc3_only = with_perf_caps(topdown_view(), 0x2000)
    assert not topdown.topdown_usable(fc3_only)
    v = topdown.topdown_metrics(ON, fc3_only, GOOD_TOPDOWN)
    assert v.status == "fail" and "does not enumerate FC3 + PERF_METRICS" in v.reason
    assert topdown.topdown_enumeration(OFF, fc3_only).status == "pass"


def test_topdown_skips_when_not_expected():
    assert topdown.topdown_metrics(OFF, intel_kvm_guest_view(), []).reason == OFF.reason


# --- LBR ----------------------------------------------------------------------------------------------------

TEXT = (0x401000, 0x480000)
#: The probe's workload as gcc -O2 lays it out (objdump of the compiled lbr probe): f3 = nop; nop; nop; ret,
#: f2 = call f3; ret, f1 = call f2; ret, and vpmu_chain's loop = call f1; add; cmp; jne.
F3, F2, F1 = 0x401890, 0x4018A0, 0x4018B0
CHAIN_CALL, CHAIN_JNE = 0x401910, 0x40191C  # call vpmu_f1 (5 bytes: returns to CHAIN_CALL + 5); jne back to it


def one_iteration():
    """The 7 branches of one loop iteration, newest first, each [from, to, flags] with FROM = the branch
    instruction itself (SDM Vol. 3B "Last Branch Recording": the from address is the branch's linear address)."""
    return [[F2, F3, 0], [F1, F2, 0], [CHAIN_CALL, F1, 0], [CHAIN_JNE, CHAIN_CALL, 0], [F1 + 5, CHAIN_CALL + 5, 0],
            [F2 + 5, F1 + 5, 0], [F3 + 3, F2 + 5, 0]]  # fmt: skip


def lbr_view(depth=32):
    return with_perf_caps(intel_kvm_guest_view(), 0x2005, **{"cpu/caps/branches": str(depth)})


def layout():
    return {"probe": "lbr", "kind": "layout", "text_start": TEXT[0], "text_end": TEXT[1], "f1": F1, "f2": F2, "f3": F3}


def branch_sample(mode, ip, entries):
    return {"probe": "lbr", "kind": "branch_sample", "mode": mode, "ip": ip, "nr": len(entries), "entries": entries}


def branch_mode(mode, samples, max_nr, lost=0, throttled=0):
    return {"probe": "lbr", "kind": "branch_mode", "mode": mode, "samples": samples, "lost": lost,
            "throttle": throttled, "other_records": 0, "throttled": throttled, "unthrottled": throttled,
            "max_nr": max_nr}  # fmt: skip


RING_KEYS = {"samples", "lost", "throttle", "other_records"}  # rec_ring_stats (_common.h.j2)
THROTTLE_KEYS = {"throttled", "unthrottled"}  # rec_throttle_stats (_common.h.j2)


def test_lbr_factories_match_the_template():
    assert set(layout()) == template_keys("lbr", "layout") | {"probe", "kind"}
    assert set(branch_sample("any", 1, [])) == template_keys("lbr", "branch_sample") | {"probe", "kind"}
    mode = branch_mode("any", 1, 1)
    assert set(mode) == template_keys("lbr", "branch_mode") | {"probe", "kind"} | RING_KEYS | THROTTLE_KEYS


def any_records(extra_entry=None, max_nr=32):
    entries = (one_iteration() * 5)[:32]
    if extra_entry:
        entries[0] = extra_entry
    return [layout(), branch_mode("any", 1, max_nr), branch_sample("any", F3, entries)]


def test_lbr_enumeration():
    assert lbr.legacy_lbr_enumeration(ON, lbr_view()).status == "pass"
    assert lbr.legacy_lbr_enumeration(OFF, intel_kvm_guest_view()).status == "pass"
    assert lbr.legacy_lbr_enumeration(ON, intel_kvm_guest_view()).status == "fail"
    arch = replace(lbr_view(32), caps=replace(lbr_view().caps, arch_lbr=ArchLbr([8, 16, 32], True, True, True, True,
                                                                                True, True)))  # fmt: skip
    assert lbr.arch_lbr_enumeration(ON, arch).status == "pass"
    odd = replace(arch, sysfs={**arch.sysfs, "cpu/caps/branches": "24"})
    assert "not one of CPUID.1CH" in lbr.arch_lbr_enumeration(ON, odd).reason


def test_lbr_records():
    view = lbr_view()
    assert lbr.lbr_records(ON, view, any_records()).status == "pass"
    v = lbr.lbr_records(ON, view, any_records(extra_entry=[F1, 0xFFFFFFFF81000000, 0]))
    assert v.status == "fail" and "kernel-space branch targets" in v.reason
    v = lbr.lbr_records(ON, view, any_records(extra_entry=[0x7F0000001000, F1, 0]))
    assert v.status == "fail" and "outside the probe's text" in v.reason
    v = lbr.lbr_records(ON, view, any_records(max_nr=16))
    assert v.status == "fail" and "!= enumerated depth 32" in v.reason


def test_lbr_user_filter_is_by_target():
    """PERF_SAMPLE_BRANCH_USER keeps branches whose target is in user space, so the return from an interrupt
    (kernel iret -> the interrupted user IP) is a legitimate entry of a USER-only stack."""
    iret = [0xFFFFFFFF81E00A5B, F3 + 1, 0]
    v = lbr.lbr_records(ON, lbr_view(), any_records(extra_entry=iret))
    assert v.status == "pass" and v.observed["kernel_to_user_returns"] == 1


def test_lbr_ring_returns_exactly_as_the_review_asks():
    """Review F2: a kernel->user entry (iret/sysret to the interrupted user IP) passes; an entry whose source and
    target are both kernel addresses is a leak."""
    v = lbr.lbr_records(ON, lbr_view(), any_records(extra_entry=[0xFFFFFFFF81E00000, F1, 0]))
    assert v.status == "pass" and v.observed["kernel_to_user_returns"] == 1 and v.observed["kernel_targets"] == 0
    v = lbr.lbr_records(ON, lbr_view(), any_records(extra_entry=[0xFFFFFFFF81E00000, 0xFFFFFFFF81000000, 0]))
    assert v.status == "fail" and "1 kernel-space branch targets" in v.reason


def test_lbr_zero_entries_are_a_reset_not_foreign_branches():
    """utils.c get_branch_type(): from/to 0 "maybe zero if lbr did not fill up after a reset"."""
    v = lbr.lbr_records(ON, lbr_view(), any_records(extra_entry=[0, 0, 0]))
    assert v.status == "pass" and v.observed["zero_entries"] == 1 and v.observed["outside_text"] == 0


def test_lbr_lost_records_are_judged_by_what_arrived():
    """Review P3: PERF_RECORD_LOST means the ring was full (ring_buffer.c perf_output_begin()): the stacks that
    arrived are judged as usual; when none arrived it is the probe's buffer (ERROR), throttling SKIPs."""
    records = any_records()
    records[1] = branch_mode("any", 1, 32, lost=3)
    v = lbr.lbr_records(ON, lbr_view(), records)
    assert v.status == "pass" and v.observed["lost"] == 3
    all_lost = [layout(), branch_mode("any", 0, 0, lost=2)]
    v = lbr.lbr_records(ON, lbr_view(), all_lost)
    assert v.status == "error" and "2 PERF_RECORD_LOST" in v.reason
    nothing = lbr.lbr_records(ON, lbr_view(), [layout(), branch_mode("any", 0, 0)])
    assert nothing.status == "fail" and "no branch-stack samples" in nothing.reason
    throttled = [sampling_setup("lbr"), layout(), branch_mode("any", 0, 0, throttled=1)]
    assert lbr.lbr_records(ON, lbr_view(), throttled).reason.startswith("guest kernel throttled sampling")
    cs_lost = [layout(), branch_mode("call_stack", 0, 0, lost=1)]
    assert lbr.lbr_call_stack(ON, lbr_view(), cs_lost).status == "error"


def test_lbr_empty_call_stacks():
    """Review P3: in call-stack mode every sample inside vpmu_chain holds at least the call into it, so stacks that
    are all empty while the ANY stacks were filled FAIL (they used to SKIP as "no sample in f3"); a run without any
    call-stack sample FAILs too."""
    good_any = any_records()
    empty = [*good_any, branch_mode("call_stack", 50, 0), branch_sample("call_stack", F3 + 1, []),
             branch_sample("call_stack", CHAIN_JNE, [])]  # fmt: skip
    v = lbr.lbr_call_stack(ON, lbr_view(), empty)
    assert v.status == "fail" and "all 50 call-stack samples have an empty stack" in v.reason
    none = [*good_any, branch_mode("call_stack", 0, 0)]
    assert lbr.lbr_call_stack(ON, lbr_view(), none).reason == "no call-stack samples"


def test_lbr_reclaimed_by_a_host_user_is_a_skip():
    """KVM returns 0 for the guest's LBR reads while a host LBR user holds them (pmu_intel.c
    intel_pmu_handle_lbr_msrs_access()), and the guest kernel drops zero entries: every stack, ANY and call-stack,
    is empty. A healthy host with a branch-sampling agent does that, so it SKIPs naming the host log line."""
    records = [layout(), branch_mode("any", 40, 0), branch_sample("any", F3, []), branch_mode("call_stack", 40, 0),
               branch_sample("call_stack", F3 + 1, [])]  # fmt: skip
    for check in (lbr.lbr_records, lbr.lbr_call_stack):
        v = check(ON, lbr_view(), records)
        assert v.status == "skip" and v.reason.startswith("host: every branch stack is empty")
        assert "fail to passthrough LBR" in v.reason


def test_lbr_on_a_guest_kernel_that_does_not_know_the_model():
    """Review F3: legacy LBR is set up only in the model cases of intel_pmu_init(); a guest kernel that does not know
    the CPU (pmu_name generic_arch_v2+) has no cpu/caps/branches although PERF_CAPABILITIES shows the format."""
    banner = "Performance Events: generic architected perfmon, full-width counters, Intel PMU driver."
    generic = replace(with_perf_caps(intel_kvm_guest_view(), 0x2005, **{"cpu/caps/pmu_name": "generic_arch_v2+"}),
                      kernel_banner=banner)  # fmt: skip
    v = lbr.legacy_lbr_enumeration(ON, generic, "6.1.0-28-amd64")
    assert v.status == "skip" and v.reason.startswith("guest-kernel: PERF_CAPABILITIES[5:0] shows LBR format 5")
    assert "guest kernel 6.1.0-28-amd64" in v.reason and "generic architected perfmon" in v.reason
    for check in (lbr.lbr_records, lbr.lbr_call_stack):
        assert check(ON, generic, any_records(), release="6.1.0-28-amd64").reason.startswith("guest-kernel: ")
    known = with_perf_caps(intel_kvm_guest_view(), 0x2005, **{"cpu/caps/pmu_name": "skylake"})
    v = lbr.legacy_lbr_enumeration(ON, known, "6.1.0-28-amd64")
    assert v.status == "fail" and "check_msr()" in v.reason  # a kernel that knows the model: the vPMU answers
    assert lbr.lbr_records(ON, known, any_records()).status == "fail"


def test_lbr_call_stack():
    chain = one_iteration()[:3]  # the open calls: f2 -> f3, f1 -> f2, chain -> f1
    records = [layout(), branch_mode("call_stack", 2, 3), branch_sample("call_stack", F3 + 1, chain),
               branch_sample("call_stack", F3 + 2, chain)]  # fmt: skip
    assert lbr.lbr_call_stack(ON, lbr_view(), records).status == "pass"
    broken = [layout(), branch_mode("call_stack", 1, 3), branch_sample("call_stack", F3, chain[1:] + chain[:1])]
    assert lbr.lbr_call_stack(ON, lbr_view(), broken).status == "fail"
    unsupported = [layout(), {"probe": "lbr", "kind": "branch_mode", "mode": "call_stack", "error": "perf_event_open",
                              "errno": 95, "strerror": "Operation not supported"}]  # fmt: skip
    assert lbr.lbr_call_stack(ON, lbr_view(), unsupported).status == "skip"


def test_lbr_probe_calls_are_real_calls(tmp_path):
    """The call-stack check needs f1 -> f2 -> f3 as calls, not tail jumps: read the compiled probe."""
    probe = ProbeBuilder(cache_dir=tmp_path).build("lbr", lbr_params())
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(probe.binary)], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    for caller, callee in (("vpmu_f1", "vpmu_f2"), ("vpmu_f2", "vpmu_f3")):
        body = text[text.index(f"<{caller}>:") :].split("\n\n")[0]
        assert "call" in body and f"<{callee}>" in body and "jmp" not in body.split(f"<{callee}>")[0]


# --- PEBS ---------------------------------------------------------------------------------------------------


def pebs_view(fmt=4, max_precise=3, baseline=False):
    value = 0x2000 | (fmt << 8) | ((1 << 14) if baseline else 0)
    view = with_perf_caps(intel_kvm_guest_view(), value, **{"cpu/caps/max_precise": str(max_precise)})
    return view


def precise(level, samples, at_load, at_next=0, exact=None, lost=0, throttled=0):
    return {"probe": "pebs", "kind": "precise", "precise_ip": level, "config": 0x81D0, "samples": samples,
            "lost": lost, "throttle": throttled, "other_records": 0, "throttled": throttled,
            "unthrottled": throttled, "iterations": 1_000_000, "period": 10_007,
            "exact": samples if exact is None else exact, "at_load": at_load, "at_next": at_next,
            "in_loop": samples - at_load - at_next, "outside": 0}  # fmt: skip


def sampling_setup(probe="pebs"):
    """The record vpmu_prepare_sampling() (_common.h.j2) prints before any sampling event is opened."""
    return {"probe": probe, "kind": "sampling_setup", "perf_cpu_time_max_percent": 0,
            "perf_event_max_sample_rate": 100000}  # fmt: skip


def test_pebs_factory_matches_the_template():
    keys = template_keys("pebs", "precise") - {"addr_in_buffer", "weight_ge_ldlat"}
    assert set(precise(1, 1, 1)) == keys | {"probe", "kind"} | RING_KEYS | THROTTLE_KEYS


def test_pebs_probe_keeps_large_pebs():
    """intel_pmu_hw_config() (arch/x86/events/intel/core.c) drops auto-reload and large PEBS for
    wakeup_events without watermark: the probe wakes by watermark and prepares the sampling sysctls first."""
    source = (PROBES_DIR / "pebs.c.j2").read_text()
    assert "wakeup_events" not in source.split("*/", 1)[1] and ".watermark = 1" in source
    assert source.index("vpmu_prepare_sampling();") < source.index("workload_buffer(ITERATIONS)")


def test_pebs_enumeration():
    view = pebs_view()
    assert pebs.pebs_enumeration(ON, view).status == "pass"  # SPR dump: DS set in CPUID.1:EDX
    assert pebs.pebs_enumeration(OFF, intel_kvm_guest_view()).status == "pass"
    assert "format 3 < 4" in pebs.pebs_enumeration(ON, pebs_view(fmt=3)).reason


#: What a 6.1 guest kernel prints on a PEBS format 6 CPU it does not know (a Clearwater Forest host): ds.c
#: intel_ds_init() "no PEBS fmt%d%c, " (pebs_trap set -> '+'), core.c intel_pmu_init() "generic architected
#: perfmon, ".
FMT6_ON_6_1 = "Performance Events: no PEBS fmt6+, generic architected perfmon, full-width counters, Intel PMU driver."


def test_pebs_format_the_guest_kernel_does_not_know():
    """Review F3: KVM and QEMU enumerate PEBS format 6, the 6.1 guest kernel switches PEBS off in its own words:
    SKIP naming the kernel, not FAIL blaming the host. Without such words a max_precise of 0 still FAILs."""
    fmt6 = replace(pebs_view(fmt=6, max_precise=0), kernel_banner=FMT6_ON_6_1)
    v = pebs.pebs_enumeration(ON, fmt6, "6.1.0-28-amd64")
    assert v.status == "skip" and v.reason.startswith("guest-kernel: PERF_CAPABILITIES[11:8] shows PEBS format 6")
    assert '"no PEBS fmt6+"' in v.reason and "guest kernel 6.1.0-28-amd64" in v.reason
    for level in (1, 2, 3):
        assert pebs.pebs_precise(ON, fmt6, [], level, release="6.1.0-28-amd64").reason.startswith("guest-kernel: ")
    assert pebs.pebs_ldlat(ON, fmt6, [], 30, release="6.1.0-28-amd64").reason.startswith("guest-kernel: ")
    silent = pebs_view(fmt=4, max_precise=0)
    assert pebs.pebs_enumeration(ON, silent).status == "fail"
    assert pebs.pebs_precise(ON, silent, [], 1).status == "fail"
    assert pebs.pebs_enumeration(OFF, fmt6).status == "pass"  # not expected: absent, as expected


def test_pebs_without_a_constraint_on_an_unknown_model():
    """A guest kernel that does not know the CPU model has no PEBS constraint table, and without baseline no
    PMU_FL_PEBS_ALL: intel_pebs_constraints() gives &emptyconstraint and perf_event_open() answers EINVAL."""
    view = replace(pebs_view(fmt=5), sysfs={**pebs_view(fmt=5).sysfs, "cpu/caps/pmu_name": "generic_arch_v5+"})
    einval = {"probe": "pebs", "kind": "precise", "precise_ip": 1, "config": 0x81D0, "error": "perf_event_open",
              "errno": 22, "strerror": "Invalid argument"}  # fmt: skip
    v = pebs.pebs_precise(ON, view, [einval], 1, release="6.1.0-28-amd64")
    assert v.status == "skip" and "&emptyconstraint" in v.reason
    n = 1_000_000 // 10_007
    assert pebs.pebs_precise(ON, view, [precise(1, n, n)], 1).status == "pass"  # scheduled anyway: judged
    known = pebs_view(fmt=5)
    assert pebs.pebs_precise(ON, known, [{**einval}], 1).status == "fail"


def test_pebs_shortfall_under_a_competing_host_load():
    """Review F4: intel_guest_get_msrs() switches guest PEBS off while the host has a PEBS event on that CPU or the
    guest counter is cross-mapped, which a host load on the PMU makes possible. A shortfall there SKIPs with the
    numbers; under idle and the software-only load it still FAILs, and wrong IPs FAIL under any load."""
    view, n = pebs_view(fmt=4), 1_000_000 // 10_007
    for name in ("host-multiplexing", "host-counting-host-only", "host-pinned", "host-sampling"):
        v = pebs.pebs_precise(ON, view, [precise(1, 0, 0)], 1, LOADS[name])
        assert v.status == "skip" and v.reason.startswith(f"host-load: 0 PEBS samples where {n} +/- 2 are due")
        assert f"host load {name} (" in v.reason and "cross-mapped" in v.reason
    for name in ("idle", "host-sw-counting"):
        v = pebs.pebs_precise(ON, view, [precise(1, 0, 0)], 1, LOADS[name])
        assert v.status == "fail" and f"0 samples, want {n} +/- 2" in v.reason
    assert pebs.pebs_precise(ON, view, [precise(1, 0, 0)], 1).status == "fail"  # no load known: strict
    wrong = precise(2, 40, 20, 20)  # short and half of the IPs off by one: wrong data under any load
    v = pebs.pebs_precise(ON, view, [wrong], 2, LOADS["host-multiplexing"])
    assert v.status == "fail" and "only 20 of 40 IPs at the load" in v.reason and "samples, want" not in v.reason
    too_many = pebs.pebs_precise(ON, view, [precise(2, n + 5, n + 5)], 2, LOADS["host-multiplexing"])
    assert too_many.status == "fail"
    assert pebs.pebs_precise(ON, view, [precise(2, n, n)], 2, LOADS["host-sampling"]).status == "pass"
    v = pebs.pebs_ldlat(ON, pebs_view(fmt=4, baseline=True), [ldlat(0, 0, 0)], 30, LOADS["host-pinned"])
    assert v.status == "skip" and v.reason.startswith("host-load: 0 PEBS samples")
    assert pebs.pebs_ldlat(ON, pebs_view(fmt=4, baseline=True), [ldlat(0, 0, 0)], 30, LOADS["idle"]).status == "fail"


def test_competing_loads_are_the_ones_on_the_pmu():
    """Every shipped load: core-PMU events compete, idle and software-only loads do not."""
    competing = {name for name, spec in LOADS.items() if pebs.pebs_competing_load(spec)}
    assert competing == set(LOADS) - {"idle", "host-sw-counting"}
    assert pebs.pebs_competing_load(None) is None


def test_guest_kernel_release_of_live_and_replayed_runs():
    class Image:
        kernel_release = "6.1.0-28-amd64"

    class Live:
        image = Image()

    class Replayed:
        def summary(self):
            return {"kernel_release": "6.12.9-amd64"}

    assert guest_kernel.guest_kernel_release(Live()) == "6.1.0-28-amd64"
    assert guest_kernel.guest_kernel_release(Replayed()) == "6.12.9-amd64"


def test_pebs_precise_levels():
    """Format >= 4 without baseline (every KVM guest): basic records only, the eventing IP with EXACT at every
    level. With baseline, precise_ip=1 adds the GP group and reports gprs->ip, after the load. Format <= 3:
    precise_ip=1 is pebs->ip (after the load), >= 2 pebs->real_ip (format >= 2) or the LBR fixup (format < 2)."""
    n = 1_000_000 // 10_007
    kvm = pebs_view(fmt=4)
    for level in (1, 2, 3):
        assert pebs.pebs_precise(ON, kvm, [precise(level, n, n)], level).status == "pass"
    v = pebs.pebs_precise(ON, kvm, [precise(1, n, 0, n, exact=0)], 1)  # off-by-1 on a baseline-less format 4: wrong
    assert v.status == "fail" and "IPs at the load" in v.reason
    assert pebs.pebs_precise(ON, kvm, [precise(2, n, n - 5, 5)], 2).status == "fail"
    assert pebs.pebs_precise(ON, kvm, [precise(2, n, n, exact=n - 1)], 2).status == "fail"  # EXACT_IP missing
    adaptive = pebs_view(fmt=5, baseline=True)
    assert pebs.pebs_precise(ON, adaptive, [precise(1, n, 0, n, exact=0)], 1).status == "pass"
    assert pebs.pebs_precise(ON, adaptive, [precise(2, n, n)], 2).status == "pass"
    legacy = pebs_view(fmt=3)
    assert pebs.pebs_precise(ON, legacy, [precise(1, n, 0, n, exact=0)], 1).status == "pass"  # trap-like: next IP
    assert pebs.pebs_precise(ON, legacy, [precise(1, n, n)], 1).status == "fail"
    fmt1 = pebs_view(fmt=1)  # precise_ip >= 2 through the LBR fixup, which may not succeed for every record
    assert pebs.pebs_precise(ON, fmt1, [precise(2, n, n - 3, 3, exact=n - 3)], 2).status == "pass"
    assert pebs.pebs_precise(ON, pebs_view(max_precise=2), [], 3).status == "skip"
    assert pebs.pebs_precise(ON, kvm, [precise(2, n + 3, n + 3)], 2).status == "fail"


def test_pebs_ip_model():
    assert [pebs.pebs_ip_model(4, False, level) for level in (1, 2, 3)] == ["load"] * 3
    assert [pebs.pebs_ip_model(4, True, level) for level in (1, 2, 3)] == ["next", "load", "load"]
    assert [pebs.pebs_ip_model(3, False, level) for level in (1, 2)] == ["next", "load"]
    assert pebs.pebs_ip_model(1, False, 2) == "fixup"


def test_pebs_throttled_is_a_skip_not_a_fail():
    view = pebs_view(fmt=4)
    records = [sampling_setup(), precise(2, 40, 40, throttled=1)]  # 40 of 99 samples: the event was throttled
    v = pebs.pebs_precise(ON, view, records, 2)
    assert v.status == "skip" and v.reason.startswith("guest kernel throttled sampling: 1 PERF_RECORD_THROTTLE")
    assert "perf_cpu_time_max_percent=0" in v.reason and "__perf_event_account_interrupt" in v.reason
    lost = pebs.pebs_precise(ON, view, [precise(2, 99, 99, lost=1)], 2)
    assert lost.status == "fail" and "1 lost records" in lost.reason


def test_adaptive_pebs_stays_hidden():
    pmu = Expectation("arch_perfmon", True, "expected")
    assert pebs.pebs_no_adaptive(pmu, OFF, pebs_view()).status == "pass"
    v = pebs.pebs_no_adaptive(pmu, OFF, pebs_view(baseline=True))
    assert v.status == "fail" and "PEBS baseline" in v.reason


def ldlat(samples=50, addr_in_buffer=50, weight_ge=50, throttled=0):
    return {"probe": "pebs", "kind": "ldlat", "precise_ip": 2, "config": 0x1CD, "samples": samples, "lost": 0,
            "throttle": throttled, "other_records": 0, "throttled": throttled, "unthrottled": throttled,
            "iterations": 1_000_000, "period": 10_007, "exact": samples, "at_load": samples, "at_next": 0,
            "in_loop": 0, "outside": 0, "addr_in_buffer": addr_in_buffer, "weight_ge_ldlat": weight_ge}  # fmt: skip


def test_pebs_ldlat():
    adaptive = pebs_view(fmt=4, baseline=True)
    assert set(ldlat()) == template_keys("pebs", "ldlat") | {"probe", "kind"} | RING_KEYS | THROTTLE_KEYS
    assert pebs.pebs_ldlat(ON, adaptive, [ldlat()], 30).status == "pass"
    assert pebs.pebs_ldlat(ON, adaptive, [ldlat(addr_in_buffer=40)], 30).status == "fail"
    assert pebs.pebs_ldlat(ON, adaptive, [ldlat(weight_ge=40)], 30).status == "fail"
    assert pebs.pebs_ldlat(ON, pebs_view(fmt=3), [ldlat(addr_in_buffer=40)], 30).status == "fail"  # pebs->dla path
    enxio = {"probe": "pebs", "kind": "ldlat", "precise_ip": 2, "config": 0x1CD, "error": "perf_event_open",
             "errno": 6, "strerror": "No such device or address"}  # fmt: skip
    assert "ENXIO" in pebs.pebs_ldlat(ON, adaptive, [enxio], 30).reason
    assert pebs.pebs_ldlat(ON, adaptive, [sampling_setup(), ldlat(0, 0, 0, throttled=2)], 30).status == "skip"
    assert pebs.pebs_ldlat(ON, adaptive, [ldlat(0, 0, 0)], 30).reason == "no load-latency samples"


def test_pebs_ldlat_without_baseline_is_not_a_fail():
    """Format >= 4 without PEBS baseline: intel_ds_init() "Only basic record supported", and the adaptive path takes
    the data address and latency only from MEMINFO, so the samples carry neither (perf zero-fills them)."""
    kvm = pebs_view(fmt=4, baseline=False)
    v = pebs.pebs_ldlat(ON, kvm, [ldlat(addr_in_buffer=0, weight_ge=0)], 30)
    assert v.status == "skip" and v.reason.startswith("not-enumerated: PEBS baseline") and "MEMINFO" in v.reason
    assert pebs.pebs_ldlat(ON, kvm, [ldlat()], 30).status == "pass"


# --- IBS ----------------------------------------------------------------------------------------------------

LOOP = (0x401100, 0x401123)
GENOA_IBS_CAPS = 0xBFF  # CPUID 8000001BH EAX of the Genoa dump (bit 10 OPDATA4 clear)
IBS_OP_MAX_CNT = 0x1000  # IbsOpCtl[15:0] = period >> 4 for the probe's 0x10000
IBS_OP_ENABLE = 1 << 17


def ibs_view(cnt_ctl=True):
    sysfs = {"ibs_op/type": "11", "ibs_fetch/type": "10"}
    if cnt_ctl:
        sysfs["ibs_op/format/cnt_ctl"] = "config:19"
    return replace(amd_kvm_guest_view(), sysfs=sysfs)


def ibs_regs(pmu, caps=GENOA_IBS_CAPS, val=True, address=LOOP[0] + 8, op_data=0):
    """The u64 registers perf_ibs_handle_irq() (arch/x86/events/amd/ibs.c) puts in PERF_SAMPLE_RAW for caps:
    op: IbsOpCtl, IbsOpRip, IbsOpData, IbsOpData2, IbsOpData3, IbsDcLinAd, IbsDcPhysAd[, IbsBrTarget][, IbsOpData4];
    fetch: IbsFetchCtl, IbsFetchLinAd, IbsFetchPhysAd[, IbsFetchExtdCtl]."""
    if pmu == "ibs_op":
        ctl = IBS_OP_MAX_CNT | IBS_OP_ENABLE | (ibs.IBS_OP_VAL if val else 0)
        regs = [ctl, address, op_data, 0, 0x31960092, 0x7F0000100040, 0x8A5398920]
        if caps & ibs.IBS_CAPS_BRNTRGT:
            regs.append(0)
        if caps & ibs.IBS_CAPS_OPDATA4:
            regs.append(0)
        return regs
    regs = [(ibs.IBS_FETCH_VAL if val else 0) | (1 << 48) | 0x1000, address, 0x8A5391100]
    if caps & ibs.IBS_CAPS_FETCHCTLEXTD:
        regs.append(0)
    return regs


def ibs_mode(pmu, n, mode="task", task_errno=0, foreign=0, throttled=0):
    return {"probe": "ibs", "kind": "ibs_mode", "pmu": pmu, "mode": mode, "config": IBS_OP_CNT_CTL,
            "task_errno": task_errno, "samples": n + foreign, "lost": 0, "throttle": throttled,
            "other_records": 0, "throttled": throttled, "unthrottled": throttled, "own_samples": n,
            "foreign_samples": foreign, "loop_start": LOOP[0], "loop_end": LOOP[1], "buffer": 0,
            "buffer_end": 1}  # fmt: skip


def ibs_records(pmu, val=True, inside=True, ip_matches=True, n=20, **mode):
    address = LOOP[0] + 8 if inside else 0x500000
    samples = [{"probe": "ibs", "kind": "ibs_sample", "pmu": pmu, "ip": address if ip_matches else address + 4,
                "caps": GENOA_IBS_CAPS, "regs": ibs_regs(pmu, val=val, address=address)} for _ in range(n)]  # fmt: skip
    return [ibs_mode(pmu, n, **mode), *samples]


def test_ibs_factories_match_the_template():
    sample, mode = ibs_records("ibs_op")[1], ibs_records("ibs_op")[0]
    assert set(sample) == template_keys("ibs", "ibs_sample") | {"probe", "kind"}
    assert set(mode) == template_keys("ibs", "ibs_mode", ("error", "errno", "strerror")) | {"probe", "kind"} | \
        RING_KEYS | THROTTLE_KEYS  # fmt: skip


def test_ibs_raw_payload_size_follows_caps():
    """Genoa's 0xBFF has IBS_CAPS_BRNTRGT and FETCHCTLEXTD but not OPDATA4: 8 op and 4 fetch registers."""
    assert ibs.ibs_raw_regs("ibs_op", GENOA_IBS_CAPS) == 8 == len(ibs_regs("ibs_op"))
    assert ibs.ibs_raw_regs("ibs_fetch", GENOA_IBS_CAPS) == 4 == len(ibs_regs("ibs_fetch"))
    assert ibs.ibs_raw_regs("ibs_op", GENOA_IBS_CAPS | ibs.IBS_CAPS_OPDATA4) == 9
    assert ibs.ibs_raw_regs("ibs_op", 0x7) == 7 and ibs.ibs_raw_regs("ibs_fetch", 0x7) == 3  # IBS_CAPS_DEFAULT


def test_ibs_enumeration():
    assert ibs.ibs_enumeration(ON, ibs_view()).status == "pass"  # Genoa dump: CPUID IBS + the two PMUs
    assert ibs.ibs_enumeration(OFF, ibs_view()).status == "fail"
    no_pmus = amd_kvm_guest_view()
    assert "registered no ibs_op" in ibs.ibs_enumeration(ON, no_pmus).reason


@pytest.mark.parametrize("pmu", ["ibs_op", "ibs_fetch"])
def test_ibs_sampling(pmu):
    view = ibs_view()
    v = ibs.ibs_sampling(ON, view, ibs_records(pmu), pmu)
    assert v.status == "pass" and v.observed["raw_size_unexpected"] == 0
    v = ibs.ibs_sampling(ON, view, ibs_records(pmu, val=False), pmu)
    assert v.status == "error" and "lack the Val bit" in v.reason and "misaligned" in v.reason
    assert "inside the loop" in ibs.ibs_sampling(ON, view, ibs_records(pmu, inside=False), pmu).reason
    register = "IbsOpRip" if pmu == "ibs_op" else "IbsFetchLinAd"
    assert f"differs from {register}" in ibs.ibs_sampling(ON, view, ibs_records(pmu, ip_matches=False), pmu).reason
    assert ibs.ibs_sampling(OFF, view, [], pmu).status == "skip"


def test_ibs_ring_overflow_is_the_probes_buffer():
    """PERF_RECORD_LOST only: the ring was full (ring_buffer.c perf_output_begin()), an ERROR of the probe."""
    mode = {**ibs_mode("ibs_op", 0), "lost": 4}
    v = ibs.ibs_sampling(ON, ibs_view(), [mode], "ibs_op")
    assert v.status == "error" and "4 PERF_RECORD_LOST" in v.reason
    assert ibs.ibs_sampling(ON, ibs_view(), [ibs_mode("ibs_op", 0)], "ibs_op").status == "fail"


def test_ibs_sampling_needs_the_guest_kernels_pmus():
    """CPUID shows IBS but the guest kernel registered no ibs_op/ibs_fetch PMU (the probe cannot run): the promise
    is broken (FAIL, as ibs.enumeration says), not a harness error."""
    v = ibs.ibs_sampling(ON, amd_kvm_guest_view(), [], "ibs_op")
    assert v.status == "fail" and "registered no ibs_op/ibs_fetch PMU" in v.reason


@pytest.mark.parametrize("pmu", ["ibs_op", "ibs_fetch"])
def test_ibs_on_a_pre_6_2_guest_kernel(pmu):
    """Debian 12's 6.1 kernel has no per-task IBS (perf_invalid_context until "perf/amd/ibs: Make IBS a core pmu",
    6.2): the probe falls back to CPU-wide with its TID, and other threads' samples are left out."""
    records = ibs_records(pmu, mode="cpu", task_errno=22, foreign=7)
    v = ibs.ibs_sampling(ON, ibs_view(), records, pmu)
    assert v.status == "pass" and "cpu mode" in v.reason and v.observed["foreign_samples"] == 7
    failed = {"probe": "ibs", "kind": "ibs_mode", "pmu": pmu, "mode": "cpu", "config": 0, "task_errno": 22,
              "error": "perf_event_open", "errno": 13, "strerror": "Permission denied"}  # fmt: skip
    v = ibs.ibs_sampling(ON, ibs_view(), [failed], pmu)
    assert v.status == "fail" and "cpu mode: EACCES" in v.reason and "per-task open: EINVAL" in v.reason


def test_ibs_rip_invalid_samples_are_not_judged():
    """With IBS_CAPS_RIPINVALIDCHK and IbsOpData.RipInvalid the kernel keeps the interrupted IP (no EXACT) and
    IbsOpRip means nothing: such samples count neither for nor against the loop."""
    records = ibs_records("ibs_op", n=19)
    bad_rip = {"probe": "ibs", "kind": "ibs_sample", "pmu": "ibs_op", "ip": 0x401500, "caps": GENOA_IBS_CAPS,
               "regs": ibs_regs("ibs_op", address=0, op_data=ibs.IBS_RIP_INVALID)}  # fmt: skip
    v = ibs.ibs_sampling(ON, ibs_view(), [*records, bad_rip], "ibs_op")
    assert v.status == "pass" and v.observed["rip_invalid"] == 1 and v.observed["judged"] == 19
    no_check = {**bad_rip, "caps": GENOA_IBS_CAPS & ~ibs.IBS_CAPS_RIPINVALIDCHK}  # RipInvalid not honoured
    assert ibs.ibs_sampling(ON, ibs_view(), [*records, no_check], "ibs_op").observed["rip_invalid"] == 0


def test_ibs_cnt_ctl_only_where_the_guest_kernel_offers_it():
    """perf_ibs_op_init() accepts config bit 19 only with IBS_CAPS_OPCNT, which is also when format/cnt_ctl shows."""
    assert ibs_params(ibs_view(cnt_ctl=True).sysfs)["op_config"] == IBS_OP_CNT_CTL
    assert ibs_params(ibs_view(cnt_ctl=False).sysfs)["op_config"] == 0


def test_lbr_entries_checked_against_the_probe_binary(tmp_path):
    """The branch map of the real lbr probe: calls f1->f2->f3 and the loop's call to f1; recorded entries built
    from it pass, an entry starting inside the workload at a non-branch instruction fails, a call landing
    elsewhere fails."""
    from harness.probe.branch_map import branch_map

    probe = ProbeBuilder(cache_dir=tmp_path).build("lbr", lbr_params())
    functions = ("vpmu_chain", "vpmu_f1", "vpmu_f2", "vpmu_f3")
    branches = branch_map(probe.binary, functions)
    assert set(branches.ranges) == set(functions)
    f1, f2, f3 = (branches.ranges[f][0] for f in ("vpmu_f1", "vpmu_f2", "vpmu_f3"))
    calls = {site.target for site in branches.sites.values() if site.kind == "call"}
    assert {f1, f2, f3} <= calls
    call_to = {site.target: address for address, site in branches.sites.items() if site.kind == "call"}
    rets = [a for a, s in branches.sites.items() if s.kind == "ret"]
    text = (min(branches.ranges[f][0] for f in functions), max(branches.ranges[f][1] for f in functions) + 64)
    good = [[call_to[f2], f2, 0], [call_to[f3], f3, 0], [rets[0], call_to[f3] + 5, 0]] * 11

    def records(entries):
        lay = {"probe": "lbr", "kind": "layout", "text_start": text[0], "text_end": text[1], "f1": f1, "f2": f2,
               "f3": f3}  # fmt: skip
        return [lay, branch_mode("any", 1, 32), branch_sample("any", f3, entries[:32])]

    view = lbr_view(32)
    assert lbr.lbr_records(ON, view, records(good), branches).status == "pass"
    not_a_branch = [[f3 + 1, f2, 0], *good[1:]]  # f3+1 is a nop, not a branch
    v = lbr.lbr_records(ON, view, records(not_a_branch), branches)
    assert v.status == "fail" and "not at one of its branch instructions" in v.reason
    elsewhere = [[call_to[f2], f3, 0], *good[1:]]
    assert "land elsewhere" in lbr.lbr_records(ON, view, records(elsewhere), branches).reason
