"""The gRPC server (grpc.aio) in its own thread with its own event loop.

The agent never awaits it: `Hub.publish` and friends hand data over with
`loop.call_soon_threadsafe`. Each subscriber has a queue bounded in alerts and in bytes, and
all the queues of one token share a byte cap; when a queue would pass a bound, it is emptied
(its memory freed at once) and the subscriber catches up from the journal when it reads
again, or is told with an in-stream `lost` what left retention meanwhile. A slow subscriber
therefore costs the others and the agent nothing but its own bounded queue. HTTP/2 BDP
probing is off so that gRPC's own window stays small (64 KiB) rather than growing megabytes
behind a slow reader.

Every seq the journal cannot deliver (a gap record: retention, not written, damaged, power
loss) becomes an in-stream `lost` naming its range and reason, and so does a resume cursor
from another journal epoch or past the journal's end. A tenant-scoped token sees no global
number beyond its own alerts' seqs: its cursors and heartbeats carry the seq of its tenants'
newest alert, and its `lost` notices count its tenants' alerts only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import stat
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from zonewatch.api import convert
from zonewatch.api.auth import AuthInterceptor, Principal, TokenStore
from zonewatch.api.filters import AlertMatcher, AllowDeny, matcher_from_pb, scoped
from zonewatch.api.gen.zonewatch.v1 import zonewatch_pb2 as pb
from zonewatch.api.gen.zonewatch.v1 import zonewatch_pb2_grpc as pb_grpc
from zonewatch.errors import ConfigError
from zonewatch.journal import UNKNOWN_COUNT, Gap, GapReason, Journal, first_of
from zonewatch.model import Alert, Zone, ZoneStats

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "unix:/run/zonewatch/zonewatch.sock"
ALERT_SERVICE = "zonewatch.v1.AlertService"
ZONE_SERVICE = "zonewatch.v1.ZoneService"
REPLAY_CHUNK = 512


@dataclass(slots=True)
class ServerConfig:
    tokens: TokenStore
    address: str = DEFAULT_ADDRESS
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set: mutual TLS, clients must present a cert
    queue_bound: int = 4096  # alerts per subscriber
    queue_bytes: int = 4 << 20  # serialized alerts per subscriber
    token_queue_bytes: int = 16 << 20  # the same, summed over one token's subscribers
    heartbeat_s: float = 5.0
    grace_s: float = 1.0


def is_local(address: str) -> bool:
    """unix sockets and loopback addresses; everything else needs TLS."""
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unix_path(address: str) -> str | None:
    if address.startswith("unix://"):
        return address[len("unix://") :]
    if address.startswith("unix:"):
        return address[len("unix:") :]
    return None


@dataclass(slots=True, frozen=True)
class QueueLimits:
    alerts: int
    bytes: int
    token_bytes: int


@dataclass(slots=True, eq=False)
class Subscription:
    """One Subscribe call's state; touched only on the server's loop."""

    matcher: AlertMatcher
    principal: Principal
    wake: asyncio.Event
    pending: deque[tuple[int, bytes]] = field(default_factory=deque)
    pending_bytes: int = 0
    position: int = 0  # the newest seq this subscriber has been shown or filtered past
    seen: int = 0  # the newest seq fanned out while this subscriber kept up
    # Scoped tokens: the newest seq of its own tenants' alerts passed (its cursor), and
    # fanned out while it kept up.
    shown: int = 0
    seen_own: int = 0
    overflowed: bool = False
    overflows: int = 0

    @property
    def scoped(self) -> bool:
        return self.principal.tenants is not None

    def owns(self, alert: Alert) -> bool:
        return self.principal.may_see(alert.zone.tenant)

    @property
    def cursor(self) -> int:
        """The seq its messages' cursors carry (never another tenant's, when scoped)."""
        return self.shown if self.scoped else self.position


@dataclass(slots=True, eq=False)
class StatsWatch:
    tenants: AllowDeny
    zones: AllowDeny
    queue: asyncio.Queue[list[ZoneStats]]


class Hub:
    """What the server shows: live alerts, zones, stats. Thread-safe entry points are
    publish, publish_stats and set_zones; everything else runs on the server's loop."""

    def __init__(self, journal: Journal, boot_id: str, limits: QueueLimits) -> None:
        self.journal = journal
        self.boot_id = boot_id
        self.limits = limits
        self.token_bytes: dict[str, int] = {}  # queued bytes per token name
        self.loop: asyncio.AbstractEventLoop | None = None
        self.subs: set[Subscription] = set()
        self.watchers: set[StatsWatch] = set()
        self.zones: list[Zone] = []
        self.stats: list[ZoneStats] = []
        self.overflows = 0

    # -- from the agent's thread --------------------------------------------------------------

    def publish(self, alerts: Sequence[Alert]) -> None:
        if alerts:
            self._call(self._fanout, list(alerts))

    def publish_stats(self, stats: Sequence[ZoneStats]) -> None:
        self._call(self._stats_fanout, list(stats))

    def _call(self, fn: Callable[[Any], None], arg: Any) -> None:
        loop = self.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the server is stopping: nobody listens
                loop.call_soon_threadsafe(fn, arg)

    def set_zones(self, zones: Sequence[Zone]) -> None:
        self.zones = list(zones)  # one reference swap: readers see the old or the new list

    def queue_depths(self) -> list[int]:
        return [len(s.pending) for s in list(self.subs)]

    # -- on the loop --------------------------------------------------------------------------

    def cursor(self, seq: int) -> Any:
        return pb.Cursor(boot_id=self.boot_id, seq=seq, epoch=self.journal.epoch)

    def response(self, alert: Alert) -> bytes:
        msg = pb.SubscribeResponse(cursor=self.cursor(alert.seq), alert=convert.alert_pb(alert))
        data: bytes = msg.SerializeToString()
        return data

    def _fanout(self, alerts: list[Alert]) -> None:
        encoded: dict[int, bytes] = {}  # each alert serialized once, whoever receives it
        last = alerts[-1].seq
        limits = self.limits
        for sub in self.subs:
            if sub.overflowed:
                continue
            matching: list[tuple[int, bytes]] = []
            size = 0
            for a in alerts:
                if sub.matcher(a):
                    data = encoded.get(a.seq)
                    if data is None:
                        data = encoded[a.seq] = self.response(a)
                    matching.append((a.seq, data))
                    size += len(data)
            name = sub.principal.name
            if (
                len(sub.pending) + len(matching) > limits.alerts
                or sub.pending_bytes + size > limits.bytes
                or self.token_bytes.get(name, 0) + size > limits.token_bytes
            ):
                sub.overflowed = True
                sub.overflows += 1
                self.overflows += 1
                self.clear(sub)
                sub.wake.set()
                continue
            sub.pending.extend(matching)
            sub.pending_bytes += size
            self.token_bytes[name] = self.token_bytes.get(name, 0) + size
            sub.seen = last
            if sub.scoped:
                sub.seen_own = max((a.seq for a in alerts if sub.owns(a)), default=sub.seen_own)
            if matching:
                sub.wake.set()

    def take(self, sub: Subscription) -> tuple[int, bytes]:
        seq, data = sub.pending.popleft()
        sub.pending_bytes -= len(data)
        self.token_bytes[sub.principal.name] -= len(data)
        return seq, data

    def clear(self, sub: Subscription) -> None:
        """Empties a subscriber's queue (its bytes no longer count against its token)."""
        name = sub.principal.name
        self.token_bytes[name] = self.token_bytes.get(name, 0) - sub.pending_bytes
        sub.pending.clear()
        sub.pending_bytes = 0

    def _stats_fanout(self, stats: list[ZoneStats]) -> None:
        self.stats = stats
        for w in self.watchers:
            if w.queue.full():  # the newest snapshot is the one that matters
                w.queue.get_nowait()
            w.queue.put_nowait(stats)


def _principal(tokens: TokenStore, context: grpc.aio.ServicerContext) -> Principal | None:
    return tokens.from_metadata(context.invocation_metadata())


class AlertServicer:
    def __init__(self, hub: Hub, tokens: TokenStore, heartbeat_s: float) -> None:
        self.hub = hub
        self.tokens = tokens
        self.heartbeat_s = heartbeat_s
        self._reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zw-replay")

    async def _subscription(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Subscription | None:
        """The caller's subscription, or None once the call is refused."""
        principal = _principal(self.tokens, context)
        if principal is None:  # the interceptor refuses these first; kept as a second lock
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown token")
            return None
        try:
            matcher = matcher_from_pb(principal, request.filter)
        except PermissionError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            return None
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return None
        return Subscription(matcher, principal, asyncio.Event())

    async def subscribe(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        hub = self.hub
        sub = await self._subscription(request, context)
        if sub is None:
            return
        principal = sub.principal
        heartbeat = request.heartbeat_ms / 1000 if request.heartbeat_ms else self.heartbeat_s
        heartbeat = max(0.05, heartbeat)
        hub.subs.add(sub)  # before reading last_seq: nothing falls between the two
        log.info("subscriber %s connected (%s)", principal.name, context.peer())
        try:
            replay = request.HasField("resume_after_seq")
            if replay:
                notice = self._start_replay(sub, request.resume_after_seq, request.resume_epoch)
                if notice is not None:
                    yield notice
            else:
                sub.position = hub.journal.last_seq
                sub.shown = hub.journal.last_seq_of(principal.tenants)
            sub.seen, sub.seen_own = sub.position, sub.shown
            while True:
                if replay or sub.overflowed:
                    sub.overflowed = False
                    hub.clear(sub)
                    replay = False
                    async for data in self._replay(sub):
                        yield data
                    continue
                if not sub.pending:
                    sub.wake.clear()
                    try:
                        await asyncio.wait_for(sub.wake.wait(), heartbeat)
                    except TimeoutError:
                        if not sub.pending and not sub.overflowed:
                            sub.position = max(sub.position, sub.seen)
                            sub.shown = max(sub.shown, sub.seen_own)
                            yield self._heartbeat(sub)
                        continue
                while sub.pending and not sub.overflowed:
                    seq, data = hub.take(sub)
                    if seq > sub.position:
                        sub.position = seq
                        sub.shown = seq  # only its own tenants' alerts reach its queue
                        yield data
        finally:
            hub.clear(sub)
            hub.subs.discard(sub)
            log.info("subscriber %s gone", principal.name)

    def _start_replay(self, sub: Subscription, after: int, epoch: str) -> bytes | None:
        """Positions a resuming subscriber. A cursor from another journal (another epoch,
        or past this one's end) gets a `lost` of unknown count and replays from the start."""
        journal = self.hub.journal
        reason = None
        if epoch and epoch != journal.epoch:
            reason = GapReason.EPOCH
        elif after > journal.last_seq:
            reason = GapReason.AHEAD
        if reason is None:
            sub.position = sub.shown = after
            return None
        sub.position = sub.shown = 0
        data: bytes = pb.SubscribeResponse(
            cursor=self.hub.cursor(0),
            lost=pb.Lost(source="journal", reason=str(reason), count_unknown=True),
        ).SerializeToString()
        return data

    def _heartbeat(self, sub: Subscription) -> bytes:
        last = self.hub.journal.last_seq_of(sub.principal.tenants)
        msg = pb.SubscribeResponse(
            cursor=self.hub.cursor(sub.cursor),
            heartbeat=pb.Heartbeat(ts_ns=time.time_ns(), last_seq=max(last, sub.cursor)),
        )
        data: bytes = msg.SerializeToString()
        return data

    async def _replay(self, sub: Subscription) -> AsyncIterator[bytes]:
        """From the journal: every retained alert after sub.position, up to its end, and a
        `lost` for every seq it cannot deliver."""
        loop = asyncio.get_running_loop()
        journal = self.hub.journal
        while True:
            result = await loop.run_in_executor(
                self._reader, journal.read_after, sub.position, REPLAY_CHUNK
            )
            for record in result.records:
                if record.seq <= sub.position:
                    continue
                first = first_of(record)
                if first > sub.position + 1:  # missing with no record saying why
                    notice = self._lost(sub, Gap(sub.position + 1, first - 1, GapReason.UNKNOWN))
                    if notice is not None:
                        yield notice
                if isinstance(record, Gap):
                    notice = self._lost(sub, record)
                    if notice is not None:
                        yield notice
                    continue
                sub.position = record.seq
                if sub.owns(record):
                    sub.shown = record.seq
                if sub.matcher(record):
                    yield self.hub.response(record)
            if not result.records or sub.position >= result.last_seq:
                return

    def _lost(self, sub: Subscription, gap: Gap) -> bytes | None:
        """An in-stream `lost` for a gap after sub.position (None when a scoped subscriber
        lost none of its tenants' alerts in it); moves sub.position past the gap."""
        first = max(gap.first, sub.position + 1)
        sub.position = gap.last
        lost = pb.Lost(source="journal", reason=str(gap.reason))
        if not sub.scoped:
            lost.count = gap.last - first + 1
            lost.first_seq, lost.last_seq, lost.first_available_seq = first, gap.last, gap.last + 1
        elif gap.tenants is None:
            lost.count_unknown = True
        else:
            own = [n for t, n in gap.tenants.items() if sub.principal.may_see(t)]
            if UNKNOWN_COUNT in own:
                lost.count_unknown = True
            elif not sum(own):
                return None
            else:
                lost.count = sum(own)
        data: bytes = pb.SubscribeResponse(
            cursor=self.hub.cursor(sub.cursor), lost=lost
        ).SerializeToString()
        return data

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)


class ZoneServicer:
    def __init__(self, hub: Hub, tokens: TokenStore) -> None:
        self.hub = hub
        self.tokens = tokens

    async def _scope(
        self, context: grpc.aio.ServicerContext, tenants: Sequence[str]
    ) -> AllowDeny | None:
        principal = _principal(self.tokens, context)
        if principal is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown token")
            return None
        try:
            return scoped(principal, tenants)
        except PermissionError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            return None

    async def list_zones(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        scope = await self._scope(context, request.tenants)
        if scope is None:
            return pb.ListZonesResponse()
        zones = [convert.zone_pb(z) for z in self.hub.zones if scope.passes(z.tenant)]
        return pb.ListZonesResponse(zones=zones)

    async def watch_stats(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        scope = await self._scope(context, request.tenants)
        if scope is None:
            return
        watch = StatsWatch(scope, AllowDeny.of(request.zones), asyncio.Queue(maxsize=1))
        self.hub.watchers.add(watch)
        try:
            stats = self.hub.stats
            while True:
                yield pb.StatsSnapshot(
                    ts_ns=time.time_ns(),
                    zones=[
                        convert.stats_pb(s)
                        for s in stats
                        if watch.tenants.passes(s.zone.tenant)
                        and watch.zones.passes_any((s.zone.name, s.zone.id))
                    ],
                )
                stats = await watch.queue.get()
        finally:
            self.hub.watchers.discard(watch)


def _credentials(config: ServerConfig) -> Any:
    if not (config.tls_cert and config.tls_key):
        if config.tls_cert or config.tls_key or config.tls_client_ca:
            raise ConfigError("--tls-cert/--tls-key", "TLS needs both a certificate and a key")
        return None
    key = Path(config.tls_key).read_bytes()
    cert = Path(config.tls_cert).read_bytes()
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


class GrpcServer:
    """Starts in a thread of its own; `start` returns once it listens (or raises)."""

    def __init__(self, config: ServerConfig, journal: Journal, boot_id: str | None = None) -> None:
        self.config = config
        self.boot_id = boot_id or uuid.uuid4().hex
        limits = QueueLimits(config.queue_bound, config.queue_bytes, config.token_queue_bytes)
        self.hub = Hub(journal, self.boot_id, limits)
        self.address = config.address  # the bound address (the real port when :0)
        self._credentials = _credentials(config)
        if not is_local(config.address) and self._credentials is None:
            raise ConfigError(
                config.address, "a non-local address needs TLS (--tls-cert and --tls-key)"
            )
        self.interceptor = AuthInterceptor(config.tokens)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._alerts = AlertServicer(self.hub, config.tokens, config.heartbeat_s)

    def start(self) -> GrpcServer:
        self._thread = threading.Thread(target=self._run, name="zw-grpc", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); after that, logged
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.exception("grpc server failed")

    def _bind(self, server: grpc.aio.Server) -> None:
        address = self.config.address
        path = unix_path(address)
        if path is not None:
            sock = Path(path)
            sock.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            if sock.exists() and stat.S_ISSOCK(sock.stat().st_mode):
                sock.unlink()  # a dead agent's socket
        if self._credentials is not None:
            port = server.add_secure_port(address, self._credentials)
        else:
            port = server.add_insecure_port(address)
        if path is None:
            if port == 0:
                raise ConfigError(address, "cannot listen there")
            self.address = f"{address.rsplit(':', 1)[0]}:{port}"
        else:
            os.chmod(path, 0o660)  # tokens guard the calls; the mode keeps others off too

    async def _serve(self) -> None:
        self.hub.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = grpc.aio.server(
            interceptors=[self.interceptor],
            options=[
                ("grpc.http2.bdp_probe", 0),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.so_reuseport", 0),
            ],
        )
        alerts = self._alerts
        zones = ZoneServicer(self.hub, self.config.tokens)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    ALERT_SERVICE,
                    {
                        # Responses are serialized once per alert in the fan-out and sent
                        # as bytes to every subscriber that matches.
                        "Subscribe": grpc.unary_stream_rpc_method_handler(
                            alerts.subscribe,
                            request_deserializer=pb.SubscribeRequest.FromString,
                            response_serializer=bytes,
                        ),
                    },
                ),
            )
        )

        class _Zones(pb_grpc.ZoneServiceServicer):
            ListZones = zones.list_zones
            WatchStats = zones.watch_stats

        pb_grpc.add_ZoneServiceServicer_to_server(_Zones(), server)  # type: ignore[no-untyped-call]
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            (
                ALERT_SERVICE,
                ZONE_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self._bind(server)
        await server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        for name in ("", ALERT_SERVICE, ZONE_SERVICE):
            await health.set(name, serving)
        log.info("grpc: listening on %s (boot %s)", self.address, self.boot_id)
        self._ready.set()
        await self._stop.wait()
        await health.enter_graceful_shutdown()
        await server.stop(self.config.grace_s)
        self._alerts.close()
        self.hub.loop = None

    def stop(self) -> None:
        loop, stop = self.hub.loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout=self.config.grace_s + 10)
        path = unix_path(self.config.address)
        if path is not None:
            Path(path).unlink(missing_ok=True)
