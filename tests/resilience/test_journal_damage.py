"""The journal never loses or renumbers an alert (issue 14): an agent-like process (the real
delivery stack, tests/helpers/alert_source.py) over a journal that was (a) damaged in the
middle of its active segment, (b) damaged in an older segment, (c) on a full disk when the
process was killed. Each ends with every alert that reached the disk delivered exactly once
to a resuming subscriber, no seq issued twice, and every other seq named in a `lost`
notice."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.alerts import make_alert
from tests.helpers.source import SourceProcess
from tests.resilience.conftest import ADMIN
from tests.resilience.test_journal_disk_full import fill, journal_seqs, wait_for
from zonewatch.api.client import Client, open_channel
from zonewatch.journal import Journal, JournalOptions


@dataclass(slots=True)
class Stream:
    """What one subscription received: alerts (seq -> serialized Alert, in arrival order)
    and lost notices, up to a heartbeat at or past a seq."""

    alerts: dict[int, bytes] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    lost: list[Any] = field(default_factory=list)
    cursor: tuple[int, str] = (0, "")

    def lost_seqs(self) -> set[int]:
        return {s for x in self.lost for s in range(x.first_seq, x.last_seq + 1)}


def read_stream(
    address: str, after: int | None, epoch: str = "", until: int = 0, into: Stream | None = None
) -> Stream:
    """Subscribes (resuming after `after`) and reads until a heartbeat whose cursor is at or
    past `until` (the stream is caught up with the journal's end)."""
    out = into or Stream()
    client = Client(open_channel(address), ADMIN)
    try:
        stream = client.subscribe(resume_after_seq=after, resume_epoch=epoch, heartbeat_ms=200,
                                  timeout=120)  # fmt: skip
        for msg in stream:
            kind = msg.WhichOneof("msg")
            out.cursor = (msg.cursor.seq, msg.cursor.epoch)
            if kind == "alert":
                assert msg.alert.seq not in out.alerts, f"seq {msg.alert.seq} delivered twice"
                out.alerts[msg.alert.seq] = msg.alert.SerializeToString()
                out.order.append(msg.alert.seq)
            elif kind == "lost":
                out.lost.append(msg.lost)
            elif msg.cursor.seq >= until:
                break
        stream.cancel()
    finally:
        client.close()
    return out


def corrupt_line(segment: Path, index: int) -> int:
    """Garbage in the middle of line `index` (its length and newline kept, as a bad sector
    or a stray write would leave it); returns the file's size."""
    lines = segment.read_bytes().splitlines(keepends=True)
    old = lines[index]
    lines[index] = old[:12] + b"\x00\xff not json \x00" + old[26:]
    segment.write_bytes(b"".join(lines))
    return segment.stat().st_size


def assert_exactly_once(stream: Stream, last: int, on_disk: list[int]) -> None:
    """Every seq 1..last is an alert or named by a `lost`, never both, never twice; every
    alert on disk was delivered, in order."""
    assert stream.order == sorted(stream.order)
    assert stream.lost_seqs().isdisjoint(stream.alerts)
    assert set(stream.alerts) | stream.lost_seqs() == set(range(1, last + 1))
    assert sorted(set(on_disk)) == on_disk  # the journal itself holds each seq once
    assert set(on_disk) == set(stream.alerts)


def test_a_damaged_line_in_the_active_segment_costs_that_alert_only(
    tmp_path: Path, tokens_file: Path
) -> None:
    journal = tmp_path / "journal"
    address = f"unix:{tmp_path}/zw.sock"
    log = tmp_path / "source.log"
    first = Stream()
    with SourceProcess(journal, tokens_file, address, log, "--rate", "2000", "--count", "1000",
                       "--batch", "50") as source:  # fmt: skip
        read_stream(address, 0, until=1000, into=first)
        assert first.order == list(range(1, 1001))
        source.stop(signal.SIGKILL)
    (segment,) = journal.glob("*.seg")
    size = corrupt_line(segment, 500)  # seq 501
    with SourceProcess(journal, tokens_file, address, log, "--rate", "1000", "--count", "200",
                       "--batch", "20"):  # fmt: skip
        again = read_stream(address, 0, until=1200)
        resumed = read_stream(address, *first.cursor, until=1200)
    text = log.read_text()
    assert "cut a torn" not in text, text
    assert "1 damaged record(s)" in text
    assert segment.stat().st_size >= size  # nothing after the damaged line was cut
    assert_exactly_once(again, 1200, journal_seqs(journal))
    (lost,) = again.lost
    assert (lost.reason, lost.first_seq, lost.last_seq, lost.count) == ("damaged", 501, 501, 1)
    # No seq was issued again: what the first run delivered is what is on disk now.
    assert all(again.alerts[s] == first.alerts[s] for s in range(1, 1001) if s != 501)
    # The subscriber that read everything before resumes with the new alerts only.
    assert resumed.order == list(range(1001, 1201)) and not resumed.lost
    print(f"damaged active segment: {len(again.alerts)} alerts, lost {[501]}")


def test_a_damaged_line_in_an_older_segment_never_fails_a_stream(
    tmp_path: Path, tokens_file: Path
) -> None:
    journal = tmp_path / "journal"
    j = Journal(journal, JournalOptions(segment_bytes=16 << 10))
    for i in range(600):
        j.append([make_alert(i, "acme" if i % 2 == 0 else "globex")])
    j.close()
    segments = sorted(journal.glob("*.seg"))
    assert len(segments) >= 4
    second, third = int(segments[1].stem), int(segments[2].stem)
    corrupt_line(segments[1], 10)  # seq second + 10, in the middle of an old segment
    corrupt_line(segments[2], -1)  # the last line of another: its seq is third's next - 1
    damaged = {second + 10, int(segments[3].stem) - 1}
    address = f"unix:{tmp_path}/zw.sock"
    log = tmp_path / "source.log"
    with SourceProcess(journal, tokens_file, address, log, "--rate", "0"):
        # The agent says so soon after it starts, before any reader hits the damage.
        wait_for(lambda: log.read_text().count("1 damaged record") == 2, 10, "the damage logged")
        streams = [read_stream(address, 0, until=600) for _ in range(2)]  # every time
        near = read_stream(address, second + 9, until=600)
        inside = read_stream(address, third, until=600)
    for stream in streams:
        assert_exactly_once(stream, 600, journal_seqs(journal))
        assert stream.lost_seqs() == damaged
        assert {x.reason for x in stream.lost} == {"damaged"}
    assert near.lost[0].first_seq == second + 10 and near.order[0] == second + 11
    assert inside.lost_seqs() == {max(damaged)}


@pytest.mark.parametrize("full", ["after-50", "from-start"])
def test_alerts_held_in_memory_on_a_full_disk_then_kill9_are_lost_and_never_reissued(
    tmp_path: Path, small_tmpfs: Path, tokens_file: Path, full: str
) -> None:
    journal = small_tmpfs / "journal"
    journal.mkdir()
    filler = small_tmpfs / "filler"
    if full == "from-start":
        fill(filler)  # not even the journal's first line fits
    address = f"unix:{tmp_path}/zw.sock"
    log = tmp_path / "source.log"
    live = Stream()
    with SourceProcess(journal, tokens_file, address, log, "--rate", "200", "--count", "600",
                       "--batch", "10") as source:  # fmt: skip
        reader = threading.Thread(target=read_stream, args=(address, 0),
                                  kwargs={"until": 600, "into": live})  # fmt: skip
        reader.start()
        try:
            if full == "after-50":
                wait_for(lambda: len(live.order) >= 50, 30, "the first alerts")
                fill(filler)  # the disk is full now: the journal keeps the rest in memory
        finally:
            reader.join(60)
        assert live.order == list(range(1, 601))
        written = journal_seqs(journal)
        assert len(written) < 600, "the disk was supposed to be full"
        source.stop(signal.SIGKILL)  # the alerts held in memory die with it
    os.unlink(filler)
    with SourceProcess(journal, tokens_file, address, log, "--rate", "200", "--count", "100",
                       "--batch", "10"):  # fmt: skip
        resumed = read_stream(address, *live.cursor, until=700)
        again = read_stream(address, 0, until=700)
    text = log.read_text()
    assert "were issued but never reached the disk" in text
    assert "cannot record the seq reservation" not in text  # renames work on a full disk
    # The live subscriber resumes with new seqs only: none of 1-600 came again.
    assert resumed.order == list(range(601, 701)) and not resumed.lost
    # From the start: what reached the disk exactly once, the rest named as lost.
    assert_exactly_once(again, 700, journal_seqs(journal))
    assert set(written) <= set(again.alerts)
    (lost,) = again.lost
    assert lost.reason == "not_written"
    assert (lost.first_seq, lost.last_seq) == (len(written) + 1, 600)
    assert lost.count == 600 - len(written)
    for seq, data in again.alerts.items():  # no seq came with other content
        assert data == (live.alerts.get(seq) or resumed.alerts[seq])
    print(f"full disk + kill -9: {len(written)} of 600 on disk, {lost.count} named lost, "
          f"601-700 new")  # fmt: skip


def test_a_cursor_from_a_wiped_journal_is_told_and_replays_the_new_one(
    tmp_path: Path, tokens_file: Path
) -> None:
    address = f"unix:{tmp_path}/zw.sock"
    log = tmp_path / "source.log"
    with SourceProcess(tmp_path / "old", tokens_file, address, log, "--rate", "2000", "--count",
                       "300", "--batch", "50"):  # fmt: skip
        old = read_stream(address, 0, until=300)
    seq, epoch = old.cursor
    with SourceProcess(tmp_path / "new", tokens_file, address, log, "--rate", "2000", "--count",
                       "100", "--batch", "50"):  # fmt: skip
        told = read_stream(address, seq, epoch, until=100)
        ahead = read_stream(address, seq, until=100)  # no epoch: past the end tells it too
        try:
            behind = read_stream(address, 50, epoch, until=100)  # behind, other epoch
        except grpc.RpcError as exc:
            raise AssertionError(exc) from exc
    for stream, reason in ((told, "epoch"), (ahead, "ahead"), (behind, "epoch")):
        assert [(x.reason, x.count_unknown) for x in stream.lost] == [(reason, True)]
        assert stream.order == list(range(1, 101))  # the new journal from its start
        assert stream.cursor[1] != epoch
