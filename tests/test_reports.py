"""Reports: render, merge and diff over results of a real run here plus hand-made ones covering fail/error/skip;
the HTML is opened in headless Chromium; malformed results are one-line errors."""

from __future__ import annotations

import copy
import json

import pytest

from harness.report import diff, matrix, render, results
from tests.helpers import assert_one_line_error, chromium_render, run_cli


def check(check_id, status, feature="arch_counters", reason="", expected=None, observed=None):
    return {"id": check_id, "feature": feature, "status": status, "reason": reason, "expected": expected,
            "observed": observed, "duration_s": 0.1, "measurements": []}  # fmt: skip


def document(hostname="hostA", statuses=("pass", "fail", "skip", "error")):
    checks = [
        check("enum.pmu_visible", statuses[0], "enumeration", "guest CPUID and kernel show the vPMU"),
        check("arch.gp.instructions", statuses[1], reason="GP3: instructions 10,000,001 outside [10,000,000, ...]",
              expected=10_000_000, observed=10_000_001),
        check("arch.fixed.3", statuses[2], reason="not-enumerated: fixed counter 3"),
        check("arch.rdpmc", statuses[3], reason="probe counters: killed by signal 11\\n--- serial log (tail) ---"),
    ]  # fmt: skip
    host = {"hostname": hostname, "accel": "kvm", "accel_reason": "KVM usable", "kernel": "6.12.0",
            "vpmu_mode": "perf-based", "cpu": {"model_name": "Intel Xeon", "vendor": "GenuineIntel",
            "microcode": "0x2b000590"}, "kvm": {"modules": ["kvm", "kvm_intel"], "enable_pmu": "Y",
            "enable_mediated_pmu": None}, "qemu": {"version": "9.2.0"}}  # fmt: skip
    run = {"profile": "pmu-on", "load": "idle", "accel": "kvm", "boot_s": 0.8,
           "guest": {"cpu": "host,pmu=on", "kernel_release": "6.1.0-56-cloud-amd64",
                     "features": {"pmu": {"requested": True, "qemu_expansion": True, "granted": True, "seen": True}}},
           "checks": checks}  # fmt: skip
    return results.build(host, [run])


def write(tmp_path, name, doc):
    path = tmp_path / name
    results.write(path, doc)
    return path


def test_markdown_lists_failures_and_errors():
    md = render.markdown(matrix.build([document()]))
    assert "| `arch.gp.instructions` | FAIL +0.00% |" in md
    assert "**4 checks: 1 passed, 1 failed, 1 skipped, 1 errors**" in md
    assert "## Failures and errors" in md and "**ERROR** `arch.rdpmc` on pmu-on/idle" in md
    assert md.index("**enumeration**") < md.index("**arch_counters**")


def test_key_number_is_the_count_error():
    assert matrix.key_number(check("x", "fail", expected=10_000_000, observed=10_100_000)) == "+1.00%"
    assert matrix.key_number(check("x", "pass", observed={"gp0": 5, "gp1": 7})) == "5..7"
    assert matrix.key_number(check("x", "skip", expected=1, observed=2)) == ""


def test_html_is_self_contained():
    html = render.html(matrix.build([document()]))
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert 'class="fail" title="GP3: instructions 10,000,001' in html
    assert "<details><summary>reason</summary>" in html
    assert "Requested / granted / seen" in html


def test_render_a_real_run(suite_run, tmp_path):
    _proc, out = suite_run
    cli = run_cli("report", "render", str(out / "results.json"), "--out", str(tmp_path))
    assert cli.returncode == 0, cli.stderr
    md = (tmp_path / "matrix.md").read_text()
    runs = results.load(out / "results.json")["runs"]
    assert "| `enum.pmu_visible` | " + " | ".join(["PASS"] * len(runs)) + " |" in md
    assert "pmu-off/idle" in md and "pmu-on/idle" in md


def test_pytest_summary_ends_with_the_matrix_and_report_paths(suite_run):
    proc, out = suite_run
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "vpmu matrix" in line)
    columns = len(results.load(out / "results.json")["runs"])
    assert lines[start + 1].split() == [str(i + 1) for i in range(columns)]
    assert any(line.startswith("enum.pmu_visible") and line.split()[1:] == ["P"] * columns for line in lines[start:])
    assert f"reports: {out / 'results.json'} {out / 'matrix.md'} {out / 'matrix.html'}" in proc.stdout
    assert (out / "matrix.md").exists() and (out / "matrix.html").exists()


def test_merge_makes_a_column_per_host(suite_run, tmp_path):
    a = write(tmp_path, "a.json", document("hostA"))
    b = write(tmp_path, "b.json", document("hostB", ("pass", "pass", "skip", "pass")))
    real = suite_run[1] / "results.json"
    cli = run_cli("report", "merge", str(a), str(b), str(real), "--out", str(tmp_path / "m"))
    assert cli.returncode == 0, cli.stderr
    md = (tmp_path / "m" / "matrix.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| check |"))
    real_doc = results.load(real)
    host = real_doc["host"]["hostname"]
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    assert columns == ["hostA: pmu-on/idle", "hostB: pmu-on/idle",
                       *[f"{host}: {r['profile']}/{r['load']}" for r in real_doc["runs"]]]  # fmt: skip


def test_merge_refuses_conflicting_schemas(tmp_path):
    a = write(tmp_path, "a.json", document())
    other = document()
    other["schema"] = "vpmu-results/1"  # an old file: still readable alone, but not mixed with /2
    b = tmp_path / "b.json"
    b.write_text(json.dumps(other))
    proc = run_cli("report", "merge", str(a), str(b), "--out", str(tmp_path / "m"))
    assert_one_line_error(proc, "schema versions conflict", "vpmu-results/1")


def test_diff_reports_regressions_and_exits_1(tmp_path):
    old = document(statuses=("pass", "pass", "pass", "skip"))
    new = copy.deepcopy(old)
    checks = new["runs"][0]["checks"]
    checks[1]["status"], checks[1]["reason"] = "fail", "GP3: instructions off by one"
    checks[2]["status"] = "skip"
    checks[3]["status"] = "pass"
    del checks[0]
    changes = diff.compare(old, new)
    assert [c.label() for c in changes.regressions] == ["arch.gp.instructions [pmu-on/idle]"]
    assert [c.key[2] for c in changes.newly_skipped] == ["arch.fixed.3"]
    assert [c.key[2] for c in changes.newly_passing] == ["arch.rdpmc"]
    assert [c.key[2] for c in changes.vanished] == ["enum.pmu_visible"]
    proc = run_cli("report", "diff", str(write(tmp_path, "old.json", old)), str(write(tmp_path, "new.json", new)))
    assert proc.returncode == 1 and "Regressions (pass -> fail/error): 1" in proc.stdout
    md = run_cli("report", "diff", "--md", str(tmp_path / "old.json"), str(tmp_path / "new.json")).stdout
    assert "### Regressions (pass -> fail/error) (1)" in md and "off by one" in md


def test_diff_without_regressions_exits_0(tmp_path):
    doc = write(tmp_path, "a.json", document())
    proc = run_cli("report", "diff", str(doc), str(doc))
    assert proc.returncode == 0 and "regressions: 0" in proc.stdout


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"schema": "vpmu-results/1", "host": {}, "runs": [{"profile": "p"', "not valid JSON (truncated?)"),
        ('{"schema": "other"}', "schema is 'other'"),
        ('{"schema": "vpmu-results/1", "host": {}}', "missing field 'runs'"),
        (
            '{"schema": "vpmu-results/1", "host": {}, "runs": [{"profile": "p", "load": "idle", "accel": "tcg", '
            '"boot_s": 1, "guest": {}, "checks": [{"id": "x"}]}]}',
            "runs[0].checks[0]: missing field 'feature'",
        ),
    ],
)
def test_malformed_results_are_one_line_errors(tmp_path, content, fragment):
    path = tmp_path / "results.json"
    path.write_text(content)
    for args in (["render", str(path), "--out", str(tmp_path)], ["diff", str(path), str(path)],
                 ["merge", str(path), "--out", str(tmp_path)]):  # fmt: skip
        assert_one_line_error(run_cli("report", *args), str(path), fragment)


def test_html_renders_in_headless_chromium(suite_run, tmp_path):
    """Open the real run's matrix in Chromium: the screenshot is not empty and every matrix cell is in the DOM."""
    data, dom = chromium_render(suite_run[1] / "matrix.html", tmp_path, 1600)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a blank page is a few KB
    document_ = results.load(suite_run[1] / "results.json")
    cells = sum(len(run["checks"]) for run in document_["runs"])
    matrix_html = dom[dom.index('<table id="matrix">') : dom.index("</table>", dom.index('<table id="matrix">'))]
    assert matrix_html.count('<td class="') == cells
    assert "enum.pmu_visible" in matrix_html
