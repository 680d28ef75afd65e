"""PEBS verdicts (guest_tests/test_pebs.py): enumeration, precise IPs, adaptive PEBS and load latency.

Each rule cites its source. A host core-PMU load may legitimately switch guest PEBS off (pebs_competing_load), and a
guest kernel that does not know the CPU model has no PEBS constraint table: both are SKIPs, not FAILs.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from harness.judge.expectations import Expectation
from harness.judge.verdict import Record, Verdict, errored, failed, first_record, gate, passed, skipped
from harness.probe.guest_view import GuestView

if TYPE_CHECKING:
    from harness.host.loads import LoadSpec
from harness.judge.guest_kernel import (
    absent_or_present,
    decoded_perf_capabilities,
    errno_name_of,
    guest_kernel_skip,
    kernel_knows_model,
    throttle_skip,
    throttles,
)

#: arch/x86/events/intel/ds.c intel_ds_init(): a PEBS format the kernel has no case for prints "no PEBS fmt%d%c, "
#: and sets x86_pmu.pebs = 0 (so cpu/caps/max_precise is 0). Format 6 got its case only in 2024 (the hunk context
#: of tip commit e02e9b0374c3 "perf/x86/intel: Support PEBS counters snapshotting" already has `case 6:`); 6.1 has
#: `case 5: ... fallthrough; case 4:` only, and a Lunar Lake host on such a kernel prints "no PEBS fmt6+, "
#: (intel/pcm issue #895).
UNKNOWN_PEBS_FORMAT = re.compile(r"no PEBS fmt\d+[+-]?")


def pebs_competing_load(load: LoadSpec | None) -> str | None:
    """The host load's core-PMU events, if it has any, for the PEBS checks: they occupy host counters on the vCPU's
    CPUs, so the x86 scheduler may give KVM's backing event another counter index than the guest's (KVM marks it in
    host_cross_mapped_mask), and a host PEBS user switches guest PEBS off outright (arch/x86/events/intel/core.c
    intel_guest_get_msrs(): "Disable guest PEBS if host PEBS is enabled" and "Disable guest PEBS thoroughly for
    cross-mapped PEBS counters", which also clears the counter's GLOBAL_CTRL bit). Broader than
    harness.judge.coexist.competing_load (pinned loads only), which is about counts lost to counter starvation: here any
    reassignment of counters matters, flexible events included [inferred from the scheduler; a real host run should
    confirm]. None for idle and software-only loads, which leave the PMU alone."""
    if load is None or load.idle:
        return None
    core = [event.text for event in load.event_list() if event.kind == "core"]
    return f"{load.name} ({', '.join(core)})" if core else None


def _leaf1_edx(view: GuestView) -> int:
    leaf = next((r for r in view.records if r.get("kind") == "leaf" and r.get("leaf") == 1), None)
    return int(leaf["edx"]) if leaf else 0


def max_precise(view: GuestView) -> int:
    text = view.sysfs.get("cpu/caps/max_precise", "0")
    return int(text) if text.isdigit() else 0


def pebs_kernel_gap(view: GuestView) -> str | None:
    """The guest kernel's own words when it switched PEBS off for a format it does not know (UNKNOWN_PEBS_FORMAT)."""
    found = UNKNOWN_PEBS_FORMAT.search(view.kernel_banner)
    if not found:
        return None
    return (f'its banner says "{found.group(0)}" (arch/x86/events/intel/ds.c intel_ds_init(): no case for this PEBS '
            "format, x86_pmu.pebs = 0, so cpu/caps/max_precise is 0)")  # fmt: skip


def _pebs_unused(view: GuestView, release: str | None) -> Verdict | None:
    """SKIP when PERF_CAPABILITIES shows a PEBS format the guest kernel has no case for; None otherwise (a kernel
    that knows the format and still sets up no PEBS saw an inconsistent enumeration: DS, DTES64 or
    IA32_MISC_ENABLE[12], arch/x86/kernel/cpu/intel.c init_intel(), which the vPMU answers for)."""
    fmt = int(decoded_perf_capabilities(view).get("pebs_format") or 0)
    gap = pebs_kernel_gap(view)
    if not fmt or max_precise(view) or not gap:
        return None
    return guest_kernel_skip("PEBS", f"PERF_CAPABILITIES[11:8] shows PEBS format {fmt}", gap, view, release)


def pebs_enumeration(expectation: Expectation, view: GuestView, release: str | None = None) -> Verdict:
    """PEBS: DS (CPUID.1:EDX[21]), PERF_CAPABILITIES[11:8] format >= 4 for KVM guests, max_precise >= 1.

    The promise is judged on what KVM and QEMU enumerate (the format); a guest kernel that does not know that format
    says so in its banner and the check SKIPs with its words (review F3) instead of blaming the host."""
    fmt = int(decoded_perf_capabilities(view).get("pebs_format") or 0)
    ds = bool(_leaf1_edx(view) >> 21 & 1)
    detail = {"pebs_format": fmt, "ds": ds, "max_precise": max_precise(view), "banner": view.kernel_banner}
    shown = fmt != 0 and max_precise(view) > 0
    if shown and not ds:
        return failed("PEBS format enumerated without CPUID.1:EDX[21] DS", "DS", detail)
    if expectation.available and not shown:
        unused = _pebs_unused(view, release)
        if unused:
            return unused
    if shown and expectation.available and fmt < 4:
        return failed(f"guest PEBS format {fmt} < 4 (KVM exposes PEBS only via EPT, format >= 4)", ">= 4", detail)
    return absent_or_present("PEBS", expectation, shown, detail)


def _pebs_gate(expectation: Expectation, view: GuestView, release: str | None) -> Verdict | None:
    """Expected and the guest kernel reports a precise level -> None (measure); else SKIP or FAIL with the reason."""
    if not expectation.available:
        return skipped(expectation.reason)
    if max_precise(view):
        return None
    return _pebs_unused(view, release) or gate(expectation, False, "reports max_precise 0")


def _pebs_no_constraint(view: GuestView, record: Record, release: str | None) -> Verdict | None:
    """SKIP when a precise event could not run because the guest kernel does not know the CPU model.

    Without a model case there is no PEBS constraint table, and without PEBS baseline no PMU_FL_PEBS_ALL, so
    ds.c intel_pebs_constraints() returns &emptyconstraint for every precise event: perf_event_open() fails with
    EINVAL (x86_pmu_event_init() -> validate_event(): a constraint of weight 0). Judged only when the event failed
    or sampled nothing, so a kernel that does schedule it is still measured."""
    if kernel_knows_model(view) is not False or decoded_perf_capabilities(view).get("pebs_baseline"):
        return None
    if "error" not in record and record.get("samples"):
        return None
    pebs_format = int(decoded_perf_capabilities(view).get("pebs_format") or 0)
    return guest_kernel_skip("PEBS on this CPU model", f"PERF_CAPABILITIES shows PEBS format {pebs_format} without "
                             "baseline", "it does not know this CPU model, so no PEBS constraint covers the load "
                             "event (ds.c intel_pebs_constraints(): &emptyconstraint)", view, release)  # fmt: skip


def _load_shortfall(load: str, n: int, expected: str, observed: dict[str, Any]) -> Verdict:
    """SKIP for fewer PEBS samples than the loop must give while a host load uses the PMU (see pebs_competing_load)."""
    return skipped(f"host-load: {n} PEBS samples where {expected} under host load {load}: the host switches guest "
                   "PEBS off while it has a PEBS event on the vCPU's CPU or maps the guest counter to another host "
                   "counter (arch/x86/events/intel/core.c intel_guest_get_msrs(): 'Disable guest PEBS if host PEBS "
                   "is enabled', 'Disable guest PEBS thoroughly for cross-mapped PEBS counters'); whether that "
                   "happened is not observable from the harness. Judged strictly under idle and software-only "
                   "loads", expected, observed)  # fmt: skip


def pebs_no_adaptive(pmu: Expectation, adaptive: Expectation, view: GuestView) -> Verdict:
    """Adaptive PEBS (PERF_CAPABILITIES[14]) stays hidden while KVM disallows it."""
    if not view.intel:
        return skipped(f"not-applicable: PEBS is Intel-only (guest vendor {view.caps.vendor})")
    if not pmu.available:
        return skipped(pmu.reason)
    baseline = bool(decoded_perf_capabilities(view).get("pebs_baseline"))
    if adaptive.available:
        return passed("adaptive PEBS allowed here", True, baseline) if baseline else \
            failed("adaptive PEBS expected but PERF_CAPABILITIES[14] is clear", True, baseline)  # fmt: skip
    if baseline:
        return failed(f"PERF_CAPABILITIES[14] (PEBS baseline) is set although {adaptive.reason}", False, baseline)
    return passed(f"PEBS baseline hidden ({adaptive.reason})", False, baseline)


def pebs_ip_model(fmt: int, baseline: bool, level: int) -> str:
    """Where the guest kernel puts the sample IP of a PEBS record for precise_ip=level (arch/x86/events/intel/ds.c).

    - format <= 3: intel_pmu_drain_pebs_nhm -> setup_pebs_fixed_sample_data(): precise_ip=1 -> pebs->ip, the
      instruction after the load ("next"); precise_ip>=2 -> pebs->real_ip, the eventing IP with PERF_EFLAGS_EXACT
      ("load") when format >= 2, else the off-by-1 IP fixed up through the LBR when it can be ("fixup").
    - format >= 4: intel_ds_init() drains with intel_pmu_drain_pebs_icl -> setup_pebs_adaptive_sample_data(), whose
      basic group holds the eventing IP with EXACT ("load"). Only with PEBS baseline does pebs_update_adaptive_cfg()
      add the GP group for precise_ip < 2, and then the IP is gprs->ip, after the load, EXACT cleared ("next").
      Without baseline ("Only basic record supported", every KVM guest: vmx_get_perf_capabilities() clears
      PERF_CAP_PEBS_BASELINE) every level reports the load with EXACT.
    """
    if fmt >= 4:
        return "next" if baseline and level < 2 else "load"
    if level < 2:
        return "next"
    return "load" if fmt >= 2 else "fixup"


def pebs_precise(
    expectation: Expectation,
    view: GuestView,
    records: list[Record],
    level: int,
    load: LoadSpec | None = None,
    release: str | None = None,
) -> Verdict:
    """precise_ip=level on a load event whose only load in the loop is at vpmu_loop_load: >= 99 % of sample IPs
    where pebs_ip_model() says (with PERF_RECORD_MISC_EXACT_IP where the kernel sets it), and iterations / period
    samples within 2. A kernel that throttled the event makes the count meaningless (SKIP).

    Under a host load that uses the PMU (pebs_competing_load()) the host may switch guest PEBS off for a while, which
    only removes samples: a shortfall there SKIPs with the numbers, while samples at the wrong IP, without EXACT,
    or more samples than loads still FAIL (wrong data is wrong under any load)."""
    verdict = _pebs_gate(expectation, view, release)
    if verdict:
        return verdict
    if level > max_precise(view):
        return skipped(f"not-enumerated: precise_ip={level} > cpu/caps/max_precise={max_precise(view)}")
    r = first_record(records, "precise", precise_ip=level)
    if r is None:
        return errored(f"pebs probe produced no precise_ip={level} record")
    no_constraint = _pebs_no_constraint(view, r, release)
    if no_constraint:
        return no_constraint
    if "error" in r:
        return failed(f"precise_ip={level} event failed: {errno_name_of(r)}", "samples", r.get("strerror"))
    throttled = throttle_skip(r, records)
    if throttled:
        return throttled
    fmt = int(decoded_perf_capabilities(view).get("pebs_format") or 0)
    model = pebs_ip_model(fmt, bool(decoded_perf_capabilities(view).get("pebs_baseline")), level)
    n = r["samples"]
    expected_n = r["iterations"] // r["period"]
    hits = {"load": r["at_load"], "next": r["at_next"], "fixup": r["at_load"] + r["at_next"]}[model]
    observed = {k: r[k] for k in ("samples", "exact", "at_load", "at_next", "in_loop", "outside", "lost")}
    observed["throttled"] = throttles(r)
    where = {"load": "the load", "next": "the instruction after the load (off-by-1)",
             "fixup": "the load or the instruction after it"}[model]  # fmt: skip
    competing = pebs_competing_load(load)
    short = n < expected_n - 2
    if competing:
        observed["host_load"] = competing
    problems = []
    if abs(n - expected_n) > 2 and not (short and competing):
        problems.append(f"{n} samples, want {expected_n} +/- 2")
    if n and hits < 0.99 * n:
        problems.append(f"only {hits} of {n} IPs at {where}")
    if n and model == "load" and r["exact"] < n:
        problems.append(f"{n - r['exact']} samples without PERF_RECORD_MISC_EXACT_IP")
    if r["lost"]:
        problems.append(f"{r['lost']} lost records")
    expected = f"{expected_n} +/- 2 samples at {where} (PEBS format {fmt})"
    if problems:
        return failed("; ".join(problems), expected, observed)
    if short and competing:
        return _load_shortfall(competing, n, f"{expected_n} +/- 2 are due", observed)
    return passed(f"precise_ip={level}: {n} samples at {where}", expected, observed)


def pebs_ldlat(
    expectation: Expectation,
    view: GuestView,
    records: list[Record],
    ldlat: int,
    load: LoadSpec | None = None,
    release: str | None = None,
) -> Verdict:
    """Load-latency sampling: data addresses inside the loop's buffer and weight >= ldlat, each for >= 99 %.

    Where ADDR and WEIGHT come from (arch/x86/events/intel/ds.c): with PEBS format <= 3,
    setup_pebs_fixed_sample_data() takes pebs->dla (format >= 1) and pebs->lat (PERF_X86_EVENT_PEBS_LDLAT events);
    with format >= 4 the record is adaptive (setup_pebs_adaptive_sample_data()) and both come only from the MEMINFO
    group, which PEBS_DATA_CFG can request only with PEBS baseline (PERF_CAPABILITIES[14]); without it intel_ds_init()
    notes "Only basic record supported". KVM clears baseline, so a format >= 4 guest without it gets samples with no
    address and no weight: that is SKIPped with the reason, not FAILed. No sample at all under a host load that uses
    the PMU is the host switching guest PEBS off (pebs_competing_load(), _load_shortfall()): SKIP with the numbers.
    """
    verdict = _pebs_gate(expectation, view, release)
    if verdict:
        return verdict
    r = first_record(records, "ldlat")
    if r is None:
        return errored("pebs probe produced no ldlat record")
    no_constraint = _pebs_no_constraint(view, r, release)
    if no_constraint:
        return no_constraint
    if "error" in r:
        return failed(f"mem-loads ldlat={ldlat} failed: {errno_name_of(r)}", "samples", r.get("strerror"))
    fmt = int(decoded_perf_capabilities(view).get("pebs_format") or 0)
    baseline = bool(decoded_perf_capabilities(view).get("pebs_baseline"))
    n = r["samples"]
    observed = {"samples": n, "addr_in_buffer": r.get("addr_in_buffer"), "weight_ge_ldlat": r.get("weight_ge_ldlat"),
                "pebs_format": fmt, "baseline": baseline, "throttled": throttles(r)}  # fmt: skip
    if not n:
        throttled = throttle_skip(r, records)
        if throttled:
            return throttled
        competing = pebs_competing_load(load)
        if competing:
            return _load_shortfall(competing, 0, "the loop's cache-missing loads must give some",
                                   {**observed, "host_load": competing})  # fmt: skip
        return failed("no load-latency samples", "addresses in buffer, weight >= ldlat", observed)
    problems = []
    if r["addr_in_buffer"] < 0.99 * n:
        problems.append(f"{n - r['addr_in_buffer']} of {n} data addresses outside the probe's buffer")
    if r["weight_ge_ldlat"] < 0.99 * n:
        problems.append(f"only {r['weight_ge_ldlat']} of {n} samples with weight >= {ldlat}")
    if problems and fmt >= 4 and not baseline:
        return skipped(f"not-enumerated: PEBS baseline (PERF_CAPABILITIES[14]) is clear, so PEBS format {fmt} records "
                       "carry only the basic group and no data address or latency (ds.c intel_ds_init: \"Only basic "
                       "record supported\"; setup_pebs_adaptive_sample_data reads them from MEMINFO)",
                       "addresses in buffer, weight >= ldlat", observed)  # fmt: skip
    if problems:
        return failed("; ".join(problems), "addresses in buffer, weight >= ldlat", observed)
    return passed(f"{n} load-latency samples in the buffer", "addresses in buffer, weight >= ldlat", observed)
