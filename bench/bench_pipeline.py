"""Events per second through the agent's whole pipeline on one core, from ring records.

A recorded stream of binary ring-buffer records, laid out exactly as bpf/*.c emit them
(built with the ctypes mirrors of zonewatch/probes/records.py), is replayed through the
code the agent runs for each batch (Agent.drain, then the rules' tick):

  decode       bcc's ring-buffer callback (a C loop calling the Python callback through a
               ctypes thunk, as libbpf's ring_buffer__poll does under bcc) and
               RecordRingReader's decoding, in the file, net and proc probes' own poll()
  attribution  pipeline.Attribution (zones by key, fd tables, guest paths, net and proc
               events, opens outside the shares)
  aggregation  Aggregator.count_events
  rules        every default rule of rules/ (RuleSet, as `zonewatch run --rules rules/`)
  sinks        alerts journaled (zonewatch.journal in a temp dir) and written as JSON
               lines to a temp file; stats lines each second, as the agent does

The stream: 40 zones of 8 tenants; 9p file work through the shares most (walks, opens,
first reads and writes, closes with totals, some renames, deletes, mkdirs and virtfs
chmods), then flows and DNS queries on the taps, a few VMM process events; a little
mischief so rules fire (a zone deleting in bulk, one scanning ports, metadata access,
account files, outside-share opens). Records are 4 us apart on average (250k/s).

Times are the process's CPU time (the stages': the thread's), not wall time: the box is
shared, and a core others also run on would otherwise count their turns as ours.
Measured on one core, in alternating rounds, median over rounds:
  pipeline_events_per_s     the whole pipeline (baseline: decode only, the same stream)
  pipeline_<stage>_share    each stage's share of the pipeline's time (an instrumented
                            run of the same loop body; baseline: none)

Environment: ZW_BENCH_ROUNDS (default 5), ZW_BENCH_PIPELINE_RECORDS (default 120000),
ZW_BENCH_PIPELINE_BATCH (records per batch, default 512).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import Metric, metric
from zonewatch.agent import Agent, AgentOptions
from zonewatch.aggregate import Aggregator
from zonewatch.delivery import Delivery
from zonewatch.exporters.jsonl import JsonlSink
from zonewatch.journal import Journal
from zonewatch.model import Share, Vmm, Zone
from zonewatch.pipeline import O_CREAT, O_DIRECTORY, O_PATH, Attribution
from zonewatch.probes.file import FileProbe
from zonewatch.probes.maps import RecordRingReader
from zonewatch.probes.net import NetProbe
from zonewatch.probes.proc import ProcProbe
from zonewatch.probes.records import (
    DECODERS,
    NET_DECODERS,
    PROC_DECODERS,
    FileOp,
    NetDir,
    NetOp,
    ProcOp,
    RecordType,
    ZwFileEvent,
    ZwHdr,
    ZwNetEvent,
    ZwProcEvent,
)
from zonewatch.rules.engine import RuleSet

ROUNDS = int(os.environ.get("ZW_BENCH_ROUNDS", "5"))
RECORDS = int(os.environ.get("ZW_BENCH_PIPELINE_RECORDS", "120000"))
BATCH = int(os.environ.get("ZW_BENCH_PIPELINE_BATCH", "512"))
RULES = Path(__file__).resolve().parents[1] / "rules"
ZONES = 40
TENANTS = 8
STAGES = ("decode", "attribution", "aggregation", "rules", "sinks")
O_WRONLY = 0o1
O_RDWR = 0o2

# ---- the recorded stream ------------------------------------------------------------------


def bench_zones(root: Path) -> list[Zone]:
    return [
        Zone(
            id=f"qemu-{20000 + i}-{i}",
            key=i + 1,
            name=f"zone-{i}",
            tenant=f"tenant-{i % TENANTS}",
            vmm=Vmm.QEMU,
            pid=20000 + i,
            start_time=1,
            taps=(f"tap-zw{i}",),
            shares=(Share("share", str(root / f"zone-{i}" / "share"), "9p", "/mnt/share"),),
        )
        for i in range(ZONES)
    ]


def _hdr(rtype: int, size: int, zone: Zone, ts: int, tid: int, comm: bytes) -> ZwHdr:  # noqa: PLR0917
    return ZwHdr(rtype, size, zone.key, ts, zone.pid, tid, comm)


def file_record(zone: Zone, ts: int, op: FileOp, **kw: Any) -> bytes:
    rec = ZwFileEvent()
    rec.hdr = _hdr(RecordType.FILE, ctypes.sizeof(rec), zone, ts, kw.pop("tid"), b"qemu-system-x86")
    rec.op = op
    rec.dirfd = kw.pop("dirfd", -100)
    rec.dirfd2 = kw.pop("dirfd2", -1)
    for name, value in kw.items():
        setattr(rec, name, value)
    return bytes(rec)


def _ip16(raw: bytes) -> Any:
    return (ctypes.c_uint8 * 16).from_buffer_copy(raw.ljust(16, b"\0"))


def dns_query(name: str, qtype: int = 1) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    header = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    return header + q + qtype.to_bytes(2, "big") + b"\x00\x01"


def net_record(  # noqa: PLR0917
    zone: Zone, ts: int, op: NetOp, local: bytes, remote: bytes, proto: int, lport: int,
    rport: int, tx: int, rx: int, dns: bytes = b"",
) -> bytes:  # fmt: skip
    rec = ZwNetEvent()
    rec.hdr = _hdr(RecordType.NET, ctypes.sizeof(rec), zone, ts, 0, b"")
    rec.hdr.pid = rec.hdr.tid = 0  # tc programs run in no process's context
    rec.op = op
    rec.dir = NetDir.EGRESS
    rec.key.zone_key = zone.key
    rec.key.family = 4
    rec.key.proto = proto
    rec.key.local_port = lport
    rec.key.remote_port = rport
    rec.key.local_ip = _ip16(local)
    rec.key.remote_ip = _ip16(remote)
    rec.flow.first_ns = ts - (50_000_000 if op == NetOp.FLOW_END else 0)
    rec.flow.last_ns = ts
    rec.flow.bytes[0], rec.flow.bytes[1] = tx, rx
    rec.flow.packets[0], rec.flow.packets[1] = max(tx // 1400, 1), max(rx // 1400, 1)
    rec.flow.payload[0], rec.flow.payload[1] = max(tx - 52, 0), max(rx - 52, 0)
    rec.flow.ifindex = 0  # the tap's: 0 keeps if_indextoname() off the bench machine
    rec.flow.initiator = NetDir.EGRESS
    rec.flow.tcp_flags = 0x1B if op == NetOp.FLOW_END else 0x02
    rec.flow.state = 4 if op == NetOp.FLOW_END else 0
    if dns:
        rec.dns_len = len(dns)
        ctypes.memmove(rec.dns, dns, len(dns))
    return bytes(rec)


def proc_record(zone: Zone, ts: int, op: ProcOp, **kw: Any) -> bytes:
    rec = ZwProcEvent()
    rec.hdr = _hdr(RecordType.PROC, ctypes.sizeof(rec), zone, ts, zone.pid, b"qemu-system-x86")
    rec.op = op
    rec.ppid = 1
    rec.pcomm = b"systemd"
    path = kw.pop("path", b"")
    ctypes.memmove(rec.path, path, len(path))
    args = kw.pop("args", b"")
    ctypes.memmove(rec.args, args, len(args))
    rec.args_len = len(args)
    for name, value in kw.items():
        setattr(rec, name, value)
    return bytes(rec)


@dataclass
class _ZoneState:
    zone: Zone
    index: int
    free_fd: int = 20
    open_fds: list[int] = field(default_factory=list)
    next_port: int = 32768


def synth(zones: Sequence[Zone], n: int, seed: int = 9) -> list[tuple[str, bytes]]:  # noqa: PLR0915
    """n records as (channel, raw bytes), in time order."""
    rng = random.Random(seed)  # noqa: S311 (a reproducible workload, no secrets)
    states = [_ZoneState(z, i) for i, z in enumerate(zones)]
    out: list[tuple[str, bytes]] = []
    ts = 1_000_000_000
    root_fd = 10

    def tick() -> int:
        nonlocal ts
        ts += rng.randint(1, 7) * 1000  # 4 us apart on average
        return ts

    def fd_of(st: _ZoneState) -> int:
        fd = st.free_fd
        st.free_fd += 1
        return fd

    for st in states:  # each backend opened its share's root first (a 9p attach)
        root = st.zone.shares[0].host_path.encode()
        out.append(("file", file_record(st.zone, tick(), FileOp.OPEN, tid=st.zone.pid + 1,
                                        path=root, ret=root_fd,
                                        flags=O_DIRECTORY | O_PATH)))  # fmt: skip
    names = [f"app/data/{i}.json" for i in range(300)] + [f"var/log/app/{i}.log" for i in range(60)]
    names += [f"home/app/cache/{i:04x}" for i in range(200)] + ["etc/app/config.yaml"]
    domains = [f"svc{i}.example.com" for i in range(30)]
    while len(out) < n:
        st = rng.choice(states)
        z = st.zone
        tid = z.pid + 1 + rng.randint(0, 3)
        r = rng.random()
        if r < 0.45:  # 9p file work
            kind = rng.random()
            name = rng.choice(names).encode()
            if z.name == "zone-5" and kind < 0.3:  # wiping the share
                out.append(("file", file_record(z, tick(), FileOp.UNLINK, tid=tid,
                                                dirfd=root_fd, path=name)))  # fmt: skip
            elif kind < 0.10:  # a walk step: a directory fd (state only), closed later
                fd = fd_of(st)
                out.append(("file", file_record(z, tick(), FileOp.OPEN, tid=tid, dirfd=root_fd,
                                                path=name.rpartition(b"/")[0], ret=fd,
                                                flags=O_DIRECTORY | O_PATH)))  # fmt: skip
                st.open_fds.append(fd)
            elif kind < 0.85:  # open, first read or write, close with totals
                write = rng.random() < 0.35
                fd = fd_of(st)
                flags = (O_WRONLY | O_CREAT) if write and rng.random() < 0.3 else (
                    O_RDWR if write else 0)  # fmt: skip
                if rng.random() < 0.0005:
                    name = rng.choice((b"etc/shadow", b"root/.ssh/authorized_keys"))
                out.append(("file", file_record(z, tick(), FileOp.OPEN, tid=tid, dirfd=root_fd,
                                                path=name, ret=fd, flags=flags)))  # fmt: skip
                size = rng.randint(1, 64) * 512
                op = FileOp.WRITE if write else FileOp.READ
                out.append(("file", file_record(z, tick(), op, tid=tid, dirfd=fd, ret=size)))
                st.open_fds.append(fd)
            elif st.open_fds:  # close one
                fd = st.open_fds.pop(rng.randrange(len(st.open_fds)))
                out.append(("file", file_record(z, tick(), FileOp.CLOSE, tid=tid, dirfd=fd,
                                                bytes_read=rng.randint(0, 1 << 20))))  # fmt: skip
            elif kind < 0.93:
                out.append(("file", file_record(z, tick(), FileOp.RENAME, tid=tid, dirfd=root_fd,
                                                path=name, dirfd2=root_fd,
                                                path2=name + b".tmp")))  # fmt: skip
            elif kind < 0.97:
                out.append(("file", file_record(z, tick(), FileOp.SETXATTR, tid=tid,
                                                path=b"/proc/self/fd/%d/%s" % (root_fd, name),
                                                path2=b"user.virtfs.mode")))  # fmt: skip
            else:
                out.append(("file", file_record(z, tick(), FileOp.MKDIR, tid=tid, dirfd=root_fd,
                                                path=name.rpartition(b"/")[0] + b"/new",
                                                mode=0o755)))  # fmt: skip
            # Each zone keeps ~16 files open: close the oldest beyond that.
            while len(st.open_fds) > 16:
                fd = st.open_fds.pop(0)
                out.append(("file", file_record(z, tick(), FileOp.CLOSE, tid=tid, dirfd=fd,
                                                bytes_written=4096)))  # fmt: skip
        elif r < 0.97:  # the zone's tap
            local = bytes([10, st.index, 0, 2])
            kind = rng.random()
            if kind < 0.2:
                name = rng.choice(domains)
                if rng.random() < 0.002:
                    name = "metadata.google.internal"
                out.append(("net", net_record(z, tick(), NetOp.DNS, local, bytes([10, 0, 0, 1]),
                                              17, 40000 + rng.randint(0, 999), 53, 80, 0,
                                              dns_query(name))))  # fmt: skip
            else:
                scan = z.name == "zone-7"
                port = rng.randint(1, 1024) if scan else rng.choice((443, 443, 80, 5432))
                odd = rng.random()
                common = rng.choice((bytes([10, 200, 0, 1]), bytes([93, 184, 216, 34])))
                other_zone = bytes([10, rng.randrange(ZONES), 0, 2])
                metadata = bytes([169, 254, 169, 254])
                remote = metadata if odd < 0.0005 else other_zone if odd < 0.002 else common
                st.next_port = 32768 + (st.next_port - 32767) % 28000
                op = NetOp.FLOW_START if kind < 0.6 else NetOp.FLOW_END
                out.append(("net", net_record(z, tick(), op, local, remote, 6, st.next_port, port,
                                              rng.randint(100, 200_000),
                                              rng.randint(100, 2_000_000))))  # fmt: skip
        else:  # the VMM itself
            kind = rng.random()
            if kind < 0.7:  # an open outside the share: the proc channel's view of it
                target = rng.choice((b"/dev/kvm", b"/dev/net/tun", b"/proc/self/maps",
                                     b"/etc/passwd", b"/dev/vhost-net"))  # fmt: skip
                out.append(("file", file_record(z, tick(), FileOp.OPEN, tid=tid, path=target,
                                                ret=-13 if target == b"/etc/passwd" else 99,
                                                flags=O_RDWR)))  # fmt: skip
            elif kind < 0.85:
                out.append(("proc", proc_record(z, tick(), ProcOp.EXIT, target_pid=tid)))
            else:
                out.append(("proc", proc_record(z, tick(), ProcOp.EXEC,
                                                path=b"/usr/libexec/qemu-bridge-helper",
                                                args=b"qemu-bridge-helper\0--use-vnet\0"
                                                     b"--fd=33\0--br=br0\0")))  # fmt: skip
    return out[:n]


# ---- bcc's ring buffer, replayed -----------------------------------------------------------

RINGBUF_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
DRIVER_C = r"""
typedef int (*zw_cb)(void *, void *, int);
long zw_drive(zw_cb cb, const char *buf, const int *sizes, long n) {
    long off = 0;
    for (long i = 0; i < n; i++) { cb(0, (void *)(buf + off), sizes[i]); off += sizes[i]; }
    return n;
}
"""


def _driver(tmp: Path) -> Callable[[Any, Any, Any, int], int] | None:
    """A C loop calling the callback per record, as libbpf does (None without a compiler:
    then Python calls the ctypes callback, which costs a little more)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, lib = tmp / "drive.c", tmp / "drive.so"
    src.write_text(DRIVER_C)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    fn = ctypes.CDLL(str(lib)).zw_drive
    fn.argtypes = [RINGBUF_CB, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_long]
    fn.restype = ctypes.c_long
    return fn  # type: ignore[no-any-return]


@dataclass
class Chunk:
    """One batch of one ring buffer: the records back to back and their sizes."""

    data: bytes
    sizes: Any  # ctypes.c_int array
    n: int


class ReplayBpf:
    """Stands in for a bcc BPF object with one ring buffer (`events`) and its poll."""

    def __init__(self, drive: Callable[[Any, Any, Any, int], int] | None) -> None:
        self._drive = drive
        self._fn: Any = None
        self.map_fd = -1
        self.pending: Chunk | None = None

    def __getitem__(self, name: bytes) -> ReplayBpf:
        assert name == b"events", name
        return self

    def open_ring_buffer(self, callback: Callable[[Any, Any, int], int]) -> None:
        def ringbuf_cb_(ctx: Any, data: Any, size: int) -> int:  # as bcc's table.py wraps it
            try:
                ret = callback(ctx, data, size)
                try:
                    return int(ret)
                except Exception:
                    return 0
            except OSError:
                return 0

        self._fn = RINGBUF_CB(ringbuf_cb_)

    def ring_buffer_consume(self) -> None:
        self.ring_buffer_poll(0)

    def ring_buffer_poll(self, _timeout: int = -1) -> None:
        chunk, self.pending = self.pending, None
        if chunk is None or not chunk.n:
            return
        if self._drive is not None:
            self._drive(self._fn, chunk.data, chunk.sizes, chunk.n)
            return
        base = ctypes.cast(ctypes.c_char_p(chunk.data), ctypes.c_void_p).value or 0
        off = 0
        for i in range(chunk.n):
            self._fn(None, base + off, chunk.sizes[i])
            off += chunk.sizes[i]


def batches(stream: Sequence[tuple[str, bytes]], size: int) -> list[dict[str, Chunk]]:
    out = []
    for i in range(0, len(stream), size):
        by: dict[str, list[bytes]] = {"file": [], "net": [], "proc": []}
        for channel, raw in stream[i : i + size]:
            by[channel].append(raw)
        out.append(
            {
                ch: Chunk(b"".join(rs), (ctypes.c_int * len(rs))(*map(len, rs)), len(rs))
                for ch, rs in by.items()
            }
        )
    return out


class BenchInventory:
    def __init__(self, zones: Sequence[Zone]) -> None:
        self.zones = {z.id: z for z in zones}
        self._by_key = {z.key: z for z in zones}

    def by_key(self, key: int) -> Zone | None:
        return self._by_key.get(key)


def _probes(
    zones: Sequence[Zone], drive: Callable[[Any, Any, Any, int], int] | None
) -> tuple[list[Any], dict[str, ReplayBpf]]:
    """The file, net and proc probes as the agent holds them, their BPF replaced by rings
    replaying the stream (nothing attached: no root needed)."""
    rings = {ch: ReplayBpf(drive) for ch in ("file", "net", "proc")}
    fp = FileProbe()
    fp._bpf = rings["file"]
    fp._reader = RecordRingReader(rings["file"], "events", DECODERS)
    np_ = NetProbe()
    np_._bpf = rings["net"]
    np_._reader = RecordRingReader(rings["net"], "events", NET_DECODERS)
    np_.addresses.set_zones(zones)
    np_._next_sweep = float("inf")  # the sweep reads the kernel's flow table: not here
    pp = ProcProbe()
    pp._bpf = rings["proc"]
    pp._reader = RecordRingReader(rings["proc"], "events", PROC_DECODERS)
    return [fp, np_, pp], rings


@dataclass
class Rig:
    agent: Agent
    rings: dict[str, ReplayBpf]
    jsonl: JsonlSink
    delivery: Delivery

    def feed(self, batch: dict[str, Chunk]) -> None:
        for ch, chunk in batch.items():
            self.rings[ch].pending = chunk


@contextlib.contextmanager
def rig(zones: Sequence[Zone], tmp: Path, drive: Any, rules: RuleSet | None) -> Iterator[Rig]:
    probes, rings = _probes(zones, drive)
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    jsonl = JsonlSink(str(run_dir / "alerts.jsonl"))
    delivery = Delivery(Journal(str(run_dir / "journal")), [jsonl])
    agent = Agent(BenchInventory(zones), probes, [jsonl], AgentOptions(), rules=rules,  # type: ignore[arg-type]
                  delivery=delivery)  # fmt: skip
    agent.attribution = Attribution(agent.inventory.by_key, proc=run_dir)  # no real /proc
    agent._aggregator = Aggregator(probes[:1])  # file ops by zone (net's maps: not here)
    try:
        yield Rig(agent, rings, jsonl, delivery)
    finally:
        delivery.close()
        jsonl.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)


def _start_clock(agent: Agent) -> None:
    # Record times become "now" onwards, so de-duplication windows close as they would live.
    agent.attribution.files.clock.offset = time.time_ns() - 1_000_000_000


# ---- the measurements -----------------------------------------------------------------------


def time_decode(zones: Sequence[Zone], tmp: Path, drive: Any, feed: list[dict[str, Chunk]],
                records: int) -> float:  # fmt: skip
    """The baseline: every record through the ring callback and the probes' decoding."""
    with rig(zones, tmp, drive, None) as r:
        probes = r.agent.probes
        start = time.process_time()
        for batch in feed:
            r.feed(batch)
            for probe in probes:
                probe.poll(0)
        return records / (time.process_time() - start)


def time_pipeline(zones: Sequence[Zone], tmp: Path, drive: Any, feed: list[dict[str, Chunk]],
                  records: int) -> tuple[float, int, int]:  # fmt: skip
    """The agent's loop body (Agent.drain, the rules' reload check and tick, stats once a
    second) over the stream: records/s, events, alerts."""
    rules = RuleSet([RULES])
    with rig(zones, tmp, drive, rules) as r:
        agent = r.agent
        _start_clock(agent)
        events = 0
        next_stats = time.monotonic() + 1.0
        start = time.process_time()
        for batch in feed:
            r.feed(batch)
            events += agent.drain()
            rules.maybe_reload()
            agent._export(rules.engine.tick())
            now = time.monotonic()
            if now >= next_stats:
                agent._take_stats()
                next_stats = now + 1.0
        agent._export(rules.engine.flush())
        elapsed = time.process_time() - start
        return records / elapsed, events, r.delivery.counters.alerts


def time_stages(zones: Sequence[Zone], tmp: Path, drive: Any, feed: list[dict[str, Chunk]],
                ) -> dict[str, float]:  # fmt: skip
    """Agent.drain's body with a clock between stages: seconds per stage."""
    rules = RuleSet([RULES])
    spent = dict.fromkeys(STAGES, 0.0)
    with rig(zones, tmp, drive, rules) as r:
        agent = r.agent
        _start_clock(agent)
        assert agent._aggregator is not None
        aggregator, attribution, engine = agent._aggregator, agent.attribution, rules.engine
        clock = time.thread_time
        for batch in feed:
            r.feed(batch)
            for probe in agent.probes:
                t0 = clock()
                recs = probe.poll(0)
                t1 = clock()
                events = attribution.process(recs)
                t2 = clock()
                aggregator.count_events(events)
                t3 = clock()
                alerts = engine.process(events)
                t4 = clock()
                agent._export(alerts)
                t5 = clock()
                spent["decode"] += t1 - t0
                spent["attribution"] += t2 - t1
                spent["aggregation"] += t3 - t2
                spent["rules"] += t4 - t3
                spent["sinks"] += t5 - t4
            t0 = clock()
            rules.maybe_reload()
            alerts = engine.tick()
            t1 = clock()
            agent._export(alerts)
            spent["rules"] += t1 - t0
            spent["sinks"] += clock() - t1
    return spent


def run() -> dict[str, Metric]:
    mine = os.sched_getaffinity(0)
    tmp = Path(tempfile.mkdtemp(prefix="zw-bench-pipeline-"))
    try:
        os.sched_setaffinity(0, {max(mine)})  # one core
        drive = _driver(tmp)
        zones = bench_zones(tmp / "shares")
        stream = synth(zones, RECORDS)
        feed = batches(stream, BATCH)
        mix = {ch: sum(1 for c, _ in stream if c == ch) for ch in ("file", "net", "proc")}
        print(f"  {len(stream)} records ({mix}), {len(feed)} batches of {BATCH}, "
              f"callback from {'C' if drive else 'Python'}", flush=True)  # fmt: skip
        base: list[float] = []
        full: list[float] = []
        shares: dict[str, list[float]] = {s: [] for s in STAGES}
        events = alerts = 0
        for rnd in range(ROUNDS):
            order = ("decode", "pipeline") if rnd % 2 == 0 else ("pipeline", "decode")
            for what in order:
                if what == "decode":
                    base.append(time_decode(zones, tmp, drive, feed, len(stream)))
                else:
                    rate, events, alerts = time_pipeline(zones, tmp, drive, feed, len(stream))
                    full.append(rate)
            spent = time_stages(zones, tmp, drive, feed)
            total = sum(spent.values())
            for s in STAGES:
                shares[s].append(spent[s] / total)
            parts = " ".join(f"{s} {spent[s] / total:.0%}" for s in STAGES)
            print(f"  {rnd + 1}/{ROUNDS} decode {base[-1]:>9.0f}/s  "
                  f"pipeline {full[-1]:>9.0f}/s  {parts}", flush=True)  # fmt: skip
    finally:
        os.sched_setaffinity(0, mine)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"  {events} events, {alerts} alerts per pass")
    b, f = statistics.median(base), statistics.median(full)
    out = {"pipeline_events_per_s": metric(f, "events/s", b)}
    for s in STAGES:
        out[f"pipeline_{s}_share"] = metric(statistics.median(shares[s]), "fraction")
    return out


if __name__ == "__main__":  # a quick look without writing results.json
    print(run())
