"""The CPUID dump parser over every real dump in shared/data/cpuid and the other accepted formats."""

from __future__ import annotations

import json

import pytest

from harness.cpu.cpuid_dump import CpuidTable, Regs, load_cpuid_dump, parse_cpuid_text
from harness.errors import UsageError
from tests.helpers import CPUID_DIR, TEST_DATA

DUMPS = sorted(CPUID_DIR.glob("*.txt"))


def test_reference_dumps_are_present():
    assert len(DUMPS) >= 9, f"expected the reference CPUID dumps in {CPUID_DIR}"


@pytest.mark.parametrize("dump", DUMPS, ids=lambda p: p.stem)
def test_every_dump_parses_first_cpu_only(dump):
    table = load_cpuid_dump(dump)
    # The file name starts with vendor + the raw CPUID.1:EAX signature of the dumped CPU (InstLatx64 naming).
    vendor_len = len("GenuineIntel")
    assert table.get(1).eax == int(dump.name[vendor_len : vendor_len + 7], 16)
    # leaf 0 appears once: later CPUs' records were not merged into the first CPU's table.
    assert sum(1 for leaf, _ in table.leaves if leaf == 0) == 1


def test_untagged_repeats_are_subleaves():
    # Nehalem-EP lists leaf 4 four times without [SL nn]: they are sub-leaves 0..3 (SDM: leaf 04H sub-leaf =
    # cache level index); the L3 descriptor (type 3, level 3) is the fourth.
    table = load_cpuid_dump(CPUID_DIR / "GenuineIntel00106A2_Nehalem-EP_CPUID.txt")
    assert [table.get(4, sub).eax for sub in range(4)] == [0x1C004121, 0x1C004122, 0x1C004143, 0x1C03C163]


def test_explicit_subleaf_tags():
    table = load_cpuid_dump(CPUID_DIR / "GenuineIntel00806F8_SapphireRapids_05_CPUID.txt")
    assert table.get(7, 1).eax == 0x00001C30
    assert table.get(7, 0).edx == 0xFFDD4430


def test_leaf_above_maximum_reads_zero():
    # Rome's max extended leaf is 0x80000020: 0x80000022 is not implemented and must read as zero.
    table = load_cpuid_dump(CPUID_DIR / "AuthenticAMD0830F10_K17_Rome_CPUID.txt")
    assert table.get(0x80000000).eax == 0x80000020
    assert table.get(0x80000022) == Regs()


def test_cpuid_r_format_recorded_on_this_kind_of_machine():
    table = load_cpuid_dump(TEST_DATA / "cpuid-r_amd-epyc-zen4_pvm-host.txt")
    assert table.get(0).ebx == 0x68747541  # "Auth"
    assert table.get(7, 1).eax == 0x00000020


def test_probe_json_lines_round_trip():
    original = load_cpuid_dump(CPUID_DIR / "GenuineIntel0090672_AlderLake_02_CPUID.txt")
    text = "\n".join(json.dumps(r) for r in original.to_records())
    text += '\n{"probe": "msr", "kind": "value", "msr": 837, "value": 0}\n'  # other records are skipped
    again = parse_cpuid_text(text, "probe.jsonl")
    assert again.leaves == original.leaves


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no CPUID records found"),
        ("hello\nworld\n", "no CPUID records found"),
        ("CPUID 00000000: 00000016-756E6547-6C65746E-49656E69\nCPUID 00000001: 00050654-0040\n", ":2: malformed"),
        ("CPUID 00000000: 00000016-756E6547-6C65746E-49656E69\n", "leaf 0x1 is missing"),
        ("   0x00000000 0x00: eax=0x00000010 ebx=0x68747541\n", ":1: malformed or truncated `cpuid -r`"),
        ('{"probe": "cpuid", "kind": "leaf", "leaf": 0}\n', "lacks field 'subleaf'"),
        (
            '{"probe": "cpuid", "kind": "leaf", "leaf": 0, "subleaf": 0, "eax": -1, "ebx": 0, "ecx": 0, "edx": 0}',
            "integers in 0..0xffffffff",
        ),
        ('{"probe": "cpuid", "kind": "le', "malformed JSON line"),
    ],
)
def test_bad_dumps_are_one_line_usage_errors(text, message):
    with pytest.raises(UsageError) as info:
        parse_cpuid_text(text, "dump.txt")
    assert message in str(info.value)
    assert str(info.value).startswith("dump.txt")
    assert "\n" not in str(info.value)


def test_truncated_real_dump(tmp_path):
    whole = (CPUID_DIR / "GenuineIntel0050654_SkylakeXeon_CPUID.txt").read_text()
    cut = whole[: whole.index("CPUID 00000001:") + len("CPUID 00000001: 0005")]
    path = tmp_path / "cut.txt"
    path.write_text(cut)
    with pytest.raises(UsageError, match=r"cut.txt:3: malformed or truncated CPUID line"):
        load_cpuid_dump(path)


def test_missing_file_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="cannot read CPUID dump"):
        load_cpuid_dump(tmp_path / "nope.txt")


def test_field_extraction():
    table = CpuidTable({(0, 0): Regs(eax=0xA), (0xA, 0): Regs(eax=0x07300403)})
    assert table.field(0xA, 0, "eax", 8, 15) == 4
    assert table.field(0xA, 0, "eax", 24, 31) == 7
