"""Branch instructions of a probe's workload functions, read from the probe binary itself (objdump).

LBR checks compare recorded from/to pairs with these: every recorded branch that starts inside the workload must
start at one of its branch instructions, and a call must land on its callee's entry (DESIGN.md: branch addresses
come from the probe binary, so this is testable without a PMU).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ToolMissingError

_FUNCTION = re.compile(r"^([0-9a-f]+) <([^>]+)>:$")
_INSN = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
_TARGET = re.compile(r"^([0-9a-f]+) <")


@dataclass(frozen=True)
class BranchSite:
    """A branch instruction: its kind (call, ret, jcc, jmp) and, for direct branches, its target."""

    kind: str
    target: int | None


@dataclass(frozen=True)
class BranchMap:
    sites: dict[int, BranchSite]
    ranges: dict[str, tuple[int, int]]  # function -> [start, end)

    def covers(self, address: int) -> bool:
        return any(start <= address < end for start, end in self.ranges.values())


def _kind(mnemonic: str) -> str | None:
    if mnemonic.startswith("call"):
        return "call"
    if mnemonic.startswith("ret"):
        return "ret"
    if mnemonic.startswith("jmp"):
        return "jmp"
    if mnemonic.startswith("j"):
        return "jcc"
    return None


def branch_map(binary: Path, functions: tuple[str, ...]) -> BranchMap:
    """Parse ``objdump -d`` of ``binary`` for ``functions``.

    :raises ToolMissingError: objdump is not installed (Debian package binutils).
    """
    try:
        text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(binary)], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    except FileNotFoundError:
        raise ToolMissingError("objdump not found; install the Debian package binutils") from None
    sites: dict[int, BranchSite] = {}
    ranges: dict[str, tuple[int, int]] = {}
    current: str | None = None
    last = 0
    for line in text.splitlines():
        function = _FUNCTION.match(line)
        if function:
            if current is not None:
                ranges[current] = (ranges[current][0], last)
            current = function.group(2) if function.group(2) in functions else None
            if current is not None:
                ranges[current] = (int(function.group(1), 16), 0)
            continue
        insn = _INSN.match(line)
        if current is None or insn is None:
            continue
        address = int(insn.group(1), 16)
        last = address + 1  # end bound: past the last instruction's first byte (enough for from-address checks)
        kind = _kind(insn.group(2))
        if kind:
            target = _TARGET.match(insn.group(3).strip())
            sites[address] = BranchSite(kind, int(target.group(1), 16) if target else None)
    if current is not None:
        ranges[current] = (ranges[current][0], last)
    return BranchMap(sites, ranges)
