"""pytest plugin of the vpmu suite: options, markers, and the session fixtures that give tests a guest image.

Order: options, configure, report header, fixtures. State lives in ``config.stash`` under typed keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness import hostfacts
from harness.errors import HarnessError, UsageError
from harness.image import Image, find_or_build_image
from harness.profiles import ACCELS

IMAGE_HELP = "guest image directory (default: the default image, built into the user cache on first use)"
ACCEL_HELP = "accelerator: kvm or tcg (default: what `python -m harness doctor` picks for this host)"

HOST_FACTS_KEY = pytest.StashKey[dict[str, Any]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vpmu", "vpmu guest-side vPMU suite")
    group.addoption("--image", dest="vpmu_image", type=Path, metavar="DIR", help=IMAGE_HELP)
    group.addoption("--accel", dest="vpmu_accel", choices=ACCELS, help=ACCEL_HELP)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: boots a real guest under QEMU (TCG here, KVM where usable)")


def _host_facts(config: pytest.Config) -> dict[str, Any]:
    if HOST_FACTS_KEY not in config.stash:
        config.stash[HOST_FACTS_KEY] = hostfacts.collect()
    return config.stash[HOST_FACTS_KEY]


def pytest_report_header(config: pytest.Config) -> list[str]:
    facts = _host_facts(config)
    caps = facts["cpu"].get("caps") or {}
    return [
        f"vpmu: accel={facts['accel']} ({facts['accel_reason']})",
        f"vpmu: host {caps.get('vendor', '?')} family {caps.get('family', '?')} model {caps.get('model', '?')}, "
        f"kernel {facts['kernel']}, QEMU {facts['qemu']['version']}, kvm.enable_pmu={facts['kvm']['enable_pmu']}, "
        f"nmi_watchdog={facts['perf']['nmi_watchdog']}, vPMU mode {facts['vpmu_mode']}",
    ]


@pytest.fixture(scope="session")
def host_facts(pytestconfig: pytest.Config) -> dict[str, Any]:
    """The ``doctor`` facts of this host, collected once per session."""
    return _host_facts(pytestconfig)


@pytest.fixture(scope="session")
def accel(pytestconfig: pytest.Config, host_facts: dict[str, Any]) -> str:
    """The accelerator guests use: ``--accel`` if given (kvm only where usable), else doctor's choice."""
    requested = pytestconfig.getoption("vpmu_accel")
    if requested == "kvm" and host_facts["accel"] != "kvm":
        raise pytest.UsageError(f"--accel kvm: KVM is not usable here ({host_facts['accel_reason']})")
    chosen = requested or host_facts["accel"]
    if chosen is None:
        pytest.skip(f"host: no usable accelerator ({host_facts['accel_reason']})")
    return chosen


@pytest.fixture(scope="session")
def guest_image(pytestconfig: pytest.Config) -> Image:
    """The guest image: ``--image DIR`` or the default one (built once, then cached)."""
    try:
        return find_or_build_image(pytestconfig.getoption("vpmu_image"), log=lambda msg: None)
    except UsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    except HarnessError as exc:
        pytest.fail(f"cannot build the guest image: {exc}", pytrace=False)
