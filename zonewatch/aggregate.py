"""Per-zone windows: the counting probes' kernel maps and the event stream, turned into one
ZoneStats per zone each interval (the `stats` lines, the UI rows, the metrics, the windowed
rules all read these).

Counting probes (kvm, sched, net) keep cumulative counters in kernel maps; each interval
the aggregator reads them once (`collect()`), subtracts the previous reading and turns the
difference into rates. Event-based counts (file operations) are tallied as events pass.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from zonewatch.model import Zone, ZoneStats
from zonewatch.probes.base import Probe
from zonewatch.probes.kvm_stats import KvmSnapshot, ZoneKvm
from zonewatch.probes.net import fill_net
from zonewatch.probes.records import KvmCounter
from zonewatch.probes.sched import SchedSnapshot, ZoneSched

NS_PER_US = 1_000
TOP_KEYS = 8  # detail maps (ports, pages) keep the busiest few: bounded whatever the guest does


class Snapshot(Protocol):
    """Cumulative per-zone counters at one moment (CLOCK_MONOTONIC ns)."""

    ts_mono_ns: int

    def since(self, earlier: Any) -> Any: ...
    def zone(self, key: int) -> Any: ...


class CountingProbe(Protocol):
    name: str

    def collect(self) -> Any: ...


Filler = Callable[[ZoneStats, Any, float], None]


def fill_kvm(stats: ZoneStats, window: ZoneKvm, seconds: float) -> None:
    stats.exits_per_s = window.exits_total / seconds
    stats.exits_by_reason = {r: n / seconds for r, n in window.exits_by_reason().items()}
    if not stats.exits_by_reason:
        # Hosts where kvm_exit does not fire (PVM, see environment.md) still see every
        # return to the VMM: those are the exits the zone caused that we can count.
        stats.exits_by_reason = {
            r: n / seconds for r, n in window.userspace_exits_by_reason().items()
        }
        stats.exits_per_s = window.userspace_exits_total / seconds
    stats.userspace_exits_per_s = window.userspace_exits_total / seconds
    stats.pio_per_s = window.pio_total / seconds
    stats.mmio_per_s = window.mmio_total / seconds
    stats.hypercalls_per_s = sum(window.counter(KvmCounter.HYPERCALL).values()) / seconds
    stats.msr_writes_per_s = sum(window.counter(KvmCounter.MSR_WRITE).values()) / seconds
    stats.pio_ports = _top({k.name: c.count / seconds for k, c in window.pio.items()})
    stats.mmio_pages = _top({k.name: c.count / seconds for k, c in window.mmio.items()})
    stats.exit_latency_p50_us = _us(window.exit_latency.p50())
    stats.exit_latency_p99_us = _us(window.exit_latency.p99())
    stats.exit_latency_hist_ns = window.exit_latency.by_lower_bound()
    stats.vmm_latency_p50_us = _us(window.userspace_latency.p50())
    stats.vmm_latency_p99_us = _us(window.userspace_latency.p99())
    stats.vmm_latency_hist_ns = window.userspace_latency.by_lower_bound()


def fill_sched(stats: ZoneStats, window: ZoneSched, seconds: float) -> None:
    stats.run_delay_p50_us = _us(window.run_delay_p50_ns())
    stats.run_delay_p99_us = _us(window.run_delay_p99_ns())
    stats.run_delay_hist_ns = window.run_delay.by_lower_bound()
    stats.run_delay_pct = 100.0 * window.run_delay_total.ns / (seconds * 1e9)
    stats.cpu_pct = 100.0 * window.cpu_ns / (seconds * 1e9)


def _us(ns: float | None) -> float:
    return (ns or 0.0) / NS_PER_US


def _top(rates: dict[str, float]) -> dict[str, float]:
    if len(rates) <= TOP_KEYS:
        return rates
    return dict(sorted(rates.items(), key=lambda kv: kv[1], reverse=True)[:TOP_KEYS])


# How each counting probe's window lands in ZoneStats, by probe name.
FILLERS: dict[str, Filler] = {"kvm": fill_kvm, "sched": fill_sched, "net": fill_net}


@dataclass(slots=True)
class _Source:
    probe: CountingProbe
    fill: Filler
    last: Any = None


class Aggregator:
    """Call `count_events` as events pass and `snapshot(zones)` once per interval."""

    def __init__(self, probes: Iterable[Probe]) -> None:
        self._sources = [
            _Source(cast(CountingProbe, p), FILLERS[p.name]) for p in probes if p.name in FILLERS
        ]
        for source in self._sources:
            source.last = source.probe.collect()
        self._file_ops: Counter[str] = Counter()
        self._last_mono_ns = time.monotonic_ns()

    def count_events(self, events: Sequence[Any]) -> None:
        """Tally event-based rates (file operations) by zone id."""
        for event in events:
            if event.channel == "file":
                self._file_ops[event.zone.id] += 1

    def snapshot(self, zones: Sequence[Zone]) -> list[ZoneStats]:
        now_mono = time.monotonic_ns()
        seconds = max((now_mono - self._last_mono_ns) / 1e9, 1e-3)
        self._last_mono_ns = now_mono
        now_wall = time.time_ns()
        out = {
            z.key: ZoneStats(
                ts_ns=now_wall,
                zone=z.ref,
                interval_s=round(seconds, 3),
                vcpus=len(z.vcpu_tids),
                file_ops_per_s=self._file_ops.pop(z.id, 0) / seconds,
            )
            for z in zones
        }
        self._file_ops.clear()  # counts of zones that are gone
        for source in self._sources:
            current: Snapshot = source.probe.collect()
            window = current.since(source.last)
            source.last = current
            for key, stats in out.items():
                source.fill(stats, window.zone(key), seconds)
        return list(out.values())


__all__ = ["FILLERS", "Aggregator", "KvmSnapshot", "SchedSnapshot", "fill_kvm", "fill_sched"]
