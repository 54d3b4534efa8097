"""gRPC consumers failing and coming back, over and over, while alerts are published at
1 000 a second: `zonewatch tail` processes killed with SIGKILL mid-stream, and 200
subscribers that read a few alerts and vanish (half cancel, half drop their connection).
Publishing never waits on them, the server forgets every one of them, this process's fds
and memory come back, and a consumer that resumes from where it stopped misses nothing.

OTLP collector down and back: test_otlp_flapping.py here, and
tests/integration/test_grpc_stream.py (test_otlp_down_then_up_delivery_goes_on); a slow
subscriber and kill -9 of the agent with resume: the same file."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.alerts import make_alert
from tests.resilience.conftest import ADMIN
from zonewatch.api.auth import TokenStore
from zonewatch.api.client import Client, open_channel
from zonewatch.api.server import GrpcServer, ServerConfig
from zonewatch.delivery import Delivery
from zonewatch.journal import Journal

RATE = 1000  # alerts per second
TAILS = 20  # zonewatch tail processes killed mid-stream
SUBSCRIBERS = 200
ROOT = Path(__file__).resolve().parents[2]


class Publisher:
    """Publishes RATE alerts a second in batches of 10 from its own thread (the agent's
    role), timing each publish()."""

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery
        self.slowest = 0.0
        self.published = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(0.01):
            due = int((time.monotonic() - start) * RATE) - self.published
            if due <= 0:
                continue
            t0 = time.monotonic()
            self.delivery.publish([make_alert(self.published + i) for i in range(due)])
            self.slowest = max(self.slowest, time.monotonic() - t0)
            self.published += due

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def delivery(tmp_path: Path, tokens_file: Path) -> Iterator[Delivery]:
    journal = Journal(tmp_path / "journal")
    server = GrpcServer(
        ServerConfig(TokenStore.load(tokens_file), address=f"unix:{tmp_path}/zw.sock",
                     queue_bound=256, heartbeat_s=0.2),
        journal,
    ).start()  # fmt: skip
    d = Delivery(journal, [], server)
    try:
        yield d
    finally:
        d.close()


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def kill_tails_mid_stream(address: str, n: int) -> None:
    """`zonewatch tail` processes, each SIGKILLed once it has printed alerts."""
    for _ in range(n):
        tail = subprocess.Popen(
            [sys.executable, "-m", "zonewatch", "tail", "--server", address, "--token", ADMIN,
             "--json"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert tail.stdout is not None
            for _ in range(3):
                assert tail.stdout.readline().startswith(b"{")
        finally:
            tail.send_signal(signal.SIGKILL)
            tail.wait()
            tail.stdout.close()  # type: ignore[union-attr]


def vanish(address: str, i: int) -> int:
    """A subscriber that reads 5 alerts, then cancels (even i) or just drops its connection
    (odd i); returns the last seq it saw."""
    client = Client(open_channel(address), ADMIN)
    stream = client.subscribe(timeout=30)
    seqs = []
    for msg in stream:
        if msg.WhichOneof("msg") == "alert":
            seqs.append(msg.alert.seq)
            if len(seqs) == 5:
                break
    if i % 2 == 0:
        stream.cancel()
    client.close()
    assert seqs == list(range(seqs[0], seqs[0] + 5))
    return seqs[-1]


def test_consumers_killed_and_vanishing_cost_nothing_and_resume_misses_nothing(
    delivery: Delivery,
) -> None:
    server = delivery.server
    assert isinstance(server, GrpcServer)
    address = server.address
    publisher = Publisher(delivery)
    try:
        vanish(address, 0)  # warm-up: the channel machinery is in the baseline
        base_fds, base_rss = fds(), rss_mib()
        started = time.monotonic()
        kill_tails_mid_stream(address, TAILS)
        resume_from = max(vanish(address, i) for i in range(SUBSCRIBERS))
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 10
        while server.hub.subs and time.monotonic() < deadline:
            time.sleep(0.05)  # the server notices gone peers on its own loop: nothing to await
        assert not server.hub.subs, f"{len(server.hub.subs)} subscribers never forgotten"
        # A consumer resuming where the last one stopped gets every alert since, in order.
        client = Client(open_channel(address), ADMIN)
        seqs = []
        for msg in client.subscribe(resume_after_seq=resume_from, timeout=30):
            assert msg.WhichOneof("msg") != "lost"
            if msg.WhichOneof("msg") == "alert":
                seqs.append(msg.alert.seq)
                if len(seqs) == 3000:
                    break
        client.close()
    finally:
        publisher.stop()
    assert seqs == list(range(resume_from + 1, resume_from + 3001))
    assert publisher.slowest < 0.25, publisher.slowest  # publishing never waited on them
    assert publisher.published >= 0.8 * RATE * elapsed
    assert fds() <= base_fds + 2, (base_fds, fds())
    assert rss_mib() <= base_rss + 30, (base_rss, rss_mib())
    print(
        f"{TAILS} tails killed, {SUBSCRIBERS} subscribers gone in {elapsed:.1f} s while "
        f"{publisher.published} alerts were published (slowest publish "
        f"{publisher.slowest * 1000:.1f} ms); fds {base_fds} -> {fds()}, RSS "
        f"{base_rss:.0f} -> {rss_mib():.0f} MiB; resumed after {resume_from}: 3000 in order"
    )
