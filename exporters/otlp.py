"""Alerts, detection spans and per-zone metrics over OTLP (gRPC or HTTP).

Each alert becomes a span timing its detection (first evidence to the alert) and a log
record emitted with event name `zonewatch.alert`, a severity, `security_rule.*`, zone and
tenant attributes and the evidence, carrying the span's context so traces and alerts
correlate (shared/design.md, "OpenTelemetry"). Per-zone gauges come from the latest
ZoneStats; an alerts counter counts by zone, tenant, rule and severity.

The SDK's batch processors give a bounded queue and the OTLP exporters retry with backoff;
the standard OTEL_* variables apply, signal-specific ones included (endpoint, protocol,
headers, timeout, certificates, compression: exporters.otel_env; OTEL_<SIGNAL>_EXPORTER=none
turns a signal off), OTEL_BLRP_*/OTEL_BSP_* queues, OTEL_METRIC_EXPORT_INTERVAL, OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES). An unreachable collector costs counters and one log line per
outage (and one when export resumes): the SDK's per-retry and per-record warnings are
muted in favour of them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from opentelemetry import trace
from opentelemetry._logs import SeverityNumber
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from zonewatch import __version__
from zonewatch.exporters import attack
from zonewatch.exporters.base import JsonRecord
from zonewatch.exporters.identity import rule_uid
from zonewatch.exporters.otel_env import SignalTarget, signal_targets
from zonewatch.inventory.platform import OTEL_K8S_ATTRIBUTES
from zonewatch.model import Alert, Severity, Zone, ZoneStats, utf8_all, utf8_text

log = logging.getLogger(__name__)

EVENT_NAME = "zonewatch.alert"
SCOPE = "zonewatch"
SEVERITY_NUMBER = {
    Severity.INFO: SeverityNumber.INFO,
    Severity.LOW: SeverityNumber.WARN,
    Severity.MEDIUM: SeverityNumber.WARN4,
    Severity.HIGH: SeverityNumber.ERROR,
    Severity.CRITICAL: SeverityNumber.FATAL,
}
# Evidence field -> OTel semantic attribute; other evidence keeps its own name under
# zonewatch.evidence.*.
EVIDENCE_ATTRIBUTES = {
    "file.path": "file.path",
    "file.host_path": "zonewatch.file.host_path",
    "proc.pid": "process.pid",
    "proc.exe": "process.executable.path",
    "proc.comm": "process.executable.name",
    "proc.cmdline": "process.command_line",
    "proc.ppid": "process.parent_pid",
    "net.dst_ip": "network.peer.address",
    "net.dst_port": "network.peer.port",
    "net.src_ip": "network.local.address",
    "net.src_port": "network.local.port",
    "net.proto": "network.transport",
    "net.tap": "network.interface.name",
    "net.dns_qname": "dns.question.name",
}
_MUTED = (
    "opentelemetry.exporter.otlp",  # per-retry warnings and per-batch errors
    "opentelemetry.sdk._shared_internal",  # "Queue full, dropping" once per record
    "opentelemetry.sdk.metrics._internal.export",
)


def rule_attributes(alert: Alert) -> dict[str, Any]:
    """security_rule.*: tags start with maturity, then domain, then MITRE ids."""
    attrs: dict[str, Any] = {
        "security_rule.name": alert.rule,
        "security_rule.uuid": rule_uid(alert.rule),
        "security_rule.ruleset.name": "zonewatch",
        "security_rule.version": str(alert.evidence.get("rule.version", "1")),
    }
    domains = attack.domains(alert.tags)
    if domains:
        attrs["security_rule.category"] = domains[0]
    mitre = [t for t in alert.tags if attack.TECHNIQUE.match(t)]
    if mitre:
        attrs["security_rule.reference"] = attack.url(mitre[0])
    return attrs


def _attr_value(value: Any) -> Any:
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    return str(value)


def zone_label_attributes(labels: Mapping[str, str]) -> dict[str, str]:
    """A zone's platform labels as OTel's Kubernetes attributes (k8s.namespace.name, ...)."""
    return {OTEL_K8S_ATTRIBUTES[k]: v for k, v in labels.items() if k in OTEL_K8S_ATTRIBUTES}


def alert_attributes(alert: Alert, zone_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    z = alert.zone
    attrs = rule_attributes(alert)
    attrs.update(zone_label_attributes(zone_labels or {}))
    attrs.update(
        {
            "zonewatch.zone.id": z.id,
            "zonewatch.zone.name": z.name,
            "zonewatch.zone.vmm": z.vmm,
            "zonewatch.tenant.id": z.tenant,
            "zonewatch.alert.seq": alert.seq,
            "zonewatch.alert.severity": str(alert.severity),
            "zonewatch.alert.count": alert.count,
            "zonewatch.alert.tags": list(alert.tags),
        }
    )
    if alert.lost_in_window:
        attrs["zonewatch.alert.lost_in_window"] = alert.lost_in_window
    for key, value in alert.evidence.items():
        name = EVIDENCE_ATTRIBUTES.get(key, f"zonewatch.evidence.{key}")
        attrs[name] = _attr_value(value)
    clean: dict[str, Any] = utf8_all(attrs)  # protobuf strings must be valid UTF-8
    return clean


@dataclass(slots=True)
class OtlpConfig:
    # Every signal's endpoint (http/protobuf: + /v1/<signal>); None: the OTEL_* variables
    # (exporters.otel_env says which, in which order).
    endpoint: str | None = None
    protocol: str | None = None  # grpc | http/protobuf; None: the OTEL_* variables, else grpc
    timeout_s: float | None = None  # per export, retries included; None: OTEL_* or 10 s
    max_queue: int | None = None  # per signal; None: OTEL_BLRP/BSP_MAX_QUEUE_SIZE or 2048
    schedule_delay_ms: float | None = None
    metric_interval_ms: float | None = None  # None: OTEL_METRIC_EXPORT_INTERVAL or 60 s
    service_name: str = "zonewatch"


@dataclass(slots=True)
class OtlpHealth:
    """Counters of what left and what did not, by signal (logs, traces, metrics)."""

    exported: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    queue_dropped: int = 0
    down: bool = False
    # When `down` last changed (monotonic s). An export that started before then reports
    # on the collector as it was: the three signals export concurrently, and one that was
    # under way when the collector left can still succeed after another failed.
    changed_at: float = float("-inf")
    lock: threading.Lock = field(default_factory=threading.Lock)

    def result(self, signal: str, ok: bool, n: int, endpoint: str, started: float) -> None:
        with self.lock:
            counts = self.exported if ok else self.failed
            counts[signal] = counts.get(signal, 0) + n
            if ok == (not self.down) or started < self.changed_at:
                return
            self.down = not ok
            self.changed_at = time.monotonic()
            if self.down:
                log.warning(
                    "otlp: collector at %s unreachable; counting what is dropped until it is back",
                    endpoint,
                )
            else:
                log.warning(
                    "otlp: export to %s resumed (%d records dropped so far)",
                    endpoint,
                    sum(self.failed.values()) + self.queue_dropped,
                )


class _QueueFullCounter(logging.Filter):
    """The SDK logs "Queue full" once per dropped record: count them, print none."""

    def __init__(self, health: OtlpHealth) -> None:
        super().__init__()
        self.health = health

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Queue full"):
            self.health.queue_dropped += 1
        return False


class _Counted:
    """Wraps a span or log record exporter: counts results, never raises."""

    def __init__(self, inner: Any, signal: str, health: OtlpHealth, endpoint: str) -> None:
        self.inner = inner
        self.signal = signal
        self.health = health
        self.endpoint = endpoint

    def export(self, batch: Sequence[Any]) -> Any:
        started = time.monotonic()
        try:
            result = self.inner.export(batch)
        except Exception:
            result = None
        ok = result is not None and result.name == "SUCCESS"
        self.health.result(self.signal, ok, len(batch), self.endpoint, started)
        return result if result is not None else _failure(self.signal)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.inner.force_flush(timeout_millis))

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        self.inner.shutdown(*args, **kwargs)


def _failure(signal: str) -> Any:
    if signal == "logs":
        from opentelemetry.sdk._logs.export import LogRecordExportResult

        return LogRecordExportResult.FAILURE
    from opentelemetry.sdk.trace.export import SpanExportResult

    return SpanExportResult.FAILURE


class _CountedMetrics(MetricExporter):
    def __init__(self, inner: MetricExporter, health: OtlpHealth, endpoint: str) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self.health = health
        self.endpoint = endpoint

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        started = time.monotonic()
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception:
            result = MetricExportResult.FAILURE
        points = sum(
            len(m.data.data_points)
            for rm in metrics_data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        )
        ok = result == MetricExportResult.SUCCESS
        self.health.result("metrics", ok, points, self.endpoint, started)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def _exporter(target: SignalTarget, timeout_s: float | None) -> Any:
    """The SDK's OTLP exporter for one signal; what it is not given (endpoint, timeout) it
    resolves from the OTEL_EXPORTER_OTLP_* variables itself."""
    kw: dict[str, Any] = {"timeout": timeout_s}
    if target.endpoint:
        kw["endpoint"] = target.endpoint
    if target.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc import _log_exporter as grpc_logs
        from opentelemetry.exporter.otlp.proto.grpc import metric_exporter as grpc_metrics
        from opentelemetry.exporter.otlp.proto.grpc import trace_exporter as grpc_traces

        # A collector that comes back is found within 2 s, not after gRPC's 120 s backoff.
        kw["channel_options"] = (("grpc.max_reconnect_backoff_ms", 2000),)
        grpc_classes: dict[str, Any] = {
            "logs": grpc_logs.OTLPLogExporter,
            "traces": grpc_traces.OTLPSpanExporter,
            "metrics": grpc_metrics.OTLPMetricExporter,
        }
        return grpc_classes[target.signal](**kw)
    from opentelemetry.exporter.otlp.proto.http import _log_exporter as http_logs
    from opentelemetry.exporter.otlp.proto.http import metric_exporter as http_metrics
    from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_traces

    http_classes: dict[str, Any] = {
        "logs": http_logs.OTLPLogExporter,
        "traces": http_traces.OTLPSpanExporter,
        "metrics": http_metrics.OTLPMetricExporter,
    }
    return http_classes[target.signal](**kw)


def exporter_endpoint(exporter: Any) -> str:
    """Where an SDK exporter sends (as it resolved it), for log lines and tests."""
    return str(getattr(exporter, "_endpoint", "?"))


class OtlpSink:
    name = "otlp"

    def __init__(self, config: OtlpConfig | None = None, host_name: str | None = None) -> None:
        self.config = config = config or OtlpConfig()
        self.health = OtlpHealth()
        for name in _MUTED:
            muted = logging.getLogger(name)
            muted.setLevel(logging.CRITICAL)
        logging.getLogger("opentelemetry.sdk._shared_internal").addFilter(
            _QueueFullCounter(self.health)
        )
        logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.WARNING)
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override these (Resource.create).
        self.resource = Resource.create(
            {
                "service.name": config.service_name,
                "service.version": __version__,
                "service.namespace": "zonewatch",
                "host.name": host_name or socket.gethostname(),
                "host.arch": os.uname().machine,
            }
        )
        self.targets = signal_targets(config.endpoint, config.protocol, os.environ)
        self.exporters = {t.signal: _exporter(t, config.timeout_s) for t in self.targets}
        self.endpoints = {s: exporter_endpoint(e) for s, e in self.exporters.items()}
        batch: dict[str, Any] = {}
        if config.max_queue is not None:
            batch["max_queue_size"] = config.max_queue
        if config.schedule_delay_ms is not None:
            batch["schedule_delay_millis"] = config.schedule_delay_ms
        # shutdown() is the delivery's to call, bounded (zonewatch.delivery.SINK_SHUTDOWN_S);
        # the SDK's own at-exit shutdown waited out export retries to a dead collector.
        self.tracer_provider = TracerProvider(resource=self.resource, shutdown_on_exit=False)
        if "traces" in self.exporters:
            counted = _Counted(
                self.exporters["traces"], "traces", self.health, self.endpoints["traces"]
            )
            self.tracer_provider.add_span_processor(BatchSpanProcessor(cast(Any, counted), **batch))
        self.logger_provider = LoggerProvider(resource=self.resource, shutdown_on_exit=False)
        if "logs" in self.exporters:
            counted = _Counted(self.exporters["logs"], "logs", self.health, self.endpoints["logs"])
            self.logger_provider.add_log_record_processor(
                BatchLogRecordProcessor(cast(Any, counted), **batch)
            )
        readers: list[PeriodicExportingMetricReader] = []
        if "metrics" in self.exporters:
            reader_kw: dict[str, Any] = {}
            if config.metric_interval_ms is not None:
                reader_kw["export_interval_millis"] = config.metric_interval_ms
            metrics = _CountedMetrics(
                self.exporters["metrics"], self.health, self.endpoints["metrics"]
            )
            readers.append(PeriodicExportingMetricReader(metrics, **reader_kw))
        self.meter_provider = MeterProvider(
            resource=self.resource, metric_readers=readers, shutdown_on_exit=False
        )
        self.tracer = self.tracer_provider.get_tracer(SCOPE, __version__)
        self.logger = self.logger_provider.get_logger(SCOPE, __version__)
        meter = self.meter_provider.get_meter(SCOPE, __version__)
        self._stats: dict[str, ZoneStats] = {}
        self._zone_labels: dict[str, dict[str, str]] = {}  # zone id -> its labels (k8s.*)
        self._alerts = meter.create_counter(
            "zonewatch.alerts", unit="{alert}", description="Alerts raised, by zone and rule"
        )
        self._gauges(meter)
        self.emitted = 0

    # -- metrics ------------------------------------------------------------------------------

    def _gauges(self, meter: Any) -> None:
        def gauge(name: str, unit: str, description: str, attr: str, scale: float = 1) -> None:
            def observe(_options: CallbackOptions) -> Iterable[Observation]:
                return [
                    Observation(getattr(s, attr) * scale, _zone_attrs(s))
                    for s in list(self._stats.values())
                ]

            meter.create_observable_gauge(name, [observe], unit=unit, description=description)

        gauge("zonewatch.zone.kvm.exits.rate", "{exit}/s", "VM exits per second", "exits_per_s")
        gauge("zonewatch.zone.kvm.userspace_exits.rate", "{exit}/s", "Returns to the VMM",
              "userspace_exits_per_s")  # fmt: skip
        gauge("zonewatch.zone.kvm.exit.latency.p99", "s", "p99 VM exit handling time",
              "exit_latency_p99_us", 1e-6)  # fmt: skip
        gauge("zonewatch.zone.kvm.vmm.latency.p99", "s", "p99 time the VMM took per exit",
              "vmm_latency_p99_us", 1e-6)  # fmt: skip
        gauge("zonewatch.zone.sched.run_delay.p99", "s", "p99 wait of vCPU threads to run",
              "run_delay_p99_us", 1e-6)  # fmt: skip
        gauge("zonewatch.zone.cpu.utilization", "1", "vCPU threads' CPU, in CPUs", "cpu_pct", 0.01)
        gauge("zonewatch.zone.network.receive.rate", "By/s", "Bytes the zone received",
              "rx_bytes_per_s")  # fmt: skip
        gauge("zonewatch.zone.network.transmit.rate", "By/s", "Bytes the zone sent",
              "tx_bytes_per_s")  # fmt: skip
        gauge("zonewatch.zone.network.new_flows.rate", "{flow}/s", "New flows per second",
              "new_flows_per_s")  # fmt: skip
        gauge("zonewatch.zone.file.ops.rate", "{op}/s", "File operations through backends",
              "file_ops_per_s")  # fmt: skip
        gauge("zonewatch.zone.alerts.open", "{alert}", "Open alerts", "open_alerts")

    def update_stats(self, stats: Sequence[ZoneStats]) -> None:
        self._stats = {s.zone.id: s for s in stats}

    def set_zones(self, zones: Sequence[Zone]) -> None:
        live = {z.id for z in zones}
        self._stats = {k: v for k, v in self._stats.items() if k in live}
        self._zone_labels = {z.id: z.labels for z in zones if z.labels}

    # -- alerts -------------------------------------------------------------------------------

    def export(self, records: Sequence[JsonRecord]) -> None:
        for record in records:
            if isinstance(record, Alert):
                self.emit_alert(record)

    def emit_alert(self, alert: Alert) -> None:
        attrs = alert_attributes(alert, self._zone_labels.get(alert.zone.id))
        start = alert.first_ts_ns or alert.ts_ns
        end = max(alert.ts_ns, alert.last_ts_ns, start)
        span = self.tracer.start_span(
            "zonewatch.detection",
            kind=trace.SpanKind.INTERNAL,
            attributes={k: v for k, v in attrs.items() if not k.startswith("zonewatch.evidence")},
            start_time=start,
        )
        context = trace.set_span_in_context(span)
        self.logger.emit(
            timestamp=alert.ts_ns,
            observed_timestamp=time.time_ns(),
            context=context,
            severity_number=SEVERITY_NUMBER[alert.severity],
            severity_text=str(alert.severity).upper(),
            body=utf8_text(alert.summary),
            attributes=attrs,
            event_name=EVENT_NAME,
        )
        span.end(end_time=end)
        self._alerts.add(
            1,
            {
                **_zone_attrs_ref(alert),
                "security_rule.name": alert.rule,
                "zonewatch.alert.severity": str(alert.severity),
            },
        )
        self.emitted += 1

    # -- lifecycle ----------------------------------------------------------------------------

    def flush(self) -> None:
        self.tracer_provider.force_flush(5_000)
        self.logger_provider.force_flush(5_000)
        self.meter_provider.force_flush(5_000)

    def shutdown(self) -> None:
        for provider in (self.tracer_provider, self.logger_provider, self.meter_provider):
            try:
                provider.shutdown()
            except Exception:  # a dead collector at exit is counted already
                log.debug("otlp: shutdown of %s failed", type(provider).__name__)


def _zone_attrs(stats: ZoneStats) -> dict[str, str]:
    z = stats.zone
    return {
        "zonewatch.zone.name": z.name,
        "zonewatch.zone.id": z.id,
        "zonewatch.tenant.id": z.tenant,
    }


def _zone_attrs_ref(alert: Alert) -> dict[str, str]:
    z = alert.zone
    return {
        "zonewatch.zone.name": z.name,
        "zonewatch.zone.id": z.id,
        "zonewatch.tenant.id": z.tenant,
    }
