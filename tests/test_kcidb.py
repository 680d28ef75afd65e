"""report kcidb: KCIDB I/O data validated by kcidb-io (the package KernelCI's own tools validate with), a broken
document rejected by the same validator, stable ids, and a real run converted whole."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
from kcidb_io import schema

from harness.errors import HarnessError, UsageError
from harness.report import kcidb, results
from tests.helpers import run_cli
from tests.test_reports import check, document

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sample() -> dict:
    doc = document()
    doc["runs"][0]["checks"].append(check("pebs.precise_ip.1", "skip", "pebs", "kvm-limit: no adaptive PEBS"))
    doc["runs"][0]["checks"].append(check("odd id/with space", "pass", "other", "fine\nsecond line"))
    doc["runs"][0]["checks"].append(check("arch.long", "error", reason="guest lost\n" + "serial tail " * 2000))
    return doc


def test_output_validates_with_kcidb_io():
    data = kcidb.build_document(sample(), "d1g3st", "acme_lab")
    schema.V5_3.validate_exactly(data)
    schema.LATEST.validate(data)  # and the newest schema kcidb-io knows accepts it (as v5.3 data)
    assert data["version"] == {"major": 5, "minor": 3}
    assert kcidb.counts(data) == "1 checkout, 1 build, 7 tests"
    tests = {t["misc"]["check_id"]: t for t in data["tests"]}
    assert [t["status"] for t in data["tests"][:4]] == ["PASS", "FAIL", "SKIP", "ERROR"]
    gp = tests["arch.gp.instructions"]
    assert gp["path"] == "vpmu.arch.gp.instructions" and gp["duration"] == 0.1
    assert gp["build_id"] == data["builds"][0]["id"] and data["builds"][0]["checkout_id"] == data["checkouts"][0]["id"]
    assert gp["misc"] == {"check_id": "arch.gp.instructions", "feature": "arch_counters", "profile": "pmu-on",
                          "load": "idle", "accel": "kvm", "key_number": "+0.00%",
                          "reason": "GP3: instructions 10,000,001 outside [10,000,000, ...]"}  # fmt: skip
    env = gp["environment"]["misc"]
    assert env["cpu_model"] == "Intel Xeon" and env["microcode"] == "0x2b000590" and env["kernel"] == "6.12.0"
    assert env["kvm_enable_pmu"] == "Y" and env["vpmu_mode"] == "perf-based" and env["qemu_version"] == "9.2.0"
    assert "kernel 6.12.0" in gp["environment"]["comment"]
    assert gp["log_excerpt"] == gp["misc"]["reason"] and "log_excerpt" not in tests["arch.fixed.3"]
    assert tests["arch.rdpmc"]["log_excerpt"].startswith("probe counters: killed by signal 11")
    assert len(tests["arch.long"]["log_excerpt"]) == kcidb.EXCERPT_MAX  # a serial tail longer than KCIDB takes
    assert tests["pebs.precise_ip.1"]["path"] == "vpmu.pebs.precise_ip.1"
    assert tests["odd id/with space"]["path"] == "vpmu.odd_id_with_space"
    assert "\n" not in tests["odd id/with space"]["comment"]
    assert all(t["id"].startswith("acme_lab:d1g3st:pmu-on:idle:") for t in data["tests"])
    assert len({t["id"] for t in data["tests"]}) == len(data["tests"])
    assert data["checkouts"][0]["misc"]["kernel_release"] == "6.12.0"


@pytest.mark.parametrize(
    ("where", "breakage"),
    [
        ("tests", lambda d: d["tests"][0].update(status="pass")),  # lowercase status
        ("tests", lambda d: d["tests"][0].update(id="no-origin-prefix")),
        ("tests", lambda d: d["tests"][0].update(path="vpmu..double.dot")),
        ("tests", lambda d: d["tests"][0]["environment"].update(cpu="x")),  # unknown environment key
        ("builds", lambda d: d["builds"][0].pop("checkout_id")),
        ("version", lambda d: d.update(version={"major": 99})),
    ],
)
def test_broken_output_is_rejected(where, breakage):
    data = kcidb.build_document(sample(), "d1g3st")
    broken = copy.deepcopy(data)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        schema.V5_3.validate_exactly(broken)
    with pytest.raises(HarnessError, match="does not validate"):
        kcidb.validate(broken)
    assert kcidb.validate(data) == "5.3"


def test_origin_and_checkout_id_are_checked():
    with pytest.raises(UsageError, match="--origin 'Acme-Lab'"):
        kcidb.check_origin("Acme-Lab")
    assert kcidb.check_checkout_id("acme:abc", "acme") == "abc"
    with pytest.raises(UsageError, match="--checkout-id"):
        kcidb.check_checkout_id("acme:", "acme")


def test_cli_writes_validated_kcidb_with_stable_ids(tmp_path):
    source = tmp_path / "results.json"
    results.write(source, sample())
    out = tmp_path / "sub" / "kcidb.json"
    argv = ["report", "kcidb", str(source), "--origin", "acme_lab", "--checkout-id", COMMIT, "--out", str(out)]
    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    assert "1 checkout, 1 build, 7 tests" in proc.stdout and "validated with kcidb-io" in proc.stdout
    data = json.loads(out.read_text())
    schema.V5_3.validate_exactly(data)
    assert data["checkouts"][0]["id"] == f"acme_lab:{COMMIT}" and data["checkouts"][0]["git_commit_hash"] == COMMIT
    assert data["builds"][0]["id"] == f"acme_lab:{COMMIT}:6.12.0"
    again = tmp_path / "again.json"
    assert run_cli(*argv[:-1], str(again)).returncode == 0
    assert json.loads(again.read_text()) == data  # the same file submitted twice updates the same objects


@pytest.mark.integration
def test_kcidb_of_a_real_run(suite_run, tmp_path):
    """The default run here (every profile that applies, idle load): one test object per check x profile x load."""
    _proc, out = suite_run
    proc = run_cli("report", "kcidb", str(out / "results.json"), "--out", str(tmp_path / "kcidb.json"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "kcidb.json").read_text())
    schema.V5_3.validate_exactly(data)
    document = results.load(out / "results.json")
    assert len(data["tests"]) == sum(len(run["checks"]) for run in document["runs"])
    assert {t["misc"]["profile"] for t in data["tests"]} == {run["profile"] for run in document["runs"]}
    assert data["checkouts"][0]["misc"]["kernel_release"] == document["host"]["kernel"]
