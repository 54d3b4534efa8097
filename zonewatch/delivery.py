"""Delivery: the journal first, then every subscriber and sink.

`publish(alerts)` numbers and stores the alerts (zonewatch.journal), then hands them to the
gRPC server's subscribers (a thread-safe hand-off, never awaited) and to the sinks (JSONL,
OCSF, OTLP: each returns at once or counts its failures). A failing sink costs a counter
and a log line, never the agent or another sink. Stats and zones go to the server (the UI's
WatchStats and ListZones) and to the sinks that want them (Prometheus, OTLP metrics).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from zonewatch.exporters import otel_env
from zonewatch.exporters.base import JsonRecord, Sink
from zonewatch.journal import Journal
from zonewatch.model import Alert, Zone, ZoneStats

if TYPE_CHECKING:
    from zonewatch.exporters.prometheus import PrometheusSink

log = logging.getLogger(__name__)

SINK_SHUTDOWN_S = 1.5  # the most a stop waits for the sinks' last exports


@runtime_checkable
class StatsSink(Protocol):
    """A sink that also follows the zones and their per-interval stats."""

    def update_stats(self, stats: Sequence[ZoneStats]) -> None: ...
    def set_zones(self, zones: Sequence[Zone]) -> None: ...


class Hub(Protocol):
    def publish(self, alerts: Sequence[Alert]) -> None: ...
    def publish_stats(self, stats: Sequence[ZoneStats]) -> None: ...
    def set_zones(self, zones: Sequence[Zone]) -> None: ...


class Server(Protocol):
    @property
    def hub(self) -> Hub: ...
    def stop(self) -> None: ...


@dataclass(slots=True)
class DeliveryCounters:
    alerts: int = 0
    sink_errors: dict[str, int] = field(default_factory=dict)


class Delivery:
    def __init__(
        self, journal: Journal, sinks: Sequence[Sink] = (), server: Server | None = None
    ) -> None:
        self.journal = journal
        self.sinks = list(sinks)
        self.server = server
        self.counters = DeliveryCounters()
        self.prometheus: PrometheusSink | None = None  # for the agent's health callback
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self._closed = False

    def publish(self, alerts: Sequence[Alert]) -> None:
        """Journal (assigns Alert.seq), then fan out. Call from one thread (the agent's)."""
        if not alerts:
            return
        self.journal.append(alerts)
        self.counters.alerts += len(alerts)
        if self.server is not None:
            self.server.hub.publish(alerts)
        self._export(alerts)

    def publish_other(self, records: Sequence[JsonRecord]) -> None:
        """Records that are not alerts (lost counts) to the sinks; not journaled."""
        if records:
            self._export(records)

    def publish_stats(self, stats: Sequence[ZoneStats]) -> None:
        if self.server is not None:
            self.server.hub.publish_stats(stats)
        for sink in self.sinks:
            if isinstance(sink, StatsSink):
                self._guard(sink, sink.update_stats, stats)

    def set_zones(self, zones: Sequence[Zone]) -> None:
        if self.server is not None:
            self.server.hub.set_zones(zones)
        for sink in self.sinks:
            if isinstance(sink, StatsSink):
                self._guard(sink, sink.set_zones, zones)

    def _export(self, records: Sequence[JsonRecord]) -> None:
        for sink in self.sinks:
            self._guard(sink, sink.export, records)

    def _guard(self, sink: Sink | StatsSink, fn: object, arg: object) -> None:
        name = getattr(sink, "name", type(sink).__name__)
        try:
            fn(arg)  # type: ignore[operator]
        except Exception:
            errors = self.counters.sink_errors
            errors[name] = errors.get(name, 0) + 1
            if errors[name] == 1:  # one line per sink, then a counter
                log.exception("sink %s failed; counting further failures", name)

    def close(self) -> None:
        """Stop the server and every sink at once, then the journal. A sink still shutting
        down after SINK_SHUTDOWN_S is left behind (the process exits without it): an OTLP
        collector that is down kept the agent's exit waiting 23 s on export retries."""
        if self._closed:
            return
        self._closed = True
        shutting = [
            (sink, threading.Thread(target=self._shutdown, args=(sink,), daemon=True,
                                    name=f"zw-shutdown-{getattr(sink, 'name', '')}"))
            for sink in self.sinks
        ]  # fmt: skip
        deadline = time.monotonic() + SINK_SHUTDOWN_S
        for _sink, thread in shutting:
            thread.start()
        if self.server is not None:
            self.server.stop()  # subscribers get the server's grace meanwhile
        for sink, thread in shutting:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning(
                    "sink %s: shutdown unfinished after %.1f s; what it still held is lost",
                    getattr(sink, "name", sink),
                    SINK_SHUTDOWN_S,
                )
        self.journal.close()
        if self.tmp is not None:
            self.tmp.cleanup()

    @staticmethod
    def _shutdown(sink: Sink) -> None:
        try:
            sink.shutdown()
        except Exception:
            log.exception("sink %s: shutdown failed", getattr(sink, "name", sink))

    def health(self) -> dict[str, Any]:
        """Queue depths and counters for /metrics (read from any thread)."""
        depths: dict[str, int] = {}
        subscribers = 0
        if self.server is not None:
            queue_depths = getattr(self.server.hub, "queue_depths", None)
            if queue_depths is not None:
                sizes = queue_depths()
                subscribers = len(sizes)
                depths["grpc_subscribers_max"] = max(sizes, default=0)
                depths["grpc_subscribers_total"] = sum(sizes)
        otlp_dropped = 0
        for sink in self.sinks:
            h = getattr(sink, "health", None)
            if h is not None and hasattr(h, "failed"):
                otlp_dropped += sum(h.failed.values()) + h.queue_dropped
        jh = self.journal.health
        return {
            "queue_depths": depths,
            "subscribers": subscribers,
            "journal_last_seq": self.journal.last_seq,
            "journal_backlog": jh.backlog,
            "journal_dropped": jh.dropped,
            "journal_write_errors": jh.write_errors,
            "otlp_dropped": otlp_dropped,
        }


# -- building it from the command line ---------------------------------------------------------

DEFAULT_JOURNAL = "/var/lib/zonewatch/journal"


@dataclass(slots=True)
class DeliveryConfig:
    journal: str | None = None  # None: DEFAULT_JOURNAL with gRPC, else a private temp dir
    grpc: str | None = None
    tokens: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    otlp: str | None = None
    otlp_protocol: str | None = None
    metrics: str | None = None
    ocsf: str | None = None
    queue_bound: int = 4096  # per gRPC subscriber: alerts, bytes; and bytes per token
    queue_bytes: int = 4 << 20
    token_queue_bytes: int = 16 << 20
    heartbeat_s: float = 5.0


def add_options(p: Any) -> None:
    """The delivery options of `zonewatch run` (an argparse parser)."""
    from zonewatch.options import (
        grpc_address,
        journal_dir,
        listen_address,
        otlp_endpoint,
        output_file,
        pem_file,
        text_file,
    )

    p.add_argument("--journal", metavar="DIR", type=journal_dir,
                   help=f"alert journal (default {DEFAULT_JOURNAL})")  # fmt: skip
    p.add_argument(
        "--grpc",
        metavar="ADDR",
        type=grpc_address,
        help="gRPC listen address: unix:/PATH or HOST:PORT (default "
        "unix:/run/zonewatch/zonewatch.sock when --tokens is given)",
    )
    p.add_argument(
        "--tokens", metavar="FILE", type=text_file, help="bearer tokens file (YAML) for gRPC"
    )
    p.add_argument(
        "--tls-cert", metavar="FILE", type=pem_file, help="gRPC server certificate (PEM)"
    )
    p.add_argument("--tls-key", metavar="FILE", type=pem_file, help="gRPC server key (PEM)")
    p.add_argument(
        "--tls-client-ca", metavar="FILE", type=pem_file, help="require client certs from this CA"
    )
    p.add_argument(
        "--otlp",
        metavar="ENDPOINT",
        type=otlp_endpoint,
        help="OTLP collector for every signal (or OTEL_EXPORTER_OTLP_[LOGS_|TRACES_|METRICS_]"
        "ENDPOINT)",
    )
    p.add_argument(
        "--otlp-protocol", choices=["grpc", "http/protobuf"], help="default grpc (or OTEL_*)"
    )
    p.add_argument(
        "--metrics",
        metavar="ADDR",
        type=listen_address,
        help="serve Prometheus /metrics on HOST:PORT",
    )
    p.add_argument(
        "--ocsf",
        metavar="FILE|-",
        type=output_file,
        help="write OCSF Detection Findings (JSON lines)",
    )


def config_from_args(args: Any) -> DeliveryConfig:
    return DeliveryConfig(
        journal=args.journal,
        grpc=args.grpc,
        tokens=args.tokens,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        otlp=args.otlp,
        otlp_protocol=args.otlp_protocol,
        metrics=args.metrics,
        ocsf=args.ocsf,
    )


def build(config: DeliveryConfig, sinks: Sequence[Sink] = ()) -> Delivery:
    """Journal, gRPC server, OTLP/OCSF/Prometheus sinks from the options; `sinks` (the
    agent's JSONL) receive the alerts too."""
    from zonewatch.errors import ConfigError

    if config.grpc and not config.tokens:
        raise ConfigError("--grpc", "needs --tokens FILE (every caller needs a bearer token)")
    journal_dir = config.journal
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if journal_dir is None:
        if config.tokens:
            journal_dir = DEFAULT_JOURNAL
        else:
            # Nobody can resume without gRPC: keep the journal private to this run rather
            # than contend for the shared one with other agents on the host.
            tmp = tempfile.TemporaryDirectory(prefix="zonewatch-journal-")
            journal_dir = tmp.name
    try:
        journal = Journal(journal_dir)
    except OSError as exc:  # read-only, a regular file, no free inodes, ...
        raise ConfigError(
            journal_dir, f"cannot keep the alert journal here: {exc.strerror}"
        ) from None
    all_sinks: list[Sink] = list(sinks)
    try:
        if config.ocsf:
            from zonewatch.exporters.ocsf import OcsfSink

            all_sinks.append(OcsfSink(config.ocsf))
        if config.otlp or otel_env.configured(os.environ):  # any signal's endpoint
            from zonewatch.exporters.otlp import OtlpConfig, OtlpSink

            all_sinks.append(OtlpSink(OtlpConfig(config.otlp, config.otlp_protocol)))
        prom = None
        if config.metrics:
            from zonewatch.exporters.prometheus import PrometheusSink

            try:
                prom = PrometheusSink(config.metrics)
            except (OSError, OverflowError) as exc:  # in use, not an address of this host
                reason = getattr(exc, "strerror", None) or str(exc)
                raise ConfigError(
                    f"--metrics {config.metrics}", f"cannot listen: {reason}"
                ) from None
            all_sinks.append(prom)
        server = None
        if config.tokens:
            from zonewatch.api.auth import TokenStore
            from zonewatch.api.server import DEFAULT_ADDRESS, GrpcServer, ServerConfig

            server = GrpcServer(
                ServerConfig(
                    TokenStore.load(config.tokens),
                    address=config.grpc or DEFAULT_ADDRESS,
                    tls_cert=config.tls_cert,
                    tls_key=config.tls_key,
                    tls_client_ca=config.tls_client_ca,
                    queue_bound=config.queue_bound,
                    queue_bytes=config.queue_bytes,
                    token_queue_bytes=config.token_queue_bytes,
                    heartbeat_s=config.heartbeat_s,
                ),
                journal,
            ).start()
    except BaseException:
        journal.close()
        raise
    delivery = Delivery(journal, all_sinks, server)
    delivery.prometheus = prom
    delivery.tmp = tmp
    return delivery


def watch_agent(delivery: Delivery, agent: Any) -> None:
    """Let /metrics show the agent's own health (events in, loss, probes, queues)."""
    prom = delivery.prometheus
    if prom is None:
        return
    from zonewatch.exporters.prometheus import AgentHealth

    def health() -> AgentHealth:
        h = delivery.health()
        rules = agent.rules.engine.counters if agent.rules is not None else None
        return AgentHealth(
            events=agent.counters.events,
            probes=tuple(p.name for p in agent.probes),
            lost=dict(agent.counters.lost_reported),
            blind=[(c.zone, v.channel, v.reason) for c in agent.coverage for v in c.blind()],
            rule_eval_errors=rules.eval_errors if rules else 0,
            rules_disabled=rules.rules_disabled if rules else 0,
            **h,
        )

    prom.health = health
    agent.on_rule_eval = prom.observe_rule_latency
