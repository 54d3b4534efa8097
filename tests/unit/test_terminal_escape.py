"""Guest text on the operator's terminal: the one escape function, and `zonewatch tail`,
the `zones` table and log lines using it."""

from __future__ import annotations

import dataclasses
import logging
import os

import orjson
import pytest

from tests.helpers.alerts import make_alert
from zonewatch.api.convert import alert_pb
from zonewatch.cli import TerminalFormatter
from zonewatch.model import ZoneRef
from zonewatch.tail import Printer
from zonewatch.tui.escape import escape

TITLE_AND_CLEAR = "\x1b]0;PWNED-TITLE\x07\x1b[2J"
FORGED = "\n12:00:00 CRITICAL acme/db fake_alert: forged\r"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\\x1b", "\\\\x1b"),  # typed by a guest: a backslash, then x1b
        ("\x1b", "\\x1b"),  # the ESC byte itself
        ("a\\b", "a\\\\b"),
        ("\x00\x07\x08\x7f", "\\x00\\x07\\x08\\x7f"),
        ("\x85\x9b", "\\u0085\\u009b"),  # C1 controls (NEL, CSI) are code points, not bytes
        (os.fsdecode(b"\xff\x9b"), "\\xff\\x9b"),  # invalid UTF-8 bytes (surrogateescape)
        ("\u202a\u202b\u202c\u202d\u202e", "\\u202a\\u202b\\u202c\\u202d\\u202e"),
        ("\u2066\u2067\u2068\u2069", "\\u2066\\u2067\\u2068\\u2069"),
        ("\u200e\u200f\u061c", "\\u200e\\u200f\\u061c"),  # LRM, RLM, Arabic letter mark
        ("\u200b\u200d\ufeff\u2028\u2029", "\\u200b\\u200d\\ufeff\\u2028\\u2029"),
        ("\u3164\u115f\ufe0f\u034f", "\\u3164\\u115f\\ufe0f\\u034f"),  # printable, invisible
        ("\U000e0101", "\\U000e0101"),  # a variation selector past the BMP
        ("\xa0x", "\\u00a0x"),  # NBSP: a space that is not one
        ("café ünïcode 中文 ok", "café ünïcode 中文 ok"),
    ],
)
def test_escape_shows_each_kind_of_hidden_character_one_way(raw: str, shown: str) -> None:
    assert escape(raw) == shown


def test_a_typed_escape_and_a_real_one_look_different() -> None:
    assert escape("\\x1b[2J") != escape("\x1b[2J")
    assert escape("\\xff") != escape(os.fsdecode(b"\xff"))
    assert escape("\\u202e") != escape("\u202e")


def hostile_alert_pb() -> object:
    alert = make_alert(1)
    zone = ZoneRef("qemu-9", f"web{TITLE_AND_CLEAR}{FORGED}", "acme\u202eemca", "qemu")
    return alert_pb(
        dataclasses.replace(
            alert,
            zone=zone,
            summary=f"opened /share/{TITLE_AND_CLEAR}{FORGED}\\x1b typed",
            evidence={"file.path": f"/share/{TITLE_AND_CLEAR}"},
            seq=7,
        )
    )


def test_tail_text_prints_one_line_with_no_control_from_the_guest(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # the whole line (a terminal cuts it at its width)
    Printer(as_json=False).alert(hostile_alert_pb())
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # one alert, one line: no forged one
    assert out.endswith("\n")
    line = out[:-1]
    assert line.isprintable(), repr(line)
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "web\\x1b]0;PWNED-TITLE\\x07\\x1b[2J\\n12:00:00" in line
    assert "acme\\u202eemca/" in line
    assert "\\\\x1b typed" in line  # the guest's own backslash, doubled


def test_tail_json_stays_json_with_the_text_as_data(capsys: pytest.CaptureFixture[str]) -> None:
    Printer(as_json=True).alert(hostile_alert_pb())
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "\x1b" not in out  # JSON escapes controls itself
    record = orjson.loads(out)
    assert record["zone"]["name"] == f"web{TITLE_AND_CLEAR}{FORGED}"
    assert record["evidence"]["file.path"] == f"/share/{TITLE_AND_CLEAR}"


def test_log_lines_quoting_guest_text_are_escaped() -> None:
    name = f"x{TITLE_AND_CLEAR}{FORGED}"
    record = logging.LogRecord("zonewatch", logging.INFO, __file__, 1, "zone up: %s", (name,), None)
    line = TerminalFormatter("zonewatch: %(message)s").format(record)
    assert line.isprintable(), repr(line)
    assert line.startswith("zonewatch: zone up: x\\x1b]0;PWNED-TITLE")
