"""Co-existence verdicts: what a host perf load does to the guest, and whether the host load itself behaved.

Under the perf-based vPMU every guest counter is a host perf event, so host contention can stop a guest
counter silently while the guest still sees time_running == time_enabled: only an exact-count canary catches
that (reference probe-reference.md §7b). Under the mediated vPMU the canary must stay exact whatever ``:H`` load
the host runs, and a host event that would count guest time must be refused with EOPNOTSUPP (kvm-x86 pull
"Mediated PMU for 6.20", perf_create_mediated_pmu include-guest accounting).
"""

from __future__ import annotations

from typing import Any

from harness.expectations import Expectation
from harness.guest_view import GuestView
from harness.loads import LoadResult, LoadSpec
from harness.verdicts import (
    NO_ERRATA,
    OvercountErrata,
    Record,
    Verdict,
    errored,
    event_bounds,
    failed,
    gate,
    held_back_note,
    passed,
    skipped,
)


def host_load(spec: LoadSpec, result: LoadResult | None, vpmu_mode: str | None, snapshot: dict[str, Any]) -> Verdict:
    """The host load ran as intended; under the mediated vPMU, an include-guest load is refused instead."""
    if spec.idle:
        return skipped("not-applicable: the idle baseline runs no host load")
    if result is None:
        return skipped("not-applicable: the profile's guest did not run")
    observed = {"status": result.status, "events": snapshot or result.events, "reason": result.reason}
    if vpmu_mode == "mediated" and spec.counts_guest:
        if result.status == "refused":
            return passed("the mediated vPMU refused a host event that counts guest time (EOPNOTSUPP)", "refused",
                          observed)  # fmt: skip
        if result.status in ("running", "stopped"):
            return failed("under the mediated vPMU a host event that counts guest time must be refused "
                          "(EOPNOTSUPP), but perf started", "refused", observed)  # fmt: skip
    if result.status == "unavailable":
        return skipped(f"host-load: {result.reason}")
    if result.status == "died":
        return errored(f"host-load: {result.reason}")
    if result.status == "refused":
        return failed(f"host perf refused the load ({result.reason}) although the vPMU is "
                      f"{vpmu_mode or 'not in use'}", "running", observed)  # fmt: skip
    pcts = [e.get("min_pct_running") for e in (snapshot or result.events).values() if e.get("min_pct_running")]
    low = min(pcts) if pcts else None
    share = f"; lowest running share {low:.0f}%" if low is not None else ""
    return passed(f"host load running ({', '.join(observed['events']) or 'record'}{share})", "running", observed)


def _instruction_members(records: list[Record]) -> list[Record]:
    return [r for r in records if r.get("kind") == "count" and r.get("event") == "instructions" and "error" not in r]


def canary(
    expectation: Expectation,
    view: GuestView,
    records: list[Record],
    idle_records: list[Record] | None,
    load: LoadResult | None,
    vm_exits: dict[str, Any],
    errata: OvercountErrata | bool = NO_ERRATA,
) -> Verdict:
    """The exact-count canary: the loop's user instructions on every counter equal the exact value (and the idle
    run's) under this host load. A shortfall with time_running == time_enabled is a silent, host-induced loss.
    Only the instructions erratum relaxes it (OvercountErrata.instructions; Clearwater Forest has no branch one)."""
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    if load is not None and load.status in ("unavailable", "refused"):
        return skipped(f"host-load: {load.reason}")
    members = _instruction_members(records)
    if not members:
        return failed("no instructions measurement under this load", "counts", None)
    n = int(members[0]["iterations"])
    bounds = event_bounds("instructions", n, view.amd, errata, 0)
    idle = {m["rdpmc_index"]: m["value_n"] - m["value_0"] for m in _instruction_members(idle_records or [])}
    observed: dict[str, Any] = {"vm_exits": vm_exits, "counts": {}}
    problems = []
    worst = 0.0
    for m in members:
        delta = m["value_n"] - m["value_0"]
        label = f"{m['rdpmc_index']:#x}"
        observed["counts"][label] = delta
        if bounds.low:
            error = (delta - bounds.low) / bounds.low * 100
            worst = error if abs(error) > abs(worst) else worst
        silent = m["running_n"] == m["enabled_n"]
        problem = bounds.check(delta)
        if problem:
            lost = bounds.low - delta
            how = "silently (time_running == time_enabled)" if silent else "with guest-visible multiplexing"
            problems.append(f"counter {label}: {problem}; {lost:+,} counts lost {how}")
        elif m["rdpmc_index"] in idle and idle[m["rdpmc_index"]] != delta and bounds.low == bounds.high:
            problems.append(f"counter {label}: {delta:,} differs from the idle run's {idle[m['rdpmc_index']]:,}")
    observed["count_error_pct"] = round(worst, 4)
    expected = f"exactly {bounds.low:,} on every counter" if bounds.low == bounds.high else f">= {bounds.low:,}"
    if problems:
        return failed("host-induced loss: " + "; ".join(problems), expected, observed)
    held = held_back_note(members[0])
    note = f" (one counter held back: {held})" if held else ""
    return passed(f"canary exact on {len(members)} counters under this load{note}", expected, observed)


def guest_multiplexing(expectation: Expectation, view: GuestView, records: list[Record]) -> Verdict:
    """The guest never uses more events than it has counters, so it must never see itself multiplexed."""
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict:
        return verdict
    measured = [r for r in records if r.get("kind") == "count" and "error" not in r]
    if not measured:
        return failed("no counting measurement under this load", "time_running == time_enabled", None)
    short = [f"{r['event']}@{r['rdpmc_index']:#x} ran {r['running_n'] / r['enabled_n']:.0%}"
             for r in measured if r["enabled_n"] and r["running_n"] < r["enabled_n"]]  # fmt: skip
    observed = {"groups": len({r["event"] for r in measured}), "members": len(measured), "multiplexed": short}
    if short:
        return failed("guest-visible multiplexing without guest over-subscription: " + ", ".join(short[:6]),
                      "time_running == time_enabled", observed)  # fmt: skip
    return passed("no guest-visible multiplexing", "time_running == time_enabled", observed)
