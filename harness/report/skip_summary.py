"""Why a matrix is grey, in a few lines: the distinct SKIP and ERROR reasons with their counts and the columns they hit.

A TCG run SKIPs about a thousand cells for one reason ("accel: no vPMU under TCG ..."); a reader should see that
reason once, with its count, at the top of matrix.md and matrix.html and under the pytest summary, instead of
opening a thousand expanders. Reasons are grouped by their first line, exactly as written (no pattern folding:
two reasons that differ by a number are two facts).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from harness.report.matrix import SYMBOLS, Matrix

#: Statuses whose reasons are summarised (a FAIL's reason is listed in full under "Failures and errors").
GROUPED = ("error", "skip")
#: Groups shown in full; the rest are counted in one line.
MAX_GROUPS = 25
#: Column labels shown per group before "+N more".
MAX_COLUMNS = 6
#: A reason longer than this is cut in Markdown (the HTML and the terminal show it whole).
REASON_MAX = 300


@dataclass
class ReasonGroup:
    """One distinct reason of one status: how many cells, which columns, which checks."""

    status: str
    reason: str
    count: int = 0
    columns: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def columns_text(self, total_columns: int) -> str:
        if total_columns > 1 and len(self.columns) == total_columns:
            return f"all {total_columns} columns"
        shown = ", ".join(self.columns[:MAX_COLUMNS])
        more = len(self.columns) - MAX_COLUMNS
        return shown + (f" (+{more} more)" if more > 0 else "")

    def line(self, total_columns: int) -> str:
        """``46 x SKIP accel: no vPMU under TCG ... [pmu-off/idle, pmu-on/idle]``."""
        return f"{self.count} x {SYMBOLS[self.status]} {self.reason} [{self.columns_text(total_columns)}]"


def first_line(reason: str) -> str:
    return (reason or "").strip().split("\n")[0].strip() or "(no reason given)"


def group(cells: Iterable[tuple[str, str, str, str]]) -> list[ReasonGroup]:
    """Group ``(column label, check id, status, reason)`` cells: ERROR groups first, then by count, largest first."""
    groups: dict[tuple[str, str], ReasonGroup] = {}
    for column, check_id, status, reason in cells:
        if status not in GROUPED:
            continue
        key = (status, first_line(reason))
        entry = groups.setdefault(key, ReasonGroup(*key))
        entry.count += 1
        if column not in entry.columns:
            entry.columns.append(column)
        if check_id not in entry.checks:
            entry.checks.append(check_id)
    return sorted(groups.values(), key=lambda g: (GROUPED.index(g.status), -g.count, g.reason))


def matrix_groups(matrix: Matrix) -> list[ReasonGroup]:
    """The reason groups of a matrix, columns in the matrix's order."""
    labels = [c.label(matrix.multi_host) for c in matrix.columns]
    cells = sorted(matrix.cells.items(), key=lambda item: (item[0][1], item[0][0]))
    return group((labels[c], matrix.rows[r][1], cell.status, cell.reason) for (r, c), cell in cells)


def lines(groups: list[ReasonGroup], total_columns: int) -> list[str]:
    """Plain text lines (the pytest summary), the first MAX_GROUPS groups and a line counting the rest."""
    out = [g.line(total_columns) for g in groups[:MAX_GROUPS]]
    rest = groups[MAX_GROUPS:]
    if rest:
        out.append(f"... {len(rest)} more reasons ({sum(g.count for g in rest)} cells): see matrix.md")
    return out


def markdown(groups: list[ReasonGroup], total_columns: int, escape=lambda text: text) -> list[str]:
    """A Markdown table: count, status, reason, columns (``escape`` makes a cell safe for a table)."""
    if not groups:
        return []
    out = ["## Why checks did not run: SKIP and ERROR reasons", "", "| cells | status | reason | columns |",
           "|---:|---|---|---|"]  # fmt: skip
    for g in groups[:MAX_GROUPS]:
        reason = g.reason if len(g.reason) <= REASON_MAX else g.reason[: REASON_MAX - 3] + "..."
        out.append(f"| {g.count} | {SYMBOLS[g.status]} | {escape(reason)} | {escape(g.columns_text(total_columns))} |")
    rest = groups[MAX_GROUPS:]
    if rest:
        out.append(f"| {sum(g.count for g in rest)} | | {len(rest)} more reasons (see the matrix) | |")
    return [*out, ""]
