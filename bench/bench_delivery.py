"""Delivery throughput: alerts/s to 1 and to 50 gRPC subscribers, OTLP records/s.

  delivery_grpc_1_sub     alerts/s from publish() until one subscriber has them all;
                          baseline: the journal alone (append + fsync batching), the ceiling
  delivery_grpc_50_subs   the same with 50 subscribers (each gets every alert);
                          baseline: the 1-subscriber rate
  delivery_otlp_logs      alert log records/s (with their spans) into a local OTLP/gRPC
                          receiver; baseline: the JSONL sink writing the same alerts

Subscribers and the receiver run in processes of their own (10 processes of 5 streams for
50), so they do not share the agent's GIL. Environment: ZW_BENCH_ALERTS (default 20000).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

from bench import Metric, metric

N = int(os.environ.get("ZW_BENCH_ALERTS", "20000"))
BATCH = 100
TOKEN = "bench-token-0001"  # noqa: S105 (a throwaway token for a loopback bench)
ROOT = Path(__file__).resolve().parents[1]


def _alerts(n: int) -> list[Any]:
    from zonewatch.model import Alert, Severity, ZoneRef

    zone = ZoneRef("qemu-1-1", "bench-zone", "acme", "qemu")
    now = time.time_ns()
    return [
        Alert(now, zone, "bench_rule", Severity.HIGH, f"bench alert {i}",
              ("maturity_stable", "host", "T1611"), {"n": i, "file.path": "/etc/shadow"})
        for i in range(n)
    ]  # fmt: skip


def subscriber_main(address: str, streams: int, n: int) -> None:
    """A subscriber process: `streams` streams, each until it has n alerts; then "done"."""
    from zonewatch.api.client import Client, open_channel

    said = threading.Lock()  # print() writes text and newline apart: threads interleave

    def one() -> None:
        c = Client(open_channel(address), TOKEN)
        got = 0
        ready = False
        stream = c.subscribe(heartbeat_ms=100)
        for msg in stream:
            if msg.WhichOneof("msg") == "heartbeat" and not ready:
                ready = True  # the stream is registered: what is published now reaches it
                with said:
                    print("ready", flush=True)
            elif msg.WhichOneof("msg") == "alert":
                got += 1
                if got == n:
                    break
        stream.cancel()
        c.close()

    with futures.ThreadPoolExecutor(streams) as pool:
        for f in [pool.submit(one) for _ in range(streams)]:
            f.result()
    print("done", flush=True)


def receiver_main(n: int) -> None:
    """An OTLP/gRPC receiver process: prints its port, then "done" once n log records came."""
    from tests.helpers.otlp_receiver import OtlpReceiver

    with OtlpReceiver() as r:
        print(r.port, flush=True)
        r.wait_for(lambda: len(r.logs) >= n, 600, f"{n} log records")
        print("done", flush=True)


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.bench_delivery", *args],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def _journal_rate(tmp: Path) -> float:
    from zonewatch.journal import Journal

    j = Journal(tmp / "j0")
    alerts = _alerts(N)
    t0 = time.perf_counter()
    for i in range(0, N, BATCH):
        j.append(alerts[i : i + BATCH])
    elapsed = time.perf_counter() - t0
    j.close()
    return N / elapsed


def _grpc_rate(tmp: Path, subscribers: int) -> float:
    from zonewatch.api.auth import Principal, TokenStore, _digest
    from zonewatch.api.server import GrpcServer, ServerConfig
    from zonewatch.delivery import Delivery
    from zonewatch.journal import Journal

    journal = Journal(tmp / f"j{subscribers}")
    tokens = TokenStore([(_digest(TOKEN), Principal("bench", None))])
    server = GrpcServer(
        ServerConfig(
            tokens,
            address=f"unix:{tmp}/b{subscribers}.sock",
            queue_bound=N + 1,
            queue_bytes=1 << 40,
            token_queue_bytes=1 << 40,
        ),
        journal,
    ).start()
    delivery = Delivery(journal, [], server)
    per_proc = 1 if subscribers == 1 else 5
    procs = [_spawn("--subscriber", server.address, str(per_proc), str(N))
             for _ in range(subscribers // per_proc)]  # fmt: skip
    try:
        for p in procs:
            for _ in range(per_proc):
                assert p.stdout is not None
                assert p.stdout.readline().strip() == "ready"
        alerts = _alerts(N)
        t0 = time.perf_counter()
        for i in range(0, N, BATCH):
            delivery.publish(alerts[i : i + BATCH])
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "done"
        elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
        delivery.close()
    return N / elapsed


def _otlp_rate(tmp: Path) -> tuple[float, float]:
    from zonewatch.exporters.jsonl import JsonlSink
    from zonewatch.exporters.otlp import OtlpConfig, OtlpSink

    alerts = _alerts(N)
    for seq, a in enumerate(alerts, 1):
        a.seq = seq
    jsonl = JsonlSink(str(tmp / "bench.jsonl"))
    t0 = time.perf_counter()
    for i in range(0, N, BATCH):
        jsonl.export(alerts[i : i + BATCH])
    jsonl_rate = N / (time.perf_counter() - t0)
    jsonl.shutdown()

    recv = _spawn("--receiver", str(N))
    try:
        assert recv.stdout is not None
        port = int(recv.stdout.readline())
        sink = OtlpSink(OtlpConfig(f"http://127.0.0.1:{port}", "grpc", max_queue=N + 1,
                                   schedule_delay_ms=50, metric_interval_ms=60_000))  # fmt: skip
        done = threading.Event()
        t0 = time.perf_counter()
        for i in range(0, N, BATCH):
            sink.export(alerts[i : i + BATCH])
        assert recv.stdout.readline().strip() == "done"
        elapsed = time.perf_counter() - t0
        done.set()
        sink.shutdown()
    finally:
        if recv.poll() is None:
            recv.kill()
        recv.wait()
        if recv.stdout is not None:
            recv.stdout.close()
    return N / elapsed, jsonl_rate


def run() -> dict[str, Metric]:
    with tempfile.TemporaryDirectory(prefix="zw-bench-delivery-") as d:
        tmp = Path(d)
        journal = _journal_rate(tmp)
        one = _grpc_rate(tmp, 1)
        fifty = _grpc_rate(tmp, 50)
        otlp, jsonl = _otlp_rate(tmp)
    print(f"  journal {journal:.0f}/s  1 sub {one:.0f}/s  50 subs {fifty:.0f}/s each  "
          f"otlp {otlp:.0f}/s  jsonl {jsonl:.0f}/s", flush=True)  # fmt: skip
    return {
        "delivery_grpc_1_sub": metric(one, "alerts/s", journal),
        "delivery_grpc_50_subs": metric(fifty, "alerts/s", one),
        "delivery_otlp_logs": metric(otlp, "records/s", jsonl),
    }


if __name__ == "__main__":
    if sys.argv[1] == "--subscriber":
        subscriber_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "--receiver":
        receiver_main(int(sys.argv[2]))
