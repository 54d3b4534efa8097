"""Delivery: the journal first, then every subscriber and sink.

`publish(alerts)` numbers and stores the alerts (zonewatch.journal), then hands them to the
gRPC server's subscribers (a thread-safe hand-off, never awaited) and to the sinks (JSONL,
OCSF, OTLP: each returns at once or counts its failures). A failing sink costs a counter
and a log line, never the agent or another sink. Stats and zones go to the server (the UI's
WatchStats and ListZones) and to the sinks that want them (Prometheus, OTLP metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from zonewatch.exporters.base import JsonRecord, Sink
from zonewatch.journal import Journal
from zonewatch.model import Alert, Zone, ZoneStats

log = logging.getLogger(__name__)


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
        if self._closed:
            return
        self._closed = True
        if self.server is not None:
            self.server.stop()
        for sink in self.sinks:
            try:
                sink.shutdown()
            except Exception:
                log.exception("sink %s: shutdown failed", getattr(sink, "name", sink))
        self.journal.close()
