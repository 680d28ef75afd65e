"""Life-cycle verdicts over records in the msr probe's exact format (its life-cycle modes) and suite/lifecycle.py's
own records, built as a real KVM host would produce them, Intel and AMD, healthy and with the known bugs:
QEMU before the 2025 AMD series (event selects not reset, AMD PMU MSRs not migrated), a counter value truncated to
32 bits on restore, a lost GLOBAL_CTRL, counts lost across the switch-over.

A healthy cold boot of the Debian 6.1 guest (nmi_watchdog=0): every event select and FIXED_CTR_CTRL 0; the last
counter = 0xffff, because check_hw_exists() (arch/x86/events/core.c) sets ``reg_safe = i`` for every counter whose
select is clear, XORs that last one with 0xffff and does not restore it; GLOBAL_CTRL as the guest kernel's PMU
driver left it.
"""

from __future__ import annotations

import subprocess

import pytest

from harness.judge import lifecycle as lv
from harness.probe.params import msr_params
from harness.probe.runner import PROBES_DIR
from harness.probe.workloads import LOOP
from tests.test_verdicts import ABSENT, EXPECTED, amd_kvm_guest_view, function_keys, intel_kvm_guest_view, windows

N = 1_000_000
MSR_SOURCE = (PROBES_DIR / "msr.c.j2").read_text()
STATE_KEYS = function_keys(MSR_SOURCE, "static void rec_state_msr", "static void dump")
REGION_KEYS = function_keys(MSR_SOURCE, "static void keep_counting", "int main")
EN_USR = (1 << 22) | (1 << 16)
INTEL_GLOBAL = 0x7000000FF  # 8 GP + 3 fixed enable bits: what the guest's PMU driver writes (x86_pmu.intel_ctrl)
AMD_GLOBAL = 0x3F  # 6 core counters (PerfMonV2 PerfCntrGlobalCtl): also KVM's value for a fresh vCPU (GENMASK)
#: What program() writes to GLOBAL_CTRL: counters 0, 1 (and fixed counter 0), distinct from the two above.
INTEL_PROGRAMMED_GLOBAL = 0x100000003
AMD_PROGRAMMED_GLOBAL = 0x3
#: GLOBAL_STATUS after program() overflowed counter 2 (OVF_CTR) without a PMI.
OVERFLOWED_STATUS = 1 << 2


def layout(vendor: str) -> list[tuple[str, int, int]]:
    """(name, index, MSR) of every MSR dump() in msr.c.j2 reads, for the KVM guest views of test_verdicts."""
    params = msr_params(intel_kvm_guest_view() if vendor == "intel" else amd_kvm_guest_view())
    rows: list[tuple[str, int, int]] = []
    for i in range(params["counters"]):
        if vendor == "intel":
            rows += [("evtsel", i, 0x186 + i), ("counter", i, 0xC1 + i)]
        else:
            rows += [("evtsel", i, 0xC0010200 + 2 * i), ("counter", i, 0xC0010201 + 2 * i)]
    if vendor == "intel":
        rows += [("fixed_counter", j, 0x309 + j) for j in range(params["fixed_count"])]
        rows.append(("fixed_ctr_ctrl", 0, 0x38D))
        rows += [("global_ctrl", 0, 0x38F), ("global_status", 0, 0x38E)]
    else:
        rows += [("global_ctrl", 0, 0xC0000301), ("global_status", 0, 0xC0000300)]
    return rows


def dump(vendor: str, stage: str, point: str, values: dict[str, int]) -> list[dict]:
    """The state records the probe prints (rec_state_msr), tagged with the stage harness/suite/lifecycle.py adds."""
    records = []
    for name, index, msr in layout(vendor):
        label = name if name in ("fixed_ctr_ctrl", "global_ctrl", "global_status") else f"{name}{index}"
        records.append({"probe": "msr", "kind": "state", "point": point, "name": name, "index": index, "msr": msr,
                        "value": values.get(label, 0), "stage": stage})  # fmt: skip
    return records


def cold_boot(vendor: str) -> dict[str, int]:
    last = 7 if vendor == "intel" else 5  # check_hw_exists(): the last counter whose select is clear
    return {f"counter{last}": 0xFFFF, "global_ctrl": INTEL_GLOBAL if vendor == "intel" else AMD_GLOBAL}


def programmed(vendor: str, counted: int = 0) -> dict[str, int]:
    """What program() in msr.c.j2 writes, plus ``counted`` user instructions since."""
    counters = 8 if vendor == "intel" else 6
    values: dict[str, int] = {}
    for i in range(counters):
        event = 0xC4 if i == 1 and vendor == "intel" else 0xC2 if i == 1 else 0xC0
        values[f"evtsel{i}"] = (EN_USR if i < 2 else 1 << 16) | event  # EN on the two judged counters only
        values[f"counter{i}"] = (1 << 40) + 0x10000 * (i + 1) + (counted if i < 2 else 0)
    values["counter2"] = 0x1F70  # overflowed from 2^w - 16 by the 1000-iteration loop
    if vendor == "intel":
        for j in range(3):
            values[f"fixed_counter{j}"] = 0x20000 * (j + 1) + (counted if j == 0 else 0)
        values["fixed_ctr_ctrl"] = 0x2
        values["global_ctrl"] = INTEL_PROGRAMMED_GLOBAL
    else:
        values["global_ctrl"] = AMD_PROGRAMMED_GLOBAL
    values["global_status"] = OVERFLOWED_STATUS
    return values


def step(kind: str, same: bool = True, **extra) -> dict:
    record = {"probe": "lifecycle", "kind": "step", "step": kind, "boot_id_before": "a", "boot_id_after": "a" if same
              else "b", "reset_to_console_s": 6.6, "reset_to_ssh_s": 6.9, **extra}  # fmt: skip
    if kind in ("reset", "guest_reboot"):
        record["reset_event"] = {"guest": kind == "guest_reboot", "reason": "host-qmp-system-reset"}
    return record


def enumeration(vendor: str, stage: str, **changes) -> dict:
    view = intel_kvm_guest_view() if vendor == "intel" else amd_kvm_guest_view()
    summary = view.summary()
    record = {
        "probe": "lifecycle",
        "kind": "enumeration",
        "stage": stage,
        **{k: summary[k] for k in ("caps", "perf_capabilities", "kernel_pmus", "kernel_banner", "sysfs")},
    }
    return {**record, **changes}


def reset_records(vendor: str, after: dict[str, int], lines: tuple[str, ...] = (), how: str = "reset",
                  known: tuple[str, ...] = ()) -> list[dict]:  # fmt: skip
    """``lines``: the stale-PMU kernel lines after the step; ``known``: those the boot before it had printed."""
    return [enumeration(vendor, "boot"), {"probe": "lifecycle", "kind": "stale_lines", "stage": "before",
            "lines": list(known)}, *dump(vendor, "boot", "state", cold_boot(vendor)),
            *dump(vendor, "saved", "saved", programmed(vendor)), step(how, same=False),
            *dump(vendor, "after", "state", after),
            {"probe": "lifecycle", "kind": "stale_lines", "stage": "after", "lines": list(lines)},
            enumeration(vendor, "after")]  # fmt: skip


def region(extra: int = 0, repeats: int = 1, end_ns: int = 9_000_000_000) -> dict:
    """The "enabled" record keep_counting() prints, N-0 regions of ``repeats`` x N iterations."""
    n = N * repeats
    return {"probe": "msr", "kind": "enabled", "mode": "continue", "iterations": n, "repeats": repeats,
            "instructions_n": 7000 + LOOP.delta_instructions(n) + extra, "instructions_0": 7000,
            "branches_n": 400 + LOOP.delta_branches(n), "branches_0": 400,
            "fixed0_n": 7000 + LOOP.delta_instructions(n) + extra, "fixed0_0": 7000, "global_ctrl": 1,
            "region_start_ns": 3_000_000_000, "region_end_ns": end_ns, **windows(), "stage": "restored"}  # fmt: skip


def restore_records(vendor: str, restored: dict[str, int], exact: int = 0) -> list[dict]:
    return [enumeration(vendor, "boot"), *dump(vendor, "saved", "saved", programmed(vendor, 5000)),
            step("save_restore", save_s=0.6, restore_to_ssh_s=0.9),
            *dump(vendor, "restored", "before", restored), region(exact),
            *dump(vendor, "restored", "after", programmed(vendor, 99_000_000)),
            enumeration(vendor, "after")]  # fmt: skip


def test_factories_emit_the_probe_keys():
    assert set(dump("intel", "boot", "state", {})[0]) - {"stage"} == STATE_KEYS | {"probe", "kind", "value"}
    assert set(region()) - {"stage", "probe", "kind"} <= REGION_KEYS | set(windows())
    assert {"iterations", "instructions_n", "region_end_ns"} <= REGION_KEYS


@pytest.mark.parametrize("vendor", ["intel", "amd"])
def test_healthy_reset_passes(vendor):
    view = intel_kvm_guest_view() if vendor == "intel" else amd_kvm_guest_view()
    v = lv.reset_verdict(EXPECTED, view, reset_records(vendor, cold_boot(vendor)))
    assert v.status == "pass", v.reason
    v = lv.reset_verdict(EXPECTED, view, reset_records(vendor, cold_boot(vendor), how="guest_reboot"))
    assert v.status == "pass", v.reason


def test_amd_event_select_left_over_by_qemu_before_the_reset_fix():
    """The bug the 2025 QEMU series fixed: PerfEvtSel0 (MSR c0010200) keeps its value over system_reset, and the
    guest kernel says so."""
    after = {**cold_boot("amd"), "evtsel0": 0x530076}
    lines = ("Performance Events: Fam17h+ core perfctr, Broken BIOS detected, complain to your hardware vendor.",
             "[Firmware Bug]: the BIOS has corrupted hw-PMU resources (MSR c0010200 is 530076)")  # fmt: skip
    v = lv.reset_verdict(EXPECTED, amd_kvm_guest_view(), reset_records("amd", after, lines))
    assert v.status == "fail" and "Broken BIOS detected" in v.reason
    v = lv.reset_verdict(EXPECTED, amd_kvm_guest_view(), reset_records("amd", after), qemu_version="7.2.19")
    assert v.status == "fail" and "evtsel0 = 0x530076 after the reset, reset value 0" in v.reason
    # The component is QEMU (with the run's version), not KVM: KVM does not reset the vPMU on a system reset.
    assert "QEMU 7.2.19 did not reset it; KVM does not reset the vPMU on a system reset" in v.reason
    assert "reset AMD PMU registers during VM reset" in v.reason


def test_stale_lines_the_boot_before_printed_are_not_blamed_on_the_reset():
    old = "[Firmware Bug]: the BIOS has corrupted hw-PMU resources (MSR 186 is 430076)"
    v = lv.reset_verdict(
        EXPECTED, intel_kvm_guest_view(), reset_records("intel", cold_boot("intel"), (old,), known=(old,))
    )
    assert v.status == "pass" and "not blamed on it" in v.reason
    new = "Uhhuh. NMI received for unknown reason 2d on CPU 0."
    v = lv.reset_verdict(EXPECTED, intel_kvm_guest_view(),
                         reset_records("intel", cold_boot("intel"), (old, new), known=(old,)))  # fmt: skip
    assert v.status == "fail" and "guest kernel: Uhhuh." in v.reason and "MSR 186" not in v.reason.split(";")[0]


def test_global_ctrl_after_reset_is_reported_not_judged():
    """The guest kernel writes GLOBAL_CTRL at boot, so a value unlike the cold boot's is no verdict on the reset."""
    v = lv.reset_verdict(
        EXPECTED, intel_kvm_guest_view(), reset_records("intel", {**cold_boot("intel"), "global_ctrl": 3})
    )
    assert v.status == "pass" and "GLOBAL_CTRL 0x3 (cold boot 0x7000000ff) reported, not judged" in v.reason


def test_global_status_kept_over_reset_fails_and_an_unset_one_is_not_tested():
    after = {**cold_boot("intel"), "global_status": OVERFLOWED_STATUS}
    v = lv.reset_verdict(EXPECTED, intel_kvm_guest_view(), reset_records("intel", after))
    assert v.status == "fail" and "global_status = 0x4 after the reset but 0x0 after the cold boot" in v.reason
    records = [{**r, "value": 0} if r.get("stage") == "saved" and r.get("name") == "global_status" else r
               for r in reset_records("intel", cold_boot("intel"))]  # fmt: skip
    v = lv.reset_verdict(EXPECTED, intel_kvm_guest_view(), records)
    assert v.status == "pass" and "GLOBAL_STATUS had no bit set before the step" in v.reason


def test_stale_counter_and_fixed_control_after_reset_fail():
    after = {**cold_boot("intel"), "counter3": (1 << 40) + 0x40000, "fixed_ctr_ctrl": 0x2}
    v = lv.reset_verdict(EXPECTED, intel_kvm_guest_view(), reset_records("intel", after))
    assert v.status == "fail"
    assert "fixed_ctr_ctrl = 0x2 after" in v.reason and "counter3 = 0x10000040000 after the reset but 0x0" in v.reason
    assert "QEMU did not reset it" in v.reason  # no version known: still QEMU


def test_unknown_nmi_after_reset_fails():
    lines = ("Uhhuh. NMI received for unknown reason 30 on CPU 0.",)
    v = lv.reset_verdict(EXPECTED, intel_kvm_guest_view(), reset_records("intel", cold_boot("intel"), lines))
    assert v.status == "fail" and "NMI received for unknown reason" in v.reason


def test_step_mechanics_are_judged_without_a_pmu():
    """lifecycle.<step>: the records of a TCG guest (no MSR state), as harness/suite/lifecycle.py writes them."""
    records = [enumeration("intel", "boot"), step("reset", same=False), enumeration("intel", "after"),
               {"probe": "lifecycle", "kind": "stale_lines", "lines": []}]  # fmt: skip
    v = lv.mechanics_verdict(records)
    assert v.status == "pass" and v.reason.startswith("the reset held: boot id new, reset to console 6.60 s")
    same = [step("reset", same=True) if r["kind"] == "step" else r for r in records]
    assert "did not reboot" in lv.mechanics_verdict(same).reason
    wrong_side = [step("reset", same=False) | {"step": "guest_reboot"} if r["kind"] == "step" else r for r in records]
    wrong_side[[r["kind"] for r in wrong_side].index("step")]["reset_event"] = {"guest": False}
    v = lv.mechanics_verdict(wrong_side)
    assert v.status == "fail" and v.reason.startswith("guest reboot:") and "guest=False" in v.reason
    lost = [enumeration("intel", "after", kernel_pmus=["msr", "software"]) if r.get("stage") == "after" and
            r["kind"] == "enumeration" else r for r in records]  # fmt: skip
    v = lv.mechanics_verdict(lost)
    assert v.status == "fail" and "PMU enumeration changed: kernel_pmus" in v.reason
    rebooted = [enumeration("intel", "boot"), step("save_restore", same=False), enumeration("intel", "after")]
    assert "the guest rebooted" in lv.mechanics_verdict(rebooted).reason


def test_without_a_vpmu_the_values_skip():
    records = [enumeration("intel", "boot"), step("reset", same=False), enumeration("intel", "after")]
    v = lv.reset_verdict(ABSENT, intel_kvm_guest_view(), records)
    assert v.status == "skip" and v.reason.startswith("accel: no vPMU under TCG")


def test_reset_without_programmed_counters_is_an_error():
    records = [r for r in reset_records("intel", cold_boot("intel")) if r.get("stage") != "saved"]
    assert lv.reset_verdict(EXPECTED, intel_kvm_guest_view(), records).status == "error"


@pytest.mark.parametrize("vendor", ["intel", "amd"])
def test_healthy_save_restore_passes(vendor):
    view = intel_kvm_guest_view() if vendor == "intel" else amd_kvm_guest_view()
    v = lv.save_restore_verdict(EXPECTED, view, restore_records(vendor, programmed(vendor, 90_000)))
    assert v.status == "pass", v.reason


def test_counter_truncated_to_32_bits_on_restore_fails():
    restored = programmed("intel", 90_000)
    restored["counter0"] &= 0xFFFFFFFF
    v = lv.save_restore_verdict(EXPECTED, intel_kvm_guest_view(), restore_records("intel", restored))
    assert v.status == "fail" and "counter0" in v.reason and "lost counts or a truncated value" in v.reason


def test_amd_pmu_msrs_not_migrated_by_old_qemu_fail():
    """QEMU before the 2025 series did not save AMD PMU MSRs (kvm_get_msrs() only read the Intel ones): the
    restored guest's selects are 0 and its counters are back at 0."""
    restored = {**cold_boot("amd")}
    v = lv.save_restore_verdict(EXPECTED, amd_kvm_guest_view(), restore_records("amd", restored, exact=-99))
    assert v.status == "fail" and "evtsel0 = 0x0 after the restore" in v.reason and "new loop" in v.reason


def test_lost_global_ctrl_and_inexact_new_loop_fail():
    restored = {**programmed("intel", 90_000), "global_ctrl": 0}
    v = lv.save_restore_verdict(EXPECTED, intel_kvm_guest_view(), restore_records("intel", restored))
    assert v.status == "fail" and "global_ctrl = 0x0 after the restore, 0x100000003 before" in v.reason
    v = lv.save_restore_verdict(EXPECTED, intel_kvm_guest_view(), restore_records("intel", programmed("intel", 9), 1))
    assert v.status == "fail" and "new loop" in v.reason and "PMC0" in v.reason


def test_global_ctrl_and_status_a_destination_never_received_fail():
    """A destination that never received GLOBAL_CTRL reads KVM's value for a fresh vCPU (AMD PerfMonV2: GENMASK of
    the GP counters), and GLOBAL_STATUS 0: both differ from what program() left (0x3; bit 2 overflowed)."""
    restored = {**programmed("amd", 90_000), "global_ctrl": AMD_GLOBAL, "global_status": 0}
    v = lv.save_restore_verdict(EXPECTED, amd_kvm_guest_view(), restore_records("amd", restored))
    assert v.status == "fail" and "global_ctrl = 0x3f after the restore, 0x3 before" in v.reason
    assert "global_status = 0x0 after the restore, 0x4 before" in v.reason


def test_a_fourth_fixed_counter_qemu_does_not_carry_is_not_judged():
    """QEMU keeps MAX_FIXED_COUNTERS = 3 (target/i386/cpu.h): fixed counter 3 back at 0 after a restore is QEMU's
    known limit, not judged."""
    records = restore_records("intel", programmed("intel", 90_000))
    extra = [{"probe": "msr", "kind": "state", "point": point, "name": "fixed_counter", "index": 3, "msr": 0x30C,
              "value": value, "stage": stage} for stage, point, value in
             (("saved", "saved", 0x80000), ("restored", "before", 0), ("restored", "after", 0))]  # fmt: skip
    v = lv.save_restore_verdict(EXPECTED, intel_kvm_guest_view(), records + extra)
    assert v.status == "pass", v.reason
    lost = [r | {"value": 0} if r.get("name") == "fixed_counter" and r["index"] == 2 and r["stage"] == "restored"
            else r for r in records]  # fmt: skip
    assert lv.save_restore_verdict(EXPECTED, intel_kvm_guest_view(), lost).status == "fail"


def migration_records(vendor: str = "intel", exact: int = 0, end_ns: int = 9_000_000_000, switches: int = 0,
                      **job) -> list[dict]:  # fmt: skip
    during = {"command": "/tmp/vpmu-span/msr-span 1 /tmp/vpmu-span/started", "repeats": 400, "finished": True,
              "rc": "0", "probe_cpu": 1, "ssh_pinned_away": True, **job}  # fmt: skip
    return [enumeration(vendor, "boot"), *dump(vendor, "saved", "saved", programmed(vendor, 5000)),
            *dump(vendor, "restored", "before", programmed(vendor, 6000)),
            region(exact, 400, end_ns) | {"switches_n": switches},
            *dump(vendor, "restored", "after", programmed(vendor, 4_000_000_000)),
            {"probe": "lifecycle", "kind": "switchover", "guest_boottime_ns": 5_000_000_000},
            step("migration", total_s=0.6, downtime_ms=11, during=during), enumeration(vendor, "after")]  # fmt: skip


@pytest.mark.parametrize("vendor", ["intel", "amd"])
def test_healthy_migration_passes(vendor):
    view = intel_kvm_guest_view() if vendor == "intel" else amd_kvm_guest_view()
    v = lv.migration_verdict(EXPECTED, view, migration_records(vendor), {"pmu": True})
    assert v.status == "pass", v.reason
    assert "downtime 11 ms" in v.reason


def test_counts_lost_or_doubled_across_the_switch_over_fail():
    for delta in (-1000, 1000):
        v = lv.migration_verdict(EXPECTED, intel_kvm_guest_view(), migration_records(exact=delta), {})
        assert v.status == "fail" and "new loop" in v.reason


def test_region_the_probe_was_switched_out_of_is_not_judged():
    """One preemption lets another task's user-mode instructions (the harness's SSH key exchange on a 1-vCPU guest:
    millions) into the per-CPU counters, while the bounds allow +1 per switch: SKIP, saying where it counted."""
    alone = {"command": "/tmp/vpmu-span/msr-span 0 /tmp/vpmu-span/started", "probe_cpu": 0, "ssh_pinned_away": None}
    v = lv.migration_verdict(EXPECTED, intel_kvm_guest_view(), migration_records(exact=2_500_000, switches=1, **alone),
                             {})  # fmt: skip
    assert v.status == "skip" and v.reason.startswith("measurement: migration: MSRs carried over; new loop: the probe")
    assert "switched out 1 time(s) in its N window" in v.reason
    assert "the guest's only one" in v.reason and "key exchange" in v.reason
    v = lv.migration_verdict(EXPECTED, intel_kvm_guest_view(), migration_records(switches=2), {})
    assert v.status == "skip" and "moved to vCPU 0 (taskset)" in v.reason
    v = lv.migration_verdict(EXPECTED, intel_kvm_guest_view(), migration_records(switches=2, ssh_pinned_away=False), {})
    assert v.status == "skip" and "failed" in v.reason
    lost = migration_records(switches=1)
    lost[[r.get("point") == "after" and r.get("name") == "evtsel" for r in lost].index(True)]["value"] = 0
    v = lv.migration_verdict(EXPECTED, intel_kvm_guest_view(), lost, {})
    assert v.status == "fail" and "evtsel0 = 0x0 after the migration" in v.reason  # the MSRs are still judged


def test_region_that_ended_before_the_switch_over_is_not_judged():
    v = lv.migration_verdict(EXPECTED, intel_kvm_guest_view(), migration_records(end_ns=4_000_000_000), {})
    assert v.status == "skip" and v.reason.startswith("measurement: the counting region ended")


def test_guest_process_lost_across_migration_fails_on_any_accelerator():
    v = lv.mechanics_verdict(migration_records(finished=False, rc=""))
    assert v.status == "fail" and "did not finish on the destination" in v.reason
    assert lv.mechanics_verdict(migration_records()).status == "pass"


def test_refused_migration():
    """QEMU's own blocker text for -cpu host,migratable=no on an invtsc host (target/i386/kvm/kvm.c)."""
    records = [enumeration("intel", "boot"), {"probe": "lifecycle", "kind": "refused",
               "reason": "State blocked by non-migratable CPU device (invtsc flag)"}]  # fmt: skip
    v = lv.migration_verdict(EXPECTED, intel_kvm_guest_view(), records, {"pmu": True, "migratable": False})
    assert v.status == "pass" and "migratable" in v.reason and "invtsc" in v.reason
    v = lv.migration_verdict(EXPECTED, intel_kvm_guest_view(), records, {"pmu": True, "lbr-fmt": 5})
    assert v.status == "skip"  # lbr-fmt is no migration blocker (QEMU checks it when the destination starts)
    other = [records[0], {**records[1], "reason": "disallowing migration blocker (nested VMX) for: x"}]
    assert lv.migration_verdict(EXPECTED, intel_kvm_guest_view(), other, {"migratable": False}).status == "skip"
    v = lv.migration_verdict(EXPECTED, intel_kvm_guest_view(), records, {"pmu": True})
    assert v.status == "skip" and v.reason.startswith("qemu: QEMU refused to migrate this guest")
    assert lv.mechanics_verdict(records, {"migratable": False}).status == "pass"
    v = lv.save_restore_verdict(EXPECTED, intel_kvm_guest_view(), records, cpu_props={"migratable": False})
    assert v.status == "pass" and "invtsc" in v.reason  # the blocker blocks a save to a file too


def test_report_table_for_both_checks_of_a_step():
    records = reset_records("intel", {**cold_boot("intel"), "evtsel0": 0x4100C0})
    table = lv.report_table("lifecycle.reset.pmu", records)
    assert table["columns"] == ["cold boot", "before (programmed)", "after reset"]
    row = next(r for r in table["rows"] if r["msr"] == "evtsel0")
    assert row["values"] == ["0x0", "0x4100c0", "0x4100c0"] and not row["changed"]
    assert lv.report_table("lifecycle.reset", records) == table and lv.report_table("arch.rdpmc", records) is None


def test_side_by_side_rows():
    records = reset_records("intel", {**cold_boot("intel"), "evtsel0": 0x4100C0})
    rows = {r["msr"]: r for r in lv.side_by_side(records, ("saved", None), ("after", None))}
    assert rows["evtsel0"] == {"msr": "evtsel0", "before": "0x4100c0", "after": "0x4100c0", "changed": False}
    assert rows["counter7"]["changed"] and rows["counter7"]["after"] == "0xffff"


@pytest.mark.parametrize("vendor", ["intel", "amd"])
@pytest.mark.parametrize("mode", ["state", "program", "continue", "stop"])
def test_lifecycle_modes_compile_without_warnings(tmp_path, vendor, mode):
    """The msr probe's life-cycle modes, rendered for an Intel and an AMD KVM guest, compile with -Werror (objects,
    so unused functions are seen too)."""
    from harness.probe.params import lifecycle_params
    from harness.probe.runner import ProbeBuilder

    view = intel_kvm_guest_view() if vendor == "intel" else amd_kvm_guest_view()
    source = tmp_path / "msr.c"
    source.write_text(ProbeBuilder(cache_dir=tmp_path).render("msr", lifecycle_params(view, mode, 7)))
    done = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror", "-c", str(source),
                           "-o", str(tmp_path / "msr.o")], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[:2000]


def test_region_of_repeated_loops_counts_exactly(tmp_path):
    """keep_counting()'s region: ``repeats`` calls of the loop, N iterations minus 0, executes exactly repeats x the
    loop's differential (the calls' own instructions and branches cancel), checked with callgrind like the loop
    itself (tests/test_workload.py)."""
    import re
    import shutil

    from harness.probe.params import lifecycle_params
    from harness.probe.runner import ProbeBuilder

    if shutil.which("valgrind") is None:
        pytest.fail("valgrind is not installed (Debian package valgrind); scripts/install installs it")
    repeats, n = 7, 1000
    binary = (
        ProbeBuilder(cache_dir=tmp_path)
        .build("msr", {**lifecycle_params(intel_kvm_guest_view(), "continue", repeats), "iterations": n})
        .binary
    )
    totals = {}
    for iterations in (n, 0):
        out = tmp_path / f"cg.{iterations}"
        subprocess.run(["valgrind", "--tool=callgrind", "--toggle-collect=region*", "--branch-sim=yes",
                        f"--callgrind-out-file={out}", str(binary), "0", "workload", str(iterations)],
                       check=True, capture_output=True)  # fmt: skip
        text = out.read_text()
        events = re.search(r"^events: (.*)$", text, re.M).group(1).split()
        values = [int(v) for v in re.search(r"^totals: (.*)$", text, re.M).group(1).split()]
        totals[iterations] = dict(zip(events, values + [0] * (len(events) - len(values)), strict=True))
    assert (
        totals[n]["Ir"] - totals[0]["Ir"]
        == repeats * LOOP.delta_instructions(n)
        == LOOP.delta_instructions(repeats * n)
    )
    assert totals[n]["Bc"] - totals[0]["Bc"] == repeats * LOOP.delta_branches(n)


def test_save_waits_for_the_renamed_file_and_notices_qemu_exit(tmp_path):
    """The save command renames the file once cat has written all of it; QEMU's "completed" comes earlier
    (harness.suite.lifecycle._await_file)."""
    from harness.errors import LifecycleError
    from harness.suite import lifecycle

    class Machine:
        def __init__(self, gone):
            self._gone = gone

        def gone(self):
            return self._gone

        def serial_tail(self):
            return ""

    state = tmp_path / "state"
    state.write_bytes(b"x")
    lifecycle._await_file(Machine(None), state, 5.0)
    start = __import__("time").monotonic()
    with pytest.raises(LifecycleError, match="QEMU exited with code 1 before the saved state was complete"):
        lifecycle._await_file(Machine("QEMU exited with code 1"), tmp_path / "missing", 30.0)
    assert __import__("time").monotonic() - start < 5
    with pytest.raises(LifecycleError, match="was not complete after 1 s"):
        lifecycle._await_file(Machine(None), tmp_path / "missing", 0.1)
