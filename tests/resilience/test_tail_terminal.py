"""`zonewatch tail` in a real terminal (tmux, 120x30) showing alerts whose zone name and
quoted path hold what a guest chooses: OSC 0 (set the title to PWNED-TITLE), ESC [2J (clear
the screen), newlines and carriage returns that would print a forged alert line, a bidi
override and a backslash typed by the guest. The pane's title and its earlier content are
left alone, no forged line appears, and every alert is one escaped line.

The alerts come from the real delivery stack (journal and gRPC server, built as `zonewatch
run` builds them) in this process; tail is the real command in the pane."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.alerts import make_alert
from tests.helpers.tmux import Tmux
from tests.resilience.conftest import ADMIN
from zonewatch import delivery
from zonewatch.model import ZoneRef

TITLE_AND_CLEAR = "\x1b]0;PWNED-TITLE\x07\x1b[2J"
FORGED = "\r\n04:00:00 CRITICAL acme/payments FORGED_RULE: forged alert\n"
SENTINEL = "SENTINEL-BEFORE-TAIL"


@pytest.fixture
def source(tmp_path: Path, tokens_file: Path) -> Iterator[delivery.Delivery]:
    d = delivery.build(
        delivery.DeliveryConfig(
            journal=str(tmp_path / "journal"),
            grpc=f"unix:{tmp_path}/zw.sock",
            tokens=str(tokens_file),
        )
    )
    try:
        yield d
    finally:
        d.close()


def pane_format(ui: Tmux, fmt: str) -> str:
    return subprocess.run(
        ["tmux", "display-message", "-p", "-t", ui.name, fmt],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def test_tail_shows_hostile_alerts_escaped_and_leaves_the_terminal_alone(
    source: delivery.Delivery, tmp_path: Path
) -> None:
    hostile = ZoneRef("qemu-66-6", f"web{TITLE_AND_CLEAR}\n", "acme", "qemu")
    first = dataclasses.replace(
        make_alert(1),
        zone=hostile,
        summary=f"wrote /share/{TITLE_AND_CLEAR}{FORGED}x through the share",
    )
    second = dataclasses.replace(
        make_alert(2), zone=hostile, summary="typed \\x1b[2J and \u202eevil by the guest"
    )
    source.publish([first, second])
    tail = [sys.executable, "-m", "zonewatch", "tail", "--server", str(getattr(source.server,
            "address", "")), "--token", ADMIN, "--since-seq", "0"]  # fmt: skip
    ui = Tmux(["sh", "-c", f"echo {SENTINEL}; exec {subprocess.list2cmdline(tail)}"],
              tmp_path, width=200, height=30, prefix="zw-tail",
              env={"COLUMNS": "200"})  # fmt: skip
    try:
        title_before = pane_format(ui, "#{pane_title}")
        screen = ui.wait(lambda s: s.count("acme/web") >= 2, "both alerts")
        lines = [line for line in screen.splitlines() if line.strip()]
        assert lines[0] == SENTINEL, screen  # the screen was not cleared
        alert_lines = lines[1:]
        assert len(alert_lines) == 2, screen  # one line per alert: nothing forged
        assert not any("FORGED_RULE" in line and "\\n" not in line for line in alert_lines)
        assert all(line.endswith(("#1", "#2")) for line in alert_lines), screen
        assert "acme/web\\x1b]0;PWNED-TITLE\\x07\\x1b[2J\\n test_rule" in alert_lines[0]
        assert "[2J\\r\\n04:00:00 CRITICAL acme/payments FORGED_RULE" in alert_lines[0]
        assert "typed \\\\x1b[2J and \\u202eevil" in alert_lines[1]
        assert pane_format(ui, "#{pane_width}") == "200"
        assert pane_format(ui, "#{pane_title}") == title_before != "PWNED-TITLE"
    finally:
        ui.kill()
