"""ViewState -> rich renderables: the zone table's cells, the header, alert lines, the
zone drill-down and the `--once` table. Every guest-chosen string goes through escape()."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from zonewatch.model import Alert, NetEvent, Severity, rfc3339_ns
from zonewatch.tui.escape import escape
from zonewatch.tui.state import METRICS, SORT_BY_KEY, ViewState, ZoneView

SEVERITY_STYLE = {
    Severity.INFO: "dim",
    Severity.LOW: "cyan",
    Severity.MEDIUM: "yellow",
    Severity.HIGH: "bold red",
    Severity.CRITICAL: "bold white on red",
}
SEVERITY_SHORT = {
    Severity.INFO: "INFO",
    Severity.LOW: "LOW",
    Severity.MEDIUM: "MED",
    Severity.HIGH: "HIGH",
    Severity.CRITICAL: "CRIT",
}
ANOMALY_STYLE = "bold red"
SPARK = "▁▂▃▄▅▆▇█"


# -- numbers in a few characters ----------------------------------------------------------------


def _scaled(value: float, units: Sequence[str], base: float) -> str:
    for unit in units:
        if abs(value) < base or unit == units[-1]:
            if value == 0:
                return "0"
            if abs(value) < 10 and unit != units[0]:
                return f"{value:.1f}{unit}"
            if unit == units[0] and abs(value) < 10:
                return f"{value:.1f}".removesuffix(".0")
            return f"{value:.0f}{unit}"
        value /= base
    return "?"


def fmt_rate(value: float) -> str:
    """Events per second: 0, 3.5, 42, 1.2k, 35k, 1.2M."""
    return _scaled(value, ("", "k", "M", "G"), 1000.0)


def fmt_bytes(value: float) -> str:
    """Bytes per second: 512, 1.2K, 34M."""
    return _scaled(value, ("", "K", "M", "G", "T"), 1024.0)


def fmt_us(value: float) -> str:
    """Microseconds: 25, 1.2k (ms), 3.4M (s)."""
    return _scaled(value, ("", "k", "M"), 1000.0)


def clock(ts_ns: int) -> str:
    return rfc3339_ns(ts_ns)[11:19] if ts_ns else "--:--:--"


# -- the zone table -----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Column:
    key: str  # a state.SORT_KEYS key
    title: str
    width: int  # characters of content; the table adds one of spacing
    numeric: bool
    cell: Callable[[ZoneView], str]
    metric: str = ""  # the state.METRICS key whose anomaly colours this cell


COLUMNS = (
    Column("zone", "ZONE", 12, False, lambda v: escape(v.stats.zone.name)),
    Column("tenant", "TENANT", 7, False, lambda v: escape(v.stats.zone.tenant)),
    Column("vcpus", "VC", 2, True, lambda v: str(v.stats.vcpus)),
    Column("exits", "EXITS/s", 7, True, lambda v: fmt_rate(v.stats.exits_per_s), "exits"),
    Column("reason", "REASON", 8, False, lambda v: escape(v.stats.top_exit_reason) or "-"),
    Column("rdelay", "RD99µs", 6, True, lambda v: fmt_us(v.stats.run_delay_p99_us), "rdelay"),
    Column("rx", "RX/s", 6, True, lambda v: fmt_bytes(v.stats.rx_bytes_per_s), "rx"),
    Column("tx", "TX/s", 6, True, lambda v: fmt_bytes(v.stats.tx_bytes_per_s), "tx"),
    Column("flows", "FLW/s", 5, True, lambda v: fmt_rate(v.stats.new_flows_per_s), "flows"),
    Column("fops", "FOP/s", 5, True, lambda v: fmt_rate(v.stats.file_ops_per_s), "fops"),
    Column("alerts", "ALR", 3, True, lambda v: str(v.open_alerts)),
)
TABLE_WIDTH = sum(c.width + 1 for c in COLUMNS)


def fit(text: str, width: int, numeric: bool, mark: str = " ") -> str:
    """Exactly width+1 characters: cut with an ellipsis, padded, then `mark` (a space, or
    `!` for an anomalous value: visible without colour and on the cursor's row)."""
    if len(text) > width:
        text = text[: width - 1] + "…"
    return f"{text:>{width}}{mark}" if numeric else f"{text:<{width}}{mark}"


def header_cells(state: ViewState) -> list[Text]:
    out = []
    for col in COLUMNS:
        title = col.title
        style = "bold"
        if col.key == state.sort:
            descending = SORT_BY_KEY[col.key].descending != state.reverse
            title = title[: col.width - 1] + ("▼" if descending else "▲")
            style = "bold reverse"
        out.append(Text(fit(title, col.width, col.numeric), style=style))
    return out


def zone_cells(view: ZoneView) -> list[Text]:
    out = []
    for col in COLUMNS:
        value = col.cell(view)
        style, mark = "", " "
        if col.metric and col.metric in view.anomalies:
            style, mark = ANOMALY_STYLE, "!"
        elif col.key == "alerts" and view.open_alerts:
            style = "bold yellow"
        elif col.numeric and value == "0":
            style = "dim"
        out.append(Text(fit(value, col.width, col.numeric, mark), style=style))
    return out


def header(state: ViewState, source: str, paused: bool, title: str = "zonewatch top") -> Text:
    """Two lines: what is shown (data time, zones, source); then the agent's status (red
    when there is trouble) or the view's settings. The clock is the data's, not the wall's."""
    shown = sum(1 for v in state.zones.values() if state.matches(v))
    line = Text(no_wrap=True, overflow="ellipsis")
    line.append(f" {title} ", "bold reverse")
    line.append(f" {clock(state.now_ns)}", "bold")
    if paused:
        line.append(" PAUSED", "bold black on yellow")
    line.append(f"  {shown}/{len(state.zones)} zones  {len(state.alerts)} alerts  ")
    line.append(escape(source, 60), "dim")
    line.append("\n")
    if state.status:
        line.append(f" {escape(state.status, 78)}", "bold white on red")
        return line
    if not state.snapshots:
        line.append(" waiting for the first stats snapshot…", "yellow")
        return line
    sort = SORT_BY_KEY[state.sort]
    descending = sort.descending != state.reverse
    line.append(f" sort: {sort.title} {'▼' if descending else '▲'}", "cyan")
    line.append(f"  tenant: {escape(state.tenant_filter, 20) or 'all'}", "cyan")
    if state.text_filter:
        line.append(f"  filter: {escape(state.text_filter, 20)}", "cyan")
    if state.lost_alerts:
        line.append(f"  {state.lost_alerts} alert(s) lost", "bold yellow")
    return line


# -- alerts -------------------------------------------------------------------------------------


def alert_line(alert: Alert, with_zone: bool = True) -> Text:
    line = Text(no_wrap=True, overflow="ellipsis")
    line.append(f"{clock(alert.ts_ns)} ")
    line.append(f"{SEVERITY_SHORT[alert.severity]:<4}", SEVERITY_STYLE[alert.severity])
    if with_zone:
        zone = alert.zone
        line.append(f" {escape(zone.tenant, 12)}/{escape(zone.name, 24)}", "bold")
    line.append(f" {escape(alert.rule, 60)}", "magenta")
    if with_zone:
        line.append(f": {escape(alert.summary, 200)}")
    if alert.count > 1:
        line.append(f" x{alert.count}", "dim")
    return line


def alert_lines(alerts: Iterable[Alert], with_zone: bool = True) -> Text:
    lines = [alert_line(a, with_zone) for a in alerts]
    if not lines:
        return Text("no alerts", style="dim")
    return Text("\n", no_wrap=True, overflow="ellipsis").join(lines)


# -- the zone drill-down ------------------------------------------------------------------------


def sparkline(values: Iterable[float], width: int = 40) -> str:
    data = list(values)[-width:]
    if not data:
        return ""
    top = max(data)
    if top <= 0:
        return SPARK[0] * len(data)
    return "".join(SPARK[min(int(v / top * (len(SPARK) - 1) + 0.5), len(SPARK) - 1)] for v in data)


def _fmt_metric(key: str, value: float) -> str:
    if key in ("rx", "tx"):
        return fmt_bytes(value)
    if key == "rdelay":
        return fmt_us(value)
    return fmt_rate(value)


def _top(rates: dict[str, float], limit: int) -> list[tuple[str, float]]:
    return sorted(rates.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]


def _section(title: str) -> Text:
    return Text(title, style="bold underline")


def zone_detail(state: ViewState, view: ZoneView, carries_events: bool) -> RenderableType:
    s = view.stats
    zone = s.zone
    gone = zone.id not in state.zones
    parts: list[RenderableType] = []

    head = Text()
    head.append(escape(zone.name, 40), "bold")
    head.append(f"  tenant {escape(zone.tenant, 20)}  {escape(zone.vmm, 16)}  ")
    head.append(f"{s.vcpus} vCPU  cpu {s.cpu_pct:.0f}%  waiting {s.run_delay_pct:.1f}%")
    head.append(f"\nid {escape(zone.id, 60)}", "dim")
    if gone:
        head.append("  (gone: no longer in the agent's snapshots)", "bold yellow")
    parts.append(head)

    sparks = Table.grid(padding=(0, 1))
    sparks.add_column(width=16)
    sparks.add_column(width=7, justify="right")
    sparks.add_column()
    for m in METRICS:
        history = view.history.get(m.key, collections.deque())
        value = history[-1] if history else 0.0
        style = ANOMALY_STYLE if m.key in view.anomalies else "green"
        sparks.add_row(m.label, _fmt_metric(m.key, value), Text(sparkline(history, 48), style))
    parts.append(sparks)

    kvm = Table(box=None, padding=(0, 1), show_edge=False, expand=False, title_justify="left")
    kvm.add_column("exit reason", width=18, no_wrap=True)
    kvm.add_column("/s", width=7, justify="right")
    kvm.add_column("PIO / MMIO hot spot", width=28, no_wrap=True)
    kvm.add_column("/s", width=7, justify="right")
    reasons = _top(s.exits_by_reason, 6)
    spots = [(f"pio {k}", v) for k, v in _top(s.pio_ports, 3)]
    spots += [(f"mmio {k}", v) for k, v in _top(s.mmio_pages, 3)]
    for i in range(max(len(reasons), len(spots), 1)):
        r = reasons[i] if i < len(reasons) else ("-" if i == 0 else "", None)
        h = spots[i] if i < len(spots) else ("-" if i == 0 else "", None)
        kvm.add_row(
            escape(r[0], 18), "" if r[1] is None else fmt_rate(r[1]),
            escape(h[0], 28), "" if h[1] is None else fmt_rate(h[1]),
        )  # fmt: skip
    parts += [_section(f"KVM  {fmt_rate(s.exits_per_s)} exits/s"), kvm]
    extra = (
        f"userspace {fmt_rate(s.userspace_exits_per_s)}/s  hypercalls "
        f"{fmt_rate(s.hypercalls_per_s)}/s  MSR writes {fmt_rate(s.msr_writes_per_s)}/s  "
        f"exit p99 {fmt_us(s.exit_latency_p99_us)}µs"
    )
    parts.append(Text(extra, style="dim"))

    net = Text()
    net.append(
        f"rx {fmt_bytes(s.rx_bytes_per_s)}B/s {fmt_rate(s.rx_packets_per_s)}pkt/s  "
        f"tx {fmt_bytes(s.tx_bytes_per_s)}B/s {fmt_rate(s.tx_packets_per_s)}pkt/s  "
        f"new flows {fmt_rate(s.new_flows_per_s)}/s  malformed {fmt_rate(s.malformed_per_s)}/s"
    )
    parts += [_section("NET"), net]
    if carries_events:
        parts.append(_top_flows(view.flows))
        parts += [_section("RECENT FILE OPERATIONS"), _file_lines(view)]
        parts += [_section("RECENT PROCESSES"), _proc_lines(view)]
    else:
        parts.append(
            Text(
                "recent file operations, processes and flows: not carried by the agent's "
                "gRPC API (zonewatch.v1 streams stats and alerts); `zonewatch run --tui "
                "--events` shows them. The alerts below quote the evidence.",
                style="dim italic",
            )
        )
    parts += [
        _section(f"ALERTS  {view.open_alerts} open"),
        _zone_alert_lines(state.newest_alerts(zone.id, 20)),
    ]
    return Group(*parts)


def _zone_alert_lines(alerts: list[Alert]) -> Text:
    """Two lines an alert: when, how bad, which rule; then the summary, which quotes the
    evidence (a file name, a DNS name) and would not fit after the rule's name."""
    lines = []
    for alert in alerts:
        lines.append(alert_line(alert, with_zone=False))
        lines.append(Text(f"  {escape(alert.summary, 300)}", no_wrap=True, overflow="ellipsis"))
    return (
        Text("\n", no_wrap=True, overflow="ellipsis").join(lines)
        if lines
        else Text("no alerts", style="dim")
    )


def _top_flows(flows: Iterable[NetEvent], limit: int = 5) -> RenderableType:
    """Flows of the recent net events, by bytes (a flow's latest event holds its totals)."""
    latest: dict[tuple[str, str, int, str], NetEvent] = {}
    dns: list[NetEvent] = []
    for e in flows:
        if e.op == "dns":
            dns.append(e)
            continue
        peer = e.dst_ip if e.direction == "egress" else e.src_ip
        port = e.dst_port
        latest[(e.proto, peer, port, e.direction)] = e
    table = Table(box=None, padding=(0, 1), show_edge=False)
    table.add_column("flow", width=44, no_wrap=True)
    table.add_column("bytes", width=8, justify="right")
    table.add_column("state", width=10)
    top = sorted(latest.items(), key=lambda kv: -kv[1].bytes)[:limit]
    for (proto, peer, port, direction), e in top:
        arrow = "→" if direction == "egress" else "←"
        table.add_row(
            escape(f"{proto} {arrow} {peer}:{port}", 44),
            fmt_bytes(e.bytes),
            e.end_reason or "open",
        )
    if not top:
        table.add_row(Text("no flows seen", style="dim"), "", "")
    names = [escape(e.dns_qname, 60) for e in dns[-3:]]
    group: list[RenderableType] = [table]
    if names:
        group.append(Text("dns: " + ", ".join(names), no_wrap=True, overflow="ellipsis"))
    return Group(*group)


def _file_lines(view: ZoneView, limit: int = 8) -> Text:
    lines = []
    for e in list(view.files)[-limit:][::-1]:
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(f"{clock(e.ts_ns)} {e.op:<7} ")
        line.append(escape(e.path or e.host_path, 100))
        if e.new_path:
            line.append(f" → {escape(e.new_path, 100)}")
        if e.ret < 0:
            line.append(f" ({e.ret})", "red")
        lines.append(line)
    return (
        Text("\n", no_wrap=True, overflow="ellipsis").join(lines)
        if lines
        else Text("none seen", style="dim")
    )


def _proc_lines(view: ZoneView, limit: int = 6) -> Text:
    lines = []
    for e in list(view.procs)[-limit:][::-1]:
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(f"{clock(e.ts_ns)} {e.op:<7} {e.pid:>7} ")
        line.append(escape(e.comm, 16), "bold")
        detail = e.args or e.exe or e.target
        if detail:
            line.append(f" {escape(detail, 100)}")
        lines.append(line)
    return (
        Text("\n", no_wrap=True, overflow="ellipsis").join(lines)
        if lines
        else Text("none seen", style="dim")
    )


# -- `zonewatch top --once` ---------------------------------------------------------------------


def once_table(state: ViewState, source: str, alerts: int = 5) -> Group:
    """The main screen as plain rich output: the header, every zone, the newest alerts."""
    table = Table(box=None, padding=0, show_edge=False, pad_edge=False)
    for col, cell in zip(COLUMNS, header_cells(state), strict=True):
        table.add_column(cell, no_wrap=True, width=col.width + 1)
    for view in state.rows():
        table.add_row(*zone_cells(view))
    return Group(
        header(state, source, paused=False),
        table,
        _section("ALERTS (newest first)"),
        alert_lines(state.newest_alerts(limit=alerts)),
    )


__all__ = [
    "COLUMNS",
    "TABLE_WIDTH",
    "alert_line",
    "alert_lines",
    "fmt_bytes",
    "fmt_rate",
    "fmt_us",
    "header",
    "header_cells",
    "once_table",
    "sparkline",
    "zone_cells",
    "zone_detail",
]
