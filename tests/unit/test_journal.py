"""The alert journal: numbering across restarts, torn tails, retention, reads."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.helpers.alerts import make_alert
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
