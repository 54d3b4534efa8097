"""Prometheus `/metrics`: per-zone series labelled zone and tenant, and the agent's health.

Names follow the OTel-to-Prometheus translation (`_total`, unit suffixes); labels stay
bounded (zone, tenant, reason, source, severity; never pids or addresses). The sink reads
records the agent already exports (stats, lost, alerts) and asks the agent for the rest
through `health` (events in, probes attached, subscriber queue depths).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from zonewatch.exporters.base import JsonRecord
from zonewatch.model import Alert, Lost, Zone, ZoneStats, utf8_text


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
    rule_eval_errors: int = 0  # rule evaluations that raised (zonewatch.rules.engine)
    rules_disabled: int = 0  # rules switched off because they failed


# ZoneStats field -> (metric name, help, scale to base units)
ZONE_GAUGES: dict[str, tuple[str, str, float]] = {
    "exits_per_s": ("zonewatch_zone_kvm_exits_per_second", "VM exits per second", 1),
    "userspace_exits_per_s": (
        "zonewatch_zone_kvm_userspace_exits_per_second",
        "Returns to the VMM per second",
        1,
    ),
    "pio_per_s": ("zonewatch_zone_kvm_pio_per_second", "Port I/O exits per second", 1),
    "mmio_per_s": ("zonewatch_zone_kvm_mmio_per_second", "MMIO exits per second", 1),
    "hypercalls_per_s": ("zonewatch_zone_kvm_hypercalls_per_second", "Hypercalls per second", 1),
    "msr_writes_per_s": ("zonewatch_zone_kvm_msr_writes_per_second", "MSR writes per second", 1),
    "exit_latency_p50_us": (
        "zonewatch_zone_kvm_exit_latency_p50_seconds",
        "Median VM exit handling time",
        1e-6,
    ),
    "exit_latency_p99_us": (
        "zonewatch_zone_kvm_exit_latency_p99_seconds",
        "p99 VM exit handling time",
        1e-6,
    ),
    "vmm_latency_p50_us": (
        "zonewatch_zone_kvm_vmm_latency_p50_seconds",
        "Median time the VMM took per return to it",
        1e-6,
    ),
    "vmm_latency_p99_us": (
        "zonewatch_zone_kvm_vmm_latency_p99_seconds",
        "p99 time the VMM took per return to it",
        1e-6,
    ),
    "run_delay_p50_us": (
        "zonewatch_zone_sched_run_delay_p50_seconds",
        "Median wait of vCPU threads to run",
        1e-6,
    ),
    "run_delay_p99_us": (
        "zonewatch_zone_sched_run_delay_p99_seconds",
        "p99 wait of vCPU threads to run",
        1e-6,
    ),
    "run_delay_pct": (
        "zonewatch_zone_sched_wait_ratio",
        "Share of the interval vCPU threads were runnable but waiting (steal)",
        0.01,
    ),
    "cpu_pct": ("zonewatch_zone_cpu_utilization_ratio", "vCPU threads' CPU, in CPUs", 0.01),
    "rx_bytes_per_s": ("zonewatch_zone_network_receive_bytes_per_second", "Bytes received", 1),
    "tx_bytes_per_s": ("zonewatch_zone_network_transmit_bytes_per_second", "Bytes sent", 1),
    "rx_packets_per_s": (
        "zonewatch_zone_network_receive_packets_per_second",
        "Packets received",
        1,
    ),
    "tx_packets_per_s": ("zonewatch_zone_network_transmit_packets_per_second", "Packets sent", 1),
    "new_flows_per_s": ("zonewatch_zone_network_new_flows_per_second", "New flows", 1),
    "malformed_per_s": (
        "zonewatch_zone_network_malformed_frames_per_second",
        "Malformed, truncated or fragmented frames",
        1,
    ),
    "file_ops_per_s": ("zonewatch_zone_file_ops_per_second", "File operations", 1),
    "open_alerts": ("zonewatch_zone_alerts_open", "Open alerts", 1),
    "vcpus": ("zonewatch_zone_vcpus", "vCPU threads", 1),
}


# ZoneStats histogram field -> (metric name, help). Each snapshot carries its interval's
# samples by log2 bucket; the sink adds them up into a cumulative Prometheus histogram
# per zone (histogram_quantile over any range then works in PromQL).
ZONE_HISTOGRAMS: dict[str, tuple[str, str]] = {
    "run_delay_hist_ns": (
        "zonewatch_zone_sched_run_delay_seconds",
        "Waits of vCPU threads to run",
    ),
    "vmm_latency_hist_ns": (
        "zonewatch_zone_kvm_vmm_latency_seconds",
        "Time the VMM took per return to it",
    ),
    "exit_latency_hist_ns": (
        "zonewatch_zone_kvm_exit_latency_seconds",
        "VM exit handling time (exit to entry)",
    ),
}
# The buckets' upper bounds: 2^10 ns (about 1 us) to 2^34 ns (about 17 s), one per log2
# step as the kernel counts them; shorter samples fall in the first. Fixed, so a zone's
# series keep the same buckets for their whole life.
HIST_BOUNDS_NS = tuple(1 << k for k in range(10, 35))


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


class _Collector(Collector):
    def __init__(self, sink: PrometheusSink) -> None:
        self.sink = sink

    def collect(self) -> Iterator[Any]:
        s = self.sink
        with s.lock:
            stats = list(s.stats.values())
            zones = list(s.zones)
            alerts = dict(s.alerts)
            lost = dict(s.lost)
            hists = {zone: {f: dict(c) for f, c in h.items()} for zone, h in s.hists.items()}
        labels = ["zone", "tenant"]
        for attr, (name, doc, scale) in ZONE_GAUGES.items():
            g = GaugeMetricFamily(name, doc, labels=labels)
            for st in stats:
                g.add_metric([st.zone.name, st.zone.tenant], float(getattr(st, attr)) * scale)
            yield g
        for attr, (name, doc) in ZONE_HISTOGRAMS.items():
            hist = HistogramMetricFamily(name, doc, labels=labels)
            for st in stats:
                counts = hists.get(st.zone.id, {}).get(attr)
                if counts:
                    hist.add_metric([st.zone.name, st.zone.tenant], _cumulative(counts), None)
            yield hist
        by_reason = GaugeMetricFamily(
            "zonewatch_zone_kvm_exits_by_reason_per_second",
            "VM exits per second by reason",
            labels=["zone", "tenant", "reason"],
        )
        for st in stats:
            for reason, rate in st.exits_by_reason.items():
                by_reason.add_metric([st.zone.name, st.zone.tenant, reason], rate)
        yield by_reason
        info = GaugeMetricFamily(
            "zonewatch_zone_info", "Zones on this host", labels=["zone", "tenant", "vmm"]
        )
        for z in zones:
            info.add_metric([z.name, z.tenant, str(z.vmm)], 1)
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
        yield CounterMetricFamily("zonewatch_events", "Events read from the probes", value=h.events)
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
        self.stats: dict[str, ZoneStats] = {}
        # zone id -> histogram field -> bucket lower bound (ns) -> samples since the start
        self.hists: dict[str, dict[str, dict[int, int]]] = {}
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
                    key = (utf8_text(r.zone.name), utf8_text(r.zone.tenant), str(r.severity))
                    self.alerts[key] = self.alerts.get(key, 0) + 1
                elif isinstance(r, Lost):
                    self.lost[r.source] = self.lost.get(r.source, 0) + r.count
                elif isinstance(r, ZoneStats):
                    self._take(r, self.stats.get(r.zone.id))

    def update_stats(self, stats: Sequence[ZoneStats]) -> None:
        """Every zone's newest snapshot (the zones not named are no longer exported)."""
        with self.lock:
            previous, self.stats = self.stats, {}
            for st in stats:
                self._take(st, previous.get(st.zone.id))

    def _take(self, st: ZoneStats, previous: ZoneStats | None) -> None:
        """A zone's newest snapshot; its histograms' windows are added once each (the
        same snapshot seen again, by its timestamp, adds nothing)."""
        self.stats[st.zone.id] = st
        if previous is not None and previous.ts_ns >= st.ts_ns:
            return
        zone = self.hists.setdefault(st.zone.id, {})
        for attr in ZONE_HISTOGRAMS:
            window: dict[str, int] = getattr(st, attr)
            if window:
                counts = zone.setdefault(attr, {})
                for low, n in window.items():
                    with contextlib.suppress(ValueError):  # a key that is no number: skip
                        counts[int(low)] = counts.get(int(low), 0) + int(n)

    def set_zones(self, zones: Sequence[Zone]) -> None:
        """The zones now; the series of zones gone are no longer exported (zone churn must
        not grow the label sets, nor this process, without bound)."""
        with self.lock:
            self.zones = list(zones)
            live = {z.id for z in zones}
            self.stats = {k: v for k, v in self.stats.items() if k in live}
            self.hists = {k: v for k, v in self.hists.items() if k in live}
            names = {(z.name, z.tenant) for z in zones}
            self.alerts = {k: n for k, n in self.alerts.items() if k[:2] in names}

    def flush(self) -> None:
        return None

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
