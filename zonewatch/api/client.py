"""A small synchronous client of zonewatch.v1 (`zonewatch tail`, the UI, tests)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from zonewatch.api.gen.zonewatch.v1 import zonewatch_pb2 as pb
from zonewatch.api.gen.zonewatch.v1 import zonewatch_pb2_grpc as pb_grpc
from zonewatch.model import Severity


@dataclass(slots=True)
class TlsOptions:
    ca: str | None = None  # the server's CA (set: TLS)
    cert: str | None = None  # client certificate and key, for mutual TLS
    key: str | None = None
    server_name: str | None = None  # overrides the name checked in the server's cert


@dataclass(slots=True)
class Filter:
    tenants: Iterable[str] = ()
    deny_tenants: Iterable[str] = ()
    zones: Iterable[str] = ()
    deny_zones: Iterable[str] = ()
    min_severity: Severity | None = None
    rules: Iterable[str] = ()
    deny_rules: Iterable[str] = ()
    tags: Iterable[str] = ()
    deny_tags: Iterable[str] = ()

    def to_pb(self) -> Any:
        return pb.AlertFilter(
            tenants=pb.StringFilter(allow=list(self.tenants), deny=list(self.deny_tenants)),
            zones=pb.StringFilter(allow=list(self.zones), deny=list(self.deny_zones)),
            min_severity=f"SEVERITY_{(self.min_severity or Severity.INFO).name}",
            rules=pb.StringFilter(allow=list(self.rules), deny=list(self.deny_rules)),
            tags=pb.StringFilter(allow=list(self.tags), deny=list(self.deny_tags)),
        )


def open_channel(
    address: str, tls: TlsOptions | None = None, options: Iterable[tuple[str, Any]] = ()
) -> grpc.Channel:
    options = [("grpc.max_reconnect_backoff_ms", 1000), *options]
    if tls is None or tls.ca is None:
        return grpc.insecure_channel(address, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(tls.ca).read_bytes(),
        private_key=Path(tls.key).read_bytes() if tls.key else None,
        certificate_chain=Path(tls.cert).read_bytes() if tls.cert else None,
    )
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, creds, options=options)


@dataclass(slots=True)
class Client:
    channel: grpc.Channel
    token: str | None
    _alerts: Any = field(init=False)
    _zones: Any = field(init=False)

    def __post_init__(self) -> None:
        self._alerts = pb_grpc.AlertServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self._zones = pb_grpc.ZoneServiceStub(self.channel)  # type: ignore[no-untyped-call]

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def subscribe(
        self,
        flt: Filter | None = None,
        resume_after_seq: int | None = None,
        heartbeat_ms: int = 0,
        timeout: float | None = None,
        resume_epoch: str = "",
    ) -> Any:
        """The response stream (iterate it; `.cancel()` ends it). Resume with the last
        cursor's seq and epoch."""
        request = pb.SubscribeRequest(
            filter=(flt or Filter()).to_pb(), heartbeat_ms=heartbeat_ms, resume_epoch=resume_epoch
        )
        if resume_after_seq is not None:
            request.resume_after_seq = resume_after_seq
        return self._alerts.Subscribe(request, metadata=self.metadata, timeout=timeout)

    def list_zones(self, tenants: Iterable[str] = (), timeout: float = 10) -> list[Any]:
        reply = self._zones.ListZones(
            pb.ListZonesRequest(tenants=list(tenants)), metadata=self.metadata, timeout=timeout
        )
        return list(reply.zones)

    def watch_stats(self, tenants: Iterable[str] = (), zones: Iterable[str] = ()) -> Iterator[Any]:
        stream: Iterator[Any] = self._zones.WatchStats(
            pb.WatchStatsRequest(tenants=list(tenants), zones=list(zones)),
            metadata=self.metadata,
        )
        return stream

    def close(self) -> None:
        self.channel.close()
