"""Events per second through the rules on one core, replaying a recorded stream.

A synthetic recording is generated first: 40 zones of 8 tenants over simulated minutes,
in the proportions a busy host shows (file ops through shares most, then flows and DNS,
a few VMM process events, one stats snapshot per zone per second), with some attacks
mixed in so rules fire and de-duplicate. It is serialised with each record's to_json(),
exactly as `zonewatch record` writes it. Then, on one core, in alternating rounds:
  replay   parse the lines and rebuild the events (the baseline: no rules)
  rules    the same plus every default rule (rules/), de-duplication and windows
  engine   the rules alone, on events already rebuilt
  iocs     the rules alone plus one IOC rule: 1050 paths or'ed inline on file.path (one
           set lookup), and the same over two fields alternately (a loop over 1050 terms);
           each against `engine` as its baseline
The value is the median over rounds.

Environment: ZW_BENCH_ROUNDS (default 5), ZW_BENCH_RULES_EVENTS (default 200000).
"""

from __future__ import annotations

import io
import os
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from bench import Metric, metric
from zonewatch.model import FileEvent, NetEvent, ProcEvent, ZoneRef, ZoneStats
from zonewatch.rules.engine import RuleContext, RuleEngine
from zonewatch.rules.replay import read_records, replay

ROUNDS = int(os.environ.get("ZW_BENCH_ROUNDS", "5"))
EVENTS = int(os.environ.get("ZW_BENCH_RULES_EVENTS", "200000"))
RULES = Path(__file__).resolve().parents[1] / "rules"
T0 = 1_767_225_600 * 10**9
FILE_OPS = ("open", "read", "write", "close", "create", "rename", "unlink", "mkdir", "chmod")
FILE_WEIGHTS = (30, 20, 15, 25, 3, 2, 2, 1, 2)
PATHS = ("/srv/app/data/{n}.json", "/var/log/app/{n}.log", "/home/app/cache/{n}",
         "/etc/app/config.yaml", "/tmp/build/{n}.o", "/etc/shadow",
         "/root/.ssh/authorized_keys")  # fmt: skip
PATH_WEIGHTS = (40, 25, 20, 5, 8, 1, 1)
DOMAINS = [f"svc{i}.example.com" for i in range(30)]


def _zones() -> list[ZoneRef]:
    return [ZoneRef(f"qemu-{1000 + i}", f"zone-{i}", f"tenant-{i % 8}", "qemu") for i in range(40)]


def synth(n: int, seed: int = 7) -> list[bytes]:
    """n records as JSON lines (to_json), time-ordered, 1 ms apart on average."""
    rng = random.Random(seed)  # noqa: S311 (a reproducible workload, no secrets)
    zones = _zones()
    lines: list[bytes] = []
    ts = T0
    next_stats = T0 + 10**9
    tick = 0
    while len(lines) < n:
        ts += rng.randint(1, 2000) * 1000  # 1 us .. 2 ms
        if ts >= next_stats:  # one snapshot per zone per second
            tick += 1
            for z in zones:
                storm = z.name == "zone-3" and tick % 60 > 50
                stats = ZoneStats(ts, z, 1.0, vcpus=2,
                                  exits_per_s=900_000.0 if storm else rng.uniform(2e3, 8e3),
                                  exits_by_reason={"HLT": 3000.0, "IO_INSTRUCTION": 800.0},
                                  hypercalls_per_s=rng.uniform(5, 20),
                                  msr_writes_per_s=rng.uniform(10, 40),
                                  run_delay_p99_us=rng.uniform(50, 900))  # fmt: skip
                lines.append(orjson.dumps(stats.to_json()))
            next_stats += 10**9
            continue
        z = rng.choice(zones)
        r = rng.random()
        event: Any
        if r < 0.62:
            op = rng.choices(FILE_OPS, FILE_WEIGHTS)[0]
            path = rng.choices(PATHS, PATH_WEIGHTS)[0].format(n=rng.randint(0, 500))
            event = FileEvent(ts, z, op, path, "/run/zw/" + z.name + path, 4242, 4250,
                              "qemu-system-x86", ret=3, share="share",
                              flags=rng.choice((0, 0o1, 0o101)))  # fmt: skip
        elif r < 0.97:
            kind = rng.random()
            src = f"10.{zones.index(z)}.0.2"
            if kind < 0.2:
                event = NetEvent(ts, z, "dns", "egress", "udp", src, "10.0.0.1", 40000, 53,
                                 dns_qname=rng.choice(DOMAINS))  # fmt: skip
            else:
                scan = z.name == "zone-7"
                port = rng.randint(1, 1024) if scan else rng.choice((443, 443, 80, 5432))
                op = "flow_start" if kind < 0.6 else "flow_end"
                odd = rng.random()  # rarely the metadata service or another zone
                dst = ("169.254.169.254" if odd < 0.0005 else f"10.{rng.randint(0, 39)}.0.2"
                       if odd < 0.002 else rng.choice(("10.200.0.1", "93.184.216.34")))  # fmt: skip
                event = NetEvent(ts, z, op, "egress", "tcp", src, dst, rng.randint(30000, 60000),
                                 port, bytes=rng.randint(100, 200_000),
                                 tx_bytes=rng.randint(100, 100_000))  # fmt: skip
        else:
            op = rng.choice(("exec", "fork", "exit", "open_outside_share", "open_outside_share"))
            target = rng.choice(("/dev/kvm", "/dev/net/tun", "/proc/self/maps", "/etc/passwd"))
            event = ProcEvent(ts, z, op, 4242, 1, "qemu-system-x86", pcomm="qemu-system-x86",
                              exe="/usr/bin/qemu-system-x86_64", target=target)  # fmt: skip
        lines.append(orjson.dumps(event.to_json()))
    return lines


def _addresses(zones: list[ZoneRef]) -> dict[str, ZoneRef]:
    return {f"10.{i}.0.2": z for i, z in enumerate(zones)}


def _engine(extra: Sequence[Path] = ()) -> RuleEngine:
    addresses = _addresses(_zones())
    return RuleEngine.load([RULES, *extra], RuleContext(zone_addresses=lambda: addresses))


def ioc_rule(n: int, two_fields: bool) -> str:
    """An IOC list written inline: n paths or'ed (none of them in the workload)."""
    terms = " or ".join(
        f"{'file.host_path' if two_fields and i % 2 else 'file.path'} = /ioc/p{i}" for i in range(n)
    )
    return (
        "- required_engine_version: 1\n- rule: iocs\n"
        f"  condition: channel = file and ({terms})\n  output: x\n  severity: high\n"
    )


def time_replay_only(data: bytes) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in read_records(io.BytesIO(data), "bench"))
    return count / (time.perf_counter() - start)


def time_with_rules(data: bytes, records: int) -> tuple[float, int]:
    engine = _engine()
    alerts = 0

    def emit(batch: Any) -> None:
        nonlocal alerts
        alerts += len(batch)

    start = time.perf_counter()
    replay(engine, io.BytesIO(data), "bench", emit)
    return records / (time.perf_counter() - start), alerts


def time_engine_only(events: list[Any], extra: Sequence[Path] = ()) -> float:
    engine = _engine(extra)
    plain = [e for e in events if not isinstance(e, ZoneStats)]
    stats = [e for e in events if isinstance(e, ZoneStats)]
    start = time.perf_counter()
    for i in range(0, len(plain), 1024):
        engine.process(plain[i : i + 1024])
    engine.process_stats(stats)
    engine.flush()
    return len(events) / (time.perf_counter() - start)


def run() -> dict[str, Metric]:
    mine = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {max(mine)})  # one core
        lines = synth(EVENTS)
        data = b"\n".join(lines) + b"\n"
        events = list(read_records(io.BytesIO(data), "bench"))
        rules = len(_engine().rules)
        base, full, engine_only = [], [], []
        one_field: list[float] = []
        two_fields: list[float] = []
        alerts = 0
        tmp = tempfile.TemporaryDirectory(prefix="zw-bench-rules-")
        iocs = Path(tmp.name) / "iocs.yaml"
        iocs.write_text(ioc_rule(1050, two_fields=False))
        iocs2 = Path(tmp.name) / "iocs2.yaml"
        iocs2.write_text(ioc_rule(1050, two_fields=True))
        for r in range(ROUNDS):
            order = ("replay", "rules") if r % 2 == 0 else ("rules", "replay")
            for what in order:
                if what == "replay":
                    base.append(time_replay_only(data))
                else:
                    rate, alerts = time_with_rules(data, len(events))
                    full.append(rate)
            engine_only.append(time_engine_only(events))
            one_field.append(time_engine_only(events, [iocs]))
            two_fields.append(time_engine_only(events, [iocs2]))
            print(f"  {r + 1}/{ROUNDS} replay {base[-1]:>9.0f}/s  replay+rules {full[-1]:>9.0f}/s"
                  f"  rules alone {engine_only[-1]:>9.0f}/s  +iocs {one_field[-1]:>9.0f}/s"
                  f"  +iocs(2 fields) {two_fields[-1]:>9.0f}/s", flush=True)  # fmt: skip
        tmp.cleanup()
    finally:
        os.sched_setaffinity(0, mine)
    print(f"  {len(events)} records, {rules} rules, {alerts} alerts per pass")
    b, f, e = statistics.median(base), statistics.median(full), statistics.median(engine_only)
    return {
        "rules_replay_events_per_s": metric(f, "events/s", b),
        "rules_engine_only_events_per_s": metric(e, "events/s", b),
        "rules_ioc_1050_set_events_per_s": metric(statistics.median(one_field), "events/s", e),
        "rules_ioc_1050_loop_events_per_s": metric(statistics.median(two_fields), "events/s", e),
    }
