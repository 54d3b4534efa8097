"""Fixtures shared by the live-BPF tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.microvms import MicroVmFactory, microvms


@pytest.fixture
def microvm(tmp_path: Path) -> Iterator[MicroVmFactory]:
    """Start micro-VMMs as children; every one is stopped however the test ends."""
    with microvms(tmp_path) as start:
        yield start
