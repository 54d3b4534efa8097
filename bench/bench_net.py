"""Cost of the net channel to a zone's traffic: frames/s a process pushes through a tap by
writing its fd (as a VMM does), with bpf/net.c attached to the tap and without.

A writer process owns a tap (zwntbench0, 10.215.0.1/30 on the host end) and, on each
command, writes frames flat out for WINDOW_S seconds and reports how many. The frames
are what a guest sends: UDP datagrams of 512 bytes over 16 flows to the host end, so
every frame runs the program's whole path (zone lookup, IPv4/UDP parse, flow update).
Conditions take turns, round after round, in alternating order:
  none    no filter on the tap (the program stays loaded, unattached): the baseline
  agent   NetProbe's filters on the tap, the tap in its zone map; this process polls its ring
          buffer and collects its maps every second, as the agent does
The ratio is the median over rounds of (agent / none of the same round). The writer is
pinned to one core, this process to the other.

Environment: ZW_BENCH_ROUNDS (default 10), ZW_BENCH_SECONDS (default 2).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from bench import Metric, metric
from zonewatch.probes.net import NetProbe

ROUNDS = int(os.environ.get("ZW_BENCH_ROUNDS", "10"))
WINDOW_S = float(os.environ.get("ZW_BENCH_SECONDS", "2"))
TAP = "zwntbench0"
HOST_IP, GUEST_IP = "10.215.0.1", "10.215.0.2"
FLOWS = 16
PAYLOAD = 512
ZONE_KEY = 1


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
    """One turn: the program is loaded throughout; `none` has no filter on the tap."""
    if condition == "none":
        probe.set_taps({})
        return w.run(WINDOW_S, None)
    probe.set_taps({TAP: ZONE_KEY})
    before = probe.collect().zone(ZONE_KEY).tx_packets
    rate = w.run(WINDOW_S, probe)
    assert probe.collect().zone(ZONE_KEY).tx_packets > before, "the program saw no frame"
    return rate


def run() -> dict[str, Metric]:
    mine = os.sched_getaffinity(0)
    cores = sorted(mine)
    writer_core, rest = cores[-1], set(cores[:-1]) or set(cores)
    rates: dict[str, list[float]] = {"none": [], "agent": []}
    ratios: list[float] = []
    os.sched_setaffinity(0, rest)
    w = Writer(writer_core)
    probe = NetProbe()
    try:
        probe.attach()
        measure(w, probe, "none")  # warm-up turn, not counted
        for r in range(ROUNDS):
            order = ("none", "agent") if r % 2 == 0 else ("agent", "none")
            this_round = {c: measure(w, probe, c) for c in order}
            for c, rate in this_round.items():
                rates[c].append(rate)
                print(f"  {r + 1}/{ROUNDS} {c:<6} {rate:>10.0f} frames/s", flush=True)
            ratios.append(this_round["agent"] / this_round["none"])
    finally:
        probe.detach()
        w.close()
        os.sched_setaffinity(0, mine)
    med = {c: statistics.median(v) for c, v in rates.items()}
    ratio = statistics.median(ratios)
    print(f"  agent/none median ratio {ratio:.3f} ({', '.join(f'{x:.3f}' for x in ratios)})")
    m = metric(med["agent"], "frames/s", med["none"])
    m["ratio"] = round(ratio, 4)
    return {"net_tap_frames_per_s_agent_ratio": m}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--writer":
        writer(sys.argv[2])
    else:
        from bench import record

        print(record(run()))
