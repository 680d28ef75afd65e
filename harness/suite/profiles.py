"""Load vPMU feature profiles (harness.cpu.profile.Profile) from ``profiles.toml`` (flat: one table per
profile, every key validated).

A misspelt key must fail loudly (a silently ignored ``chek =`` is how kvm-unit-tests once lost a precondition),
so every error names the file, the profile, the field and what is allowed, in one line.
"""

from __future__ import annotations

from pathlib import Path

from harness.cpu.model import CpuModel
from harness.cpu.profile import ACCELS, Profile
from harness.datafiles import check_table, read_toml
from harness.errors import UsageError
from harness.judge.expectations import CONDITIONS
from harness.paths import GUEST_TESTS_DIR

DEFAULT_PROFILES_FILE = GUEST_TESTS_DIR / "profiles.toml"
#: Each vCPU is pinned to its own host CPU where there are enough (profile_run.pin_vcpus); a handful is plenty for
#: per-vCPU loads, and more only makes every boot slower.
MAX_SMP = 8
#: key -> (type, required, help). The help text is the documentation of the file format.
PROFILE_KEYS: dict[str, tuple[type, bool, str]] = {
    "description": (str, True, "one line: what the profile asks of the vPMU"),
    "cpu": (str, True, "QEMU -cpu value under KVM"),
    "tcg_cpu": (str, False, "QEMU -cpu value under TCG (default: cpu with a leading 'host' -> 'max')"),
    "accels": (list, False, 'accelerators it applies to, any of "kvm", "tcg" (default: both)'),
    "requires": (list, False, "host conditions (harness/judge/expectations.py CONDITIONS) that must hold to run it"),
    "smp": (int, False, f"number of vCPUs (QEMU -smp), 1 to {MAX_SMP}; default 1 (the per-vCPU canaries need 2)"),
}


def _tcg_default(cpu: str) -> str:
    model, sep, props = cpu.partition(",")
    return ("max" if model == "host" else model) + sep + props


def _profile(path: Path, name: str, table: object) -> Profile:
    where = f"{path}: [{name}]"
    table = check_table(where, table, PROFILE_KEYS)
    accels = tuple(table.get("accels", ACCELS))
    bad = [a for a in accels if a not in ACCELS]
    if bad or not accels:
        raise UsageError(f"{where}: field 'accels' has {bad or 'no value'} (allowed: {', '.join(ACCELS)})")
    cpu = table["cpu"].strip()
    if not cpu:
        raise UsageError(f"{where}: field 'cpu' is empty (a QEMU -cpu value such as 'host,pmu=on')")
    requires = table.get("requires", [])
    unknown = [c for c in requires if c not in CONDITIONS]
    if unknown:
        raise UsageError(f"{where}: unknown condition '{unknown[0]}' in 'requires' (allowed: {', '.join(CONDITIONS)})")
    for value in (cpu, table.get("tcg_cpu", cpu)):
        try:
            CpuModel.parse(value)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
    smp = table.get("smp", 1)
    if isinstance(smp, bool) or not 1 <= smp <= MAX_SMP:
        raise UsageError(f"{where}: field 'smp' is {smp!r} (allowed: an integer from 1 to {MAX_SMP})")
    return Profile(name, table["description"], cpu, table.get("tcg_cpu", _tcg_default(cpu)), accels, tuple(requires),
                   smp)  # fmt: skip


def load_profiles(path: Path = DEFAULT_PROFILES_FILE) -> dict[str, Profile]:
    """Parse and validate a profiles file.

    :raises UsageError: unreadable file, TOML syntax error, or an invalid profile (one line, with the field).
    """
    path = Path(path)
    data = read_toml(path, "profiles file")
    if not data:
        raise UsageError(f"{path}: defines no profile")
    return {name: _profile(path, name, table) for name, table in data.items()}


def select_profile(profiles: dict[str, Profile], name: str, path: Path = DEFAULT_PROFILES_FILE) -> Profile:
    """Return the profile called ``name``; :class:`UsageError` listing the known names otherwise."""
    try:
        return profiles[name]
    except KeyError:
        raise UsageError(f"{path}: no profile '{name}' (known: {', '.join(profiles)})") from None
