"""The durable alert journal: every alert is written here, and numbered, before delivery.

Layout: DIR/<first seq, 20 digits>.seg files of JSON lines, one alert per line, oldest
first; the newest segment is the active one. Sequence numbers are contiguous and survive
restarts (recovered from the active segment, or from its name when it is still empty).

Durability: an alert is written (os.write) before anyone sees it, so killing the agent
loses nothing that was delivered; fsync is batched (at most `fsync_interval_s` after a
write), so a power loss costs at most that much. A torn last line (power loss mid-write)
is cut off on open. Retention drops whole old segments by total size and by age; readers
learn what they missed as a gap between what they asked for and `first_seq`.

A failing disk (ENOSPC, EDQUOT, EIO) never fails an append: the alerts are numbered and
served to readers as usual while their lines wait in memory (at most `backlog_bytes`; beyond
that the oldest waiting lines are dropped and counted). One error line is logged per
episode; the flusher retries every `fsync_interval_s` and writes the backlog, in order, as
soon as the disk takes it.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from zonewatch.errors import ConfigError
from zonewatch.model import Alert, Severity, ZoneRef, json_bytes

log = logging.getLogger(__name__)

SUFFIX = ".seg"
INDEX_EVERY = 128  # one remembered file offset per this many records of a segment


@dataclass(slots=True)
class JournalOptions:
    max_bytes: int = 256 << 20
    max_age_s: float = 7 * 86400.0
    segment_bytes: int = 8 << 20
    fsync_interval_s: float = 0.05
    cache_records: int = 8192  # newest alerts kept in memory: catch-up reads skip the disk
    backlog_bytes: int = 64 << 20  # alert lines held in memory while the disk refuses them


@dataclass(slots=True)
class JournalHealth:
    """How the disk has treated the journal (read from any thread)."""

    backlog: int = 0  # alerts numbered but not yet on disk
    backlog_bytes: int = 0
    write_errors: int = 0  # failed write attempts
    episodes: int = 0  # times the disk started refusing writes
    dropped: int = 0  # alerts that never reached the disk: the backlog was full
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


def decode(line: bytes) -> Alert:
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


@dataclass(slots=True)
class _Segment:
    first_seq: int
    path: Path
    size: int = 0
    count: int = 0
    created: float = field(default_factory=time.time)
    # (seq, offset) every INDEX_EVERY records; built on the first read (or while writing)
    index: list[tuple[int, int]] | None = None


@dataclass(slots=True)
class ReadResult:
    alerts: list[Alert]
    first_seq: int  # the oldest retained seq when read (a gap before it was dropped)
    last_seq: int  # the newest seq in the journal when read


class Journal:
    """Thread-safe: the agent appends while the gRPC server's thread reads."""

    def __init__(self, directory: str | Path, options: JournalOptions | None = None) -> None:
        self.dir = Path(directory)
        self.options = options or JournalOptions()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = _lock_journal(self.dir)
        self._lock = threading.RLock()
        self._segments: list[_Segment] = []
        self._cache: deque[Alert] = deque(maxlen=self.options.cache_records)
        self._fd = -1
        self._to_close: list[int] = []  # rolled segments' fds: the flusher fsyncs and closes
        self._dir_dirty = False
        self._dirty = False
        self.last_seq = 0
        self.fsyncs = 0
        # Numbered alerts whose lines are not (wholly) on disk yet, oldest first; the first
        # line's leading `_head_written` bytes already are (a short write on a full disk).
        self._pending: deque[tuple[Alert, bytes]] = deque()
        self._head_written = 0
        self._roll_refused = False
        self._written_seq = 0  # the newest seq wholly on disk
        self.health = JournalHealth()
        self._recover()
        self._closed = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="zw-journal", daemon=True)
        self._flusher.start()

    # -- recovery ---------------------------------------------------------------------------

    def _recover(self) -> None:
        for path in sorted(self.dir.glob(f"*{SUFFIX}")):
            try:
                first = int(path.stem)
            except ValueError:
                continue
            st = path.stat()
            self._segments.append(_Segment(first, path, st.st_size, created=st.st_mtime))
        if not self._segments:
            self._open_segment(1)
            self.last_seq = 0
            return
        active = self._segments[-1]
        # Scan the active segment: its last whole, parseable line gives the last seq; a
        # torn tail (power loss mid-write) is cut off so appends continue on a clean line.
        data = active.path.read_bytes()
        good = 0
        seq = active.first_seq - 1
        index: list[tuple[int, int]] = []
        count = 0
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                break
            try:
                alert = decode(data[pos : end + 1])
            except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
                break
            if count % INDEX_EVERY == 0:
                index.append((alert.seq, pos))
            seq = alert.seq
            count += 1
            self._cache.append(alert)
            pos = end + 1
            good = pos
        if good < len(data):
            log.warning("journal %s: cut a torn tail of %d bytes", active.path, len(data) - good)
            with active.path.open("r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        active.size, active.count, active.index = good, count, index
        self.last_seq = self._written_seq = seq
        self._fd = os.open(active.path, os.O_WRONLY | os.O_APPEND)

    def _open_segment(self, first_seq: int, sync_dir: bool = True) -> None:
        path = self.dir / f"{first_seq:020d}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._segments.append(_Segment(first_seq, path, index=[]))
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

    def append(self, alerts: Sequence[Alert]) -> None:
        """Number the alerts (Alert.seq) and write them in one write. Never raises for the
        disk: while it refuses writes, the lines wait in memory (see the module doc)."""
        if not alerts:
            return
        with self._lock:
            for alert in alerts:
                self.last_seq += 1
                alert.seq = self.last_seq
                line = encode(alert)
                self._pending.append((alert, line))
                self.health.backlog_bytes += len(line)
            self._cache.extend(alerts)
            if not self.health.failing:  # while failing, the flusher retries
                self._drain_locked()
            self._bound_backlog_locked()
            self.health.backlog = len(self._pending)
            self._retain_locked()

    def _drain_locked(self) -> None:
        """Write the waiting lines, in order, a segment's worth per write."""
        while self._pending:
            active = self._segments[-1]
            lines: list[bytes] = []
            size = active.size
            for _alert, line in self._pending:
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
        assert active.index is not None
        if written:
            self._dirty = True  # the flusher thread fsyncs: appends never wait for the disk
        if not self._head_written and written == self.health.backlog_bytes:
            self._commit_all_locked(active)  # the usual case: everything went in one write
            return
        while written and self._pending:
            alert, line = self._pending[0]
            need = len(line) - self._head_written
            if written < need:
                self._head_written += written
                return
            written -= need
            if active.count % INDEX_EVERY == 0:
                active.index.append((alert.seq, active.size))
            active.count += 1
            active.size += len(line)
            self.health.backlog_bytes -= len(line)
            self._head_written = 0
            self._written_seq = alert.seq
            self._pending.popleft()

    def _commit_all_locked(self, active: _Segment) -> None:
        assert active.index is not None
        count, size = active.count, active.size
        for alert, line in self._pending:
            if count % INDEX_EVERY == 0:
                active.index.append((alert.seq, size))
            count += 1
            size += len(line)
        active.count, active.size = count, size
        self._written_seq = self._pending[-1][0].seq
        self._pending.clear()
        self.health.backlog_bytes = 0

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
        """Over backlog_bytes, drop the oldest waiting lines that nothing of is on disk yet
        (the head may be partly written: cutting it would tear the file)."""
        h = self.health
        dropped = 0
        while h.backlog_bytes > self.options.backlog_bytes and len(self._pending) > 1:
            keep = self._pending.popleft() if self._head_written else None
            _alert, line = self._pending.popleft()
            h.backlog_bytes -= len(line)
            dropped += 1
            if keep is not None:
                self._pending.appendleft(keep)
        if dropped:
            if not h.dropped:
                log.error(
                    "journal %s: memory backlog full (%d MiB): dropping the oldest alerts "
                    "not yet written (counted)",
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
        first = self._pending[0][0].seq if self._pending else self.last_seq + 1
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
            self._dir_dirty = True

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
                next_age_check = time.monotonic() + 1.0
            self._retry_backlog()
            self._flush_once()

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
                    "journal %s: %d alert(s) held in memory never reached the disk (%s)",
                    self.dir,
                    len(self._pending),
                    self.health.failing,
                )
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    self._fsync_locked()
                os.close(self._fd)
                self._fd = -1
            _unlock_journal(self._lock_fd)

    # -- reading ----------------------------------------------------------------------------

    def read_after(self, seq: int, limit: int = 1024) -> ReadResult:
        """Up to `limit` alerts with seq > `seq`, oldest first. When seq + 1 is older than
        retention, the read starts at first_seq: the caller sees the gap and reports it."""
        with self._lock:
            first, last = self._segments[0].first_seq, self.last_seq
            start = max(seq + 1, first)
            if start > last:
                return ReadResult([], first, last)
            cache = self._cache
            if cache and cache[0].seq <= start:
                i = start - cache[0].seq  # seqs in the cache are contiguous
                return ReadResult(
                    [cache[j] for j in range(i, min(i + limit, len(cache)))], first, last
                )
            if self._pending and start > self._written_seq:  # not on disk yet
                waiting = [a for a, _line in self._pending if a.seq >= start]
                return ReadResult(waiting[:limit], first, last)
            starts = [s.first_seq for s in self._segments]
            k = bisect.bisect_right(starts, start) - 1
            segment = self._segments[k]
            if segment.index is None:
                segment.index = self._build_index(segment)
            keys = [s for s, _ in segment.index]
            j = bisect.bisect_right(keys, start) - 1
            offset = segment.index[j][1] if j >= 0 else 0
            path, size = segment.path, segment.size
        # The file read happens outside the lock: the agent's appends never wait for it.
        out: list[Alert] = []
        try:
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read(max(0, size - offset))
        except FileNotFoundError:  # retention removed it meanwhile: the caller retries
            return ReadResult([], self.first_seq, last)
        for line in data.splitlines():
            alert = decode(line)
            if alert.seq >= start:
                out.append(alert)
                if len(out) >= limit:
                    break
        return ReadResult(out, first, last)

    @staticmethod
    def _build_index(segment: _Segment) -> list[tuple[int, int]]:
        index: list[tuple[int, int]] = []
        data = segment.path.read_bytes()[: segment.size]
        pos = 0
        n = 0
        for line in data.splitlines(keepends=True):
            if n % INDEX_EVERY == 0:
                index.append((int(orjson.loads(line)["seq"]), pos))
            pos += len(line)
            n += 1
        segment.count = n
        return index
