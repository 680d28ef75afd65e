"""Verdicts for topdown, LBR, PEBS and AMD IBS: pure functions over the guest view and probe records.

Each rule cites its source. Today's upstream KVM gives most hosts none of these features, so the measurement
checks mostly SKIP with the expectation engine's reason; the enumeration checks still hold a guest to what it
may show ("expected absent" is checked, not assumed).
"""

from __future__ import annotations

import errno as errno_mod
import signal
from typing import Any

from harness.branch_map import BranchMap
from harness.expectations import Expectation
from harness.guest_view import GuestView
from harness.verdicts import Record, Verdict, errored, failed, first_record, gate, passed, skipped

USER_SPACE_END = 1 << 47  # x86-64 canonical user half (4-level paging): user addresses are below 0x8000_0000_0000
TOPDOWN_SUM_TOLERANCE = 0.02  # probe-reference.md §2c: |sum of level-1 metrics - slots| <= 2 % of slots
TOPDOWN_WIDTH = (3.5, 8.5)  # slots per cycle: 4, 5, 6 or 8 wide cores, diluted by SMT (§2c)
MAJORITY = 0.5  # retiring(ALU) > 50 %, backend(chase) > 50 % (§2c: relative assertions, not tight thresholds)


def _errno_name(record: Record) -> str:
    return errno_mod.errorcode.get(record.get("errno", 0), str(record.get("errno")))


def _absent_or_present(feature: str, expectation: Expectation, shown: bool, detail: dict[str, Any]) -> Verdict:
    """The enumeration rule shared by every feature: the guest shows the feature exactly when it is expected."""
    if expectation.available:
        if shown:
            return passed(f"guest enumerates {feature}, as expected", True, detail)
        return failed(f"{feature} is promised (host, KVM and profile provide it) but the guest does not enumerate it",
                      True, detail)  # fmt: skip
    if shown:
        return failed(f"guest enumerates {feature} although it is not expected ({expectation.reason})", False, detail)
    return passed(f"{feature} absent, as expected ({expectation.reason})", False, detail)


# --- topdown ------------------------------------------------------------------------------------------------


def _perf_caps(view: GuestView) -> dict[str, Any]:
    return view.perf_capabilities() or {}


def topdown_shown(view: GuestView) -> bool:
    perfmon = view.caps.arch_perfmon
    return bool(_perf_caps(view).get("perf_metrics")) or bool(perfmon and perfmon.fixed_counter_mask & 0b1000)


def topdown_enumeration(expectation: Expectation, view: GuestView) -> Verdict:
    """Fixed counter 3 and PERF_CAPABILITIES[15] together (a vPMU must not expose PERF_METRICS without FC3)."""
    perfmon = view.caps.arch_perfmon
    fc3 = bool(perfmon and perfmon.fixed_counter_mask & 0b1000)
    metrics = bool(_perf_caps(view).get("perf_metrics"))
    detail = {"fixed_counter_3": fc3, "perf_metrics": metrics, "sysfs_slots": view.sysfs.get("cpu/events/slots")}
    if metrics and not fc3:
        return failed("PERF_CAPABILITIES[15] (PERF_METRICS) without fixed counter 3 (SDM: metrics need FC3)",
                      "both or neither", detail)  # fmt: skip
    return _absent_or_present("topdown (FC3 + PERF_METRICS)", expectation, fc3 and metrics, detail)


def _topdown_records(expectation: Expectation, view: GuestView, records: list[Record]) -> Verdict | list[Record]:
    verdict = gate(expectation, topdown_shown(view), "does not enumerate FC3 + PERF_METRICS")
    if verdict:
        return verdict
    found = [r for r in records if r.get("kind") == "topdown"]
    if not found:
        return errored("topdown probe produced no records")
    broken = [r for r in found if "error" in r]
    if broken:
        r = broken[0]
        return failed(f"topdown group ({r.get('event', 'read')}) failed: {_errno_name(r)}", "counts", r.get("strerror"))
    return found


METRIC_NAMES = ("retiring", "bad_spec", "fe_bound", "be_bound")


def topdown_metrics(expectation: Expectation, view: GuestView, records: list[Record]) -> Verdict:
    """Each level-1 metric is a fraction in [0, 1] of slots and the four sum to slots within 2 %."""
    found = _topdown_records(expectation, view, records)
    if isinstance(found, Verdict):
        return found
    problems, observed = [], {}
    for r in found:
        slots = r["slots"]
        if not slots:
            problems.append(f"{r['workload']}: slots counted 0")
            continue
        fractions = {m: r[m] / slots for m in METRIC_NAMES}
        observed[r["workload"]] = {m: round(f, 4) for m, f in fractions.items()}
        if any(not 0 <= f <= 1 for f in fractions.values()):
            problems.append(f"{r['workload']}: a metric fraction is outside [0, 1]: {observed[r['workload']]}")
        total = sum(r[m] for m in METRIC_NAMES)
        if abs(total - slots) > TOPDOWN_SUM_TOLERANCE * slots:
            problems.append(f"{r['workload']}: metrics sum to {total:,} vs slots {slots:,} (> 2 %)")
    if problems:
        return failed("; ".join(problems), "fractions in [0,1], sum = slots +/- 2 %", observed)
    return passed("level-1 metrics are fractions of slots that add up", "sum = slots +/- 2 %", observed)


def topdown_width(expectation: Expectation, view: GuestView, records: list[Record]) -> Verdict:
    """slots / cycles over the same window is the core's issue width: [3.5, 8.5]."""
    found = _topdown_records(expectation, view, records)
    if isinstance(found, Verdict):
        return found
    r = next((x for x in found if x["workload"] == "alu"), None)
    if r is None or not r.get("cycles"):
        return errored("no ALU-workload cycles count in the topdown records")
    width = r["slots"] / r["cycles"]
    low, high = TOPDOWN_WIDTH
    if not low <= width <= high:
        return failed(f"slots/cycles = {width:.2f}, outside [{low}, {high}]", f"[{low}, {high}]", round(width, 3))
    return passed(f"slots/cycles = {width:.2f}", f"[{low}, {high}]", round(width, 3))


def topdown_workloads(expectation: Expectation, view: GuestView, records: list[Record]) -> Verdict:
    """A cache-resident ALU loop is mostly retiring; a pointer chase over 64 MiB is mostly backend bound."""
    found = _topdown_records(expectation, view, records)
    if isinstance(found, Verdict):
        return found
    by = {r["workload"]: r for r in found}
    if "alu" not in by or "chase" not in by:
        return errored("topdown probe lacks the alu or chase workload")
    retiring = by["alu"]["retiring"] / max(by["alu"]["slots"], 1)
    backend = by["chase"]["be_bound"] / max(by["chase"]["slots"], 1)
    observed = {"alu_retiring": round(retiring, 3), "chase_backend": round(backend, 3)}
    problems = []
    if retiring <= MAJORITY:
        problems.append(f"ALU loop retiring {retiring:.0%} (want > 50 %)")
    if backend <= MAJORITY:
        problems.append(f"pointer chase backend bound {backend:.0%} (want > 50 %)")
    if problems:
        return failed("; ".join(problems), "retiring(ALU) > 50 %, backend(chase) > 50 %", observed)
    return passed("ALU loop mostly retiring, pointer chase mostly backend bound", "> 50 % each", observed)


def topdown_rdpmc(expectation: Expectation, view: GuestView, records: list[Record]) -> Verdict:
    """RDPMC(1<<29) returns the metric bytes (bytes 0-3 sum to 0xff +/- 3) when the kernel allows it."""
    found = _topdown_records(expectation, view, records)
    if isinstance(found, Verdict):
        return found
    r = found[0]
    if r["rdpmc_metrics_signal"] == signal.SIGSEGV:
        return skipped("kvm-limit: RDPMC of PERF_METRICS (ECX bit 29) #GPs here: KVM's RDPMC emulation decodes only "
                       "GP and fixed counters unless RDPMC is passed through")  # fmt: skip
    if r["rdpmc_metrics_signal"] not in (0,):
        return skipped(f"not-allowed: the guest kernel gave this task no RDPMC (signal {r['rdpmc_metrics_signal']})")
    raw = r["rdpmc_metrics"]
    total = sum((raw >> (8 * i)) & 0xFF for i in range(4))
    if abs(total - 0xFF) > 3:
        return failed(f"PERF_METRICS bytes 0-3 sum to {total:#x}, want 0xff +/- 3", "0xff", hex(raw))
    return passed("PERF_METRICS via RDPMC: bytes 0-3 sum to 0xff", "0xff +/- 3", hex(raw))


# --- LBR ----------------------------------------------------------------------------------------------------


def lbr_depth(view: GuestView) -> int:
    text = view.sysfs.get("cpu/caps/branches", "0")
    return int(text) if text.isdigit() else 0


def legacy_lbr_enumeration(expectation: Expectation, view: GuestView) -> Verdict:
    """Legacy LBR: PERF_CAPABILITIES[5:0] non-zero and the guest kernel's LBR depth (cpu/caps/branches)."""
    fmt = int(_perf_caps(view).get("lbr_format") or 0)
    shown = fmt != 0 and view.caps.arch_lbr is None
    detail = {"lbr_format": fmt, "depth": lbr_depth(view)}
    if shown and expectation.available and not lbr_depth(view):
        return failed(f"LBR format {fmt} enumerated but the guest kernel registered no LBR depth", True, detail)
    return _absent_or_present("legacy LBR", expectation, shown, detail)


def arch_lbr_enumeration(expectation: Expectation, view: GuestView) -> Verdict:
    """Arch LBR: CPUID.07H:EDX[19] with leaf 1CH depths; the guest kernel's depth is one of them."""
    arch = view.caps.arch_lbr
    detail = {"cpuid_depths": arch.depths if arch else None, "depth": lbr_depth(view),
              "filters": {k: getattr(arch, k) for k in ("cpl_filter", "branch_filter", "call_stack", "mispredict",
                                                         "timed", "branch_type")} if arch else None}  # fmt: skip
    if arch is not None and not arch.depths:
        return failed("CPUID.07H:EDX[19] set but leaf 1CH enumerates no depth", "depths", detail)
    if arch is not None and lbr_depth(view) and lbr_depth(view) not in arch.depths:
        return failed(f"guest kernel LBR depth {lbr_depth(view)} is not one of CPUID.1CH's {arch.depths}",
                      "depth in CPUID.1CH", detail)  # fmt: skip
    return _absent_or_present("arch LBR", expectation, arch is not None, detail)


def lbr_expectation(legacy: Expectation, arch: Expectation) -> Expectation:
    """The LBR flavour the guest should have (legacy or arch), or legacy's reason when neither."""
    if arch.available:
        return arch
    return legacy


def _layout(records: list[Record]) -> Record | None:
    return first_record(records, "layout")


def lbr_records(
    expectation: Expectation, view: GuestView, records: list[Record], branches: BranchMap | None = None
) -> Verdict:
    """ANY|USER branch stacks: every from/to in the probe's own text (no kernel or host address), depth reached,
    and every entry that starts inside the workload starts at one of its branch instructions (calls landing on
    the callee), as objdump of the probe binary lists them."""
    verdict = gate(expectation, lbr_depth(view) > 0, "registered no LBR depth (cpu/caps/branches)")
    if verdict:
        return verdict
    mode = first_record(records, "branch_mode", mode="any")
    layout = _layout(records)
    if mode is None or layout is None:
        return errored("lbr probe produced no 'any' mode or layout record")
    if "error" in mode:
        return failed(f"branch-stack sampling failed: {_errno_name(mode)}", "samples", mode.get("strerror"))
    samples = [r for r in records if r.get("kind") == "branch_sample" and r.get("mode") == "any"]
    depth = lbr_depth(view)
    problems, outside, kernel, not_branch, wrong_target = [], 0, 0, 0, 0
    for s in samples:
        if s["nr"] > depth:
            problems.append(f"a sample has {s['nr']} entries > depth {depth}")
            break
        for src, dst, _flags in s["entries"]:
            for address in (src, dst):
                if address >= USER_SPACE_END:
                    kernel += 1
                elif not layout["text_start"] <= address < layout["text_end"]:
                    outside += 1
            if branches is not None and branches.covers(src):
                site = branches.sites.get(src)
                if site is None:
                    not_branch += 1
                elif site.kind == "call" and site.target is not None and dst != site.target:
                    wrong_target += 1
    observed = {"samples": mode["samples"], "max_nr": mode["max_nr"], "depth": depth, "kernel_addresses": kernel,
                "outside_text": outside, "not_a_branch": not_branch, "call_elsewhere": wrong_target,
                "lost": mode["lost"]}  # fmt: skip
    if not mode["samples"]:
        problems.append("no branch-stack samples")
    if kernel:
        problems.append(f"{kernel} kernel-space addresses in USER-only stacks (host or guest-kernel leak)")
    if outside:
        problems.append(f"{outside} addresses outside the probe's text (foreign branches)")
    if not_branch:
        problems.append(f"{not_branch} entries start inside the workload but not at one of its branch instructions")
    if wrong_target:
        problems.append(f"{wrong_target} call entries land elsewhere than the callee's entry")
    if mode["max_nr"] != depth:
        problems.append(f"deepest stack {mode['max_nr']} != enumerated depth {depth}")
    if problems:
        return failed("; ".join(problems), f"entries in the probe's text, depth {depth}", observed)
    return passed(f"{mode['samples']} branch stacks, all entries in the probe's text, depth {depth}", depth, observed)


def lbr_call_stack(expectation: Expectation, view: GuestView, records: list[Record]) -> Verdict:
    """CALL_STACK|USER sampled inside f3: the newest entries are the calls f2->f3, f1->f2, loop->f1."""
    verdict = gate(expectation, lbr_depth(view) > 0, "registered no LBR depth (cpu/caps/branches)")
    if verdict:
        return verdict
    mode = first_record(records, "branch_mode", mode="call_stack")
    layout = _layout(records)
    if mode is None or layout is None:
        return errored("lbr probe produced no 'call_stack' mode or layout record")
    if "error" in mode:
        if mode.get("errno") in (errno_mod.EOPNOTSUPP, errno_mod.EINVAL):
            return skipped(f"not-enumerated: call-stack mode unsupported ({_errno_name(mode)}; needs LBR format >= 4)")
        return failed(f"call-stack sampling failed: {_errno_name(mode)}", "samples", mode.get("strerror"))
    f1, f2, f3 = layout["f1"], layout["f2"], layout["f3"]
    f3_end = min(a for a in (f1, f2) if a > f3) if any(a > f3 for a in (f1, f2)) else f3 + 16
    inside = [s for s in records if s.get("kind") == "branch_sample" and s.get("mode") == "call_stack"
              and f3 <= s["ip"] < f3_end]  # fmt: skip
    if not inside:
        return skipped("no call-stack sample landed inside f3 (too few samples to judge)")
    good = [s for s in inside if [e[1] for e in s["entries"][:3]] == [f3, f2, f1]]
    observed = {"samples_in_f3": len(inside), "chain_f3_f2_f1": len(good)}
    if len(good) < 0.9 * len(inside):
        return failed(f"only {len(good)} of {len(inside)} samples in f3 show the chain f3 <- f2 <- f1",
                      ">= 90 %", observed)  # fmt: skip
    return passed(f"{len(good)}/{len(inside)} samples in f3 show the call chain", ">= 90 %", observed)


# --- PEBS ---------------------------------------------------------------------------------------------------


def _leaf1_edx(view: GuestView) -> int:
    leaf = next((r for r in view.records if r.get("kind") == "leaf" and r.get("leaf") == 1), None)
    return int(leaf["edx"]) if leaf else 0


def max_precise(view: GuestView) -> int:
    text = view.sysfs.get("cpu/caps/max_precise", "0")
    return int(text) if text.isdigit() else 0


def pebs_enumeration(expectation: Expectation, view: GuestView) -> Verdict:
    """PEBS: DS (CPUID.1:EDX[21]), PERF_CAPABILITIES[11:8] format >= 4 for KVM guests, max_precise >= 1."""
    fmt = int(_perf_caps(view).get("pebs_format") or 0)
    ds = bool(_leaf1_edx(view) >> 21 & 1)
    detail = {"pebs_format": fmt, "ds": ds, "max_precise": max_precise(view)}
    shown = fmt != 0 and max_precise(view) > 0
    if shown and not ds:
        return failed("PEBS format enumerated without CPUID.1:EDX[21] DS", "DS", detail)
    if shown and expectation.available and fmt < 4:
        return failed(f"guest PEBS format {fmt} < 4 (KVM exposes PEBS only via EPT, format >= 4)", ">= 4", detail)
    return _absent_or_present("PEBS", expectation, shown, detail)


def pebs_no_adaptive(pmu: Expectation, adaptive: Expectation, view: GuestView) -> Verdict:
    """Adaptive PEBS (PERF_CAPABILITIES[14]) stays hidden while KVM disallows it."""
    if not view.intel:
        return skipped(f"not-applicable: PEBS is Intel-only (guest vendor {view.caps.vendor})")
    if not pmu.available:
        return skipped(pmu.reason)
    baseline = bool(_perf_caps(view).get("pebs_baseline"))
    if adaptive.available:
        return passed("adaptive PEBS allowed here", True, baseline) if baseline else \
            failed("adaptive PEBS expected but PERF_CAPABILITIES[14] is clear", True, baseline)  # fmt: skip
    if baseline:
        return failed(f"PERF_CAPABILITIES[14] (PEBS baseline) is set although {adaptive.reason}", False, baseline)
    return passed(f"PEBS baseline hidden ({adaptive.reason})", False, baseline)


def pebs_precise(expectation: Expectation, view: GuestView, records: list[Record], level: int) -> Verdict:
    """precise_ip=level on a load event: with PEBS format >= 4 the sampled IP is the load itself with EXACT_IP
    for every level; with format <= 3 precise_ip=1 gives the next instruction ("off by one") and >= 2 the load
    (arch/x86/events/intel/ds.c; probe-reference.md §4c). Sample count = iterations / period within 2."""
    verdict = gate(expectation, max_precise(view) > 0, "reports max_precise 0")
    if verdict:
        return verdict
    if level > max_precise(view):
        return skipped(f"not-enumerated: precise_ip={level} > cpu/caps/max_precise={max_precise(view)}")
    r = first_record(records, "precise", precise_ip=level)
    if r is None:
        return errored(f"pebs probe produced no precise_ip={level} record")
    if "error" in r:
        return failed(f"precise_ip={level} event failed: {_errno_name(r)}", "samples", r.get("strerror"))
    fmt = int(_perf_caps(view).get("pebs_format") or 0)
    n = r["samples"]
    expected_n = r["iterations"] // r["period"]
    trap_like = fmt <= 3 and level == 1
    hits = r["at_next"] if trap_like else r["at_load"]
    observed = {k: r[k] for k in ("samples", "exact", "at_load", "at_next", "in_loop", "outside", "lost", "throttle")}
    problems = []
    if abs(n - expected_n) > 2:
        problems.append(f"{n} samples, want {expected_n} +/- 2")
    if n and hits < 0.99 * n:
        where = "the instruction after the load" if trap_like else "the load"
        problems.append(f"only {hits} of {n} IPs at {where}")
    if n and not trap_like and r["exact"] < n:
        problems.append(f"{n - r['exact']} samples without PERF_RECORD_MISC_EXACT_IP")
    if r["lost"] or r["throttle"]:
        problems.append(f"{r['lost']} lost / {r['throttle']} throttle records")
    expected = f"{expected_n} +/- 2 samples at {'load+3' if trap_like else 'the load'}"
    if problems:
        return failed("; ".join(problems), expected, observed)
    return passed(f"precise_ip={level}: {n} samples at the expected IP", expected, observed)


def pebs_ldlat(expectation: Expectation, view: GuestView, records: list[Record], ldlat: int) -> Verdict:
    """Load-latency sampling: every data address inside the loop's buffer, weight >= ldlat for >= 99 %."""
    verdict = gate(expectation, max_precise(view) > 0, "reports max_precise 0")
    if verdict:
        return verdict
    r = first_record(records, "ldlat")
    if r is None:
        return errored("pebs probe produced no ldlat record")
    if "error" in r:
        return failed(f"mem-loads ldlat={ldlat} failed: {_errno_name(r)}", "samples", r.get("strerror"))
    n = r["samples"]
    observed = {"samples": n, "addr_in_buffer": r.get("addr_in_buffer"), "weight_ge_ldlat": r.get("weight_ge_ldlat")}
    problems = []
    if not n:
        problems.append("no load-latency samples")
    elif r["addr_in_buffer"] < n:
        problems.append(f"{n - r['addr_in_buffer']} data addresses outside the probe's buffer")
    if n and r["weight_ge_ldlat"] < 0.99 * n:
        problems.append(f"only {r['weight_ge_ldlat']} of {n} samples with weight >= {ldlat}")
    if problems:
        return failed("; ".join(problems), "addresses in buffer, weight >= ldlat", observed)
    return passed(f"{n} load-latency samples in the buffer", "addresses in buffer", observed)


# --- AMD IBS ------------------------------------------------------------------------------------------------

IBS_OP_VAL = 1 << 18  # IbsOpCtl[18] IbsOpVal (APM Vol. 2, "Instruction-Based Sampling"; Linux IBS_OP_VAL)
IBS_FETCH_VAL = 1 << 49  # IbsFetchCtl[49] IbsFetchVal (Linux IBS_FETCH_VAL)
IBS_RIP_INVALID = 1 << 38  # IbsOpData[38] IbsRipInvalid


def ibs_shown(view: GuestView) -> bool:
    return bool(view.caps.amd and view.caps.amd.ibs) or "ibs_op/type" in view.sysfs


def ibs_enumeration(expectation: Expectation, view: GuestView) -> Verdict:
    """CPUID 80000001H:ECX[10] + 8000001BH and the guest kernel's ibs_op / ibs_fetch PMUs agree."""
    cpuid = bool(view.caps.amd and view.caps.amd.ibs)
    pmus = "ibs_op/type" in view.sysfs and "ibs_fetch/type" in view.sysfs
    detail = {"cpuid": cpuid, "ibs_pmus": pmus, "caps": view.caps.amd.ibs.caps if cpuid and view.caps.amd else None}
    if expectation.available and cpuid and not pmus:
        return failed("CPUID enumerates IBS but the guest kernel registered no ibs_op/ibs_fetch PMU", True, detail)
    return _absent_or_present("AMD IBS", expectation, cpuid or pmus, detail)


def ibs_sampling(expectation: Expectation, view: GuestView, records: list[Record], pmu: str) -> Verdict:
    """IBS samples are valid (Val bit) and point into the loop: IbsOpRip (op) / IbsFetchLinAd (fetch) inside the
    loop for >= 95 % of samples, and the sample IP equals IbsOpRip whenever RipInvalid is clear (§5c)."""
    verdict = gate(expectation, ibs_shown(view), "shows no IBS")
    if verdict:
        return verdict
    mode = first_record(records, "ibs_mode", pmu=pmu)
    if mode is None:
        return errored(f"ibs probe produced no {pmu} record")
    if "error" in mode:
        return failed(f"{pmu} sampling failed: {_errno_name(mode)}", "samples", mode.get("strerror"))
    samples = [r for r in records if r.get("kind") == "ibs_sample" and r.get("pmu") == pmu and len(r["regs"]) >= 2]
    start, end = mode["loop_start"], mode["loop_end"]
    invalid = inside = mismatched = 0
    for s in samples:
        ctl, address = s["regs"][0], s["regs"][1]
        if not ctl & (IBS_OP_VAL if pmu == "ibs_op" else IBS_FETCH_VAL):
            invalid += 1
        if start <= address < end:
            inside += 1
        if pmu == "ibs_op" and len(s["regs"]) > 2 and not s["regs"][2] & IBS_RIP_INVALID and s["ip"] != address:
            mismatched += 1
    n = len(samples)
    observed = {"samples": mode["samples"], "judged": n, "invalid": invalid, "in_loop": inside,
                "ip_mismatch": mismatched}  # fmt: skip
    problems = []
    if not n:
        problems.append("no IBS samples")
    if invalid:
        problems.append(f"{invalid} samples without the Val bit")
    if n and inside < 0.95 * n:
        problems.append(f"only {inside} of {n} sampled addresses inside the loop")
    if mismatched:
        problems.append(f"{mismatched} samples whose IP differs from IbsOpRip")
    if problems:
        return failed("; ".join(problems), ">= 95 % valid samples in the loop", observed)
    return passed(f"{n} valid {pmu} samples in the loop", ">= 95 % in the loop", observed)
