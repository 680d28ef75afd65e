"""vpmu harness: a house whose floors follow the data flow of a run.

    cpu    -> CPUID dumps, capability decoding, CPU models and the profile a guest is asked for
    host   -> host facts, what KVM offers, host perf loads and what perf prints
    guest  -> image, initramfs, QEMU argv and capability probe, the QEMU process, console, SSH, boot
    probe  -> workloads, probe parameters, build and run, branch map, what the guest sees
    judge  -> expectations, the pre-gate (plan), one verdict module per feature (as guest_tests/test_<feature>.py)
    report -> results schema, matrix, render, diff, merge, KCIDB
    suite  -> profiles, one profile's run, the pytest plugin, its session, fixtures and results, rejudge, drivers

A module imports its own floor or lower ones only (tests/test_layers.py walks the imports and holds this, with no
cycles). Below every floor lie the ground modules (errors, paths, TOML data files, whole-or-nothing outputs, child
processes that die with the harness); above them all the roof: the CLI.

PYTEST_DONT_REWRITE: the vpmu command imports this package before it starts pytest, and the pytest11 entry point
would then ask pytest to rewrite its asserts too late (a PytestAssertRewriteWarning on every run); its asserts are
internal invariants, not test assertions.
"""

__version__ = "0.1.0"

#: The floors, lowest first: a module may import from its own floor and the ones before it, never after.
FLOORS = ("cpu", "host", "guest", "probe", "judge", "report", "suite")
#: Top-level modules every floor may use: they know nothing of PMUs, guests or checks.
GROUND = ("errors", "paths", "datafiles", "outputs", "lifetime")
#: Top-level modules above every floor.
ROOF = ("cli", "__main__")
