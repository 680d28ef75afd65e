"""The feature matrix: rows = checks (grouped by feature), columns = host x profile x load, cells = verdicts.

Built from one results.json or several (one per host). Rendering lives in harness/report/render.py; this module only
turns result documents into a table, so render, merge and the pytest summary all share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.report.results import STATUSES

SYMBOLS = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP", "error": "ERROR"}
#: Row groups in reading order (what the guest sees first, then what it can count); others follow as found.
FEATURE_ORDER = ("enumeration", "arch_counters", "topdown", "lbr", "pebs", "ibs", "coexistence")


@dataclass(frozen=True)
class Column:
    host: str
    profile: str
    load: str
    accel: str

    def label(self, with_host: bool) -> str:
        return f"{self.host}: {self.profile}/{self.load}" if with_host else f"{self.profile}/{self.load}"


@dataclass(frozen=True)
class Cell:
    status: str
    reason: str
    key: str = ""


@dataclass
class Matrix:
    columns: list[Column] = field(default_factory=list)
    rows: list[tuple[str, str]] = field(default_factory=list)  # (feature, check id)
    cells: dict[tuple[int, int], Cell] = field(default_factory=dict)
    hosts: list[dict[str, Any]] = field(default_factory=list)
    runs: list[tuple[Column, dict[str, Any]]] = field(default_factory=list)

    @property
    def multi_host(self) -> bool:
        return len({c.host for c in self.columns}) > 1

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for cell in self.cells.values():
            counts[cell.status] += 1
        return counts

    def cell(self, row: int, column: int) -> Cell | None:
        return self.cells.get((row, column))

    def features(self) -> list[tuple[str, list[int]]]:
        """Row indices grouped by feature, in first-seen order."""
        groups: dict[str, list[int]] = {}
        for index, (feature, _check) in enumerate(self.rows):
            groups.setdefault(feature, []).append(index)
        return list(groups.items())


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def key_number(check: dict[str, Any]) -> str:
    """The one number worth showing in a cell: the count error in %, or the observed value(s)."""
    if check["status"] in ("skip", "error"):
        return ""
    observed, expected = check.get("observed"), check.get("expected")
    obs, exp = _number(observed), _number(expected)
    if obs is not None and exp is not None and exp:
        return f"{(obs - exp) / exp * 100:+.2f}%"
    if obs is not None:
        return f"{obs:,.0f}"
    if isinstance(observed, dict) and isinstance(observed.get("count_error_pct"), (int, float)):
        rate = (observed.get("vm_exits") or {}).get("per_s")
        return f"{observed['count_error_pct']:+.2f}%" + (f", {rate:,.0f} exits/s" if rate is not None else "")
    if isinstance(observed, dict):
        values = [v for v in (_number(x) for x in observed.values()) if v is not None]
        if values and len(values) == len(observed):
            low, high = min(values), max(values)
            return f"{low:,.0f}" if low == high else f"{low:,.0f}..{high:,.0f}"
    return ""


def host_label(document: dict[str, Any], index: int) -> str:
    host = document.get("host", {})
    return str(host.get("hostname") or host.get("cpu", {}).get("model_name") or f"host{index + 1}")


def build(documents: list[dict[str, Any]]) -> Matrix:
    """One matrix over every run of every document; duplicate host labels get a #N suffix."""
    matrix = Matrix()
    seen_labels: dict[str, int] = {}
    row_index: dict[tuple[str, str], int] = {}
    for index, document in enumerate(documents):
        label = host_label(document, index)
        seen_labels[label] = seen_labels.get(label, 0) + 1
        if seen_labels[label] > 1:
            label = f"{label} #{seen_labels[label]}"
        matrix.hosts.append({"label": label, **document.get("host", {})})
        for run in document["runs"]:
            column = Column(label, run["profile"], run["load"], run.get("accel") or "?")
            matrix.columns.append(column)
            matrix.runs.append((column, run))
            col = len(matrix.columns) - 1
            for check in run["checks"]:
                key = (check["feature"], check["id"])
                if key not in row_index:
                    row_index[key] = len(matrix.rows)
                    matrix.rows.append(key)
                matrix.cells[(row_index[key], col)] = Cell(check["status"], check["reason"] or "", key_number(check))
    order = sorted(range(len(matrix.rows)), key=lambda i: (_feature_rank(matrix.rows, i), i))
    remap = {old: new for new, old in enumerate(order)}
    matrix.rows = [matrix.rows[i] for i in order]
    matrix.cells = {(remap[r], c): cell for (r, c), cell in matrix.cells.items()}
    return matrix


def _feature_rank(rows: list[tuple[str, str]], index: int) -> int:
    """Known features in FEATURE_ORDER, then the rest in the order they first appear."""
    feature = rows[index][0]
    if feature in FEATURE_ORDER:
        return FEATURE_ORDER.index(feature) - len(FEATURE_ORDER)
    return next(i for i, (f, _check) in enumerate(rows) if f == feature)
