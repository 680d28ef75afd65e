"""A host load that exists before KVM creates the VM (loads.toml ``start = "before-boot"``): shut the profile's
guest down, start the load, boot a new guest under it, and record what happened for coexist.load_before_boot.
"""

from __future__ import annotations

import time
from typing import Any

from harness.errors import GuestError
from harness.host.loads import HostLoad
from harness.judge.coexist_depth import vcpu_create_refused
from harness.suite.profile_run import ProfileRun


def start_before_boot(load: HostLoad, run: ProfileRun) -> None:
    """Shut the profile's guest down, start ``load``, and boot a new guest under it; record the order and the
    outcome in ``load.result.before_boot``. The old VM goes first: it may hold a mediated PMU, which would make the
    kernel refuse the load's include-guest events (kvm_arch_destroy_vm -> perf_release_mediated_pmu).

    A guest that does not boot is recorded, not raised (the group's checks are decided from the record); Ctrl-C while
    booting stops the load before it propagates.
    """
    run.close()
    begin = time.monotonic()
    load.start()
    record: dict[str, Any] = {"load_status": load.result.status, "load_ready_s": round(time.monotonic() - begin, 3),
                              "boot_started_s": None, "qemu_launched_s": None, "booted": False, "boot_error": None,
                              "vcpu_create_refused": False}  # fmt: skip
    load.result.before_boot = record
    if load.result.status != "running":
        return  # nothing runs before the VM: the group SKIPs with the load's reason, and no guest is needed
    record["boot_started_s"] = round(time.monotonic() - begin, 3)
    try:
        run.boot_again()
    except GuestError as exc:
        record["boot_error"] = str(exc)
        record["vcpu_create_refused"] = vcpu_create_refused(str(exc))
    except BaseException:
        load.stop()  # interrupted while booting: the caller never gets the load to stop
        raise
    else:
        record["booted"] = True
        record["qemu_launched_s"] = round(run.guest.machine.launched_at - begin, 3)
        load.exits_before = run.vm_exits_now()
    finally:
        # A load that died before KVM created the vCPU proves nothing about VM creation under it.
        record["load_alive_after_boot"] = load.alive()
