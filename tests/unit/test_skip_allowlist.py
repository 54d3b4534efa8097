"""`make test` fails on a skip the allowlist does not name (tests/skip_allowlist.txt)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parents[1]


def run_pytest(
    tmp_path: Path, test_body: str, allowlist: str, strict: bool = True
) -> tuple[int, str]:
    """pytest on a copy of the suite's root conftest and one test file, as `make test` runs."""
    tests = tmp_path / "tests"
    (tests / "unit").mkdir(parents=True)
    shutil.copy(TESTS / "conftest.py", tests / "conftest.py")
    (tests / "skip_allowlist.txt").write_text(allowlist)
    (tests / "unit" / "test_it.py").write_text(test_body)
    env = {k: v for k, v in os.environ.items() if k != "ZONEWATCH_STRICT_SKIPS"}
    if strict:
        env["ZONEWATCH_STRICT_SKIPS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         str(tests)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


SKIPPING = """
import pytest

def test_passes():
    assert True

def test_skips():
    pytest.skip("no frobnicator here")
"""


def test_a_skip_outside_the_allowlist_fails_the_run(tmp_path: Path) -> None:
    rc, out = run_pytest(tmp_path, SKIPPING, "# nothing allowed\n")
    assert rc == 1, out
    assert "1 skip(s) not in tests/skip_allowlist.txt" in out
    assert "test_it.py::test_skips: no frobnicator here" in out


def test_an_allowed_skip_passes(tmp_path: Path) -> None:
    rc, out = run_pytest(tmp_path, SKIPPING, "tests/unit/test_it.py::* | no frob*\n")
    assert rc == 0, out
    assert "1 passed, 1 skipped" in out


def test_without_the_strict_switch_skips_pass(tmp_path: Path) -> None:
    rc, out = run_pytest(tmp_path, SKIPPING, "", strict=False)
    assert rc == 0, out


def test_a_malformed_allowlist_line_is_named(tmp_path: Path) -> None:
    rc, out = run_pytest(tmp_path, SKIPPING, "# ok\ntests/unit/test_it.py::*\n")
    assert rc != 0
    assert "skip_allowlist.txt:2: expected '<test id> | <reason>'" in out
