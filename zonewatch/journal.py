"""The durable alert journal: every alert is written here, and numbered, before delivery.

Layout: DIR/<first seq, 20 digits>.seg files of JSON lines, oldest first; the newest segment
is the active one. A line is an alert (`{"seq": N, ...}`) or a gap record
(`{"gap": [FIRST, LAST], "why": REASON, "tenants": {...}}`): seqs that hold no alert on
disk, and why (see `Gap`). The name of the empty file DIR/meta-EPOCH-RESERVED-ISSUED-BOOT
holds the journal's epoch (a random id given when the journal is created: a cursor from
another journal, e.g. before a wipe, is told apart) and the seq reservation; it is renamed
to update it, which needs no data block on a full disk.

A seq is never issued twice, whatever crashed when. Before an alert gets a seq, the seq is
inside a reservation made durable in the meta file's name (`RESERVE_BLOCK` seqs at a time,
extended ahead by the flusher thread). While alerts wait in memory (a full disk), the
newest seq issued is recorded there too (no fsync: it survives a killed agent, as the page
cache does). On
open, the seqs issued but not on disk become a `not_written` gap record; after a host
restart (the page cache lost) the whole unused reservation becomes a `power_loss` gap
(alerts numbered in the last fsync interval may be in it). Numbering goes on after both.

Damage: a line that does not parse, or whose seq does not follow the one before, is a
damaged record. It is skipped, never a reason to drop the good lines after it; readers get
it as a `damaged` gap (the seqs between its good neighbours). Only the bytes after the last
newline of the active segment (a write cut short) are cut on open.

Durability: an alert is written (os.write) before anyone sees it, so killing the agent
loses nothing that was delivered; fsync is batched (at most `fsync_interval_s` after a
write). Retention drops whole old segments by total size and by age; readers get the seqs
they asked for that are gone as a `retention` gap.

A failing disk (ENOSPC, EDQUOT, EIO) never fails an append: the alerts are numbered and
served to readers as usual while their lines wait in memory (at most `backlog_bytes`; beyond
that the oldest waiting lines become one `not_written` gap record, counted). One error line
is logged per episode; the flusher retries every `fsync_interval_s` and writes the backlog,
in order, as soon as the disk takes it.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson

from zonewatch.errors import ConfigError
from zonewatch.model import Alert, Severity, ZoneRef, json_bytes

log = logging.getLogger(__name__)

SUFFIX = ".seg"
META = "meta-"  # the name of an empty file holding the epoch and the seq reservation
INDEX_EVERY = 128  # one remembered file offset per this many records of a segment
RESERVE_BLOCK = 4096  # seqs reserved per fsync of DIR/meta
DROPPED_KEPT = 4096  # per-tenant counts of segments retention dropped, for `retention` gaps
HOST_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class GapReason(StrEnum):
    NOT_WRITTEN = "not_written"  # numbered, held in memory, never reached the disk
    POWER_LOSS = "power_loss"  # reserved before a host restart: may hold unwritten alerts
    DAMAGED = "damaged"  # a record on disk that does not parse
    RETENTION = "retention"  # dropped by retention
    UNKNOWN = "unknown"  # seqs missing with no record saying why
    # Never in a journal: what the server tells a cursor from another journal.
    EPOCH = "epoch"  # the cursor's epoch is not this journal's
    AHEAD = "ahead"  # the cursor is past this journal's end


@dataclass(slots=True)
class Gap:
    """Seqs first..last that hold no readable alert, and why."""

    first: int
    last: int
    reason: GapReason
    # The alerts in it per tenant (UNKNOWN_COUNT: some, how many unknown); None: unknown.
    tenants: dict[str, int] | None = None

    @property
    def seq(self) -> int:
        return self.last

    @property
    def count(self) -> int:
        return self.last - self.first + 1


Record = Alert | Gap


def first_of(record: Record) -> int:
    return record.first if isinstance(record, Gap) else record.seq


@dataclass(slots=True)
class JournalOptions:
    max_bytes: int = 256 << 20
    max_age_s: float = 7 * 86400.0
    segment_bytes: int = 8 << 20
    fsync_interval_s: float = 0.05
    cache_records: int = 8192  # newest records kept in memory: catch-up reads skip the disk
    backlog_bytes: int = 64 << 20  # alert lines held in memory while the disk refuses them


@dataclass(slots=True)
class JournalHealth:
    """How the disk has treated the journal (read from any thread)."""

    backlog: int = 0  # records numbered but not yet on disk
    backlog_bytes: int = 0
    write_errors: int = 0  # failed write attempts
    episodes: int = 0  # times the disk started refusing writes
    dropped: int = 0  # alerts that never reached the disk: the backlog was full
    damaged: int = 0  # damaged records found on disk
    failing: str = ""  # the current error ("" when writes succeed)


def encode(alert: Alert) -> bytes:
    """One journal line (compact keys; ints stay ints)."""
    z = alert.zone
    return json_bytes(
        {
            "seq": alert.seq,
            "ts": alert.ts_ns,
            "zone": [z.id, z.name, z.tenant, z.vmm],
            "rule": alert.rule,
            "sev": int(alert.severity),
            "summary": alert.summary,
            "tags": list(alert.tags),
            "evidence": alert.evidence,
            "count": alert.count,
            "first": alert.first_ts_ns,
            "last": alert.last_ts_ns,
            "lost": alert.lost_in_window,
        },
        orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS,
    )


def encode_gap(gap: Gap) -> bytes:
    doc: dict[str, Any] = {"gap": [gap.first, gap.last], "why": str(gap.reason)}
    if gap.tenants is not None:
        doc["tenants"] = gap.tenants
    return orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)


def decode(line: bytes) -> Alert:
    """An alert line; ValueError (or KeyError/TypeError) when it is not one."""
    d: dict[str, Any] = orjson.loads(line)
    zid, name, tenant, vmm = d["zone"]
    return Alert(
        ts_ns=d["ts"],
        zone=ZoneRef(zid, name, tenant, vmm),
        rule=d["rule"],
        severity=Severity(d["sev"]),
        summary=d["summary"],
        tags=tuple(d["tags"]),
        evidence=d["evidence"],
        count=d["count"],
        first_ts_ns=d["first"],
        last_ts_ns=d["last"],
        lost_in_window=d["lost"],
        seq=d["seq"],
    )


# (st_dev, st_ino) of each journal lock file this process holds, by the lock's fd.
_HELD: dict[int, tuple[int, int]] = {}
_HELD_GUARD = threading.Lock()


def _lock_journal(directory: Path) -> int:
    """Lock DIR/lock for this process (ConfigError when another agent holds it); the fd.

    A POSIX record lock, not flock: the kernel drops a POSIX lock as soon as a dying process
    closes its files, whereas a flock goes with the file's last release, which a killed
    agent reaches only after its BPF tracepoints are torn down, seconds later: a restart in
    between was refused ("journal in use"). POSIX locks never conflict inside one process
    and go with ANY close of the file there, so the process's own journals are kept in
    _HELD and a second one is refused before it opens the file."""
    path = directory / "lock"
    with _HELD_GUARD:
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            if (st.st_dev, st.st_ino) in _HELD.values():
                raise ConfigError(str(directory), "journal in use by this agent")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: another process holds it
            os.close(fd)
            raise ConfigError(str(directory), "journal in use by another agent") from None
        st = os.fstat(fd)
        _HELD[fd] = (st.st_dev, st.st_ino)
        return fd


def _unlock_journal(fd: int) -> None:
    with _HELD_GUARD:
        _HELD.pop(fd, None)
        os.close(fd)


def decode_record(line: bytes) -> Record:
    """An alert or gap line; ValueError when the line is damaged."""
    try:
        if line.startswith(b'{"gap":'):
            d = orjson.loads(line)
            first, last = d["gap"]
            tenants = d.get("tenants")
            if not (isinstance(first, int) and isinstance(last, int) and 0 < first <= last):
                raise ValueError("bad range")
            if tenants is not None and not all(
                isinstance(k, str) and isinstance(v, int) for k, v in tenants.items()
            ):
                raise ValueError("bad tenants")
            return Gap(first, last, GapReason(d["why"]), tenants)
        alert = decode(line)
        if not (isinstance(alert.seq, int) and alert.seq > 0):
            raise ValueError("bad seq")
        return alert
    except (orjson.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"damaged record: {exc}") from None


@dataclass(slots=True)
class _Scan:
    """What one pass over a segment's lines found."""

    records: list[tuple[Record, int]]  # good records and their offsets
    damaged: list[int]  # offsets of damaged lines
    end: int  # bytes up to the last newline
    trailing_damaged: int  # damaged lines after the last good record


def _scan(data: bytes, after: int) -> _Scan:
    """Every whole line of `data`; `after` is the seq before the first line. A record whose
    first seq does not follow the previous record's last is damaged too, and so is one that
    jumps ahead when the next record follows the one before it (a damaged seq field: one bad
    digit must not make the good records after it look out of order)."""
    lines: list[tuple[int, Record | None]] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break
        try:
            lines.append((pos, decode_record(data[pos : end + 1])))
        except ValueError:
            lines.append((pos, None))
        pos = end + 1
    records: list[tuple[Record, int]] = []
    damaged: list[int] = []
    trailing = 0
    prev = after
    for i, (offset, record) in enumerate(lines):
        ok = record is not None and first_of(record) > prev
        if ok and record is not None and first_of(record) > prev + 1 and i + 1 < len(lines):
            following = lines[i + 1][1]
            ok = following is None or first_of(following) != prev + 2
        if ok and record is not None:
            records.append((record, offset))
            prev = record.seq
            trailing = 0
        else:
            damaged.append(offset)
            trailing += 1
    return _Scan(records, damaged, pos, trailing)


UNKNOWN_COUNT = -1  # Gap.tenants: some of this tenant's alerts are in the gap, how many unknown

# A tenant's alerts in a segment: [how many, the first's seq, the last's seq] (a list:
# updated in place on the append path).
TenantSpan = list[int]


def _tally(records: Iterable[Record], into: dict[str, TenantSpan]) -> dict[str, TenantSpan]:
    """Adds the alerts among `records` to per-tenant spans (gaps were counted as lost where
    they were made)."""
    for r in records:
        if isinstance(r, Alert):
            span = into.get(r.zone.tenant)
            if span is None:
                into[r.zone.tenant] = [1, r.seq, r.seq]
            else:
                span[0] += 1
                span[2] = r.seq
    return into


@dataclass(slots=True)
class _Segment:
    first_seq: int
    path: Path
    size: int = 0
    count: int = 0
    created: float = field(default_factory=time.time)
    # (first seq, offset) every INDEX_EVERY records; built on the first read, by the flusher
    # soon after start, or while writing
    index: list[tuple[int, int]] | None = None
    tenants: dict[str, TenantSpan] | None = None  # its alerts per tenant (None: not scanned)
    last_seq: int = 0  # the last seq of its last good record (0: not scanned yet)


@dataclass(slots=True)
class ReadResult:
    records: list[Record]  # alerts and gaps, oldest first
    first_seq: int  # the oldest retained seq when read
    last_seq: int  # the newest seq issued when read

    @property
    def alerts(self) -> list[Alert]:
        return [r for r in self.records if isinstance(r, Alert)]


@dataclass(slots=True)
class _Meta:
    """The journal's epoch and seq reservation, held in the NAME of an empty file (renamed
    to update: a rename needs no data block, so it works on a full disk too)."""

    epoch: str
    reserved: int  # no seq above this has been issued (fsynced before use)
    issued: int  # the newest seq issued (written while alerts wait in memory)
    host_boot: str  # the host's boot id when written: after a restart `issued` is stale

    @property
    def name(self) -> str:
        return f"{META}{self.epoch}-{self.reserved:020d}-{self.issued:020d}-{self.host_boot}"

    @classmethod
    def parse(cls, name: str) -> _Meta:
        epoch, reserved, issued, host_boot = name.removeprefix(META).split("-", 3)
        meta = cls(epoch, int(reserved), int(issued), host_boot)
        if not (len(epoch) == 32 and 0 <= meta.issued <= meta.reserved):
            raise ValueError("unexpected values")
        return meta


def host_boot_id() -> str:
    try:
        return HOST_BOOT_ID.read_text().strip()
    except OSError:
        return ""


class Journal:
    """Thread-safe: the agent appends while the gRPC server's thread reads."""

    def __init__(self, directory: str | Path, options: JournalOptions | None = None) -> None:
        self.dir = Path(directory)
        self.options = options or JournalOptions()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = _lock_journal(self.dir)
        self._lock = threading.RLock()
        self._segments: list[_Segment] = []
        self._cache: deque[Record] = deque(maxlen=self.options.cache_records)
        self._fd = -1
        self._meta_name = ""  # the meta file's current name
        self._to_close: list[int] = []  # rolled segments' fds: the flusher fsyncs and closes
        self._dir_dirty = False
        self._dirty = False
        self.last_seq = 0
        self.fsyncs = 0
        # Numbered records whose lines are not (wholly) on disk yet, oldest first; the first
        # line's leading `_head_written` bytes already are (a short write on a full disk).
        self._pending: deque[tuple[Record, bytes]] = deque()
        self._head_written = 0
        self._roll_refused = False
        self._written_seq = 0  # the newest seq wholly on disk
        self._tenant_last: dict[str, int] = {}  # the newest seq of each tenant's alerts
        self._dropped: deque[tuple[int, int, dict[str, TenantSpan] | None]] = deque(
            maxlen=DROPPED_KEPT
        )
        self._meta = _Meta(uuid.uuid4().hex, 0, 0, host_boot_id())
        self._meta_issued_written = 0
        self._meta_error = False
        self.health = JournalHealth()
        self._recover()
        self._closed = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="zw-journal", daemon=True)
        self._flusher.start()

    @property
    def epoch(self) -> str:
        """This journal's id: changes only when the journal is created anew."""
        return self._meta.epoch

    # -- recovery ---------------------------------------------------------------------------

    def _recover(self) -> None:
        for path in sorted(self.dir.glob(f"*{SUFFIX}")):
            try:
                first = int(path.stem)
            except ValueError:
                continue
            st = path.stat()
            self._segments.append(_Segment(first, path, st.st_size, created=st.st_mtime))
        previous = self._read_meta()
        if not self._segments:
            self._open_segment((previous.reserved if previous else 0) + 1)
            self.last_seq = self._written_seq = self._segments[0].first_seq - 1
            self._start_meta(previous)
            return
        active = self._segments[-1]
        disk_last, trailing_damaged = self._recover_active(active)
        gaps = self._crash_gaps(previous, disk_last, trailing_damaged)
        self._fd = os.open(active.path, os.O_WRONLY | os.O_APPEND)
        self.last_seq = self._written_seq = disk_last
        if gaps:
            lines = [encode_gap(g) for g in gaps]
            self._pending.extend(zip(gaps, lines, strict=True))
            self.health.backlog_bytes += sum(map(len, lines))
            self.last_seq = gaps[-1].last
            self._cache.extend(gaps)
            self._drain_locked()
            with contextlib.suppress(OSError):  # a full disk: the flusher retries
                self._fsync_locked()
        self._start_meta(previous)

    def _recover_active(self, active: _Segment) -> tuple[int, int]:
        """Scans the active segment: cuts a torn tail, counts damaged lines, fills the
        cache. Returns the last seq on disk and the damaged lines after the last good one."""
        data = active.path.read_bytes()
        scan = _scan(data, active.first_seq - 1)
        if scan.end < len(data):
            log.warning(
                "journal %s: cut a torn last line of %d bytes (a write cut short)",
                active.path,
                len(data) - scan.end,
            )
            with active.path.open("r+b") as f:
                f.truncate(scan.end)
                os.fsync(f.fileno())
        self._note_damaged(active.path, scan)
        records = [r for r, _pos in scan.records]
        active.size, active.count = scan.end, len(records)
        active.index = [(first_of(r), pos) for i, (r, pos) in enumerate(scan.records)
                        if i % INDEX_EVERY == 0]  # fmt: skip
        active.tenants = _tally(records, {})
        self._cache.extend(_with_damage(records, active.first_seq - 1, scan))
        disk_last = records[-1].seq if records else active.first_seq - 1
        active.last_seq = disk_last
        self._note_tenants(records)
        return disk_last, scan.trailing_damaged

    def _crash_gaps(self, meta: _Meta | None, disk_last: int, damaged: int) -> list[Gap]:
        """Gap records for the seqs issued before the last stop that are not on disk."""
        gaps: list[Gap] = []
        issued = disk_last
        if meta is not None:
            issued = max(issued, meta.issued)
        if damaged:  # damaged last lines: their seqs follow the last good one
            issued = max(issued, disk_last + damaged)
            gaps.append(Gap(disk_last + 1, issued, GapReason.DAMAGED))
        elif issued > disk_last:
            gaps.append(Gap(disk_last + 1, issued, GapReason.NOT_WRITTEN))
            log.error(
                "journal %s: seqs %d-%d were issued but never reached the disk (held in "
                "memory when the agent stopped): readers get a `lost` notice for them",
                self.dir,
                disk_last + 1,
                issued,
            )
        if meta is not None and meta.host_boot != self._meta.host_boot and meta.reserved > issued:
            gaps.append(Gap(issued + 1, meta.reserved, GapReason.POWER_LOSS))
            log.warning(
                "journal %s: the host restarted since the last write: seqs %d-%d were "
                "reserved and may hold alerts that never reached the disk",
                self.dir,
                issued + 1,
                meta.reserved,
            )
        return gaps

    def _note_damaged(self, path: Path, scan: _Scan) -> None:
        if scan.damaged:
            self.health.damaged += len(scan.damaged)
            log.error(
                "journal %s: %d damaged record(s) (first at byte %d): skipped; readers get "
                "a `lost` notice for their seqs",
                path,
                len(scan.damaged),
                scan.damaged[0],
            )

    def _note_tenants(self, records: Iterable[Record]) -> None:
        last = self._tenant_last
        for r in records:
            if isinstance(r, Alert) and last.get(r.zone.tenant, 0) < r.seq:
                last[r.zone.tenant] = r.seq

    # -- the meta file: epoch and seq reservation ---------------------------------------------

    def _read_meta(self) -> _Meta | None:
        found: list[_Meta] = []
        for path in self.dir.glob(f"{META}*"):
            try:
                found.append(_Meta.parse(path.name))
            except ValueError:
                log.error("journal %s: damaged meta file %r: ignored", self.dir, path.name)
                path.unlink(missing_ok=True)
        if len(found) > 1:  # not made by this code (a rename replaces); the safest is kept
            found.sort(key=lambda m: m.reserved)
            for extra in found[:-1]:
                (self.dir / extra.name).unlink(missing_ok=True)
        if found:
            return found[-1]
        if any(self.dir.glob(f"*{SUFFIX}")):
            log.warning(
                "journal %s: no epoch or seq reservation found: a new epoch starts (cursors "
                "of the old one get a `lost` notice)",
                self.dir,
            )
        return None

    def _start_meta(self, previous: _Meta | None) -> None:
        meta = self._meta
        if previous is not None:
            meta.epoch = previous.epoch
        self._meta_name = previous.name if previous is not None else ""
        meta.issued = self.last_seq
        meta.reserved = self.last_seq + RESERVE_BLOCK
        self._write_meta(sync=True)
        self._meta_issued_written = self.last_seq

    def _write_meta(self, sync: bool) -> bool:
        new = self._meta.name
        try:
            if self._meta_name:
                os.rename(self.dir / self._meta_name, self.dir / new)
            else:
                os.close(os.open(self.dir / new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            self._meta_name = new
            if sync:
                self._fsync_dir()
        except OSError as exc:
            if not self._meta_error:
                log.error(
                    "journal %s: cannot record the seq reservation (%s): a crash now could "
                    "reuse seqs",
                    self.dir,
                    exc.strerror or exc,
                )
            self._meta_error = True
            return False
        self._meta_error = False
        return True

    def _reserve_locked(self, upto: int) -> None:
        """Extends the fsynced reservation past `upto` before any seq up to it is issued."""
        if upto <= self._meta.reserved:
            return
        self._meta.reserved = upto + RESERVE_BLOCK
        self._meta.issued = self.last_seq
        if self._write_meta(sync=True):
            self._meta_issued_written = self.last_seq

    def _note_issued_locked(self) -> None:
        """Records the newest seq issued while lines wait in memory (see the module doc)."""
        if self._pending and self._meta_issued_written != self.last_seq:
            self._meta.issued = self.last_seq
            if self._write_meta(sync=False):
                self._meta_issued_written = self.last_seq

    def _open_segment(self, first_seq: int, sync_dir: bool = True) -> None:
        path = self.dir / f"{first_seq:020d}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._segments.append(
            _Segment(first_seq, path, index=[], tenants={}, last_seq=first_seq - 1)
        )
        if sync_dir:
            self._fsync_dir()

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- writing ----------------------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        """The oldest seq still retained (last_seq + 1 when the journal is empty)."""
        with self._lock:
            return self._segments[0].first_seq

    def last_seq_of(self, tenants: frozenset[str] | None) -> int:
        """The newest seq of these tenants' alerts (None: of the journal); 0 when none is
        known."""
        with self._lock:
            if tenants is None:
                return self.last_seq
            return max((self._tenant_last.get(t, 0) for t in tenants), default=0)

    def append(self, alerts: Sequence[Alert]) -> None:
        """Number the alerts (Alert.seq) and write them in one write. Never raises for the
        disk: while it refuses writes, the lines wait in memory (see the module doc)."""
        if not alerts:
            return
        with self._lock:
            self._reserve_locked(self.last_seq + len(alerts))
            last = self._tenant_last
            for alert in alerts:
                self.last_seq += 1
                alert.seq = self.last_seq
                last[alert.zone.tenant] = alert.seq
                line = encode(alert)
                self._pending.append((alert, line))
                self.health.backlog_bytes += len(line)
            self._cache.extend(alerts)
            if not self.health.failing:  # while failing, the flusher retries
                self._drain_locked()
            self._bound_backlog_locked()
            self._note_issued_locked()
            self.health.backlog = len(self._pending)
            self._retain_locked()

    def _drain_locked(self) -> None:
        """Write the waiting lines, in order, a segment's worth per write."""
        while self._pending:
            active = self._segments[-1]
            lines: list[bytes] = []
            size = active.size
            for _record, line in self._pending:
                lines.append(line)
                size += len(line)
                if size >= self.options.segment_bytes:
                    break
            data = b"".join(lines)[self._head_written :]
            written, error = self._write_locked(data)
            self._commit_locked(active, written)
            if error is not None:
                self._failed_locked(error)
                return
            if active.size >= self.options.segment_bytes or (
                time.time() - active.created > self.options.max_age_s / 8
            ):
                self._roll_locked()
        self.health.backlog = 0
        if self.health.failing:
            self._recovered_locked()

    def _write_locked(self, data: bytes) -> tuple[int, OSError | None]:
        """Bytes of `data` written before an error (regular files write whole when they
        can; a full disk writes part, then refuses)."""
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as exc:
            return written, exc
        return written, None

    def _commit_locked(self, active: _Segment, written: int) -> None:
        """Account `written` bytes to the waiting lines they completed."""
        if written:
            self._dirty = True  # the flusher thread fsyncs: appends never wait for the disk
        if not self._head_written and written == self.health.backlog_bytes:
            self._commit_all_locked(active)  # the usual case: everything went in one write
            return
        while written and self._pending:
            record, line = self._pending[0]
            need = len(line) - self._head_written
            if written < need:
                self._head_written += written
                return
            written -= need
            self._commit_record(active, record, len(line))
            self.health.backlog_bytes -= len(line)
            self._head_written = 0
            self._pending.popleft()

    def _commit_all_locked(self, active: _Segment) -> None:
        assert active.index is not None
        assert active.tenants is not None
        count, size = active.count, active.size
        index, tenants = active.index, active.tenants
        for record, line in self._pending:
            if count % INDEX_EVERY == 0:
                index.append((first_of(record), size))
            count += 1
            size += len(line)
        _tally((r for r, _line in self._pending), tenants)
        active.count, active.size = count, size
        active.last_seq = self._written_seq = self._pending[-1][0].seq
        self._pending.clear()
        self.health.backlog_bytes = 0

    def _commit_record(self, active: _Segment, record: Record, size: int) -> None:
        assert active.index is not None
        assert active.tenants is not None
        if active.count % INDEX_EVERY == 0:
            active.index.append((first_of(record), active.size))
        active.count += 1
        active.size += size
        active.last_seq = self._written_seq = record.seq
        _tally((record,), active.tenants)

    def _failed_locked(self, exc: OSError) -> None:
        h = self.health
        h.write_errors += 1
        h.backlog = len(self._pending)
        if h.failing:
            return
        h.failing = exc.strerror or str(exc)
        h.episodes += 1
        log.error(
            "journal %s: cannot write (%s): keeping %d alert(s) in memory (at most %d MiB) "
            "and retrying until the disk takes them",
            self.dir,
            h.failing,
            len(self._pending),
            self.options.backlog_bytes >> 20,
        )

    def _recovered_locked(self) -> None:
        log.warning(
            "journal %s: writable again after %s; the alerts held in memory are on disk "
            "(%d dropped so far: the backlog was full)",
            self.dir,
            self.health.failing,
            self.health.dropped,
        )
        self.health.failing = ""

    def _bound_backlog_locked(self) -> None:
        """Over backlog_bytes, the oldest waiting lines that nothing of is on disk yet (the
        head may be partly written: cutting it would tear the file) become one gap record
        saying which seqs, and whose, never reached the disk."""
        h = self.health
        if h.backlog_bytes <= self.options.backlog_bytes:
            return
        keep = self._pending.popleft() if self._head_written else None
        gap: Gap | None = None
        head = self._pending[0][0] if self._pending else None
        if isinstance(head, Gap) and head.reason is GapReason.NOT_WRITTEN:
            gap = head  # merged with: one gap for the whole dropped run
            h.backlog_bytes -= len(self._pending.popleft()[1])
        dropped = 0
        while h.backlog_bytes > self.options.backlog_bytes and len(self._pending) > 1:
            record, line = self._pending.popleft()
            h.backlog_bytes -= len(line)
            if gap is None:
                gap = Gap(first_of(record), record.seq, GapReason.NOT_WRITTEN, {})
            gap.last = record.seq
            if gap.tenants is not None and isinstance(record, Alert):
                tenant = record.zone.tenant
                gap.tenants[tenant] = gap.tenants.get(tenant, 0) + 1
            dropped += isinstance(record, Alert)
        if gap is not None:
            line = encode_gap(gap)
            self._pending.appendleft((gap, line))
            h.backlog_bytes += len(line)
        if keep is not None:
            self._pending.appendleft(keep)
        if dropped:
            if not h.dropped:
                log.error(
                    "journal %s: memory backlog full (%d MiB): dropping the oldest alerts "
                    "not yet written (counted; readers get a `lost` notice)",
                    self.dir,
                    self.options.backlog_bytes >> 20,
                )
            h.dropped += dropped

    def _fsync_locked(self) -> None:
        if self._dirty:
            os.fsync(self._fd)
            self.fsyncs += 1
            self._dirty = False

    def _roll_locked(self) -> None:
        # The flusher fsyncs and closes the old file and fsyncs the directory: a roll costs
        # the appending thread an open(), not two fsyncs.
        first = first_of(self._pending[0][0]) if self._pending else self.last_seq + 1
        old = self._fd
        try:
            self._open_segment(first, sync_dir=False)
        except OSError as exc:  # no room for a new file: the active one grows meanwhile
            if not self._roll_refused:
                log.warning("journal %s: cannot start a new segment: %s", self.dir, exc)
            self._roll_refused = True
            return
        self._roll_refused = False
        if self._dirty:
            self._to_close.append(old)
        else:
            os.close(old)
        self._dirty = False
        self._dir_dirty = True

    def _retain_locked(self, by_age: bool = False) -> None:
        """Drops whole old segments while over max_bytes (checked in memory on every append)
        or, with by_age, older than max_age_s (the flusher checks that each second)."""
        opts = self.options
        total = sum(s.size for s in self._segments)
        horizon = time.time() - opts.max_age_s
        while len(self._segments) > 1:
            oldest = self._segments[0]
            if total <= opts.max_bytes:
                if not by_age:
                    break
                try:
                    if oldest.path.stat().st_mtime >= horizon:
                        break
                except FileNotFoundError:
                    pass
            oldest.path.unlink(missing_ok=True)
            total -= oldest.size
            self._segments.pop(0)
            self._dropped.append((oldest.first_seq, self._segments[0].first_seq - 1,
                                  oldest.tenants))  # fmt: skip
            self._dir_dirty = True

    def _retention_gap(self, first: int, last: int) -> Gap:
        """Seqs first..last that retention dropped, with their tenants when known (a
        segment that begins before `first` tells a tenant's count only when its alerts
        there are all before or all after `first`)."""
        tenants: dict[str, int] | None = {}
        covered = first
        for lo, hi, spans in self._dropped:
            if hi < first or lo > last:
                continue
            if lo > covered or spans is None or tenants is None:
                tenants = None
                break
            for t, (n, t_first, t_last) in spans.items():
                if t_last < first:
                    continue  # all before the gap: not lost
                had = tenants.get(t, 0)
                partly = t_first < first or had == UNKNOWN_COUNT
                tenants[t] = UNKNOWN_COUNT if partly else had + n
            covered = hi + 1
        if covered <= last:
            tenants = None
        return Gap(first, last, GapReason.RETENTION, tenants)

    def enforce_retention(self) -> None:
        with self._lock:
            self._retain_locked(by_age=True)

    def sync(self) -> None:
        with self._lock:
            self._fsync_locked()

    def _flush_loop(self) -> None:
        # Bounds the time an alert stays written but not fsynced when appends pause.
        next_age_check = 0.0
        while not self._closed.wait(self.options.fsync_interval_s):
            if time.monotonic() >= next_age_check:
                self.enforce_retention()
                self._scan_one_old_segment()
                next_age_check = time.monotonic() + 1.0
            with self._lock:  # ahead of the appender: it rarely waits for an fsync
                if self._meta.reserved - self.last_seq < RESERVE_BLOCK // 2:
                    self._reserve_locked(self.last_seq + RESERVE_BLOCK // 2 + 1)
            self._retry_backlog()
            self._flush_once()

    def _scan_one_old_segment(self) -> None:
        """Indexes one segment not read yet (its tenants' counts tell scoped readers what
        retention dropped; its damaged records are logged soon after start)."""
        with self._lock:
            todo = next((s for s in self._segments[:-1] if s.index is None), None)
        if todo is not None:
            with contextlib.suppress(OSError):
                self._ensure_scanned(todo)

    def _retry_backlog(self) -> None:
        with self._lock:
            if self._pending and self.health.failing:
                self._drain_locked()

    def _flush_once(self) -> None:
        with self._lock:
            to_close, self._to_close = self._to_close, []
            sync_dir, self._dir_dirty = self._dir_dirty, False
            fd = -1
            if self._dirty and self._fd >= 0:
                self._dirty = False
                fd = os.dup(self._fd)  # a roll may close the original meanwhile
        # Outside the lock: appends go on during the fsyncs.
        for old in to_close:
            self._fsync_fd(old)
            os.close(old)
        if fd >= 0:
            try:
                self._fsync_fd(fd)
            finally:
                os.close(fd)
        if sync_dir:
            try:
                self._fsync_dir()
            except OSError as exc:
                log.error("journal %s: fsync of the directory failed: %s", self.dir, exc)

    def _fsync_fd(self, fd: int) -> None:
        """fsync; a failure is logged (the flusher thread must outlive a bad disk)."""
        try:
            os.fsync(fd)
            self.fsyncs += 1
        except OSError as exc:
            self.health.write_errors += 1
            log.error("journal %s: fsync failed: %s", self.dir, exc)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._flusher.join()
        self._retry_backlog()
        self._flush_once()
        with self._lock:
            if self._pending:
                log.error(
                    "journal %s: %d record(s) held in memory never reached the disk (%s): "
                    "readers get a `lost` notice for them after the restart",
                    self.dir,
                    len(self._pending),
                    self.health.failing,
                )
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    self._fsync_locked()
                os.close(self._fd)
                self._fd = -1
            # Nothing above last_seq was issued: the next start numbers on without a gap.
            self._meta.issued = self._meta.reserved = self.last_seq
            self._write_meta(sync=True)
            _unlock_journal(self._lock_fd)

    # -- reading ----------------------------------------------------------------------------

    def read_after(self, seq: int, limit: int = 1024) -> ReadResult:
        """Up to `limit` records (alerts and gaps) holding the seqs after `seq`, oldest
        first. Seqs older than retention come first, as one `retention` gap."""
        with self._lock:
            first, last = self._segments[0].first_seq, self.last_seq
            start = seq + 1
            out: list[Record] = []
            if start < first:
                out.append(self._retention_gap(start, first - 1))
                start = first
            if start > last:
                return ReadResult(out, first, last)
            cached = self._from_memory(start, limit - len(out))
            if cached is not None:
                return ReadResult(out + cached, first, last)
            k = bisect.bisect_right([s.first_seq for s in self._segments], start) - 1
            segments = self._segments[k:]
        for i, segment in enumerate(segments):
            following = segments[i + 1].first_seq if i + 1 < len(segments) else None
            try:
                found = self._read_segment(segment, start, limit - len(out), following)
            except FileNotFoundError:  # retention removed it meanwhile: the caller retries
                return ReadResult(out, self.first_seq, last)
            out += found
            if found:
                break
        return ReadResult(out, first, last)

    def _from_memory(self, start: int, limit: int) -> list[Record] | None:
        cache = self._cache
        if cache and first_of(cache[0]) <= start:
            i = bisect.bisect_left(cache, start, key=lambda r: r.seq)
            return [cache[j] for j in range(i, min(i + limit, len(cache)))]
        if self._pending and start > self._written_seq:  # not on disk yet
            waiting = [r for r, _line in self._pending if r.seq >= start]
            return waiting[:limit]
        return None

    def _read_segment(
        self, segment: _Segment, start: int, limit: int, following: int | None
    ) -> list[Record]:
        """The records of one segment holding seqs >= start; damaged lines become gaps
        between their good neighbours (`following`: the next segment's first seq)."""
        self._ensure_scanned(segment)
        with self._lock:
            assert segment.index is not None
            j = bisect.bisect_right(segment.index, start, key=lambda e: e[0]) - 1
            offset = segment.index[j][1] if j >= 0 else 0
            size = segment.size
            written = self._written_seq
        # The file read happens outside the lock: the agent's appends never wait for it.
        with segment.path.open("rb") as f:
            f.seek(offset)
            data = f.read(max(0, size - offset))
            after = segment.index[j][0] - 1 if j >= 0 else segment.first_seq - 1
        scan = _scan(data, after)
        out: list[Record] = []
        records = list(_with_damage([r for r, _ in scan.records], after, scan))
        if scan.trailing_damaged:
            end = following - 1 if following is not None else written
            prev = records[-1].seq if records else after
            if end > prev:
                records.append(Gap(prev + 1, end, GapReason.DAMAGED))
        for record in records:
            if record.seq >= start:
                out.append(record)
                if len(out) >= limit:
                    break
        return out

    def _ensure_scanned(self, segment: _Segment) -> None:
        """Builds a segment's index and tenant counts on its first read (outside the lock:
        reading a whole segment must not hold up appends)."""
        if segment.index is not None:
            return
        data = segment.path.read_bytes()
        scan = _scan(data, segment.first_seq - 1)
        records = [r for r, _ in scan.records]
        index = [(first_of(r), pos) for i, (r, pos) in enumerate(scan.records)
                 if i % INDEX_EVERY == 0]  # fmt: skip
        with self._lock:
            if segment.index is None:  # else another reader was first
                self._note_damaged(segment.path, scan)
                segment.size, segment.count = scan.end, len(records)
                segment.tenants = _tally(records, {})
                segment.last_seq = records[-1].seq if records else segment.first_seq - 1
                self._note_tenants(records)
                segment.index = index


def _with_damage(records: list[Record], after: int, scan: _Scan) -> Iterable[Record]:
    """The records with a `damaged` gap wherever damaged lines sat between two of them."""
    if not scan.damaged:
        yield from records
        return
    prev = after
    for record in records:
        if first_of(record) > prev + 1:
            yield Gap(prev + 1, first_of(record) - 1, GapReason.DAMAGED)
        yield record
        prev = record.seq
