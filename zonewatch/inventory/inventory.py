"""Build and keep current the host's zone list.

A scan walks /proc once: every process is classified by its command line (cached per
pid, start time and comm, so an exec or a reused pid is classified again), VMMs become
zones, virtiofsd processes become helpers of the zone they serve, however they were started
(see `Inventory._with_helpers`). Kata zones get their pod's labels from the platform
(platform.CriBundles), and with them, by default, their tenant. A zone's vCPU threads are
those named as vCPUs plus those the kvm probe saw run KVM_RUN (observe_vcpu_threads): VMMs
that leave their threads unnamed (Kata's QEMU) have only these.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from zonewatch.inventory import procfs
from zonewatch.inventory.cmdline import (
    LABEL_KATA_SANDBOX,
    MAX_CONFIG_BYTES,
    VCPU_THREAD_PATTERN,
    VirtiofsdSpec,
    VmmSpec,
    kata_sandbox_id,
    parse_virtiofsd_cmdline,
    parse_vmm_cmdline,
    utf8_text,
)
from zonewatch.inventory.platform import CriBundles
from zonewatch.inventory.tenants import TenantMap
from zonewatch.model import Share, Zone, zone_pids

# How long a vanished zone stays resolvable by key, for records still in flight.
TOMBSTONE_SECONDS = 30.0
# A virtiofsd's own namespace and its starters' up to this far (itself, the shim, ...).
_ANCESTORS_LOOKED_AT = 4


@dataclass(slots=True, frozen=True)
class _Classified:
    identity: tuple[int, str]  # (start time, comm): changes on pid reuse and on exec
    vmm: VmmSpec | None
    virtiofsd: VirtiofsdSpec | None
    # A virtiofsd's vhost-user socket: from its argv, or the paths its sockets (the one it
    # inherited with --fd, or the connection it accepted there) are bound to.
    helper_sockets: tuple[str, ...] = ()
    # Its root directory as its own view tells (None: the host's), and where that is on
    # the host (None: the host's root, or not placeable). Read again each scan.
    root_mount: procfs.RootMount | None = None
    root: str | None = None


@dataclass(slots=True, frozen=True)
class _Helper:
    """A virtiofsd process of this scan."""

    pid: int
    ppid: int
    spec: VirtiofsdSpec
    sockets: tuple[str, ...]  # see _Classified.helper_sockets
    sandbox: str  # the Kata sandbox id its shared directory's path names; "" if none


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
        platform: CriBundles | None = None,
    ) -> None:
        self._tenants = tenants or TenantMap.empty()
        self._share_mounts = dict(share_mounts or {})
        self._proc = proc
        self._platform = platform if platform is not None else CriBundles()
        self._cache: dict[int, _Classified] = {}
        self._zones: dict[str, Zone] = {}
        self._by_key: dict[int, Zone] = {}
        self._tombstones: dict[int, tuple[float, Zone]] = {}
        self._observed_vcpus: dict[int, set[int]] = {}  # zone key -> tids seen in KVM_RUN
        self._next_key = 1
        self._scan_mounts: list[procfs.Mount] | None = None  # the agent's, this scan

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
        self._scan_mounts = None
        seen: dict[str, Zone] = {}
        helpers: list[_Helper] = []
        live_pids = procfs.list_pids(self._proc)
        for pid in live_pids:
            found = self._classify(pid)
            if found is None:
                continue
            classified, ppid = found
            if classified.virtiofsd is not None:
                sandbox = kata_sandbox_id(classified.virtiofsd.shared_dir)
                helpers.append(
                    _Helper(pid, ppid, classified.virtiofsd, classified.helper_sockets, sandbox)
                )
            if classified.vmm is not None:
                zone = self._zone_for(pid, classified.identity[0], classified.vmm)
                seen[zone.id] = zone
        for pid in self._cache.keys() - set(live_pids):
            del self._cache[pid]
        self._platform.forget({z.labels.get(LABEL_KATA_SANDBOX, "") for z in seen.values()})
        return self._apply(self._with_helpers(seen, helpers))

    def set_tenants(self, tenants: TenantMap) -> InventoryChange:
        """Use a new tenant map (a reloaded tenants file): every zone whose tenant changes
        is in the change's `updated`, for the probes and delivery to follow."""
        self._tenants = tenants
        change = InventoryChange()
        for zone_id, zone in self._zones.items():
            tenant = tenants.tenant_for(zone.name, zone.labels)
            if tenant != zone.tenant:
                moved = replace(zone, tenant=tenant)
                self._zones[zone_id] = self._by_key[zone.key] = moved
                change.updated.append(moved)
        return change

    def _classify(self, pid: int) -> tuple[_Classified, int] | None:
        """What the process is (cached per incarnation), and its parent now."""
        stat = procfs.read_stat(self._proc, pid)
        if stat is None:
            return None
        identity = (stat.start_time, stat.comm)
        cached = self._cache.get(pid)
        if cached is not None and cached.identity == identity:
            if cached.vmm or cached.virtiofsd:
                cached = self._with_root(pid, cached)
            return cached, stat.ppid
        classified = self._cache[pid] = self._recognise(pid, identity)
        if classified.vmm or classified.virtiofsd:
            classified = self._with_root(pid, classified)
        return classified, stat.ppid

    def _recognise(self, pid: int, identity: tuple[int, str]) -> _Classified:
        """A process incarnation seen for the first time: VMM, virtiofsd, or neither."""
        argv = procfs.read_cmdline(self._proc, pid)

        def read_file(path: str) -> bytes:  # as the process sees it: a jail's root, its cwd
            return procfs.read_file_in_root(self._proc, pid, path, MAX_CONFIG_BYTES)

        vmm = parse_vmm_cmdline(argv, read_file=read_file) if argv else None
        if vmm is not None and LABEL_KATA_SANDBOX not in vmm.labels:
            vmm = self._kata_jailed(pid, vmm)
        virtiofsd = parse_virtiofsd_cmdline(argv) if argv else None
        sockets: tuple[str, ...] = ()
        if virtiofsd is not None and virtiofsd.socket_path:
            sockets = (utf8_text(virtiofsd.socket_path),)
        elif virtiofsd is not None and virtiofsd.socket_fd >= 0:
            sockets = self._inherited_sockets(pid, virtiofsd.socket_fd)
        return _Classified(identity, vmm, virtiofsd, sockets)

    def _with_root(self, pid: int, classified: _Classified) -> _Classified:
        """The process's root as it is now: a virtiofsd seen before its VMM connected is at
        the host's root and pivots into its folder once it does; one that changes its root
        later must not stay placed under the old one (its paths would look like the
        share's). Two links and, for a process in a mount namespace of its own, its small
        mount table are read each scan; the agent's own table once a scan, when needed."""
        mount = procfs.root_mount(self._proc, pid)
        if mount == classified.root_mount:
            return classified
        root = procfs.host_dir(mount, self._reader_mounts()) if mount else None
        classified = replace(classified, root_mount=mount, root=root and utf8_text(root))
        self._cache[pid] = classified
        return classified

    def _reader_mounts(self) -> list[procfs.Mount]:
        """The agent's own mount table, read at most once a scan."""
        if self._scan_mounts is None:
            self._scan_mounts = procfs.mounts(self._proc / "self" / "mountinfo")
        return self._scan_mounts

    def _kata_jailed(self, pid: int, spec: VmmSpec) -> VmmSpec:
        """A VMM Kata runs in a jail (Firecracker under the jailer: chroot
        /run/vc/firecracker/<id>/root, and an argv whose paths are inside it) is known by
        its root directory: that names the sandbox."""
        root = procfs.root_dir(self._proc, pid)
        sandbox = kata_sandbox_id(root) if root and root != "/" else ""
        if not sandbox:
            return spec
        return replace(spec, name=sandbox, labels={**spec.labels, LABEL_KATA_SANDBOX: sandbox})

    def _inherited_sockets(self, pid: int, socket_fd: int) -> tuple[str, ...]:
        """Where a virtiofsd's sockets are bound, for one started with `--fd=N` (as Kata
        does): its fd N is the listening socket until the VMM connects; then the listener
        is closed and the accepted connection (at another fd) carries the same address.
        A socket is listed in the table of the namespace that made it, and virtiofsd
        unshares its own network namespace once connected: the tables of its ancestors'
        namespaces (its starter's) are read too."""
        inodes = procfs.socket_inodes(self._proc, pid, first=socket_fd)
        paths: dict[int, str] = {}
        tables_read: set[int] = set()  # namespaces (inodes) whose table was read
        candidate: int | None = pid
        for _ in range(_ANCESTORS_LOOKED_AT):
            if candidate is None or candidate <= 0 or len(paths) == len(inodes):
                break
            namespace = procfs.net_ns(self._proc, candidate)
            if namespace is None or namespace.inode not in tables_read:
                if namespace is not None:
                    tables_read.add(namespace.inode)
                left = [i for i in inodes if i not in paths]
                paths.update(procfs.unix_socket_paths(self._proc, candidate, left))
            stat = procfs.read_stat(self._proc, candidate)
            candidate = stat.ppid if stat is not None else None
        return tuple(utf8_text(paths[i]) for i in inodes if i in paths)

    def _zone_for(self, pid: int, start_time: int, spec: VmmSpec) -> Zone:
        zone_id = f"{spec.vmm}-{pid}-{start_time}"
        threads = procfs.thread_comms(self._proc, pid)
        existing = self._zones.get(zone_id)
        vcpus = self._vcpu_tids(existing.key if existing else None, threads)
        taps = tuple(
            sorted({utf8_text(t) for t in (*procfs.tap_names(self._proc, pid), *spec.tap_names)})
        )
        labels = {**self._platform.labels_for(spec.labels), **spec.labels}
        netns = procfs.net_ns(self._proc, pid)  # the taps' namespace (a Kata pod's own)
        if existing is not None:
            if labels != existing.labels:  # the platform wrote (or rewrote) the pod's labels
                tenant = self._tenants.tenant_for(existing.name, labels)
                existing = replace(existing, labels=labels, tenant=tenant)
            return replace(existing, vcpu_tids=vcpus, taps=taps, netns=netns)
        name = spec.name or f"{spec.vmm}-{pid}"
        zone = Zone(
            id=zone_id,
            key=self._next_key,
            name=name,
            tenant=self._tenants.tenant_for(name, labels),
            vmm=spec.vmm,
            pid=pid,
            start_time=start_time,
            vcpu_tids=vcpus,
            taps=taps,
            shares=self._spec_shares(spec),
            disks=tuple(utf8_text(d) for d in spec.disks),
            labels=labels,
            netns=netns,
        )
        self._next_key += 1
        return zone

    def _vmm_spec(self, zone: Zone) -> VmmSpec | None:
        classified = self._cache.get(zone.pid)
        return classified.vmm if classified else None

    def _spec_shares(self, spec: VmmSpec) -> tuple[Share, ...]:
        return tuple(self._guest_mounted(_utf8_share(s)) for s in spec.shares)

    def _guest_mounted(self, share: Share) -> Share:
        mount = self._share_mounts.get(share.tag)
        return replace(share, guest_path=mount) if mount else share

    def _with_helpers(self, zones: dict[str, Zone], helpers: list[_Helper]) -> dict[str, Zone]:
        """Each zone with the virtiofsd processes acting for it and the folders they share.

        A virtiofsd belongs to the zone whose VMM names its vhost-user socket (the socket
        on the virtiofsd's argv, or the path its inherited `--fd` socket is bound to), else
        to the Kata zone whose sandbox id its shared directory names
        (/run/kata-containers/shared/sandboxes/<id>/shared), else to the zone of the
        virtiofsd that forked it: QEMU's C virtiofsd forks a child, in namespaces of its
        own, that does the file work; both are the zone's.
        """
        by_socket: dict[str, str] = {}
        by_sandbox: dict[str, str] = {}
        for zone in zones.values():
            spec = self._vmm_spec(zone)
            for socket in spec.vhost_user_sockets if spec else ():
                by_socket.setdefault(utf8_text(socket), zone.id)
            sandbox = zone.labels.get(LABEL_KATA_SANDBOX)
            if sandbox:
                by_sandbox.setdefault(sandbox, zone.id)
        owner: dict[int, str] = {}
        for helper in helpers:
            zone_id = next((by_socket[s] for s in helper.sockets if s in by_socket), None)
            if zone_id is None and helper.sandbox:
                zone_id = by_sandbox.get(helper.sandbox)
            if zone_id is not None:
                owner[helper.pid] = zone_id
        adopted = True
        while adopted:  # parentage, over any depth of forks (each pass adopts one or stops)
            adopted = False
            for helper in helpers:
                if helper.pid not in owner and helper.ppid in owner:
                    owner[helper.pid] = owner[helper.ppid]
                    adopted = True
        out: dict[str, Zone] = {}
        for zone_id, zone in zones.items():
            mine = sorted((h for h in helpers if owner.get(h.pid) == zone_id), key=lambda h: h.pid)
            out[zone_id] = self._helped(zone, mine)
        return out

    def _helped(self, zone: Zone, helpers: list[_Helper]) -> Zone:
        """The zone with these helpers' pids, its virtio-fs shares' host paths filled in from
        them (a share the command line does not name is added under the helper's tag)."""
        spec = self._vmm_spec(zone)
        shares = list(self._spec_shares(spec)) if spec else []
        for helper in helpers:
            host_path = utf8_text(helper.spec.shared_dir)
            if not host_path or any(s.host_path == host_path for s in shares):
                continue  # the parent and its child share one folder
            for i, share in enumerate(shares):
                if share.backend == "virtiofs" and not share.host_path:
                    shares[i] = replace(share, host_path=host_path)
                    break
            else:
                tag = helper.spec.tag or f"virtiofs-{helper.pid}"
                share = Share(tag, helper.spec.shared_dir, "virtiofs")
                shares.append(self._guest_mounted(_utf8_share(share)))
        pids = (zone.pid, *(h.pid for h in helpers))
        roots = {pid: c.root for pid in pids if (c := self._cache.get(pid)) and c.root}
        return replace(
            zone,
            helper_pids=tuple(h.pid for h in helpers),
            shares=tuple(shares),
            process_roots=roots,
        )

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
