"""Where the harness keeps things: the suite's data directories and the per-user cache.

In a checkout the suite (guest_tests/) and the image recipe (images/) sit beside harness/; an installed wheel carries
them inside the package, as harness/guest_tests and harness/images (pyproject.toml maps them). Whichever exists is
used, the packaged copy first, so a wheel never reads a stray checkout and a checkout never needs an install.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The harness package directory.
PACKAGE_DIR = Path(__file__).resolve().parent
#: The checkout (beside harness/); in an installed wheel this is site-packages and holds no suite.
REPO_ROOT = PACKAGE_DIR.parent


def data_dir(name: str) -> Path:
    """The directory ``name`` (``guest_tests`` or ``images``): the wheel's packaged copy, else the checkout's."""
    packaged = PACKAGE_DIR / name
    return packaged if packaged.is_dir() else REPO_ROOT / name


IMAGES_DIR = data_dir("images")
GUEST_TESTS_DIR = data_dir("guest_tests")
#: True when running from an installed wheel (the suite is package data), False in a checkout.
INSTALLED = GUEST_TESTS_DIR.parent == PACKAGE_DIR


def cache_root() -> Path:
    """Return the cache directory: $VPMU_CACHE_DIR, else $XDG_CACHE_HOME/vpmu, else ~/.cache/vpmu."""
    explicit = os.environ.get("VPMU_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vpmu"
