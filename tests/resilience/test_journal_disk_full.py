"""The journal's disk fills up under a publishing agent (the real delivery stack on a real
256 KiB tmpfs): nothing crashes, one loud error line, subscribers still get every alert with
its seq, and the alerts held in memory reach the disk, in order, once space returns."""

from __future__ import annotations

import contextlib
import errno
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.source import SourceProcess
from tests.resilience.conftest import ADMIN
from tests.resilience.support import Agent, free_port
from zonewatch.api.client import Client, open_channel
from zonewatch.journal import decode_record
from zonewatch.lab.microvm import MicroVmProcess
from zonewatch.model import Alert

COUNT = 600


def fill(path: Path) -> int:
    """Write `path` until the filesystem refuses (ENOSPC); returns the bytes it holds."""
    block = b"\0" * 4096
    with path.open("wb", buffering=0) as f:
        while (error := _write(f.fileno(), block)) is None:
            pass
    assert error == errno.ENOSPC
    return path.stat().st_size


def _write(fd: int, data: bytes) -> int | None:
    """None when written, else the errno."""
    try:
        os.write(fd, data)
    except OSError as exc:
        return exc.errno
    return None


def journal_seqs(journal: Path) -> list[int]:
    """The seqs of the whole, readable alert lines on disk, in file order (gap records and
    damaged lines left out)."""
    seqs = []
    for seg in sorted(journal.glob("*.seg")):
        for line in seg.read_bytes().splitlines(keepends=True):
            with contextlib.suppress(ValueError):
                record = decode_record(line)
                if line.endswith(b"\n") and isinstance(record, Alert):
                    seqs.append(record.seq)
    return seqs


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling files another process writes: nothing to await


def scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def receive(address: str, resume_after: int, n: int) -> tuple[list[int], list[str]]:
    """The seqs of the next n alerts after `resume_after`, and the kinds of anything else
    but heartbeats."""
    client = Client(open_channel(address), ADMIN)
    seqs: list[int] = []
    other: list[str] = []
    try:
        for msg in client.subscribe(resume_after_seq=resume_after, timeout=60):
            kind = msg.WhichOneof("msg")
            if kind == "alert":
                seqs.append(msg.alert.seq)
                if len(seqs) == n:
                    break
            elif kind != "heartbeat":
                other.append(kind)
    finally:
        client.close()
    return seqs, other


def test_full_journal_disk_keeps_alerts_in_memory_and_flushes_when_space_returns(
    tmp_path: Path, small_tmpfs: Path, tokens_file: Path
) -> None:
    journal = small_tmpfs / "journal"
    filler = small_tmpfs / "filler"
    journal.mkdir()
    filled = fill(filler)
    assert filled <= 256 << 10
    address = f"unix:{tmp_path}/zw.sock"
    log = tmp_path / "source.log"
    metrics = f"127.0.0.1:{free_port()}"
    args = ("--rate", "400", "--count", str(COUNT), "--batch", "20", "--metrics", metrics)
    with SourceProcess(journal, tokens_file, address, log, *args) as source:
        # Subscribers get every alert, numbered, while the disk refuses every line.
        seqs, other = receive(address, 0, COUNT)
        assert seqs == list(range(1, COUNT + 1))
        assert other == []
        assert source.proc.poll() is None, log.read_text()
        on_disk = journal_seqs(journal)
        assert len(on_disk) < COUNT // 4, "the disk was supposed to be full"
        errors = [line for line in log.read_text().splitlines() if "cannot write" in line]
        assert len(errors) == 1, log.read_text()  # one line for the episode, not per alert
        assert "No space left on device" in errors[0] and str(journal) in errors[0]
        held = scrape(metrics)  # the backlog and the failed writes are counted
        assert held["zonewatch_journal_backlog"] == COUNT - len(on_disk)
        assert held["zonewatch_journal_write_errors_total"] >= 1
        assert held["zonewatch_journal_dropped_total"] == 0
        os.unlink(filler)  # space returns: the flusher writes the backlog, in order
        t0 = time.monotonic()
        wait_for(lambda: len(journal_seqs(journal)) == COUNT, 10, "the backlog on disk")
        flushed_s = time.monotonic() - t0
        assert journal_seqs(journal) == list(range(1, COUNT + 1))
        assert "writable again" in log.read_text()
        assert scrape(metrics)["zonewatch_journal_backlog"] == 0
        assert source.stop() == 0
    print(f"filler {filled} B; {len(on_disk)} of {COUNT} alerts fit before the disk was full; "
          f"backlog on disk {flushed_s:.2f} s after space returned")  # fmt: skip
    # A restart numbers on from the journal and a resume from 0 replays all, exactly once.
    with SourceProcess(journal, tokens_file, address, log, "--rate", "0") as again:
        seqs, other = receive(again.address, 0, COUNT)
        assert seqs == list(range(1, COUNT + 1))
        assert other == []


def test_the_agent_on_a_full_journal_disk_raises_and_delivers_its_alerts(
    tmp_path: Path, small_tmpfs: Path, tokens_file: Path
) -> None:
    """`zonewatch run` itself: micro-VMM zones appear while its journal's disk is full; their
    audit alerts are numbered and streamed, the agent logs one error and keeps running, and
    the alerts are on disk once space returns."""
    journal = small_tmpfs / "journal"
    journal.mkdir()
    filler = small_tmpfs / "filler"
    fill(filler)  # before the agent starts: a page the journal has is room a tmpfs still has
    agent = Agent(tmp_path, tokens_file, "--no-stats", journal=journal)
    zones: list[MicroVmProcess] = []
    try:
        last = agent_last_seq(agent)
        stream = agent.client.subscribe(resume_after_seq=last, timeout=60)
        zones = [MicroVmProcess(f"full-disk-{i}", rate=10).start() for i in range(3)]
        alerts = []  # every zone's (other tests' zones may come and go on this host)
        for msg in stream:
            if msg.WhichOneof("msg") == "alert":
                alerts.append(msg.alert)
                if {z.config.name for z in zones} <= {a.zone.name for a in alerts}:
                    break
        stream.cancel()
        seqs = [a.seq for a in alerts]
        assert seqs == list(range(last + 1, last + 1 + len(seqs)))
        assert not set(seqs) & set(journal_seqs(journal)), "the disk was supposed to be full"
        errors = [x for x in agent.log.read_text().splitlines() if "cannot write" in x]
        assert len(errors) == 1, agent.log.read_text()  # once, however many alerts wait
        assert agent.scrape()["zonewatch_journal_backlog"] >= len(seqs)
        os.unlink(filler)
        wait_for(lambda: set(seqs) <= set(journal_seqs(journal)), 10, "the alerts on disk")
        assert agent.proc.poll() is None
    finally:
        for z in zones:
            z.close()
        agent.stop()
    assert agent.proc.returncode == 0
    print(f"agent on a full disk: alerts {seqs} streamed, then on disk")


def agent_last_seq(agent: Agent) -> int:
    """The journal's newest seq (a heartbeat carries it), so a subscription sees only what
    comes next."""
    stream = agent.client.subscribe(timeout=30, heartbeat_ms=100)
    try:
        for msg in stream:
            if msg.WhichOneof("msg") == "heartbeat":
                return int(msg.heartbeat.last_seq)
    finally:
        stream.cancel()
    raise AssertionError("no heartbeat")
