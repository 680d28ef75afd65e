"""Verdicts (floor 5): from what a host offers and what a guest reported to PASS, FAIL, SKIP or ERROR.

Owns the expectation engine (expectations), the pre-gate that ``plan`` and ``run`` share (plan), and the rules, one
module per feature like guest_tests/test_<feature>.py: enumeration and architectural counters, topdown/LBR/PEBS/IBS,
register semantics, co-existence and its depth, the mux-sweep curve and the life cycle. Rules are pure functions
over records in the probes' exact formats, each citing its SDM/APM, kernel or KUT source beside the code; they
never boot, run or print. May import harness.probe, guest, host, cpu and the ground modules.
"""
