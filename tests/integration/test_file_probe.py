"""bpf/file.c loaded and attached for real: a stand-in backend's file operations arrive,
decoded and resolved; a process outside the filter produces nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.standin import StandIn
from zonewatch.model import Share, Vmm, Zone
from zonewatch.pipeline import FileEventBuilder
from zonewatch.probes.file import FileProbe
from zonewatch.probes.records import FileOp, FileRecord

ZONE_KEY = 41


@pytest.fixture(scope="module")
def probe() -> Iterator[FileProbe]:
    p = FileProbe()
    p.attach()
    try:
        yield p
    finally:
        p.detach()


def drain_until(probe: FileProbe, done: callable, timeout: float = 5.0) -> list[FileRecord]:  # type: ignore[valid-type]
    """Poll the ring buffer until `done(records)` holds (events are awaited, not slept on)."""
    records: list[FileRecord] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records += probe.poll(50)
        if done(records):
            return records
    return records


def test_standin_file_operations_arrive_attributed(probe: FileProbe, tmp_path: Path) -> None:
    with StandIn(tmp_path) as standin:
        probe.set_zone_pids({standin.pid: ZONE_KEY})
        standin.do(
            "create a.txt 1000",
            "read a.txt",
            "mkdir d",
            "chmod a.txt",
            "rename a.txt d/b.txt",
            "unlink d/b.txt",
            "rmdir d",
        )
        records = drain_until(
            probe,
            lambda rs: any(
                r.op == FileOp.RMDIR or (r.op == FileOp.UNLINK and r.path == b"d") for r in rs
            ),
        )
        probe.set_zone_pids({})
        assert records, "no records from the stand-in"
        assert {r.zone_key for r in records} == {ZONE_KEY}
        assert {r.pid for r in records} == {standin.pid}
        # Resolve while the stand-in lives: its root dirfd predates the probe, as a VMM's does.
        zone = Zone(
            id="z",
            key=ZONE_KEY,
            name="z",
            tenant="t",
            vmm=Vmm.QEMU,
            pid=standin.pid,
            start_time=0,
            shares=(Share("share", str(tmp_path), "9p", "/mnt/share"),),
        )
        builder = FileEventBuilder()
        events = [e for r in records if (e := builder.build(r, zone)) is not None]
    ops = [(e.op, e.path) for e in events if e.share]
    assert ("create", "/mnt/share/a.txt") in ops
    assert ("write", "/mnt/share/a.txt") in ops
    assert ("read", "/mnt/share/a.txt") in ops
    assert ("mkdir", "/mnt/share/d") in ops
    assert ("chmod", "/mnt/share/a.txt") in ops
    assert ("unlink", "/mnt/share/d/b.txt") in ops
    assert ("rmdir", "/mnt/share/d") in ops
    rename = next(e for e in events if e.op == "rename")
    assert (rename.path, rename.new_path) == ("/mnt/share/a.txt", "/mnt/share/d/b.txt")
    closes = [e for e in events if e.op == "close" and e.path == "/mnt/share/a.txt"]
    # The writer's close carries both writes; the reader's close carries what it read.
    assert sorted((c.bytes_written, c.bytes_read) for c in closes) == [(0, 2000), (2000, 0)]
    assert probe.lost()["file.ringbuf"] == 0


def test_process_outside_the_filter_produces_nothing(probe: FileProbe, tmp_path: Path) -> None:
    with StandIn(tmp_path) as watched, StandIn(tmp_path) as other:
        probe.set_zone_pids({watched.pid: ZONE_KEY})
        other.do("create noise.txt 10", "unlink noise.txt")
        watched.do("create marker.txt 1")
        records = drain_until(probe, lambda rs: any(r.op == FileOp.CLOSE for r in rs))
        probe.set_zone_pids({})
    assert records
    assert {r.pid for r in records} == {watched.pid}
    assert not any(b"noise" in r.path for r in records)


def test_exited_process_is_dropped_from_the_filter_by_the_kernel(
    probe: FileProbe, tmp_path: Path
) -> None:
    with StandIn(tmp_path) as standin:
        probe.set_zone_pids({standin.pid: ZONE_KEY})
        pid = standin.pid
    # sched_process_exit removed the pid in the kernel: a reused pid can't inherit the zone.
    table = probe.bpf[b"zone_pids"]
    assert table.Key(pid) not in table
    probe.set_zone_pids({})
