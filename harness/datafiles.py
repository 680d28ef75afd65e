"""Reading the suite's TOML data files (profiles, KVM feature rules, host loads) with one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from harness.errors import UsageError

#: A data file's schema: key -> (type, required, help text). The help text is the format's documentation.
KeySpec = dict[str, tuple[type, bool, str]]


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Parse ``path``; an unreadable file or a syntax error is a :class:`UsageError` naming the file."""
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read {what}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not a text file (not UTF-8 at byte {exc.start}); expected a TOML {what}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None


def check_table(where: str, table: object, keys: KeySpec) -> dict[str, Any]:
    """Validate one ``[name]`` table: a table, no unknown key, required keys present, values of the right type.

    :raises UsageError: one line naming ``where`` (file and table), the field and what is allowed.
    """
    if not isinstance(table, dict):
        raise UsageError(f"{where}: must be a table of keys (allowed: {', '.join(keys)})")
    for key in table:
        if key not in keys:
            raise UsageError(f"{where}: unknown key '{key}' (allowed: {', '.join(keys)})")
    for key, (kind, required, help_text) in keys.items():
        if key not in table:
            if required:
                raise UsageError(f"{where}: missing field '{key}' ({help_text})")
        elif not isinstance(table[key], kind):
            raise UsageError(f"{where}: field '{key}' must be a {kind.__name__} ({help_text})")
    return table
