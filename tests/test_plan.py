"""plan: the pre-gate's reasons are the verdicts' reasons, the guest vendor is predicted as QEMU sets it, and
``python -m harness plan`` decides every profile x check for a host's doctor JSON as a run there would.

Hosts: this machine's own ``doctor --json``, a hand-written Intel KVM host built from the real Sapphire Rapids CPUID
dump (the way doctor reports such a host), and every shipped host file under tests/data/hosts/.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.cpu.caps import decode_caps, decode_perf_capabilities
from harness.cpu.cpuid_dump import load_cpuid_dump
from harness.host import hostfacts
from harness.host.loads import IDLE, LoadSpec, load_loads
from harness.judge import coexist, enumeration, plan
from harness.judge.expectations import Context
from harness.suite.profiles import load_profiles
from tests.helpers import CPUID_DIR, TEST_DATA, assert_one_line_error, run_cli
from tests.test_verdicts import amd_kvm_guest_view, intel_kvm_guest_view, no_pmu_view

HOSTS_DIR = TEST_DATA / "hosts"
HOST_FILES = sorted(p for p in HOSTS_DIR.glob("*.json")) if HOSTS_DIR.is_dir() else []
PROFILES = load_profiles()
IDLE_SPEC = load_loads()[IDLE]
TCG_REASON = "accel: no vPMU under TCG"


def intel_kvm_host(**changes) -> dict:
    """An Intel Sapphire Rapids KVM host with the perf-based vPMU, as ``doctor --json`` reports one: CPUID decoded
    from the real dump; IA32_PERF_CAPABILITIES 0xf5ff (arch-LBR marker 0x3f in [5:0], PEBS format 5 with baseline,
    PERF_METRICS: SDM Vol. 4 Table 2-2 bit layout)."""
    caps = decode_caps(load_cpuid_dump(CPUID_DIR / "GenuineIntel00806F8_SapphireRapids_05_CPUID.txt")).to_json()
    facts = {
        "accel": "kvm", "accel_reason": "KVM usable (kvm_intel)", "vpmu_mode": "perf-based", "hostname": "spr-kvm",
        "kernel": "6.12.0",
        "cpu": {"model_name": "Intel(R) Xeon(R) Platinum 8480+", "vendor": "GenuineIntel", "microcode": "0x2b000590",
                "virt_flags": ["vmx"], "cpuid_source": "/dev/cpu/0/cpuid", "caps": caps,
                "perf_capabilities": {"value": decode_perf_capabilities(0xF5FF), "reason": None}},
        "kvm": {"device": "/dev/kvm", "device_present": True, "device_access": True, "modules": ["kvm", "kvm_intel"],
                "enable_pmu": "Y", "enable_mediated_pmu": "N", "ignore_msrs": "N"},
        "host_pmu": {"present": True, "core_pmus": ["cpu"], "pmus": ["cpu", "msr", "software"], "hybrid": False,
                     "arch_perfmon_version": 5},
        "perf": {"path": "/usr/bin/perf", "version": "6.12", "hw_events_count": True, "hw_events_detail": "",
                 "paranoid": "2", "nmi_watchdog": "0"},
        "qemu": {"path": "/usr/bin/qemu-system-x86_64", "version": "9.2.0", "accels": ["tcg", "kvm"]},
    }  # fmt: skip
    for key, value in changes.items():
        facts[key] = value
    return facts


def amd_kvm_host() -> dict:
    """An AMD Genoa KVM host (perf-based vPMU), CPUID decoded from the real dump."""
    facts = intel_kvm_host(hostname="genoa-kvm", accel_reason="KVM usable (kvm_amd)")
    caps = decode_caps(load_cpuid_dump(CPUID_DIR / "AuthenticAMD0A10F11_K19_Genoa_01_CPUID.txt")).to_json()
    facts["cpu"] = {**facts["cpu"], "model_name": "AMD EPYC 9654", "vendor": "AuthenticAMD", "caps": caps,
                    "perf_capabilities": {"value": None, "reason": "not an Intel host"}}  # fmt: skip
    facts["kvm"] = {**facts["kvm"], "modules": ["kvm", "kvm_amd"]}
    return facts


@pytest.fixture(scope="module")
def this_host() -> dict:
    return hostfacts.collect()


def write_facts(tmp_path: Path, facts: dict, name: str = "doctor.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(facts))
    return path


def ctx(facts: dict, profile: str = "pmu-on", accel: str | None = None) -> Context:
    return Context(accel or facts["accel"], facts, PROFILES[profile])


# --- the gate functions -----------------------------------------------------------------------------------------


def test_gate_reason_is_the_first_unavailable_expectation():
    host = intel_kvm_host()
    assert plan.gate_reason(("pmu",), ctx(host)) is None
    reason = plan.gate_reason(("pmu", "topdown"), ctx(host))
    assert reason == plan.expectation("topdown", ctx(host)).reason and reason.startswith(("kvm-limit:", "host:"))
    off = ctx(host, "pmu-off")
    assert plan.gate_reason(("pmu", "topdown"), off) == "profile: pmu-off sets pmu=off"


def test_gate_reason_of_pmu_follows_the_host_vendor():
    assert plan.expectation("pmu", ctx(amd_kvm_host())).feature == "amd_core_pmu"
    assert plan.expectation("pmu", ctx(intel_kvm_host())).feature == "arch_perfmon"


def test_unknown_expectation_name_is_a_one_line_error():
    with pytest.raises(plan.UsageError, match="expects marker names 'pmuu'"):
        plan.gate_reason(("pmuu",), ctx(intel_kvm_host()))


def test_lbr_is_legacy_or_arch_as_the_lbr_checks_combine_them():
    from harness.judge.lbr import lbr_expectation

    for profile in ("pmu-on", "intel-legacy-lbr", "intel-arch-lbr"):
        c = ctx(intel_kvm_host(), profile)
        want = lbr_expectation(plan.expectation("legacy_lbr", c), plan.expectation("arch_lbr", c))
        assert plan.expectation("lbr", c) == want


@pytest.mark.parametrize(
    ("marker", "vendor", "what", "reason"),
    [
        ("intel", "AuthenticAMD", None, "not-applicable: Intel-only check (guest vendor AuthenticAMD)"),
        ("amd", "GenuineIntel", None, "not-applicable: AMD-only check (guest vendor GenuineIntel)"),
        ("intel", "GenuineIntel", None, None),
        ("amd", "HygonGenuine", None, None),
        ("intel", None, None, None),
        ("intel", "AuthenticAMD", "IA32_PERF_CAPABILITIES is Intel-only",
         "not-applicable: IA32_PERF_CAPABILITIES is Intel-only (guest vendor AuthenticAMD)"),
    ],
)  # fmt: skip
def test_vendor_reason_keeps_the_fixture_texts(marker, vendor, what, reason):
    assert plan.vendor_reason(marker, vendor, what) == reason


def test_intel_marker_wording_is_the_perf_capabilities_verdict_wording():
    view = amd_kvm_guest_view()
    pmu = plan.expectation("pmu", ctx(amd_kvm_host()))
    faults = plan.expectation("pmu_msrs_fault", ctx(amd_kvm_host()))
    want = enumeration.perf_capabilities(pmu, faults, view).reason
    assert plan.vendor_reason("intel", view.caps.vendor, "IA32_PERF_CAPABILITIES is Intel-only") == want


# --- pseudo-gates say what the verdicts say -------------------------------------------------------------------


def test_pmu_absent_gate_is_the_pmu_msrs_fault_verdict_skip():
    host = intel_kvm_host()
    c = ctx(host)
    pmu, faults = plan.expectation("pmu", c), plan.expectation("pmu_msrs_fault", c)
    assert pmu.available
    verdict = enumeration.pmu_msrs_fault(pmu, faults, no_pmu_view())
    assert verdict.status == "skip" and plan.gate_reason(("pmu_absent", "pmu_msrs_fault"), c) == verdict.reason
    ignoring = ctx(intel_kvm_host(kvm={**host["kvm"], "ignore_msrs": "Y"}), "pmu-off")
    pmu, faults = plan.expectation("pmu", ignoring), plan.expectation("pmu_msrs_fault", ignoring)
    verdict = enumeration.pmu_msrs_fault(pmu, faults, no_pmu_view())
    assert verdict.status == "skip" and plan.gate_reason(("pmu_absent", "pmu_msrs_fault"), ignoring) == verdict.reason


def _guest_within_host(c: Context, view):
    """enumeration.guest_within_host as guest_tests/test_enumeration.py calls it."""
    return enumeration.guest_within_host(c.accel, plan.expectation("pmu", c), view, c.host["cpu"].get("caps"),
                                      kvm_offer=c.host.get("kvm_offer"), vpmu_mode=c.host.get("vpmu_mode"))  # fmt: skip


def test_host_cpu_model_gate_is_the_guest_within_host_verdict_skip(this_host):
    tcg = ctx(intel_kvm_host(), accel="tcg")
    assert _guest_within_host(tcg, intel_kvm_guest_view()).reason == plan.gate_reason(("host_cpu_model",), tcg)
    blind = intel_kvm_host()
    blind["cpu"] = {**blind["cpu"], "caps": None}
    c = ctx(blind)
    assert _guest_within_host(c, intel_kvm_guest_view()).reason == plan.gate_reason(("host_cpu_model",), c)
    assert plan.gate_reason(("host_cpu_model",), ctx(intel_kvm_host())) is None


def test_host_load_gate_is_the_host_load_verdict_skip_for_idle():
    verdict = coexist.host_load(IDLE_SPEC, None, "perf-based", {})
    assert verdict.status == "skip"
    assert plan.gate_reason(("host_load",), ctx(intel_kvm_host()), IDLE_SPEC) == verdict.reason
    busy = LoadSpec("host-sw", "software events", ("perf", "stat", "-e", "cpu-clock"))
    assert plan.gate_reason(("host_load",), ctx(intel_kvm_host()), busy) is None
    assert plan.gate_reason(("host_load",), ctx(intel_kvm_host()), None) is None


# --- guest vendor -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpu", "accel", "host_vendor", "vendor"),
    [
        ("max,pmu=on", "tcg", "GenuineIntel", "AuthenticAMD"),  # max_x86_cpu_initfn: TCG max is AMD
        ("host,pmu=on", "kvm", "GenuineIntel", "GenuineIntel"),
        ("max", "kvm", "AuthenticAMD", "AuthenticAMD"),
        ("Skylake-Client-v4,pmu=on,+pdcm", "tcg", "AuthenticAMD", "GenuineIntel"),
        ("EPYC-Genoa", "tcg", "GenuineIntel", "AuthenticAMD"),
        ("Cascadelake-Server-noTSX", "tcg", None, "GenuineIntel"),
        ("Haswell-noTSX-IBRS", "tcg", None, "GenuineIntel"),
        ("qemu64", "tcg", None, "AuthenticAMD"),
        ("Dhyana-v2", "tcg", None, "HygonGenuine"),
        ("EPYC-Genoa", "kvm", "GenuineIntel", "GenuineIntel"),  # host_cpu_instance_init: KVM takes the host's
        ("max,vendor=GenuineIntel", "tcg", None, "GenuineIntel"),
        ("NoSuchModel", "tcg", None, None),
    ],
)
def test_guest_vendor(cpu, accel, host_vendor, vendor):
    assert plan.guest_vendor(cpu, accel, host_vendor).vendor == vendor


# --- host facts --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(plan.REQUIRED_HOST_KEYS))
def test_host_facts_lacking_a_required_key_are_one_line(tmp_path, key):
    facts = intel_kvm_host()
    del facts[key]
    path = write_facts(tmp_path, facts)
    assert_one_line_error(run_cli("plan", "--host-facts", str(path)), str(path), f"lack field '{key}'")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object"), ('{"accel": 3, "host_pmu": {}, '
     '"kvm": {}, "cpu": {}}', "field 'accel' is int"), ('{"accel": "hvf", "host_pmu": {}, "kvm": {}, "cpu": {}}',
     "'hvf' (allowed: kvm, tcg, null)")],
)  # fmt: skip
def test_bad_host_facts_are_one_line(tmp_path, content, fragment):
    path = tmp_path / "doctor.json"
    path.write_text(content)
    assert_one_line_error(run_cli("plan", "--host-facts", str(path)), str(path), fragment)


def test_missing_host_facts_file_is_one_line(tmp_path):
    missing = tmp_path / "nope.json"
    assert_one_line_error(run_cli("plan", "--host-facts", str(missing)), str(missing), "cannot read")


def test_unknown_profile_is_one_line(tmp_path):
    path = write_facts(tmp_path, intel_kvm_host())
    assert_one_line_error(run_cli("plan", "--host-facts", str(path), "--profile", "nope"), "no profile 'nope'")


def test_the_vpmu_command_loads_its_plugin_without_warnings_from_anywhere(tmp_path):
    """The console script from outside the checkout, with pytest's plugin autoload off (vpmu names its plugin
    itself): every module the plugin loads (its fixtures too) is one pytest must not be asked to rewrite late, or
    a PytestAssertRewriteWarning appears, and under -W error pytest does not start at all."""
    path = write_facts(tmp_path, intel_kvm_host())
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTEST_ADDOPTS": "-W error::pytest.PytestWarning"}
    vpmu = Path(sys.executable).parent / "vpmu"
    proc = subprocess.run([str(vpmu), "plan", "--host-facts", str(path), "--profile", "pmu-off", "--json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads(proc.stdout)["profiles"][0]["checks"]


def test_a_stale_install_is_one_line_naming_the_remedy(tmp_path):
    """An editable install made before the plugin moved still names harness.pytest_plugin in its entry points: the
    command says so in one line instead of pytest's "Error while loading plugin" traceback."""
    dist = tmp_path / "site" / "vpmu-0.0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vpmu\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text("[pytest11]\nharness.pytest_plugin = harness.pytest_plugin\n")
    path = write_facts(tmp_path, intel_kvm_host())
    proc = run_cli("plan", "--host-facts", str(path), env={"PYTHONPATH": str(tmp_path / "site")})
    assert_one_line_error(proc, "stale", "harness.pytest_plugin", "scripts/install")


# --- the plan command ---------------------------------------------------------------------------------------------


def run_plan(tmp_path: Path, facts: dict, *args: str) -> dict:
    path = write_facts(tmp_path, facts)
    proc = run_cli("plan", "--host-facts", str(path), "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def checks_of(document: dict, profile: str) -> dict[str, dict]:
    entry = next(p for p in document["profiles"] if p["profile"] == profile)
    return {c["id"]: c for c in entry["checks"]}


def test_plan_of_this_machine_lists_every_profile_and_check(tmp_path, this_host):
    document = run_plan(tmp_path, this_host)
    assert document["host"]["accel"] == this_host["accel"]
    assert [p["profile"] for p in document["profiles"]] == list(PROFILES)
    ids = [set(checks_of(document, p)) for p in PROFILES]
    assert all(i == ids[0] for i in ids) and {"arch.fixed.0", "arch.fixed.3", "pebs.precise_ip.2"} <= ids[0]
    for entry in document["profiles"]:
        for check in entry["checks"]:
            assert check["runs"] == (check["reason"] is None)
        if entry["unavailable"]:
            assert all(c["reason"] == entry["unavailable"] for c in entry["checks"])
    if this_host["accel"] == "tcg":
        on = checks_of(document, "pmu-on")
        assert on["arch.gp.instructions"]["reason"].startswith(TCG_REASON)
        assert on["arch.fixed.0"]["reason"] == "not-applicable: Intel-only check (guest vendor AuthenticAMD)"
        assert on["enum.pmu_visible"]["runs"] and on["ibs.enumeration"]["runs"]
        model = checks_of(document, "intel-model")
        assert model["lbr.legacy_enumeration"]["runs"] and model["topdown.enumeration"]["runs"]
        assert model["enum.perf_capabilities"]["reason"].startswith(TCG_REASON)


def test_plan_of_an_intel_kvm_host(tmp_path):
    document = run_plan(tmp_path, intel_kvm_host())
    on = checks_of(document, "pmu-on")
    assert all(c["runs"] for i, c in on.items() if i.startswith("arch.gp.") or i.startswith("arch.fixed."))
    assert on["enum.pmu_msrs_fault"]["reason"] == plan.VPMU_ON_REASON
    assert on["enum.guest_within_host"]["runs"] and on["enum.perf_capabilities"]["runs"]
    assert on["ibs.enumeration"]["reason"] == "not-applicable: AMD-only check (guest vendor GenuineIntel)"
    assert on["topdown.metrics"]["reason"] == plan.expectation("topdown", ctx(intel_kvm_host())).reason
    assert on["coexist.host_load"]["reason"] == plan.IDLE_LOAD_REASON
    off = checks_of(document, "pmu-off")
    assert off["arch.gp.instructions"]["reason"] == "profile: pmu-off sets pmu=off"
    assert off["enum.pmu_msrs_fault"]["runs"]
    profiles = {p["profile"]: p for p in document["profiles"]}
    assert profiles["intel-model"]["unavailable"] == "profile: intel-model applies to tcg, not kvm"
    assert profiles["amd-ibs"]["unavailable"] == "host: CPU vendor is GenuineIntel, not AuthenticAMD"
    assert profiles["pmu-on"]["guest_vendor"] == "GenuineIntel"


def test_plan_of_an_amd_kvm_host_runs_no_intel_only_check(tmp_path):
    on = checks_of(run_plan(tmp_path, amd_kvm_host(), "--profile", "pmu-on"), "pmu-on")
    assert on["arch.gp.instructions"]["runs"] and on["ibs.enumeration"]["runs"]
    assert on["arch.fixed.0"]["reason"] == "not-applicable: Intel-only check (guest vendor AuthenticAMD)"
    assert on["enum.perf_capabilities"]["reason"] == (
        "not-applicable: IA32_PERF_CAPABILITIES is Intel-only (guest vendor AuthenticAMD)"
    )


def test_plan_text_has_a_line_per_check_and_counts(tmp_path):
    path = write_facts(tmp_path, intel_kvm_host())
    proc = run_cli("plan", "--host-facts", str(path), "--profile", "pmu-on", "--profile", "pmu-off")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("host spr-kvm: GenuineIntel family 6 model 0x8f")
    assert "RUN  pmu-on  arch.gp.instructions" in lines
    assert "SKIP pmu-off  arch.gp.instructions  profile: pmu-off sets pmu=off" in lines
    counts = [line for line in lines if line.startswith(("pmu-on: ", "pmu-off: "))]
    assert len(counts) == 2 and all(" checks, " in line and " run, " in line for line in counts)


def test_plan_for_kvm_on_a_host_without_kvm_is_one_line(tmp_path):
    path = write_facts(tmp_path, intel_kvm_host(accel="tcg", accel_reason="KVM unusable: no /dev/kvm"))
    proc = run_cli("plan", "--host-facts", str(path), "--accel", "kvm")
    assert_one_line_error(proc, "--accel kvm: KVM is not usable on that host (KVM unusable: no /dev/kvm)")


def test_plan_with_no_accelerator_marks_every_profile_unavailable(tmp_path):
    facts = intel_kvm_host(accel=None, accel_reason="no KVM and no QEMU")
    document = run_plan(tmp_path, facts, "--profile", "pmu-on")
    entry = document["profiles"][0]
    assert entry["unavailable"] == "host: no usable accelerator (no KVM and no QEMU)"
    assert not any(c["runs"] for c in entry["checks"])


# --- shipped host files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", HOST_FILES, ids=[p.stem for p in HOST_FILES])
def test_plan_of_each_shipped_host(tmp_path, path):
    facts = plan.load_host_facts(path)
    document = run_plan(tmp_path, facts)
    profiles = {p["profile"]: p for p in document["profiles"]}
    vendor = facts["cpu"]["vendor"]
    on = checks_of(document, "pmu-on")
    c = ctx(facts)
    pmu = plan.expectation("pmu", c)
    # arch.* run exactly where the vPMU is expected; otherwise each SKIPs with the expectation's reason
    for check_id, check in on.items():
        if check_id.startswith("arch.gp."):
            assert check["runs"] == pmu.available and (check["runs"] or check["reason"] == pmu.reason), check
    if facts["accel"] == "kvm":
        assert profiles["pmu-on"]["guest_vendor"] == vendor
        assert profiles["intel-model"]["unavailable"] == "profile: intel-model applies to tcg, not kvm"
        other = "ibs.enumeration" if vendor == "GenuineIntel" else "lbr.legacy_enumeration"
        assert on[other]["reason"].startswith("not-applicable:")
    topdown = profiles.get("intel-topdown")
    if topdown and not topdown["unavailable"]:
        metrics = {c["id"]: c for c in topdown["checks"]}["topdown.metrics"]
        expected = plan.expectation("topdown", ctx(facts, "intel-topdown"))
        assert metrics["runs"] == expected.available and (metrics["runs"] or metrics["reason"] == expected.reason)
    for entry in document["profiles"]:
        if entry["unavailable"]:
            assert not any(c["runs"] for c in entry["checks"]), entry["profile"]
        else:
            assert any(c["runs"] for c in entry["checks"]), entry["profile"]  # enumeration checks always judge


def test_plan_of_the_sapphire_rapids_perf_based_host(tmp_path):
    path = HOSTS_DIR / "spr-perf-based.json"
    if not path.exists():
        pytest.skip(f"no {path} (shipped by tests/data/hosts)")
    facts = plan.load_host_facts(path)
    document = run_plan(tmp_path, facts)
    on = checks_of(document, "pmu-on")
    assert all(c["runs"] for i, c in on.items() if i.startswith(("arch.gp.", "arch.fixed.")) or i == "arch.rdpmc")
    topdown = checks_of(document, "intel-topdown")
    assert topdown["topdown.enumeration"]["runs"]  # it judges absence too
    for check_id in ("topdown.metrics", "topdown.width", "topdown.workloads", "topdown.rdpmc"):
        assert topdown[check_id]["reason"].startswith("kvm-limit:"), topdown[check_id]


@pytest.mark.integration
def test_plan_agrees_with_a_real_run_here(suite_run, tmp_path, this_host):
    """plan on this machine's doctor --json vs the real run: every check the run SKIPped the plan does not run, with
    the same reason, and every check the run judged the plan runs."""
    _proc, out = suite_run
    document = run_plan(tmp_path, this_host)
    planned = {p["profile"]: {c["id"]: c for c in p["checks"]} for p in document["profiles"]}
    real = json.loads((out / "results.json").read_text())
    compared = 0
    for run in real["runs"]:
        assert run["load"] == IDLE
        for check in run["checks"]:
            guess = planned[run["profile"]][check["id"]]
            assert (check["status"] == "skip") == (not guess["runs"]), (run["profile"], check, guess)
            if check["status"] == "skip":
                assert check["reason"] == guess["reason"], (run["profile"], check["id"])
            compared += 1
    assert compared == sum(len(r["checks"]) for r in real["runs"]) > 0


def test_check_gate_reads_markers_as_the_fixture_does():
    """check_gate = vendor marker first, then the closest expects marker (a function's overrides its module's)."""
    marks = {"intel": SimpleNamespace(args=()), plan.EXPECTS_MARKER: SimpleNamespace(args=("pmu",))}
    node = SimpleNamespace(get_closest_marker=lambda name: marks.get(name))
    host = intel_kvm_host()
    assert plan.check_gate(node, ctx(host), "AuthenticAMD", IDLE_SPEC).startswith("not-applicable: Intel-only")
    assert plan.check_gate(node, ctx(host, "pmu-off"), "GenuineIntel", IDLE_SPEC) == "profile: pmu-off sets pmu=off"
    assert plan.check_gate(node, ctx(host), "GenuineIntel", IDLE_SPEC) is None
    assert copy.deepcopy(host) == intel_kvm_host()  # the gate never changes the facts


def test_mediated_host_with_the_nmi_watchdog_cannot_run_any_kvm_profile(tmp_path):
    """perf_create_mediated_pmu() -EBUSY at vCPU creation: every KVM profile is unavailable, with what to do."""
    facts = json.loads((HOSTS_DIR / "spr-mediated.json").read_text())
    facts["sysctls"]["kernel.nmi_watchdog"] = "1"
    proc = run_cli("plan", "--host-facts", str(write_facts(tmp_path, facts)), "--json")
    profiles = {p["profile"]: p for p in json.loads(proc.stdout)["profiles"]}
    for name in ("pmu-off", "pmu-on", "intel-pebs"):
        reason = profiles[name]["unavailable"]
        assert reason.startswith("host: mediated vPMU and nmi_watchdog=1"), reason
        assert "echo 0 > /proc/sys/kernel/nmi_watchdog" in reason


def test_offer_overrides_are_named_on_the_checks_they_change():
    """A backport: KVM offers fixed counter 3 and PERF_METRICS where kvm_features.toml says upstream does not."""
    from harness.cpu.profile import Profile

    facts = json.loads((HOSTS_DIR / "spr-mediated.json").read_text())
    perfmon = facts["kvm_offer"]["pmu"]["arch_perfmon"]
    perfmon.update(fixed_counters=4, fixed_counter_mask=0xF)
    facts["kvm_offer"]["perf_capabilities"] |= 1 << 15
    facts["kvm_offer"]["perf_capabilities_decoded"] = decode_perf_capabilities(facts["kvm_offer"]["perf_capabilities"])
    topdown = Profile("td", "d", "host,pmu=on,migratable=no,+perf-metrics", None, ("kvm",))
    c = Context("kvm", facts, topdown)
    assert plan.gate_reason(("topdown",), c) is None
    notes = plan.gate_notes(("topdown",), c)
    assert len(notes) == 1 and notes[0].startswith("topdown: the KVM offer shows it") and "the offer wins" in notes[0]
    from harness.judge.expectations import host_offer_notes

    assert any(n.startswith("topdown:") for n in host_offer_notes(facts))
