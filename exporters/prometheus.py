"""Prometheus `/metrics`: per-zone series labelled zone and tenant, and the agent's health.

Names follow the OTel-to-Prometheus translation (`_total`, unit suffixes); labels stay
bounded (zone, tenant, reason, source, severity; never pids or addresses). The sink reads
records the agent already exports (stats, lost, alerts) and asks the agent for the rest
through `health` (events in, probes attached, subscriber queue depths).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
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
        labels = ["zone", "tenant"]
        for attr, (name, doc, scale) in ZONE_GAUGES.items():
            g = GaugeMetricFamily(name, doc, labels=labels)
            for st in stats:
                g.add_metric([st.zone.name, st.zone.tenant], float(getattr(st, attr)) * scale)
            yield g
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


class PrometheusSink:
    """Serves /metrics on `address` (HOST:PORT; loopback unless told otherwise)."""

    name = "prometheus"

    def __init__(self, address: str | None = "127.0.0.1:9464") -> None:
        self.lock = threading.Lock()
        self.stats: dict[str, ZoneStats] = {}
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
                    self.stats[r.zone.id] = r

    def update_stats(self, stats: Sequence[ZoneStats]) -> None:
        with self.lock:
            self.stats = {s.zone.id: s for s in stats}

    def set_zones(self, zones: Sequence[Zone]) -> None:
        """The zones now; the series of zones gone are no longer exported (zone churn must
        not grow the label sets, nor this process, without bound)."""
        with self.lock:
            self.zones = list(zones)
            live = {z.id for z in zones}
            self.stats = {k: v for k, v in self.stats.items() if k in live}
            names = {(z.name, z.tenant) for z in zones}
            self.alerts = {k: n for k, n in self.alerts.items() if k[:2] in names}

    def flush(self) -> None:
        return None

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
