"""LBR verdicts (guest_tests/test_lbr.py): legacy and architectural LBR, branch records and call stacks.

Each rule cites its source. The records are checked against the branch map read from the probe binary itself
(harness.probe.branch_map), so a from/to pair is judged by the instruction that made it.
"""

from __future__ import annotations

import errno as errno_mod
from typing import TYPE_CHECKING, Any

from harness.judge.expectations import Expectation
from harness.judge.verdict import Record, Verdict, errored, failed, first_record, gate, passed, skipped
from harness.probe.branch_map import BranchMap
from harness.probe.guest_view import GuestView

if TYPE_CHECKING:
    pass
from harness.judge.guest_kernel import (
    USER_SPACE_END,
    absent_or_present,
    decoded_perf_capabilities,
    errno_name_of,
    guest_kernel_skip,
    guest_kernel_words,
    kernel_knows_model,
    throttle_skip,
    throttles,
)


def lbr_depth(view: GuestView) -> int:
    text = view.sysfs.get("cpu/caps/branches", "0")
    return int(text) if text.isdigit() else 0


def _legacy_lbr_unused(view: GuestView, release: str | None) -> Verdict | None:
    """SKIP when PERF_CAPABILITIES shows a legacy LBR format but the guest kernel set up no LBR because it does not
    know the CPU model (legacy LBR is initialised only in the model cases of core.c intel_pmu_init(), see
    GENERIC_PMU_PREFIX). None otherwise: a kernel that knows the model drops LBR only when its boot-time MSR probe
    fails (intel_pmu_init(): check_msr() on LBR_TOS/FROM/TO sets lbr_nr = 0), which the vPMU answers for."""
    fmt = int(decoded_perf_capabilities(view).get("lbr_format") or 0)
    if not fmt or view.caps.arch_lbr is not None or lbr_depth(view) or kernel_knows_model(view) is not False:
        return None
    return guest_kernel_skip("legacy LBR", f"PERF_CAPABILITIES[5:0] shows LBR format {fmt}", "it does not know this "
                             "CPU model, so it set up no LBR (no cpu/caps/branches)", view, release)  # fmt: skip


def legacy_lbr_enumeration(expectation: Expectation, view: GuestView, release: str | None = None) -> Verdict:
    """Legacy LBR: PERF_CAPABILITIES[5:0] non-zero and the guest kernel's LBR depth (cpu/caps/branches)."""
    fmt = int(decoded_perf_capabilities(view).get("lbr_format") or 0)
    shown = fmt != 0 and view.caps.arch_lbr is None
    detail = {"lbr_format": fmt, "depth": lbr_depth(view), "pmu_name": view.sysfs.get("cpu/caps/pmu_name")}
    if shown and expectation.available and not lbr_depth(view):
        unused = _legacy_lbr_unused(view, release)
        if unused:
            return unused
        return failed(f"LBR format {fmt} enumerated but the guest kernel registered no LBR depth although it knows "
                      f"the CPU model ({guest_kernel_words(view, release)}): its boot-time LBR MSR probe failed "
                      "(core.c intel_pmu_init() check_msr())", True, detail)  # fmt: skip
    return absent_or_present("legacy LBR", expectation, shown, detail)


def arch_lbr_enumeration(expectation: Expectation, view: GuestView) -> Verdict:
    """Arch LBR: CPUID.07H:EDX[19] with leaf 1CH depths; the guest kernel's depth is one of them."""
    arch = view.caps.arch_lbr
    detail = {"cpuid_depths": arch.depths if arch else None, "depth": lbr_depth(view),
              "filters": {k: getattr(arch, k) for k in ("cpl_filter", "branch_filter", "call_stack", "mispredict",
                                                         "timed", "branch_type")} if arch else None}  # fmt: skip
    if arch is not None and not arch.depths:
        return failed("CPUID.07H:EDX[19] set but leaf 1CH enumerates no depth", "depths", detail)
    if arch is not None and lbr_depth(view) and lbr_depth(view) not in arch.depths:
        return failed(f"guest kernel LBR depth {lbr_depth(view)} is not one of CPUID.1CH's {arch.depths}",
                      "depth in CPUID.1CH", detail)  # fmt: skip
    return absent_or_present("arch LBR", expectation, arch is not None, detail)


def lbr_expectation(legacy: Expectation, arch: Expectation) -> Expectation:
    """The LBR flavour the guest should have (legacy or arch), or legacy's reason when neither."""
    if arch.available:
        return arch
    return legacy


def _layout(records: list[Record]) -> Record | None:
    return first_record(records, "layout")


def _lbr_gate(expectation: Expectation, view: GuestView, release: str | None) -> Verdict | None:
    """Expected and the guest kernel has an LBR depth -> None (measure); else SKIP or FAIL with the reason."""
    if not expectation.available:
        return skipped(expectation.reason)
    if lbr_depth(view):
        return None
    return _legacy_lbr_unused(view, release) or gate(expectation, False,
                                                     "registered no LBR depth (cpu/caps/branches)")  # fmt: skip


def _lbr_no_samples(mode: Record, records: list[Record], what: str) -> Verdict | None:
    """A branch mode that produced no sample: throttled (SKIP), every record lost to a full ring (ERROR: the probe's
    buffer, not the PMU), else None (the caller FAILs)."""
    if mode["samples"]:
        return None
    throttled = throttle_skip(mode, records)
    if throttled:
        return throttled
    if mode.get("lost"):
        return errored(f"every {what} sample record was lost ({mode['lost']} PERF_RECORD_LOST: the ring buffer was "
                       "full, kernel/events/ring_buffer.c perf_output_begin()); the probe's buffer is too small",
                       {"samples": 0, "lost": mode["lost"]})  # fmt: skip
    return None


#: Why every stack can be empty on a healthy host: KVM gives the guest the LBRs through a host perf event
#: (arch/x86/kvm/vmx/pmu_intel.c intel_pmu_create_guest_lbr_event(): task-pinned, "if another cpu pinned event
#: reclaims LBR ..."). While a host LBR user holds them, vmx_passthrough_lbr_msrs() intercepts the LBR MSRs ("fail to
#: passthrough LBR" in the host log) and intel_pmu_handle_lbr_msrs_access() "return[s] 0 on guest reads", so the
#: guest reads all-zero entries, which its LBR read drops (lbr.c: "Read LBR call stack entries until invalid entry
#: (0s)", intel_pmu_lbr_filter() drops X86_BR_NONE, and utils.c get_branch_type() types from/to 0 as X86_BR_NONE:
#: "maybe zero if lbr did not fill up after a reset").
LBR_RECLAIMED_REASON = ("host: every branch stack is empty, as when a host LBR user (a CPU-pinned host event with "
                        "branch sampling, e.g. perf record -b -a) holds the LBRs: KVM then returns 0 for the guest's "
                        "LBR reads (arch/x86/kvm/vmx/pmu_intel.c intel_pmu_handle_lbr_msrs_access(), "
                        "vmx_passthrough_lbr_msrs(): 'fail to passthrough LBR' in the host log). Stop host "
                        "branch sampling and rerun; if the host log shows no such line, KVM lost the guest's "
                        "LBRs")  # fmt: skip


def _stacks_empty(mode: Record, samples: list[Record]) -> bool:
    """Samples were taken but no entry holds a branch: max_nr 0, or only zero entries (kernels without the filter)."""
    if not mode["samples"]:
        return False
    if mode["max_nr"] == 0:
        return True
    return bool(samples) and all(src == 0 and dst == 0 for s in samples for src, dst, _flags in s["entries"])


def lbr_records(
    expectation: Expectation,
    view: GuestView,
    records: list[Record],
    branches: BranchMap | None = None,
    release: str | None = None,
) -> Verdict:
    """ANY|USER branch stacks: every target in the probe's own text, depth reached, and every entry that starts
    inside the workload starts at one of its branch instructions (calls landing on the callee), as objdump of the
    probe binary lists them.

    USER filters by the branch *target* (perf_event_open(2): "PERF_SAMPLE_BRANCH_USER: Branch target is in user
    space"; arch/x86/events/utils.c get_branch_type(): "branch priv level determined by target as is done by HW when
    LBR_SELECT is implemented"), so the return from an interrupt or syscall (iret/sysret: from a kernel address to
    the interrupted user IP) legitimately appears with a kernel FROM. Only kernel *targets*, and kernel sources of
    branches that do not return to user space, are leaks.

    Zero entries (from = to = 0) are an LBR not yet refilled after a reset (get_branch_type(): "maybe zero if lbr
    did not fill up after a reset") and are not foreign branches; stacks that are all empty are LBR_RECLAIMED_REASON.
    PERF_RECORD_LOST records mean the ring was full (kernel/events/ring_buffer.c perf_output_begin()): the stacks
    that did arrive are whole and are judged; lost only matters when nothing arrived (ERROR, the probe's buffer)."""
    verdict = _lbr_gate(expectation, view, release)
    if verdict:
        return verdict
    mode = first_record(records, "branch_mode", mode="any")
    layout = _layout(records)
    if mode is None or layout is None:
        return errored("lbr probe produced no 'any' mode or layout record")
    if "error" in mode:
        return failed(f"branch-stack sampling failed: {errno_name_of(mode)}", "samples", mode.get("strerror"))
    nothing = _lbr_no_samples(mode, records, "branch-stack")
    if nothing:
        return nothing
    samples = [r for r in records if r.get("kind") == "branch_sample" and r.get("mode") == "any"]
    depth = lbr_depth(view)
    problems, outside, kernel, kernel_returns, not_branch, wrong_target, zero = [], 0, 0, 0, 0, 0, 0
    for s in samples:
        if s["nr"] > depth:
            problems.append(f"a sample has {s['nr']} entries > depth {depth}")
            break
        for src, dst, _flags in s["entries"]:
            if src == 0 and dst == 0:
                zero += 1
                continue
            if dst >= USER_SPACE_END:
                kernel += 1
                continue
            if src >= USER_SPACE_END:
                kernel_returns += 1  # iret/sysret into user space: allowed by the USER (target) filter
            elif not layout["text_start"] <= src < layout["text_end"]:
                outside += 1
            if not layout["text_start"] <= dst < layout["text_end"]:
                outside += 1
            if branches is not None and branches.covers(src):
                site = branches.sites.get(src)
                if site is None:
                    not_branch += 1
                elif site.kind == "call" and site.target is not None and dst != site.target:
                    wrong_target += 1
    observed = {"samples": mode["samples"], "max_nr": mode["max_nr"], "depth": depth, "kernel_targets": kernel,
                "kernel_to_user_returns": kernel_returns, "outside_text": outside, "not_a_branch": not_branch,
                "call_elsewhere": wrong_target, "zero_entries": zero, "lost": mode["lost"],
                "throttled": throttles(mode)}  # fmt: skip
    if not mode["samples"]:
        problems.append("no branch-stack samples")
    elif _stacks_empty(mode, samples):
        return skipped(LBR_RECLAIMED_REASON, f"stacks of depth {depth}", observed)
    if kernel:
        problems.append(f"{kernel} kernel-space branch targets in USER-only stacks (host or guest-kernel leak)")
    if outside:
        problems.append(f"{outside} addresses outside the probe's text (foreign branches)")
    if not_branch:
        problems.append(f"{not_branch} entries start inside the workload but not at one of its branch instructions")
    if wrong_target:
        problems.append(f"{wrong_target} call entries land elsewhere than the callee's entry")
    if mode["max_nr"] != depth:
        problems.append(f"deepest stack {mode['max_nr']} != enumerated depth {depth}")
    if problems:
        return failed("; ".join(problems), f"entries in the probe's text, depth {depth}", observed)
    return passed(f"{mode['samples']} branch stacks, all entries in the probe's text, depth {depth}", depth, observed)


def lbr_call_stack(
    expectation: Expectation, view: GuestView, records: list[Record], release: str | None = None
) -> Verdict:
    """CALL_STACK|USER sampled inside f3: the newest entries are the calls f2->f3, f1->f2, loop->f1.

    In call-stack mode the LBR holds the open calls: every sample taken inside vpmu_chain has at least the call into
    it, so samples whose stacks are all empty (nr = 0 everywhere) are a broken call stack (FAIL) - unless the ANY
    stacks of the same run were empty too, which is a host LBR user (LBR_RECLAIMED_REASON). No sample at all is a
    FAIL as well, except for a throttled event (SKIP) or a full ring (ERROR)."""
    verdict = _lbr_gate(expectation, view, release)
    if verdict:
        return verdict
    mode = first_record(records, "branch_mode", mode="call_stack")
    layout = _layout(records)
    if mode is None or layout is None:
        return errored("lbr probe produced no 'call_stack' mode or layout record")
    if "error" in mode:
        if mode.get("errno") in (errno_mod.EOPNOTSUPP, errno_mod.EINVAL):
            return skipped(
                f"not-enumerated: call-stack mode unsupported ({errno_name_of(mode)}; needs LBR format >= 4)"
            )
        return failed(f"call-stack sampling failed: {errno_name_of(mode)}", "samples", mode.get("strerror"))
    nothing = _lbr_no_samples(mode, records, "call-stack")
    if nothing:
        return nothing
    all_samples = [s for s in records if s.get("kind") == "branch_sample" and s.get("mode") == "call_stack"]
    observed: dict[str, Any] = {"samples": mode["samples"], "max_nr": mode["max_nr"], "lost": mode["lost"],
                                "throttled": throttles(mode)}  # fmt: skip
    if not mode["samples"]:
        return failed("no call-stack samples", "samples with the call chain", observed)
    if _stacks_empty(mode, all_samples):
        any_mode = first_record(records, "branch_mode", mode="any")
        any_samples = [s for s in records if s.get("kind") == "branch_sample" and s.get("mode") == "any"]
        if any_mode is not None and "error" not in any_mode and _stacks_empty(any_mode, any_samples):
            return skipped(LBR_RECLAIMED_REASON, "the open calls", observed)
        return failed(f"all {mode['samples']} call-stack samples have an empty stack although the ANY stacks of the "
                      "same run were filled: the open calls of vpmu_chain must be there", "the open calls",
                      observed)  # fmt: skip
    f1, f2, f3 = layout["f1"], layout["f2"], layout["f3"]
    f3_end = min(a for a in (f1, f2) if a > f3) if any(a > f3 for a in (f1, f2)) else f3 + 16
    inside = [s for s in all_samples if f3 <= s["ip"] < f3_end]
    if not inside:
        return skipped(f"no call-stack sample landed inside f3 ({len(all_samples)} reported; too few to judge)",
                       ">= 90 %", observed)  # fmt: skip
    good = [s for s in inside if [e[1] for e in s["entries"][:3]] == [f3, f2, f1]]
    observed.update({"samples_in_f3": len(inside), "chain_f3_f2_f1": len(good)})
    if len(good) < 0.9 * len(inside):
        return failed(f"only {len(good)} of {len(inside)} samples in f3 show the chain f3 <- f2 <- f1",
                      ">= 90 %", observed)  # fmt: skip
    return passed(f"{len(good)}/{len(inside)} samples in f3 show the call chain", ">= 90 %", observed)
