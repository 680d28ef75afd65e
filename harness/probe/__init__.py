"""What runs inside the guest and what it reports (floor 4).

Owns the generated workloads' exact instruction and branch counts (workloads), the architectural events and where
x86 puts them (events), the probes' parameters derived from the guest's decoded view (params), rendering, compiling,
copying and running a probe (runner), the branch map read back from a probe binary (branch_map), what the guest itself
sees of its PMU (guest_view) and what the host NMI watchdog takes from a perf-based vPMU (host_watchdog). Probes
return records; judging them is the next floor's job. May import harness.guest, host, cpu and the ground modules.
"""
