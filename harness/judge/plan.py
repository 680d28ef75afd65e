"""Pre-gating and ``python -m harness plan``: which checks a run would measure on a host, and why the others SKIP.

A check declares the expectations that gate it with ``@pytest.mark.expects(name, ...)``; the ``check`` fixture
SKIPs it before any probe runs when one of them does not hold here, with the expectation engine's own reason
(:func:`gate_reason`). ``plan`` collects the same suite, with the same markers, and applies the same functions to a
host's ``doctor --json`` without booting anything, so its reasons are the run's, word for word. What only a booted
guest can tell (its CPUID, which QEMU properties exist, what QEMU granted) stays with the run: there the guest's
own view is the truth, and the plan predicts it from the accelerator and the CPU model (:func:`guest_vendor`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.cpu.model import CpuModel
from harness.cpu.profile import Profile
from harness.errors import UsageError
from harness.host.loads import LoadSpec
from harness.judge.enumeration import pmu_off_unjudgeable
from harness.judge.expectations import FEATURES_FILE, Context, Expectation, FeatureRule, expect, first_unmet, load_rules
from harness.judge.expectations import pmu_feature as _pmu_feature
from harness.judge.lbr import lbr_expectation

#: The marker that names a check's gating expectations (registered by harness.suite.pytest_plugin).
EXPECTS_MARKER = "expects"
#: Keys ``plan`` and ``rejudge --host-facts`` need in a doctor JSON (``python -m harness doctor --json``).
REQUIRED_HOST_KEYS = {"accel": (str, type(None)), "host_pmu": dict, "kvm": dict, "cpu": dict}
INTEL = "GenuineIntel"
#: CPUID vendors the guest kernel and harness.cpu.caps treat as AMD (Hygon shares the AMD PMU leaves).
AMD_VENDORS = ("AuthenticAMD", "HygonGenuine")

# --- which expectation a name means -------------------------------------------------------------------------

_RULES_CACHE: dict[Path, tuple[tuple[int, int], dict[str, FeatureRule]]] = {}


def rules(path: Path = FEATURES_FILE) -> dict[str, FeatureRule]:
    """``load_rules()``, parsed again only when the file changed: a plan asks hundreds of times per host."""
    stat = Path(path).stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _RULES_CACHE.get(Path(path))
    if cached is None or cached[0] != stamp:
        cached = (stamp, load_rules(path))
        _RULES_CACHE[Path(path)] = cached
    return cached[1]


def _lbr(ctx: Context) -> Expectation:
    table = rules()
    return lbr_expectation(expect(table["legacy_lbr"], ctx), expect(table["arch_lbr"], ctx))


def _pmu(ctx: Context) -> Expectation:
    return expect(rules()[_pmu_feature(ctx)], ctx)


#: Reason texts of the ctx-only SKIPs some verdicts make before looking at any measurement, and that are not a
#: kvm_features.toml rule. The verdict functions say the same words (tests/test_plan.py holds them together).
VPMU_ON_REASON = "profile: the vPMU is on; counter MSR bounds are checked by arch.msr_bounds"
CPUID_UNREADABLE_REASON = "host: CPUID not readable (no /dev/cpu/0/cpuid access and CPUID not executable)"
IDLE_LOAD_REASON = "not-applicable: the idle baseline runs no host load"


def _pmu_absent(ctx: Context) -> Expectation:
    """enum.pmu_msrs_fault judges the no-vPMU case only (enumeration.pmu_msrs_fault: the vPMU on -> SKIP)."""
    pmu = _pmu(ctx)
    if pmu.available:
        return Expectation("pmu_absent", False, VPMU_ON_REASON)
    return Expectation("pmu_absent", True, f"no vPMU: {pmu.reason}")


def _host_cpu_model(ctx: Context) -> Expectation:
    """enum.guest_within_host compares the guest with the host it is derived from: KVM only, host CPUID known
    (enumeration.guest_within_host)."""
    if ctx.accel != "kvm":
        return Expectation("host_cpu_model", False, f"accel: under {ctx.accel.upper()} the guest CPU model is QEMU's "
                           "own, not derived from the host")  # fmt: skip
    if ctx.host.get("cpu", {}).get("caps") is None:
        return Expectation("host_cpu_model", False, CPUID_UNREADABLE_REASON)
    return Expectation("host_cpu_model", True, "the guest CPU model is derived from the host's (KVM)")


def _pmu_off_judged(ctx: Context) -> Expectation:
    """enum.pmu_visible / enum.pmu_msrs_fault cannot judge a pmu=off profile whose pmu=off does not reach KVM (AMD
    hosts with released QEMU): enumeration.pmu_off_unjudgeable decides, with the pmu_off_honoured rule's reason."""
    found = pmu_off_unjudgeable(_pmu(ctx), expectation("pmu_off_honoured", ctx))
    if found is not None:
        return Expectation("pmu_off_judged", False, found.reason)
    return Expectation("pmu_off_judged", True, "pmu=off (if asked) takes the vPMU away here")


#: Names beyond kvm_features.toml's rules. "pmu" and "lbr" are the combined expectations the verdicts use;
#: the others are the ctx-only preconditions above.
def _two_vcpus(ctx: Context) -> Expectation:
    """The per-vCPU canaries (coexist.vcpu_canary.*) need a second vCPU: one the load reaches, one it does not
    (profiles.toml ``smp``; harness.judge.coexist_depth.vcpu_canary gives the same reason)."""
    if ctx.profile.smp < 2:
        return Expectation("two_vcpus", False, f"profile: {ctx.profile.name} has {ctx.profile.smp} vCPU; the per-vCPU "
                           "canaries need two (smp = 2, e.g. profile pmu-on-2vcpu)")  # fmt: skip
    return Expectation("two_vcpus", True, f"profile {ctx.profile.name} has {ctx.profile.smp} vCPUs")


PSEUDO: dict[str, Callable[[Context], Expectation]] = {
    "pmu": _pmu,
    "lbr": _lbr,
    "pmu_absent": _pmu_absent,
    "host_cpu_model": _host_cpu_model,
    "pmu_off_judged": _pmu_off_judged,
    "two_vcpus": _two_vcpus,
}
#: A pseudo-name decided by the host load, not the context: coexist.host_load judges a load, and idle runs none.
HOST_LOAD = "host_load"


def expectation(name: str, ctx: Context) -> Expectation:
    """The expectation ``name`` means here: a pseudo-name (:data:`PSEUDO`) or a kvm_features.toml rule.

    :raises UsageError: no such name (a misspelt marker is a bug in the suite, reported as one line).
    """
    if name in PSEUDO:
        return PSEUDO[name](ctx)
    table = rules()
    if name not in table:
        known = ", ".join([*PSEUDO, HOST_LOAD, *table])
        raise UsageError(f"expects marker names '{name}', which is no expectation (known: {known})")
    return expect(table[name], ctx)


def gate_reason(expects: tuple[str, ...], ctx: Context, load: LoadSpec | None = None) -> str | None:
    """The SKIP reason of the first expectation in ``expects`` that does not hold here, or None (the check runs).

    The reasons are the expectation engine's (expectations.expect), as the verdicts' own gate() gives them.
    ``load`` is the host load the check runs under (the ``host_load`` pseudo-name; None: not known, no gate).
    """
    for name in expects:
        if name == HOST_LOAD:
            if load is not None and load.idle:
                return IDLE_LOAD_REASON
            continue
        found = expectation(name, ctx)
        if not found.available:
            return found.reason
    return None


def gate_notes(expects: tuple[str, ...], ctx: Context) -> list[str]:
    """Where the measured KVM offer overrode kvm_features.toml for the expectations that gate a check: the check's
    reason carries them, so a backport or a newer kernel shows up on the very checks it changes."""
    notes = []
    for name in expects:
        if name == HOST_LOAD:
            continue
        found = expectation(name, ctx)
        if found.available and found.note:
            notes.append(f"{found.feature}: {found.note}")
    return notes


def vendor_reason(marker: str, vendor: str | None, what: str | None = None) -> str | None:
    """The SKIP reason of an ``intel``/``amd`` check on a guest of another vendor (None: it applies, or the vendor
    is unknown before boot). ``what`` is the marker's own wording, e.g. "IA32_PERF_CAPABILITIES is Intel-only"."""
    if vendor is None:
        return None
    if marker == "intel" and vendor != INTEL:
        return f"not-applicable: {what or 'Intel-only check'} (guest vendor {vendor})"
    if marker == "amd" and vendor not in AMD_VENDORS:
        return f"not-applicable: {what or 'AMD-only check'} (guest vendor {vendor})"
    return None


def marker_expects(node: Any) -> tuple[str, ...]:
    """The item's ``expects`` names; the closest marker wins (a function's marker overrides its module's)."""
    marker = node.get_closest_marker(EXPECTS_MARKER)
    return tuple(marker.args) if marker else ()


def vendor_gate(node: Any, vendor: str | None) -> str | None:
    """The SKIP reason of the item's ``intel``/``amd`` marker for a guest of ``vendor`` (None: it applies)."""
    for marker_name in ("intel", "amd"):
        marker = node.get_closest_marker(marker_name)
        if marker is not None:
            reason = vendor_reason(marker_name, vendor, marker.args[0] if marker.args else None)
            if reason:
                return reason
    return None


def check_gate(node: Any, ctx: Context, vendor: str | None, load: LoadSpec | None) -> str | None:
    """Why a check SKIPs before measuring (vendor marker vs the guest vendor, then its expectations), or None.

    The ``check`` fixture applies the same two functions with the booted guest's vendor; ``plan`` with
    :func:`guest_vendor`'s prediction.
    """
    return vendor_gate(node, vendor) or gate_reason(marker_expects(node), ctx, load)


def profile_unavailable(profile: Profile, ctx: Context) -> str | None:
    """Why a profile cannot run here before QEMU is asked: the accelerator, then its ``requires`` (ProfileRun.start
    adds what only this QEMU can say, a missing ``-cpu`` property)."""
    if not profile.applies_to(ctx.accel):
        return f"profile: {profile.name} applies to {', '.join(profile.accels)}, not {ctx.accel}"
    # A host precondition of every KVM guest, not of one feature: an include-guest host event (the NMI watchdog)
    # makes KVM refuse the vCPU under the mediated vPMU, so QEMU could not even start.
    return first_unmet(("mediated_vm_creatable", *profile.requires), ctx)


# --- the guest's CPU vendor, before boot --------------------------------------------------------------------

#: CPUID vendor of QEMU's named CPU models, by model family (the name without -vN / -IBRS / -noTSX suffixes):
#: QEMU target/i386/cpu.c builtin_x86_defs[] ``.vendor`` (CPUID_VENDOR_INTEL / _AMD / _HYGON / _ZHAOXIN1), checked
#: against QEMU 7.2's query-cpu-model-expansion of every model. Under TCG the model's vendor is what the guest sees;
#: under KVM QEMU replaces it with the host's (target/i386/host-cpu.c host_cpu_instance_init(): "setting vendor
#: applies to both max/host and builtin_x86_defs CPU").
MODEL_VENDORS: dict[str, str] = {
    **dict.fromkeys((
        "486", "pentium", "pentium2", "pentium3", "coreduo", "core2duo", "n270", "kvm32", "kvm64", "qemu32",
        "Conroe", "Penryn", "Nehalem", "Westmere", "SandyBridge", "IvyBridge", "Haswell", "Broadwell",
        "Skylake-Client", "Skylake-Server", "Cascadelake-Server", "Cooperlake", "Icelake-Client", "Icelake-Server",
        "SapphireRapids", "GraniteRapids", "SierraForest", "ClearwaterForest", "Denverton", "Snowridge",
        "KnightsMill",
    ), INTEL),
    **dict.fromkeys((
        "athlon", "phenom", "qemu64", "Opteron_G1", "Opteron_G2", "Opteron_G3", "Opteron_G4", "Opteron_G5", "EPYC",
        "EPYC-IBPB", "EPYC-Rome", "EPYC-Milan", "EPYC-Genoa", "EPYC-Turin",
    ), "AuthenticAMD"),
    "Dhyana": "HygonGenuine",
    "YongFeng": "CentaurHauls",
}  # fmt: skip
#: QEMU's ``max`` CPU under TCG: target/i386/cpu.c max_x86_cpu_initfn() sets vendor CPUID_VENDOR_AMD ("these
#: defaults are used for TCG; other accelerators overwrite these values"); QEMU 7.2's TCG ``max`` expands to it.
TCG_MAX_VENDOR = "AuthenticAMD"
_SUFFIXES = ("-IBRS", "-noTSX", "-noTSX-IBRS")


def _model_family(name: str) -> str:
    base, sep, version = name.rpartition("-v")
    if sep and version.isdigit():
        name = base
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


@dataclass(frozen=True)
class VendorGuess:
    """The CPUID vendor a guest will report, and where that comes from (None: unknown until it boots)."""

    vendor: str | None
    why: str


def guest_vendor(cpu_text: str, accel: str, host_vendor: str | None) -> VendorGuess:
    """Predict the guest's CPUID vendor from the ``-cpu`` value and the accelerator, without booting."""
    cpu = CpuModel.parse(cpu_text)
    if isinstance(cpu.props.get("vendor"), str):
        return VendorGuess(cpu.props["vendor"], "the -cpu vendor= property")
    if accel == "kvm":
        return VendorGuess(host_vendor, "KVM: QEMU gives every CPU model the host's vendor (host_cpu_instance_init)")
    if cpu.name == "max":
        return VendorGuess(TCG_MAX_VENDOR, "TCG 'max' reports AuthenticAMD (max_x86_cpu_initfn)")
    family = _model_family(cpu.name)
    if family in MODEL_VENDORS:
        return VendorGuess(MODEL_VENDORS[family], f"QEMU model {cpu.name} (builtin_x86_defs)")
    return VendorGuess(None, f"unknown QEMU model {cpu.name}: the vendor is known once the guest boots")


# --- host facts (doctor --json) -----------------------------------------------------------------------------


def load_host_facts(path: Path) -> dict[str, Any]:
    """Read a ``python -m harness doctor --json`` file.

    :raises UsageError: unreadable, not JSON, not an object, or a required field missing or of the wrong type;
        one line naming the file and the field.
    """
    try:
        facts = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read host facts: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: host facts are not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: host facts are not text (not UTF-8 at byte {exc.start})") from None
    if not isinstance(facts, dict):
        raise UsageError(f"{path}: host facts must be a JSON object (the output of python -m harness doctor --json)")
    for key, kind in REQUIRED_HOST_KEYS.items():
        if key not in facts:
            raise UsageError(f"{path}: host facts lack field '{key}' (not a python -m harness doctor --json output?)")
        if not isinstance(facts[key], kind):
            raise UsageError(f"{path}: host facts field '{key}' is {type(facts[key]).__name__}, expected "
                             f"{'string or null' if key == 'accel' else 'object'}")  # fmt: skip
    if facts["accel"] not in ("kvm", "tcg", None):
        raise UsageError(f"{path}: host facts field 'accel' is {facts['accel']!r} (allowed: kvm, tcg, null)")
    return facts


def host_summary(facts: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """The ``host`` object of a plan: who the host is, in a line's worth of facts."""
    cpu = facts.get("cpu") or {}
    caps = cpu.get("caps") or {}
    return {"hostname": facts.get("hostname"), "source": source,
            "cpu": {"vendor": cpu.get("vendor"), "family": caps.get("family"), "model": caps.get("model"),
                    "model_name": cpu.get("model_name")},
            "kernel": facts.get("kernel"), "accel": facts.get("accel"),
            "vpmu_mode": facts.get("vpmu_mode")}  # fmt: skip


# --- the plan document ----------------------------------------------------------------------------------------


@dataclass
class PlannedProfile:
    """One profile of a plan: whether it can run here, the guest vendor it will have, and each check's fate."""

    profile: Profile
    cpu: str | None
    unavailable: str | None
    vendor: VendorGuess | None
    checks: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"profile": self.profile.name, "cpu": self.cpu, "unavailable": self.unavailable,
                "guest_vendor": self.vendor.vendor if self.vendor else None,
                "guest_vendor_source": self.vendor.why if self.vendor else None, "checks": self.checks}  # fmt: skip


def plan_profile(profile: Profile, accel: str | None, facts: dict[str, Any], nodes: list[tuple[str, Any]],
                 idle: LoadSpec) -> PlannedProfile:  # fmt: skip
    """Decide every check of one profile: ``nodes`` are (check id, pytest item) in collection order."""
    if accel is None:
        reason = f"host: no usable accelerator ({facts.get('accel_reason') or 'doctor found none'})"
        checks = [{"id": check_id, "runs": False, "reason": reason} for check_id, _node in nodes]
        return PlannedProfile(profile, None, reason, None, checks)
    ctx = Context(accel, facts, profile)
    unavailable = profile_unavailable(profile, ctx)
    vendor = guest_vendor(profile.cpu_for(accel), accel, ctx.host_vendor)
    checks = []
    for check_id, node in nodes:
        reason = unavailable or check_gate(node, ctx, vendor.vendor, idle)
        checks.append({"id": check_id, "runs": reason is None, "reason": reason})
    return PlannedProfile(profile, profile.cpu_for(accel), unavailable, vendor, checks)


def render_text(document: dict[str, Any]) -> str:
    """The plan as the run prints checks: ``RUN  profile  id`` / ``SKIP profile  id  reason``, and counts."""
    host = document["host"]
    cpu = host["cpu"]
    model = f"{cpu['model']:#x}" if isinstance(cpu.get("model"), int) else cpu.get("model")
    lines = [f"host {host['hostname']}: {cpu['vendor']} family {cpu['family']} model {model}, kernel "
             f"{host['kernel']}, accel {host['accel']}, vPMU mode {host['vpmu_mode']}"]  # fmt: skip
    for entry in document["profiles"]:
        name = entry["profile"]
        if entry["unavailable"]:
            lines.append(f"profile {name}: unavailable: {entry['unavailable']}")
        else:
            lines.append(f"profile {name}: -cpu {entry['cpu']}, guest vendor {entry['guest_vendor'] or 'unknown'} "
                         f"({entry['guest_vendor_source']})")  # fmt: skip
        for check in entry["checks"]:
            status = "RUN" if check["runs"] else "SKIP"
            lines.append(f"{status:5}{name}  {check['id']}" + (f"  {check['reason']}" if check["reason"] else ""))
        runs = sum(1 for c in entry["checks"] if c["runs"])
        lines.append(f"{name}: {len(entry['checks'])} checks, {runs} run, {len(entry['checks']) - runs} skip")
    return "\n".join(lines)
