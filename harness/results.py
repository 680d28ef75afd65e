"""results.json: the record of a run that reports, merges, diffs and rejudge read (schema ``vpmu-results/2``).

``{"schema", "host": {doctor facts}, "runs": [{"profile", "load", "accel", "boot_s", "guest": {...},
"checks": [{"id", "feature", "status", "reason", "expected", "observed", "duration_s", "measurements"}]}]}``
``measurements`` keeps the raw probe records a verdict was made from.

Schema /2 adds, per run, everything ``python -m harness rejudge`` needs to decide every check again with today's
rules (harness/replay.py): ``profile_def`` (the profile's table), ``probes`` ({memo key: {"name", "records",
"error", "duration_s"}} for every probe run under that load, and the enum probe), ``guest.view.records`` (with
``kernel_pmus``, ``kernel_banner`` and ``sysfs``: the guest view's inputs), ``branch_maps`` (objdump of the LBR
probe binary, by probe memo key) and ``load_inputs`` (the host load as the co-existence checks read it: its spec,
VM exits before and during the group, the running summary and state at that moment). A rejudged document marks
each check ``rejudged`` (true, with ``previous`` when the verdict changed; false with ``rejudge_reason``). Absent
keys mean "not stored". Schema /1 files still load for render, merge and diff; mixing /1 and /2 in one merge is
an error.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UsageError

SCHEMA_V1 = "vpmu-results/1"
SCHEMA = "vpmu-results/2"
#: Schemas this code reads (it writes only SCHEMA).
SCHEMAS = (SCHEMA_V1, SCHEMA)
STATUSES = ("pass", "fail", "skip", "error")
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


def write(path: Path, document: dict[str, Any]) -> None:
    """Write atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".results-", dir=path.parent)
    with os.fdopen(fd, "w") as out:
        json.dump(document, out, indent=1, default=str)
        out.write("\n")
    os.replace(tmp, path)


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
    validate(document, str(path))
    return document


def validate(document: Any, where: str) -> None:
    if not isinstance(document, dict):
        raise UsageError(f"{where}: results must be a JSON object")
    if document.get("schema") not in SCHEMAS:
        raise UsageError(f"{where}: schema is {document.get('schema')!r}, expected {SCHEMA!r} (or {SCHEMA_V1!r}): "
                         "not a vpmu results file?")  # fmt: skip
    for key in ("host", "runs"):
        if key not in document:
            raise UsageError(f"{where}: missing field '{key}'")
    for i, run in enumerate(document["runs"]):
        for key in RUN_KEYS:
            if key not in run:
                raise UsageError(f"{where}: runs[{i}]: missing field '{key}'")
        for j, check in enumerate(run["checks"]):
            for key in CHECK_KEYS:
                if key not in check:
                    raise UsageError(f"{where}: runs[{i}].checks[{j}]: missing field '{key}'")
            if check["status"] not in STATUSES:
                raise UsageError(f"{where}: runs[{i}].checks[{j}]: status {check['status']!r} "
                                 f"(allowed: {', '.join(STATUSES)})")  # fmt: skip
