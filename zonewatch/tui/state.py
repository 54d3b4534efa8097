"""What the UI shows, kept apart from how: zones with their history and baselines, alerts,
recent events, sort and filter. Pure Python (no textual), so it is tested and benchmarked
on its own and `--once` reuses it."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from zonewatch.model import Alert, FileEvent, NetEvent, ProcEvent, ZoneStats
from zonewatch.tui.feed import Event, Update

HISTORY = 60  # samples per sparkline (a minute at the default interval)
MAX_ALERTS = 1000
OPEN_ALERT_S = 600  # an alert counts as open on its zone for this long (data time)
MAX_GONE = 100  # zones no longer in the snapshots, kept for an open drill-down
EVENTS_PER_ZONE = 64


@dataclass(slots=True, frozen=True)
class Metric:
    """A rate the UI keeps a history and a baseline of."""

    key: str
    label: str
    get: Callable[[ZoneStats], float]
    floor: float  # below this a value is never called anomalous, whatever its baseline


METRICS = (
    Metric("exits", "exits/s", lambda s: s.exits_per_s, 100.0),
    Metric("rdelay", "run delay p99 µs", lambda s: s.run_delay_p99_us, 100.0),
    Metric("rx", "net rx B/s", lambda s: s.rx_bytes_per_s, 10_000.0),
    Metric("tx", "net tx B/s", lambda s: s.tx_bytes_per_s, 10_000.0),
    Metric("flows", "new flows/s", lambda s: s.new_flows_per_s, 5.0),
    Metric("fops", "file ops/s", lambda s: s.file_ops_per_s, 20.0),
)
METRIC_KEYS = tuple(m.key for m in METRICS)


@dataclass(slots=True)
class Baseline:
    """An exponentially weighted mean and variance of one zone's rate.

    A value is anomalous when it is well above what this zone usually does (4 sigma and
    twice the mean) and above the metric's floor, after a few samples of warm-up. The
    baseline is what this UI has seen since it started, not the agent's rule baselines."""

    n: int = 0
    mean: float = 0.0
    var: float = 0.0

    WARMUP = 5
    ALPHA = 0.2

    def judge(self, value: float, floor: float) -> bool:
        anomalous = (
            self.n >= self.WARMUP
            and value >= floor
            and value > 2 * self.mean
            and value > self.mean + 4 * math.sqrt(self.var)
        )
        # An outlier moves the baseline slowly, so a burst stays visible for a while.
        alpha = 0.05 if anomalous else (1.0 / (self.n + 1) if self.n < self.WARMUP else self.ALPHA)
        delta = value - self.mean
        self.mean += alpha * delta
        self.var = (1 - alpha) * (self.var + alpha * delta * delta)
        self.n += 1
        return anomalous


@dataclass(slots=True)
class ZoneView:
    stats: ZoneStats
    history: dict[str, collections.deque[float]] = field(default_factory=dict)
    baselines: dict[str, Baseline] = field(default_factory=dict)
    anomalies: frozenset[str] = frozenset()
    open_alerts: int = 0
    files: collections.deque[FileEvent] = field(
        default_factory=lambda: collections.deque(maxlen=EVENTS_PER_ZONE)
    )
    procs: collections.deque[ProcEvent] = field(
        default_factory=lambda: collections.deque(maxlen=EVENTS_PER_ZONE)
    )
    flows: collections.deque[NetEvent] = field(
        default_factory=lambda: collections.deque(maxlen=EVENTS_PER_ZONE * 4)
    )

    def observe(self, stats: ZoneStats) -> None:
        self.stats = stats
        anomalies = set()
        for m in METRICS:
            value = m.get(stats)
            self.history.setdefault(m.key, collections.deque(maxlen=HISTORY)).append(value)
            if self.baselines.setdefault(m.key, Baseline()).judge(value, m.floor):
                anomalies.add(m.key)
        self.anomalies = frozenset(anomalies)


@dataclass(slots=True, frozen=True)
class SortKey:
    key: str
    title: str
    get: Callable[[ZoneView], float | str]
    descending: bool  # the natural order: busiest first for rates, A-Z for names


SORT_KEYS = (
    SortKey("zone", "zone", lambda v: v.stats.zone.name.lower(), False),
    SortKey("tenant", "tenant", lambda v: v.stats.zone.tenant.lower(), False),
    SortKey("vcpus", "vCPUs", lambda v: v.stats.vcpus, True),
    SortKey("exits", "exits/s", lambda v: v.stats.exits_per_s, True),
    SortKey("reason", "top exit reason", lambda v: v.stats.top_exit_reason.lower(), False),
    SortKey("rdelay", "run delay p99", lambda v: v.stats.run_delay_p99_us, True),
    SortKey("rx", "rx/s", lambda v: v.stats.rx_bytes_per_s, True),
    SortKey("tx", "tx/s", lambda v: v.stats.tx_bytes_per_s, True),
    SortKey("flows", "new flows/s", lambda v: v.stats.new_flows_per_s, True),
    SortKey("fops", "file ops/s", lambda v: v.stats.file_ops_per_s, True),
    SortKey("alerts", "open alerts", lambda v: v.open_alerts, True),
)
SORT_BY_KEY = {s.key: s for s in SORT_KEYS}


@dataclass(slots=True)
class ViewState:
    zones: dict[str, ZoneView] = field(default_factory=dict)  # by zone id
    gone: collections.OrderedDict[str, ZoneView] = field(default_factory=collections.OrderedDict)
    alerts: collections.deque[Alert] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_ALERTS)
    )
    status: str = ""
    lost_alerts: int = 0
    now_ns: int = 0  # the newest data's timestamp (the header's clock: data time)
    snapshots: int = 0
    sort: str = "exits"
    reverse: bool = False  # against the sort key's natural order
    text_filter: str = ""
    tenant_filter: str = ""  # "" means every tenant

    # -- feeding -------------------------------------------------------------------------------

    def apply(self, update: Update) -> bool:
        """Fold an update in; True when anything visible may have changed."""
        for snapshot in update.snapshots:
            self._snapshot(snapshot)
        for alert in update.alerts:
            self.alerts.append(alert)
            self.now_ns = max(self.now_ns, alert.ts_ns)
        for event in update.events:
            self._event(event)
        if update.status is not None:
            self.status = update.status
        self.lost_alerts += update.lost_alerts
        if update.alerts or update.snapshots:
            self._count_open()
        return bool(update)

    def _snapshot(self, snapshot: list[ZoneStats]) -> None:
        self.snapshots += 1
        seen = set()
        for stats in snapshot:
            zid = stats.zone.id
            seen.add(zid)
            view = self.zones.get(zid)
            if view is None:
                view = self.gone.pop(zid, None) or ZoneView(stats)
                self.zones[zid] = view
            view.observe(stats)
            self.now_ns = max(self.now_ns, stats.ts_ns)
        for zid in [z for z in self.zones if z not in seen]:
            self.gone[zid] = self.zones.pop(zid)
            while len(self.gone) > MAX_GONE:
                self.gone.popitem(last=False)

    def _event(self, event: Event) -> None:
        view = self.zones.get(event.zone.id) or self.gone.get(event.zone.id)
        if view is None:  # an event of a zone no snapshot named yet: keep it for when one does
            view = self.zones[event.zone.id] = ZoneView(ZoneStats(event.ts_ns, event.zone, 0.0))
        if isinstance(event, FileEvent):
            view.files.append(event)
        elif isinstance(event, ProcEvent):
            view.procs.append(event)
        elif isinstance(event, NetEvent):
            view.flows.append(event)

    def _count_open(self) -> None:
        since = self.now_ns - OPEN_ALERT_S * 1_000_000_000
        counts = collections.Counter(
            a.zone.id for a in self.alerts if (a.last_ts_ns or a.ts_ns) >= since
        )
        for zid, view in self.zones.items():
            view.open_alerts = max(view.stats.open_alerts, counts.get(zid, 0))

    # -- viewing -------------------------------------------------------------------------------

    def view(self, zone_id: str) -> ZoneView | None:
        return self.zones.get(zone_id) or self.gone.get(zone_id)

    def tenants(self) -> list[str]:
        return sorted({v.stats.zone.tenant for v in self.zones.values()})

    def matches(self, view: ZoneView) -> bool:
        zone = view.stats.zone
        if self.tenant_filter and zone.tenant != self.tenant_filter:
            return False
        if not self.text_filter:
            return True
        needle = self.text_filter.lower()
        return any(
            needle in text.lower()
            for text in (zone.name, zone.tenant, zone.id, zone.vmm, view.stats.top_exit_reason)
        )

    def rows(self) -> list[ZoneView]:
        """The zones to show: filtered, sorted (ties by name, then id, for a stable order)."""
        key = SORT_BY_KEY[self.sort]
        shown = [v for v in self.zones.values() if self.matches(v)]
        shown.sort(key=lambda v: (v.stats.zone.name, v.stats.zone.id))
        shown.sort(key=key.get, reverse=key.descending != self.reverse)  # stable: ties keep
        return shown

    def newest_alerts(self, zone_id: str | None = None, limit: int = 200) -> list[Alert]:
        out: list[Alert] = []
        for alert in reversed(self.alerts):
            if zone_id is None or alert.zone.id == zone_id:
                out.append(alert)
                if len(out) >= limit:
                    break
        return out

    # -- keys ----------------------------------------------------------------------------------

    def cycle_sort(self, step: int = 1) -> None:
        keys = [s.key for s in SORT_KEYS]
        self.sort = keys[(keys.index(self.sort) + step) % len(keys)]
        self.reverse = False

    def sort_by(self, key: str) -> None:
        """Sort by `key`; asked again for the same key, flip the order (a header click)."""
        if key == self.sort:
            self.reverse = not self.reverse
        else:
            self.sort, self.reverse = key, False

    def cycle_tenant(self) -> None:
        choices = ["", *self.tenants()]
        current = choices.index(self.tenant_filter) if self.tenant_filter in choices else 0
        self.tenant_filter = choices[(current + 1) % len(choices)]


__all__ = [
    "METRICS",
    "METRIC_KEYS",
    "SORT_BY_KEY",
    "SORT_KEYS",
    "Baseline",
    "Metric",
    "SortKey",
    "ViewState",
    "ZoneView",
]
