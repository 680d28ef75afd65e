"""Compare two results files (e.g. last night's and tonight's) check by check.

A check is identified by (profile, load, check id). A regression is a check that passed before and now fails
or errors; ``harness report diff`` exits 1 on any, so nightly CI goes red exactly when something broke.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Key = tuple[str, str, str]


@dataclass(frozen=True)
class Change:
    key: Key
    old: str | None
    new: str | None
    reason: str = ""

    def label(self) -> str:
        profile, load, check = self.key
        return f"{check} [{profile}/{load}]"


@dataclass
class Diff:
    regressions: list[Change] = field(default_factory=list)  # pass -> fail/error
    newly_failing: list[Change] = field(default_factory=list)  # skip/new -> fail/error
    newly_passing: list[Change] = field(default_factory=list)
    newly_skipped: list[Change] = field(default_factory=list)
    vanished: list[Change] = field(default_factory=list)
    added: list[Change] = field(default_factory=list)
    unchanged: int = 0

    def sections(self) -> list[tuple[str, list[Change]]]:
        return [
            ("Regressions (pass -> fail/error)", self.regressions),
            ("Newly failing", self.newly_failing),
            ("Newly passing", self.newly_passing),
            ("Newly skipped", self.newly_skipped),
            ("Vanished", self.vanished),
            ("New checks", self.added),
        ]


def _index(document: dict[str, Any]) -> dict[Key, dict[str, Any]]:
    return {(run["profile"], run["load"], check["id"]): check for run in document["runs"] for check in run["checks"]}


def compare(old: dict[str, Any], new: dict[str, Any]) -> Diff:
    before, after = _index(old), _index(new)
    diff = Diff()
    bad = ("fail", "error")
    for key, check in after.items():
        status = check["status"]
        reason = (check.get("reason") or "").split("\n")[0]
        if key not in before:
            diff.added.append(Change(key, None, status, reason))
            if status in bad:
                diff.newly_failing.append(Change(key, None, status, reason))
            continue
        previous = before[key]["status"]
        change = Change(key, previous, status, reason)
        if previous == status:
            diff.unchanged += 1
        elif status in bad and previous == "pass":
            diff.regressions.append(change)
        elif status in bad and previous not in bad:
            diff.newly_failing.append(change)
        elif status == "pass":
            diff.newly_passing.append(change)
        elif status == "skip":
            diff.newly_skipped.append(change)
        else:
            diff.unchanged += 1  # fail <-> error: still broken
    for key, check in before.items():
        if key not in after:
            diff.vanished.append(Change(key, check["status"], None))
    return diff


def text(diff: Diff) -> str:
    lines = []
    for title, changes in diff.sections():
        if not changes:
            continue
        lines.append(f"{title}: {len(changes)}")
        for change in changes:
            why = f"  ({change.reason[:160]})" if change.reason and change.new in ("fail", "error") else ""
            lines.append(f"  {change.label()}: {change.old or 'absent'} -> {change.new or 'absent'}{why}")
    lines.append(f"unchanged: {diff.unchanged}; regressions: {len(diff.regressions)}")
    return "\n".join(lines) + "\n"


def markdown(diff: Diff) -> str:
    lines = ["## vpmu: changes since the previous run", ""]
    for title, changes in diff.sections():
        if not changes:
            continue
        lines += [f"### {title} ({len(changes)})", "", "| check | profile/load | before | now | reason |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for change in changes:
            profile, load, check = change.key
            reason = change.reason.replace("|", "\\|")[:200] if change.new in ("fail", "error") else ""
            lines.append(f"| `{check}` | {profile}/{load} | {change.old or '-'} | {change.new or '-'} | {reason} |")
        lines.append("")
    lines.append(f"Unchanged: {diff.unchanged}. Regressions: **{len(diff.regressions)}**.")
    return "\n".join(lines) + "\n"
