"""Parsing host perf output: the real recorded samples in shared/data/perf-stat and output captured here."""

from __future__ import annotations

import pytest

from harness.perf_output import error_message, parse_stat_csv, summarize
from tests.helpers import SHARED_DATA, TEST_DATA

PERF = SHARED_DATA / "perf-stat"


def rows(name: str, sep: str = ","):
    return parse_stat_csv((PERF / name).read_text(), sep)


def test_interval_csv_with_summary():
    parsed = rows("intel-kbl_csv_interval_I1000_with-summary.txt")
    first = parsed[0]
    assert (first.time, first.value, first.unit, first.event) == (1.001323097, 8013.48, "msec", "cpu-clock")
    assert first.run_time == 8013483384 and first.pct_running == 100.0
    # the summary rows carry no timestamp in this perf version
    assert any(r.time is None and r.event == "instructions" for r in parsed)


def test_multiplexed_hybrid_csv():
    summary = summarize(rows("intel-hybrid_stat-a_multiplexed_csv.txt"))
    shares = {e: v["min_pct_running"] for e, v in summary.items()}
    assert min(s for s in shares.values() if s is not None) == 54.0  # the atom rows ran 54 % of the time


def test_not_counted_rows():
    parsed = rows("intel-icl_csv_not-counted_group-vs-pinned-D-background.txt")
    assert parsed and all(r.status == "<not counted>" and r.value is None for r in parsed)
    assert {r.event for r in parsed} >= {"slots", "cycles"}


def test_old_five_field_format_with_not_supported():
    parsed = rows("virtualbox-guest_csv_not-supported_old-format.txt")
    statuses = {r.event: r.status for r in parsed}
    assert statuses["task-clock"] == "counted" and statuses["cycles"] == "<not supported>"


def test_per_cpu_apostrophe_separator():
    parsed = rows("intel-clx_csv_per-cpu_A_interval_apostrophe-sep.txt", "'")
    assert parsed[0].cpu == "CPU30" and parsed[0].event == "cpu-migrations" and parsed[0].value == 1.0


def test_captured_here_software_events():
    parsed = parse_stat_csv((TEST_DATA / "perf-stat_x-I500_sw-events_pvm-host.txt").read_text())
    assert {r.event for r in parsed} == {"cpu-clock", "task-clock", "context-switches"}
    assert all(r.status == "counted" and r.time is not None for r in parsed)


def test_captured_here_hardware_not_supported():
    summary = summarize(parse_stat_csv((TEST_DATA / "perf-stat_x-I500_hw-not-supported_pvm-host.txt").read_text()))
    assert summary["cycles:GH"]["status"] == "<not supported>"
    assert summary["instructions:H"]["status"] == "<not supported>"


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("error_ebusy_stat-e-cycles.txt", "returned with 16 (Device or resource busy)"),
        ("error_enxio_aws-vm_ocr-event.txt", "returned with 6 (No such device or address)"),
        ("record_error_no-sampling_x86-kvm-guest.txt", "PMU Hardware doesn't support sampling"),
        ("error_permission_paranoid2.txt", "ccess to performance monitoring"),
    ],
)
def test_error_messages(name, fragment):
    message = error_message((PERF / name).read_text())
    assert message is not None and fragment in message and "\n" not in message
