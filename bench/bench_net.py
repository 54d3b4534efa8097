"""Cost of the net channel to a zone's traffic: frames/s a process pushes through a tap by
writing its fd (as a VMM does), with bpf/net.c attached to the tap and without.

A writer process owns a tap (zwntbench0, 10.215.0.1/30 on the host end) and, on each
command, writes frames flat out for WINDOW_S seconds and reports how many. The frames
are what a guest sends: UDP datagrams of 512 bytes over 16 flows to the host end, so
every frame runs the program's whole path (zone lookup, IPv4/UDP parse, flow update).
Conditions take turns, round after round, in a rotating order (none agent bpftrace,
agent bpftrace none, ...) so that drift spreads over all of them:
  none      no filter on the tap (the program stays loaded, unattached): the baseline
  agent     NetProbe's filters on the tap, the tap in its zone map; this process polls its
            ring buffer and collects its maps every second, as the agent does
  bpftrace  the peer (no tc filter on the tap): bpftrace counting the same frames per flow
            as the agent's maps do, frames and bytes keyed by (saddr, daddr, protocol,
            sport, dport) read from the skb through BTF, on net:netif_receive_skb (what the
            guest sent: a tap write enters the host's stack there) and net:net_dev_queue
            (what is sent to it), both filtered on the tap's name. Those tracepoints fire
            for every device on the host, so the name test runs for every frame anywhere:
            the cost of a peer that cannot attach to one device as tc does.
A ratio is the median over rounds of (condition / none of the same round); the value and
baseline are the medians of the frames/s themselves. The writer is pinned to one core,
this process (and bpftrace, its child) to the other.

Environment: ZW_BENCH_ROUNDS (default 10), ZW_BENCH_SECONDS (default 2).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from bench import Metric, metric
from bench.peer import bpftrace
from zonewatch.probes.net import NetProbe

ROUNDS = int(os.environ.get("ZW_BENCH_ROUNDS", "10"))
WINDOW_S = float(os.environ.get("ZW_BENCH_SECONDS", "2"))
TAP = "zwntbench0"
HOST_IP, GUEST_IP = "10.215.0.1", "10.215.0.2"
FLOWS = 16
PAYLOAD = 512
ZONE_KEY = 1
CONDITIONS = ("none", "agent", "bpftrace")

# The peer: per-flow frames and bytes in both directions of the tap. At netif_receive_skb the
# skb's data is the IP header (eth_type_trans pulled the Ethernet header); at net_dev_queue
# it is still the Ethernet header.
PEER_DIRECTION = """
tracepoint:net:{tracepoint} /str(args->name) == "{tap}"/ {{
  $skb = (struct sk_buff *)args->skbaddr;
  $ip = (struct iphdr *)($skb->data + {l2});
  $l4 = $skb->data + {l2} + ($ip->ihl << 2);
  $sport = (*(uint8 *)$l4 << 8) | *(uint8 *)($l4 + 1);
  $dport = (*(uint8 *)($l4 + 2) << 8) | *(uint8 *)($l4 + 3);
  @{dir}_frames[$ip->saddr, $ip->daddr, $ip->protocol, $sport, $dport] = count();
  @{dir}_bytes[$ip->saddr, $ip->daddr, $ip->protocol, $sport, $dport] = sum(args->len);
}}
"""


def bpftrace_script(tap: str) -> str:
    return PEER_DIRECTION.format(
        tracepoint="netif_receive_skb", tap=tap, l2=0, dir="tx"
    ) + PEER_DIRECTION.format(tracepoint="net_dev_queue", tap=tap, l2=14, dir="rx")


def writer(tap_name: str) -> None:
    """The writer process: owns the tap, answers `run SECONDS` with the frames it wrote."""
    from zonewatch.lab.tapfd import ETH_P_IP, TapFd, ipv4, udp

    with TapFd(tap_name) as tap:
        tap.configure(HOST_IP, 30, guest_ip=GUEST_IP)
        os.set_blocking(tap.fd, True)
        frames = [
            tap.frame(ETH_P_IP, ipv4(GUEST_IP, HOST_IP, 17, udp(30000 + i, 9, b"b" * PAYLOAD)))
            for i in range(FLOWS)
        ]
        print("ready", flush=True)
        write, fd = os.write, tap.fd
        for line in sys.stdin:
            seconds = float(line.split()[1])
            n = 0
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                for frame in frames:  # 16 writes per clock check keeps the loop lean
                    write(fd, frame)
                n += len(frames)
            print(n / seconds, flush=True)


class Writer:
    def __init__(self, core: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_net", "--writer", TAP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        os.sched_setaffinity(self.proc.pid, {core})
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the tap writer did not start (exit {self.proc.wait()})")

    def run(self, seconds: float, during: NetProbe | None) -> float:
        """Frames/s over `seconds`; with a probe, this process does the agent's work meanwhile."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"run {seconds}\n")
        self.proc.stdin.flush()
        if during is not None:
            next_collect = time.monotonic() + 1.0
            ready = False
            while not ready:
                during.poll(100)
                if time.monotonic() >= next_collect:
                    during.collect()
                    next_collect += 1.0
                ready = _line_ready(self.proc.stdout.fileno())
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _line_ready(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def measure(w: Writer, probe: NetProbe, condition: str) -> float:
    """One turn: the program is loaded throughout; only `agent` has its filter on the tap."""
    if condition == "none":
        probe.set_taps({})
        return w.run(WINDOW_S, None)
    if condition == "bpftrace":
        probe.set_taps({})
        with bpftrace(bpftrace_script(TAP)) as peer:
            rate = w.run(WINDOW_S, None)
        assert sum(peer.maps.get("@tx_frames", {}).values()) > 0, "bpftrace saw no frame"
        return rate
    probe.set_taps({TAP: ZONE_KEY})
    before = probe.collect().zone(ZONE_KEY).tx_packets
    rate = w.run(WINDOW_S, probe)
    assert probe.collect().zone(ZONE_KEY).tx_packets > before, "the program saw no frame"
    return rate


def run() -> dict[str, Metric]:
    mine = os.sched_getaffinity(0)
    cores = sorted(mine)
    writer_core, rest = cores[-1], set(cores[:-1]) or set(cores)
    rates: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    ratios: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    os.sched_setaffinity(0, rest)
    w = Writer(writer_core)
    probe = NetProbe()
    try:
        probe.attach()
        measure(w, probe, "none")  # warm-up turn, not counted
        for r in range(ROUNDS):
            k = r % len(CONDITIONS)
            this_round: dict[str, float] = {}
            for c in CONDITIONS[k:] + CONDITIONS[:k]:
                this_round[c] = rate = measure(w, probe, c)
                rates[c].append(rate)
                print(f"  {r + 1}/{ROUNDS} {c:<8} {rate:>10.0f} frames/s", flush=True)
            for c, rate in this_round.items():
                ratios[c].append(rate / this_round["none"])
    finally:
        probe.detach()
        w.close()
        os.sched_setaffinity(0, mine)
    med = {c: statistics.median(v) for c, v in rates.items()}
    out: dict[str, Metric] = {}
    for c in CONDITIONS[1:]:
        ratio = statistics.median(ratios[c])
        runs = ", ".join(f"{x:.3f}" for x in ratios[c])
        print(f"  {c}/none median ratio {ratio:.3f} ({runs})")
        m = metric(med[c], "frames/s", med["none"])
        m["ratio"] = round(ratio, 4)
        out[f"net_tap_frames_per_s_{c}_ratio"] = m
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--writer":
        writer(sys.argv[2])
    else:
        from bench import record

        print(record(run()))
