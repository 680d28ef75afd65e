"""Parse what host ``perf`` prints: ``perf stat -x,`` CSV (with or without ``-I`` timestamps, old 5-field and
newer formats) and the error text perf prints when it cannot run.

Column order per perf version is documented in shared/data/perf-stat/README.md: ``[time,]value,unit,event,
run_time,pct[,metric,metric_unit]``; ``value`` may be ``<not supported>`` or ``<not counted>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NOT_COUNTED = ("<not supported>", "<not counted>")


@dataclass(frozen=True)
class StatRow:
    """One ``perf stat -x,`` row: an event's value in one interval (or the whole run)."""

    time: float | None
    cpu: str | None  # "CPU3" with -A (per-CPU rows), else None
    value: float | None  # None when <not supported>/<not counted>
    status: str  # "counted", "<not supported>" or "<not counted>"
    unit: str
    event: str
    run_time: int | None
    pct_running: float | None


def _number(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def parse_stat_csv(text: str, sep: str = ",") -> list[StatRow]:
    """Parse ``perf stat -x SEP`` output; lines that are not event rows (comments, metric-only rows) are skipped."""
    rows = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or sep not in line:
            continue
        fields = [f.strip() for f in line.split(sep)]
        time = None
        # Interval mode prefixes a timestamp: a float followed by a value field.
        if (
            len(fields) >= 5
            and re.fullmatch(r"\d+\.\d+", fields[0])
            and (fields[1] in NOT_COUNTED or _number(fields[1]) is not None or re.fullmatch(r"CPU\d+", fields[1]))
        ):
            time, fields = float(fields[0]), fields[1:]
        cpu = None
        if fields and re.fullmatch(r"CPU\d+", fields[0]):  # -A: per-CPU rows
            cpu, fields = fields[0], fields[1:]
        if len(fields) < 5:
            continue
        value_text, unit, event = fields[0], fields[1], fields[2]
        if not event or (value_text not in NOT_COUNTED and _number(value_text) is None):
            continue  # metric-only or header rows
        run_time = _number(fields[3])
        rows.append(StatRow(time, cpu, None if value_text in NOT_COUNTED else float(value_text),
                            value_text if value_text in NOT_COUNTED else "counted", unit, event,
                            int(run_time) if run_time is not None else None, _number(fields[4])))  # fmt: skip
    return rows


def error_message(text: str) -> str | None:
    """perf's own error text ("Error:" block, or a 'not supported' line), joined into one line; None if none."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line == "Error:" and i + 1 < len(lines):
            return " ".join(lines[i + 1 : i + 3])
        if line.startswith("Error:"):
            return line.removeprefix("Error:").strip()
    for line in lines:
        if re.search(r"not supported|doesn't support|Permission denied|No permission|Operation not supported", line):
            return line
    return None


def summarize(rows: list[StatRow]) -> dict[str, dict[str, float | str | None]]:
    """Per event: status, last value, and the lowest running percentage seen (the host load's multiplexing)."""
    out: dict[str, dict[str, float | str | None]] = {}
    for row in rows:
        entry = out.setdefault(row.event, {"status": row.status, "value": None, "min_pct_running": None})
        if row.status != "counted":
            entry["status"] = row.status
            continue
        entry["value"] = row.value
        if row.pct_running is not None:
            low = entry["min_pct_running"]
            entry["min_pct_running"] = row.pct_running if low is None else min(float(low), row.pct_running)
    return out
