"""Verdicts on the guest's PMU across its life cycle: after a reset, after a save/restore, across a live migration.

The inputs are the records harness/suite/lifecycle.py stores per check (``probe``/``kind`` like every probe record):
``step`` (the mechanics: boot ids, times, QMP's account), ``enumeration`` (``stage`` boot / after), ``stale_lines``
(``stage`` before / after a reset: the guest kernel's stale-PMU lines), ``refused`` (QEMU refused to migrate),
``switchover`` (the guest's clock when the destination first answered), and the msr probe's life-cycle records with
a ``stage``: ``stopped`` (the counters stopped after a refusal; not judged), ``boot`` (every
PMU MSR right after the cold boot), ``saved`` (programmed and counting, before the step), ``after`` (after a reset),
``restored`` (after a restore or a migration: ``point`` before / after the exact region) and the region's
``enabled`` record.

Two checks per step: ``lifecycle.<step>`` judges the step itself on every accelerator (:func:`mechanics_verdict`: a
reset must change the boot id, a restore or a migration must keep it, the enumeration must not change), and
``lifecycle.<step>.pmu`` the PMU MSR values where a vPMU is expected (pre-gated like every PMU check, so ``plan``
predicts its SKIP).
"""

from __future__ import annotations

from typing import Any

from harness.judge.arch_counters import exact_global_ctrl
from harness.judge.bounds import NO_ERRATA, OvercountErrata
from harness.judge.expectations import Expectation
from harness.judge.verdict import Record, Verdict, errored, failed, first_record, gate, passed, skipped
from harness.probe.guest_view import GuestView

#: EVTSEL.EN (SDM Vol. 3B "IA32_PERFEVTSELx MSRs", bit 22; AMD APM Vol. 2 PerfEvtSel bit 22).
EVTSEL_EN = 1 << 22
#: MSRs that control counting: restored exactly (QEMU target/i386/machine.c vmstate_msr_architectural_pmu carries
#: msr_gp_evtsel[], msr_fixed_ctr_ctrl, msr_global_ctrl; kvm.c kvm_get_msrs()/kvm_put_msrs() move them).
CONTROLS = ("evtsel", "fixed_ctr_ctrl", "global_ctrl")
#: Counters: they keep counting while the guest runs, so after the step they are >= what was read before it.
COUNTERS = ("counter", "fixed_counter")
#: Reset values that hold whatever the guest kernel does at boot: no Linux x86 PMU driver writes an event select or
#: FIXED_CTR_CTRL before perf schedules an event (arch/x86/events/core.c check_hw_exists() only reads them, and
#: writes one counter), and the image boots with nmi_watchdog=0, so the guest reads what the reset left.
#: SDM Vol. 3B: IA32_PERFEVTSELx and IA32_FIXED_CTR_CTRL are 0 after RESET; AMD APM Vol. 2 PerfEvtSeln likewise.
#: Who resets them on a system reset is QEMU, not KVM: kvm_vcpu_reset(vcpu, false) runs only when a vCPU is created
#: and KVM no longer calls kvm_pmu_reset() from it (arch/x86/kvm/x86.c), INIT passes init_event=true; QEMU's
#: x86_cpu_reset_hold() clears env up to end_reset_fields and kvm_put_msrs(KVM_PUT_RESET_STATE)
#: (target/i386/kvm/kvm.c) writes those zeros: Intel only (CPUID 0xA's has_architectural_pmu_version), AMD only with
#: the 2025 series "target/i386/kvm: reset AMD PMU registers during VM reset" (Dongli Zhang).
ZERO_AT_RESET = ("evtsel", "fixed_ctr_ctrl")
#: Where a value left over by a system reset comes from, for the FAIL reason (see ZERO_AT_RESET).
RESET_WRITER = ("KVM does not reset the vPMU on a system reset (arch/x86/kvm/x86.c kvm_vcpu_reset()); QEMU writes "
                "the reset values in kvm_put_msrs(KVM_PUT_RESET_STATE) (target/i386/kvm/kvm.c): Intel only, AMD only "
                "with the 2025 series \"target/i386/kvm: reset AMD PMU registers during VM reset\"")  # fmt: skip
#: Reported after a reset but not judged: the guest kernel writes GLOBAL_CTRL at every boot before the probe reads
#: it (kernel/watchdog.c lockup_detector_init() creates and releases the perf NMI-watchdog event even with
#: nmi_watchdog=0; enabling it runs x86_pmu_enable() -> __intel_pmu_enable_all(), wrmsr(GLOBAL_CTRL,
#: x86_pmu.intel_ctrl); AMD PerfMonV2: amd_pmu_cpu_reset() writes 0, its enable_all the counter mask), so its value
#: after a reset is the kernel's whatever the reset wrote.
NOT_JUDGED_AT_RESET = ("global_ctrl",)
#: QEMU carries at most MAX_FIXED_COUNTERS = 3 fixed counters (target/i386/cpu.h, env->msr_fixed_counters[]; kvm.c
#: kvm_get_msrs()/kvm_put_msrs() loop over MIN(num_architectural_pmu_fixed_counters, MAX_FIXED_COUNTERS)): a fourth
#: fixed counter a KVM exposes is not restored, a known QEMU limit, so it is not judged across a restore.
QEMU_MAX_FIXED_COUNTERS = 3
#: QEMU's blocker for a vCPU with host-only state: migratable=no passes host-only features through
#: (target/i386/cpu.c x86_cpu_get_supported_feature_word(..., migratable_only=false)), among them invtsc, for which
#: kvm_arch_init_vcpu() (target/i386/kvm/kvm.c) adds "State blocked by non-migratable CPU device (invtsc flag)"
#: unless tsc-frequency is set (a 2025 proposal drops the parenthesis: matched without it). lbr-fmt is no blocker:
#: x86_cpu_realizefn() (target/i386/cpu.c) makes a destination whose host LBR format differs refuse to start ("vPMU:
#: the lbr-fmt value ... does not match the host value"), so on one host such a guest migrates, and the enumeration
#: check sees the format it keeps.
NON_MIGRATABLE_BLOCKER = "State blocked by non-migratable CPU device"


def _label(name: str, index: int) -> str:
    return name if name in ("fixed_ctr_ctrl", "global_ctrl", "global_status") else f"{name}{index}"


def state(records: list[Record], stage: str, point: str | None = None) -> dict[str, int | str]:
    """The MSRs read at ``stage`` (and ``point``) as {label: value, or "errno N"}."""
    found: dict[str, int | str] = {}
    for r in records:
        if r.get("kind") != "state" or r.get("stage") != stage or (point is not None and r.get("point") != point):
            continue
        label = _label(r["name"], int(r.get("index", 0)))
        found[label] = r["value"] if "value" in r else f"errno {r.get('errno')}"
    return found


def _kind(label: str) -> str:
    return label.rstrip("0123456789")


def _hex(value: int | str | None) -> str:
    return f"{value:#x}" if isinstance(value, int) else str(value)


def side_by_side(records: list[Record], before: tuple[str, str | None], after: tuple[str, str | None]) -> list[dict]:
    """Rows {msr, before, after, changed} of the MSRs of two stages, for the report."""
    first, second = state(records, *before), state(records, *after)
    rows = []
    for label in list(dict.fromkeys([*first, *second])):
        a, b = first.get(label), second.get(label)
        rows.append({"msr": label, "before": _hex(a), "after": _hex(b), "changed": a != b})
    return rows


def mechanics(records: list[Record], same_boot: bool) -> tuple[list[str], str, Record | None]:
    """Problems of the step itself (boot id, QMP's account) and a one-line summary of what it did."""
    step = first_record(records, "step")
    if step is None:
        return ["no record of the step"], "", None
    problems = []
    kept = step["boot_id_before"] == step["boot_id_after"]
    if same_boot and not kept:
        problems.append(f"the guest rebooted: boot id {step['boot_id_before']} became {step['boot_id_after']} "
                        f"(the same guest must continue)")  # fmt: skip
    if not same_boot and kept:
        problems.append(f"boot id {step['boot_id_before']} unchanged: the guest did not reboot")
    event = step.get("reset_event")
    if event is not None:
        # qapi/run-state.json RESET: "guest": true if the reset was triggered by a guest request.
        wanted = step["step"] == "guest_reboot"
        if bool(event.get("guest")) != wanted:
            problems.append(f"QMP RESET event says guest={event.get('guest')} ({event.get('reason')}), expected "
                            f"guest={wanted}")  # fmt: skip
    times = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.2f} s" for k, v in step.items()
                      if k.endswith("_s") and isinstance(v, (int, float)))  # fmt: skip
    if step.get("downtime_ms") is not None:
        times += f", downtime {step['downtime_ms']} ms"
    summary = f"boot id {'kept' if kept else 'new'}, {times}"
    return problems, summary, step


def enumeration_changes(records: list[Record], stage: str = "after") -> list[str]:
    """What differs between the enumeration at boot and at ``stage`` (CPUID decoded, PERF_CAPABILITIES, the kernel's
    PMUs, its banner, PMU sysfs)."""
    boot = first_record(records, "enumeration", stage="boot")
    now = first_record(records, "enumeration", stage=stage)
    if boot is None or now is None:
        return ["no enumeration record"]
    changes = []
    for key in ("caps", "perf_capabilities", "kernel_pmus", "kernel_banner", "sysfs"):
        if boot.get(key) != now.get(key):
            if isinstance(boot.get(key), dict) and isinstance(now.get(key), dict):
                keys = sorted(k for k in {*boot[key], *now[key]} if boot[key].get(k) != now[key].get(k))
                changes.append(f"{key}: {', '.join(f'{k} {boot[key].get(k)!r} -> {now[key].get(k)!r}' for k in keys)}")
            else:
                changes.append(f"{key}: {boot.get(key)!r} -> {now.get(key)!r}")
    return changes


def mechanics_verdict(records: list[Record], cpu_props: dict[str, Any] | None = None) -> Verdict:
    """The step itself, judged on every accelerator: a reset gives a new boot id and a QMP RESET event from the side
    that asked, a restore or a migration keeps the boot id, the guest's PMU enumeration is unchanged, and a guest
    process started before a live migration's switch-over finishes after it on the destination. A refusal to
    migrate is judged by :func:`refused_verdict`."""
    refused = first_record(records, "refused")
    if refused is not None:
        return refused_verdict(cpu_props or {}, refused["reason"])
    step = first_record(records, "step")
    if step is None:
        return errored("no record of the step")
    same_boot = step["step"] not in ("reset", "guest_reboot")
    what = STEP_WORDS.get(step["step"], step["step"])
    problems, summary, _ = mechanics(records, same_boot)
    changes = enumeration_changes(records)
    if changes:
        problems.append("PMU enumeration changed: " + "; ".join(changes))
    job = step.get("during") or {}
    if job and not job.get("finished"):
        problems.append(f"a guest process started before the switch-over did not finish on the destination ({job})")
    expected = ("a new boot" if not same_boot else "the same guest") + ", the same PMU enumeration"
    if problems:
        return failed(f"{what}: " + "; ".join(problems), expected, summary)
    return passed(f"the {what} held: {summary}; PMU enumeration unchanged", expected, summary)


#: How the reasons name each step.
STEP_WORDS = {"reset": "reset", "guest_reboot": "guest reboot", "save_restore": "save/restore",
              "migration": "migration"}  # fmt: skip


def _summary(records: list[Record]) -> str:
    step = first_record(records, "step") or {}
    return mechanics(records, step.get("step") not in ("reset", "guest_reboot"))[1]


def programmed_problem(records: list[Record]) -> str | None:
    """Why the programmed state cannot show anything (no select has EN set), or None."""
    saved = state(records, "saved")
    if not saved:
        return "no record of the programmed MSRs"
    if not any(isinstance(v, int) and v & EVTSEL_EN for k, v in saved.items() if _kind(k) == "evtsel"):
        return "no event select had EN set after programming: " + ", ".join(f"{k}={_hex(v)}" for k, v in saved.items())
    return None


def _stale_lines(records: list[Record]) -> tuple[list[str], list[str]]:
    """The guest kernel's stale-PMU lines new after the step, and those the boot before it had printed already."""
    before = [r for r in records if r.get("kind") == "stale_lines" and r.get("stage") == "before"]
    after = [r for r in records if r.get("kind") == "stale_lines" and r.get("stage") in ("after", None)]
    known = [line for r in before for line in r.get("lines", [])]
    lines = [line for r in after for line in r.get("lines", [])]
    return [line for line in lines if line not in known], [line for line in lines if line in known]


def _qemu(qemu_version: str | None) -> str:
    return f"QEMU {qemu_version}" if qemu_version else "QEMU"


def reset_verdict(
    expectation: Expectation, view: GuestView, records: list[Record], qemu_version: str | None = None
) -> Verdict:
    """After a reset with counters programmed and counting: no stale-PMU lines in the guest kernel's log that the
    boot before the step had not printed, every event select and FIXED_CTR_CTRL 0, and every counter and
    GLOBAL_STATUS equal to what the cold boot left (same kernel, same boot path). GLOBAL_CTRL is reported, not
    judged (NOT_JUDGED_AT_RESET: the guest kernel writes it at boot).

    GLOBAL_STATUS has a bit set before the step (program() overflows counter 2 without a PMI), so a reset that
    keeps it shows; on AMD PerfMonV2 the guest kernel clears it at boot (amd_pmu_cpu_reset()), so there only a
    kernel that did not would show. Counters are judged against the cold boot, not 0: check_hw_exists()
    (arch/x86/events/core.c) XORs the last counter whose event select is clear with 0xffff at every boot.

    :param qemu_version: the run's QEMU (host facts), named in the FAIL reason as the component that resets.
    """
    step = first_record(records, "step") or {}
    what = STEP_WORDS.get(step.get("step", "reset"), "reset")
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict is not None:
        return verdict
    summary = _summary(records)
    why = programmed_problem(records)
    if why:
        return errored(f"{what}: {why}")
    boot, after = state(records, "boot"), state(records, "after")
    if not boot or not after:
        return errored("reset: no MSR state from the cold boot or after the reset")
    problems = []
    new_lines, known_lines = _stale_lines(records)
    if new_lines:
        # arch/x86/events/core.c check_hw_exists() / arch/x86/kernel/nmi.c unknown_nmi_error(): stale PMU state.
        problems.append("guest kernel: " + " | ".join(new_lines[:3]))
    stale_selects = []
    for label, value in after.items():
        kind = _kind(label)
        if kind in NOT_JUDGED_AT_RESET:
            continue
        if kind in ZERO_AT_RESET and value != 0:
            stale_selects.append(f"{label} = {_hex(value)}")
        elif kind not in ZERO_AT_RESET and value != boot.get(label):
            problems.append(f"{label} = {_hex(value)} after the {what} but {_hex(boot.get(label))} after the cold boot")
    if stale_selects:
        problems.insert(int(bool(new_lines)), f"{', '.join(stale_selects)} after the {what}, reset value 0 (SDM Vol. "
                        f"3B): {_qemu(qemu_version)} did not reset it; {RESET_WRITER}")  # fmt: skip
    notes = [f"GLOBAL_CTRL {_hex(after[k])} (cold boot {_hex(boot.get(k))}) reported, not judged: the guest kernel "
             f"writes it at boot" for k in after if _kind(k) in NOT_JUDGED_AT_RESET]  # fmt: skip
    saved_status = state(records, "saved").get("global_status")
    if saved_status == 0:
        notes.append("GLOBAL_STATUS had no bit set before the step, so its reset was not tested")
    if known_lines:
        notes.append(f"kernel lines the boot before the step had printed too, not blamed on it: {known_lines[0]}")
    expected = ("event selects and FIXED_CTR_CTRL 0; counters and GLOBAL_STATUS as after the cold boot; no new "
                "stale-PMU kernel lines")  # fmt: skip
    observed = {"after": {k: _hex(v) for k, v in after.items()}, "mechanics": summary}
    if problems:
        return failed(f"stale PMU state after the {what}: " + "; ".join(problems + notes), expected, observed)
    return passed(f"every PMU MSR holds its reset value ({summary})" + "".join(f"; {n}" for n in notes), expected,
                  observed)  # fmt: skip


def _continued(records: list[Record], point: str, what: str) -> tuple[list[str], dict[str, Any]]:
    """Controls equal to the saved ones, counters >= them, GLOBAL_STATUS unchanged."""
    saved, now = state(records, "saved"), state(records, "restored", point)
    problems = []
    if not now:
        return [f"no MSR state after the {what}"], {}
    for label, before in saved.items():
        value = now.get(label)
        kind = _kind(label)
        if kind == "fixed_counter" and int(label[len(kind) :]) >= QEMU_MAX_FIXED_COUNTERS:
            continue  # QEMU_MAX_FIXED_COUNTERS: QEMU does not carry it
        if isinstance(before, str) or isinstance(value, str) or value is None:
            if before != value:
                problems.append(f"{label}: {before} before the {what}, {value} after")
        elif kind in CONTROLS or kind == "global_status":
            if value != before:
                problems.append(f"{label} = {value:#x} after the {what}, {before:#x} before (not restored)")
        elif kind in COUNTERS and value < before:
            problems.append(f"{label} = {value:#x} after the {what} < {before:#x} before (lost counts or a truncated "
                            f"value)")  # fmt: skip
    return problems, {k: _hex(v) for k, v in now.items()}


def _switches(record: Record) -> tuple[int, int]:
    values = [record.get(key) for key in ("switches_n", "switches_0")]
    n, zero = (v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0 for v in values)
    return n, zero


def _where(records: list[Record]) -> str:
    """Where the probe counted and where the harness's SSH work ran (the migration step's ``during``)."""
    step = first_record(records, "step") or {}
    job = step.get("during") or {}
    if step.get("step") != "migration" or "probe_cpu" not in job:
        return ""
    if not job["probe_cpu"]:
        return (" on vCPU 0, the guest's only one: the harness's SSH work across the switch-over (closing the "
                "source's session, the destination session's key exchange in dropbear, cat /proc/uptime) runs on it "
                "(a profile with smp >= 2 moves the SSH server to vCPU 0 and counts on vCPU 1)")  # fmt: skip
    if job.get("ssh_pinned_away"):
        return " on vCPU 1, with every dropbear process moved to vCPU 0 (taskset): another guest task ran there"
    return " on vCPU 1; moving dropbear to vCPU 0 (taskset) failed, so the harness's SSH work may have run there"


def _exact(expectation: Expectation, view: GuestView, records: list[Record], errata: OvercountErrata) -> Verdict:
    """The new loop's exact count (arch_counters.exact_global_ctrl), SKIPped when the probe was switched out in a
    window: the counters are per-CPU MSR counters (EVTSEL.USR, FIXED_CTR_CTRL 0x2), so they count every user-mode
    instruction retired on the vCPU, and the only way another task's user-mode instructions reach them while the
    pinned, CPU-bound probe runs is a switch to that task (kernel threads run at CPL0 and interrupts are allowed
    for); one switch can bring in millions (an SSH key exchange), far beyond the +1 per event the bounds allow."""
    region = [r for r in records if r.get("kind") == "enabled" and r.get("stage") == "restored"]
    if not region:
        return errored("no exact-count region after the step")
    n, zero = _switches(region[0])
    if n or zero:
        return skipped(f"measurement: the probe was switched out {n} time(s) in its N window and {zero} in its 0 "
                       f"window{_where(records)}; its counters count every user-mode instruction retired on that "
                       f"vCPU, so another task's instructions are in the count and the exact count cannot be judged",
                       "no context switch in the counting windows", {"switches_n": n, "switches_0": zero})  # fmt: skip
    return exact_global_ctrl(expectation, view, region, errata)


def save_restore_verdict(
    expectation: Expectation,
    view: GuestView,
    records: list[Record],
    errata: OvercountErrata = NO_ERRATA,
    cpu_props: dict[str, Any] | None = None,
) -> Verdict:
    """After save -> new QEMU -> restore: control MSRs equal their saved values, counters >= them, and the restored
    counters count a new loop exactly (arch_counters.exact_global_ctrl's rule).

    Which MSRs a restore carries is QEMU's: target/i386/machine.c vmstate_msr_architectural_pmu (subsection sent
    only when pmu_enable_needed() sees a non-zero PMU MSR) with the values kvm_get_msrs() read; AMD's only with the
    2025 series, full-width counter values and PEBS/PERF_METRICS with the 2026 one. The counters may count between
    the read before the step and the stop (the guest runs on), never backwards."""
    refused = first_record(records, "refused")
    if refused is not None:  # a migration blocker blocks a save to a file too (migration/migration.c)
        return refused_verdict(cpu_props or {}, refused["reason"])
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict is not None:
        return verdict
    summary = _summary(records)
    why = programmed_problem(records)
    if why:
        return errored(f"save/restore: {why}")
    problems, observed = _continued(records, "before", "restore")
    exact = _exact(expectation, view, records, errata)
    return _combine(problems, exact, observed, summary, "save/restore")


def _combine(problems: list[str], exact: Verdict, observed: dict, summary: str, what: str) -> Verdict:
    expected = "control MSRs and GLOBAL_STATUS as saved, counters >= saved, a new loop counted exactly"
    details = {"after": observed, "mechanics": summary, "region": exact.observed}
    if exact.status == "fail":
        problems.append(f"new loop: {exact.reason}")
    if problems:
        return failed(f"PMU state across the {what}: " + "; ".join(problems), expected, details)
    if exact.status in ("skip", "error"):
        # The category word of a SKIP/ERROR reason ("measurement: ...") stays first, so it reads at a glance.
        category, _, rest = exact.reason.partition(": ")
        if not rest or " " in category:
            category, rest = "", exact.reason
        lead = f"{category}: " if category else ""
        return Verdict(exact.status, f"{lead}{what}: MSRs carried over; new loop: {rest}", expected, details)
    return passed(f"PMU state carried over the {what} and counts on exactly ({summary})", expected, details)


def refused_verdict(cpu_props: dict[str, Any], reason: str) -> Verdict:
    """QEMU refused to migrate (or save): with migratable=no and QEMU's non-migratable-CPU blocker that is what QEMU
    documents (PASS); any other refusal is for a reason this suite does not judge (SKIP with QEMU's words)."""
    if cpu_props.get("migratable") is False and NON_MIGRATABLE_BLOCKER in reason:
        return passed(f"QEMU refused to migrate a -cpu with migratable=no, as it documents: {reason}",
                      "refused (migration blocker) or migrated with the state intact", reason)  # fmt: skip
    return skipped(f"qemu: QEMU refused to migrate this guest for a reason outside the vPMU: {reason}")


def migration_verdict(
    expectation: Expectation,
    view: GuestView,
    records: list[Record],
    cpu_props: dict[str, Any],
    errata: OvercountErrata = NO_ERRATA,
) -> Verdict:
    """Live migration: refused as QEMU documents for a non-migratable -cpu, or control MSRs on the destination equal
    to those programmed before it, counters >= them, and a loop counted across the switch-over exactly (no lost or
    doubled counts)."""
    refused = first_record(records, "refused")
    if refused is not None:
        return refused_verdict(cpu_props, refused["reason"])
    verdict = gate(expectation, view.cpuid_pmu, "enumerates no PMU")
    if verdict is not None:
        return verdict
    summary = _summary(records)
    why = programmed_problem(records)
    if why:
        return errored(f"migration: {why}")
    region = first_record(records, "enabled", stage="restored")
    switch = first_record(records, "switchover")
    if region is not None and switch is not None and region["region_end_ns"] <= switch["guest_boottime_ns"]:
        return skipped(f"measurement: the counting region ended (guest clock {region['region_end_ns'] / 1e9:.2f} s) "
                       f"before the destination answered ({switch['guest_boottime_ns'] / 1e9:.2f} s), so it did not "
                       f"span the switch-over; the MSRs carried over ({summary})")  # fmt: skip
    problems, observed = _continued(records, "after", "migration")
    exact = _exact(expectation, view, records, errata)
    return _combine(problems, exact, observed, summary, "migration")


#: Per life-cycle check, the MSR readings the report shows side by side: (column title, stage, point).
REPORT_COLUMNS: dict[str, tuple[tuple[str, str, str | None], ...]] = {
    "lifecycle.reset": (("cold boot", "boot", None), ("before (programmed)", "saved", None),
                        ("after reset", "after", None)),
    "lifecycle.guest_reboot": (("cold boot", "boot", None), ("before (programmed)", "saved", None),
                               ("after reboot", "after", None)),
    "lifecycle.save_restore": (("before (saved)", "saved", None), ("after restore", "restored", "before"),
                               ("after a new loop", "restored", "after")),
    "lifecycle.migration": (("before (programmed)", "saved", None), ("source, region start", "restored", "before"),
                            ("destination, region end", "restored", "after")),
}  # fmt: skip


def report_table(check_id: str, records: list[Record]) -> dict[str, Any] | None:
    """The MSR values of a life-cycle check side by side (matrix.html): ``columns``, ``rows`` of [msr, values...]
    and, per row, whether the last value differs from the one before it; the step's own numbers as ``step``."""
    columns = REPORT_COLUMNS.get(check_id.removesuffix(".pmu"))
    if columns is None:
        return None
    readings = [state(records, stage, point) for _title, stage, point in columns]
    labels = list(dict.fromkeys(label for reading in readings for label in reading))
    rows = []
    for label in labels:
        values = [_hex(reading.get(label)) if label in reading else "" for reading in readings]
        rows.append({"msr": label, "values": values, "changed": values[-1] != values[-2]})
    step = first_record(records, "step") or {}
    numbers = {k: v for k, v in step.items() if k not in ("probe", "kind", "during") and v is not None}
    return {"columns": [title for title, _s, _p in columns], "rows": rows, "step": numbers}
