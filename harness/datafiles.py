"""Reading the suite's TOML data files (profiles, KVM feature rules, host loads) with one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from harness.errors import UsageError


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Parse ``path``; an unreadable file or a syntax error is a :class:`UsageError` naming the file."""
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read {what}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
