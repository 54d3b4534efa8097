"""The file channel's low-overhead hooks (`--file-hooks uprobes`) loaded for real: per-process
uprobes on libc see a stand-in backend's file operations as the same records the syscall
tracepoints make (both probes watch the same process at once), threads started after the
hooking included; by default only positional I/O is hooked (what 9p backends use for file
data); a process outside the filter is not even hooked."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.standin import StandIn
from zonewatch.probes.file import FileProbe
from zonewatch.probes.records import FileOp, FileRecord

ZONE_KEY = 43
OPS = (
    "create a.txt 1000",
    "read a.txt",
    "mkdir d",
    "chmod a.txt",
    "rename a.txt d/b.txt",
    "unlink d/b.txt",
    "rmdir d",
    "open-missing nothere.txt",
)


@pytest.fixture(scope="module")
def uprobes() -> Iterator[FileProbe]:
    p = FileProbe(hooks="uprobes")
    p.attach()
    try:
        yield p
    finally:
        p.detach()


@pytest.fixture(scope="module")
def uprobes_all() -> Iterator[FileProbe]:
    """Also read/write/readv/writev: every call the tracepoint path hooks."""
    p = FileProbe(hooks="uprobes", uprobe_stream_io=True)
    p.attach()
    try:
        yield p
    finally:
        p.detach()


@pytest.fixture(scope="module")
def tracepoints() -> Iterator[FileProbe]:
    p = FileProbe(hooks="tracepoints")
    p.attach()
    try:
        yield p
    finally:
        p.detach()


def drain_until(
    probe: FileProbe, done: Callable[[list[FileRecord]], bool], timeout: float = 5.0
) -> list[FileRecord]:
    """Poll the ring buffer until `done(records)` holds (events are awaited, not slept on)."""
    records: list[FileRecord] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records += probe.poll(50)
        if done(records):
            return records
    return records


def comparable(r: FileRecord) -> tuple[object, ...]:
    return (
        r.zone_key, r.pid, r.tid, r.comm, r.op, r.dirfd, r.dirfd2, r.mode, r.ret, r.flags,
        r.bytes_read, r.bytes_written, r.path, r.path2,
    )  # fmt: skip


def both_failed_opens(rs: list[FileRecord]) -> bool:
    return sum(r.op == FileOp.OPEN and r.path == b"nothere.txt" for r in rs) == 2


def test_uprobes_make_the_records_tracepoints_make(
    uprobes_all: FileProbe, tracepoints: FileProbe, tmp_path: Path
) -> None:
    uprobes = uprobes_all
    with StandIn(tmp_path) as standin:
        for probe in (uprobes, tracepoints):
            probe.set_zone_pids({standin.pid: ZONE_KEY})
        assert uprobes.hooked_pids == {standin.pid}
        standin.do(*OPS, "pcreate p.txt 100", "pread p.txt", "open-missing nothere.txt")
        by_uprobe = drain_until(uprobes, both_failed_opens)
        by_tracepoint = drain_until(tracepoints, both_failed_opens)
        for probe in (uprobes, tracepoints):
            probe.set_zone_pids({})
        assert uprobes.hooked_pids == set()
    assert {r.op for r in by_tracepoint} >= {
        FileOp.OPEN, FileOp.WRITE, FileOp.READ, FileOp.CLOSE, FileOp.MKDIR, FileOp.CHMOD,
        FileOp.RENAME, FileOp.UNLINK,
    }  # fmt: skip
    # A failed call: the syscall's -errno at the tracepoint; the libc wrapper returns -1
    # and the uretprobe reads errno through the thread pointer (zonewatch/probes/tls.py).
    failed = [r.ret for r in by_uprobe + by_tracepoint if r.path == b"nothere.txt"]
    assert failed == [-2] * 4
    assert [comparable(r) for r in by_uprobe] == [comparable(r) for r in by_tracepoint]
    assert uprobes.lost()["file.ringbuf"] == 0
    assert uprobes.lost()["file.pending"] == 0


def test_by_default_file_data_is_seen_through_positional_io_only(
    uprobes: FileProbe, tmp_path: Path
) -> None:
    with StandIn(tmp_path) as standin:
        uprobes.set_zone_pids({standin.pid: ZONE_KEY})
        standin.do("pcreate p.txt 100", "pread p.txt", "create s.txt 10", "unlink s.txt")
        records = drain_until(uprobes, lambda rs: any(r.op == FileOp.UNLINK for r in rs))
        uprobes.set_zone_pids({})
    closes = sorted((r.bytes_written, r.bytes_read) for r in records if r.op == FileOp.CLOSE)
    assert closes == [(0, 200), (200, 0)]
    assert [r.ret for r in records if r.op == FileOp.WRITE] == [100]
    assert [r.ret for r in records if r.op == FileOp.READ] == [200]
    # write() is not hooked: s.txt shows its open (and unlink), no I/O and no close.
    assert [r.op for r in records if r.path == b"s.txt"] == [FileOp.OPEN, FileOp.UNLINK]


def test_threads_started_after_hooking_are_covered(uprobes: FileProbe, tmp_path: Path) -> None:
    with StandIn(tmp_path) as standin:
        uprobes.set_zone_pids({standin.pid: ZONE_KEY})
        standin.do("thread pcreate t.txt 10", "thread unlink t.txt", "thread open-missing t.txt")
        records = drain_until(uprobes, lambda rs: any(r.ret < 0 for r in rs))
        uprobes.set_zone_pids({})
    ops = [(r.op, r.path) for r in records]
    assert (FileOp.OPEN, b"t.txt") in ops
    # errno is per thread (its own thread pointer): this thread's ENOENT.
    assert [r.ret for r in records if r.ret < 0] == [-2]
    assert (FileOp.UNLINK, b"t.txt") in ops
    assert any(r.op == FileOp.CLOSE and r.bytes_written == 20 for r in records)
    assert {r.pid for r in records} == {standin.pid}
    # Each op ran in a thread of its own, made after the uprobes were attached.
    assert standin.pid not in {r.tid for r in records}
    assert len({r.tid for r in records}) == 3


def test_process_outside_the_filter_is_not_hooked(uprobes: FileProbe, tmp_path: Path) -> None:
    with StandIn(tmp_path) as watched, StandIn(tmp_path) as other:
        uprobes.set_zone_pids({watched.pid: ZONE_KEY})
        assert uprobes.hooked_pids == {watched.pid}
        other.do("pcreate noise.txt 10", "unlink noise.txt")
        watched.do("pcreate marker.txt 1")
        records = drain_until(uprobes, lambda rs: any(r.op == FileOp.CLOSE for r in rs))
        # Dropped from the filter: unhooked, and its operations are no records any more.
        uprobes.set_zone_pids({})
        assert uprobes.hooked_pids == set()
        watched.do("pcreate after.txt 1")
        records += drain_until(uprobes, lambda rs: False, timeout=0.5)
    assert records
    assert {r.pid for r in records} == {watched.pid}
    assert not any(b"noise" in r.path or b"after" in r.path for r in records)


def test_a_pid_given_to_another_zone_is_hooked_anew(uprobes: FileProbe, tmp_path: Path) -> None:
    """The inventory gives a reused pid a new zone key: its old perf events were bound to
    the process that had the pid, so the probe unhooks it and hooks the pid again."""
    with StandIn(tmp_path) as standin:
        uprobes.set_zone_pids({standin.pid: ZONE_KEY})
        uprobes.set_zone_pids({standin.pid: ZONE_KEY + 1})
        assert uprobes.hooked_pids == {standin.pid}
        standin.do("pcreate k.txt 1")
        records = drain_until(uprobes, lambda rs: any(r.op == FileOp.CLOSE for r in rs))
        uprobes.set_zone_pids({})
    assert records
    assert {r.zone_key for r in records} == {ZONE_KEY + 1}
