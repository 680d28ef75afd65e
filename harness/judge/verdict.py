"""The verdict every rule returns, and the few steps every rule shares.

A probe measures; the judge floor decides. A rule is a pure function from (expectation, guest view, probe records) to
one Verdict: PASS, FAIL, SKIP or ERROR with a reason that cites its source. This module holds that record, its four
constructors, the gate that turns an unexpected feature into SKIP, record lookup, and the contention tail that turns a
shortfall a host load explains into SKIP instead of FAIL. Nothing here runs a guest, so every rule is unit-tested with
records in the probes' exact output format.
"""

from __future__ import annotations

import errno as errno_mod
import signal
from dataclasses import dataclass, field
from typing import Any

from harness.judge.expectations import Expectation

Record = dict[str, Any]
STATUSES = ("pass", "fail", "skip", "error")


@dataclass(frozen=True)
class Verdict:
    """One check's outcome; ``expected``/``observed`` are short human-readable strings or numbers."""

    status: str
    reason: str
    expected: Any = None
    observed: Any = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.status in STATUSES, self.status


def passed(reason: str, expected: Any = None, observed: Any = None, **details: Any) -> Verdict:
    return Verdict("pass", reason, expected, observed, details)


def failed(reason: str, expected: Any = None, observed: Any = None, **details: Any) -> Verdict:
    return Verdict("fail", reason, expected, observed, details)


def skipped(reason: str, expected: Any = None, observed: Any = None) -> Verdict:
    return Verdict("skip", reason, expected, observed)


def errored(reason: str, observed: Any = None) -> Verdict:
    return Verdict("error", reason, None, observed)


def errno_text(record: Record) -> str:
    number = record.get("errno")
    name = errno_mod.errorcode.get(number, str(number)) if isinstance(number, int) else "?"
    return f"{record.get('error', 'call')}: {name} ({record.get('strerror', '')})"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def gate(expectation: Expectation, guest_has_it: bool, what: str) -> Verdict | None:
    """The common start of every measurement check.

    Not expected -> SKIP with the expectation's reason, even if a probe ran (under TCG nothing can count).
    Expected but the guest lacks it -> FAIL. Otherwise None: judge the measurement.
    """
    if not expectation.available:
        return skipped(expectation.reason)
    if not guest_has_it:
        return failed(f"{expectation.feature} is promised (host, KVM and profile provide it) but the guest {what}")
    return None


#: The perf-based vPMU's documented behaviour under counter contention (Documentation/admin-guide/kernel-parameters.txt,
#: kvm-{amd,intel}.enable_mediated_pmu): KVM-created perf events "contend for hardware resources", and a perf-based
#: vPMU "can result in silently dropped guest events (due to resource contention)"; a mediated vPMU "eliminates lost
#: guest events".
CONTENTION_DOC = ("the perf-based vPMU \"can result in silently dropped guest events (due to resource contention)\" "
                  "(Documentation/admin-guide/kernel-parameters.txt, kvm-{amd,intel}.enable_mediated_pmu)")  # fmt: skip


def contention_skip(
    contention: str | None, shortfalls: list[str], others: list[str], expected: Any, observed: Any
) -> Verdict | None:
    """SKIP when every problem is a shortfall and a host load that competes for the counters explains it under the
    perf-based vPMU (``contention``: which load and how, coexist.perf_based_contention()); the measured loss
    goes into the reason and the counts stay the observation. None: judge as usual (an overcount, a misplaced
    member, or a loss without such a load stays a FAIL)."""
    if contention is None or not shortfalls or others:
        return None
    return skipped(f"host-load: {contention}: they compete with KVM's pinned backing events for the counters, and "
                   f"{CONTENTION_DOC}; measured: {'; '.join(shortfalls)}", expected, observed)  # fmt: skip


def shortfall_verdict(
    contention: str | None, shortfalls: list[str], others: list[str], expected: Any, observed: Any
) -> Verdict | None:
    """The verdict of a measurement with problems: contention_skip's SKIP where a competing load explains every
    shortfall, else a FAIL naming the shortfalls and the other problems; None when there is none."""
    verdict = contention_skip(contention, shortfalls, others, expected, observed)
    if verdict:
        return verdict
    if shortfalls or others:
        return failed("; ".join(shortfalls + others), expected, observed)
    return None


def first_record(records: list[Record], kind: str, **match: Any) -> Record | None:
    """The first record of ``kind`` whose fields equal ``match`` (e.g. mode="any"), or None."""
    for r in records:
        if r.get("kind") == kind and all(r.get(k) == v for k, v in match.items()):
            return r
    return None
