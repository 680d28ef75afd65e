"""The CPU a guest is asked for and what it can count, as data (floor 1, the lowest).

Owns raw CPUID dumps and their parsing (cpuid_dump), the decoding of CPUID and IA32_PERF_CAPABILITIES into one PMU
capability record (caps), the QEMU ``-cpu`` value as model plus properties (model) and the Profile record that names a
vPMU feature set (profile). Pure functions over bytes and text: nothing here touches the host, a guest or a process.
May import the ground modules (harness.errors, paths, datafiles, outputs, lifetime) only.
"""
