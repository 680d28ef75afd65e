"""Topdown, LBR, PEBS and IBS verdicts over records in the probes' exact format (keys checked against the
templates), with guest views built from the real Sapphire Rapids / Genoa dumps as KVM would present them."""

from __future__ import annotations

import re
import subprocess
from dataclasses import replace

import pytest

from harness import feature_verdicts as fv
from harness.caps import ArchLbr
from harness.expectations import Expectation
from harness.guest_view import MsrRead
from harness.probe_params import TOPDOWN_METRICS, lbr_params
from harness.probes import PROBES_DIR, ProbeBuilder
from tests.test_verdicts import amd_kvm_guest_view, intel_kvm_guest_view

ON = Expectation("feature", True, "expected: the feature")
OFF = Expectation("feature", False, "kvm-limit: not upstream")


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


def topdown_view():
    view = intel_kvm_guest_view()
    perfmon = replace(view.caps.arch_perfmon, fixed_counter_mask=0xF, fixed_counters=4)
    view = replace(view, caps=replace(view.caps, arch_perfmon=perfmon))
    return with_perf_caps(view, 0x2000 | (1 << 15), **{"cpu/events/slots": "event=0x00,umask=0x4"})


def topdown(workload, slots, retiring, bad, fe, be, cycles, raw=0x30101ABC, signal=0):
    return {"probe": "topdown", "kind": "topdown", "workload": workload, "slots": slots, "retiring": retiring,
            "bad_spec": bad, "fe_bound": fe, "be_bound": be, "cycles": cycles, "rdpmc_metrics_signal": signal,
            "rdpmc_metrics": raw}  # fmt: skip


GOOD_TOPDOWN = [topdown("alu", 4_000_000, 3_200_000, 100_000, 300_000, 400_000, 1_000_000, raw=0x1A1306CC),
                topdown("chase", 4_000_000, 200_000, 50_000, 150_000, 3_600_000, 1_000_000)]  # fmt: skip


def test_topdown_factory_matches_the_template():
    # metric values are printed under the names the template is rendered with (probe_params.TOPDOWN_METRICS)
    metric_names = {name for name, _config in TOPDOWN_METRICS}
    assert set(GOOD_TOPDOWN[0]) == template_keys("topdown", "topdown", ("event",)) | {"probe", "kind"} | metric_names


def test_topdown_enumeration():
    assert fv.topdown_enumeration(ON, topdown_view()).status == "pass"
    assert fv.topdown_enumeration(OFF, intel_kvm_guest_view()).status == "pass"  # KVM today: absent, as expected
    assert fv.topdown_enumeration(OFF, topdown_view()).status == "fail"
    metrics_only = with_perf_caps(intel_kvm_guest_view(), 1 << 15)
    v = fv.topdown_enumeration(ON, metrics_only)
    assert v.status == "fail" and "without fixed counter 3" in v.reason


def test_topdown_metrics_width_and_shapes():
    view = topdown_view()
    assert fv.topdown_metrics(ON, view, GOOD_TOPDOWN).status == "pass"
    assert fv.topdown_width(ON, view, GOOD_TOPDOWN).status == "pass"  # 4 slots per cycle
    assert fv.topdown_workloads(ON, view, GOOD_TOPDOWN).status == "pass"
    off_sum = [topdown("alu", 4_000_000, 3_200_000, 100_000, 300_000, 600_000, 1_000_000), GOOD_TOPDOWN[1]]
    v = fv.topdown_metrics(ON, view, off_sum)
    assert v.status == "fail" and "sum to 4,200,000" in v.reason
    narrow = [topdown("alu", 4_000_000, 3_200_000, 100_000, 300_000, 400_000, 2_000_000), GOOD_TOPDOWN[1]]
    assert fv.topdown_width(ON, view, narrow).status == "fail"  # 2 slots per cycle
    wrong = [GOOD_TOPDOWN[0], topdown("chase", 4_000_000, 3_000_000, 0, 0, 1_000_000, 1_000_000)]
    assert "backend bound 25%" in fv.topdown_workloads(ON, view, wrong).reason


def test_topdown_rdpmc():
    view = topdown_view()
    assert fv.topdown_rdpmc(ON, view, GOOD_TOPDOWN).status == "pass"  # 0xcc+0x06+0x13+0x1a = 0xff
    gp = [topdown("alu", 4_000_000, 3_200_000, 100_000, 300_000, 400_000, 1_000_000, signal=11)]
    assert fv.topdown_rdpmc(ON, view, gp).reason.startswith("kvm-limit: RDPMC of PERF_METRICS")
    bad = [topdown("alu", 4_000_000, 3_200_000, 100_000, 300_000, 400_000, 1_000_000, raw=0x10101010)]
    assert fv.topdown_rdpmc(ON, view, bad).status == "fail"


def test_topdown_skips_when_not_expected():
    assert fv.topdown_metrics(OFF, intel_kvm_guest_view(), []).reason == OFF.reason


# --- LBR ----------------------------------------------------------------------------------------------------

TEXT = (0x401000, 0x480000)
F3, F2, F1 = 0x401890, 0x4018A0, 0x4018B0


def lbr_view(depth=32):
    return with_perf_caps(intel_kvm_guest_view(), 0x2005, **{"cpu/caps/branches": str(depth)})


def layout():
    return {"probe": "lbr", "kind": "layout", "text_start": TEXT[0], "text_end": TEXT[1], "f1": F1, "f2": F2, "f3": F3}


def branch_sample(mode, ip, entries):
    return {"probe": "lbr", "kind": "branch_sample", "mode": mode, "ip": ip, "nr": len(entries), "entries": entries}


def branch_mode(mode, samples, max_nr, lost=0):
    return {"probe": "lbr", "kind": "branch_mode", "mode": mode, "samples": samples, "lost": lost, "throttle": 0,
            "other_records": 0, "max_nr": max_nr}  # fmt: skip


def test_lbr_factories_match_the_template():
    assert set(layout()) == template_keys("lbr", "layout") | {"probe", "kind"}
    assert set(branch_sample("any", 1, [])) == template_keys("lbr", "branch_sample") | {"probe", "kind"}
    mode = branch_mode("any", 1, 1)
    assert set(mode) == template_keys("lbr", "branch_mode") | {"probe", "kind"} | {"samples", "lost", "throttle",
                                                                                  "other_records"}  # fmt: skip


def any_records(extra_entry=None, max_nr=32):
    entries = [[F1 + 5, F2, 0], [F2 + 5, F3, 0], [F3 + 3, F2 + 5, 0]] * 10 + [[F1 + 5, F2, 0], [F2 + 5, F3, 0]]
    if extra_entry:
        entries[0] = extra_entry
    return [layout(), branch_mode("any", 1, max_nr), branch_sample("any", F3, entries)]


def test_lbr_enumeration():
    assert fv.legacy_lbr_enumeration(ON, lbr_view()).status == "pass"
    assert fv.legacy_lbr_enumeration(OFF, intel_kvm_guest_view()).status == "pass"
    assert fv.legacy_lbr_enumeration(ON, intel_kvm_guest_view()).status == "fail"
    arch = replace(lbr_view(32), caps=replace(lbr_view().caps, arch_lbr=ArchLbr([8, 16, 32], True, True, True, True,
                                                                                True, True)))  # fmt: skip
    assert fv.arch_lbr_enumeration(ON, arch).status == "pass"
    odd = replace(arch, sysfs={**arch.sysfs, "cpu/caps/branches": "24"})
    assert "not one of CPUID.1CH" in fv.arch_lbr_enumeration(ON, odd).reason


def test_lbr_records():
    view = lbr_view()
    assert fv.lbr_records(ON, view, any_records()).status == "pass"
    v = fv.lbr_records(ON, view, any_records(extra_entry=[0xFFFFFFFF81000000, F1, 0]))
    assert v.status == "fail" and "kernel-space addresses" in v.reason
    v = fv.lbr_records(ON, view, any_records(extra_entry=[0x7F0000001000, F1, 0]))
    assert v.status == "fail" and "outside the probe's text" in v.reason
    v = fv.lbr_records(ON, view, any_records(max_nr=16))
    assert v.status == "fail" and "!= enumerated depth 32" in v.reason


def test_lbr_call_stack():
    chain = [[F2 + 5 - 5, F3, 0], [F1, F2, 0], [0x401900, F1, 0]]
    records = [layout(), branch_mode("call_stack", 2, 3), branch_sample("call_stack", F3 + 1, chain),
               branch_sample("call_stack", F3 + 2, chain)]  # fmt: skip
    assert fv.lbr_call_stack(ON, lbr_view(), records).status == "pass"
    broken = [layout(), branch_mode("call_stack", 1, 3), branch_sample("call_stack", F3, chain[1:] + chain[:1])]
    assert fv.lbr_call_stack(ON, lbr_view(), broken).status == "fail"
    unsupported = [layout(), {"probe": "lbr", "kind": "branch_mode", "mode": "call_stack", "error": "perf_event_open",
                              "errno": 95, "strerror": "Operation not supported"}]  # fmt: skip
    assert fv.lbr_call_stack(ON, lbr_view(), unsupported).status == "skip"


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


def precise(level, samples, at_load, at_next=0, exact=None, lost=0):
    return {"probe": "pebs", "kind": "precise", "precise_ip": level, "config": 0x81D0, "samples": samples,
            "lost": lost, "throttle": 0, "other_records": 0, "iterations": 1_000_000, "period": 10_007,
            "exact": samples if exact is None else exact, "at_load": at_load, "at_next": at_next,
            "in_loop": samples - at_load - at_next, "outside": 0}  # fmt: skip


def test_pebs_factory_matches_the_template():
    keys = template_keys("pebs", "precise") - {"addr_in_buffer", "weight_ge_ldlat"}
    assert set(precise(1, 1, 1)) == keys | {"probe", "kind", "samples", "lost", "throttle", "other_records"}


def test_pebs_enumeration():
    view = pebs_view()
    assert fv.pebs_enumeration(ON, view).status == "pass"  # SPR dump: DS set in CPUID.1:EDX
    assert fv.pebs_enumeration(OFF, intel_kvm_guest_view()).status == "pass"
    assert "format 3 < 4" in fv.pebs_enumeration(ON, pebs_view(fmt=3)).reason


def test_pebs_precise_levels():
    view = pebs_view(fmt=4)
    n = 1_000_000 // 10_007
    assert fv.pebs_precise(ON, view, [precise(1, n, n)], 1).status == "pass"  # fmt4: the load itself at every level
    assert fv.pebs_precise(ON, view, [precise(2, n, n - 5, 5)], 2).status == "fail"
    assert fv.pebs_precise(ON, view, [precise(2, n, n, exact=n - 1)], 2).status == "fail"  # EXACT_IP missing
    legacy = pebs_view(fmt=3)
    assert fv.pebs_precise(ON, legacy, [precise(1, n, 0, n, exact=0)], 1).status == "pass"  # trap-like: next IP
    assert fv.pebs_precise(ON, pebs_view(max_precise=2), [], 3).status == "skip"
    assert fv.pebs_precise(ON, view, [precise(1, n + 3, n + 3)], 1).status == "fail"


def test_adaptive_pebs_stays_hidden():
    pmu = Expectation("arch_perfmon", True, "expected")
    assert fv.pebs_no_adaptive(pmu, OFF, pebs_view()).status == "pass"
    v = fv.pebs_no_adaptive(pmu, OFF, pebs_view(baseline=True))
    assert v.status == "fail" and "PEBS baseline" in v.reason


def test_pebs_ldlat():
    record = {"probe": "pebs", "kind": "ldlat", "precise_ip": 2, "config": 0x1CD, "samples": 50, "lost": 0,
              "throttle": 0, "other_records": 0, "iterations": 1, "period": 1, "exact": 50, "at_load": 50,
              "at_next": 0, "in_loop": 0, "outside": 0, "addr_in_buffer": 50, "weight_ge_ldlat": 50}  # fmt: skip
    assert fv.pebs_ldlat(ON, pebs_view(), [record], 30).status == "pass"
    assert fv.pebs_ldlat(ON, pebs_view(), [{**record, "addr_in_buffer": 49}], 30).status == "fail"
    enxio = {"probe": "pebs", "kind": "ldlat", "precise_ip": 2, "config": 0x1CD, "error": "perf_event_open",
             "errno": 6, "strerror": "No such device or address"}  # fmt: skip
    assert "ENXIO" in fv.pebs_ldlat(ON, pebs_view(), [enxio], 30).reason


# --- IBS ----------------------------------------------------------------------------------------------------

LOOP = (0x401100, 0x401123)


def ibs_view():
    return replace(amd_kvm_guest_view(), sysfs={"ibs_op/type": "11", "ibs_fetch/type": "10"})


def ibs_records(pmu, val=True, inside=True, ip_matches=True, n=20):
    ctl = fv.IBS_OP_VAL if pmu == "ibs_op" else fv.IBS_FETCH_VAL
    address = LOOP[0] + 8 if inside else 0x500000
    samples = [{"probe": "ibs", "kind": "ibs_sample", "pmu": pmu, "ip": address if ip_matches else address + 4,
                "caps": 0xBFF, "regs": [ctl if val else 0, address, 0, 0, 0, 0, 0]} for _ in range(n)]  # fmt: skip
    mode = {"probe": "ibs", "kind": "ibs_mode", "pmu": pmu, "samples": n, "lost": 0, "throttle": 0,
            "other_records": 0, "loop_start": LOOP[0], "loop_end": LOOP[1], "buffer": 0, "buffer_end": 1}  # fmt: skip
    return [mode, *samples]


def test_ibs_factories_match_the_template():
    sample, mode = ibs_records("ibs_op")[1], ibs_records("ibs_op")[0]
    assert set(sample) == template_keys("ibs", "ibs_sample") | {"probe", "kind"}
    assert set(mode) == template_keys("ibs", "ibs_mode") | {"probe", "kind", "samples", "lost", "throttle",
                                                             "other_records"}  # fmt: skip


def test_ibs_enumeration():
    assert fv.ibs_enumeration(ON, ibs_view()).status == "pass"  # Genoa dump: CPUID IBS + the two PMUs
    assert fv.ibs_enumeration(OFF, ibs_view()).status == "fail"
    no_pmus = amd_kvm_guest_view()
    assert "registered no ibs_op" in fv.ibs_enumeration(ON, no_pmus).reason


@pytest.mark.parametrize("pmu", ["ibs_op", "ibs_fetch"])
def test_ibs_sampling(pmu):
    view = ibs_view()
    assert fv.ibs_sampling(ON, view, ibs_records(pmu), pmu).status == "pass"
    assert "without the Val bit" in fv.ibs_sampling(ON, view, ibs_records(pmu, val=False), pmu).reason
    assert "inside the loop" in fv.ibs_sampling(ON, view, ibs_records(pmu, inside=False), pmu).reason
    if pmu == "ibs_op":
        assert "differs from IbsOpRip" in fv.ibs_sampling(ON, view, ibs_records(pmu, ip_matches=False), pmu).reason
    assert fv.ibs_sampling(OFF, view, [], pmu).status == "skip"


def test_lbr_entries_checked_against_the_probe_binary(tmp_path):
    """The branch map of the real lbr probe: calls f1->f2->f3 and the loop's call to f1; recorded entries built
    from it pass, an entry starting inside the workload at a non-branch instruction fails, a call landing
    elsewhere fails."""
    from harness.branch_map import branch_map

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
    assert fv.lbr_records(ON, view, records(good), branches).status == "pass"
    not_a_branch = [[f3 + 1, f2, 0], *good[1:]]  # f3+1 is a nop, not a branch
    v = fv.lbr_records(ON, view, records(not_a_branch), branches)
    assert v.status == "fail" and "not at one of its branch instructions" in v.reason
    elsewhere = [[call_to[f2], f3, 0], *good[1:]]
    assert "land elsewhere" in fv.lbr_records(ON, view, records(elsewhere), branches).reason
