"""Bad input at the command line ends in one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest


def zonewatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zonewatch", *args], capture_output=True, text=True, timeout=60
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["run", "--bogus"], ["zonewatch run", "--bogus"]),
        (["zones", "--json", "--nope"], ["zonewatch zones", "--nope"]),
        (["frobnicate"], ["invalid choice", "frobnicate"]),
        (["run", "--duration", "-3"], ["--duration", "must be > 0"]),
        (["run", "--share-mount", "nonsense"], ["--share-mount", "TAG=/guest/path"]),
        ([], ["required"]),
    ],
)
def test_usage_errors(args: list[str], needles: list[str]) -> None:
    assert_one_line_error(zonewatch(*args), *needles)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("version: 1\ntenants:\n  - name: acme\n    zones: [unclosed\n", ":"),
        ("version: 1\ntenants:\n  - zones: ['a-*']\n", "name"),
        ("version: 2\ntenants: []\n", "version"),
        ("tenants: 5\n", ":"),
    ],
)
def test_malformed_tenants_file(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(content)
    result = zonewatch("zones", "--tenants", str(path))
    assert_one_line_error(result, str(path), needle)


def test_missing_tenants_file(tmp_path: Path) -> None:
    assert_one_line_error(zonewatch("zones", "--tenants", str(tmp_path / "nope.yaml")), "nope.yaml")


def test_zones_json_is_a_list() -> None:
    result = zonewatch("zones", "--json")
    assert result.returncode == 0, result.stderr
    assert isinstance(orjson.loads(result.stdout), list)


def test_help_runs_without_bcc_or_root() -> None:
    result = zonewatch("--help")
    assert result.returncode == 0
    assert "zones" in result.stdout
