"""What every live probe offers the agent: attach, follow the zone filter, poll, count loss."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from zonewatch.model import Zone
from zonewatch.probes.records import ZoneRecord


class Probe(Protocol):
    name: str

    def attach(self) -> None: ...
    def set_zones(self, zones: Sequence[Zone]) -> None:
        """Make the kernel filter match these zones (called on every inventory change)."""

    def ring_fds(self) -> list[int]:
        """The probe's ring-buffer map fds: readable (epoll) when records wait."""

    def poll(self, timeout_ms: int) -> Sequence[ZoneRecord]:
        """Records decoded from the probe's ring buffer (pipeline.Attribution knows them)."""

    def lost(self) -> dict[str, int]: ...
    def detach(self) -> None: ...


class ZonePidFilter:
    """Keeps a BPF hash of id (tgid or tid) -> zone key equal to the inventory's view, by diff."""

    def __init__(self, table: Any) -> None:
        self._table = table
        self._current: dict[int, int] = {}

    def leaving(self, pids: Mapping[int, int]) -> set[int]:
        """The ids a sync(pids) takes from their zone: gone, or now another zone's (a
        reused pid)."""
        return {pid for pid, key in self._current.items() if pids.get(pid) != key}

    def sync(self, pids: Mapping[int, int]) -> None:
        for pid in self._current.keys() - pids.keys():
            # The kernel may have dropped it already, when the process exited.
            with contextlib.suppress(KeyError):
                del self._table[self._table.Key(pid)]
        for pid, key in pids.items():
            if self._current.get(pid) != key:
                self._table[self._table.Key(pid)] = self._table.Leaf(key)
        self._current = dict(pids)


class LeavingZones:
    """Zones that left the inventory, through the two collects that purge their entries.

    The first collect after a zone leaves reports its entries one last time, then deletes
    them. The next one deletes, without reporting, what a BPF program already running for
    the zone at that moment added back (the kernel filter no longer matches it, so nothing
    more comes). A zone that returns is live again at once."""

    def __init__(self) -> None:
        self._retired: set[int] = set()  # left since the last collect
        self._purged: set[int] = set()  # deleted by the last collect

    def follow(self, before: set[int], now: set[int]) -> None:
        """The inventory went from zone keys `before` to `now`."""
        self._retired = (self._retired | (before - now)) - now
        self._purged -= now

    def next_collect(self) -> tuple[set[int], set[int]]:
        """(zones to report once more, then delete; zones to delete unreported)."""
        retired, self._retired = self._retired, set()
        purged, self._purged = self._purged, retired
        return retired, purged

    def clear(self) -> None:
        self._retired, self._purged = set(), set()


def sum_percpu(table: Any, index: int) -> int:
    """The total of one slot of a BPF per-CPU array."""
    return int(sum(table[ctypes.c_int(index)]))
