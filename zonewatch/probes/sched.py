"""The sched channel's probe: bpf/sched.c on sched:* tracepoints, for zones' vCPU threads.

collect() reads the kernel maps into a cumulative SchedSnapshot: per zone, the run-delay
log2 histogram of its vCPU threads (woken or preempted -> running), with p50/p99, and its
CPU time (vCPU threads and the zone's other threads apart).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from zonewatch.model import Zone, vcpu_tids, zone_pids
from zonewatch.probes.base import LeavingZones, ZonePidFilter, sum_percpu
from zonewatch.probes.hist import Log2Hist
from zonewatch.probes.loader import load_program, tracepoint_defines, unload_program
from zonewatch.probes.maps import MapReader
from zonewatch.probes.records import CountLostSource, HistKind, SchedTotal

log = logging.getLogger(__name__)

# sched_switch and sched_process_exit are always there; the wake-ups are checked.
SCHED_WAKEUP_TRACEPOINTS = ("sched_wakeup", "sched_wakeup_new")

# Why a zone has no run delay (blind_spots): its vCPU threads are known by name, or once
# the kvm probe sees them run KVM_RUN; until then its CPU time counts as other threads'.
NO_VCPU_SEEN = "no vCPU thread seen yet"


@dataclass(slots=True)
class Total:
    count: int = 0  # waits, or on-CPU slices
    ns: int = 0

    def since(self, earlier: Total) -> Total:
        if self.count < earlier.count:  # reset: counts from zero
            return Total(self.count, self.ns)
        return Total(self.count - earlier.count, self.ns - earlier.ns)


@dataclass(slots=True)
class ZoneSched:
    """One zone's scheduling: cumulative as read, or a window after since()."""

    run_delay: Log2Hist = field(default_factory=Log2Hist)  # ns, vCPU threads
    run_delay_total: Total = field(default_factory=Total)
    vcpu_oncpu: Total = field(default_factory=Total)  # vCPU threads' CPU time
    other_oncpu: Total = field(default_factory=Total)  # the zone's other threads

    @property
    def cpu_ns(self) -> int:
        """All CPU time of the zone's processes."""
        return self.vcpu_oncpu.ns + self.other_oncpu.ns

    def run_delay_p50_ns(self) -> float | None:
        return self.run_delay.p50()

    def run_delay_p99_ns(self) -> float | None:
        return self.run_delay.p99()

    def run_delay_mean_ns(self) -> float | None:
        t = self.run_delay_total
        return t.ns / t.count if t.count else None

    def since(self, earlier: ZoneSched) -> ZoneSched:
        return ZoneSched(
            run_delay=self.run_delay.since(earlier.run_delay),
            run_delay_total=self.run_delay_total.since(earlier.run_delay_total),
            vcpu_oncpu=self.vcpu_oncpu.since(earlier.vcpu_oncpu),
            other_oncpu=self.other_oncpu.since(earlier.other_oncpu),
        )

    def to_json(self) -> dict[str, Any]:
        """The `sched` part of a zone's stats snapshot."""
        return {
            "run_delay_ns": self.run_delay.to_json(),
            "run_delay_total_ns": self.run_delay_total.ns,
            "vcpu_cpu_ns": self.vcpu_oncpu.ns,
            "other_cpu_ns": self.other_oncpu.ns,
        }


@dataclass(slots=True)
class SchedSnapshot:
    """Every zone's scheduling counters at one moment (CLOCK_MONOTONIC ns)."""

    ts_mono_ns: int
    zones: dict[int, ZoneSched] = field(default_factory=dict)

    def zone(self, key: int) -> ZoneSched:
        return self.zones.get(key) or ZoneSched()

    def since(self, earlier: SchedSnapshot) -> SchedSnapshot:
        return SchedSnapshot(
            ts_mono_ns=self.ts_mono_ns,
            zones={k: z.since(earlier.zone(k)) for k, z in self.zones.items()},
        )


class SchedProbe:
    """Loads bpf/sched.c; run delay and CPU time of zones, counted in kernel maps."""

    name = "sched"

    def __init__(self, *, max_counters: int = 16384) -> None:
        self._max_counters = max_counters
        self._bpf: Any = None
        self._pids: ZonePidFilter | None = None
        self._tids: ZonePidFilter | None = None
        self._maps = MapReader()
        self._zone_keys: set[int] = set()
        self._without_vcpus: set[int] = set()  # zone keys with no vCPU thread known
        self._leaving = LeavingZones()
        self.missing: list[str] = []

    def attach(self) -> None:
        cflags, self.missing = tracepoint_defines("sched", SCHED_WAKEUP_TRACEPOINTS)
        if self.missing:
            log.info(
                "sched probe: no tracepoint for %s; run delay only counts preemptions",
                ", ".join(self.missing),
            )
        cflags.append(f"-DZW_MAX_COUNTERS={self._max_counters}")
        self._bpf = load_program("sched.c", cflags)
        self._pids = ZonePidFilter(self._bpf[b"zone_pids"])
        self._tids = ZonePidFilter(self._bpf[b"zone_tids"])

    @property
    def bpf(self) -> Any:
        return self._bpf

    def set_zones(self, zones: Sequence[Zone]) -> None:
        assert self._pids is not None, "attach() first"
        assert self._tids is not None
        self._pids.sync(zone_pids(zones))
        self._tids.sync(vcpu_tids(zones))
        keys = {z.key for z in zones}
        gone = self._zone_keys - keys
        self._leaving.follow(self._zone_keys, keys)
        self._zone_keys = keys
        self._without_vcpus = {z.key for z in zones if not z.vcpu_tids}
        if gone:
            waiting = self._bpf[b"waiting"]
            self._maps.delete(
                waiting, [k for k, st in self._maps.items(waiting) if st.zone_key in gone]
            )

    def blind_spots(self) -> dict[int, str]:
        """Zones whose run delay is not measured (zone key -> why): no vCPU thread of
        theirs is known yet, so nothing tells which of their threads to time."""
        return dict.fromkeys(sorted(self._without_vcpus), NO_VCPU_SEEN)

    def ring_fds(self) -> list[int]:
        return []

    def poll(self, timeout_ms: int) -> list[Any]:
        """Nothing is sent per event on this channel; here for the Probe shape."""
        del timeout_ms
        return []

    def collect(self) -> SchedSnapshot:
        """Every zone's cumulative run delay and CPU time, read in batches.

        Zones that left the inventory since the last call appear one last time, then their
        entries are deleted (and the next call deletes what a switch already under way
        then added back: see LeavingZones).
        """
        assert self._bpf is not None, "attach() first"
        ts = time.monotonic_ns()
        retired, purged = self._leaving.next_collect()
        gone = retired | purged
        zones: dict[int, ZoneSched] = {}

        def zone(key: int) -> ZoneSched:
            z = zones.get(key)
            if z is None:
                z = zones[key] = ZoneSched()
            return z

        hist, totals = self._bpf[b"hist"], self._bpf[b"totals"]
        stale_hist: list[Any] = []
        stale_totals: list[Any] = []
        for k, v in self._maps.items(hist):
            if k.zone_key in gone:
                stale_hist.append(k)
                if k.zone_key in purged:
                    continue
            if k.kind == HistKind.RUN_DELAY:
                zone(k.zone_key).run_delay.add(k.slot, int(v))
        for k, v in self._maps.items(totals):
            if k.zone_key in gone:
                stale_totals.append(k)
                if k.zone_key in purged:
                    continue
            z = zone(k.zone_key)
            t = Total(v.count, v.total)
            if k.kind == SchedTotal.RUN_DELAY:
                z.run_delay_total = t
            elif k.kind == SchedTotal.VCPU_ONCPU:
                z.vcpu_oncpu = t
            elif k.kind == SchedTotal.OTHER_ONCPU:
                z.other_oncpu = t
        self._maps.delete(hist, stale_hist)
        self._maps.delete(totals, stale_totals)
        return SchedSnapshot(ts_mono_ns=ts, zones=zones)

    def lost(self) -> dict[str, int]:
        if self._bpf is None:
            return {}
        table = self._bpf[b"lost"]
        return {
            "sched.map_full": sum_percpu(table, CountLostSource.MAP_FULL),
            "sched.state_full": sum_percpu(table, CountLostSource.STATE_FULL),
        }

    def detach(self) -> None:
        if self._bpf is not None:
            unload_program(self._bpf)
            self._bpf = None
            self._pids = None
            self._tids = None
            self._zone_keys = set()
            self._without_vcpus = set()
            self._leaving.clear()
