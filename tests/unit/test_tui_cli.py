"""`zonewatch top --once`: one rich table from a recording; an unreachable agent is one
line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RECORDING = Path(__file__).resolve().parents[1] / "fixtures" / "tui" / "recording.jsonl"


def top(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zonewatch", "top", "--once", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"},
    )


def test_once_prints_the_zones_and_alerts_of_a_recording() -> None:
    result = top("--replay", str(RECORDING))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[2].split()[:2] == ["ZONE", "TENANT"]
    assert [line.split()[0] for line in lines[3:9]] == [
        "acme-db", "globex-api", "acme-web-1", "acme-web-2", "globex-batch", "evil\\x1b]0;…",
    ]  # fmt: skip
    assert "\x1b" not in result.stdout  # not a terminal: no colour, and no guest bytes
    assert any(" CRIT " in line for line in lines)
    assert max(len(line) for line in lines) <= 80


def test_once_against_nobody_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = top("--server", f"unix:{tmp_path}/nobody.sock", "--wait", "1")
    assert result.returncode == 2
    assert result.stderr == f"zonewatch top: agent unreachable: unix:{tmp_path}/nobody.sock\n"
    assert result.stdout == ""
