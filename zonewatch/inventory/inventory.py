"""Build and keep current the host's zone list.

A scan walks /proc once: every process is classified by its command line (cached per
pid, start time and comm, so an exec or a reused pid is classified again), VMMs become
zones, virtiofsd processes become helpers of the zone whose vhost-user socket they serve.
A zone's vCPU threads are those named as vCPUs plus those the kvm probe saw run KVM_RUN
(observe_vcpu_threads): VMMs that leave their threads unnamed (Kata's QEMU) have only these.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from zonewatch.inventory import procfs
from zonewatch.inventory.cmdline import (
    VCPU_THREAD_PATTERN,
    VirtiofsdSpec,
    VmmSpec,
    parse_virtiofsd_cmdline,
    parse_vmm_cmdline,
    utf8_text,
)
from zonewatch.inventory.tenants import TenantMap
from zonewatch.model import Share, Zone, zone_pids

# How long a vanished zone stays resolvable by key, for records still in flight.
TOMBSTONE_SECONDS = 30.0


@dataclass(slots=True, frozen=True)
class _Classified:
    identity: tuple[int, str]  # (start time, comm): changes on pid reuse and on exec
    vmm: VmmSpec | None
    virtiofsd: VirtiofsdSpec | None


@dataclass(slots=True)
class InventoryChange:
    added: list[Zone] = field(default_factory=list)
    removed: list[Zone] = field(default_factory=list)
    updated: list[Zone] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.updated)


class Inventory:
    def __init__(
        self,
        tenants: TenantMap | None = None,
        share_mounts: Mapping[str, str] | None = None,
        proc: Path = Path("/proc"),
    ) -> None:
        self._tenants = tenants or TenantMap.empty()
        self._share_mounts = dict(share_mounts or {})
        self._proc = proc
        self._cache: dict[int, _Classified] = {}
        self._zones: dict[str, Zone] = {}
        self._by_key: dict[int, Zone] = {}
        self._tombstones: dict[int, tuple[float, Zone]] = {}
        self._observed_vcpus: dict[int, set[int]] = {}  # zone key -> tids seen in KVM_RUN
        self._next_key = 1

    @property
    def zones(self) -> dict[str, Zone]:
        return dict(self._zones)

    def by_key(self, key: int) -> Zone | None:
        """The zone a kernel record names, including one that vanished moments ago."""
        zone = self._by_key.get(key)
        if zone is None and key in self._tombstones:
            zone = self._tombstones[key][1]
        return zone

    def observe_vcpu_threads(self, threads: Mapping[int, int]) -> None:
        """The threads seen running KVM_RUN now (tid -> zone key, from the kvm probe), in
        place of the last ones: each joins its zone's vcpu_tids at the next refresh(), if
        it is a live thread of the zone's VMM then. A thread that exited is gone from the
        kernel's view and from the VMM's task list, so its tid, if reused, starts over."""
        observed: dict[int, set[int]] = {}
        for tid, key in threads.items():
            observed.setdefault(key, set()).add(tid)
        self._observed_vcpus = observed

    def _vcpu_tids(self, zone_key: int | None, threads: Mapping[int, str]) -> tuple[int, ...]:
        """A zone's vCPU threads among its VMM's live `threads` (tid -> comm): named as
        vCPUs, or seen running KVM_RUN."""
        named = {t for t, comm in threads.items() if VCPU_THREAD_PATTERN.match(comm)}
        seen = self._observed_vcpus.get(zone_key, set()) if zone_key is not None else set()
        return tuple(sorted(named | (seen & threads.keys())))

    def zone_pids(self) -> dict[int, int]:
        """Every process acting for a zone -> the zone's key: the kernel filter's content."""
        return zone_pids(list(self._zones.values()))

    def refresh(self) -> InventoryChange:
        seen: dict[str, Zone] = {}
        helpers: list[tuple[int, VirtiofsdSpec]] = []
        live_pids = procfs.list_pids(self._proc)
        for pid in live_pids:
            classified = self._classify(pid)
            if classified is None:
                continue
            if classified.virtiofsd is not None:
                helpers.append((pid, classified.virtiofsd))
            if classified.vmm is not None:
                zone = self._zone_for(pid, classified.identity[0], classified.vmm)
                seen[zone.id] = zone
        for pid in self._cache.keys() - set(live_pids):
            del self._cache[pid]
        for zone_id, zone in list(seen.items()):
            seen[zone_id] = self._with_helpers(zone, helpers)
        return self._apply(seen)

    def _classify(self, pid: int) -> _Classified | None:
        stat = procfs.read_stat(self._proc, pid)
        if stat is None:
            return None
        identity = (stat.start_time, stat.comm)
        cached = self._cache.get(pid)
        if cached is not None and cached.identity == identity:
            return cached
        argv = procfs.read_cmdline(self._proc, pid)
        classified = _Classified(
            identity,
            parse_vmm_cmdline(argv, read_file=_read_small_file) if argv else None,
            parse_virtiofsd_cmdline(argv) if argv else None,
        )
        self._cache[pid] = classified
        return classified

    def _zone_for(self, pid: int, start_time: int, spec: VmmSpec) -> Zone:
        zone_id = f"{spec.vmm}-{pid}-{start_time}"
        threads = procfs.thread_comms(self._proc, pid)
        existing = self._zones.get(zone_id)
        vcpus = self._vcpu_tids(existing.key if existing else None, threads)
        taps = tuple(
            sorted({utf8_text(t) for t in (*procfs.tap_names(self._proc, pid), *spec.tap_names)})
        )
        netns = procfs.net_ns(self._proc, pid)  # the taps' namespace (a Kata pod's own)
        if existing is not None:
            return replace(existing, vcpu_tids=vcpus, taps=taps, netns=netns)
        name = spec.name or f"{spec.vmm}-{pid}"
        zone = Zone(
            id=zone_id,
            key=self._next_key,
            name=name,
            tenant=self._tenants.tenant_for(name, spec.labels),
            vmm=spec.vmm,
            pid=pid,
            start_time=start_time,
            vcpu_tids=vcpus,
            taps=taps,
            shares=tuple(self._guest_mounted(_utf8_share(s)) for s in spec.shares),
            disks=tuple(utf8_text(d) for d in spec.disks),
            labels=dict(spec.labels),
            netns=netns,
        )
        self._next_key += 1
        return zone

    def _guest_mounted(self, share: Share) -> Share:
        mount = self._share_mounts.get(share.tag)
        return replace(share, guest_path=mount) if mount else share

    def _with_helpers(self, zone: Zone, helpers: list[tuple[int, VirtiofsdSpec]]) -> Zone:
        """Attach virtiofsd processes serving this zone's vhost-user sockets."""
        classified = self._cache.get(zone.pid)
        sockets = set(classified.vmm.vhost_user_sockets) if classified and classified.vmm else set()
        if not sockets:
            return zone
        helper_pids: list[int] = []
        shares = list(zone.shares)
        for pid, spec in helpers:
            if spec.socket_path not in sockets:
                continue
            helper_pids.append(pid)
            for i, share in enumerate(shares):
                if share.backend == "virtiofs" and not share.host_path:
                    shares[i] = replace(share, host_path=utf8_text(spec.shared_dir))
                    break
            else:
                tag = spec.tag or f"virtiofs-{pid}"
                share = Share(tag, spec.shared_dir, "virtiofs")
                shares.append(self._guest_mounted(_utf8_share(share)))
        return replace(zone, helper_pids=tuple(sorted(helper_pids)), shares=tuple(shares))

    def _apply(self, seen: dict[str, Zone]) -> InventoryChange:
        change = InventoryChange()
        now = time.monotonic()
        for zone_id, zone in self._zones.items():
            if zone_id not in seen:
                change.removed.append(zone)
                self._tombstones[zone.key] = (now, zone)
                del self._by_key[zone.key]
        for zone_id, zone in seen.items():
            old = self._zones.get(zone_id)
            if old is None:
                change.added.append(zone)
            elif old != zone:
                change.updated.append(zone)
            self._by_key[zone.key] = zone
        self._zones = seen
        for key, (since, _zone) in list(self._tombstones.items()):
            if now - since > TOMBSTONE_SECONDS:
                del self._tombstones[key]
        return change


def _utf8_share(share: Share) -> Share:
    """A share whose strings are valid UTF-8 (argv may hold any bytes): what reaches JSON,
    gRPC and the path matching, where file paths are decoded the same way."""
    return replace(share, tag=utf8_text(share.tag), host_path=utf8_text(share.host_path))


def _read_small_file(path: str) -> bytes:
    """Read a VMM's config file named on its command line (bounded: it is not ours)."""
    with open(path, "rb") as f:
        return f.read(1 << 20)
