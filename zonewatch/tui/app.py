"""The live terminal UI (textual): the zone table, the alerts pane, a zone's drill-down.

Keys as kvm_stat, bpftop and k9s users expect: `/` filter, `s` sort, Enter drill-down, Esc
back, `?` help, `q` quit, with a footer of hints. The app polls its Feed each `interval`
seconds on its own loop; rendering reads a ViewState (zonewatch.tui.state)."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Input, Static

from zonewatch.tui.feed import Feed
from zonewatch.tui.render import COLUMNS, alert_lines, header, header_cells, zone_cells
from zonewatch.tui.render import zone_detail as render_zone_detail
from zonewatch.tui.state import SORT_BY_KEY, ViewState

HELP = """\
[b]zonewatch top[/b]: one row per zone; rates per second over the last interval.

  [b]↑ ↓ PgUp PgDn[/b]  move          [b]Enter[/b]  drill into the zone    [b]Esc[/b]  back
  [b]s[/b] / [b]S[/b]   sort by the next / previous column (or click a header)
  [b]r[/b]       reverse the order    [b]/[/b]  filter by text (name, tenant, id, reason)
  [b]t[/b]       next tenant (all, then each tenant)    [b]Esc[/b]  clear the filter
  [b]a[/b]       alerts pane: six rows / most of the screen
  [b]p[/b]       pause / resume       [b]?[/b]  this help    [b]q[/b]  quit

Columns: VC vCPUs · EXITS/s VM exits · REASON the top exit reason
RD99µs run delay p99 (µs a vCPU waited to run) · RX/s TX/s net bytes
FLW/s new flows · FOP/s file operations · ALR open alerts (last 10 min)
[b red]Red, with ![/b red]: far above the zone's own baseline (as this UI saw it).
Guest-chosen text (file, DNS names) is shown escaped: \\x1b is an ESC byte.

Press Esc or ? to close."""


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"),
        Binding("question_mark", "close", "Close", show=False),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static { width: 80; height: auto; max-height: 24; padding: 0 1;
                          background: $panel; border: round $accent; }
    """

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help")

    def action_close(self) -> None:
        self.dismiss()


class ZoneScreen(Screen[None]):
    """One zone: exit reasons, PIO/MMIO hot spots, flows, recent file operations and
    processes, its alerts, sparklines of its rates."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("backspace", "back", "Back", show=False),
    ]
    DEFAULT_CSS = """
    ZoneScreen #zheader { height: 2; text-wrap: nowrap; text-overflow: ellipsis; }
    ZoneScreen #detail-pane { height: 1fr; scrollbar-size-vertical: 1; }
    ZoneScreen #detail { text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, zone_id: str) -> None:
        super().__init__()
        self.zone_id = zone_id

    def compose(self) -> ComposeResult:
        yield Static(id="zheader")
        with VerticalScroll(id="detail-pane"):
            yield Static(id="detail")
        yield Footer()

    def on_mount(self) -> None:
        self.redraw()

    @property
    def top(self) -> TopApp:
        app = self.app
        assert isinstance(app, TopApp)
        return app

    def redraw(self) -> None:
        app = self.top
        self.query_one("#zheader", Static).update(
            header(app.state, app.feed.source, app.paused, "zonewatch zone")
        )
        view = app.state.view(self.zone_id)
        detail = self.query_one("#detail", Static)
        if view is None:
            detail.update(Text("this zone is no longer known", style="bold yellow"))
            return
        detail.update(render_zone_detail(app.state, view, app.feed.carries_events))

    def action_back(self) -> None:
        self.app.pop_screen()


class ZoneTable(DataTable[Any]):
    """The zone table: its Enter (select the row) is the drill-down, shown in the footer."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select_cursor", "Zone")]


class MainScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter"),
        Binding("t", "tenant", "Tenant"),
        Binding("s", "sort(1)", "Sort"),
        Binding("S", "sort(-1)", "Sort back", show=False),
        Binding("r", "reverse", "Reverse", show=False),  # in the help: the footer is full
        Binding("a", "toggle_alerts", "Alerts"),
        Binding("escape", "clear_filter", "Clear", show=False),
    ]
    DEFAULT_CSS = """
    MainScreen #header { height: 2; text-wrap: nowrap; text-overflow: ellipsis; }
    MainScreen #zones { height: 1fr; scrollbar-size-vertical: 1; }
    MainScreen #alerts-title { height: 1; background: $panel; text-style: bold; }
    MainScreen #alerts-pane { height: 6; scrollbar-size-vertical: 1; }
    MainScreen #alerts-pane.tall { height: 60%; }
    MainScreen #alerts { text-wrap: nowrap; text-overflow: ellipsis; }
    MainScreen #filter { dock: bottom; height: 1; border: none; padding: 0 1;
                         display: none; margin-bottom: 1; }
    MainScreen #filter.shown { display: block; }
    """

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        table = ZoneTable(id="zones", cursor_type="row", cell_padding=0)
        table.zebra_stripes = False
        yield table
        yield Static(" ALERTS (newest first, as received)", id="alerts-title")
        with VerticalScroll(id="alerts-pane"):
            yield Static(id="alerts")
        yield Input(placeholder="filter: zone, tenant, id or exit reason", id="filter")
        yield Footer()

    @property
    def top(self) -> TopApp:
        app = self.app
        assert isinstance(app, TopApp)
        return app

    def on_mount(self) -> None:
        self.query_one("#zones", DataTable).focus()
        self.top.tick()  # the first data as soon as there is somewhere to show it
        self.redraw()

    def on_screen_resume(self) -> None:
        if self.query("#header"):  # also sent when first pushed, before compose
            self.redraw()  # back from a drill-down: what changed meanwhile

    def redraw(self) -> None:
        app = self.top
        state = app.state
        self.query_one("#header", Static).update(header(state, app.feed.source, app.paused))
        self._fill_table(state)
        self.query_one("#alerts", Static).update(alert_lines(state.newest_alerts(limit=100)))

    def _fill_table(self, state: ViewState) -> None:
        table: DataTable[Any] = self.query_one("#zones", DataTable)
        selected = None
        if table.row_count and table.cursor_row >= 0:
            try:
                selected = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            except Exception:  # the cursor is past the rows: no zone was selected
                selected = None
        table.clear(columns=True)
        for col, label in zip(COLUMNS, header_cells(state), strict=True):
            table.add_column(label, width=col.width + 1, key=col.key)
        rows = state.rows()
        for view in rows:
            table.add_row(*zone_cells(view), key=view.stats.zone.id)
        if selected is not None:
            index = next((i for i, v in enumerate(rows) if v.stats.zone.id == selected), None)
            if index is not None:
                table.move_cursor(row=index, animate=False, scroll=True)

    # -- keys and events ---------------------------------------------------------------------

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.app.push_screen(ZoneScreen(str(event.row_key.value)))

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        key = event.column_key.value
        if key in SORT_BY_KEY:
            self.top.state.sort_by(key)
            self.redraw()

    def action_toggle_alerts(self) -> None:
        """Six rows of alerts, or most of the screen (an incident: read them, not zones)."""
        self.query_one("#alerts-pane", VerticalScroll).toggle_class("tall")

    def action_sort(self, step: int) -> None:
        self.top.state.cycle_sort(step)
        self.redraw()

    def action_reverse(self) -> None:
        self.top.state.reverse = not self.top.state.reverse
        self.redraw()

    def action_tenant(self) -> None:
        self.top.state.cycle_tenant()
        self.redraw()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = self.top.state.text_filter
        box.add_class("shown")
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.remove_class("shown")
        self.top.state.text_filter = ""
        self.top.state.tenant_filter = ""
        self.query_one("#zones", DataTable).focus()
        self.redraw()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.top.state.text_filter = event.value
        self.redraw()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.input.remove_class("shown")
        self.query_one("#zones", DataTable).focus()

    def on_key(self, event: Any) -> None:
        # Esc in the filter box: drop the filter and go back to the table.
        if event.key == "escape" and self.query_one("#filter", Input).has_focus:
            event.stop()
            self.action_clear_filter()


class TopApp(App[None]):
    """`zonewatch top` and `zonewatch run --tui`."""

    TITLE = "zonewatch top"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("question_mark", "help", "Help"),
        Binding("p", "pause", "Pause"),
    ]

    def __init__(self, feed: Feed, interval: float = 1.0) -> None:
        super().__init__()
        self.feed = feed
        self.interval = interval
        self.state = ViewState()
        self.paused = False
        self.refreshes = 0  # applied updates that changed the view (the bench counts them)

    def get_default_screen(self) -> Screen[Any]:
        return MainScreen()

    def on_mount(self) -> None:
        self.set_interval(self.interval, self.tick)

    def tick(self) -> None:
        """Drain the feed and redraw. While paused nothing is drained: the feed keeps what
        arrives (bounded) and the view catches up on resume."""
        if self.paused:
            return
        if self.state.apply(self.feed.poll()):
            self.refreshes += 1
            self.redraw()
        elif self.feed.finished:
            self.exit()

    def redraw(self) -> None:
        screen = self.screen
        if isinstance(screen, MainScreen | ZoneScreen):
            screen.redraw()

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.redraw()
        if not self.paused:
            self.tick()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def on_unmount(self) -> None:
        self.feed.close()


__all__ = ["HelpScreen", "MainScreen", "TopApp", "ZoneScreen"]
