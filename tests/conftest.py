"""Markers follow the directory: tests/unit, tests/integration (live BPF), tests/e2e (zones),
tests/resilience (storms, churn, failing disks and consumers, hostile strings)."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
SKIP_ALLOWLIST = TESTS / "skip_allowlist.txt"
STRICT_SKIPS_ENV = "ZONEWATCH_STRICT_SKIPS"
_skipped: list[tuple[str, str]] = []  # (test id, reason) of every skip in this session


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        kind = Path(item.path).relative_to(TESTS).parts[0]
        if kind in ("unit", "integration", "e2e", "resilience"):
            item.add_marker(getattr(pytest.mark, kind))
        if kind in ("integration", "e2e", "resilience") and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason=f"{kind} tests need root"))


def load_skip_allowlist(path: Path = SKIP_ALLOWLIST) -> list[tuple[str, str]]:
    """(test id pattern, reason pattern) pairs; a malformed line is an error naming it."""
    allowed = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        test, sep, reason = (part.strip() for part in line.partition("|"))
        if not sep or not test or not reason:
            raise pytest.UsageError(f"{path}:{number}: expected '<test id> | <reason>'")
        allowed.append((test, reason))
    return allowed


def skip_allowed(test_id: str, reason: str, allowed: list[tuple[str, str]]) -> bool:
    return any(
        fnmatch.fnmatchcase(test_id, t) and fnmatch.fnmatchcase(reason, r) for t, r in allowed
    )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _skipped.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under ZONEWATCH_STRICT_SKIPS=1 (make test, CI), a skip the allowlist does not name
    fails the run: a test that did not run is not a test that passed."""
    if os.environ.get(STRICT_SKIPS_ENV) != "1" or not _skipped:
        return
    allowed = load_skip_allowlist()
    unexpected = [(t, r) for t, r in _skipped if not skip_allowed(t, r, allowed)]
    if not unexpected:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{len(unexpected)} skip(s) not in {SKIP_ALLOWLIST.relative_to(TESTS.parent)}:"]
    lines += [f"  {t}: {r}" for t, r in unexpected]
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line("\n".join(lines), red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
