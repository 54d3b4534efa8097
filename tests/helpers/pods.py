"""Kata-like pods made by hand, as Kata lays out every pod's network ("tcfilter" model):
a network namespace; a veth whose `eth0` end is inside it; a tap `tap0_kata` inside it; an
`ingress` qdisc on both eth0 and the tap, each with a u32 match-all filter redirecting
(mirred egress) to the other. A "guest" process (tests/helpers/tap_guest.py) holds the tap
inside the namespace as the pod's QEMU would. The host end of the veth gets 10.216.N.1/30,
the guest is 10.216.N.2 (a permanent neighbour entry: the host never asks ARP).

Everything is removed however the test ends: the guest is stopped, the namespace deleted
(with it eth0, the tap and their filters; the veth's host end goes with its peer). IPv6 is off
on every device, so the kernels send nothing of their own into the counts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from zonewatch.inventory import procfs
from zonewatch.lab.tapfd import ETH_P_IP, GUEST_MAC, ether, ipv4, udp
from zonewatch.model import NetNs, Vmm, Zone

TAP = "tap0_kata"
REPO = Path(__file__).resolve().parents[2]


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class Guest:
    """The process holding a pod's tap: frames written to and read from it on command."""

    def __init__(self, netns: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "tests.helpers.tap_guest", TAP],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        if self._line() != "ready":
            self.close()
            raise RuntimeError(f"the guest in {netns} did not open {TAP}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def _ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line()

    def send(self, frame: bytes) -> None:
        assert self._ask(f"send {frame.hex()}") == "ok"

    def recv(self, count: int, timeout: float) -> list[bytes]:
        return [bytes.fromhex(h) for h in self._ask(f"recv {count} {timeout}").split()]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


@dataclass
class Pod:
    netns: str
    index: int
    host_if: str
    host_mac: bytes = b""
    guest: Guest | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def host_ip(self) -> str:
        return f"10.216.{self.index}.1"

    @property
    def guest_ip(self) -> str:
        return f"10.216.{self.index}.2"

    def tc(self, *args: str) -> str:
        return sh("tc", "-n", self.netns, *args)

    def ifindex(self, device: str) -> int:
        return int(sh("ip", "netns", "exec", self.netns, "cat", f"/sys/class/net/{device}/ifindex"))

    def udp_from_guest(self, sport: int, dport: int, payload: bytes) -> bytes:
        """A frame the guest sends to the host end of the veth."""
        datagram = ipv4(self.guest_ip, self.host_ip, 17, udp(sport, dport, payload))
        return ether(self.host_mac, GUEST_MAC, ETH_P_IP, datagram)

    def zone(self, key: int) -> Zone:
        """The pod's zone as the inventory reads it from the guest process."""
        assert self.guest is not None
        proc = Path("/proc")
        netns = procfs.net_ns(proc, self.guest.pid)
        assert isinstance(netns, NetNs)
        return Zone(
            id=f"pod-{key}", key=key, name=f"pod-{self.netns}", tenant="t", vmm=Vmm.KATA,
            pid=self.guest.pid, start_time=0, taps=tuple(procfs.tap_names(proc, self.guest.pid)),
            netns=netns,
        )  # fmt: skip


@contextmanager
def kata_pod(netns: str, index: int, *, redirect_to_tap: bool = True) -> Iterator[Pod]:
    """A pod as above; without `redirect_to_tap`, eth0 has no filter sending frames on to the
    tap (the guest then only sends)."""
    pod = Pod(netns, index, host_if=f"{netns}-h")
    in_pod = ("ip", "netns", "exec", netns)
    try:
        sh("ip", "netns", "add", netns)
        for conf in ("all", "default"):
            sh(*in_pod, "sysctl", "-qw", f"net.ipv6.conf.{conf}.disable_ipv6=1")
        sh("ip", "link", "add", pod.host_if, "type", "veth", "peer", "name", "eth0", "netns", netns)
        Path(f"/proc/sys/net/ipv6/conf/{pod.host_if}/disable_ipv6").write_text("1")
        sh("ip", "addr", "add", f"{pod.host_ip}/30", "dev", pod.host_if)
        sh("ip", "link", "set", pod.host_if, "up")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        sh("ip", "-n", netns, "tuntap", "add", "dev", TAP, "mode", "tap")
        sh("ip", "-n", netns, "link", "set", TAP, "up")
        mac = sh("cat", f"/sys/class/net/{pod.host_if}/address").strip()
        pod.host_mac = bytes.fromhex(mac.replace(":", ""))
        guest_mac = ":".join(f"{b:02x}" for b in GUEST_MAC)
        sh("ip", "neigh", "replace", pod.guest_ip, "lladdr", guest_mac, "dev", pod.host_if,
           "nud", "permanent")  # fmt: skip
        for dev, other in (("eth0", TAP), (TAP, "eth0")):
            pod.tc("qdisc", "add", "dev", dev, "ingress")
            if dev == "eth0" and not redirect_to_tap:
                continue
            pod.tc("filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all", "u32",
                   "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev",
                   other)  # fmt: skip
        pod.guest = Guest(netns)
        yield pod
    finally:
        if pod.guest is not None:
            pod.guest.close()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["ip", "link", "del", pod.host_if], capture_output=True)
