"""Prometheus `/metrics`: per-zone series labelled zone and tenant, and the agent's health.

Names follow the OTel-to-Prometheus translation (`_total`, unit suffixes). What the kernel
counts is a `_total` counter (the stats snapshots carry per-interval rates: rate x interval
is added up here), so rate() works over any range; latencies are cumulative histograms;
ratios are in 0..1. Labels stay bounded (zone, tenant, reason, source, severity, channel; never pids
or addresses: an unnamed zone is labelled by its VMM and a hash of its id). The sink reads
records the agent already exports (stats, lost, alerts) and asks the agent for the rest
through `health` (events in, probes attached, subscriber queue depths).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from zonewatch.exporters.base import JsonRecord
from zonewatch.model import Alert, Lost, Zone, ZoneRef, ZoneStats, utf8_text


@dataclass(slots=True)
class AgentHealth:
    events: int = 0
    probes: tuple[str, ...] = ()
    queue_depths: dict[str, int] = field(default_factory=dict)  # queue -> items waiting
    subscribers: int = 0
    journal_last_seq: int = 0
    journal_backlog: int = 0  # alerts held in memory: the journal's disk refused them
    journal_dropped: int = 0  # alerts that never reached the journal's disk
    journal_write_errors: int = 0
    otlp_dropped: int = 0
    lost: dict[str, int] = field(default_factory=dict)  # source -> events lost so far
    # (zone, channel, reason) of each channel blind to a zone (zonewatch.coverage REASONS)
    blind: list[tuple[ZoneRef, str, str]] = field(default_factory=list)
    rule_eval_errors: int = 0  # rule evaluations that raised (zonewatch.rules.engine)
    rules_disabled: int = 0  # rules switched off because they failed


# ZoneStats rate field -> (counter name without _total, help, scale to base units). Each
# snapshot carries its interval's rate; rate x interval is the interval's count (the kernel
# counts, the aggregator divides), added up here into a counter that only grows, so
# rate()/increase() work over any range.
ZONE_COUNTERS: dict[str, tuple[str, str, float]] = {
    "exits_per_s": ("zonewatch_zone_kvm_exits", "VM exits (returns to the VMM where kvm_exit "
                    "does not fire)", 1),
    "userspace_exits_per_s": ("zonewatch_zone_kvm_userspace_exits", "Returns to the VMM", 1),
    "pio_per_s": ("zonewatch_zone_kvm_pio_exits", "Port I/O exits", 1),
    "mmio_per_s": ("zonewatch_zone_kvm_mmio_exits", "MMIO exits", 1),
    "hypercalls_per_s": ("zonewatch_zone_kvm_hypercalls", "Hypercalls", 1),
    "msr_writes_per_s": ("zonewatch_zone_kvm_msr_writes", "MSR writes", 1),
    "run_delay_pct": ("zonewatch_zone_sched_wait_seconds", "Time vCPU threads were runnable "
                      "but waiting to run (steal), summed over the zone's vCPUs", 0.01),
    "cpu_pct": ("zonewatch_zone_cpu_seconds", "CPU time of the zone's processes", 0.01),
    "rx_bytes_per_s": ("zonewatch_zone_network_receive_bytes", "Bytes the zone received", 1),
    "tx_bytes_per_s": ("zonewatch_zone_network_transmit_bytes", "Bytes the zone sent", 1),
    "rx_packets_per_s": ("zonewatch_zone_network_receive_packets", "Packets received", 1),
    "tx_packets_per_s": ("zonewatch_zone_network_transmit_packets", "Packets sent", 1),
    "new_flows_per_s": ("zonewatch_zone_network_flows", "Flows the zone started or received", 1),
    "malformed_per_s": ("zonewatch_zone_network_malformed_frames", "Malformed, truncated or "
                        "fragmented frames", 1),
    "file_ops_per_s": ("zonewatch_zone_file_operations", "File operations through the zone's "
                       "shares", 1),
}  # fmt: skip
BY_REASON = ("zonewatch_zone_kvm_exits_by_reason", "VM exits by reason")

# ZoneStats field -> (gauge name, help): values of now, not of an interval.
ZONE_GAUGES: dict[str, tuple[str, str]] = {
    "vcpus": ("zonewatch_zone_vcpus", "vCPU threads"),
    "open_alerts": ("zonewatch_zone_alerts_open", "Open alerts"),
}
# Ratios (0..1) of the last interval, for a glance; the counters above are the data.
CPU_RATIO = ("zonewatch_zone_cpu_utilization_ratio",
             "Share of the host's CPUs the zone's processes used in the last interval")  # fmt: skip
WAIT_RATIO = ("zonewatch_zone_sched_wait_ratio",
              "Share of the last interval the zone's vCPUs waited to run, per vCPU")  # fmt: skip

# ZoneStats histogram field -> (metric name, help, the field whose rate gives its sum).
# Each snapshot carries its interval's samples by log2 bucket; the sink adds them up into a
# cumulative histogram per zone (histogram_quantile over any range then works in PromQL).
# Only run delay has a sum: the kernel totals the waits it buckets. The kernel keeps no
# total of the others, and one from bucket midpoints would be off by up to 2x: they have
# buckets only (their count is the +Inf bucket; OpenMetrics allows _count only with _sum).
ZONE_HISTOGRAMS: dict[str, tuple[str, str, str | None]] = {
    "run_delay_hist_ns": (
        "zonewatch_zone_sched_run_delay_seconds",
        "Waits of vCPU threads to run",
        "run_delay_pct",
    ),
    "vmm_latency_hist_ns": (
        "zonewatch_zone_kvm_vmm_latency_seconds",
        "Time the VMM took per return to it",
        None,
    ),
    "exit_latency_hist_ns": (
        "zonewatch_zone_kvm_exit_latency_seconds",
        "VM exit handling time (exit to entry)",
        None,
    ),
}
# The per-interval percentiles of a snapshot are the histograms' business here:
# histogram_quantile(0.99, rate(..._bucket[5m])) over any range, not one interval's p99.
IN_HISTOGRAMS = {
    "run_delay_p50_us": "run_delay_hist_ns",
    "run_delay_p99_us": "run_delay_hist_ns",
    "vmm_latency_p50_us": "vmm_latency_hist_ns",
    "vmm_latency_p99_us": "vmm_latency_hist_ns",
    "exit_latency_p50_us": "exit_latency_hist_ns",
    "exit_latency_p99_us": "exit_latency_hist_ns",
}
# The buckets' upper bounds: 2^10 ns (about 1 us) to 2^34 ns (about 17 s), one per log2
# step as the kernel counts them; shorter samples fall in the first. Fixed, so a zone's
# series keep the same buckets for their whole life.
HIST_BOUNDS_NS = tuple(1 << k for k in range(10, 35))
UNNAMED = "unnamed"


def zone_label(zone: ZoneRef) -> str:
    """The `zone` label: the zone's name, valid UTF-8. A zone its VMM gave no name is named
    `<vmm>-<pid>` by the inventory: its label is `<vmm>-unnamed-<8 hex of a hash of its
    id>` instead, stable for the zone's life and free of pids."""
    name = utf8_text(zone.name)
    pid_start = zone.id.removeprefix(f"{zone.vmm}-").split("-")
    default = len(pid_start) == 2 and name == f"{zone.vmm}-{pid_start[0]}"
    if not default:
        return name
    digest = hashlib.sha256(zone.id.encode("utf-8", "backslashreplace")).hexdigest()[:8]
    return f"{utf8_text(zone.vmm)}-{UNNAMED}-{digest}"


def _cumulative(counts: dict[int, int]) -> list[tuple[str, float]]:
    """log2 counts (bucket lower bound ns -> n) as Prometheus buckets (le in s)."""
    out: list[tuple[str, float]] = []
    total = 0
    lows = sorted(counts)
    i = 0
    for bound in HIST_BOUNDS_NS:
        # A log2 bucket [low, 2*low) is under `bound` when 2*low <= bound ("0" holds 0).
        while i < len(lows) and max(2 * lows[i], 1) <= bound:
            total += counts[lows[i]]
            i += 1
        out.append((repr(bound / 1e9), float(total)))
    out.append(("+Inf", float(sum(counts.values()))))
    return out


@dataclass(slots=True)
class _ZoneSeries:
    """One zone's series: its newest snapshot and what its snapshots added up to."""

    latest: ZoneStats
    totals: dict[str, float] = field(default_factory=dict)  # ZONE_COUNTERS field -> total
    by_reason: dict[str, float] = field(default_factory=dict)  # exit reason -> total
    hists: dict[str, dict[int, int]] = field(default_factory=dict)  # field -> low ns -> n
    sums: dict[str, float] = field(default_factory=dict)  # histogram field -> seconds

    def add(self, st: ZoneStats) -> None:
        """A newer snapshot's interval, added once to every total."""
        interval = max(st.interval_s, 0.0)
        for attr, (_name, _doc, scale) in ZONE_COUNTERS.items():
            n = max(float(getattr(st, attr)), 0.0) * interval * scale  # a counter never falls
            self.totals[attr] = self.totals.get(attr, 0.0) + n
        for reason, rate in st.exits_by_reason.items():
            key = utf8_text(reason)
            self.by_reason[key] = self.by_reason.get(key, 0.0) + max(rate, 0.0) * interval
        for attr, (_name, _doc, sum_of) in ZONE_HISTOGRAMS.items():
            window: dict[str, int] = getattr(st, attr)
            if not window:
                continue
            counts = self.hists.setdefault(attr, {})
            for low, n in window.items():
                with contextlib.suppress(ValueError):  # a key that is no number: skip
                    counts[int(low)] = counts.get(int(low), 0) + int(n)
            if sum_of is not None:
                seconds = max(float(getattr(st, sum_of)), 0.0) * 0.01 * interval
                self.sums[attr] = self.sums.get(attr, 0.0) + seconds
        self.latest = st


def _ratio(value: float) -> float:
    """A share, in 0..1 (an interval measured a little short must not read over 1)."""
    return min(max(value, 0.0), 1.0)


def _blind_gauge(blind: Sequence[tuple[ZoneRef, str, str]]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(
        "zonewatch_zone_channel_blind",
        "1 for each channel that does not (fully) see a zone, by reason (zonewatch zones)",
        labels=["zone", "tenant", "channel", "reason"],
    )
    for ref, channel, reason in blind:
        g.add_metric([zone_label(ref), utf8_text(ref.tenant), channel, reason], 1)
    return g


class _Collector(Collector):
    def __init__(self, sink: PrometheusSink) -> None:
        self.sink = sink

    def collect(self) -> Iterator[Any]:
        s = self.sink
        with s.lock:
            series = [
                (
                    [zone_label(z.latest.zone), utf8_text(z.latest.zone.tenant)],
                    z.latest,
                    dict(z.totals),
                    dict(z.by_reason),
                    {f: dict(c) for f, c in z.hists.items()},
                    dict(z.sums),
                )
                for z in s.zones_series.values()
            ]
            zones = list(s.zones)
            alerts = dict(s.alerts)
            lost = dict(s.lost)
        labels = ["zone", "tenant"]
        for attr, (name, doc, _scale) in ZONE_COUNTERS.items():
            c = CounterMetricFamily(name, doc, labels=labels)
            for label_values, _st, totals, *_ in series:
                c.add_metric(label_values, totals.get(attr, 0.0))
            yield c
        by_reason = CounterMetricFamily(*BY_REASON, labels=[*labels, "reason"])
        for label_values, _st, _t, reasons, *_ in series:
            for reason, n in sorted(reasons.items()):
                by_reason.add_metric([*label_values, reason], n)
        yield by_reason
        for attr, (name, doc) in ZONE_GAUGES.items():
            g = GaugeMetricFamily(name, doc, labels=labels)
            for label_values, st, *_ in series:
                g.add_metric(label_values, float(getattr(st, attr)))
            yield g
        cpu = GaugeMetricFamily(*CPU_RATIO, labels=labels)
        wait = GaugeMetricFamily(*WAIT_RATIO, labels=labels)
        for label_values, st, *_ in series:
            cpu.add_metric(label_values, _ratio(st.cpu_pct / 100 / s.host_cpus))
            wait.add_metric(
                label_values, _ratio(st.run_delay_pct / 100 / st.vcpus) if st.vcpus else 0.0
            )
        yield cpu
        yield wait
        for attr, (name, doc, sum_of) in ZONE_HISTOGRAMS.items():
            hist = HistogramMetricFamily(name, doc, labels=labels)
            for label_values, _st, _t, _r, hists, sums in series:
                counts = hists.get(attr)
                if counts:
                    hist.add_metric(
                        label_values, _cumulative(counts), sums.get(attr) if sum_of else None
                    )
            yield hist
        info = GaugeMetricFamily(
            "zonewatch_zone_info", "Zones on this host", labels=["zone", "tenant", "vmm"]
        )
        for z in zones:
            info.add_metric([zone_label(z.ref), utf8_text(z.tenant), str(z.vmm)], 1)
        yield info
        a = CounterMetricFamily(
            "zonewatch_alerts", "Alerts raised", labels=["zone", "tenant", "severity"]
        )
        for (zone, tenant, severity), n in sorted(alerts.items()):
            a.add_metric([zone, tenant, severity], n)
        yield a
        h = s.health() if s.health else AgentHealth()
        lost_f = CounterMetricFamily(
            "zonewatch_events_lost", "Events the kernel or a queue dropped", labels=["source"]
        )
        for source in sorted(lost.keys() | h.lost.keys()):
            lost_f.add_metric([source], max(lost.get(source, 0), h.lost.get(source, 0)))
        yield lost_f
        yield from _agent_families(h)


def _agent_families(h: AgentHealth) -> Iterator[Any]:
    """The agent's own health: events in, probes, queues, journal, exporters, rules."""
    yield CounterMetricFamily("zonewatch_events", "Events read from the probes", value=h.events)
    yield _blind_gauge(h.blind)
    probes = GaugeMetricFamily("zonewatch_probe_attached", "Probes attached", labels=["probe"])
    for p in h.probes:
        probes.add_metric([p], 1)
    yield probes
    q = GaugeMetricFamily("zonewatch_queue_depth", "Items waiting", labels=["queue"])
    for queue, depth in sorted(h.queue_depths.items()):
        q.add_metric([queue], depth)
    yield q
    yield GaugeMetricFamily("zonewatch_subscribers", "gRPC alert subscribers", h.subscribers)
    yield GaugeMetricFamily(
        "zonewatch_journal_last_seq", "Newest alert sequence number", h.journal_last_seq
    )
    yield GaugeMetricFamily(
        "zonewatch_journal_backlog",
        "Alerts held in memory because the journal's disk refused them",
        h.journal_backlog,
    )
    yield CounterMetricFamily(
        "zonewatch_journal_dropped",
        "Alerts that never reached the journal's disk (memory backlog full)",
        h.journal_dropped,
    )
    yield CounterMetricFamily(
        "zonewatch_journal_write_errors",
        "Failed journal writes and fsyncs",
        h.journal_write_errors,
    )
    yield CounterMetricFamily(
        "zonewatch_otlp_dropped", "Records the OTLP exporter failed to send", h.otlp_dropped
    )
    yield CounterMetricFamily(
        "zonewatch_rule_eval_errors",
        "Rule evaluations that raised: a field the event lacked, or a rule that failed",
        h.rule_eval_errors,
    )
    yield CounterMetricFamily(
        "zonewatch_rules_disabled",
        "Rules switched off until the next reload because they failed",
        h.rules_disabled,
    )


class PrometheusSink:
    """Serves /metrics on `address` (HOST:PORT; loopback unless told otherwise)."""

    name = "prometheus"

    def __init__(self, address: str | None = "127.0.0.1:9464") -> None:
        self.lock = threading.Lock()
        self.zones_series: dict[str, _ZoneSeries] = {}  # zone id -> its series
        self.host_cpus = os.cpu_count() or 1
        self.zones: list[Zone] = []
        self.alerts: dict[tuple[str, str, str], int] = {}
        self.lost: dict[str, int] = {}
        self.health: Callable[[], AgentHealth] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)  # the agent's own CPU, memory, fds
        self.rule_latency = Histogram(
            "zonewatch_rule_eval_seconds",
            "Time to run the rules over one batch of events",
            registry=self.registry,
            buckets=(1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0),
        )
        self.port = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None
        if address is not None:
            host, _, port = address.rpartition(":")
            self._server, self._thread = start_http_server(
                int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry
            )
            self.port = self._server.server_port

    def observe_rule_latency(self, seconds: float) -> None:
        self.rule_latency.observe(seconds)

    def export(self, records: Sequence[JsonRecord]) -> None:
        with self.lock:
            for r in records:
                if isinstance(r, Alert):
                    # Label values must be valid UTF-8, or the whole scrape fails.
                    key = (zone_label(r.zone), utf8_text(r.zone.tenant), str(r.severity))
                    self.alerts[key] = self.alerts.get(key, 0) + 1
                elif isinstance(r, Lost):
                    self.lost[r.source] = self.lost.get(r.source, 0) + r.count
                elif isinstance(r, ZoneStats):
                    self._take(r, self.zones_series)

    def update_stats(self, stats: Sequence[ZoneStats]) -> None:
        """Every zone's newest snapshot (the zones not named are no longer exported)."""
        with self.lock:
            previous, self.zones_series = self.zones_series, {}
            for st in stats:
                self._take(st, previous)

    def _take(self, st: ZoneStats, previous: dict[str, _ZoneSeries]) -> None:
        """A zone's snapshot, added once to its totals (the same snapshot seen again, by
        its timestamp, or an older one, adds nothing)."""
        series = previous.get(st.zone.id)
        if series is None:
            series = _ZoneSeries(st)
            series.add(st)
        elif st.ts_ns > series.latest.ts_ns:
            series.add(st)
        self.zones_series[st.zone.id] = series

    def set_zones(self, zones: Sequence[Zone]) -> None:
        """The zones now; the series of zones gone are no longer exported (zone churn must
        not grow the label sets, nor this process, without bound)."""
        with self.lock:
            self.zones = list(zones)
            live = {z.id for z in zones}
            self.zones_series = {k: v for k, v in self.zones_series.items() if k in live}
            names = {(zone_label(z.ref), utf8_text(z.tenant)) for z in zones}
            self.alerts = {k: n for k, n in self.alerts.items() if k[:2] in names}

    def flush(self) -> None:
        return None

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
