"""The architectural events the counting probes count, and where x86 puts them: fixed counters (Intel) and the AMD
core events standing in for them. Shared by the probe parameters (what to program) and the verdicts (what it means).
"""

from __future__ import annotations

FIXED_INDEX_BIT = 1 << 30  # SDM Vol. 2B, RDPMC: ECX[30] selects the fixed-function counters
#: Fixed counter j counts this architectural event (SDM Vol. 3B, "Fixed-Function Performance Counters").
FIXED_EVENTS = ("instructions", "core_cycles", "ref_cycles", "topdown_slots")
#: The fixed counter an architectural event may land on besides the GP counters (Linux arch/x86/events/intel/core.c
#: fixed event constraints: 0x00c0 -> 0, 0x003c -> 1, and since 6.7 "perf/x86/intel: Extend the ref-cycles event
#: to GP counters" (ffbe4ab0beda) FIXED_EVENT_CONSTRAINT(0x013c, 2) on Golden Cove/Gracemont and later; SLOTS -> 3).
EVENT_FIXED_COUNTER = {event: index for index, event in enumerate(FIXED_EVENTS)}
#: AMD core events standing in for the architectural ones (AMD PPR "Core Performance Monitor Counters":
#: 0x76 cycles not in halt, 0xC0 retired instructions, 0xC2 retired branches, 0xC3 retired branch mispredicts).
AMD_EVENTS = {"core_cycles": 0x76, "instructions": 0xC0, "branch_instructions": 0xC2, "branch_misses": 0xC3}
