"""An event storm beyond the agent's capacity: a micro-VMM zone whose file backend writes
tens of thousands of files a second (3 file-channel records each) while `zonewatch run
--events` writes every event as a JSON line. The loss is counted (per channel, the same in
the `lost` lines and in /metrics, and events + loss account for what the zone did), the
agent answers gRPC within a bound all along, and once the storm ends it catches up: a new
zone's file events are delivered promptly."""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.helpers.agent import Line
from tests.resilience.support import Agent, events_of
from zonewatch.lab.microvm import MicroVmProcess

STORM_S = 6.0
FILE_OPS = 50  # files the backend writes per guest port write
RESPONSIVE_S = 2.0  # the slowest gRPC answer allowed during the storm
CATCH_UP_S = 2.0  # from a file write after the storm to its JSON line
OWN_RECORDS = 10_000  # the micro-VMM's own file records: imports, stats file


@pytest.fixture
def agent(tmp_path: Path, tokens_file: Path) -> Iterator[Agent]:
    a = Agent(tmp_path, tokens_file, "--events")
    try:
        yield a
    finally:
        a.stop()


def lost_by_source(lines: list[Line]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in lines:
        if x["type"] == "lost":
            out[x["source"]] = out.get(x["source"], 0) + x["count"]
    return out


def ts_s(line: Line) -> float:
    """An event's RFC 3339 ns timestamp as epoch seconds."""
    return datetime.fromisoformat(line["ts"][:26] + "+00:00").timestamp()


def wait_listed(agent: Agent, name: str) -> None:
    deadline = time.monotonic() + 20
    while name not in agent.timed_list_zones()[1]:
        assert time.monotonic() < deadline, f"{name} never listed"
        time.sleep(0.05)  # the agent's scan cadence: nothing to await


def probe_during_storm(agent: Agent, seconds: float) -> tuple[list[float], set[str]]:
    """gRPC ListZones and health, one after the other, for `seconds`: their latencies and
    every zone name ListZones answered."""
    latencies: list[float] = []
    names: set[str] = set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        dt, zones = agent.timed_list_zones()
        latencies += [dt, agent.timed_health()]
        names |= set(zones)
        time.sleep(0.05)  # the prober's pace, not a wait for anything
    return latencies, names


def test_storm_loss_is_counted_agent_answers_and_catches_up(agent: Agent, tmp_path: Path) -> None:
    (tmp_path / "storm").mkdir()
    (tmp_path / "after").mkdir()
    rss_before = agent.rss_mib()
    with MicroVmProcess("storm", rate=0, file_dir=tmp_path / "storm", file_ops=FILE_OPS) as vm:
        # Held until the agent has the zone in its kernel filters: then every record the
        # storm makes is either delivered or counted, and the sum can be checked.
        os.kill(vm.pid, signal.SIGSTOP)
        wait_listed(agent, "storm")
        os.kill(vm.pid, signal.SIGCONT)
        storm_from = time.time()
        latencies, names = probe_during_storm(agent, STORM_S)
        storm_to = time.time()
        rss_storm = agent.rss_mib()
    files = vm.final_stats["exits"]["io"] * FILE_OPS  # type: ignore[index]
    assert "storm" in names
    assert max(latencies) < RESPONSIVE_S, latencies

    # Counted: every lost line adds up to /metrics' counter (the loss report is each second).
    def settled(lines: list[Line]) -> bool:
        lost = lost_by_source(lines)
        scraped = agent.scrape()
        return bool(lost) and all(
            scraped.get(f"zonewatch_events_lost_total{{source={s}}}") == n for s, n in lost.items()
        )

    agent.wait_for(settled, 10, "lost lines equal to /metrics")
    lost = lost_by_source(agent.lines)
    file_lost = sum(n for s, n in lost.items() if s.startswith("file."))
    received = len(events_of(agent.lines, "storm"))
    assert file_lost > 0, lost  # the storm was beyond capacity, and that was said
    # ... as it happened: the agent's loop kept its one-second loss report going.
    reports = sorted(ts_s(x) for x in agent.lines if x["type"] == "lost")
    during = [t for t in reports if storm_from + 1 < t < storm_to]
    assert len(during) >= STORM_S - 3, (storm_from, storm_to, reports)
    # Events and loss account for what the zone did: 3 records a file, plus the VMM's own
    # start (Python's imports) and its stats file.
    assert 3 * files <= received + file_lost <= 3 * files + OWN_RECORDS

    # Catches up: a zone started after the storm has its file events delivered promptly.
    with MicroVmProcess("after", rate=20, file_dir=tmp_path / "after") as after:
        agent.wait_for(lambda lines: len(events_of(lines, "after")) >= 30, 10, "after's events")
        seen = time.time()
        after_events = events_of(agent.lines, "after")
    delays = [seen - ts_s(x) for x in after_events[-10:]]
    assert max(delays) < CATCH_UP_S, delays
    assert after.final_stats is not None and agent.proc.poll() is None
    print(
        f"storm: {files} files in {vm.final_stats['elapsed_s']:.1f} s "  # type: ignore[index]
        f"({3 * files} records); delivered {received}, counted lost {lost} in "
        f"{len(during)} reports during the storm; "
        f"gRPC latency p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms over {len(latencies)} calls; "
        f"RSS {rss_before:.0f} -> {rss_storm:.0f} MiB; "
        f"after the storm, newest events {max(delays) * 1000:.0f} ms old when read"
    )
