"""The expectation engine: from host facts x profile x accelerator, is a feature expected in the guest?

Rules are data (``guest_tests/kvm_features.toml``): per feature, the conditions that must all hold. Conditions
are named Python predicates (no strings are evaluated); each returns None when it holds, or the reason it
does not, prefixed with where the fact comes from (``accel:``, ``host:``, ``profile:``, ``kvm-limit:``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.cpu_model import CpuModel
from harness.datafiles import KeySpec, check_table, read_toml
from harness.errors import UsageError
from harness.paths import GUEST_TESTS_DIR
from harness.profiles import Profile

FEATURES_FILE = GUEST_TESTS_DIR / "kvm_features.toml"
FEATURE_KEYS: KeySpec = {
    "description": (str, True, "what the feature is"),
    "needs": (list, True, "conditions that must all hold, from CONDITIONS"),
    "limits": (dict, False, "caps KVM puts on what the guest sees"),
    "sources": (list, False, "where each rule comes from"),
}
_ON = ("Y", "1", "y")


@dataclass(frozen=True)
class Context:
    """Everything an expectation depends on, decided before the guest runs."""

    accel: str
    host: dict[str, Any]
    profile: Profile

    @property
    def cpu(self) -> CpuModel:
        return CpuModel.parse(self.profile.cpu_for(self.accel))

    @property
    def host_vendor(self) -> str | None:
        return self.host.get("cpu", {}).get("vendor")


def _accel_kvm(ctx: Context) -> str | None:
    if ctx.accel == "kvm":
        return None
    why = ctx.host.get("accel_reason", "")
    why = why.removeprefix("KVM unusable: ").split(";")[0] if why.startswith("KVM unusable") else "KVM not chosen"
    return f"accel: no vPMU under {ctx.accel.upper()} (QEMU fills the PMU CPUID leaves only from KVM; {why})"


def _kvm_enable_pmu(ctx: Context) -> str | None:
    value = ctx.host.get("kvm", {}).get("enable_pmu")
    return None if value in _ON else f"host: kvm.enable_pmu={value}"


def _host_vendor(wanted: str) -> Callable[[Context], str | None]:
    def check(ctx: Context) -> str | None:
        return None if ctx.host_vendor == wanted else f"host: CPU vendor is {ctx.host_vendor}, not {wanted}"

    return check


def _host_pmu(ctx: Context) -> str | None:
    if ctx.host.get("host_pmu", {}).get("present"):
        return None
    return "host: no hardware PMU (no cpu/cpu_core/cpu_atom PMU under /sys/bus/event_source/devices)"


def _host_not_hybrid(ctx: Context) -> str | None:
    if not ctx.host.get("host_pmu", {}).get("hybrid"):
        return None
    return "kvm-limit: KVM disables the vPMU on hybrid hosts (Linux 6.2+)"


def _profile_pmu(ctx: Context) -> str | None:
    cpu = ctx.cpu
    if cpu.pmu_requested():
        return None
    how = "sets pmu=off" if "pmu" in cpu.props else f"uses model '{cpu.name}', whose pmu property defaults to off"
    return f"profile: {ctx.profile.name} {how}"


def _kvm_ignore_msrs_off(ctx: Context) -> str | None:
    value = ctx.host.get("kvm", {}).get("ignore_msrs")
    return "host: kvm.ignore_msrs=Y (KVM swallows the #GP)" if value in _ON else None


def _host_perf_caps(ctx: Context) -> tuple[dict[str, Any] | None, str]:
    facts = ctx.host.get("cpu", {}).get("perf_capabilities") or {}
    return facts.get("value"), facts.get("reason") or "not an Intel host"


def _host_perf_cap(field_name: str, what: str, minimum: int = 1) -> Callable[[Context], str | None]:
    def check(ctx: Context) -> str | None:
        caps, why = _host_perf_caps(ctx)
        if caps is None:
            return f"host: IA32_PERF_CAPABILITIES unknown ({why})"
        value = int(caps.get(field_name) or 0)
        return None if value >= minimum else f"host: {what} (IA32_PERF_CAPABILITIES.{field_name}={value})"

    return check


def _host_caps(ctx: Context) -> dict[str, Any]:
    return ctx.host.get("cpu", {}).get("caps") or {}


def _host_legacy_lbr(ctx: Context) -> str | None:
    if _host_caps(ctx).get("arch_lbr"):
        return "kvm-limit: KVM gives no guest LBR on arch-LBR hosts ('Disallow enabling LBR support if the CPU " \
               "supports architectural LBRs', 2023)"  # fmt: skip
    return _host_perf_cap("lbr_format", "no legacy LBR")(ctx)


def _host_arch_lbr(ctx: Context) -> str | None:
    return None if _host_caps(ctx).get("arch_lbr") else "host: no arch LBR (CPUID.07H:EDX[19] clear)"


def _host_ibs(ctx: Context) -> str | None:
    amd = _host_caps(ctx).get("amd") or {}
    return None if amd.get("ibs") else "host: no IBS (CPUID 80000001H:ECX[10] / 8000001BH)"


def _vpmu_mediated(ctx: Context) -> str | None:
    mode = ctx.host.get("vpmu_mode")
    return (
        None if mode == "mediated" else f"kvm-limit: needs the mediated vPMU (enable_mediated_pmu=Y); vPMU mode {mode}"
    )


def _vpmu_not_mediated(ctx: Context) -> str | None:
    if ctx.host.get("vpmu_mode") != "mediated":
        return None
    return "kvm-limit: no guest PEBS with the mediated vPMU (vmx_pebs_supported() is false with enable_mediated_pmu)"


def _profile_perf_caps_passthrough(ctx: Context) -> str | None:
    props = ctx.cpu.props
    if props.get("migratable") is False or "lbr-fmt" in props or "pebs-fmt" in props:
        return None
    return (f"profile: {ctx.profile.name} keeps migratable=on without lbr-fmt/pebs-fmt, so QEMU hides the host's "
            "LBR/PEBS formats in IA32_PERF_CAPABILITIES")  # fmt: skip


def _profile_has(prop: str) -> Callable[[Context], str | None]:
    def check(ctx: Context) -> str | None:
        return None if ctx.cpu.props.get(prop) else f"profile: {ctx.profile.name} does not request +{prop}"

    return check


#: Upstream KVM limits with no host-side switch: a feature that needs one of these is "expected absent (why)".
#: Edit kvm_features.toml (drop the condition from `needs`) when a kernel gains the feature.
KVM_LIMITS = {
    "kvm_guest_arch_lbr": "kvm-limit: upstream KVM has no guest arch-LBR support (its KVM series was never merged; "
    "QEMU's arch-lbr gets filtered)",
    "kvm_guest_topdown": "kvm-limit: guest fixed counter 3 / PERF_METRICS exist only in a 2026 mediated-vPMU series "
    "(not upstream as found)",
    "kvm_guest_adaptive_pebs": "kvm-limit: KVM disallows adaptive PEBS (PERF_CAPABILITIES[14]) for guests since "
    "March 2024 (stable)",
    "kvm_guest_ibs": "kvm-limit: IBS virtualization (VIBS) is an unmerged series on top of the mediated vPMU",
    "kvm_guest_ldlat": "kvm-limit: the perf-based vPMU does not emulate MSR_PEBS_LD_LAT_THRESHOLD (0x3f6): "
    "load-latency events fail with ENXIO",
}


def _kvm_limit(name: str) -> Callable[[Context], str | None]:
    return lambda _ctx: KVM_LIMITS[name]


#: Intel models with PEBS-via-EPT (guest PEBS): Ice Lake server (0x6A, 0x6C), Sapphire Rapids (0x8F), Emerald
#: Rapids (0xCF), Granite Rapids (0xAD, 0xAE) (reference probe-reference.md §4e; KVM intel_pmu_lbr/pebs_ept).
PEBS_EPT_MODELS = {0x6A, 0x6C, 0x8F, 0xCF, 0xAD, 0xAE}


def _host_pebs_ept(ctx: Context) -> str | None:
    caps = _host_caps(ctx)
    if caps.get("family") == 6 and caps.get("model") in PEBS_EPT_MODELS:
        return None
    return f"host: model {caps.get('model', '?')} has no PEBS-via-EPT (guest PEBS needs ICX, SPR, EMR or GNR)"


CONDITIONS: dict[str, Callable[[Context], str | None]] = {
    "accel_kvm": _accel_kvm,
    "kvm_enable_pmu": _kvm_enable_pmu,
    "host_intel": _host_vendor("GenuineIntel"),
    "host_amd": _host_vendor("AuthenticAMD"),
    "host_pmu": _host_pmu,
    "host_not_hybrid": _host_not_hybrid,
    "profile_pmu": _profile_pmu,
    "kvm_ignore_msrs_off": _kvm_ignore_msrs_off,
    "host_perf_metrics": _host_perf_cap("perf_metrics", "no PERF_METRICS"),
    "host_legacy_lbr": _host_legacy_lbr,
    "host_arch_lbr": _host_arch_lbr,
    "host_pebs": _host_perf_cap("pebs_format", "no PEBS"),
    "host_pebs_ept": _host_pebs_ept,
    "host_ibs": _host_ibs,
    "vpmu_mediated": _vpmu_mediated,
    "vpmu_not_mediated": _vpmu_not_mediated,
    "profile_perf_caps_passthrough": _profile_perf_caps_passthrough,
    "profile_arch_lbr": _profile_has("arch-lbr"),
    "profile_ibs": _profile_has("ibs"),
    **{name: _kvm_limit(name) for name in KVM_LIMITS},
}


@dataclass(frozen=True)
class FeatureRule:
    name: str
    description: str
    needs: tuple[str, ...]
    limits: dict[str, int] = field(default_factory=dict)
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Expectation:
    """Whether ``feature`` is expected in the guest, and why (the SKIP reason when it is not)."""

    feature: str
    available: bool
    reason: str
    limits: dict[str, int] = field(default_factory=dict)
    sources: tuple[str, ...] = ()


def first_unmet(needs: tuple[str, ...] | list[str], ctx: Context) -> str | None:
    """The reason of the first condition in ``needs`` that does not hold, or None when all hold."""
    for name in needs:
        reason = CONDITIONS[name](ctx)
        if reason is not None:
            return reason
    return None


def load_rules(path: Path = FEATURES_FILE) -> dict[str, FeatureRule]:
    """Parse and validate the features file.

    :raises UsageError: syntax error, unknown key or condition (one line naming file, feature and field).
    """
    data = read_toml(path, "KVM feature rules")
    rules = {}
    for name, table in data.items():
        where = f"{path}: [{name}]"
        table = check_table(where, table, FEATURE_KEYS)
        bad = [c for c in table["needs"] if c not in CONDITIONS]
        if bad:
            raise UsageError(f"{where}: unknown condition '{bad[0]}' in 'needs' (allowed: {', '.join(CONDITIONS)})")
        rules[name] = FeatureRule(name, table["description"], tuple(table["needs"]), table.get("limits", {}),
                                  tuple(table.get("sources", ())))  # fmt: skip
    return rules


def expect(rule: FeatureRule, ctx: Context) -> Expectation:
    """Decide whether the guest should have ``rule``'s feature."""
    reason = first_unmet(rule.needs, ctx)
    if reason is None:
        return Expectation(rule.name, True, f"expected: {rule.description}", rule.limits, rule.sources)
    return Expectation(rule.name, False, reason, rule.limits, rule.sources)


def pmu_feature(ctx: Context) -> str:
    """Which PMU feature rule applies: the host's vendor decides under KVM (the guest runs the host model)."""
    return "amd_core_pmu" if ctx.host_vendor in ("AuthenticAMD", "HygonGenuine") else "arch_perfmon"
