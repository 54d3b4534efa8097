"""What each way of hooking the file channel costs the zone it watches: file ops/s of a
VMM's 9p backend (bench_file's C loop: openat + pread 4 KiB + close per op, a pwrite of 64
bytes every 8th) watched through syscall tracepoints and through uprobes on its libc
(`--file-hooks uprobes`), against nothing watching. The loop's pid is in the zone filter
and this process drains and attributes the records as the agent does (bench_file's
Drainer), so the record traffic is the same both ways; what differs is the hook: a
tracepoint costs the syscall's slow path, a uprobe a breakpoint trap into the kernel and,
for a uretprobe, a second one at the return (openat and pread have both, close only the
first).

bench_agent measures the other side: what each mode costs the processes that are no zone.

Conditions per round, in rotating order: none (no file probe attached), tracepoints
(bpf/file.c's tracepoints attached for the turn), uprobes (bpf/file.c built for uprobes,
the loop hooked for the turn). A ratio is the median over rounds of condition / none of
the same round.

Environment: ZW_BENCH_ROUNDS (default 5), ZW_BENCH_SECONDS (default 2).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from bench import Metric, metric
from bench.bench_file import (
    RECORDS_PER_OP,
    ROUNDS,
    WINDOW_S,
    ZONE_KEY,
    Backend,
    Drainer,
    Tracepoints,
    build_backend,
    lost_total,
    pinned,
)
from zonewatch.model import Share, Vmm, Zone
from zonewatch.probes.file import FileProbe

CONDITIONS = ("none", "tracepoints", "uprobes")


def watched_turn(backend: Backend, probe: FileProbe, zone: Zone) -> tuple[float, int, int]:
    """One window with the loop in the probe's zone filter, drained: (ops/s, records
    expected, records that arrived or were counted lost)."""
    drainer = Drainer(probe, zone)
    lost_before = lost_total(probe)
    probe.set_zone_pids({backend.pid: ZONE_KEY})
    try:
        turn = backend.run(WINDOW_S, drainer)
        expected = RECORDS_PER_OP * turn.ops + turn.writes
        drainer.settle(expected)
    finally:
        probe.set_zone_pids({})
    assert drainer.events > 0, f"{probe.hooks}: the probe saw no file op"
    return turn.rate, expected, drainer.records + lost_total(probe) - lost_before


def run() -> dict[str, Metric]:
    rates: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    ratios: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    accounted: dict[str, list[float]] = {c: [] for c in CONDITIONS[1:]}
    with pinned() as core, tempfile.TemporaryDirectory(prefix="zw-bench-hooks-") as tmp:
        share = Path(tmp) / "share"
        share.mkdir()
        backend = Backend(build_backend(Path(tmp)), share, core)
        by_tracepoint, by_uprobe = FileProbe(), FileProbe(hooks="uprobes")
        try:
            by_tracepoint.attach()
            tps = Tracepoints(by_tracepoint)
            tps.detach()
            by_uprobe.attach()
            zone = Zone(id="bench", key=ZONE_KEY, name="bench", tenant="t", vmm=Vmm.QEMU,
                        pid=backend.pid, start_time=0,
                        shares=(Share("share", str(share), "9p", "/mnt/share"),))  # fmt: skip
            backend.run(WINDOW_S / 2)  # warm-up turn, not counted
            for r in range(ROUNDS):
                k = r % len(CONDITIONS)
                this_round: dict[str, float] = {}
                for condition in CONDITIONS[k:] + CONDITIONS[:k]:
                    if condition == "none":
                        this_round[condition] = backend.run(WINDOW_S).rate
                        continue
                    if condition == "tracepoints":
                        tps.attach()
                    try:
                        probe = by_tracepoint if condition == "tracepoints" else by_uprobe
                        rate, expected, got = watched_turn(backend, probe, zone)
                    finally:
                        tps.detach()
                    this_round[condition] = rate
                    accounted[condition].append(got / expected)
                for c in CONDITIONS:
                    rates[c].append(this_round[c])
                    ratios[c].append(this_round[c] / this_round["none"])
                    print(f"  {r + 1}/{ROUNDS} {c:<11} {this_round[c]:>10.0f} ops/s", flush=True)
        finally:
            by_uprobe.detach()
            by_tracepoint.detach()
            backend.close()
    med = {c: statistics.median(v) for c, v in rates.items()}
    out: dict[str, Metric] = {}
    for c in CONDITIONS[1:]:
        ratio = statistics.median(ratios[c])
        runs = ", ".join(f"{x:.3f}" for x in ratios[c])
        print(f"  {c:<11} median {med[c]:>8.0f} ops/s, ratio {ratio:.3f}  ({runs});"
              f" records accounted {min(accounted[c]):.3f}")  # fmt: skip
        m = metric(med[c], "ops/s", med["none"])
        m["ratio"] = round(ratio, 4)
        out[f"file_ops_per_s_zone_{c}_ratio"] = m
    return out


if __name__ == "__main__":
    from bench import record

    print(record(run()))
