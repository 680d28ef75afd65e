"""The host a run stands on (floor 2): what it is, what KVM offers, and what host perf does beside the guest.

Owns the host facts ``doctor`` prints (hostfacts), what ``/dev/kvm`` offers guests through KVM's system ioctls
(kvm_offer), the package that provides a missing program (hostpkg), the kernel's own answer on the mediated vPMU
(mediated_probe), host perf loads from loads.toml and their processes (loads), what perf prints (perf_output) and the
guarded rotation-interval sysctl (mux_interval). May import harness.cpu and the ground modules; never a guest, a probe
or a verdict.
"""
