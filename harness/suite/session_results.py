"""What a session leaves behind: results.json, the matrix reports beside it, and a junit.xml renamed into place.

Each file is written whole or not at all (harness.outputs); a rejudge session writes the stored document with every
check decided again where its inputs allow, and marked as kept where they do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness import outputs
from harness.errors import OutputError
from harness.host.loads import IDLE
from harness.report import matrix, render, results
from harness.suite.replay import profile_json
from harness.suite.session import SessionState, session_accel, session_host_facts


def final_checks(state: SessionState) -> list[tuple[tuple[str, str], list[dict[str, Any]]]]:
    """The checks to report, per (profile, load): this session's, or (rejudge) the rejudged document's."""
    if state.rejudged is not None:
        return [((r["profile"], r["load"]), r["checks"]) for r in state.rejudged["runs"]]
    return [(key, [c.to_json() for c in checks]) for key, checks in state.checks.items()]


def publish_junit(state: SessionState, written: Path, finished: bool) -> None:
    """Rename pytest's finished junit file over the target; remove it when pytest could not finish writing it."""
    assert state.junit_target is not None
    try:
        if finished and written.is_file():
            outputs.publish(written, Path(state.junit_target))
    except OutputError as exc:
        state.output_error = str(exc)
    finally:
        outputs.discard(written)


def write_results(config: pytest.Config, state: SessionState) -> None:
    """results.json (this run's, or rejudge's document) and matrix.md / matrix.html beside it."""
    path = config.getoption("vpmu_results")
    if state.replay is not None:
        state.rejudged = _rejudged_document(config, state)
        if path:
            state.document = state.rejudged
            results.write(Path(path), state.rejudged)
            render.write(matrix.build([state.rejudged]), Path(path).parent)
        return
    if not path:
        return
    accel = session_accel(config)
    log_root = config.getoption("vpmu_log_dir")
    runs = []
    for name in state.selected:
        run = state.runs.get(name)
        for load in state.selected_loads or [IDLE]:
            if (name, load) not in state.checks:
                continue
            inputs = run.stored_inputs(load) if run else {}
            load_inputs = state.load_inputs.get((name, load))
            if load_inputs is not None:
                load_inputs = {**load_inputs, "exits_read": inputs.get("exits_read")}
            runs.append({
                "profile": name,
                "load": load,
                "accel": accel,
                "boot_s": round(run.boot_s, 3) if run and run.boot_s is not None else None,
                "profile_def": profile_json(state.profiles[name]),
                "guest": run.summary() if run else {"boot_error": state.boot_failures.get(name)},
                "host_load": state.load_results.get((name, load)),
                "probes": inputs.get("probes"),
                "branch_maps": inputs.get("branch_maps"),
                "load_inputs": load_inputs,
                "logs_incomplete": outputs.incomplete_logs(log_root / name) if log_root else [],
                "checks": [c.to_json() for c in state.checks[(name, load)]],
            })  # fmt: skip
    document = results.build(session_host_facts(config), runs)
    state.document = document
    results.write(Path(path), document)
    render.write(matrix.build([document]), Path(path).parent)


def _rejudged_document(config: pytest.Config, state: SessionState) -> dict[str, Any]:
    """The stored document with every check decided again where its inputs allow, kept (and marked) otherwise."""
    replay = state.replay
    assert replay is not None
    runs = []
    for stored_run in replay.document["runs"]:
        key = (stored_run["profile"], stored_run["load"])
        judged = {c.id: c.to_json() for c in state.checks.get(key, [])}
        gap = replay.gap(*key)
        checks = []
        for stored in stored_run["checks"]:
            if stored["id"] in judged:
                checks.append(judged[stored["id"]])
                continue
            if gap is not None:
                why = gap
            elif stored["id"] not in state.collected.get(key, set()):
                why = "no such check in today's suite (renamed or removed), or deselected (-k/-m)"
            else:
                why = "not judged in this session (interrupted?)"
            checks.append({**stored, "rejudged": False, "rejudge_reason": why})
        runs.append({**stored_run, "checks": checks})
    document = results.build(replay.host, runs)
    document["rejudge"] = {"source": str(replay.source), "source_schema": replay.schema,
                           "host_facts": str(replay.host_source) if replay.host_source else None}  # fmt: skip
    return document
