"""Issue 4, end to end: a lab zone pings the host, opens TCP connections, sends UDP and
resolves names against servers this test runs on the host end of the zone's tap; the
agent's `net` events carry those flows, with the byte counts the servers saw, and the DNS
names, attributed to the zone."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.agent import AgentProcess, Line
from zonewatch.lab.lab import Lab
from zonewatch.lab.qemu import QemuZone, ZoneSpec

INDEX = 47  # zwtap47, 10.213.47.0/30: this test's own
TCP_PORT, TFTP_PORT, DNS_PORT = 7001, 6969, 53
TCP_SIZES = (12345, 2000)
PINGS = 3
PING_PAYLOAD = 56  # busybox ping's default
NAMES = ("db.zone.internal", "api.zone.internal")

# Waits for the host's "go" file (the agent is watching by then), then talks to the host.
WORKLOAD = f"""
while [ ! -e /mnt/share/go ]; do sleep 0.1; done
H=$ZW_HOST_IP
ping -c {PINGS} -i 0.2 $H
for n in {" ".join(map(str, TCP_SIZES))}; do head -c $n /dev/zero | nc -w 5 $H {TCP_PORT}; done
tftp -p -l /zone.env -r zw-upload $H {TFTP_PORT} || true
nslookup -type=a {NAMES[0]} $H || true
nslookup -type=aaaa {NAMES[1]} $H || true
"""


class HostServers:
    """TCP sink, UDP (TFTP) receiver and a tiny DNS server on the tap's host address; each
    counts the payload bytes it received and sent."""

    def __init__(self, host_ip: str) -> None:
        self.tcp_received: list[int] = []
        self.udp_received = 0
        self.udp_sent = 0
        self.dns_questions: list[bytes] = []
        self.dns_received = 0
        self.dns_sent = 0
        self._stop = threading.Event()
        self._tcp = socket.create_server((host_ip, TCP_PORT))
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind((host_ip, TFTP_PORT))
        self._dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._dns.bind((host_ip, DNS_PORT))
        for sock in (self._tcp, self._udp, self._dns):
            sock.settimeout(0.2)
        self._threads = [
            threading.Thread(target=f, daemon=True)
            for f in (self._serve_tcp, self._serve_tftp, self._serve_dns)
        ]
        for t in self._threads:
            t.start()

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                total = 0
                while chunk := conn.recv(65536):
                    total += len(chunk)
                self.tcp_received.append(total)

    def _serve_tftp(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._udp.recvfrom(65536)
            except TimeoutError:
                continue
            self.udp_received += len(data)
            # TFTP ERROR "access violation": the client stops instead of retrying.
            reply = struct.pack("!HH", 5, 2) + b"no\0"
            self.udp_sent += self._udp.sendto(reply, peer)

    def _serve_dns(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self._dns.recvfrom(65536)
            except TimeoutError:
                continue
            self.dns_received += len(query)
            if len(query) < 12:
                continue
            self.dns_questions.append(query[12:])
            # NXDOMAIN with the question echoed: the resolver has its answer, no retries.
            header = query[:2] + struct.pack("!HHHHH", 0x8183, 1, 0, 0, 0)
            self.dns_sent += self._dns.sendto(header + query[12:], peer)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for sock in (self._tcp, self._udp, self._dns):
            sock.close()


@pytest.fixture
def zone(lab: Lab) -> QemuZone:
    [started] = lab.start(
        [ZoneSpec(name="e2e-net-1", tenant="acme", workload=WORKLOAD, index=INDEX)], timeout=90
    )
    return started


@pytest.fixture
def servers(zone: QemuZone) -> Iterator[HostServers]:
    s = HostServers(zone.host_ip)
    try:
        yield s
    finally:
        s.close()


def net_events(lines: list[Line], zone_name: str, op: str | None = None) -> list[Line]:
    return [
        x
        for x in lines
        if x["type"] == "event"
        and x["channel"] == "net"
        and x["zone"]["name"] == zone_name
        and (op is None or x["op"] == op)
    ]


def test_zone_traffic_appears_as_flows_and_dns(
    tmp_path: Path, lab: Lab, zone: QemuZone, servers: HostServers
) -> None:
    tenants = lab.write_tenants(tmp_path / "tenants.yaml")
    with AgentProcess(tmp_path, "--events", "--flow-idle", "2", "--tenants", str(tenants)) as agent:
        agent.wait_log(f"net probe: watching {zone.tap}", timeout=30)
        (zone.share_dir / "go").write_text("")
        assert zone.wait_workload_exit(timeout=120) == 0
        agent.wait_for(
            lambda lines: (
                {
                    (e["net"]["proto"], e["net"]["end_reason"])
                    for e in net_events(lines, zone.name, "flow_end")
                }
                >= {("tcp", "fin"), ("icmp", "idle"), ("udp", "idle")}
                and len(net_events(lines, zone.name, "dns")) >= 2
            ),
            timeout=60,
            what="flow ends and DNS queries",
        )
        lines = agent.read()

    events = net_events(lines, zone.name)
    assert {e["zone"]["tenant"] for e in events} == {"acme"}
    assert {e["net"]["tap"] for e in events} == {zone.tap}

    # Every TCP connection: opened by the zone, ended by FIN, its bytes those the server got.
    tcp_ends = [
        e["net"]
        for e in net_events(lines, zone.name, "flow_end")
        if e["net"]["proto"] == "tcp" and e["net"]["dst_port"] == TCP_PORT
    ]
    assert sorted(n["tx_payload"] for n in tcp_ends) == sorted(servers.tcp_received)
    assert sorted(servers.tcp_received) == sorted(TCP_SIZES)
    for n in tcp_ends:
        assert (n["direction"], n["src_ip"], n["dst_ip"]) == ("egress", zone.guest_ip, zone.host_ip)
        assert n["end_reason"] == "fin"
        assert {"SYN", "ACK", "FIN"} <= set(n["tcp_flags"])
        assert n["rx_payload"] == 0

    ends = {
        (e["net"]["proto"], e["net"]["dst_port"]): e["net"]
        for e in net_events(lines, zone.name, "flow_end")
    }
    ping = next(n for (proto, _), n in ends.items() if proto == "icmp")
    assert (ping["tx_packets"], ping["rx_packets"]) == (PINGS, PINGS)
    assert ping["tx_payload"] == ping["rx_payload"] == PINGS * PING_PAYLOAD
    tftp = ends[("udp", TFTP_PORT)]
    assert (tftp["tx_payload"], tftp["rx_payload"]) == (servers.udp_received, servers.udp_sent)
    dns_flows = [  # one per nslookup: each has its own source port
        e["net"]
        for e in net_events(lines, zone.name, "flow_end")
        if (e["net"]["proto"], e["net"]["dst_port"]) == ("udp", DNS_PORT)
    ]
    assert len(dns_flows) == len(NAMES)
    assert sum(n["tx_payload"] for n in dns_flows) == servers.dns_received
    assert sum(n["rx_payload"] for n in dns_flows) == servers.dns_sent

    queries = {
        (e["net"]["dns_qname"], e["net"]["dns_qtype"]) for e in net_events(lines, zone.name, "dns")
    }
    assert {(NAMES[0], "A"), (NAMES[1], "AAAA")} <= queries
    for e in net_events(lines, zone.name, "dns"):
        assert (e["net"]["dst_ip"], e["net"]["dst_port"]) == (zone.host_ip, DNS_PORT)

    stats = [x for x in lines if x["type"] == "stats" and x["zone"]["name"] == zone.name]
    assert any(s["net"]["tx_packets_per_s"] > 0 and s["net"]["new_flows_per_s"] > 0 for s in stats)
    assert all(s["net"]["malformed_per_s"] == 0 for s in stats)
    assert not any(x["type"] == "lost" and x["source"].startswith("net.") for x in lines)
