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

from harness.cpu.caps import decode_perf_capabilities
from harness.cpu.model import CpuModel
from harness.cpu.profile import Profile
from harness.datafiles import KeySpec, check_table, read_toml
from harness.errors import UsageError
from harness.paths import GUEST_TESTS_DIR

FEATURES_FILE = GUEST_TESTS_DIR / "kvm_features.toml"
FEATURE_KEYS: KeySpec = {
    "description": (str, True, "what the feature is"),
    "needs": (list, True, "conditions that must all hold, from CONDITIONS"),
    "limits": (dict, False, "caps KVM puts on what the guest sees"),
    "sources": (list, False, "where each rule comes from"),
    "offer": (str, False, "the OFFERS predicate (harness/judge/expectations.py) answering from KVM's measured offer"),
}
_ON = ("Y", "1", "y")


@dataclass(frozen=True)
class Context:
    """Everything an expectation depends on, decided before the guest runs."""

    accel: str
    host: dict[str, Any]
    profile: Profile
    #: What QEMU granted per requested -cpu property (qom-get on the paused vCPU); None before boot (plan).
    granted: dict[str, Any] | None = None

    @property
    def cpu(self) -> CpuModel:
        return CpuModel.parse(self.profile.cpu_for(self.accel))

    @property
    def host_vendor(self) -> str | None:
        return self.host.get("cpu", {}).get("vendor")

    @property
    def offer(self) -> dict[str, Any] | None:
        """What KVM offers guests, as doctor read it from /dev/kvm; None when unknown (old facts, no access)."""
        return self.host.get("kvm_offer")


def _accel_kvm(ctx: Context) -> str | None:
    if ctx.accel == "kvm":
        return None
    why = ctx.host.get("accel_reason", "")
    why = why.removeprefix("KVM unusable: ").split(";")[0] if why.startswith("KVM unusable") else "KVM not chosen"
    return f"accel: no vPMU under {ctx.accel.upper()} (QEMU fills the PMU CPUID leaves only from KVM; {why})"


def _kvm_enable_pmu(ctx: Context) -> str | None:
    value = ctx.host.get("kvm", {}).get("enable_pmu")
    if value in _ON:
        return None
    if ctx.host.get("host_pmu", {}).get("hybrid"):
        # arch/x86/kvm/pmu.c kvm_init_pmu_capability() itself sets enable_pmu = false on X86_FEATURE_HYBRID_CPU,
        # so sysfs reads N although nobody asked for it: name the real cause.
        return _host_not_hybrid(ctx)
    return f"host: kvm.enable_pmu={value}"


#: Vendors whose PMU KVM virtualizes with the AMD code (arch/x86/kvm/svm/pmu.c; Hygon Dhyana is a Zen derivative
#: and takes the same path: cpuid.c / svm.c treat X86_VENDOR_HYGON like AMD).
VENDOR_FAMILY = {"GenuineIntel": "GenuineIntel", "AuthenticAMD": "AuthenticAMD", "HygonGenuine": "AuthenticAMD"}


def _host_vendor(wanted: str) -> Callable[[Context], str | None]:
    def check(ctx: Context) -> str | None:
        if VENDOR_FAMILY.get(ctx.host_vendor or "") == wanted:
            return None
        return f"host: CPU vendor is {ctx.host_vendor}, not {wanted}"

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


#: Intel models whose legacy LBR has no call-stack mode: arch/x86/events/intel/lbr.c gives the call-stack select
#: map (hsw_lbr_sel_map) only to Haswell and later big cores and Goldmont+; Nehalem/Westmere (nhm map), Sandy/Ivy
#: Bridge (snb map), Silvermont/Airmont (intel_pmu_lbr_init_slm) and Knights Landing/Mill (_knl) lack it, and
#: arch/x86/kvm/vmx/vmx.c vmx_get_perf_capabilities() gives guests no LBR format without has_callstack.
#: Used only when the KVM offer is unknown (the offer's LBR format answers it).
LBR_NO_CALL_STACK_MODELS = {
    0x1A, 0x1E, 0x1F, 0x2E, 0x25, 0x2C, 0x2F,  # Nehalem, Westmere
    0x2A, 0x2D, 0x3A, 0x3E,  # Sandy Bridge, Ivy Bridge
    0x37, 0x4A, 0x4C, 0x4D, 0x5A, 0x5D,  # Silvermont, Airmont
    0x57, 0x85,  # Knights Landing, Knights Mill
}  # fmt: skip


def _host_legacy_lbr(ctx: Context) -> str | None:
    caps = _host_caps(ctx)
    if caps.get("arch_lbr"):
        return "kvm-limit: KVM gives no guest LBR on arch-LBR hosts ('Disallow enabling LBR support if the CPU " \
               "supports architectural LBRs', 2023)"  # fmt: skip
    if caps.get("family") == 6 and caps.get("model") in LBR_NO_CALL_STACK_MODELS:
        return (f"kvm-limit: host model {caps['model']:#x} has no call-stack LBR, and KVM gives guests LBR only "
                "with it (vmx_get_perf_capabilities(): has_callstack)")  # fmt: skip
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
    return ("kvm-limit: no guest PEBS with the mediated vPMU (legacy PEBS/LBR are not offered to mediated guests, "
            "mediated vPMU series v6, Dec 2025; the KVM offer's PEBS format answers this where measured)")  # fmt: skip


def _vpmu_not_mediated_lbr(ctx: Context) -> str | None:
    if ctx.host.get("vpmu_mode") != "mediated":
        return None
    return "kvm-limit: no guest legacy LBR with the mediated vPMU (vmx_get_perf_capabilities(): no LBR format)"


def _profile_perf_caps_field(prop: str, what: str) -> Callable[[Context], str | None]:
    """QEMU passes a PERF_CAPABILITIES field through only with migratable=no or the field's own property.

    QEMU target/i386/kvm/kvm.c / cpu.c: with migratable=on (the default for host/max) unnamed bits of the MSR
    feature word FEAT_PERF_CAPABILITIES are dropped; ``lbr-fmt`` (QEMU 7.1) names the LBR format, ``pebs-fmt`` (2026
    series) the PEBS format. Each format is checked on its own: one property does not pass the other through.
    """

    def check(ctx: Context) -> str | None:
        props = ctx.cpu.props
        if props.get(prop) in (0, False):
            return f"profile: {ctx.profile.name} sets {prop}=0, which hides the {what} from the guest"
        if props.get("migratable") is False or props.get(prop):
            return None
        return (f"profile: {ctx.profile.name} keeps migratable=on without {prop}, so QEMU hides the host's {what} "
                "in IA32_PERF_CAPABILITIES")  # fmt: skip

    return check


def _profile_has(prop: str) -> Callable[[Context], str | None]:
    """The profile requests ``+prop`` (or ``prop=on``)."""

    def check(ctx: Context) -> str | None:
        return None if ctx.cpu.props.get(prop) else f"profile: {ctx.profile.name} does not request +{prop}"

    return check


def _qemu_granted(prop: str) -> Callable[[Context], str | None]:
    """Once booted, QEMU granted ``prop`` (qom-get on the paused vCPU); before boot (``plan``) it is assumed.

    expect() checks these after the KVM offer, so a feature KVM does not offer is blamed on KVM (the same words
    before and after boot), and QEMU is named only when KVM offers the feature and QEMU still filtered it.
    """

    def check(ctx: Context) -> str | None:
        if ctx.granted is not None and ctx.granted.get(prop) is False:
            return f"qemu: QEMU did not grant +{prop} (qom-get reads false; see filtered-features)"
        return None

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


#: Intel models whose perf driver sets ``pebs_ept`` by model in arch/x86/events/intel/core.c intel_pmu_init():
#: Ice Lake server (0x6A, 0x6C; "case INTEL_ICELAKE_X/D: x86_pmu.pebs_ept = 1") and the Sapphire Rapids case with
#: its fall-through models Emerald Rapids (0xCF) and Granite Rapids (0xAD, 0xAE). Every PEBS format 5 or 6 part
#: gets it from arch/x86/events/intel/ds.c intel_ds_pebs_init() ("case 6: case 5: x86_pmu.pebs_ept = 1"), and
#: KVM's vmx_pebs_supported() (vmx/capabilities.h) needs it. Used only when the KVM offer is unknown: the offer's
#: PERF_CAPABILITIES answers this for the host itself.
PEBS_EPT_BY_MODEL = {0x6A, 0x6C, 0x8F, 0xCF, 0xAD, 0xAE}
PEBS_EPT_FORMATS = (5, 6)


def _host_pebs_ept(ctx: Context) -> str | None:
    caps = _host_caps(ctx)
    perf_caps, _why = _host_perf_caps(ctx)
    pebs_format = int((perf_caps or {}).get("pebs_format") or 0)
    if pebs_format in PEBS_EPT_FORMATS or (caps.get("family") == 6 and caps.get("model") in PEBS_EPT_BY_MODEL):
        return None
    return (f"host: no PEBS-via-EPT (PEBS format {pebs_format}, model {caps.get('model', '?')}: the perf driver sets "
            "pebs_ept for PEBS format 5/6 (intel_ds_pebs_init()) and, by model, Ice Lake server and the Sapphire "
            "Rapids family (intel_pmu_init()))")  # fmt: skip


def _mediated_vm_creatable(ctx: Context) -> str | None:
    """Under the mediated vPMU an include-guest host perf event blocks VM creation.

    kernel/events/core.c perf_create_mediated_pmu() (mediated vPMU, Linux 7.0) fails with -EBUSY while any
    !exclude_guest event exists, and KVM calls it when the first vCPU is created (arch/x86/kvm/x86.c
    kvm_arch_vcpu_precreate()); the NMI watchdog's event (kernel/watchdog_perf.c) does not set exclude_guest.
    This holds for pmu=off profiles too: only KVM_PMU_CAP_DISABLE spares a VM, and released QEMU does not set it.
    """
    if ctx.accel != "kvm" or ctx.host.get("vpmu_mode") != "mediated":
        return None
    watchdog = _host_nmi_watchdog_off(ctx)
    if watchdog is None:
        return None
    return (watchdog.replace("host: ", "host: mediated vPMU and ", 1).split(" (echo")[0]
            + ": KVM cannot create the vCPU (perf_create_mediated_pmu() -EBUSY) (echo 0 > "
            "/proc/sys/kernel/nmi_watchdog)")  # fmt: skip


def _pmu_off_reaches_kvm(ctx: Context) -> str | None:
    """Whether ``pmu=off`` takes the vPMU away from an AMD guest (Intel: QEMU zeroes CPUID.0AH, so KVM sees PMU
    version 0 and every PMU MSR is invalid: arch/x86/kvm/vmx/pmu_intel.c intel_pmu_refresh())."""
    if VENDOR_FAMILY.get(ctx.host_vendor or "") != "AuthenticAMD":
        return None
    return ("qemu-limit: QEMU's pmu=off does not take an AMD guest's counters away: AMD has no CPUID bit for the "
            "legacy K7 counters and QEMU neither clears PerfCtrExtCore nor sets KVM_PMU_CAP_DISABLE "
            "(KVM_CAP_PMU_CAPABILITY) in releases up to 10.2 (Dongli Zhang's series, v9 January 2026, unmerged as "
            "found)")  # fmt: skip


def _host_nmi_watchdog_off(ctx: Context) -> str | None:
    """The host NMI watchdog (kernel/watchdog_perf.c) holds a pinned cycles event on every CPU."""
    value = (ctx.host.get("sysctls") or {}).get("kernel.nmi_watchdog")
    if value is None:
        value = (ctx.host.get("perf") or {}).get("nmi_watchdog")
    if value in (None, "0"):
        return None
    return (f"host: nmi_watchdog={value} holds a pinned cycles event per CPU (kernel/watchdog_perf.c) "
            "(echo 0 > /proc/sys/kernel/nmi_watchdog)")  # fmt: skip


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
    "host_nmi_watchdog_off": _host_nmi_watchdog_off,
    "pmu_off_reaches_kvm": _pmu_off_reaches_kvm,
    "mediated_vm_creatable": _mediated_vm_creatable,
    "host_ibs": _host_ibs,
    "vpmu_mediated": _vpmu_mediated,
    "vpmu_not_mediated": _vpmu_not_mediated,
    "vpmu_not_mediated_lbr": _vpmu_not_mediated_lbr,
    "profile_lbr_fmt_passthrough": _profile_perf_caps_field("lbr-fmt", "LBR format"),
    "profile_pebs_fmt_passthrough": _profile_perf_caps_field("pebs-fmt", "PEBS format"),
    "profile_perf_metrics_passthrough": _profile_perf_caps_field("perf-metrics", "PERF_METRICS bit"),
    "profile_arch_lbr": _profile_has("arch-lbr"),
    "profile_ibs": _profile_has("ibs"),
    "qemu_granted_arch_lbr": _qemu_granted("arch-lbr"),
    "qemu_granted_ibs": _qemu_granted("ibs"),
    **{name: _kvm_limit(name) for name in KVM_LIMITS},
}


# --- What KVM offers guests (doctor's ``kvm_offer``, read from /dev/kvm) --------------------------------------
#
# An offer predicate answers "does KVM give guests this feature on this host?" from KVM's own answers:
# KVM_GET_SUPPORTED_CPUID and the feature MSR IA32_PERF_CAPABILITIES (KVM_GET_MSRS on the system fd). It returns
# (True/False, the fact in words), or (None, why) when the offer cannot tell (e.g. an old KVM without the
# PERF_CAPABILITIES feature MSR). DESIGN.md, "Where an expectation comes from": the measurement wins over the table.

Offered = tuple[bool | None, str]


def _offer_perf_caps(offer: dict[str, Any]) -> dict[str, Any] | None:
    decoded = offer.get("perf_capabilities_decoded")
    if decoded is None and isinstance(offer.get("perf_capabilities"), int):
        decoded = decode_perf_capabilities(offer["perf_capabilities"])
    return decoded


def _offer_perf_cap(field_name: str, what: str) -> Callable[[dict[str, Any]], Offered]:
    def answer(offer: dict[str, Any]) -> Offered:
        caps = _offer_perf_caps(offer)
        if caps is None:
            return None, "KVM lists no IA32_PERF_CAPABILITIES feature MSR (KVM_GET_MSR_FEATURE_INDEX_LIST)"
        value = caps.get(field_name)
        fact = f"KVM's IA32_PERF_CAPABILITIES {caps.get('raw', 0):#x}: {field_name}={int(value or 0)}"
        return (bool(value), fact) if value else (False, f"{fact}: KVM offers guests no {what}")

    return answer


def _offer_arch_perfmon(offer: dict[str, Any]) -> Offered:
    perfmon = (offer.get("pmu") or {}).get("arch_perfmon")
    if not perfmon:
        return False, "KVM_GET_SUPPORTED_CPUID leaf 0AH is zero: KVM offers guests no architectural PMU"
    return True, (f"KVM_GET_SUPPORTED_CPUID 0AH: version {perfmon['version']}, {perfmon['gp_counters']} GP x "
                  f"{perfmon['gp_width']} bit, {perfmon['fixed_counters']} fixed")  # fmt: skip


def _offer_amd_core(offer: dict[str, Any]) -> Offered:
    # arch/x86/kvm/svm/svm.c svm_set_cpu_caps(): PERFCTR_CORE only with enable_pmu and >= 6 counters; PERFMON_V2
    # only with PERFCTR_CORE and PMU version 2.
    amd = (offer.get("pmu") or {}).get("amd") or {}
    if not (amd.get("perfctr_core") or amd.get("perfmon_v2")):
        return False, ("KVM_GET_SUPPORTED_CPUID offers neither PerfCtrExtCore (80000001H ECX[23]) nor PerfMonV2 "
                       "(80000022H EAX[0])")  # fmt: skip
    return True, (f"KVM_GET_SUPPORTED_CPUID: PerfCtrExtCore={bool(amd.get('perfctr_core'))}, "
                  f"PerfMonV2={bool(amd.get('perfmon_v2'))}, {amd.get('core_counters')} core counters")  # fmt: skip


def _offer_topdown(offer: dict[str, Any]) -> Offered:
    perfmon = (offer.get("pmu") or {}).get("arch_perfmon") or {}
    has_fc3 = bool((int(perfmon.get("fixed_counter_mask") or 0) >> 3) & 1)
    metrics, fact = _offer_perf_cap("perf_metrics", "PERF_METRICS")(offer)
    if not has_fc3:
        return False, "KVM_GET_SUPPORTED_CPUID 0AH offers no fixed counter 3 (TOPDOWN.SLOTS)"
    return metrics, f"KVM_GET_SUPPORTED_CPUID 0AH offers fixed counter 3; {fact}"


def _offer_arch_lbr(offer: dict[str, Any]) -> Offered:
    if (offer.get("pmu") or {}).get("arch_lbr"):
        return True, "KVM_GET_SUPPORTED_CPUID 07H EDX[19] (arch LBR) is set"
    return False, "KVM_GET_SUPPORTED_CPUID 07H EDX[19] (arch LBR) is clear: KVM offers guests no arch LBR"


def _offer_ibs(offer: dict[str, Any]) -> Offered:
    if ((offer.get("pmu") or {}).get("amd") or {}).get("ibs"):
        return True, "KVM_GET_SUPPORTED_CPUID 80000001H ECX[10] and 8000001BH offer IBS"
    return False, "KVM_GET_SUPPORTED_CPUID offers no IBS (80000001H ECX[10] clear)"


OFFERS: dict[str, Callable[[dict[str, Any]], Offered]] = {
    "arch_perfmon": _offer_arch_perfmon,
    "amd_core": _offer_amd_core,
    "topdown": _offer_topdown,
    "legacy_lbr": _offer_perf_cap("lbr_format", "legacy LBR (LBR format 0)"),
    "arch_lbr": _offer_arch_lbr,
    "pebs": _offer_perf_cap("pebs_format", "PEBS (vmx_pebs_supported() is false)"),
    "pebs_baseline": _offer_perf_cap("pebs_baseline", "adaptive PEBS (baseline, bit 14)"),
    "ibs": _offer_ibs,
}

#: Conditions about what KVM gives guests on this host: when a rule names an offer, the offer answers these
#: instead of the table (a backport or a newer kernel shows up in the offer first). Conditions about the run
#: (accelerator, profile, QEMU), the CPU vendor, host knobs KVM does not report (ignore_msrs, nmi_watchdog) and
#: limits no ioctl shows (kvm_guest_ldlat) stay with the table.
OFFER_ANSWERS = frozenset({
    "kvm_enable_pmu", "host_pmu", "host_not_hybrid", "host_perf_metrics", "host_legacy_lbr", "host_arch_lbr",
    "host_pebs", "host_pebs_ept", "host_ibs", "vpmu_mediated", "vpmu_not_mediated", "kvm_guest_arch_lbr",
    "kvm_guest_topdown", "kvm_guest_adaptive_pebs", "kvm_guest_ibs", "vpmu_not_mediated_lbr",
})  # fmt: skip


#: Conditions checked after the offer (what QEMU granted at boot): see _qemu_granted.
AFTER_OFFER_PREFIX = "qemu_granted_"


@dataclass(frozen=True)
class FeatureRule:
    name: str
    description: str
    needs: tuple[str, ...]
    limits: dict[str, int] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    #: The OFFERS predicate that answers this rule from the measured KVM offer ("" = the table alone decides).
    offer: str = ""


@dataclass(frozen=True)
class Expectation:
    """Whether ``feature`` is expected in the guest, and why (the SKIP reason when it is not).

    ``note`` says where the measured KVM offer and kvm_features.toml disagree (the offer won); ``limits`` are
    KVM's caps on the guest's enumeration, from the offer when measured, else from the table.
    """

    feature: str
    available: bool
    reason: str
    limits: dict[str, int] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    note: str | None = None


def first_unmet(needs: tuple[str, ...] | list[str], ctx: Context) -> str | None:
    """The reason of the first condition in ``needs`` that does not hold, or None when all hold."""
    for name in needs:
        reason = CONDITIONS[name](ctx)
        if reason is not None:
            return reason
    return None


def load_rules(path: Path = FEATURES_FILE) -> dict[str, FeatureRule]:
    """Parse and validate the features file.

    :raises UsageError: syntax error, unknown key, condition or offer (one line naming file, feature and field).
    """
    data = read_toml(path, "KVM feature rules")
    rules = {}
    for name, table in data.items():
        where = f"{path}: [{name}]"
        table = check_table(where, table, FEATURE_KEYS)
        bad = [c for c in table["needs"] if c not in CONDITIONS]
        if bad:
            raise UsageError(f"{where}: unknown condition '{bad[0]}' in 'needs' (allowed: {', '.join(CONDITIONS)})")
        offer = table.get("offer", "")
        if offer and offer not in OFFERS:
            raise UsageError(f"{where}: unknown offer '{offer}' in 'offer' (allowed: {', '.join(OFFERS)})")
        rules[name] = FeatureRule(name, table["description"], tuple(table["needs"]), table.get("limits", {}),
                                  tuple(table.get("sources", ())), offer)  # fmt: skip
    return rules


def offer_limits(rule: FeatureRule, offer: dict[str, Any] | None) -> dict[str, int]:
    """KVM's caps on the guest PMU: the offered CPUID when measured (it is what KVM_SET_CPUID2 accepts), else the
    table's (arch/x86/kvm/pmu.c kvm_init_pmu_capability(): perf-based vPMU version <= 2, <= 8 GP, <= 3 fixed)."""
    pmu = (offer or {}).get("pmu") or {}
    if rule.offer == "arch_perfmon" and pmu.get("arch_perfmon"):
        perfmon = pmu["arch_perfmon"]
        return {"version": perfmon["version"], "gp_counters": perfmon["gp_counters"],
                "fixed_counters": perfmon["fixed_counters"]}  # fmt: skip
    if rule.offer == "amd_core" and pmu.get("amd"):
        return {"core_counters": pmu["amd"]["core_counters"]}
    return dict(rule.limits)


def expect(rule: FeatureRule, ctx: Context) -> Expectation:
    """Decide whether the guest should have ``rule``'s feature.

    The table's conditions are checked in order; the first unmet one is the reason. Where the rule names an offer
    and the host's KVM offer was measured, the offer answers the KVM conditions (OFFER_ANSWERS): a table limit the
    offer contradicts is overridden (and noted), and a feature the table allows but KVM does not offer is
    unavailable with the offer's words.
    """
    offer = ctx.offer if rule.offer else None
    offered, fact = OFFERS[rule.offer](offer) if offer is not None else (None, "")
    limits = offer_limits(rule, offer)
    overridden: list[str] = []
    for name in rule.needs:
        if name.startswith(AFTER_OFFER_PREFIX):
            continue
        reason = CONDITIONS[name](ctx)
        if reason is None:
            continue
        if offered is True and name in OFFER_ANSWERS:
            overridden.append(reason)
            continue
        return Expectation(rule.name, False, reason, limits, rule.sources)
    if offered is False:
        note = "kvm_features.toml expects it but the KVM offer does not show it; the offer wins"
        return Expectation(rule.name, False, f"kvm-offer: {fact} ({note})", limits, rule.sources, note)
    late = first_unmet([name for name in rule.needs if name.startswith(AFTER_OFFER_PREFIX)], ctx)
    if late is not None:
        return Expectation(rule.name, False, late, limits, rule.sources)
    note = None
    if overridden:
        note = (f"the KVM offer shows it ({fact}) although kvm_features.toml says '{overridden[0]}' "
                "(a backport or a newer kernel?); the offer wins")  # fmt: skip
    reason = f"expected: {rule.description}" + (f" ({fact})" if offered else "")
    return Expectation(rule.name, True, reason, limits, rule.sources, note)


def offer_notes(ctx: Context, rules: dict[str, FeatureRule] | None = None) -> list[str]:
    """Every rule where the measured offer and the table disagree, for the run's header."""
    found = []
    for rule in (rules or load_rules()).values():
        expectation = expect(rule, ctx)
        if expectation.note:
            found.append(f"{rule.name}: {expectation.note}")
    return found


#: A profile that asks for everything a -cpu can pass through, so profile conditions never hide a disagreement.
ASK_ALL = Profile("offer-vs-table", "every vPMU feature passed through", "host,pmu=on,migratable=no,+arch-lbr,"
                  "+ibs,+perf-metrics", None, ("kvm",))  # fmt: skip


def host_offer_notes(host: dict[str, Any], rules: dict[str, FeatureRule] | None = None) -> list[str]:
    """Where this host's measured KVM offer and kvm_features.toml disagree (the offer wins), whatever the profile.

    Empty when the host was not measured (no ``kvm_offer``) or KVM is not the accelerator: then nothing disagrees.
    """
    if not host.get("kvm_offer") or host.get("accel") != "kvm":
        return []
    return offer_notes(Context("kvm", host, ASK_ALL), rules)


def pmu_feature(ctx: Context) -> str:
    """Which PMU feature rule applies: the host's vendor decides under KVM (the guest runs the host model)."""
    return "amd_core_pmu" if ctx.host_vendor in ("AuthenticAMD", "HygonGenuine") else "arch_perfmon"
