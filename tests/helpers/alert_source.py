"""A test-only agent stand-in: the real delivery stack (journal, gRPC, sinks, built from the
same options as `zonewatch run`) fed with alerts made here instead of by rules.

    python -m tests.helpers.alert_source --journal DIR --tokens FILE --grpc ADDR \
        [--rate N] [--count N] [--otlp URL] [--ocsf FILE] [--metrics ADDR]

Writes "ready ADDR" on stdout once it listens, then publishes alerts alternating between
tenants acme (odd seqs) and globex (even seqs) (evidence.n counts from --first), and
per-zone stats each second.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Any

from tests.helpers.alerts import ZONES, make_alert
from zonewatch import delivery
from zonewatch.exporters.jsonl import JsonlSink
from zonewatch.model import Vmm, Zone, ZoneStats


def zones() -> list[Zone]:
    return [
        Zone(
            id=r.id,
            key=i + 1,
            name=r.name,
            tenant=r.tenant,
            vmm=Vmm.QEMU,
            pid=100 + i,
            start_time=1,
            vcpu_tids=(200 + i,),
        )
        for i, r in enumerate(ZONES.values())
    ]


def main() -> int:
    p = argparse.ArgumentParser()
    delivery.add_options(p)
    p.add_argument("--rate", type=float, default=200.0, help="alerts per second (0: none)")
    p.add_argument("--count", type=int, default=0, help="stop publishing after N (0: never)")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--jsonl", help="alerts as JSON lines too")
    args = p.parse_args()
    sinks = [JsonlSink(args.jsonl)] if args.jsonl else []
    d = delivery.build(delivery.config_from_args(args), sinks)
    if d.prometheus is not None:  # /metrics shows the delivery's health, as the agent's does
        from zonewatch.exporters.prometheus import AgentHealth

        d.prometheus.health = lambda: AgentHealth(**d.health())
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    d.set_zones(zones())
    address = getattr(d.server, "address", "-")
    sys.stdout.write(f"ready {address}\n")
    sys.stdout.flush()
    n = 0
    next_stats = 0.0
    started = time.monotonic()
    try:
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_stats:
                d.publish_stats(
                    [ZoneStats(time.time_ns(), r, 1.0, vcpus=1, exits_per_s=100.0 + i,
                               exits_by_reason={"io": 60.0, "hlt": 40.0 + i}, cpu_pct=12.5,
                               file_ops_per_s=3.0) for i, r in enumerate(ZONES.values())]
                )  # fmt: skip
                next_stats = now + 1.0
            if args.rate > 0 and (args.count == 0 or n < args.count):
                due = int((now - started) * args.rate) - n
                if args.count:
                    due = min(due, args.count - n)
                if due > 0:
                    # The tenant follows the seq the journal will give: after a restart
                    # (the journal recovered) acme still holds exactly the odd seqs.
                    first = d.journal.last_seq + 1
                    batch = [
                        make_alert(n + i, "acme" if (first + i) % 2 == 1 else "globex")
                        for i in range(min(due, args.batch))
                    ]
                    d.publish(batch)
                    n += len(batch)
                    continue
            stop.wait(0.005)
    finally:
        d.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
