"""AMD IBS verdicts (guest_tests/test_ibs.py): IBS enumeration and fetch/op sampling.

Each rule cites the AMD APM / PPR section or kernel source it follows (arch/x86/events/amd/ibs.c).
"""

from __future__ import annotations

import errno as errno_mod
from typing import TYPE_CHECKING

from harness.judge.expectations import Expectation
from harness.judge.verdict import Record, Verdict, errored, failed, first_record, gate, passed
from harness.probe.guest_view import GuestView

if TYPE_CHECKING:
    pass
from harness.judge.guest_kernel import USER_SPACE_END, absent_or_present, errno_name_of, throttle_skip, throttles

IBS_OP_VAL = 1 << 18  # IbsOpCtl[18] IbsOpVal (APM Vol. 2, "Instruction-Based Sampling"; Linux IBS_OP_VAL)
IBS_FETCH_VAL = 1 << 49  # IbsFetchCtl[49] IbsFetchVal (Linux IBS_FETCH_VAL)
IBS_RIP_INVALID = 1 << 38  # IbsOpData[38] IbsRipInvalid
#: ibs_caps bits (CPUID 8000001BH EAX; arch/x86/include/asm/perf_event.h IBS_CAPS_*).
IBS_CAPS_BRNTRGT = 1 << 5
IBS_CAPS_RIPINVALIDCHK = 1 << 7
IBS_CAPS_FETCHCTLEXTD = 1 << 9
IBS_CAPS_OPDATA4 = 1 << 10
#: arch/x86/include/asm/msr-index.h: MSR_AMD64_IBSOP_REG_COUNT (IbsOpCtl, IbsOpRip, IbsOpData, IbsOpData2,
#: IbsOpData3, IbsDcLinAd, IbsDcPhysAd) and MSR_AMD64_IBSFETCH_REG_COUNT (IbsFetchCtl, IbsFetchLinAd, IbsFetchPhysAd).
IBS_OP_REG_COUNT = 7
IBS_FETCH_REG_COUNT = 3
IBS_IN_LOOP = 0.95


def ibs_raw_regs(pmu: str, caps: int) -> int:
    """How many u64 registers the guest kernel puts in an IBS PERF_SAMPLE_RAW payload for ``caps``.

    arch/x86/events/amd/ibs.c perf_ibs_handle_irq(): with PERF_SAMPLE_RAW it reads offset_max registers (the
    REG_COUNT above), then IbsBrTarget if IBS_CAPS_BRNTRGT and IbsOpData4 if IBS_CAPS_OPDATA4 (op), or
    IbsFetchExtdCtl if IBS_CAPS_FETCHCTLEXTD (fetch). Genoa's caps 0xBFF (bit 10 clear): 8 op, 4 fetch registers.
    """
    if pmu == "ibs_op":
        return IBS_OP_REG_COUNT + bool(caps & IBS_CAPS_BRNTRGT) + bool(caps & IBS_CAPS_OPDATA4)
    return IBS_FETCH_REG_COUNT + bool(caps & IBS_CAPS_FETCHCTLEXTD)


def ibs_shown(view: GuestView) -> bool:
    return bool(view.caps.amd and view.caps.amd.ibs) or "ibs_op/type" in view.sysfs


def ibs_enumeration(expectation: Expectation, view: GuestView) -> Verdict:
    """CPUID 80000001H:ECX[10] + 8000001BH and the guest kernel's ibs_op / ibs_fetch PMUs agree."""
    cpuid = bool(view.caps.amd and view.caps.amd.ibs)
    pmus = "ibs_op/type" in view.sysfs and "ibs_fetch/type" in view.sysfs
    detail = {"cpuid": cpuid, "ibs_pmus": pmus, "caps": view.caps.amd.ibs.caps if cpuid and view.caps.amd else None}
    if expectation.available and cpuid and not pmus:
        return failed("CPUID enumerates IBS but the guest kernel registered no ibs_op/ibs_fetch PMU", True, detail)
    return absent_or_present("AMD IBS", expectation, cpuid or pmus, detail)


def _rip_invalid(sample: Record, pmu: str) -> bool:
    """IbsOpData.RipInvalid, honoured only where the kernel honours it (perf_ibs_handle_irq: check_rip needs
    IBS_CAPS_RIPINVALIDCHK); such a sample carries the interrupted IP without EXACT, not IbsOpRip."""
    regs = sample["regs"]
    return pmu == "ibs_op" and bool(sample.get("caps", 0) & IBS_CAPS_RIPINVALIDCHK) and len(regs) > 2 and \
        bool(regs[2] & IBS_RIP_INVALID)  # fmt: skip


def ibs_sampling(expectation: Expectation, view: GuestView, records: list[Record], pmu: str) -> Verdict:
    """IBS samples point into the loop: IbsOpRip (op) / IbsFetchLinAd (fetch) inside the loop for >= 95 % of the
    probe's own samples, and the sample IP equals that address (perf_ibs_handle_irq: set_linear_ip(regs,
    ibs_data.regs[1])). Samples with IbsRipInvalid are counted apart: their IbsOpRip is not an address (§5c). The
    probe opens per task, or CPU-wide filtered by its TID on guest kernels before 6.2.

    The Val bit says nothing about the vPMU: arch/x86/events/amd/ibs.c perf_ibs_handle_irq() reads the control MSR
    first and drops the interrupt unless `*buf & perf_ibs->valid_mask` is set, and that same value is regs[0] of the
    raw payload. A delivered sample without Val therefore means the probe decoded the payload at the wrong offset:
    an ERROR of the harness, not a verdict on the host."""
    verdict = gate(expectation, "ibs_op/type" in view.sysfs and "ibs_fetch/type" in view.sysfs,
                   "registered no ibs_op/ibs_fetch PMU")  # fmt: skip
    if verdict:
        return verdict
    mode = first_record(records, "ibs_mode", pmu=pmu)
    if mode is None:
        return errored(f"ibs probe produced no {pmu} record")
    if "error" in mode:
        tried = f" (per-task open: {errno_mod.errorcode.get(mode['task_errno'], mode['task_errno'])})" \
            if mode.get("task_errno") else ""  # fmt: skip
        return failed(f"{pmu} sampling failed in {mode.get('mode', 'task')} mode: {errno_name_of(mode)}{tried}",
                      "samples", mode.get("strerror"))  # fmt: skip
    samples = [r for r in records if r.get("kind") == "ibs_sample" and r.get("pmu") == pmu and len(r["regs"]) >= 2]
    start, end = mode["loop_start"], mode["loop_end"]
    val_bit = IBS_OP_VAL if pmu == "ibs_op" else IBS_FETCH_VAL
    invalid = rip_invalid = inside = mismatched = odd_size = kernel = 0
    for s in samples:
        ctl, address = s["regs"][0], s["regs"][1]
        if not ctl & val_bit:
            invalid += 1
        if len(s["regs"]) != ibs_raw_regs(pmu, int(s.get("caps", 0))):
            odd_size += 1
        if _rip_invalid(s, pmu):
            rip_invalid += 1
            continue
        if address >= USER_SPACE_END:
            kernel += 1  # the guest kernel running in the probe's context (IBS has no exclude_kernel)
        if start <= address < end:
            inside += 1
        if s["ip"] != address:
            mismatched += 1
    judged = len(samples) - rip_invalid
    observed = {"mode": mode.get("mode", "task"), "config": mode.get("config"), "samples": mode["samples"],
                "own_samples": mode.get("own_samples"), "foreign_samples": mode.get("foreign_samples"),
                "judged": judged, "invalid": invalid, "rip_invalid": rip_invalid, "in_loop": inside,
                "kernel": kernel, "ip_mismatch": mismatched, "raw_size_unexpected": odd_size,
                "throttled": throttles(mode)}  # fmt: skip
    problems = []
    if not samples:
        throttled = throttle_skip(mode, records)
        if throttled:
            return throttled
        if mode.get("lost"):
            return errored(f"no {pmu} sample of the probe's thread arrived and {mode['lost']} PERF_RECORD_LOST "
                           "records say the ring buffer was full (kernel/events/ring_buffer.c perf_output_begin()): "
                           "the probe's buffer, not the PMU", observed)  # fmt: skip
        problems.append("no IBS samples of the probe's own thread")
    if invalid:
        return errored(f"{invalid} of {len(samples)} {pmu} raw payloads lack the Val bit in regs[0], which the kernel "
                       "checks before it delivers a sample (ibs.c perf_ibs_handle_irq()): the probe's raw decode is "
                       "misaligned", observed)  # fmt: skip
    if samples and not judged:
        problems.append("every sample has IbsRipInvalid")
    if judged and inside < IBS_IN_LOOP * judged:
        problems.append(f"only {inside} of {judged} sampled addresses inside the loop")
    if mismatched:
        register = "IbsOpRip" if pmu == "ibs_op" else "IbsFetchLinAd"
        problems.append(f"{mismatched} samples whose IP differs from {register}")
    if problems:
        return failed("; ".join(problems), ">= 95 % valid samples in the loop", observed)
    return passed(f"{judged} valid {pmu} samples in the loop ({observed['mode']} mode)", ">= 95 %", observed)
