"""coexist.mux_cost's picture: inline SVG drawn in Python (well-formed, no scripts, points where the numbers say),
the numbers beside it in matrix.html and in matrix.md, and the page rendered by headless Chromium."""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict

from harness.report import matrix, render, results, svg
from tests.helpers import chromium_render
from tests.test_coexist_depth import ANOMALOUS_CURVE, FLAT_CURVE, PERF_BASED_CURVE, mux_cost, sweep

NS = {"s": "http://www.w3.org/2000/svg"}


def mux_check(curve) -> dict:
    """A coexist.mux_cost check as results.json keeps it: the verdict harness.judge.coexist_depth.mux_cost gives."""
    verdict = mux_cost(sweep(curve))
    return {"id": "coexist.mux_cost", "feature": "coexistence", "status": verdict.status, "reason": verdict.reason,
            "expected": verdict.expected, "observed": verdict.observed, "duration_s": 12.3,
            "measurements": []}  # fmt: skip


def document(curves=(("pmu-on", PERF_BASED_CURVE), ("pmu-on-2vcpu", FLAT_CURVE))) -> dict:
    host = {"hostname": "spr-kvm", "accel": "kvm", "accel_reason": "KVM usable", "kernel": "6.20.0",
            "vpmu_mode": "perf-based", "cpu": {"model_name": "Intel Xeon", "vendor": "GenuineIntel"},
            "kvm": {"modules": ["kvm", "kvm_intel"], "enable_pmu": "Y"}, "qemu": {"version": "9.2.0"}}  # fmt: skip
    runs = []
    for profile, curve in curves:
        runs.append({"profile": profile, "load": "host-multiplexing", "accel": "kvm", "boot_s": 0.9,
                     "guest": {"cpu": "host,pmu=on"}, "checks": [mux_check(curve)]})  # fmt: skip
    return results.build(host, runs)


def chart(curve=PERF_BASED_CURVE) -> ET.Element:
    observed = mux_check(curve)["observed"]
    text = svg.mux_chart(observed["points"], "pmu-on/host-multiplexing", observed["threshold"],
                         observed["slope_exits_per_rotation"], observed["flagged"])  # fmt: skip
    return ET.fromstring(text)


def test_the_chart_is_wellformed_svg_with_a_point_per_setting_and_series():
    root = chart()
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("role") == "img"
    dots = root.findall(".//s:circle", NS)
    assert len(dots) == 4 * 3  # exits/s, irq exits/s, count error per setting
    titles = [d.find("s:title", NS).text for d in dots]
    assert "1 ms: 1,150.0 exits/s" in titles and "100 ms: 80.0 irq exits/s" in titles
    assert "1 ms: count error +0.0000 % (canary pass)" in titles
    texts = [t.text for t in root.findall(".//s:text", NS)]
    # one exit per rotation is inherent: reported, not flagged (harness.judge.coexist_depth FLAG_EXITS_PER_ROTATION)
    assert "slope 1.00 exits per rotation/s (flag above 1.5)" in texts
    flagged = [t.text for t in chart(ANOMALOUS_CURVE).findall(".//s:text", NS)]
    assert any(t.startswith("FLAGGED: slope 2.00 exits per rotation/s") for t in flagged)
    assert {"1", "4", "16", "100"} <= set(texts) and "perf_event_mux_interval_ms (log scale)" in texts


def test_points_sit_where_the_numbers_say():
    """x falls with log(interval), exits/s y rises with the value (SVG y grows downwards)."""
    line = chart().findall(".//s:polyline", NS)[0]
    points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    assert xs == sorted(xs) and ys == sorted(ys)  # 1 ms left and highest, 100 ms right and lowest
    gaps = [b - a for a, b in itertools.pairwise(xs)]
    assert abs(gaps[0] / gaps[1] - 1.0) < 0.01  # 1 -> 4 and 4 -> 16 ms are the same factor: equal steps on log x


def test_the_report_has_the_chart_and_the_table_and_markdown_the_table():
    m = matrix.build([document()])
    html = render.html(m)
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert html.count("<svg") == 2 and "Host multiplexing cost (coexist.mux_cost)" in html
    assert '<span class="flag">FLAGGED</span>' not in html and "<td>1,150</td>" in html
    md = render.markdown(m)
    assert "## Host multiplexing cost (coexist.mux_cost)" in md and "**FLAGGED**" not in md
    assert "| interval ms | rotations/s | exits/s | irq exits/s | NMIs/s | error % | host running % | canary |" in md
    assert "| 1 | 1000 | 1,150 | 575 | - | +0.0000 | 33.3 | pass |" in md
    assert "| 16 | 62.5 | 212 | 106 | - | +0.0000 | 33.4 | pass |" in md
    anomalous = matrix.build([document((("pmu-on", ANOMALOUS_CURVE),))])
    assert '<span class="flag">FLAGGED</span>' in render.html(anomalous) and "**FLAGGED**" in render.markdown(anomalous)
    sections = svg.mux_sections(m)
    assert [s.column for s in sections] == ["pmu-on/host-multiplexing", "pmu-on-2vcpu/host-multiplexing"]
    assert asdict(sections[1])["flagged"] is False


def test_runs_without_a_curve_get_no_picture():
    doc = document()
    for run in doc["runs"]:
        run["checks"][0].update(status="skip", observed=None, reason="accel: no vPMU under TCG")
    m = matrix.build([doc])
    assert "<svg" not in render.html(m) and "Host multiplexing cost" not in render.markdown(m)


def test_chart_size_stays_small():
    size = len(svg.mux_chart(mux_check(PERF_BASED_CURVE)["observed"]["points"], "pmu-on/host-multiplexing", 0.5, 1.0,
                             True).encode())  # fmt: skip
    assert 4_000 < size < 12_000, size


def test_the_page_renders_in_headless_chromium(tmp_path):
    """Chromium draws the page: the screenshot is not blank and the DOM has both charts with every point."""
    render.write(matrix.build([document()]), tmp_path)
    data, dom = chromium_render(tmp_path / "matrix.html", tmp_path, 1400)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert dom.count("<svg") == 2 and len(re.findall(r"<circle ", dom)) == 2 * 4 * 3
    assert len(re.findall(r'<table class="mux-table">', dom)) == 2
