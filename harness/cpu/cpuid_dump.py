"""Parse raw CPUID dumps into a table of ``(leaf, subleaf) -> registers``.

Three input formats are accepted, because that is where CPUID data comes from in practice:

* InstLatx64/AIDA64 text (``CPUID 0000000A: 07300403-00000000-00000000-00000603 [SL 00]``), the format of
  ``shared/data/cpuid/``; a repeated leaf without an ``[SL nn]`` tag is the next sub-leaf;
* ``cpuid -r`` output (``   0x0000000a 0x00: eax=0x07300403 ebx=0x00000000 ecx=... edx=...``);
* the guest probes' JSON lines: records of kind ``leaf`` (``{"probe": "enum", "kind": "leaf", "leaf": 10,
  "subleaf": 0, "eax": ...}``); records of other kinds in the same stream are skipped.

Multi-CPU dumps keep the first logical CPU only: a vPMU decision is about one CPU model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UsageError

_INSTLAT = re.compile(
    r"^CPUID\s+(?P<leaf>[0-9A-Fa-f]{8}):\s*"
    r"(?P<eax>[0-9A-Fa-f]{8})-(?P<ebx>[0-9A-Fa-f]{8})-(?P<ecx>[0-9A-Fa-f]{8})-(?P<edx>[0-9A-Fa-f]{8})"
    r"(?:\s+\[SL\s+(?P<sub>[0-9A-Fa-f]+)\])?"
)
_CPUID_R = re.compile(
    r"^\s*0x(?P<leaf>[0-9A-Fa-f]{8})\s+0x(?P<sub>[0-9A-Fa-f]+):\s*"
    r"eax=0x(?P<eax>[0-9A-Fa-f]{8})\s+ebx=0x(?P<ebx>[0-9A-Fa-f]{8})\s+"
    r"ecx=0x(?P<ecx>[0-9A-Fa-f]{8})\s+edx=0x(?P<edx>[0-9A-Fa-f]{8})\s*$"
)
# Section headers that start a new logical CPU in the formats above.
_CPU_HEADER = re.compile(r"Logical CPU #\d+|^CPU#\d+|^CPU( \d+)?:\s*$")

REGISTERS = ("eax", "ebx", "ecx", "edx")


@dataclass(frozen=True)
class Regs:
    """The four output registers of one CPUID leaf/sub-leaf."""

    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    def reg(self, name: str) -> int:
        """Return the register called ``name`` (``eax`` .. ``edx``)."""
        return getattr(self, name)


ZERO = Regs()


class CpuidTable:
    """CPUID values of one logical CPU, as an unprivileged ``cpuid`` instruction would return them.

    A leaf above the maximum of its range (leaf 0 / 0x80000000 EAX) reads as zero, as on hardware that does
    not implement it; so does a leaf the dump does not list.
    """

    def __init__(self, leaves: dict[tuple[int, int], Regs], source: str = "") -> None:
        self.leaves = dict(leaves)
        self.source = source

    def get(self, leaf: int, subleaf: int = 0) -> Regs:
        """Return the registers of ``leaf``/``subleaf`` (all zero when not implemented)."""
        base = leaf & 0xFFFF0000
        top = self.leaves.get((base, 0), ZERO).eax
        if leaf > top:
            return ZERO
        return self.leaves.get((leaf, subleaf), ZERO)

    def field(self, leaf: int, subleaf: int, reg: str, lo: int, hi: int) -> int:
        """Return bits ``hi:lo`` (inclusive) of ``reg`` of ``leaf``/``subleaf``."""
        value = self.get(leaf, subleaf).reg(reg)
        return (value >> lo) & ((1 << (hi - lo + 1)) - 1)

    def to_records(self) -> list[dict[str, int | str]]:
        """Return the table as probe-format JSON records (the third accepted input format)."""
        return [
            {"probe": "cpuid", "kind": "leaf", "leaf": leaf, "subleaf": sub, **regs.__dict__}
            for (leaf, sub), regs in sorted(self.leaves.items())
        ]


def parse_cpuid_text(text: str, source: str = "<text>") -> CpuidTable:
    """Parse any accepted dump format; raise :class:`UsageError` naming ``source`` and the line on bad input."""
    leaves: dict[tuple[int, int], Regs] = {}
    seen_per_leaf: dict[int, int] = {}
    recognised = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        stripped = line.strip()
        if not stripped:
            continue
        if _CPU_HEADER.search(stripped) and leaves:
            break  # the first logical CPU is complete
        parsed = _parse_line(stripped, line, source, lineno)
        if parsed is None:
            continue
        leaf, sub, regs = parsed
        if leaf == 0 and (0, 0) in leaves:
            break  # headerless multi-CPU dump: leaf 0 again starts the next CPU
        if sub is None:
            sub = seen_per_leaf.get(leaf, 0)
        seen_per_leaf[leaf] = seen_per_leaf.get(leaf, 0) + 1
        leaves[(leaf, sub)] = regs
        recognised += 1
    if not recognised:
        raise UsageError(
            f"{source}: no CPUID records found (expected InstLatx64 text, `cpuid -r` output or probe JSON lines)"
        )
    for needed in (0, 1):
        if (needed, 0) not in leaves:
            raise UsageError(f"{source}: truncated dump: CPUID leaf {needed:#x} is missing")
    return CpuidTable(leaves, source)


def _parse_line(stripped: str, line: str, source: str, lineno: int) -> tuple[int, int | None, Regs] | None:
    """Parse one line of any format; None for lines that carry no CPUID record (headers, prose)."""
    if stripped.startswith("{"):
        return _parse_json_line(stripped, source, lineno)
    match = _INSTLAT.match(stripped)
    if match is None:
        match = _CPUID_R.match(line)
    if match is None:
        if stripped.startswith("CPUID ") and re.match(r"CPUID\s+[0-9A-Fa-f]{8}:", stripped):
            raise UsageError(f"{source}:{lineno}: malformed or truncated CPUID line: {stripped[:80]!r}")
        if re.match(r"0x[0-9A-Fa-f]{8}\s+0x", stripped):
            raise UsageError(f"{source}:{lineno}: malformed or truncated `cpuid -r` line: {stripped[:80]!r}")
        return None
    sub = match.group("sub")
    regs = Regs(*(int(match.group(r), 16) for r in REGISTERS))
    return int(match.group("leaf"), 16), (int(sub, 16) if sub is not None else None), regs


def _parse_json_line(stripped: str, source: str, lineno: int) -> tuple[int, int | None, Regs] | None:
    try:
        record = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source}:{lineno}: malformed JSON line: {exc.msg}") from None
    if not isinstance(record, dict) or record.get("kind") != "leaf":
        return None  # other probe records (MSRs, counts) may share the stream
    try:
        values = [record[k] for k in ("leaf", "subleaf", *REGISTERS)]
    except KeyError as exc:
        raise UsageError(f"{source}:{lineno}: cpuid record lacks field {exc.args[0]!r}") from None
    if not all(isinstance(v, int) and 0 <= v <= 0xFFFFFFFF for v in values):
        raise UsageError(f"{source}:{lineno}: cpuid record fields must be integers in 0..0xffffffff")
    return values[0], values[1], Regs(*values[2:])


def load_cpuid_dump(path: str | Path) -> CpuidTable:
    """Read and parse a dump file; a missing or unreadable file is a :class:`UsageError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read CPUID dump: {exc.strerror}") from None
    return parse_cpuid_text(text, str(path))
