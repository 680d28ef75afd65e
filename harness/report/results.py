"""results.json: the record of a run that reports, merges, diffs and rejudge read (schema ``vpmu-results/2``).

``{"schema", "host": {doctor facts}, "runs": [{"profile", "load", "accel", "boot_s", "guest": {...},
"checks": [{"id", "feature", "status", "reason", "expected", "observed", "duration_s", "measurements"}]}]}``
``measurements`` keeps the raw probe records a verdict was made from.

Schema /2 adds, per run, everything ``python -m harness rejudge`` needs to decide every check again with today's
rules (harness/suite/replay.py): ``profile_def`` (the profile's table), ``probes`` ({memo key: {"name", "records",
"error", "duration_s"}} for every probe run under that load, and the enum probe), ``guest.view.records`` (with
``kernel_pmus``, ``kernel_banner`` and ``sysfs``: the guest view's inputs), ``branch_maps`` (objdump of the LBR
probe binary, by probe memo key) and ``load_inputs`` (the host load as the co-existence checks read it: its spec,
VM exits before and during the group, the running summary and state at that moment). A rejudged document marks
each check ``rejudged`` (true, with ``previous`` when the verdict changed; false with ``rejudge_reason``). Absent
keys mean "not stored". Schema /1 files still load for render, merge and diff; mixing /1 and /2 in one merge is
an error.

Each run also says which of its logs are not complete: ``logs_incomplete`` = ``[{"path", "reason"}]`` (``[]`` when
all are; absent in older files). serial.log reports its own failed write (``serial console: No space left on device
(ENOSPC) after N bytes; ...``); qemu.log and the host-load output, written by QEMU and perf themselves, are listed
as possibly cut when their directory cannot take more data at the end of the run (harness.outputs).
The file itself is written whole or not at all (temp + rename in its directory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import outputs
from harness.errors import UsageError
from harness.judge.verdict import STATUSES

SCHEMA_V1 = "vpmu-results/1"
SCHEMA = "vpmu-results/2"
#: Schemas this code reads (it writes only SCHEMA).
SCHEMAS = (SCHEMA_V1, SCHEMA)
CHECK_KEYS = ("id", "feature", "status", "reason", "expected", "observed", "duration_s", "measurements")
RUN_KEYS = ("profile", "load", "accel", "boot_s", "guest", "checks")


@dataclass
class CheckResult:
    """One check of one run."""

    id: str
    feature: str
    status: str
    reason: str
    expected: Any = None
    observed: Any = None
    duration_s: float = 0.0
    measurements: list[dict[str, Any]] = field(default_factory=list)
    #: Keys beyond CHECK_KEYS: rejudge's ``rejudged`` / ``rejudge_reason`` / ``previous``.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**{key: getattr(self, key) for key in CHECK_KEYS}, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckResult:
        """A stored check (the keys of CHECK_KEYS; the rest goes to ``extra``)."""
        return cls(**{k: data[k] for k in CHECK_KEYS}, extra={k: v for k, v in data.items() if k not in CHECK_KEYS})


def build(host: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schema": SCHEMA, "host": host, "runs": runs}


def write(path: Path, document: dict[str, Any], option: str = "") -> None:
    """Write atomically: a reader, or a run killed half-way, sees the previous file or this one, never half of it.

    The document is serialised before the file is opened (a value JSON cannot hold fails before anything is
    written); the temporary file is removed on any failure (harness.outputs).

    :raises OutputError: the directory cannot be created or the file cannot be written (one line naming the path).
    """
    path = Path(path)
    text = json.dumps(document, indent=1, default=str) + "\n"
    outputs.prepare_parent(path, option)
    outputs.write_text(path, text, option)


def load_many(paths: list[Path]) -> list[dict[str, Any]]:
    """Load several results files; differing schema versions are one clear error naming both files."""
    schemas: dict[str, Path] = {}
    for path in paths:
        try:
            schema = json.loads(Path(path).read_text()).get("schema")
        except (OSError, ValueError, AttributeError):
            continue  # load() below reports it precisely
        schemas.setdefault(str(schema), path)
    if len(schemas) > 1:
        (a, path_a), (b, path_b) = list(schemas.items())[:2]
        raise UsageError(f"cannot merge: schema versions conflict ({path_a}: {a!r}, {path_b}: {b!r})")
    return [load(path) for path in paths]


def load(path: Path) -> dict[str, Any]:
    """Read and validate a results file.

    :raises UsageError: unreadable, not JSON (e.g. truncated), wrong schema or missing fields; one line.
    """
    try:
        document = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read results: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON (truncated?): {exc.msg} at line {exc.lineno}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not a results file (not UTF-8 text at byte {exc.start})") from None
    validate(document, str(path))
    return document


def validate(document: Any, where: str) -> None:
    """Check the structure render, merge, diff and rejudge rely on: every level of the right JSON type, every
    required field present, statuses known.

    :raises UsageError: one line naming the file and the first bad field (``runs[0].checks[3]: ...``).
    """
    if not isinstance(document, dict):
        raise UsageError(f"{where}: results must be a JSON object")
    if document.get("schema") not in SCHEMAS:
        raise UsageError(f"{where}: schema is {document.get('schema')!r}, expected {SCHEMA!r} (or {SCHEMA_V1!r}): "
                         "not a vpmu results file?")  # fmt: skip
    for key in ("host", "runs"):
        if key not in document:
            raise UsageError(f"{where}: missing field '{key}'")
    _expect(document["host"], dict, f"{where}: field 'host'")
    _expect(document["runs"], list, f"{where}: field 'runs'")
    for i, run in enumerate(document["runs"]):
        _expect(run, dict, f"{where}: runs[{i}]")
        for key in RUN_KEYS:
            if key not in run:
                raise UsageError(f"{where}: runs[{i}]: missing field '{key}'")
        _expect(run["checks"], list, f"{where}: runs[{i}]: field 'checks'")
        for key in ("profile", "load"):
            _expect(run[key], str, f"{where}: runs[{i}]: field '{key}'")
        for j, check in enumerate(run["checks"]):
            _expect(check, dict, f"{where}: runs[{i}].checks[{j}]")
            for key in CHECK_KEYS:
                if key not in check:
                    raise UsageError(f"{where}: runs[{i}].checks[{j}]: missing field '{key}'")
            for key in ("id", "feature", "reason"):
                _expect(check[key], str, f"{where}: runs[{i}].checks[{j}]: field '{key}'")
            if check["status"] not in STATUSES:
                raise UsageError(f"{where}: runs[{i}].checks[{j}]: status {check['status']!r} "
                                 f"(allowed: {', '.join(STATUSES)})")  # fmt: skip


#: JSON's names for the Python types a results file holds (what a user sees in the file).
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string"}


def _expect(value: Any, kind: type, where: str) -> None:
    if not isinstance(value, kind):
        raise UsageError(f"{where} must be {_JSON_TYPES[kind]}, not {json.dumps(value)[:40]}")
