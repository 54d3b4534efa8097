"""After the probes: attribute kernel records to zones and turn them into typed events.

File records name paths relative to directory fds of the backend process; the resolver
keeps each process's fd table from the opens it has seen (the kernel sends them in
order), falling back to /proc/PID/fd for fds opened before the agent started.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from zonewatch.model import FileEvent, KvmEvent, NetEvent, ProcEvent, Share, Zone, ZoneRef
from zonewatch.probes.net import net_event
from zonewatch.probes.proc import outside_share_event, proc_event
from zonewatch.probes.records import (
    FileOp,
    FileRecord,
    KvmOp,
    KvmRecord,
    NetRecord,
    ProcRecord,
    ZoneRecord,
)

# What attribution hands on: one typed event per record.
Event = FileEvent | KvmEvent | NetEvent | ProcEvent

AT_FDCWD = -100
AT_REMOVEDIR = 0x200
O_CREAT = 0o100
O_DIRECTORY = 0o200000
O_PATH = 0o10000000
VIRTFS_XATTR_OPS = {
    b"user.virtfs.mode": "chmod",
    b"user.virtfs.uid": "chown",
    b"user.virtfs.gid": "chown",
    b"user.virtfs.rdev": "mknod",
}
PATH_OPS = {
    FileOp.MKDIR: "mkdir",
    FileOp.RMDIR: "rmdir",
    FileOp.RENAME: "rename",
    FileOp.LINK: "link",
    FileOp.SYMLINK: "symlink",
    FileOp.CHMOD: "chmod",
    FileOp.CHOWN: "chown",
    FileOp.TRUNCATE: "truncate",
    FileOp.MKNOD: "mknod",
}
MAX_TRACKED_FDS = 65536
_NO_RET = frozenset({FileOp.CLOSE, FileOp.READ, FileOp.WRITE})  # their ret is not the event's
_OPEN, _CLOSE, _READ, _WRITE = FileOp.OPEN, FileOp.CLOSE, FileOp.READ, FileOp.WRITE
_UNLINK, _SETXATTR, _SYMLINK = FileOp.UNLINK, FileOp.SETXATTR, FileOp.SYMLINK
_RENAME, _LINK = FileOp.RENAME, FileOp.LINK


def text(raw: bytes) -> str:
    """Guest-chosen bytes as a str that survives every sink: invalid UTF-8 is escaped."""
    return raw.decode("utf-8", "backslashreplace")


class MonotonicClock:
    """Converts the kernel's CLOCK_MONOTONIC stamps to wall-clock ns since the epoch."""

    def __init__(self) -> None:
        self.offset = time.time_ns() - time.monotonic_ns()

    def wall(self, mono_ns: int) -> int:
        return mono_ns + self.offset


@dataclass(slots=True)
class PipelineStats:
    records: int = 0
    unattributed: int = 0  # the zone key named no zone known now or recently
    internal: int = 0  # records that only update state (directory opens inside shares)
    unknown: int = 0  # record types this pipeline has no builder for


class FdTable:
    """(pid, fd) -> host path, bounded, with /proc as the fallback.

    A process whose "/" is not the host's (Zone.process_roots: a jail, a virtiofsd pivoted
    into its share) names paths, and its fd links read, relative to its root: they are
    put under it where they enter (a link read, an absolute name), so every path kept and
    returned is a host path."""

    def __init__(self, proc: Path, limit: int = MAX_TRACKED_FDS) -> None:
        self._proc = proc
        self._paths: OrderedDict[tuple[int, int], str] = OrderedDict()
        self._limit = limit
        self.roots: dict[int, str] = {}  # pid -> the host directory its "/" is

    def remember(self, pid: int, fd: int, path: str) -> None:
        self._paths[(pid, fd)] = path
        self._paths.move_to_end((pid, fd))
        if len(self._paths) > self._limit:
            self._paths.popitem(last=False)

    def forget(self, pid: int, fd: int) -> str:
        return self._paths.pop((pid, fd), "") or self.lookup(pid, fd)

    def forget_pid(self, pid: int) -> None:
        for key in [k for k in self._paths if k[0] == pid]:
            del self._paths[key]
        self.roots.pop(pid, None)

    def set_roots(self, zone: Zone) -> None:
        """Take the roots of the zone's processes (a new Zone object from the inventory)."""
        for pid in zone.pids:
            root = zone.process_roots.get(pid)
            if root:
                self.roots[pid] = root
            else:
                self.roots.pop(pid, None)

    def _on_host(self, pid: int, path: str) -> str:
        """A path as `pid` names it (absolute, in its own root) as a host path."""
        root = self.roots.get(pid)
        if root is None or not path.startswith("/"):
            return path
        path = path if _clean(path) else posixpath.normpath(path)
        return root if path == "/" else root.rstrip("/") + path

    def lookup(self, pid: int, fd: int) -> str:
        known = self._paths.get((pid, fd))
        if known is not None:
            return known
        link = "cwd" if fd == AT_FDCWD else f"fd/{fd}"
        try:
            target = text(os.readlink(os.fsencode(self._proc / str(pid) / link)))
        except OSError:
            return ""
        return self._on_host(pid, target) if self.roots else target

    def resolve(self, pid: int, dirfd: int, path: bytes) -> str:
        name = text(path)
        if name.startswith("/proc/self/fd/"):
            # QEMU's 9p reaches files by /proc/self/fd/N/name for *xattr calls.
            fd_text, _, rest = name[len("/proc/self/fd/") :].partition("/")
            if fd_text.isdigit():
                base = self.lookup(pid, int(fd_text))
                return join_normal(base, rest) if base else name
        if name.startswith("/"):
            if self.roots and pid in self.roots:
                return self._on_host(pid, name)
            return name if _clean(name) else posixpath.normpath(name)
        base = self.lookup(pid, dirfd)
        if not base:
            return name
        return join_normal(base, name) if name else base


def _clean(path: str) -> bool:
    """normpath() would leave this path as it is: no empty, `.` or `..` component (a name
    starting with a dot is sent the long way too), no trailing slash."""
    return (
        "//" not in path
        and "/." not in path
        and not path.startswith(".")
        and (not path.endswith("/") or path == "/")
    )


def join_normal(base: str, name: str) -> str:
    """posixpath.normpath(posixpath.join(base, name)); when both are already clean (an
    absolute directory and a plain relative name, the usual case) the join is all there is
    to do, and normpath's ~3 us are saved."""
    if name and base.startswith("/") and _clean(base) and _clean(name) and name[0] != "/":
        return ("/" + name) if base == "/" else (base + "/" + name)
    return posixpath.normpath(posixpath.join(base, name))


class ZoneView:
    """What attribution needs of a zone for every record, made once per Zone object: its
    ZoneRef (events share it) and its shares' host roots. The inventory replaces a Zone
    when anything about it changes (dataclasses.replace), so a view is valid while its
    Zone object is the one the inventory hands out."""

    __slots__ = ("ref", "shares", "zone")

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.ref = zone.ref
        # (root, root + "/", tag, guest base): guest_view()'s test and join, precomputed.
        self.shares = tuple(
            (root, root + "/", s.tag, s.guest_path.rstrip("/"))
            for s in zone.shares
            for root in (s.host_path.rstrip("/"),)
        )

    def guest_view(self, host_path: str) -> tuple[str, str]:
        """guest_view(zone, host_path), from the precomputed roots."""
        for root, prefix, tag, base in self.shares:
            if host_path.startswith(prefix) or host_path == root:
                rel = host_path[len(root) :].lstrip("/")
                return tag, (f"{base}/{rel}" if rel else (base or "/"))
        return "", ""


MAX_VIEWS = 4096
MAX_COMMS = 4096


def guest_view(zone: Zone, host_path: str) -> tuple[str, str]:
    """(mount tag, path as the guest sees it) for a host path inside one of the zone's shares."""
    for share in zone.shares:
        root = share.host_path.rstrip("/")
        if host_path == root or host_path.startswith(root + "/"):
            rel = host_path[len(root) :].lstrip("/")
            return share.tag, _join_guest(share, rel)
    return "", ""


def _join_guest(share: Share, rel: str) -> str:
    base = share.guest_path.rstrip("/")
    return f"{base}/{rel}" if rel else (base or "/")


class FileEventBuilder:
    """FileRecord + its zone -> FileEvent (or None for records that only update state)."""

    def __init__(self, proc: Path = Path("/proc"), clock: MonotonicClock | None = None) -> None:
        self.fds = FdTable(proc)
        self.clock = clock or MonotonicClock()
        self.stats = PipelineStats()
        self._views: dict[int, ZoneView] = {}  # zone key -> the view of its current Zone
        self._comms: dict[bytes, str] = {}  # a backend's few thread names, decoded once

    def view(self, zone: Zone) -> ZoneView:
        """The zone's ZoneView (made anew when the inventory replaced the Zone)."""
        view = self._views.get(zone.key)
        if view is None or view.zone is not zone:
            if len(self._views) >= MAX_VIEWS:
                self._views.clear()
            view = self._views[zone.key] = ZoneView(zone)
            self.fds.set_roots(zone)
        return view

    def comm(self, raw: bytes) -> str:
        name = self._comms.get(raw)
        if name is None:
            if len(self._comms) >= MAX_COMMS:
                self._comms.clear()
            name = self._comms[raw] = text(raw)
        return name

    def build(self, rec: FileRecord, zone: Zone, view: ZoneView | None = None) -> FileEvent | None:
        if view is None:
            view = self.view(zone)
        pid, op = rec.pid, rec.op
        new_host = ""
        bytes_read = bytes_written = 0
        # Ops compared with module constants: FileOp.X is a metaclass lookup (~0.25 us).
        if op == _OPEN:
            host = self.fds.resolve(pid, rec.dirfd, rec.path)
            if rec.ret >= 0:
                self.fds.remember(pid, rec.ret, host)
            if rec.flags & (O_DIRECTORY | O_PATH) and view.guest_view(host)[0]:
                self.stats.internal += 1  # a 9p walk step: state only
                return None
            op_name = "create" if rec.flags & O_CREAT else "open"
        elif op == _CLOSE:
            host = self.fds.forget(pid, rec.dirfd)
            op_name = "close"
            bytes_read, bytes_written = rec.bytes_read, rec.bytes_written
        elif op == _READ:
            host = self.fds.lookup(pid, rec.dirfd)
            op_name = "read"
            bytes_read = rec.ret
        elif op == _WRITE:
            host = self.fds.lookup(pid, rec.dirfd)
            op_name = "write"
            bytes_written = rec.ret
        elif op == _UNLINK:
            host = self.fds.resolve(pid, rec.dirfd, rec.path)
            op_name = "rmdir" if rec.flags & AT_REMOVEDIR else "unlink"
        elif op == _SETXATTR:
            host = self.fds.resolve(pid, rec.dirfd, rec.path)
            op_name = VIRTFS_XATTR_OPS.get(rec.path2, "setxattr")
        elif op == _SYMLINK:
            # path is the link's target text; the new link is path2.
            host = self.fds.resolve(pid, rec.dirfd2, rec.path2)
            op_name = "symlink"
        else:
            host = self.fds.resolve(pid, rec.dirfd, rec.path)
            if op in (_RENAME, _LINK):
                new_host = self.fds.resolve(pid, rec.dirfd2, rec.path2)
            op_name = PATH_OPS[op]
        share, guest = view.guest_view(host)
        new_guest = view.guest_view(new_host)[1] if new_host else ""
        # Positional, in FileEvent's field order (the hot path: keywords cost more).
        return FileEvent(
            rec.ts_mono_ns + self.clock.offset,  # ts_ns: the wall clock
            view.ref,  # zone
            op_name,  # op
            guest,  # path
            host,  # host_path
            pid,  # pid
            rec.tid,  # tid
            self.comm(rec.comm),  # comm
            rec.ret if op not in _NO_RET else 0,  # ret
            new_guest,  # new_path
            new_host,  # new_host_path
            rec.flags if op == _OPEN else 0,  # flags
            rec.mode,  # mode
            bytes_read,  # bytes_read
            bytes_written,  # bytes_written
            share,  # share
        )


def kvm_event(
    rec: KvmRecord, zone: Zone, clock: MonotonicClock, ref: ZoneRef | None = None
) -> KvmEvent:
    return KvmEvent(
        ts_ns=clock.wall(rec.ts_mono_ns),
        zone=zone.ref if ref is None else ref,
        op=rec.op.name.lower(),
        pid=rec.pid,
        tid=rec.tid,
        comm=text(rec.comm),
        code=rec.code,
        args=rec.args[:1] if rec.op == KvmOp.MSR_WRITE else rec.args,
        faulted=rec.faulted,
    )


class Attribution:
    """Kernel records -> typed, zone-attributed events."""

    def __init__(self, zone_of: Callable[[int], Zone | None], proc: Path = Path("/proc")) -> None:
        self._zone_of = zone_of
        self.files = FileEventBuilder(proc)

    @property
    def stats(self) -> PipelineStats:
        return self.files.stats

    def process(self, records: Iterable[ZoneRecord]) -> list[Event]:
        events: list[Event] = []
        append = events.append
        files = self.files
        stats = files.stats
        zone_of, view_of, build = self._zone_of, files.view, files.build
        clock = files.clock
        n = 0
        for rec in records:
            n += 1
            zone = zone_of(rec.zone_key)
            if zone is None:
                stats.unattributed += 1
                continue
            view = view_of(zone)
            event: Event | None
            if isinstance(rec, FileRecord):
                event = build(rec, zone, view)
                # The proc channel's view of the same open: a host path outside the shares.
                if event is not None and not event.share:
                    outside = outside_share_event(event)
                    if outside is not None:
                        append(outside)
            elif isinstance(rec, NetRecord):
                event = net_event(rec, zone, clock.wall(rec.ts_mono_ns), view.ref)
            elif isinstance(rec, KvmRecord):
                event = kvm_event(rec, zone, clock, view.ref)
            elif isinstance(rec, ProcRecord):
                event = proc_event(rec, zone, clock.wall(rec.ts_mono_ns), ref=view.ref)
            else:
                stats.unknown += 1
                continue
            if event is not None:
                append(event)
        stats.records += n
        return events
