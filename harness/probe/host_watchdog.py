"""What the host's NMI watchdog does to a perf-based vPMU: it pins a cycles event on every host CPU, so a guest
group that needs every host counter loses a member. The probe parameters hold such a copy back, the verdicts say
why; both ask here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from harness.probe.guest_view import GuestView

#: held_back_for in the counters probe's records: a copy left out for the host NMI watchdog's counter.
HELD_BACK_WATCHDOG = "host nmi_watchdog"
#: What the host NMI watchdog does to a perf-based vPMU, and the way out (the SKIP/note text).
WATCHDOG_REASON = ("host: nmi_watchdog={value} takes a host counter: kernel/watchdog_perf.c "
                   "hardlockup_detector_event_create() pins a cycles event on every CPU, and CPU-pinned events are "
                   "scheduled before KVM's pinned per-task backing events (arch/x86/kvm/pmu.c "
                   "pmc_reprogram_counter(); a pinned event that does not fit goes to ERROR, kernel/events/core.c "
                   "merge_sched_in()), so one guest counter would silently stop "
                   "(echo 0 > /proc/sys/kernel/nmi_watchdog)")  # fmt: skip


def host_nmi_watchdog(host: dict[str, Any]) -> str | None:
    """The host's kernel.nmi_watchdog when it is on (doctor ``sysctls``, else the older ``perf.nmi_watchdog``)."""
    value = (host.get("sysctls") or {}).get("kernel.nmi_watchdog")
    if value is None:
        value = (host.get("perf") or {}).get("nmi_watchdog")
    value = str(value).strip() if value is not None else None
    return value if value not in (None, "", "0") else None


def watchdog_reason(host: dict[str, Any]) -> str | None:
    """WATCHDOG_REASON for a perf-based vPMU host whose NMI watchdog is on, else None.

    Under the mediated vPMU the watchdog cannot starve a guest counter: the host's counters are switched out at
    VM-entry (perf_load_guest_context()), and the watchdog's include-guest event makes perf_create_mediated_pmu()
    fail with EBUSY, so the VM does not even get a vCPU ("Failed to enable mediated vPMU, try disabling system wide
    perf events and nmi_watchdog", arch/x86/kvm/x86.c kvm_arch_vcpu_precreate()).
    """
    value = host_nmi_watchdog(host)
    if value is None or host.get("vpmu_mode") != "perf-based":
        return None
    return WATCHDOG_REASON.format(value=value)


def host_watchdog_starves(view: GuestView, host: dict[str, Any]) -> Callable[[str, int], bool]:
    """Which counters-probe groups would lose a member to the host NMI watchdog: ``starves(event, copies)``.

    Under the perf-based vPMU every guest counter in use is a pinned host perf event on the vCPU's task, and the
    watchdog's pinned per-CPU cycles event is scheduled first (CPU-pinned before task-pinned, kernel/events/core.c
    ctx_sched_in()). On Intel x86 perf puts that cycles event on fixed counter 1 (arch/x86/events/core.c
    __perf_sched_find_counter() prefers fixed counters), so the only guest group that then needs more host GP
    counters than exist is the cycles group using every GP counter plus guest FC1 (KVM backs guest FC1 with the
    0x003c encoding, which may then take a host GP counter). On AMD there are no fixed counters: the watchdog takes one
    of the host's core counters, so every group using all guest counters is one short. A host with more counters
    than the guest is shown has room, and nothing is held back. The verdicts accept the unmeasured counter
    (gp_event) and say why; the alternative, skipping every arch.gp check on a default AMD host, measures nothing.
    """
    if watchdog_reason(host) is None:
        return lambda _event, _copies: False
    host_caps = (host.get("cpu") or {}).get("caps") or {}
    if view.amd:
        host_counters = (host_caps.get("amd") or {}).get("core_counters")
        return lambda _event, copies: host_counters is None or copies > host_counters - 1
    host_pm = host_caps.get("arch_perfmon") or {}
    host_gp, host_fixed = host_pm.get("gp_counters"), host_pm.get("fixed_counters")
    guest = view.caps.arch_perfmon
    guest_gp = guest.gp_counters if guest else 0
    if host_fixed is not None and host_fixed < 2:  # no host FC1: the watchdog sits on a GP counter, as on AMD
        return lambda _event, copies: host_gp is None or copies > host_gp - 1
    room = host_gp is not None and host_gp > guest_gp
    return lambda event, copies: event == "core_cycles" and copies > guest_gp and not room
