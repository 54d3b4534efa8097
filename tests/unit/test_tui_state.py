"""The TUI's pieces without a terminal: escaping, baselines, sort and filter, the replay
feed, the renderers, the gRPC feed against nothing, and the app's keys (textual pilot)."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import orjson
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from textual.widgets import DataTable

from zonewatch.model import Alert, Severity, ZoneRef, ZoneStats
from zonewatch.tui.app import HelpScreen, MainScreen, TopApp, ZoneScreen
from zonewatch.tui.escape import escape
from zonewatch.tui.feed import GrpcFeed, ReplayFeed, Update, alert_from_json
from zonewatch.tui.render import (
    TABLE_WIDTH,
    fmt_bytes,
    fmt_rate,
    header,
    once_table,
    sparkline,
    zone_cells,
)
from zonewatch.tui.state import Baseline, ViewState

RECORDING = Path(__file__).resolve().parents[1] / "fixtures" / "tui" / "recording.jsonl"
S = 1_000_000_000


def ref(name: str, tenant: str = "acme") -> ZoneRef:
    return ZoneRef(f"id-{name}", name, tenant, "qemu")


def snap(ts: int, **rates: float) -> list[ZoneStats]:
    return [
        ZoneStats(ts * S, ref(name, "acme" if name < "m" else "globex"), 1.0, exits_per_s=v)
        for name, v in rates.items()
    ]


# -- escape ---------------------------------------------------------------------------------------


def test_escape_makes_terminal_sequences_visible() -> None:
    assert escape("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert escape("x\x9b31m") == "x\\u009b31m"  # C1 CSI: one code point starts a sequence
    assert escape("line\nbreak\r\t") == "line\\nbreak\\r\\t"
    assert escape("rtl\u202eevil") == "rtl\\u202eevil"  # bidi override reorders the row
    assert escape("zero\u200bwidth") == "zero\\u200bwidth"
    assert escape("café 中文 ok") == "café 中文 ok"  # printable text stays as it is


def test_escape_is_bounded() -> None:
    out = escape("x" * 1000, 40)
    assert len(out) == 40
    assert out.endswith("…")
    assert escape("\x1b" * 100, 10) == "\\x1b\\x1b\\…"


@given(st.text(max_size=300), st.integers(min_value=1, max_value=200))
def test_escape_output_is_always_printable_and_short(value: str, limit: int) -> None:
    out = escape(value, limit)
    assert out.isprintable()
    assert len(out) <= limit


# -- baselines, sort, filter ------------------------------------------------------------------


def test_baseline_flags_a_burst_not_steady_noise() -> None:
    b = Baseline()
    steady = [1000.0, 1100.0, 950.0, 1050.0, 980.0, 1020.0, 1070.0, 990.0]
    assert not any(b.judge(v, floor=100) for v in steady)
    assert b.judge(40_000.0, floor=100)
    quiet = Baseline()
    for v in [1.0, 2.0, 1.0, 2.0, 1.0, 1.0]:
        quiet.judge(v, floor=100)
    assert not quiet.judge(90.0, floor=100)  # 90x the mean, still below the floor


def test_sort_filter_tenant_and_zones_going_away() -> None:
    state = ViewState()
    state.apply(Update(snapshots=[snap(1, alpha=10, beta=30, zeta=20)]))
    assert [v.stats.zone.name for v in state.rows()] == ["beta", "zeta", "alpha"]
    state.reverse = True
    assert [v.stats.zone.name for v in state.rows()] == ["alpha", "zeta", "beta"]
    state.sort_by("zone")
    assert [v.stats.zone.name for v in state.rows()] == ["alpha", "beta", "zeta"]
    state.sort_by("zone")  # the same column again: the other way
    assert [v.stats.zone.name for v in state.rows()] == ["zeta", "beta", "alpha"]
    state.text_filter = "ET"  # case-insensitive, in names
    assert [v.stats.zone.name for v in state.rows()] == ["zeta", "beta"]
    state.text_filter = ""
    state.cycle_tenant()
    assert state.tenant_filter == "acme"
    assert {v.stats.zone.tenant for v in state.rows()} == {"acme"}
    state.cycle_tenant()
    assert state.tenant_filter == "globex"
    state.cycle_tenant()
    assert state.tenant_filter == ""
    state.apply(Update(snapshots=[snap(2, alpha=10)]))
    assert set(state.zones) == {"id-alpha"}
    view = state.view("id-beta")  # an open drill-down still finds a zone that went away
    assert view is not None
    assert view.stats.exits_per_s == 30


def test_open_alerts_count_recent_ones_of_the_zone() -> None:
    state = ViewState()
    old = Alert(1 * S, ref("alpha"), "r", Severity.LOW, "old")
    new = Alert(700 * S, ref("alpha"), "r", Severity.HIGH, "new")
    state.apply(Update(snapshots=[snap(700, alpha=1, beta=1)], alerts=[old, new]))
    assert state.zones["id-alpha"].open_alerts == 1  # the old one is past OPEN_ALERT_S
    assert state.zones["id-beta"].open_alerts == 0
    assert [a.summary for a in state.newest_alerts()] == ["new", "old"]


# -- the replay feed --------------------------------------------------------------------------


def test_replay_groups_snapshots_and_keeps_alerts_and_events() -> None:
    update = ReplayFeed(RECORDING).poll()
    assert len(update.snapshots) == 10
    assert all(len(s) == 6 for s in update.snapshots)
    assert sorted(str(a.severity) for a in update.alerts) == [
        "critical", "high", "high", "info", "low", "medium",
    ]  # fmt: skip
    assert {e.channel for e in update.events} == {"file", "proc", "net"}
    stepped = ReplayFeed(RECORDING, step=True)
    assert len(stepped.poll().snapshots) == 1
    assert len(stepped.poll().snapshots) == 1


def test_replay_counts_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = ZoneStats(5 * S, ref("alpha"), 1.0, exits_per_s=3).to_json()
    path.write_bytes(b"{not json\n" + orjson.dumps(good) + b'\n{"type":"stats"}\n')
    feed = ReplayFeed(path)
    update = feed.poll()
    assert feed.skipped == 2
    assert update.status == "replay: 2 malformed line(s) skipped"
    assert [s[0].exits_per_s for s in update.snapshots] == [3]


def test_alert_json_round_trip() -> None:
    alert = Alert(
        9 * S, ref("a\x1b[2J"), "rule", Severity.CRITICAL, "sum", ("t",), {"file.path": "/x"},
        count=3, first_ts_ns=7 * S, last_ts_ns=9 * S, lost_in_window=2, seq=42,
    )  # fmt: skip
    back = alert_from_json(orjson.loads(orjson.dumps(alert.to_json())))
    assert back == alert


# -- rendering ------------------------------------------------------------------------------------


def test_numbers_fit_their_columns() -> None:
    assert [fmt_rate(v) for v in (0, 3.5, 42, 1234, 65_000, 1.2e6)] == [
        "0", "3.5", "42", "1.2k", "65k", "1.2M",
    ]  # fmt: skip
    assert [fmt_bytes(v) for v in (512, 1536, 35 * 2**20)] == ["512", "1.5K", "35M"]
    assert sparkline([0, 5, 10]) == "▁▅█"
    assert sparkline([0, 0]) == "▁▁"


def test_row_width_and_escaped_cells() -> None:
    state = ViewState()
    state.apply(Update(snapshots=[[ZoneStats(S, ref("evil\x1b[2J\x1b[H"), 1.0)]]))
    cells = zone_cells(state.rows()[0])
    assert sum(len(c.plain) for c in cells) == TABLE_WIDTH <= 79  # + a 1-column scrollbar
    assert cells[0].plain == "evil\\x1b[2J… "  # escaped, then cut to the column


def test_once_table_holds_no_escape_bytes() -> None:
    state = ViewState()
    state.apply(ReplayFeed(RECORDING).poll())
    out = io.StringIO()
    Console(file=out, width=80, color_system=None, force_terminal=False).print(
        once_table(state, "replay")
    )
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert "evil\\x1b]0;" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "acme-db" in text and "CRIT" in text


# -- the gRPC feed with nobody there ------------------------------------------------------------


def test_grpc_feed_says_unreachable_and_retries(tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/nobody.sock"
    feed = GrpcFeed(address, "token", min_backoff=0.05, max_backoff=0.1)
    try:
        statuses: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(statuses) < 3:
            status = feed.poll(timeout=1).status
            if status:
                statuses.append(status)
        assert len(statuses) >= 3, statuses  # it keeps trying, and keeps saying so
        assert all(s.startswith(f"agent unreachable: {address}, retrying") for s in statuses)
    finally:
        feed.close()


# -- the app's keys -------------------------------------------------------------------------------


def test_app_keys_pause_help_drill_down_and_quit() -> None:
    async def run() -> None:
        app = TopApp(ReplayFeed(RECORDING, step=True), interval=3600)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert app.state.snapshots == 1
            await pilot.press("p")
            app.tick()  # paused: the feed is not drained
            assert app.state.snapshots == 1
            await pilot.press("p")  # resuming catches up at once
            assert app.state.snapshots == 2
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            assert isinstance(app.screen, MainScreen)
            table = app.screen.query_one("#zones", DataTable)
            first = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            await pilot.press("enter")
            assert isinstance(app.screen, ZoneScreen)
            assert app.screen.zone_id == first
            await pilot.press("escape")
            assert isinstance(app.screen, MainScreen)
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(run())


def test_header_shows_an_unreachable_agent() -> None:
    state = ViewState()
    state.apply(Update(status="agent unreachable: unix:/x.sock, retrying in 1s (attempt 3)"))
    text = header(state, "unix:/x.sock", paused=False).plain
    assert "agent unreachable: unix:/x.sock, retrying" in text
