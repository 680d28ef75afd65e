"""The whole suite, run as a user runs it (`python -m harness run`), on this host's accelerator (TCG here).

Under TCG every PMU check must SKIP with its reason, enumeration checks PASS where TCG defines the answer,
nothing FAILs or ERRORs; results.json and junit.xml agree; a guest that panics is an ERROR with its serial tail
and the run goes on to the next profile.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import shutil
import xml.etree.ElementTree as ET

import pytest

from harness.guest.qemu_cpu import probe_cpu_caps
from harness.report import results
from tests.helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.integration


def test_run_exits_zero_and_writes_reports(suite_run, host_facts):
    proc, out = suite_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    document = results.load(out / "results.json")
    expected = ["pmu-off", "pmu-on", "pmu-on-2vcpu"] + (["intel-model"] if host_facts["accel"] == "tcg" else [])
    assert [r["profile"] for r in document["runs"]] == expected
    assert document["host"]["accel"] == host_facts["accel"]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("SUMMARY:")]
    assert summary and fnmatch.fnmatch(summary[0], "SUMMARY: * checks, * passed, 0 failed, * skipped, 0 errors")
    testcases = ET.parse(out / "junit.xml").getroot().iter("testcase")
    assert sum(1 for _ in testcases) == sum(len(r["checks"]) for r in document["runs"])
    for profile in expected:
        # One boot per profile; then lifecycle.reset and lifecycle.guest_reboot reboot its kernel in the same QEMU,
        # and the restored and the migrated guest continue without booting (their consoles are kept beside).
        assert (out / "logs" / profile / "serial.log").read_text().count("VPMU-GUEST-READY") == 3
        for moved in ("restore", "migration"):
            assert (out / "logs" / profile / moved / "serial.log").read_text().count("VPMU-GUEST-READY") == 0


def test_tcg_verdicts(suite_run, host_facts):
    if host_facts["accel"] != "tcg":
        pytest.skip("host: KVM is usable here; this test covers the TCG path")
    document = json.loads((suite_run[1] / "results.json").read_text())
    for run in document["runs"]:
        checks = {c["id"]: c for c in run["checks"]}
        assert checks["enum.pmu_visible"]["status"] == "pass", checks["enum.pmu_visible"]
        for check in run["checks"]:
            assert check["status"] in ("pass", "skip"), check
            if check["id"].startswith(("arch.", "coexist.canary", "topdown.metrics", "lbr.records", "pebs.precise",
                                       "ibs.ibs_op")):  # fmt: skip
                assert check["status"] == "skip"
                assert check["reason"].startswith(("accel: no vPMU under TCG", "not-applicable:")), check["reason"]
    # the Intel-model profile runs the Intel-only enumeration checks for real: absent, as expected
    intel = {c["id"]: c for c in next(r for r in document["runs"] if r["profile"] == "intel-model")["checks"]}
    for check_id in ("lbr.legacy_enumeration", "lbr.arch_enumeration", "pebs.enumeration", "topdown.enumeration"):
        assert intel[check_id]["status"] == "pass" and "absent, as expected" in intel[check_id]["reason"]
        # the pre-gate (expects marker) SKIPs every arch.gp check before it measures: no counters probe ran
        gp = checks["arch.gp.instructions"]
        assert "idle/counters" not in run["guest"]["probe_timings"] and "idle/counters" not in run["probes"]
        assert gp["status"] == "skip"


def test_requested_granted_seen(suite_run, host_facts):
    if host_facts["accel"] != "tcg":
        pytest.skip("host: KVM is usable here; this test covers the TCG path")
    runs = {r["profile"]: r for r in json.loads((suite_run[1] / "results.json").read_text())["runs"]}
    # QEMU grants pmu=on under TCG but fills no PMU leaf without KVM: requested and granted, not seen.
    assert runs["pmu-on"]["guest"]["features"]["pmu"] == {"requested": True, "qemu_expansion": True,
                                                         "granted": True, "seen": False}  # fmt: skip
    assert runs["pmu-off"]["guest"]["features"]["pmu"]["seen"] is False
    assert runs["pmu-on"]["boot_s"] > 0
    view = runs["pmu-on"]["guest"]["view"]
    assert view["caps"]["hypervisor"] == "TCGTCGTCGTCG" and "msr" in view["kernel_pmus"]


def test_profile_qemu_lacks_is_skipped_with_the_reason(tmp_path, guest_image, host_facts):
    prop = "perfmon-v2"
    if prop in probe_cpu_caps("max", host_facts["accel"]).properties:
        pytest.skip(f"qemu: this QEMU has '{prop}'; the too-old-QEMU path needs one that lacks it")
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'[amd-v2]\ndescription = "PerfMonV2"\ncpu = "host,pmu=on,+{prop}"\n')
    proc = run_cli("run", "--profiles-file", str(profiles), "--image", str(guest_image.directory),
                   "--out", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run = json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]
    assert run["boot_s"] is None
    assert all(c["status"] == "skip" and f"has no property {prop}" in c["reason"] for c in run["checks"])


def test_property_typo_is_a_usage_error(tmp_path):
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('[typo]\ndescription = "d"\ncpu = "host,pmu=on,+pdmc"\n')
    proc = run_cli("run", "--profiles-file", str(profiles), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "unknown -cpu property 'pdmc' (did you mean 'pdcm'?)" in proc.stderr


def test_unknown_profile_is_a_usage_error(tmp_path):
    assert_one_line_error(run_cli("run", "--profile", "nope", "--out", str(tmp_path)), "no profile 'nope'")


def test_guest_that_panics_is_an_error_with_the_serial_tail_and_the_run_goes_on(tmp_path, guest_image):
    """An image whose initramfs is garbage: the kernel panics; every check of both profiles is ERROR with the
    panic text, results.json is still written, exit 1."""
    image = tmp_path / "image"
    shutil.copytree(guest_image.directory, image)
    (image / "initramfs.cpio.gz").write_bytes(gzip.compress(b"not a cpio archive" * 100))
    out = tmp_path / "out"
    proc = run_cli("run", "--image", str(image), "--out", str(out), "--profile", "pmu-off", "--profile", "pmu-on",
                   "--", "-k", "enum", timeout_s=300)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:]
    document = results.load(out / "results.json")
    assert [r["profile"] for r in document["runs"]] == ["pmu-off", "pmu-on"]
    for run in document["runs"]:
        assert run["checks"] and all(c["status"] == "error" for c in run["checks"])
        assert "Kernel panic" in run["checks"][0]["reason"]
        assert "serial log (tail)" in run["checks"][0]["reason"]


def test_run_under_host_loads(tmp_path, guest_image, host_facts):
    """A software-event load really runs alongside the guest; a hardware load that cannot run here makes its
    whole scenario SKIP with perf's own words; the load's output and timings are kept."""
    out = tmp_path / "out"
    proc = run_cli("run", "--image", str(guest_image.directory), "--profile", "pmu-on", "--load", "host-sw-counting",
                   "--load", "host-counting-guest", "--out", str(out), timeout_s=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    runs = {r["load"]: r for r in results.load(out / "results.json")["runs"]}
    assert list(runs) == ["host-sw-counting", "host-counting-guest"]
    sw = runs["host-sw-counting"]
    checks = {c["id"]: c for c in sw["checks"]}
    assert checks["coexist.host_load"]["status"] == "pass"
    assert sw["host_load"]["status"] == "stopped" and sw["host_load"]["min_pct_running"] == 100.0
    assert set(sw["host_load"]["events"]) == {"cpu-clock", "task-clock", "context-switches"}
    assert (out / "logs" / "pmu-on" / "loads" / "host-sw-counting.out").read_text()
    if host_facts["accel"] == "tcg":
        assert checks["coexist.canary"]["status"] == "skip"
        assert sw["host_load"]["vm_exits"] is None  # no KVM statistics under TCG
    hw = runs["host-counting-guest"]
    if hw["host_load"]["status"] == "unavailable":
        assert all(c["status"] == "skip" and c["reason"].startswith("host-load: perf:") for c in hw["checks"])
