"""rejudge: stored measurements decided again with today's rules, without booting.

Unit-style documents are written by hand in schema vpmu-results/2, with hosts as ``doctor --json`` reports them
(tests/test_plan.py) and probe records in the probes' exact output format (tests/test_verdicts.py factories, which
are checked against the templates). The integration test re-judges the real run of this machine.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.host.loads import IDLE, LoadResult, load_loads
from harness.judge import coexist, plan
from harness.paths import GUEST_TESTS_DIR, REPO_ROOT
from harness.probe.branch_map import BranchMap, BranchSite
from harness.probe.guest_view import ENUM_MSRS
from harness.probe.workloads import LOOP
from harness.report import results
from harness.suite.profile_run import branch_map_json
from harness.suite.replay import SCHEMA_1_GAP, RecordingLoad, ReplayGap, ReplayRun, load_spec_json, profile_json
from tests.helpers import assert_one_line_error, run_cli
from tests.test_plan import HOST_FILES, PROFILES, amd_kvm_host, intel_kvm_host, run_plan
from tests.test_verdicts import count, gp_group, kvm_guest_table

INSNS = LOOP.delta_instructions(1_000_000)
SPR = "GenuineIntel00806F8_SapphireRapids_05_CPUID.txt"
GENOA = "AuthenticAMD0A10F11_K19_Genoa_01_CPUID.txt"
PROBES = ("counters", "msr", "semantics", "lbr", "pebs", "topdown", "ibs")
#: What the life-cycle checks store per step (ProfileRun.measure), kept like a probe's records.
LIFECYCLE_MEASUREMENTS = ("lifecycle.reset", "lifecycle.guest_reboot", "lifecycle.save_restore", "lifecycle.migration")


def enum_records(dump: str, pmu: bool = True) -> list[dict]:
    """The enum probe's records of a KVM guest of ``dump``: CPUID leaves, then its MSR reads (value, or the errno
    of a #GP: /dev/cpu/N/msr returns EIO), as enum.c.j2 prints them."""
    table = kvm_guest_table(dump)
    if not pmu:
        table.leaves.pop((0xA, 0), None)
    records = [{**r, "probe": "enum"} for r in table.to_records()]
    for msr in ENUM_MSRS:
        if pmu and msr in (0x345, 0xC1, 0x186, 0x38F, 0x309, 0xC3):
            records.append({"probe": "enum", "kind": "msr", "msr": msr, "value": 0x2000 if msr == 0x345 else 0})
        else:
            records.append({"probe": "enum", "kind": "msr", "msr": msr, "error": "rdmsr", "errno": 5,
                            "strerror": "Input/output error"})  # fmt: skip
    return records


def probe(name: str, records: list[dict], error: str | None = None) -> dict:
    return {"name": name, "records": records, "error": error, "duration_s": 0.5}


def stored_check(check_id: str, status: str = "pass", reason: str = "stored", feature: str = "arch_counters") -> dict:
    return {"id": check_id, "feature": feature, "status": status, "reason": reason, "expected": None,
            "observed": None, "duration_s": 0.1, "measurements": []}  # fmt: skip


def stored_run(profile: str, checks: list[dict], probes: dict[str, dict], dump: str = SPR, accel: str = "kvm",
               pmu: bool = True) -> dict:  # fmt: skip
    """A run of ``profile`` under the idle load, as the plugin writes it (schema /2)."""
    view = {"records": enum_records(dump, pmu), "kernel_pmus": ["cpu", "msr", "software"] if pmu else ["msr"],
            "kernel_banner": "Performance Events: ...", "sysfs": {}}  # fmt: skip
    return {
        "profile": profile, "load": IDLE, "accel": accel, "boot_s": 1.0,
        "profile_def": profile_json(PROFILES[profile]),
        "guest": {"cpu": PROFILES[profile].cpu_for(accel), "kernel_release": "6.1.0-56-cloud-amd64",
                  "unavailable": None, "boot_error": None, "reboots": 0,
                  "features": {"pmu": {"requested": True, "granted": True, "seen": pmu}}, "filtered_features": [],
                  "view": view, "probe_timings": {}, "pinning": {"vcpus": [{"vcpu": 0, "thread": 4242, "cpu": 0}]}},
        "host_load": {**LoadResult(IDLE).to_json(), "group_s": 1.0, "vm_exits": 10, "vm_exits_per_s": 10.0},
        "probes": {"idle/enum": probe("enum", view["records"]), **probes},
        "branch_maps": {},
        "load_inputs": {"spec": load_spec_json(load_loads()[IDLE]), "exits_before": 100, "exits_read": None,
                        "reads": {}},
        "checks": checks,
    }  # fmt: skip


def document(host: dict, runs: list[dict]) -> dict:
    return results.build(host, runs)


def counters_doc(records: list[dict], host: dict | None = None) -> dict:
    checks = [
        stored_check("arch.gp.instructions", reason="instructions within bounds on all 8 GP counters"),
        stored_check("enum.pmu_visible", reason="guest CPUID and kernel show the vPMU", feature="enumeration"),
    ]
    probes = {"idle/counters": probe("counters", records)}
    return document(host or intel_kvm_host(), [stored_run("pmu-on", checks, probes)])


def rejudge(tmp_path: Path, doc: dict, *args: str, name: str = "in.json") -> tuple[subprocess.CompletedProcess, dict]:
    source = tmp_path / name
    source.write_text(json.dumps(doc))
    out = tmp_path / "out"
    proc = run_cli("rejudge", str(source), "--out", str(out), *args)
    written = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    return proc, written


def checks_by_id(doc: dict, run: int = 0) -> dict[str, dict]:
    return {c["id"]: c for c in doc["runs"][run]["checks"]}


# --- verdicts decided again ---------------------------------------------------------------------------------------


def test_good_records_stay_pass_and_are_marked_rejudged(tmp_path):
    proc, out = rejudge(tmp_path, counters_doc(gp_group("instructions", INSNS)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    checks = checks_by_id(out)
    assert checks["arch.gp.instructions"]["status"] == "pass" and checks["arch.gp.instructions"]["rejudged"] is True
    assert checks["enum.pmu_visible"]["status"] == "pass"
    assert out["schema"] == results.SCHEMA and out["rejudge"]["source_schema"] == results.SCHEMA
    assert (tmp_path / "out" / "matrix.md").exists() and (tmp_path / "out" / "junit.xml").exists()
    assert "REJUDGE: 2 checks judged again" in proc.stdout


def test_records_that_show_a_failure_flip_the_check(tmp_path):
    records = gp_group("instructions", INSNS)
    records[3] = count("instructions", 3, 3, INSNS + 1)  # GP3 counted one instruction too many
    proc, out = rejudge(tmp_path, counters_doc(records))
    assert proc.returncode == 1
    check = checks_by_id(out)["arch.gp.instructions"]
    assert check["status"] == "fail" and "GP3" in check["reason"] and check["rejudged"] is True
    assert check["previous"] == {"status": "pass", "reason": "instructions within bounds on all 8 GP counters"}
    assert "[was PASS]" in proc.stdout


def test_host_facts_replace_the_stored_ones(tmp_path):
    fixed = intel_kvm_host()
    fixed["kvm"] = {**fixed["kvm"], "enable_pmu": "N"}
    facts = tmp_path / "doctor.json"
    facts.write_text(json.dumps(fixed))
    proc, out = rejudge(tmp_path, counters_doc(gp_group("instructions", INSNS)), "--host-facts", str(facts))
    assert out["host"]["kvm"]["enable_pmu"] == "N" and out["rejudge"]["host_facts"] == str(facts)
    check = checks_by_id(out)["arch.gp.instructions"]
    assert (check["status"], check["reason"]) == ("skip", "host: kvm.enable_pmu=N")
    assert check["previous"]["status"] == "pass"
    # the guest still showed a PMU: with the corrected facts that is now a FAIL of the enumeration check
    assert checks_by_id(out)["enum.pmu_visible"]["status"] == "fail" and proc.returncode == 1


def test_coexistence_checks_get_the_load_as_they_read_it(tmp_path):
    """Under a host load the co-existence checks read the load's running summary and state at that moment, the VM
    exits, and the idle run's counters: rejudge gives them the same values back."""
    spec = load_loads()["host-sw-counting"]
    snapshot = {"cpu-clock": {"status": "counted", "value": 1000.5, "min_pct_running": 100.0}}
    at_check = {**LoadResult(spec.name, "running", command=list(spec.command)).to_json(), "events": {}}
    idle = stored_run("pmu-on", [stored_check("enum.pmu_visible", feature="enumeration")],
                      {"idle/counters": probe("counters", gp_group("instructions", INSNS))})  # fmt: skip
    busy = stored_run("pmu-on", [stored_check("coexist.host_load", reason="old words", feature="coexistence"),
                                 stored_check("coexist.canary", feature="coexistence")],
                      {"host-sw-counting/counters": probe("counters", gp_group("instructions", INSNS))})  # fmt: skip
    busy["load"] = spec.name
    busy["host_load"] = {**at_check, "status": "stopped", "events": snapshot, "group_s": 2.0}
    busy["load_inputs"] = {"spec": load_spec_json(spec), "exits_before": 1000, "exits_read": 1500,
                           "reads": {"snapshot": snapshot, "result": at_check, "elapsed_s": 2.0}}  # fmt: skip
    proc, out = rejudge(tmp_path, document(intel_kvm_host(), [idle, busy]))
    assert proc.returncode == 0, proc.stdout[-3000:]
    checks = checks_by_id(out, 1)
    want = coexist.host_load(spec, LoadResult(spec.name, "running"), "perf-based", snapshot)
    assert (checks["coexist.host_load"]["status"], checks["coexist.host_load"]["reason"]) == ("pass", want.reason)
    assert checks["coexist.host_load"]["previous"] == {"status": "pass", "reason": "old words"}
    canary = checks["coexist.canary"]
    assert canary["status"] == "pass", canary
    assert canary["observed"]["vm_exits"] == {"total": 1500, "during_group": 500, "per_s": 250.0}


def test_branch_maps_round_trip_through_results_json():
    found = BranchMap({0x401000: BranchSite("call", 0x401100), 0x401005: BranchSite("ret", None)},
                      {"vpmu_f1": (0x401000, 0x401010)})  # fmt: skip
    stored = json.loads(json.dumps(branch_map_json(found, ("vpmu_f1",))))
    run = ReplayRun([{**stored_run("pmu-on", [], {}), "branch_maps": {"idle/lbr": stored}}], intel_kvm_host(), None)
    assert run.branch_map("lbr", ("vpmu_f1",)) == found
    with pytest.raises(ReplayGap, match="no branch map of vpmu_f2"):
        run.branch_map("lbr", ("vpmu_f2",))


def test_recording_load_keeps_the_state_the_check_saw():
    """snapshot() may mark a load that died during the group; the verdict sees that state, so it is recorded."""

    class DyingLoad:
        spec = load_loads()["host-sw-counting"]
        result = LoadResult("host-sw-counting", "running")
        exits_before = 7

        def snapshot(self):
            self.result.status, self.result.reason = "died", "perf exited during the check group (code 1)"
            return {}

        def elapsed_s(self):
            return 1.25

    recorder = RecordingLoad(DyingLoad())
    recorder.snapshot()
    recorder.elapsed_s()
    inputs = recorder.inputs()
    assert inputs["reads"]["result"]["status"] == "died" and inputs["reads"]["elapsed_s"] == 1.25
    assert inputs["exits_before"] == 7 and inputs["spec"]["name"] == "host-sw-counting"


# --- inputs that are not stored -----------------------------------------------------------------------------------


def test_schema_1_file_keeps_every_verdict_with_the_reason(tmp_path):
    doc = counters_doc(gp_group("instructions", INSNS))
    doc["schema"] = results.SCHEMA_V1
    for run in doc["runs"]:
        for key in ("profile_def", "probes", "branch_maps", "load_inputs"):
            del run[key]
    proc, out = rejudge(tmp_path, doc)
    assert proc.returncode == 0, proc.stderr
    for stored, check in zip(doc["runs"][0]["checks"], out["runs"][0]["checks"], strict=True):
        assert (check["status"], check["reason"]) == (stored["status"], stored["reason"])
        assert check["rejudged"] is False and check["rejudge_reason"] == SCHEMA_1_GAP
    assert out["schema"] == results.SCHEMA and out["rejudge"]["source_schema"] == results.SCHEMA_V1


def test_a_probe_that_failed_keeps_the_stored_error(tmp_path):
    doc = counters_doc([])
    doc["runs"][0]["probes"]["idle/counters"] = probe("counters", [], "probe counters: killed by signal 11")
    doc["runs"][0]["checks"][0] = stored_check("arch.gp.instructions", "error", "probe counters: killed by signal 11")
    proc, out = rejudge(tmp_path, doc)
    check = checks_by_id(out)["arch.gp.instructions"]
    assert (check["status"], check["rejudged"]) == ("error", False) and proc.returncode == 1
    assert check["rejudge_reason"] == "probe counters failed in the original run: probe counters: killed by signal 11"
    assert checks_by_id(out)["enum.pmu_visible"]["rejudged"] is True


def test_a_check_gated_then_but_not_now_keeps_its_skip(tmp_path):
    """The original host had kvm.enable_pmu=N, so no counters probe ran; corrected facts cannot conjure its records."""
    off = intel_kvm_host()
    off["kvm"] = {**off["kvm"], "enable_pmu": "N"}
    doc = counters_doc([], host=off)
    del doc["runs"][0]["probes"]["idle/counters"]
    doc["runs"][0]["checks"][0] = stored_check("arch.gp.instructions", "skip", "host: kvm.enable_pmu=N")
    facts = tmp_path / "doctor.json"
    facts.write_text(json.dumps(intel_kvm_host()))
    _proc, out = rejudge(tmp_path, doc, "--host-facts", str(facts))
    check = checks_by_id(out)["arch.gp.instructions"]
    assert (check["status"], check["reason"], check["rejudged"]) == ("skip", "host: kvm.enable_pmu=N", False)
    assert "probe counters did not run under idle in the original run" in check["rejudge_reason"]


def test_a_guest_that_did_not_boot_keeps_its_errors(tmp_path):
    doc = counters_doc([])
    run = doc["runs"][0]
    run["guest"] = {"boot_error": "guest did not boot: Kernel panic"}
    run["checks"] = [stored_check(c["id"], "error", "guest did not boot: Kernel panic") for c in run["checks"]]
    proc, out = rejudge(tmp_path, doc)
    assert proc.returncode == 1
    for check in out["runs"][0]["checks"]:
        assert check["status"] == "error" and check["rejudged"] is False
        assert check["rejudge_reason"] == "the guest did not boot or its view was not read in the original run"


def test_a_stored_check_the_suite_no_longer_has_is_kept(tmp_path):
    doc = counters_doc(gp_group("instructions", INSNS))
    doc["runs"][0]["checks"].append(stored_check("arch.retired_check", "pass", "old"))
    _proc, out = rejudge(tmp_path, doc)
    check = checks_by_id(out)["arch.retired_check"]
    assert check["rejudged"] is False and "no such check in today's suite" in check["rejudge_reason"]


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("{truncated", "not valid JSON"), ('{"schema": "vpmu-results/9", "host": {}, "runs": []}',
     "schema is 'vpmu-results/9'"), ('{"schema": "vpmu-results/2", "host": {}}', "missing field 'runs'")],
)  # fmt: skip
def test_not_a_results_file_is_one_line(tmp_path, content, fragment):
    path = tmp_path / "r.json"
    path.write_text(content)
    assert_one_line_error(run_cli("rejudge", str(path), "--out", str(tmp_path / "o")), str(path), fragment)


def test_missing_results_file_and_bad_host_facts_are_one_line(tmp_path):
    missing = tmp_path / "none.json"
    assert_one_line_error(run_cli("rejudge", str(missing), "--out", str(tmp_path / "o")), "cannot read results")
    good = tmp_path / "r.json"
    good.write_text(json.dumps(counters_doc([])))
    bad = tmp_path / "doctor.json"
    bad.write_text('{"accel": "kvm"}')
    proc = run_cli("rejudge", str(good), "--host-facts", str(bad), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, str(bad), "lack field")


def test_v1_and_v2_still_refuse_to_merge(tmp_path):
    v2 = tmp_path / "v2.json"
    results.write(v2, counters_doc([]))
    v1 = tmp_path / "v1.json"
    old = counters_doc([])
    old["schema"] = results.SCHEMA_V1
    v1.write_text(json.dumps(old))
    assert results.load(v1)["schema"] == results.SCHEMA_V1  # render and diff still read /1
    with pytest.raises(UsageError, match="schema versions conflict"):
        results.load_many([v1, v2])


# --- the pre-gate says what the verdicts say, on every host --------------------------------------------------------


def audit_hosts() -> list[tuple[str, dict]]:
    hosts = [("intel-kvm", intel_kvm_host()), ("amd-kvm", amd_kvm_host())]
    return hosts + [(p.stem, plan.load_host_facts(p)) for p in HOST_FILES]


@pytest.mark.parametrize(("name", "facts"), audit_hosts(), ids=[n for n, _ in audit_hosts()])
def test_pregate_reasons_are_the_verdicts_reasons(tmp_path, name, facts):
    """Judge every check of every profile that can run on the host with the pre-gate off (--vpmu-audit-pregate)
    and empty probe records: wherever the pre-gate would SKIP, the verdict SKIPs with the same words, and the plan
    agrees with the pre-gate."""
    planned = run_plan(tmp_path, facts)
    runs = []
    for entry in planned["profiles"]:
        if entry["unavailable"]:
            continue
        dump = GENOA if entry["guest_vendor"] in plan.AMD_VENDORS else SPR
        checks = [stored_check(c["id"]) for c in entry["checks"]]
        probes = {f"idle/{p}": probe(p, []) for p in PROBES + LIFECYCLE_MEASUREMENTS}
        runs.append(stored_run(entry["profile"], checks, probes, dump, facts["accel"]))
    source = tmp_path / "audit.json"
    source.write_text(json.dumps(document(facts, runs)))
    out = tmp_path / "audit-out.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", str(GUEST_TESTS_DIR), "-p", "no:cacheprovider", "-q",
                           "--tb=native", "--vpmu-replay", str(source), "--vpmu-audit-pregate", "--results", str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=False)  # fmt: skip
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-2000:]
    judged = json.loads(out.read_text())
    planned_by = {p["profile"]: {c["id"]: c for c in p["checks"]} for p in planned["profiles"]}
    gated = 0
    for run in judged["runs"]:
        for check in run["checks"]:
            reason = check.get("pregate")
            if reason is None:
                continue
            gated += 1
            assert (check["status"], check["reason"]) == ("skip", reason), (name, run["profile"], check)
            assert planned_by[run["profile"]][check["id"]]["reason"] == reason, (run["profile"], check["id"])
    assert gated or not runs


# --- integration: the real run of this machine ----------------------------------------------------------------------


def fake_tools(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """PATH with qemu-system-x86_64 and perf that only note they were started (rejudge must start neither)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "started"
    for tool in ("qemu-system-x86_64", "perf"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho {tool} "$@" >> {marker}\nexit 1\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, marker


@pytest.mark.integration
def test_rejudge_of_the_real_run_gives_the_same_verdicts_without_qemu(suite_run, tmp_path):
    _proc, run_out = suite_run
    original = results.load(run_out / "results.json")
    env, marker = fake_tools(tmp_path)
    out = tmp_path / "rejudged"
    proc = run_cli("rejudge", str(run_out / "results.json"), "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert not marker.exists(), f"rejudge started {marker.read_text()}"
    rejudged = results.load(out / "results.json")
    assert [(r["profile"], r["load"]) for r in rejudged["runs"]] == [
        (r["profile"], r["load"]) for r in original["runs"]
    ]
    for before, after in zip(original["runs"], rejudged["runs"], strict=True):
        for a, b in zip(before["checks"], after["checks"], strict=True):
            assert (b["id"], b["status"], b["reason"]) == (a["id"], a["status"], a["reason"])
            assert b["rejudged"] is True and "previous" not in b, b
    again = copy.deepcopy(rejudged)  # the rejudged file is itself re-judgeable
    assert again["runs"][0].get("probes") is not None
