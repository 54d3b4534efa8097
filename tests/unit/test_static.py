"""The suite runs the linters too: ruff (lint and format) and mypy --strict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "zonewatch", "exporters", "tests"],
        ["ruff", "format", "--check", "zonewatch", "exporters", "tests"],
        ["mypy", "-p", "zonewatch"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_static_checks(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_no_two_test_modules_share_a_name() -> None:
    """The test folders are not packages: pytest imports each module by its basename, and a
    second module of the same name stops the whole run at collection."""
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        first = seen.setdefault(path.name, path)
        if first != path:
            clashes.append(f"{first.relative_to(ROOT)} and {path.relative_to(ROOT)}")
    assert not clashes, "rename one of: " + "; ".join(clashes)
