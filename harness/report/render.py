"""Render a feature matrix as Markdown (fits a CI job summary) and as one self-contained HTML file.

The HTML uses no scripts and no external assets: reasons are in each cell's title (hover) and in a
``<details>`` element (expand), so it reads the same in a browser, a mail client or an artifact viewer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from harness import outputs
from harness.host.kvm_offer import describe as describe_offer
from harness.judge import lifecycle as lifecycle_verdicts
from harness.judge.expectations import host_offer_notes
from harness.report import skip_summary, svg
from harness.report.matrix import SYMBOLS, Matrix

TEMPLATES = Path(__file__).parent / "templates"
MD_REASON_MAX = 300


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=jinja2.ChainableUndefined
    )


def _guest_kernels(matrix: Matrix, label: str) -> list[str]:
    kernels = {run.get("guest", {}).get("kernel_release") for column, run in matrix.runs if column.host == label}
    return sorted(k for k in kernels if k)


def _offer(host: dict[str, Any]) -> dict[str, Any]:
    """What KVM offered guests on this host and where kvm_features.toml disagrees (the run says so in its header)."""
    if "kvm_offer" not in host:
        return {"offer_summary": "not measured (results from before the KVM offer was read)", "offer_notes": []}
    return {"offer_summary": describe_offer(host["kvm_offer"], host.get("kvm_offer_reason")),
            "offer_notes": host_offer_notes(host)}  # fmt: skip


def html(matrix: Matrix) -> str:
    columns = [c.label(matrix.multi_host) for c in matrix.columns]
    groups = []
    for feature, rows in matrix.features():
        groups.append((feature, [
            {"id": matrix.rows[r][1], "cells": [matrix.cell(r, c) for c in range(len(columns))]} for r in rows
        ]))  # fmt: skip
    hosts = [{**h, "guest_kernels": _guest_kernels(matrix, h["label"]), **_offer(h)} for h in matrix.hosts]
    tables: list[dict[str, Any]] = []
    for column, run in matrix.runs:
        guest = run.get("guest") or {}
        note = guest.get("unavailable") or (guest.get("boot_error") or "").split("\n")[0] or ""
        tables.append({"column": column.label(matrix.multi_host), "cpu": guest.get("cpu", "?"),
                       "boot_s": run.get("boot_s"), "features": sorted((guest.get("features") or {}).items()),
                       "note": note})  # fmt: skip
    counts = matrix.counts()
    reasons = [{"count": g.count, "status": g.status, "reason": g.reason, "columns": g.columns_text(len(columns))}
               for g in skip_summary.matrix_groups(matrix)]  # fmt: skip
    return _environment().get_template("matrix.html.j2").render(
        total=sum(counts.values()), counts=counts, generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        hosts=hosts, columns=columns, groups=groups, feature_tables=tables, mux=_mux_sections(matrix),
        lifecycle=_lifecycle_sections(matrix), reasons=reasons,
    )  # fmt: skip


def _lifecycle_sections(matrix: Matrix) -> list[dict[str, Any]]:
    """Per run and life-cycle step: the PMU MSRs before and after it side by side, the step's numbers, and the verdicts
    of the step (``lifecycle.<step>``) and of the PMU state (``lifecycle.<step>.pmu``)."""
    sections = []
    for column, run in matrix.runs:
        checks = {c.get("id"): c for c in run.get("checks", [])}
        for check_id in lifecycle_verdicts.REPORT_COLUMNS:
            step, pmu = checks.get(check_id), checks.get(f"{check_id}.pmu")
            if step is None and pmu is None:
                continue
            measured = next((c for c in (pmu, step) if c and c.get("measurements")), None)
            table = lifecycle_verdicts.report_table(check_id, measured["measurements"] if measured else [])
            verdicts = [
                {"id": c["id"], "status": c["status"], "reason": c.get("reason") or ""} for c in (step, pmu) if c
            ]
            sections.append({"column": column.label(matrix.multi_host), "id": check_id, "verdicts": verdicts, **table})
    return sections


def _mux_sections(matrix: Matrix) -> list[dict[str, Any]]:
    """coexist.mux_cost's curves: an inline SVG (drawn in Python, harness/report/svg.py) and the numbers beside it."""
    return [{"column": s.column, "status": s.status, "reason": s.reason, "flagged": s.flagged,
             "svg": Markup(s.svg), "headers": [h for _k, h, _f in svg.COLUMNS], "table": s.table()}
            for s in svg.mux_sections(matrix)]  # fmt: skip


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(matrix: Matrix) -> str:
    counts = matrix.counts()
    # The verdict summary and the reasons first: a reader knows at once why the matrix is grey.
    lines = ["# vpmu feature matrix", "", f"**{sum(counts.values())} checks: {counts['pass']} passed, "
             f"{counts['fail']} failed, {counts['skip']} skipped, {counts['error']} errors**", ""]  # fmt: skip
    lines += skip_summary.markdown(skip_summary.matrix_groups(matrix), len(matrix.columns), _md_escape)
    for host in matrix.hosts:
        kvm = host.get("kvm", {})
        lines.append(f"- **{host['label']}**: {host.get('cpu', {}).get('model_name') or '?'}, kernel "
                     f"{host.get('kernel')}, accel {host.get('accel')}, vPMU mode {host.get('vpmu_mode') or 'none'}, "
                     f"kvm.enable_pmu={kvm.get('enable_pmu')}, QEMU {host.get('qemu', {}).get('version')}, "
                     f"guest kernel {', '.join(_guest_kernels(matrix, host['label'])) or '?'}")  # fmt: skip
        offer = _offer(host)
        lines.append(f"  - KVM offer: {_md_escape(offer['offer_summary'])}")
        lines += [f"  - **offer vs kvm_features.toml**: {_md_escape(note)}" for note in offer["offer_notes"]]
    lines.append("")
    labels = [c.label(matrix.multi_host) for c in matrix.columns]
    lines.append("| check | " + " | ".join(_md_escape(label) for label in labels) + " |")
    lines.append("|---|" + "---|" * len(labels))
    problems: list[str] = []
    for feature, rows in matrix.features():
        lines.append(f"| **{_md_escape(feature)}** |" + " |" * len(labels))
        for r in rows:
            check_id = matrix.rows[r][1]
            cells = []
            for c, label in enumerate(labels):
                cell = matrix.cell(r, c)
                if cell is None:
                    cells.append("-")
                    continue
                cells.append(SYMBOLS[cell.status] + (f" {cell.key}" if cell.key else ""))
                if cell.status in ("fail", "error"):
                    reason = cell.reason.split("\n")[0][:MD_REASON_MAX]
                    problems.append(f"- **{SYMBOLS[cell.status]}** `{check_id}` on {label}: {_md_escape(reason)}")
            lines.append(f"| `{check_id}` | " + " | ".join(cells) + " |")
    if problems:
        lines += ["", "## Failures and errors", "", *problems]
    lines += [_md_escape(line) if line.startswith("**") else line for line in svg.markdown(svg.mux_sections(matrix))]
    return "\n".join(lines) + "\n"


def write(matrix: Matrix, out: Path, option: str = "") -> tuple[Path, Path]:
    """Write ``matrix.md`` and ``matrix.html`` into ``out``, each whole or not at all (temp + rename in ``out``;
    both are rendered before either is written); return their paths.

    :raises OutputError: ``out`` cannot be created or a file cannot be written (one line naming the path).
    """
    out = Path(out)
    md_text, html_text = markdown(matrix), html(matrix)
    md_path, html_path = out / "matrix.md", out / "matrix.html"
    outputs.prepare_parent(md_path, option)
    outputs.write_text(md_path, md_text, option)
    outputs.write_text(html_path, html_text, option)
    return md_path, html_path


def compact(matrix: Matrix) -> list[str]:
    """A terminal-width matrix: one letter per cell (P, F, S, E, -), columns numbered, legend below."""
    letters = {"pass": "P", "fail": "F", "skip": "S", "error": "E"}
    width = max((len(check) for _feature, check in matrix.rows), default=5)
    header = " " * width + "  " + " ".join(f"{i + 1:>2}" for i in range(len(matrix.columns)))
    lines = [header]
    for r, (_feature, check) in enumerate(matrix.rows):
        cells = [letters[cell.status] if (cell := matrix.cell(r, c)) else "-" for c in range(len(matrix.columns))]
        lines.append(f"{check:<{width}}  " + " ".join(f"{x:>2}" for x in cells))
    for i, column in enumerate(matrix.columns):
        lines.append(f"{i + 1:>2} = {column.label(matrix.multi_host)} ({column.accel})")
    return lines
