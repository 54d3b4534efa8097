"""The alert journal: numbering across restarts, torn tails, retention, reads, a full disk."""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.alerts import make_alert
from zonewatch import journal as journal_mod
from zonewatch.errors import ConfigError
from zonewatch.journal import Journal, JournalOptions, decode, encode


def test_append_numbers_contiguously_and_survives_restart(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    batch = [make_alert(i) for i in range(5)]
    j.append(batch)
    assert [a.seq for a in batch] == [1, 2, 3, 4, 5]
    j.close()
    j = Journal(tmp_path)
    assert j.last_seq == 5
    more = [make_alert(5)]
    j.append(more)
    assert more[0].seq == 6
    assert [a.evidence["n"] for a in j.read_after(0).alerts] == [0, 1, 2, 3, 4, 5]
    j.close()


def test_roundtrip_keeps_every_field() -> None:
    alert = make_alert(7, tenant="globex")
    alert.seq = 42
    alert.lost_in_window = 3
    assert decode(encode(alert)) == alert


def test_torn_tail_is_cut_and_numbering_continues(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.append([make_alert(i) for i in range(3)])
    j.close()
    (segment,) = tmp_path.glob("*.seg")
    with segment.open("ab") as f:
        f.write(b'{"seq":4,"ts":1,"zo')  # a write cut short by a crash
    j = Journal(tmp_path)
    assert j.last_seq == 3
    new = [make_alert(3)]
    j.append(new)
    assert new[0].seq == 4
    assert [a.seq for a in j.read_after(0).alerts] == [1, 2, 3, 4]
    j.close()


def test_second_agent_on_the_same_journal_is_refused(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    try:
        with pytest.raises(ConfigError, match="in use"):
            Journal(tmp_path)
    finally:
        j.close()


def test_reads_from_disk_across_segments(tmp_path: Path) -> None:
    # No memory cache, tiny segments: every read goes through the files and their index.
    opts = JournalOptions(segment_bytes=2048, cache_records=0)
    j = Journal(tmp_path, opts)
    for i in range(300):
        j.append([make_alert(i)])
    assert len(list(tmp_path.glob("*.seg"))) > 5
    seen = []
    position = 0
    while True:
        result = j.read_after(position, limit=37)
        if not result.alerts:
            break
        seen += [a.seq for a in result.alerts]
        position = result.alerts[-1].seq
    assert seen == list(range(1, 301))
    assert [a.evidence["n"] for a in j.read_after(149, limit=2).alerts] == [149, 150]
    j.close()


def test_size_retention_drops_old_segments_and_reads_show_the_gap(tmp_path: Path) -> None:
    opts = JournalOptions(segment_bytes=4096, max_bytes=16384, cache_records=0)
    j = Journal(tmp_path, opts)
    for i in range(500):
        j.append([make_alert(i)])
    total = sum(p.stat().st_size for p in tmp_path.glob("*.seg"))
    assert total <= 16384 + 4096  # the bound plus the active segment's last write
    assert j.first_seq > 1
    result = j.read_after(0, limit=10)
    assert result.first_seq == j.first_seq
    assert result.alerts[0].seq == j.first_seq  # the reader sees the gap 1..first_seq-1
    j.close()
    j = Journal(tmp_path, opts)  # restart keeps numbering even with old segments gone
    assert j.last_seq == 500
    j.close()


def test_age_retention(tmp_path: Path) -> None:
    opts = JournalOptions(segment_bytes=1024, max_age_s=3600)
    j = Journal(tmp_path, opts)
    for i in range(40):
        j.append([make_alert(i)])
    old = sorted(tmp_path.glob("*.seg"))[:-1]
    assert old
    past = time.time() - 7200
    for p in old:
        os.utime(p, (past, past))
    j.enforce_retention()  # what the flusher thread does each second
    remaining = sorted(tmp_path.glob("*.seg"))
    assert not set(old) & set(remaining)
    assert j.first_seq == int(remaining[0].stem)
    j.close()


def test_fsync_is_batched(tmp_path: Path) -> None:
    j = Journal(tmp_path, JournalOptions(fsync_interval_s=10))
    for i in range(200):
        j.append([make_alert(i)])
    assert j.fsyncs == 0  # none inline: the flusher thread does them, batched
    j.sync()
    assert j.fsyncs == 1
    j.close()


def test_flusher_fsyncs_soon_after_a_write(tmp_path: Path) -> None:
    j = Journal(tmp_path, JournalOptions(fsync_interval_s=0.01))
    try:
        j.append([make_alert(0)])
        deadline = time.monotonic() + 5
        while j.fsyncs == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a counter the flusher thread bumps; no event to await
        assert j.fsyncs >= 1
    finally:
        j.close()


# -- a disk that refuses writes ----------------------------------------------------------------


class FullDisk:
    """The journal's os.write as a disk with `room` bytes left: a short write, then ENOSPC
    (what ext4 and tmpfs do). `room = None` is a disk with space again."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, room: int | None) -> None:
        self.room = room
        self.refused = 0
        self._write = os.write
        monkeypatch.setattr(journal_mod.os, "write", self.write)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if self.room is None:
            return self._write(fd, data)
        if self.room == 0:
            self.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self._write(fd, bytes(data[: self.room]))
        self.room -= n
        return n


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the flusher thread never got there"
        time.sleep(0.01)  # polling state the flusher thread changes; no event to await


def on_disk(directory: Path) -> list[int]:
    """The seqs of the whole lines in the segment files."""
    return [
        decode(line).seq
        for p in sorted(directory.glob("*.seg"))
        for line in p.read_bytes().splitlines(keepends=True)
        if line.endswith(b"\n")
    ]


def test_a_full_disk_keeps_alerts_in_memory_logs_once_and_flushes_when_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    j = Journal(tmp_path, JournalOptions(fsync_interval_s=0.01))
    try:
        line = len(encode(make_alert(0)))
        disk = FullDisk(monkeypatch, room=line + line // 2)  # one line and a half fit
        batches = [[make_alert(i)] for i in range(40)]
        for batch in batches:
            j.append(batch)  # never raises
        assert [b[0].seq for b in batches] == list(range(1, 41))
        assert j.health.failing and j.health.episodes == 1
        assert j.health.backlog == 39
        wait_until(lambda: disk.refused >= 3)  # the flusher retries with no new append
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "No space left" in errors[0].getMessage()
        # Readers see every alert, numbered, while most are not on disk.
        assert [a.seq for a in j.read_after(0, limit=100).alerts] == list(range(1, 41))
        assert on_disk(tmp_path) == [1]
        assert not next(tmp_path.glob("*.seg")).read_bytes().endswith(b"\n")  # half a line
        disk.room = None
        wait_until(lambda: j.health.backlog == 0)
        assert not j.health.failing and j.health.dropped == 0
        assert on_disk(tmp_path) == list(range(1, 41))  # the half line was completed
    finally:
        j.close()
    j = Journal(tmp_path)
    assert j.last_seq == 40
    assert [a.evidence["n"] for a in j.read_after(0, limit=100).alerts] == list(range(40))
    j.close()


def test_the_memory_backlog_is_bounded_drops_the_oldest_and_readers_see_the_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = len(encode(make_alert(0)))
    opts = JournalOptions(fsync_interval_s=0.01, backlog_bytes=10 * line, cache_records=0)
    j = Journal(tmp_path, opts)
    try:
        disk = FullDisk(monkeypatch, room=0)
        for i in range(50):
            j.append([make_alert(i)])
        kept = j.health.backlog
        assert 5 <= kept <= 10
        assert j.health.dropped == 50 - kept
        assert j.health.backlog_bytes <= 10 * line
        # The newest alerts stay readable; the dropped ones are a gap the reader sees.
        assert [a.seq for a in j.read_after(0, limit=100).alerts] == list(range(51 - kept, 51))
        disk.room = None
        wait_until(lambda: j.health.backlog == 0)
    finally:
        j.close()
    j = Journal(tmp_path, opts)  # numbering continues after the newest, never reuses a seq
    assert j.last_seq == 50
    assert on_disk(tmp_path) == list(range(51 - kept, 51))
    j.close()


def test_a_segment_roll_on_a_full_disk_keeps_the_active_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = Journal(tmp_path, JournalOptions(segment_bytes=1024, fsync_interval_s=0.01))
    try:
        disk = FullDisk(monkeypatch, room=3000)
        for i in range(60):
            j.append([make_alert(i)])
        assert j.health.failing
        disk.room = None
        wait_until(lambda: j.health.backlog == 0)
        assert len(list(tmp_path.glob("*.seg"))) > 3
        assert on_disk(tmp_path) == list(range(1, 61))
        for seg in tmp_path.glob("*.seg"):  # each segment is named by its first seq
            lines = seg.read_bytes().splitlines()
            assert not lines or decode(lines[0]).seq == int(seg.stem)
    finally:
        j.close()
