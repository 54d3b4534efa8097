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
from zonewatch.journal import (
    Gap,
    GapReason,
    Journal,
    JournalOptions,
    Record,
    decode,
    decode_record,
    encode,
)
from zonewatch.model import Alert


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
    # The reader gets the seqs retention dropped as one gap, with whose alerts they were.
    first = j.first_seq
    assert result.records[0] == Gap(1, first - 1, GapReason.RETENTION, {"acme": first - 1})
    assert result.alerts[0].seq == first
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
        record.seq
        for p in sorted(directory.glob("*.seg"))
        for line in p.read_bytes().splitlines(keepends=True)
        if line.endswith(b"\n") and isinstance(record := decode_record(line), Alert)
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


def test_the_memory_backlog_is_bounded_drops_the_oldest_as_one_gap_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = len(encode(make_alert(0)))
    opts = JournalOptions(fsync_interval_s=0.01, backlog_bytes=10 * line, cache_records=0)
    j = Journal(tmp_path, opts)
    try:
        disk = FullDisk(monkeypatch, room=0)
        for i in range(50):
            j.append([make_alert(i)])
        kept = j.health.backlog - 1  # the alerts waiting, after one gap record for the rest
        assert 5 <= kept <= 10
        assert j.health.dropped == 50 - kept
        assert j.health.backlog_bytes <= 11 * line
        # The newest alerts stay readable; the dropped ones are a gap saying whose they were.
        gap, *alerts = j.read_after(0, limit=100).records
        assert gap == Gap(1, 50 - kept, GapReason.NOT_WRITTEN, {"acme": 50 - kept})
        assert [a.seq for a in alerts] == list(range(51 - kept, 51))
        disk.room = None
        wait_until(lambda: j.health.backlog == 0)
    finally:
        j.close()
    j = Journal(tmp_path, opts)  # numbering continues after the newest, never reuses a seq
    assert j.last_seq == 50
    assert on_disk(tmp_path) == list(range(51 - kept, 51))
    assert isinstance(j.read_after(0).records[0], Gap)  # the gap is on disk too
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


# -- damage and crashes: a seq is never issued twice, a lost one is always named ---------------


def lines_of(directory: Path) -> list[bytes]:
    return [x for p in sorted(directory.glob("*.seg")) for x in p.read_bytes().splitlines(True)]


def corrupt_line(segment: Path, index: int) -> bytes:
    """Overwrites the middle of line `index` with garbage (its length and newline kept)."""
    lines = segment.read_bytes().splitlines(keepends=True)
    old = lines[index]
    lines[index] = old[:10] + b"\xff#garbage##" + old[21:]
    segment.write_bytes(b"".join(lines))
    return old


def read_all(j: Journal, after: int = 0) -> list[Record]:
    out = []
    while True:
        records = j.read_after(after, limit=7).records
        if not records:
            return out
        out += records
        after = records[-1].seq


def test_a_damaged_line_in_the_active_segment_is_skipped_and_nothing_after_it_is_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    j = Journal(tmp_path)
    j.append([make_alert(i) for i in range(10)])
    j.close()
    (segment,) = tmp_path.glob("*.seg")
    size = segment.stat().st_size
    corrupt_line(segment, 4)  # seq 5
    j = Journal(tmp_path)
    assert segment.stat().st_size == size  # nothing cut: every good line after it stays
    assert j.health.damaged == 1
    assert any("1 damaged record" in r.getMessage() for r in caplog.records)
    new = [make_alert(10)]
    j.append(new)
    assert new[0].seq == 11  # numbering goes on after the newest good line: 5 is not reused
    records = read_all(j)  # from memory
    assert [r.seq for r in records] == list(range(1, 12))
    assert records[4] == Gap(5, 5, GapReason.DAMAGED)
    j.close()
    j = Journal(tmp_path, JournalOptions(cache_records=0))  # the same from the file
    records = read_all(j)
    assert records[4] == Gap(5, 5, GapReason.DAMAGED)
    assert [r.seq for r in records if isinstance(r, Alert)] == [1, 2, 3, 4, *range(6, 12)]
    j.close()


def test_a_damaged_seq_field_costs_that_record_only(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.append([make_alert(i) for i in range(10)])
    j.close()
    (segment,) = tmp_path.glob("*.seg")
    data = segment.read_bytes()
    segment.write_bytes(data.replace(b'{"seq":5,', b'{"seq":9,'))  # valid JSON, wrong seq
    j = Journal(tmp_path, JournalOptions(cache_records=0))
    records = read_all(j)
    assert records[4] == Gap(5, 5, GapReason.DAMAGED)
    assert [r.seq for r in records if isinstance(r, Alert)] == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    j.close()


def test_a_damaged_last_line_becomes_a_gap_record_and_is_not_reused(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.append([make_alert(i) for i in range(3)])
    j.close()
    (segment,) = tmp_path.glob("*.seg")
    corrupt_line(segment, 2)  # whole (it ends in a newline) but unreadable: not a torn write
    j = Journal(tmp_path)
    new = [make_alert(3)]
    j.append(new)
    assert new[0].seq == 4
    assert read_all(j)[2] == Gap(3, 3, GapReason.DAMAGED)
    j.close()


def test_a_damaged_line_in_an_older_segment_becomes_a_gap_for_readers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    opts = JournalOptions(segment_bytes=2048, cache_records=0)
    j = Journal(tmp_path, opts)
    for i in range(60):
        j.append([make_alert(i)])
    j.close()
    segments = sorted(tmp_path.glob("*.seg"))
    assert len(segments) > 3
    first_of_second = int(segments[1].stem)
    corrupt_line(segments[1], 1)  # the second record of the second segment
    corrupt_line(segments[0], -1)  # and the last line of the first: the gap reaches the next
    j = Journal(tmp_path, opts)
    records = read_all(j)
    assert [r.seq for r in records] == list(range(1, 61))
    gaps = [r for r in records if isinstance(r, Gap)]
    assert gaps == [
        Gap(first_of_second - 1, first_of_second - 1, GapReason.DAMAGED),
        Gap(first_of_second + 1, first_of_second + 1, GapReason.DAMAGED),
    ]
    # Reading from right before either damaged record also works (the index skips it).
    assert j.read_after(first_of_second, limit=1).records == [gaps[1]]
    j.close()


def crash(j: Journal) -> None:
    """The agent killed: no close(), nothing more written (the page cache stays, as after
    kill -9)."""
    j._closed.set()
    j._flusher.join()
    os.close(j._fd)
    journal_mod._unlock_journal(j._lock_fd)  # as a dying process's lock goes


def test_alerts_held_in_memory_at_a_crash_are_a_not_written_gap_and_never_reissued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = Journal(tmp_path, JournalOptions(fsync_interval_s=0.01))
    j.append([make_alert(i) for i in range(5)])
    disk = FullDisk(monkeypatch, room=0)
    j.append([make_alert(i) for i in range(5, 12)])  # numbered 6-12, held in memory
    assert j.health.backlog == 7
    crash(j)
    disk.room = None
    j = Journal(tmp_path)
    assert j.last_seq == 12
    new = [make_alert(12)]
    j.append(new)
    assert new[0].seq == 13  # 6-12 went to subscribers with other content: never again
    records = read_all(j)
    assert records[5] == Gap(6, 12, GapReason.NOT_WRITTEN)
    assert [r.seq for r in records] == [1, 2, 3, 4, 5, 12, 13]
    j.close()
    assert Journal(tmp_path).last_seq == 13  # a clean stop leaves no gap behind it


def test_a_host_restart_reports_the_reserved_seqs_as_possibly_lost(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.append([make_alert(i) for i in range(3)])
    crash(j)
    (meta,) = tmp_path.glob("meta-*")
    meta.rename(meta.with_name(meta.name.replace(journal_mod.host_boot_id(), "another-boot")))
    j = Journal(tmp_path)
    (gap,) = [r for r in read_all(j) if isinstance(r, Gap)]
    assert (gap.first, gap.reason) == (4, GapReason.POWER_LOSS)
    assert gap.last == journal_mod.RESERVE_BLOCK == j.last_seq  # reserved at the first start
    j.close()


def test_the_epoch_survives_restarts_and_a_wiped_journal_gets_a_new_one(tmp_path: Path) -> None:
    j = Journal(tmp_path / "a")
    epoch = j.epoch
    j.append([make_alert(0)])
    j.close()
    j = Journal(tmp_path / "a")
    assert j.epoch == epoch
    j.close()
    j = Journal(tmp_path / "b")
    assert j.epoch != epoch
    j.close()


def test_a_damaged_meta_file_starts_a_new_epoch_and_numbering_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    j = Journal(tmp_path)
    epoch = j.epoch
    j.append([make_alert(i) for i in range(4)])
    j.close()
    (meta,) = tmp_path.glob("meta-*")
    meta.rename(meta.with_name("meta-\\x00garbage"))
    j = Journal(tmp_path)
    assert j.epoch != epoch and j.last_seq == 4
    assert any("damaged" in r.getMessage() for r in caplog.records)
    j.close()


def test_a_reservation_is_fsynced_before_its_seqs_are_issued(tmp_path: Path) -> None:
    j = Journal(tmp_path, JournalOptions(fsync_interval_s=3600))  # no help from the flusher
    block = journal_mod.RESERVE_BLOCK
    j.append([make_alert(i) for i in range(block + 10)])
    (meta,) = tmp_path.glob("meta-*")
    reserved = int(meta.name.split("-")[2])
    assert reserved >= block + 10
    j.close()


def test_tenant_last_seqs(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.append([make_alert(0, "acme"), make_alert(1, "globex"), make_alert(2, "acme")])
    assert j.last_seq_of(frozenset({"acme"})) == 3
    assert j.last_seq_of(frozenset({"globex"})) == 2
    assert j.last_seq_of(frozenset({"initech"})) == 0
    assert j.last_seq_of(None) == 3
    j.close()
    j = Journal(tmp_path)  # recovered from the active segment
    assert j.last_seq_of(frozenset({"globex", "initech"})) == 2
    j.close()


def test_retention_gaps_count_a_tenant_only_when_its_alerts_are_wholly_inside(
    tmp_path: Path,
) -> None:
    j = Journal(tmp_path, JournalOptions(segment_bytes=2048, max_bytes=4096, cache_records=0))
    j.append([make_alert(0, "acme"), make_alert(1, "globex"), make_alert(2, "acme")])  # 1-3
    for i in range(60):
        j.append([make_alert(i, "globex")])
    first = j.first_seq
    assert first > 4
    whole = j.read_after(0).records[0]  # every alert of the dropped segments
    assert isinstance(whole, Gap)
    assert whole.tenants is not None and whole.tenants["acme"] == 2
    straddling = j.read_after(1).records[0]  # acme's seq 1 is before it, 3 inside
    assert isinstance(straddling, Gap)
    assert straddling.tenants is not None
    assert straddling.tenants["acme"] == journal_mod.UNKNOWN_COUNT
    after = j.read_after(3).records[0]  # all of acme's are before it: none lost
    assert isinstance(after, Gap)
    assert after.tenants is not None and "acme" not in after.tenants
    assert after.tenants["globex"] == journal_mod.UNKNOWN_COUNT  # its seq 2 is before it
    j.close()
