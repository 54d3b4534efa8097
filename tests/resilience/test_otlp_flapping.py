"""An OTLP collector that goes away and comes back, twice, under a publishing agent (the
real delivery stack): one log line per outage and one per return, the alerts of each up
period reach the collector, the gRPC stream never misses one, and nothing waits.
(One outage from the start: tests/integration/test_grpc_stream.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.otlp_receiver import OtlpReceiver
from tests.helpers.source import SourceProcess
from tests.resilience.conftest import ADMIN
from tests.resilience.support import free_port
from zonewatch.api.client import Client, open_channel

FLAPS = 2


def seqs_logged(receiver: OtlpReceiver) -> set[int]:
    return {
        kv.value.int_value
        for _, rec in receiver.logs
        for kv in rec.attributes
        if kv.key == "zonewatch.alert.seq"
    }


def test_collector_flapping_costs_a_line_each_way_and_stalls_nothing(
    tmp_path: Path, tokens_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in {
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        "OTEL_BLRP_SCHEDULE_DELAY": "100",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
    }.items():
        monkeypatch.setenv(k, v)  # fmt: skip
    port = free_port()
    log = tmp_path / "source.log"
    receiver = OtlpReceiver(port)
    source = SourceProcess(tmp_path / "journal", tokens_file, "127.0.0.1:0", log,
                           "--rate", "100", "--otlp", f"http://127.0.0.1:{port}")  # fmt: skip
    client = Client(open_channel(source.address), ADMIN)
    stream = client.subscribe(resume_after_seq=0, timeout=120)
    received: list[int] = []

    def read_until(seq: int) -> None:
        for msg in stream:
            if msg.WhichOneof("msg") == "alert":
                received.append(msg.alert.seq)
                if msg.alert.seq >= seq:
                    return

    def log_count(text: str) -> int:
        return log.read_text().count(text)

    try:
        up: list[tuple[int, int]] = []  # (first seq published while up, seqs logged)
        for flap in range(FLAPS + 1):
            read_until(received[-1] + 1 if received else 1)
            start = received[-1]
            receiver.wait_for(
                lambda s=start, r=receiver: any(x > s for x in seqs_logged(r)),
                30, f"alerts logged in up period {flap}",
            )  # fmt: skip
            up.append((start, len(seqs_logged(receiver))))
            if flap == FLAPS:
                break
            receiver.stop()
            read_until(received[-1] + 100)  # a second of alerts with the collector away
            wait_log(lambda f=flap: log_count("unreachable") == f + 1, "the outage's line", log)
            receiver = OtlpReceiver(port)
            wait_log(lambda f=flap: log_count("resumed") == f + 1, "the return's line", log)
        assert source.proc.poll() is None
        lines = (log_count("unreachable"), log_count("resumed"))  # before the teardown's
    finally:
        stream.cancel()
        client.close()
        receiver.stop()
        source.stop()
    assert received == list(range(1, received[-1] + 1))  # gRPC: every one, in order
    assert lines == (FLAPS, FLAPS), log.read_text()
    print(f"{FLAPS} outages: {received[-1]} alerts on gRPC in order; per up period "
          f"(first seq, seqs logged): {up}")  # fmt: skip


def wait_log(predicate: Any, what: str, log: Path) -> None:
    import time

    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()}"
        time.sleep(0.05)  # a log file another process writes: nothing to await
