"""Why the matrix is grey, at a glance: SKIP and ERROR reasons grouped with counts and columns at the top of
matrix.md and matrix.html, under the pytest summary, and each reason as the JUnit skip message."""

from __future__ import annotations

import collections
import copy
import xml.etree.ElementTree as ET

import pytest

from harness.report import matrix, render, results, skip_summary
from tests.test_reports import check, document

TCG = "accel: no vPMU under TCG (QEMU fills the PMU CPUID leaves only from KVM)"


def two_columns() -> dict:
    doc = document()
    run = doc["runs"][0]
    run["checks"] += [check(f"arch.gp.e{i}", "skip", reason=TCG) for i in range(5)]
    run["checks"].append(check("lbr.records", "skip", "lbr", "kvm-limit: a | pipe\nand a second line"))
    other = copy.deepcopy(run)
    other["profile"] = "pmu-off"
    other["checks"] = [c for c in other["checks"] if c["reason"] == TCG]
    doc["runs"].append(other)
    return doc


def test_groups_count_cells_and_name_columns():
    groups = skip_summary.matrix_groups(matrix.build([two_columns()]))
    assert [(g.status, g.count) for g in groups] == [("error", 1), ("skip", 10), ("skip", 1), ("skip", 1)]
    tcg = groups[1]
    assert tcg.reason == TCG and tcg.columns == ["pmu-on/idle", "pmu-off/idle"] and len(tcg.checks) == 5
    assert tcg.line(2) == f"10 x SKIP {TCG} [all 2 columns]"
    assert groups[2].reason == "kvm-limit: a | pipe"  # first line only
    assert groups[3].columns_text(2) == "pmu-on/idle"


def test_markdown_opens_with_the_summary_and_the_reasons():
    md = render.markdown(matrix.build([two_columns()]))
    lines = md.splitlines()
    assert lines[:3] == ["# vpmu feature matrix", "", "**15 checks: 1 passed, 1 failed, 12 skipped, 1 errors**"]
    table = md.index("## Why checks did not run: SKIP and ERROR reasons")
    assert table < md.index("- **hostA**") < md.index("| check |")
    assert f"| 10 | SKIP | {TCG} | all 2 columns |" in md
    assert "| 1 | SKIP | kvm-limit: a \\| pipe | pmu-on/idle |" in md
    assert md.index("| 1 | ERROR |") < md.index("| 10 | SKIP |")


def test_html_opens_with_the_reasons():
    html = render.html(matrix.build([two_columns()]))
    assert html.index('<table id="reasons">') < html.index("<h2>Hosts</h2>")
    assert f'<td>10</td><td class="skip">SKIP</td><td>{TCG}</td><td>all 2 columns</td>' in html


def test_many_reasons_are_cut_with_a_count():
    cells = [("c", f"x.{i}", "skip", f"reason {i}") for i in range(skip_summary.MAX_GROUPS + 3)]
    text = skip_summary.lines(skip_summary.group(cells), 1)
    assert len(text) == skip_summary.MAX_GROUPS + 1
    assert text[-1] == "... 3 more reasons (3 cells): see matrix.md"
    assert not skip_summary.group([("c", "x", "pass", "fine")])


@pytest.mark.integration
def test_real_run_prints_the_grouped_reasons_and_junit_carries_them(suite_run):
    proc, out = suite_run
    document = results.load(out / "results.json")
    reasons = collections.Counter(c["reason"] for run in document["runs"] for c in run["checks"]
                                  if c["status"] == "skip")  # fmt: skip
    after_title = proc.stdout.split("vpmu SKIP and ERROR reasons", 1)[1].split("\n", 1)[1]
    section = after_title.split("=====", 1)[0]
    top, count = next(iter(sorted(reasons.items(), key=lambda kv: -kv[1])))
    assert f"{count} x SKIP {top.splitlines()[0]} [" in section, section[:2000]
    # JUnit: every skipped testcase's message is its check's reason in results.json, word for word
    messages = collections.Counter(
        node.get("message") for node in ET.parse(out / "junit.xml").getroot().iter("skipped")
    )
    assert messages == reasons
