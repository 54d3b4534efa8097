"""Fixtures for tests on real lab zones (QEMU guests): see zonewatch.lab."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from zonewatch.lab.assets import GuestAssets, ensure_assets
from zonewatch.lab.lab import Lab, cleanup_leftovers
from zonewatch.lab.qemu import QEMU_BINARY


def lab_skip_reason() -> str | None:
    """Why lab zones cannot run here, or None."""
    if os.geteuid() != 0:
        return "lab zones need root (taps, /dev/net/tun)"
    if shutil.which(QEMU_BINARY) is None:
        return f"{QEMU_BINARY} is missing (make setup installs qemu-system-x86)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (no tun/tap support)"
    return None


@pytest.fixture(scope="session")
def lab_assets() -> Iterator[GuestAssets]:
    """Once per session: skip without root/QEMU, clean what an earlier (killed) run left,
    build or find the guest assets. Cleans again at the end of the session."""
    reason = lab_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    cleanup_leftovers()
    assets = ensure_assets()
    yield assets
    cleanup_leftovers()


@pytest.fixture
def lab(lab_assets: GuestAssets) -> Iterator[Lab]:
    """A Lab whose zones are all stopped at teardown, whether the test passed or not."""
    zones = Lab(assets=lab_assets)
    try:
        yield zones
    finally:
        zones.stop_all()
