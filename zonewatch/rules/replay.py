"""Replay a recording (JSON lines of events, stats and lost counts, as `zonewatch record`
or `zonewatch run --events --jsonl` wrote them) through the rules."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import orjson

from zonewatch.errors import ConfigError
from zonewatch.model import Alert, Lost, ZoneStats, record_from_json
from zonewatch.rules.engine import RuleEngine

BATCH = 1024


@dataclass(slots=True)
class ReplayCounters:
    lines: int = 0
    records: int = 0
    skipped: int = 0  # alert lines and types replay has no use for
    alerts: int = 0


def read_records(
    lines: Iterable[bytes], name: str, counters: ReplayCounters | None = None
) -> Iterator[Any]:
    """Records from JSON lines; a malformed line is an error naming file:line."""
    counters = counters or ReplayCounters()
    for number, line in enumerate(lines, 1):
        counters.lines += 1
        if not line.strip():
            continue
        try:
            record = record_from_json(orjson.loads(line))
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{name}:{number}", f"not a recorded line: {exc}") from None
        if record is None:
            counters.skipped += 1
            continue
        counters.records += 1
        yield record


def replay(
    engine: RuleEngine,
    stream: IO[bytes],
    name: str,
    emit: Callable[[Sequence[Alert]], None],
    speed: float | None = None,
) -> ReplayCounters:
    """Run a recording through `engine`; `speed` None: as fast as possible, else the
    recording's own pace times `speed`. Alerts go to `emit` as they happen."""
    counters = ReplayCounters()
    batch: list[Any] = []
    first_ts: int | None = None
    started = time.monotonic()
    last_ts = 0

    def run_batch() -> None:
        if batch:
            out = engine.process(batch)
            batch.clear()
            out += engine.tick(last_ts)
            counters.alerts += len(out)
            if out:
                emit(out)

    for record in read_records(stream, name, counters):
        ts = record.ts_ns
        if speed is not None:
            if first_ts is None:
                first_ts = ts
            due = started + (ts - first_ts) / 1e9 / speed
            delay = due - time.monotonic()
            if delay > 0.001:
                run_batch()
                time.sleep(delay)
        last_ts = max(last_ts, ts)
        if isinstance(record, ZoneStats):
            run_batch()
            out = engine.process_stats([record])
            counters.alerts += len(out)
            if out:
                emit(out)
        elif isinstance(record, Lost):
            run_batch()
            engine.note_lost(record.source, record.count, record.ts_ns)
        else:
            batch.append(record)
            if len(batch) >= BATCH:
                run_batch()
    run_batch()
    out = engine.tick(last_ts) + engine.flush()
    counters.alerts += len(out)
    if out:
        emit(out)
    return counters
