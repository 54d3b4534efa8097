"""Snapshot tests of the TUI (pytest-textual-snapshot), fed by a ReplayFeed over the
recorded fixture tests/fixtures/tui/recording.jsonl (six zones of two tenants, alerts of
every severity, a zone name and a file name holding escape bytes, a burst in the last
second). Update the SVGs with `pytest tests/unit/test_tui_snapshots.py --snapshot-update`
and look at them before committing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from textual.widgets import DataTable

from zonewatch.tui.app import TopApp
from zonewatch.tui.feed import ReplayFeed

RECORDING = Path(__file__).resolve().parents[1] / "fixtures" / "tui" / "recording.jsonl"
SnapCompare = Callable[..., bool]


def app() -> TopApp:
    # A long interval: the whole recording arrives on mount, no timer fires mid-snapshot.
    return TopApp(ReplayFeed(RECORDING), interval=3600)


def test_main_screen(snap_compare: SnapCompare) -> None:
    assert snap_compare(app(), terminal_size=(80, 24))


def test_main_screen_sorted_by_tenant_descending(snap_compare: SnapCompare) -> None:
    # From exits/s, S twice goes back to tenant (A-Z); r reverses it: globex first.
    assert snap_compare(app(), press=["S", "S", "r"], terminal_size=(80, 24))


def test_main_screen_filtered_by_text_and_tenant(snap_compare: SnapCompare) -> None:
    # "/i": zones with an "i" in name, tenant, id, vmm or top exit reason (globex-api,
    # evil.., acme-db by EPT_MISCONFIG); t: tenant acme only, so acme-db alone.
    assert snap_compare(app(), press=["slash", "i", "enter", "t"], terminal_size=(80, 24))


def test_main_screen_with_the_alerts_pane_enlarged(snap_compare: SnapCompare) -> None:
    assert snap_compare(app(), press=["a"], terminal_size=(80, 24))


def test_zone_drill_down(snap_compare: SnapCompare) -> None:
    async def open_acme_db(pilot: Pilot[Any]) -> None:
        await pilot.pause()
        table = pilot.app.screen.query_one("#zones", DataTable)
        assert table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value == (
            "qemu-4103-7003"  # acme-db: the most exits after its burst
        )
        await pilot.press("enter")

    assert snap_compare(app(), run_before=open_acme_db, terminal_size=(80, 24))


def test_drill_down_of_a_zone_with_escape_bytes(snap_compare: SnapCompare) -> None:
    async def open_evil(pilot: Pilot[Any]) -> None:
        await pilot.press("slash", "e", "v", "i", "l", "enter", "enter")

    assert snap_compare(app(), run_before=open_evil, terminal_size=(80, 24))


def test_help(snap_compare: SnapCompare) -> None:
    assert snap_compare(app(), press=["question_mark"], terminal_size=(80, 24))
