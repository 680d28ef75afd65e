"""Pictures for the reports, drawn in Python as inline SVG: no scripts, no external assets, readable offline.

The one picture so far is coexist.mux_cost's curve: the guest's VM exits/s and the canary's count error against the
host PMU's perf_event_mux_interval_ms (log scale), one chart per run, with the numbers in a table beside it
(:func:`mux_sections` collects them from a matrix; render.py places them in matrix.html and the table in matrix.md).
Hover titles on every point give the exact values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Any

from harness.report.matrix import Matrix

MUX_CHECK = "coexist.mux_cost"
WIDTH, HEIGHT = 480, 360
LEFT, RIGHT = 70, 20
TOP_PANEL = (48, 178)  # y range (top, bottom) of the exits/s panel
ERROR_PANEL = (208, 288)  # y range of the count-error panel
EXITS_COLOUR, IRQ_COLOUR, ERROR_COLOUR, FLAG_COLOUR = "#1f4e9c", "#d9822b", "#2d7d46", "#b3261e"
#: The table's columns: (key in a curve row, header, format).
COLUMNS = (
    ("interval_ms", "interval ms", "{:,.0f}"),
    ("rotations_per_s", "rotations/s", "{:g}"),
    ("exits_per_s", "exits/s", "{:,.0f}"),
    ("irq_exits_per_s", "irq exits/s", "{:,.0f}"),
    ("nmi_injections_per_s", "NMIs/s", "{:,.1f}"),
    ("count_error_pct", "error %", "{:+.4f}"),
    ("host_running_pct", "host running %", "{:.1f}"),
    ("canary", "canary", "{}"),
)


def _num(value: float) -> str:
    """A compact axis label: 1,234 / 12.5 / 0.004."""
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.3g}"
    return f"{value:.2g}"


def _nice_max(value: float) -> float:
    """The next 1/2/5 x 10^k at or above ``value`` (an axis that ends on a round number)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value)


@dataclass(frozen=True)
class _Axis:
    low: float
    high: float
    top: float
    bottom: float

    def y(self, value: float) -> float:
        span = self.high - self.low or 1.0
        return self.bottom - (value - self.low) / span * (self.bottom - self.top)


def _x_scale(intervals: list[float]) -> Any:
    """log10 x positions, a tenth of a decade of margin on each side."""
    logs = [math.log10(v) for v in intervals]
    low, high = min(logs) - 0.1, max(logs) + 0.1
    span = high - low or 1.0
    return lambda v: LEFT + (math.log10(v) - low) / span * (WIDTH - LEFT - RIGHT)


def _polyline(points: list[tuple[float, float]], colour: str, dash: str = "") -> str:
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    style = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline fill="none" stroke="{colour}" stroke-width="2"{style} points="{coords}"/>'


def _dot(x: float, y: float, colour: str, title: str) -> str:
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}"><title>{escape(title)}</title></circle>'


def _text(x: float, y: float, text: str, anchor: str = "start", size: int = 11, colour: str = "#333") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{colour}" '
            f'font-family="DejaVu Sans, sans-serif">{escape(text)}</text>')  # fmt: skip


def _y_axis(axis: _Axis, ticks: list[float], label: str) -> list[str]:
    parts = [f'<line x1="{LEFT}" y1="{axis.top}" x2="{LEFT}" y2="{axis.bottom}" stroke="#888"/>']
    for tick in ticks:
        y = axis.y(tick)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#e3e6ea"/>')
        parts.append(_text(LEFT - 6, y + 4, _num(tick), "end", 10))
    middle = (axis.top + axis.bottom) / 2
    parts.append(f'<text x="14" y="{middle:.1f}" font-size="11" text-anchor="middle" fill="#333" '
                 f'font-family="DejaVu Sans, sans-serif" transform="rotate(-90 14 {middle:.1f})">'
                 f"{escape(label)}</text>")  # fmt: skip
    return parts


def mux_chart(rows: list[dict[str, Any]], title: str, threshold: float | None = None, slope: float | None = None,
              flagged: bool = False) -> str:  # fmt: skip
    """One run's sweep as an SVG: exits/s (and irq exits/s) on top, the canary's count error (%) below, both against
    the mux interval in ms on a log axis. ``rows``: harness.judge.mux_curve.curve() rows with ``count_error_pct``."""
    rows = sorted((r for r in rows if r.get("interval_ms")), key=lambda r: r["interval_ms"])
    label = f"{title}: VM exits and count error vs perf_event_mux_interval_ms"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(label)}">',
             f"<title>{escape(label)}</title>", f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>',
             _text(LEFT, 18, title, size=13, colour="#1b1f23")]  # fmt: skip
    if not rows:
        parts += [_text(WIDTH / 2, HEIGHT / 2, "no measurement", "middle"), "</svg>"]
        return "".join(parts)
    x = _x_scale([r["interval_ms"] for r in rows])
    if slope is not None:
        verdict = f"slope {slope:.2f} exits per rotation/s" + (f" (flag above {threshold})" if threshold else "")
        parts.append(_text(LEFT, 36, ("FLAGGED: " if flagged else "") + verdict, size=11,
                           colour=FLAG_COLOUR if flagged else "#555"))  # fmt: skip
    # exits/s panel
    values = [r.get(k) for r in rows for k in ("exits_per_s", "irq_exits_per_s") if r.get(k) is not None]
    top = _Axis(0.0, _nice_max(max(values, default=0.0) * 1.05), *TOP_PANEL)
    parts += _y_axis(top, [top.high * i / 4 for i in range(5)], "VM exits/s")
    for key, colour, dash, name in (("exits_per_s", EXITS_COLOUR, "", "exits/s"),
                                    ("irq_exits_per_s", IRQ_COLOUR, "5,3", "irq exits/s")):  # fmt: skip
        points = [(x(r["interval_ms"]), top.y(r[key]), r) for r in rows if r.get(key) is not None]
        if len(points) > 1:
            parts.append(_polyline([(px, py) for px, py, _r in points], colour, dash))
        parts += [_dot(px, py, colour, f"{r['interval_ms']} ms: {r[key]:,.1f} {name}") for px, py, r in points]
    # count error panel
    errors = [abs(r["count_error_pct"]) for r in rows if r.get("count_error_pct") is not None]
    bound = _nice_max(max(errors, default=0.0) * 1.2) if any(errors) else 0.01
    low = _Axis(-bound, bound, *ERROR_PANEL)
    parts += _y_axis(low, [-bound, 0.0, bound], "count error %")
    measured = [r for r in rows if r.get("count_error_pct") is not None]
    points = [(x(r["interval_ms"]), low.y(r["count_error_pct"]), r) for r in measured]
    if len(points) > 1:
        parts.append(_polyline([(px, py) for px, py, _r in points], ERROR_COLOUR))
    for px, py, r in points:
        colour = ERROR_COLOUR if r.get("canary") in (None, "pass") else FLAG_COLOUR
        parts.append(_dot(px, py, colour, f"{r['interval_ms']} ms: count error {r['count_error_pct']:+.4f} % "
                                          f"(canary {r.get('canary', '?')})"))  # fmt: skip
    # x axis: a tick per setting
    base = ERROR_PANEL[1]
    parts.append(f'<line x1="{LEFT}" y1="{base}" x2="{WIDTH - RIGHT}" y2="{base}" stroke="#888"/>')
    for r in rows:
        px = x(r["interval_ms"])
        parts.append(f'<line x1="{px:.1f}" y1="{TOP_PANEL[0]}" x2="{px:.1f}" y2="{base + 4}" stroke="#f0f0f0"/>')
        parts.append(_text(px, base + 16, _num(r["interval_ms"]), "middle", 10))
    parts.append(_text((LEFT + WIDTH - RIGHT) / 2, base + 34, "perf_event_mux_interval_ms (log scale)", "middle"))
    legend_y = HEIGHT - 8
    for offset, colour, dash, name in ((0, EXITS_COLOUR, "", "exits/s"), (80, IRQ_COLOUR, "5,3", "irq exits/s"),
                                       (180, ERROR_COLOUR, "", "count error %")):  # fmt: skip
        parts.append(_polyline([(LEFT + offset, legend_y - 4), (LEFT + offset + 18, legend_y - 4)], colour, dash))
        parts.append(_text(LEFT + offset + 22, legend_y, name, size=10))
    parts.append("</svg>")
    return "".join(parts)


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    """One table cell's text ("-" where the run has no such number)."""
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


@dataclass
class MuxSection:
    """One run's sweep for the reports: its chart, its table rows and the check's verdict."""

    column: str
    status: str
    reason: str
    rows: list[dict[str, Any]]
    svg: str
    flagged: bool

    def table(self) -> list[list[str]]:
        return [[cell(row, key, fmt) for key, _header, fmt in COLUMNS] for row in self.rows]


def mux_sections(matrix: Matrix) -> list[MuxSection]:
    """Every run of the matrix whose coexist.mux_cost check measured a curve (observed ``points``)."""
    sections = []
    for column, run in matrix.runs:
        check = next((c for c in run.get("checks", []) if c.get("id") == MUX_CHECK), None)
        observed = (check or {}).get("observed")
        if not isinstance(observed, dict) or not observed.get("points"):
            continue
        label = column.label(matrix.multi_host)
        rows = observed["points"]
        svg = mux_chart(rows, label, observed.get("threshold"), observed.get("slope_exits_per_rotation"),
                        bool(observed.get("flagged")))  # fmt: skip
        sections.append(MuxSection(label, check["status"], check.get("reason") or "", rows, svg,
                                   bool(observed.get("flagged"))))  # fmt: skip
    return sections


def markdown(sections: list[MuxSection]) -> list[str]:
    """The sweep tables for matrix.md (the chart stays in matrix.html)."""
    if not sections:
        return []
    lines = ["", "## Host multiplexing cost (coexist.mux_cost)", "",
             "vCPU 0's KVM statistics per second over a busy window at each host perf_event_mux_interval_ms, and the "
             "exact-count canary's error; the chart is in matrix.html."]  # fmt: skip
    for section in sections:
        flag = " **FLAGGED**" if section.flagged else ""
        lines += ["", f"**{section.column}**: {section.status.upper()}{flag}: {section.reason.splitlines()[0]}", ""]
        lines.append("| " + " | ".join(header for _key, header, _fmt in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        lines += ["| " + " | ".join(row) + " |" for row in section.table()]
    return lines
