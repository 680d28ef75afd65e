"""Parsing host perf output: the real recorded samples in shared/data/perf-stat and output captured here."""

from __future__ import annotations

import struct

import pytest

from harness.host.perf_output import (
    PERF_FILE_MAGIC,
    SampleCounter,
    count_records,
    data_section_offset,
    error_message,
    parse_stat_csv,
    record_samples,
    summarize,
)
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


def test_summary_says_whether_an_event_ever_counted():
    """``max_value``/``counted_rows``: an event multiplexed out in one interval and counted in the next did
    count; the sticky status still shows that it once read ``<not counted>``."""
    text = (
        "     0.500604439,<not counted>,,cycles:H,0,0.00,,\n"
        "     1.001515384,1834521,,cycles:H,250000000,50.00,,\n"
        "     1.001515384,0,,cache-misses:H,500000000,100.00,,\n"
    )
    summary = summarize(parse_stat_csv(text))
    assert summary["cycles:H"]["status"] == "<not counted>" and summary["cycles:H"]["max_value"] == 1834521.0
    assert (summary["cycles:H"]["counted_rows"], summary["cycles:H"]["rows"]) == (1, 2)
    assert summary["cache-misses:H"]["max_value"] == 0.0 and summary["cache-misses:H"]["counted_rows"] == 1


def perf_data(records: list[tuple[int, int]], data_offset: int = 424) -> bytes:
    """A perf.data prefix as perf record writes it before recording: struct perf_file_header (104 bytes, data
    offset at byte 40), padding up to the data section, then perf_event_header-framed records (type, size)."""
    header = bytearray(data_offset)
    header[:8] = PERF_FILE_MAGIC
    struct.pack_into("<QQ", header, 8, 104, 136)
    struct.pack_into("<QQ", header, 40, data_offset, 0)
    body = b"".join(struct.pack("<IHH", kind, 0, size) + bytes(size - 8) for kind, size in records)
    return bytes(header) + body


def test_samples_are_counted_while_perf_writes_and_across_rotations(tmp_path):
    """PERF_RECORD_SAMPLE (9) among COMM (3), MMAP2 (10) and FINISHED_ROUND (68) records; a record cut off at
    the end is read once it is complete; a --switch-output rotation (rename + new file) is neither lost nor
    counted twice."""
    path = tmp_path / "host-sampling.data"
    data = perf_data([(3, 40), (10, 96), (9, 48), (9, 48), (68, 8)])
    path.write_bytes(data + struct.pack("<IHH", 9, 0, 48) + bytes(10))  # a sample perf is still writing
    counter = SampleCounter(path)
    assert counter.update() == 2
    path.write_bytes(data + struct.pack("<IHH", 9, 0, 48) + bytes(40))
    assert counter.update() == 3
    path.rename(tmp_path / "host-sampling.data.2026120111232076")
    path.write_bytes(perf_data([(9, 56)]))
    assert counter.update() == 4
    assert counter.update() == 4


def test_no_header_yet_and_the_captured_line():
    assert data_section_offset(b"") is None and data_section_offset(b"PERFILE2" + bytes(100)) is None
    assert count_records(struct.pack("<IHH", 9, 0, 4)) == (0, 0)  # a size below the header's is no record
    # printed by perf 6.1.192 here on SIGINT (tools/perf/builtin-record.c __cmd_record)
    done = "[ perf record: Woken up 7 times to write data ]\n" \
        "[ perf record: Captured and wrote 0.120 MB /tmp/coexist_x.data (1199 samples) ]\n"  # fmt: skip
    assert record_samples(done) == 1199
    assert record_samples("[ perf record: Captured and wrote 0.097 MB /tmp/s.data.<timestamp> ]\n") is None
