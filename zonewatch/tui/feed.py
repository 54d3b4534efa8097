"""Where the UI's data comes from: a `Feed` hands out what arrived since the last poll.

- GrpcFeed: a running agent's WatchStats and Subscribe streams (local or remote), each in
  its own thread, reconnecting with backoff; while the agent can't be reached the status
  says so (never a traceback).
- ReplayFeed: recorded JSON lines (`zonewatch run --jsonl`: `stats`, `alert` and `event`
  lines), for snapshot tests and offline viewing.
- LocalFeed: the agent in this process (`zonewatch run --tui`): its latest stats, plus the
  alerts and events it exports (it is one of the agent's sinks).

The app polls from its own loop; feeds never call into the UI.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from zonewatch.model import (
    Alert,
    FileEvent,
    GenericEvent,
    KvmEvent,
    NetEvent,
    ProcEvent,
    Severity,
    ZoneStats,
    parse_rfc3339_ns,
    record_from_json,
    zone_ref_from_json,
)

Event = FileEvent | NetEvent | ProcEvent | KvmEvent | GenericEvent
EVENT_TYPES = (FileEvent, NetEvent, ProcEvent, KvmEvent, GenericEvent)
MAX_PENDING_SNAPSHOTS = 30  # a paused UI catches up on this many, then only the newest
MAX_PENDING_ALERTS = 5000
MAX_PENDING_EVENTS = 5000


@dataclass(slots=True)
class Update:
    """What arrived since the last poll. `snapshots` are whole per-zone snapshots, oldest
    first (the last is the current view); `status` is None when unchanged, "" when fine."""

    snapshots: list[list[ZoneStats]] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    status: str | None = None
    lost_alerts: int = 0

    def __bool__(self) -> bool:
        return bool(
            self.snapshots or self.alerts or self.events or self.status is not None
        ) or bool(self.lost_alerts)


class Feed(Protocol):
    source: str  # shown in the header: the agent's address, the file, "local agent"
    carries_events: bool  # False: the drill-down says events are not available here

    def poll(self, timeout: float = 0.0) -> Update:
        """What arrived since the last poll; waits up to `timeout` s for a first item."""
        ...

    @property
    def finished(self) -> bool:
        """True once nothing more will come (the in-process agent stopped)."""
        ...

    def close(self) -> None: ...


def alert_from_json(obj: dict[str, Any]) -> Alert:
    """An `alert` JSON line back into an Alert (the inverse of Alert.to_json)."""
    ts = parse_rfc3339_ns(obj["ts"])
    return Alert(
        ts_ns=ts,
        zone=zone_ref_from_json(obj.get("zone") or {}),
        rule=str(obj.get("rule", "")),
        severity=Severity.parse(str(obj.get("severity", "info"))),
        summary=str(obj.get("summary", "")),
        tags=tuple(str(t) for t in obj.get("tags", ())),
        evidence=dict(obj.get("evidence") or {}),
        count=int(obj.get("count", 1)),
        first_ts_ns=parse_rfc3339_ns(obj["first_ts"]) if obj.get("first_ts") else ts,
        last_ts_ns=parse_rfc3339_ns(obj["last_ts"]) if obj.get("last_ts") else ts,
        lost_in_window=int(obj.get("lost_in_window", 0)),
        seq=int(obj.get("seq", 0)),
    )


class _Inbox:
    """The thread-safe hand-off shared by the live feeds: writers append, poll drains."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.snapshots: collections.deque[list[ZoneStats]] = collections.deque(
            maxlen=MAX_PENDING_SNAPSHOTS
        )
        self.alerts: collections.deque[Alert] = collections.deque(maxlen=MAX_PENDING_ALERTS)
        self.events: collections.deque[Event] = collections.deque(maxlen=MAX_PENDING_EVENTS)
        self.status: str | None = None
        self.lost_alerts = 0

    def put(
        self,
        snapshot: list[ZoneStats] | None = None,
        alerts: Iterable[Alert] = (),
        events: Iterable[Event] = (),
        status: str | None = None,
        lost_alerts: int = 0,
    ) -> None:
        with self.cond:
            if snapshot is not None:
                self.snapshots.append(snapshot)
            self.alerts.extend(alerts)
            self.events.extend(events)
            if status is not None:
                self.status = status
            self.lost_alerts += lost_alerts
            self.cond.notify_all()

    def take(self, timeout: float) -> Update:
        with self.cond:
            if timeout > 0 and not self._has_items():
                self.cond.wait(timeout)
            update = Update(
                list(self.snapshots),
                list(self.alerts),
                list(self.events),
                self.status,
                self.lost_alerts,
            )
            self.snapshots.clear()
            self.alerts.clear()
            self.events.clear()
            self.status = None
            self.lost_alerts = 0
            return update

    def _has_items(self) -> bool:
        return bool(self.snapshots or self.alerts or self.events) or self.status is not None


# -- recorded JSON lines ----------------------------------------------------------------------


@dataclass(slots=True)
class _Frame:
    snapshot: list[ZoneStats] | None
    alerts: list[Alert] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


class ReplayFeed:
    """A recording of `zonewatch run --jsonl` (with `--events` for the drill-down's recent
    events). `step=False`: the first poll hands out everything (snapshot tests, `--once`);
    `step=True`: one snapshot per poll, as the agent would have sent them."""

    carries_events = True

    def __init__(self, path: str | Path, *, step: bool = False) -> None:
        self.source = f"replay: {Path(path).name}"
        self.step = step
        self.skipped = 0  # lines that did not parse: counted, shown, never fatal
        self._frames = collections.deque(self._read(Path(path)))

    def _read(self, path: Path) -> list[_Frame]:
        frames: list[_Frame] = []
        pending = _Frame(None)
        group: list[ZoneStats] = []
        group_ts = -1

        def close_group() -> None:
            nonlocal pending, group, group_ts
            if group:
                pending.snapshot = group
                frames.append(pending)
                pending, group, group_ts = _Frame(None), [], -1

        with path.open("rb") as stream:
            for raw in stream:
                try:
                    obj = orjson.loads(raw)
                    kind = obj.get("type")
                    if kind == "alert":
                        close_group()
                        pending.alerts.append(alert_from_json(obj))
                        continue
                    record = record_from_json(obj)
                except (orjson.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError):
                    self.skipped += 1
                    continue
                if isinstance(record, ZoneStats):
                    # One snapshot: the agent writes every zone's line with one timestamp.
                    if record.ts_ns != group_ts or any(s.zone.id == record.zone.id for s in group):
                        close_group()
                        group_ts = record.ts_ns
                    group.append(record)
                elif isinstance(record, EVENT_TYPES):
                    close_group()
                    pending.events.append(record)
        close_group()
        if pending.alerts or pending.events:
            frames.append(pending)
        return frames

    def poll(self, timeout: float = 0.0) -> Update:
        update = Update()
        if self.skipped:
            update.status = f"replay: {self.skipped} malformed line(s) skipped"
        while self._frames:
            frame = self._frames.popleft()
            if frame.snapshot is not None:
                update.snapshots.append(frame.snapshot)
            update.alerts += frame.alerts
            update.events += frame.events
            if self.step and frame.snapshot is not None:
                break
        return update

    @property
    def finished(self) -> bool:
        return False  # a replay stays on screen until the user quits

    def close(self) -> None:
        self._frames.clear()


# -- a running agent over gRPC ------------------------------------------------------------------


class GrpcFeed:
    """WatchStats and Subscribe of zonewatch.v1, each in a daemon thread. A tenant-scoped
    token sees only its tenants' zones and alerts: the agent scopes both streams."""

    carries_events = False  # zonewatch.v1 streams stats and alerts, not raw events

    def __init__(
        self,
        address: str,
        token: str | None,
        *,
        tls: Any = None,
        min_backoff: float = 0.5,
        max_backoff: float = 5.0,
    ) -> None:
        self.source = address
        self.address = address
        self.token = token
        self.tls = tls
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._inbox = _Inbox()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._calls: set[Any] = set()  # live streams, cancelled by close()
        self._cursor: int | None = None  # alerts: resume after this seq when reconnecting
        self._threads = [
            threading.Thread(target=self._run, args=(self._stats,), name="zw-tui-stats"),
            threading.Thread(target=self._run, args=(self._alerts,), name="zw-tui-alerts"),
        ]
        for thread in self._threads:
            thread.daemon = True  # a stuck connect never holds the process at exit
            thread.start()

    def poll(self, timeout: float = 0.0) -> Update:
        return self._inbox.take(timeout)

    @property
    def finished(self) -> bool:
        return False

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.cancel()
        for thread in self._threads:
            thread.join(timeout=2)

    def _run(self, stream: Callable[[Any], None]) -> None:
        """Run one stream forever: on failure, say so in the status and retry with backoff."""
        import grpc

        from zonewatch.api.client import Client, open_channel

        backoff = self.min_backoff
        attempt = 0
        while not self._stop.is_set():
            attempt += 1
            client = None
            try:
                client = Client(open_channel(self.address, self.tls), self.token)
                stream(client)
                backoff = self.min_backoff
                attempt = 0
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                self._inbox.put(status=self._describe(exc, backoff, attempt))
            except Exception as exc:  # bad address, TLS files: still a status, not a crash
                if self._stop.is_set():
                    return
                self._inbox.put(status=f"agent {self.address}: {exc}; retrying in {backoff:g}s")
            finally:
                if client is not None:
                    client.close()
            if self._stop.wait(backoff):  # no event tells when the agent is back: time
                return
            backoff = min(backoff * 2, self.max_backoff)

    def _describe(self, exc: Any, backoff: float, attempt: int) -> str:
        import grpc

        code = exc.code() if hasattr(exc, "code") else None
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return f"agent {self.address} refused: {exc.details()}; retrying in {backoff:g}s"
        return f"agent unreachable: {self.address}, retrying in {backoff:g}s (attempt {attempt})"

    def _track(self, call: Any) -> Any:
        with self._lock:
            self._calls.add(call)
        if self._stop.is_set():
            call.cancel()
        return call

    def _untrack(self, call: Any) -> None:
        with self._lock:
            self._calls.discard(call)

    def _stats(self, client: Any) -> None:
        from zonewatch.api.convert import stats_from_pb

        call = self._track(client.watch_stats())
        try:
            for msg in call:
                snapshot = [stats_from_pb(z) for z in msg.zones]
                self._inbox.put(snapshot=snapshot, status="")
        finally:
            self._untrack(call)

    def _alerts(self, client: Any) -> None:
        from zonewatch.api.convert import alert_from_pb

        call = self._track(client.subscribe(resume_after_seq=self._cursor))
        try:
            for msg in call:
                self._cursor = msg.cursor.seq
                kind = msg.WhichOneof("msg")
                if kind == "alert":
                    self._inbox.put(alerts=[alert_from_pb(msg.alert)])
                elif kind == "lost":
                    self._inbox.put(lost_alerts=int(msg.lost.count))
        finally:
            self._untrack(call)


# -- the agent in this process ----------------------------------------------------------------


class _StatusHandler(logging.Handler):
    """The agent's log lines as the status line: printed, they would tear the screen."""

    def __init__(self, inbox: _Inbox) -> None:
        super().__init__(level=logging.WARNING)
        self._inbox = inbox

    def emit(self, record: logging.LogRecord) -> None:
        self._inbox.put(status=f"agent: {record.getMessage()}")


class LocalFeed:
    """`zonewatch run --tui`: reads Agent.latest_stats and is one of the agent's sinks (it
    gets the alerts, and the events with --events)."""

    name = "tui"
    carries_events = True

    def __init__(self, latest_stats: Callable[[], Sequence[ZoneStats]]) -> None:
        self.source = "local agent"
        self._latest_stats = latest_stats
        self._last: Sequence[ZoneStats] | None = None
        self._inbox = _Inbox()
        self._finished = threading.Event()

    # the Sink protocol (exporters.base) -------------------------------------------------
    def export(self, records: Sequence[Any]) -> None:
        alerts = [r for r in records if isinstance(r, Alert)]
        events = [r for r in records if isinstance(r, EVENT_TYPES)]
        if alerts or events:
            self._inbox.put(alerts=alerts, events=events)

    def flush(self) -> None:
        return None

    def shutdown(self) -> None:
        return None  # the agent shuts its sinks down when it stops; the UI outlives that

    def log_handler(self) -> logging.Handler:
        """A logging handler whose records become the status line (warnings and up)."""
        return _StatusHandler(self._inbox)

    # Feed -------------------------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> Update:
        deadline = time.monotonic() + timeout
        while True:
            stats = self._latest_stats()
            if stats is not self._last and stats:
                self._last = stats  # the agent swaps in a new list each interval
                self._inbox.put(snapshot=list(stats))
            update = self._inbox.take(0)
            left = deadline - time.monotonic()
            if update or left <= 0 or self.finished:
                return update
            self._finished.wait(min(left, 0.05))  # the agent swaps a list; nothing to await

    def mark_finished(self) -> None:
        self._finished.set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def close(self) -> None:
        self._finished.set()


__all__ = [
    "Event",
    "Feed",
    "GrpcFeed",
    "LocalFeed",
    "ReplayFeed",
    "Update",
    "alert_from_json",
]
