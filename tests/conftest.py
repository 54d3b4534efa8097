"""Markers follow the directory: tests/unit, tests/integration (live BPF), tests/e2e (zones),
tests/resilience (storms, churn, failing disks and consumers, hostile strings)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        kind = Path(item.path).relative_to(TESTS).parts[0]
        if kind in ("unit", "integration", "e2e", "resilience"):
            item.add_marker(getattr(pytest.mark, kind))
        if kind in ("integration", "e2e", "resilience") and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason=f"{kind} tests need root"))
