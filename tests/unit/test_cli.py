"""Bad input at the command line ends in one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
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


def test_sigterm_stops_the_agent_but_a_child_forked_from_it_just_exits() -> None:
    """pyroute2 forks a child to enter a pod's network namespace and SIGTERMs it when done:
    the child must die (not log "stopping on SIGTERM" and live on), the agent keep going."""
    from zonewatch.cli import stop_on_signal

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, stop_on_signal(stop))
    try:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: exits 0 only if SIGTERM did not end it within 5 s
            os.write(ready_w, b"x")  # (a signal before Python's after-fork reset is dropped)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                time.sleep(0.01)
            os._exit(0)
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"x"
        os.close(ready_r)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    finally:
        signal.signal(signal.SIGTERM, previous)
