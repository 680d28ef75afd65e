"""Where the harness keeps things: the checkout's data directories and the per-user cache."""

from __future__ import annotations

import os
from pathlib import Path

#: The checkout (the suite runs from a checkout: guest_tests/ and images/ live beside harness/).
REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGES_DIR = REPO_ROOT / "images"
GUEST_TESTS_DIR = REPO_ROOT / "guest_tests"


def cache_root() -> Path:
    """Return the cache directory: $VPMU_CACHE_DIR, else $XDG_CACHE_HOME/vpmu, else ~/.cache/vpmu."""
    explicit = os.environ.get("VPMU_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vpmu"
