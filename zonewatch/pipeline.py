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

from zonewatch.model import FileEvent, KvmEvent, NetEvent, ProcEvent, Share, Zone
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


def text(raw: bytes) -> str:
    """Guest-chosen bytes as a str that survives every sink: invalid UTF-8 is escaped."""
    return raw.decode("utf-8", "backslashreplace")


class MonotonicClock:
    """Converts the kernel's CLOCK_MONOTONIC stamps to wall-clock ns since the epoch."""

    def __init__(self) -> None:
        self._offset = time.time_ns() - time.monotonic_ns()

    def wall(self, mono_ns: int) -> int:
        return mono_ns + self._offset


@dataclass(slots=True)
class PipelineStats:
    records: int = 0
    unattributed: int = 0  # the zone key named no zone known now or recently
    internal: int = 0  # records that only update state (directory opens inside shares)
    unknown: int = 0  # record types this pipeline has no builder for


class FdTable:
    """(pid, fd) -> host path, bounded, with /proc as the fallback."""

    def __init__(self, proc: Path, limit: int = MAX_TRACKED_FDS) -> None:
        self._proc = proc
        self._paths: OrderedDict[tuple[int, int], str] = OrderedDict()
        self._limit = limit

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

    def lookup(self, pid: int, fd: int) -> str:
        known = self._paths.get((pid, fd))
        if known is not None:
            return known
        link = "cwd" if fd == AT_FDCWD else f"fd/{fd}"
        try:
            return text(os.readlink(os.fsencode(self._proc / str(pid) / link)))
        except OSError:
            return ""

    def resolve(self, pid: int, dirfd: int, path: bytes) -> str:
        name = text(path)
        if name.startswith("/proc/self/fd/"):
            # QEMU's 9p reaches files by /proc/self/fd/N/name for *xattr calls.
            fd_text, _, rest = name[len("/proc/self/fd/") :].partition("/")
            if fd_text.isdigit():
                base = self.lookup(pid, int(fd_text))
                return posixpath.normpath(posixpath.join(base, rest)) if base else name
        if name.startswith("/"):
            return posixpath.normpath(name)
        base = self.lookup(pid, dirfd)
        if not base:
            return name
        return posixpath.normpath(posixpath.join(base, name)) if name else base


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


def _inside_shares(zone: Zone, host_path: str) -> bool:
    return bool(guest_view(zone, host_path)[0])


class FileEventBuilder:
    """FileRecord + its zone -> FileEvent (or None for records that only update state)."""

    def __init__(self, proc: Path = Path("/proc"), clock: MonotonicClock | None = None) -> None:
        self.fds = FdTable(proc)
        self.clock = clock or MonotonicClock()
        self.stats = PipelineStats()

    def build(self, rec: FileRecord, zone: Zone) -> FileEvent | None:
        pid, op = rec.pid, rec.op
        host = new_host = ""
        op_name = ""
        bytes_read = bytes_written = 0
        if op == FileOp.OPEN:
            host = self.fds.resolve(pid, rec.dirfd, rec.path)
            if rec.ret >= 0:
                self.fds.remember(pid, rec.ret, host)
            if rec.flags & (O_DIRECTORY | O_PATH) and _inside_shares(zone, host):
                self.stats.internal += 1  # a 9p walk step: state only
                return None
            op_name = "create" if rec.flags & O_CREAT else "open"
        elif op in (FileOp.READ, FileOp.WRITE):
            host = self.fds.lookup(pid, rec.dirfd)
            op_name = "read" if op == FileOp.READ else "write"
            bytes_read, bytes_written = (rec.ret, 0) if op == FileOp.READ else (0, rec.ret)
        elif op == FileOp.CLOSE:
            host = self.fds.forget(pid, rec.dirfd)
            op_name = "close"
            bytes_read, bytes_written = rec.bytes_read, rec.bytes_written
        elif op == FileOp.UNLINK:
            host = self.fds.resolve(pid, rec.dirfd, rec.path)
            op_name = "rmdir" if rec.flags & AT_REMOVEDIR else "unlink"
        elif op == FileOp.SETXATTR:
            host = self.fds.resolve(pid, rec.dirfd, rec.path)
            op_name = VIRTFS_XATTR_OPS.get(rec.path2, "setxattr")
        elif op == FileOp.SYMLINK:
            # path is the link's target text; the new link is path2.
            host = self.fds.resolve(pid, rec.dirfd2, rec.path2)
            op_name = "symlink"
        else:
            host = self.fds.resolve(pid, rec.dirfd, rec.path)
            if op in (FileOp.RENAME, FileOp.LINK):
                new_host = self.fds.resolve(pid, rec.dirfd2, rec.path2)
            op_name = PATH_OPS[op]
        share, guest = guest_view(zone, host)
        new_guest = guest_view(zone, new_host)[1] if new_host else ""
        return FileEvent(
            ts_ns=self.clock.wall(rec.ts_mono_ns),
            zone=zone.ref,
            op=op_name,
            path=guest,
            host_path=host,
            pid=pid,
            tid=rec.tid,
            comm=text(rec.comm),
            ret=rec.ret if op not in (FileOp.CLOSE, FileOp.READ, FileOp.WRITE) else 0,
            new_path=new_guest,
            new_host_path=new_host,
            flags=rec.flags if op == FileOp.OPEN else 0,
            mode=rec.mode,
            bytes_read=bytes_read,
            bytes_written=bytes_written,
            share=share,
        )


def kvm_event(rec: KvmRecord, zone: Zone, clock: MonotonicClock) -> KvmEvent:
    return KvmEvent(
        ts_ns=clock.wall(rec.ts_mono_ns),
        zone=zone.ref,
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
        stats = self.files.stats
        for rec in records:
            stats.records += 1
            zone = self._zone_of(rec.zone_key)
            if zone is None:
                stats.unattributed += 1
                continue
            event: Event | None
            if isinstance(rec, FileRecord):
                event = self.files.build(rec, zone)
                # The proc channel's view of the same open: a host path outside the shares.
                outside = outside_share_event(event) if event is not None else None
                if outside is not None:
                    events.append(outside)
            elif isinstance(rec, KvmRecord):
                event = kvm_event(rec, zone, self.files.clock)
            elif isinstance(rec, NetRecord):
                event = net_event(rec, zone, self.files.clock.wall(rec.ts_mono_ns))
            elif isinstance(rec, ProcRecord):
                event = proc_event(rec, zone, self.files.clock.wall(rec.ts_mono_ns))
            else:
                stats.unknown += 1
                continue
            if event is not None:
                events.append(event)
        return events
