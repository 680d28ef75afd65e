"""Parse what host ``perf`` prints: ``perf stat -x,`` CSV (with or without ``-I`` timestamps, old 5-field and
newer formats), the error text perf prints when it cannot run, and the samples in a ``perf record`` output file
while perf still writes it.

Column order per perf version is documented in shared/data/perf-stat/README.md: ``[time,]value,unit,event,
run_time,pct[,metric,metric_unit]``; ``value`` may be ``<not supported>`` or ``<not counted>``.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

NOT_COUNTED = ("<not supported>", "<not counted>")
#: perf prints an event of a hybrid host once per core PMU, as ``cpu_core/cycles:H/`` and ``cpu_atom/cycles:H/``
#: (shared/data/perf-stat/intel-hybrid_stat-a_multiplexed_csv.txt).
_HYBRID_ROW = re.compile(r"^(?:cpu_core|cpu_atom|cpu_lowpower)/(.*)/$")


def event_key(name: str) -> str:
    """A perf stat row's event as the command named it: the PMU of a hybrid row stripped."""
    hybrid = _HYBRID_ROW.match(name)
    return hybrid.group(1) if hybrid else name


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
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
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
    """Per event: status (a not-counted status sticks), the last value, the lowest running percentage seen (the
    host load's multiplexing), the largest value seen (``max_value``: whether it ever counted something) and how
    many rows counted (``counted_rows`` of ``rows``)."""
    out: dict[str, dict[str, float | str | None]] = {}
    for row in rows:
        entry = out.setdefault(row.event, {"status": row.status, "value": None, "min_pct_running": None,
                                           "max_value": None, "counted_rows": 0, "rows": 0})  # fmt: skip
        entry["rows"] = int(entry["rows"] or 0) + 1
        if row.status != "counted":
            entry["status"] = row.status
            continue
        entry["counted_rows"] = int(entry["counted_rows"] or 0) + 1
        entry["value"] = row.value
        high = entry["max_value"]
        entry["max_value"] = row.value if high is None else max(float(high), float(row.value or 0))
        if row.pct_running is not None:
            low = entry["min_pct_running"]
            entry["min_pct_running"] = row.pct_running if low is None else min(float(low), row.pct_running)
    return out


# --- perf record output ---------------------------------------------------------------------------------------

#: tools/perf/util/header.h struct perf_file_header: magic "PERFILE2", size, attr_size, attrs{offset,size},
#: data{offset,size}, event_types{offset,size}, adds_features[256 bits]: data.offset is the u64 at byte 40. perf
#: record writes this header (with the data offset) before it records, and appends records from there.
PERF_FILE_MAGIC = b"PERFILE2"
PERF_FILE_HEADER_SIZE = 104
DATA_OFFSET_AT = 40
#: include/uapi/linux/perf_event.h struct perf_event_header {u32 type; u16 misc; u16 size;} frames every record.
RECORD_HEADER = struct.Struct("<IHH")
PERF_RECORD_SAMPLE = 9
#: tools/perf/builtin-record.c __cmd_record(): "[ perf record: Captured and wrote %.3f MB %s%s%s ]" where the last
#: part is " (%" PRIu64 " samples)" when it counted any.
_CAPTURED = re.compile(r"\[ perf record: Captured and wrote [\d.]+ MB .*? \((\d+) samples\)")


def data_section_offset(head: bytes) -> int | None:
    """Where a perf.data file's records start, or None when ``head`` is no (complete) perf.data header."""
    if len(head) < DATA_OFFSET_AT + 8 or head[:8] != PERF_FILE_MAGIC:
        return None
    return struct.unpack_from("<Q", head, DATA_OFFSET_AT)[0] or None


def count_records(buf: bytes, record_type: int = PERF_RECORD_SAMPLE) -> tuple[int, int]:
    """Count ``record_type`` records in a run of perf_event_header-framed records; return (count, bytes of the
    complete records read). A record perf is still writing ends the walk; it is read next time."""
    count = pos = 0
    while pos + RECORD_HEADER.size <= len(buf):
        type_, _misc, size = RECORD_HEADER.unpack_from(buf, pos)
        if size < RECORD_HEADER.size or pos + size > len(buf):
            break
        count += type_ == record_type
        pos += size
    return count, pos


class SampleCounter:
    """PERF_RECORD_SAMPLE records in a ``perf record -o PATH`` output while perf writes it, including the files
    ``--switch-output`` rotates to ``PATH.<timestamp>``; every byte is read once (files are told apart by inode,
    since a rotation renames the file and starts a new one under PATH)."""

    #: Bytes read per file per update, so a snapshot of a huge output stays quick.
    BUDGET = 8 << 20

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.samples = 0
        self._next: dict[int, int] = {}

    def update(self) -> int:
        """Read what perf appended since the last call; return the samples seen so far."""
        for path in [self.path, *sorted(self.path.parent.glob(self.path.name + ".*"))]:
            try:
                with open(path, "rb") as f:
                    inode = os.fstat(f.fileno()).st_ino
                    start = self._next.get(inode)
                    if start is None:
                        start = data_section_offset(f.read(PERF_FILE_HEADER_SIZE))
                        if start is None:
                            continue  # header not written yet
                    f.seek(start)
                    found, used = count_records(f.read(self.BUDGET))
            except OSError:
                continue  # rotated away or not created yet
            self.samples += found
            self._next[inode] = start + used
        return self.samples


def record_samples(text: str) -> int | None:
    """The sample count perf record printed when it stopped, or None (no such line: killed, or --switch-output)."""
    found = _CAPTURED.findall(text)
    return int(found[-1]) if found else None
