"""bpf/net.c attached for real as tc filters on taps this test creates: frames written to a
tap's fd (as a VMM writes them) become flows and DNS records of the tap's zone, hostile
frames are counted exactly and disturb no other zone, and our filters come and go without
touching anyone else's."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest
from pyroute2 import IPRoute

from zonewatch.lab.tapfd import (
    ETH_P_IP,
    ETH_P_IPV6,
    TapFd,
    dns_query,
    icmp_echo,
    ipv4,
    ipv6,
    tcp,
    udp,
)
from zonewatch.model import Vmm, Zone
from zonewatch.probes import tc
from zonewatch.probes.net import NetProbe, ZoneNet, net_event, parse_dns_query
from zonewatch.probes.records import NetDir, NetOp, NetRecord

ZONE_A, ZONE_B = 61, 62
ETH_P_ARP = 0x0806
TCP_SYN, TCP_RST, TCP_ACK, TCP_PSH = 0x02, 0x04, 0x10, 0x08


@pytest.fixture(scope="module")
def probe() -> Iterator[NetProbe]:
    p = NetProbe()
    p.attach()
    try:
        yield p
    finally:
        p.detach()


class Net:
    """A "guest" end: a tap whose fd the test writes, its host address and guest address."""

    def __init__(self, tap: TapFd, index: int) -> None:
        self.tap = tap
        self.host_ip = f"10.214.{index}.1"
        self.guest_ip = f"10.214.{index}.2"

    def send(self, frame: bytes) -> None:
        assert self.tap.write(frame) == len(frame)

    def v4(self, proto: int, payload: bytes, **kw: int) -> bytes:
        return self.tap.frame(ETH_P_IP, ipv4(self.guest_ip, self.host_ip, proto, payload, **kw))

    def v6(self, next_header: int, payload: bytes) -> bytes:
        return self.tap.frame(ETH_P_IPV6, ipv6("fd00::2", "fd00::1", next_header, payload))


@pytest.fixture
def two_zones(probe: NetProbe) -> Iterator[tuple[Net, Net]]:
    """Zone A on tap zwnt1, zone B on zwnt2, both watched; unwatched and deleted after
    (the taps live as long as their fds)."""
    with TapFd("zwnt1") as tap_a, TapFd("zwnt2") as tap_b:
        try:
            tap_a.configure("10.214.1.1", 30, guest_ip="10.214.1.2")
            tap_b.configure("10.214.2.1", 30, guest_ip="10.214.2.2")
            probe.set_taps({"zwnt1": ZONE_A, "zwnt2": ZONE_B})
            yield Net(tap_a, 1), Net(tap_b, 2)
        finally:
            probe.set_taps({})


def counters(probe: NetProbe, zone: int) -> ZoneNet:
    return probe.collect().zone(zone)


def wait_counts(
    probe: NetProbe, zone: int, done: Callable[[ZoneNet], bool], timeout: float = 5.0
) -> ZoneNet:
    """The zone's counters once `done` holds (tc runs in the writer's syscall, so this is
    at once in practice; the deadline only guards against a broken program)."""
    deadline = time.monotonic() + timeout
    while not done(z := counters(probe, zone)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return z


def drain(
    probe: NetProbe, done: Callable[[list[NetRecord]], bool], timeout: float = 5.0
) -> list[NetRecord]:
    records: list[NetRecord] = []
    deadline = time.monotonic() + timeout
    while not done(records) and time.monotonic() < deadline:
        records += probe.poll(50)
    return records


def test_frames_become_flows_of_the_taps_zone(probe: NetProbe, two_zones: tuple[Net, Net]) -> None:
    a, _b = two_zones
    before = counters(probe, ZONE_A)
    frames = [
        *(a.v4(socket.IPPROTO_UDP, udp(4000, 9000, b"u" * n)) for n in (10, 200, 1000)),
        a.v4(socket.IPPROTO_ICMP, icmp_echo(0x77, 1, b"p" * 56)),
        a.v4(socket.IPPROTO_UDP, udp(4001, 53, dns_query(b"db.example.internal", 28))),
    ]
    for frame in frames:
        a.send(frame)
    # And one datagram the host sends to the "guest": the tap's tc egress.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((a.host_ip, 0))
        s.sendto(b"r" * 300, (a.guest_ip, 9100))
        host_port = s.getsockname()[1]
    z = wait_counts(probe, ZONE_A, lambda z: z.rx_packets > before.rx_packets).since(before)
    assert z.tx_packets == len(frames)
    assert z.tx_bytes == sum(len(f) for f in frames)
    assert z.dns_queries == 1
    assert (z.malformed, z.truncated, z.fragments) == (0, 0, 0)
    # What the host sent back (echo reply, port unreachables) is all in the tap's flows.
    on_tap = [f for k, f in probe.collect().flows if f.ifindex == a.tap.index]
    assert z.rx_packets == sum(f.rx_packets for f in on_tap)
    assert z.rx_bytes == sum(f.rx_bytes for f in on_tap) + 14 * z.rx_packets

    records = drain(probe, lambda rs: len(rs) >= 5)
    starts = {(r.key.proto, r.key.local_port, r.key.remote_port): r for r in records}
    assert set(starts) >= {(17, 4000, 9000), (1, 0x77, 0), (17, 4001, 53), (17, 9100, host_port)}
    assert {r.zone_key for r in records} == {ZONE_A}
    assert starts[(17, 9100, host_port)].flow.initiator == NetDir.INGRESS
    dns = [r for r in records if r.op == NetOp.DNS]
    assert len(dns) == 1
    question = parse_dns_query(dns[0].dns)
    assert (question.qname, question.qtype_name) == ("db.example.internal", "AAAA")

    flows = {
        (k.proto, k.local_port, k.remote_port): f
        for k, f in probe.collect().flows
        if k.zone_key == ZONE_A
    }
    udp_flow = flows[(17, 4000, 9000)]
    assert (udp_flow.tx_packets, udp_flow.tx_payload) == (3, 1210)
    assert udp_flow.tx_bytes == 1210 + 3 * (20 + 8)
    assert (udp_flow.rx_packets, udp_flow.rx_bytes) == (0, 0)
    assert flows[(1, 0x77, 0)].tx_payload == 56
    assert flows[(17, 9100, host_port)].rx_payload == 300


def test_tcp_reset_by_the_host_ends_the_flow(probe: NetProbe, two_zones: tuple[Net, Net]) -> None:
    """A SYN to a port nobody listens on: the host's own stack answers RST, which the
    tap's egress program sees and ends the flow with."""
    a, _b = two_zones
    a.send(a.v4(socket.IPPROTO_TCP, tcp(45000, 9, TCP_SYN)))
    records = drain(probe, lambda rs: any(r.op == NetOp.FLOW_END for r in rs))
    end = next(r for r in records if r.op == NetOp.FLOW_END)
    assert (end.key.local_port, end.key.remote_port) == (45000, 9)
    assert end.flow.tcp_flags & TCP_RST
    assert (end.flow.tx_packets, end.flow.rx_packets) == (1, 1)
    assert end.flow.initiator == NetDir.EGRESS
    zone = _zone(ZONE_A)
    event = net_event(end, zone, 0)
    assert (event.op, event.end_reason, event.direction) == ("flow_end", "rst", "egress")
    assert (event.src_ip, event.dst_ip, event.dst_port) == (a.guest_ip, a.host_ip, 9)
    assert event.tap == "zwnt1"


def _zone(key: int) -> Zone:
    return Zone(id="z", key=key, name="z", tenant="t", vmm=Vmm.QEMU, pid=1, start_time=0)


def hostile_frames(a: Net) -> dict[str, list[bytes]]:
    """Frames a hostile guest sends, by the counter each one must land in."""
    good_udp = ipv4(a.guest_ip, a.host_ip, socket.IPPROTO_UDP, udp(1, 2, b"x" * 40))
    bad_ihl = bytearray(good_udp)
    bad_ihl[0] = 0x43  # IHL 3: shorter than an IPv4 header can be
    bad_version = bytearray(good_udp)
    bad_version[0] = 0x55
    long_total = bytearray(good_udp)
    long_total[2:4] = struct.pack("!H", 1400)  # says 1400 bytes; the frame holds 68
    short_total = bytearray(good_udp)
    short_total[2:4] = struct.pack("!H", 12)  # shorter than its own header
    tcp_doff = bytearray(tcp(5, 6, TCP_ACK, b"z" * 10))
    tcp_doff[12] = 2 << 4  # data offset 8 bytes
    tcp_doff_long = bytearray(tcp(5, 6, TCP_ACK))
    tcp_doff_long[12] = 15 << 4  # 60-byte header in a 20-byte segment
    udp_long = bytearray(udp(7, 8, b"q" * 8))
    udp_long[4:6] = struct.pack("!H", 900)
    udp_short = bytearray(udp(7, 8, b"q" * 8))
    udp_short[4:6] = struct.pack("!H", 4)
    frag_ext = struct.pack("!BBHI", socket.IPPROTO_UDP, 0, 0x0001, 7) + udp(1, 2, b"f" * 16)
    too_many_ext = b"".join(struct.pack("!BB6x", 60, 0) for _ in range(7)) + udp(1, 2, b"e")
    return {
        "malformed": [
            a.tap.frame(ETH_P_IP, bytes(bad_ihl)),
            a.tap.frame(ETH_P_IP, bytes(bad_version)),
            a.tap.frame(ETH_P_IP, bytes(short_total)),
            a.v4(socket.IPPROTO_TCP, bytes(tcp_doff)),
            a.v4(socket.IPPROTO_TCP, bytes(tcp_doff_long)),
            a.v4(socket.IPPROTO_UDP, bytes(udp_long)),
            a.v4(socket.IPPROTO_UDP, bytes(udp_short)),
        ],
        "truncated": [
            a.tap.frame(ETH_P_IP, good_udp[:12]),  # cut inside the IP header
            a.tap.frame(ETH_P_IP, bytes(long_total)),
            a.v4(socket.IPPROTO_TCP, tcp(5, 6, TCP_SYN)[:12]),  # cut inside TCP
            a.v4(socket.IPPROTO_UDP, b"\0\1\0"),  # cut inside UDP
            a.v4(socket.IPPROTO_ICMP, b"\x08\0"),  # cut inside ICMP
            a.tap.frame(ETH_P_IPV6, b"\x60\0\0"),  # cut inside the IPv6 header
        ],
        "fragments": [
            a.v4(socket.IPPROTO_UDP, udp(1, 2, b"m" * 32), frag_off=0x2000),  # MF
            a.v4(socket.IPPROTO_UDP, b"n" * 32, frag_off=0x0004),  # offset 32
            a.v6(44, frag_ext),
        ],
        "other": [
            a.tap.frame(ETH_P_ARP, bytes(28)),
            a.tap.frame(0x8100, bytes(46)),  # VLAN-tagged
            a.v6(60, too_many_ext),
        ],
    }


def test_hostile_frames_are_counted_and_spare_the_other_zone(
    probe: NetProbe, two_zones: tuple[Net, Net]
) -> None:
    a, b = two_zones
    before_a, before_b = counters(probe, ZONE_A), counters(probe, ZONE_B)
    hostile = hostile_frames(a)
    # Well-formed but unusual: extension headers walked to UDP; a DNS name of escapes and
    # one longer than DNS allows.
    walked = struct.pack("!BB6x", 17, 0) + udp(1111, 2222, b"w" * 24)
    odd = [
        a.v6(0, walked),
        a.v4(socket.IPPROTO_UDP, udp(3000, 53, dns_query([b"a\x00b", b"\xff.\\", b"x"], 16))),
        a.v4(socket.IPPROTO_UDP, udp(3001, 53, dns_query([b"L" * 63] * 5))),
    ]
    good_b = [b.v4(socket.IPPROTO_UDP, udp(5000 + i, 6000, b"b" * (i + 1))) for i in range(20)]
    sent = 0
    for frames in (*hostile.values(), odd):
        for frame in frames:
            a.send(frame)
            sent += 1
            b.send(good_b[sent % len(good_b)])
    b_sent = [good_b[i % len(good_b)] for i in range(1, sent + 1)]

    za = wait_counts(probe, ZONE_A, lambda z: z.tx_packets >= before_a.tx_packets + sent)
    za = za.since(before_a)
    zb = counters(probe, ZONE_B).since(before_b)
    assert za.tx_packets == sent
    assert za.malformed == len(hostile["malformed"])
    assert za.truncated == len(hostile["truncated"])
    assert za.fragments == len(hostile["fragments"])
    assert za.other == len(hostile["other"])
    assert za.dns_queries == 2
    # Zone B saw exactly its own frames, all well-formed.
    assert zb.tx_packets == len(b_sent)
    assert zb.tx_bytes == sum(len(f) for f in b_sent)
    assert (zb.malformed, zb.truncated, zb.fragments, zb.other) == (0, 0, 0, 0)
    on_b = [f for _k, f in probe.collect().flows if f.ifindex == b.tap.index]
    assert zb.new_flows == len(on_b)  # its own, and the host's ICMP answers to them
    assert sum(f.initiator == NetDir.EGRESS for f in on_b) == len(good_b)

    records = drain(probe, lambda rs: sum(r.op == NetOp.DNS for r in rs) >= 2)
    assert {r.zone_key for r in records if r.key.remote_port == 6000} == {ZONE_B}
    a_flows = {
        (r.key.proto, r.key.local_port)
        for r in records
        if r.zone_key == ZONE_A and r.flow.initiator == NetDir.EGRESS
    }
    # Only the well-formed frames zone A sent made flows; the walked IPv6 one among them.
    assert a_flows == {(17, 1111), (17, 3000), (17, 3001)}
    names = [parse_dns_query(r.dns) for r in records if r.op == NetOp.DNS]
    questions = {(q.qname, q.qtype_name, q.error) for q in names}
    assert ("a\\000b.\\255\\.\\\\.x", "TXT", "") in questions
    assert any(q.error == "name longer than 255 bytes" for q in names)


def test_lost_records_are_counted_exactly() -> None:
    """With a one-page ring buffer most new-flow records cannot fit: each one is either
    received or counted lost, none vanish."""
    small = NetProbe(ringbuf_pages=1)
    small.attach()
    try:
        with TapFd("zwnt3") as tap:
            tap.configure("10.214.3.1", 30, guest_ip="10.214.3.2")
            small.set_taps({"zwnt3": 63})
            net = Net(tap, 3)
            flows = 60
            for port in range(flows):
                net.send(net.v4(socket.IPPROTO_UDP, udp(20000 + port, 7, b"l")))
            received: list[NetRecord] = []
            while batch := small.poll(100):
                received += batch
            # The host's ICMP answers to some of them are flows (and records) too.
            made = small.collect().zone(63).new_flows
            small.set_taps({})
        lost = small.lost()
    finally:
        small.detach()
    assert made >= flows
    assert lost["net.ringbuf"] > 0
    assert len(received) + lost["net.ringbuf"] == made


def test_idle_flows_end_in_user_space(probe: NetProbe, two_zones: tuple[Net, Net]) -> None:
    a, _b = two_zones
    a.send(a.v4(socket.IPPROTO_UDP, udp(7777, 8888, b"i" * 5)))
    drain(probe, lambda rs: any(r.key.local_port == 7777 for r in rs))
    far = time.monotonic_ns() + int(probe.idle_timeout_s * 1e9) + 1
    ended = [r for r in probe.sweep(far) if r.key.local_port == 7777]
    assert len(ended) == 1
    assert ended[0].idle
    assert ended[0].op == NetOp.FLOW_END
    assert ended[0].flow.tx_payload == 5
    assert not any(k.local_port == 7777 for k, _ in probe.collect().flows)


def our_filters(ipr: IPRoute, index: int) -> list[str]:
    hooks = (tc.CLSACT_INGRESS, tc.CLSACT_EGRESS)
    return [tc.filter_name(msg) or "?" for h in hooks for msg in tc.filters(ipr, index, h)]


def test_filters_follow_the_taps_and_leave_others_alone(probe: NetProbe) -> None:
    """Ours are added and removed by name and handle; a foreign filter on the same hook,
    and a dead agent's leftover, are told apart: the first stays, the second goes."""
    with TapFd("zwnt4") as tap, IPRoute() as ipr:
        tap.configure("10.214.4.1", 30)
        index = tap.index
        probe.set_taps({"zwnt4": 64})
        fd = probe.bpf.load_func(b"zw_net_zone_tx", __import__("bcc").BPF.SCHED_CLS).fd
        ipr.tc(
            "add-filter", "bpf", index, 0x99, fd=fd, name="other_tool", parent=tc.CLSACT_INGRESS,
            classid=1, direct_action=True, prio=7,
        )  # fmt: skip
        ipr.tc(
            "add-filter", "bpf", index, 0x98, fd=fd, name="zw_net_zone_tx:999999999:1",
            parent=tc.CLSACT_INGRESS, classid=1, direct_action=True, prio=tc.FILTER_PRIO,
        )  # fmt: skip
        names = our_filters(ipr, index)
        assert "other_tool" in names
        assert sum(n.startswith("zw_net_zone_") for n in names) == 3  # ours x2 + the leftover

        # A second agent starting now clears the dead one's leftover, not the live ones.
        second = NetProbe()
        second.attach()
        try:
            assert second.leftovers_removed >= 1
            names = our_filters(ipr, index)
            assert "zw_net_zone_tx:999999999:1" not in names
            assert "other_tool" in names
            assert sum(n.startswith("zw_net_zone_") for n in names) == 2
        finally:
            second.detach()

        probe.set_taps({})
        assert our_filters(ipr, index) == ["other_tool"]


def test_a_gone_zones_counters_are_reported_once_and_its_slot_starts_over(
    probe: NetProbe,
) -> None:
    """Zone counters live in a per-CPU array, one slot per zone: a zone that leaves is
    reported by the next collect, then its slot goes to a later zone, zeroed first."""

    def zone(key: int, tap: str) -> Zone:
        return Zone(id=f"z{key}", key=key, name=f"z{key}", tenant="t", vmm=Vmm.QEMU,
                    pid=0, start_time=0, taps=(tap,))  # fmt: skip

    with TapFd("zwnt5") as tap:
        tap.configure("10.214.5.1", 30, guest_ip="10.214.5.2")
        net = Net(tap, 5)
        try:
            probe.set_zones([zone(65, "zwnt5")])
            for _ in range(3):
                net.send(net.v4(socket.IPPROTO_UDP, udp(40000, 9, b"x" * 100)))
            assert wait_counts(probe, 65, lambda z: z.tx_packets == 3).tx_packets == 3
            probe.set_zones([zone(66, "zwnt5")])  # the same tap, now another zone's
            assert probe.collect().zone(65).tx_packets == 3  # reported once more...
            assert 65 not in probe.collect().zones  # ...then gone, its slot free
            probe.set_zones([zone(67, "zwnt5")])  # 67 takes 65's slot
            assert probe.collect().zone(67).tx_packets == 0  # zeroed before reuse
            net.send(net.v4(socket.IPPROTO_UDP, udp(40000, 9, b"x" * 100)))
            assert wait_counts(probe, 67, lambda z: z.tx_packets == 1).tx_packets == 1
        finally:
            probe.set_zones([])


def test_a_zone_over_the_limit_waits_for_a_slot_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With every counter slot taken, a new zone's tap is refused (counted, one warning,
    however many syncs retry it) and watched as soon as a gone zone's slot is free."""

    def zone(key: int, tap: str) -> Zone:
        return Zone(id=f"z{key}", key=key, name=f"z{key}", tenant="t", vmm=Vmm.QEMU,
                    pid=0, start_time=0, taps=(tap,))  # fmt: skip

    one = NetProbe(max_zones=1)
    one.attach()
    try:
        with TapFd("zwnt6") as tap_a, TapFd("zwnt7") as tap_b:
            tap_a.configure("10.214.6.1", 30, guest_ip="10.214.6.2")
            tap_b.configure("10.214.7.1", 30, guest_ip="10.214.7.2")
            first, second = zone(71, "zwnt6"), zone(72, "zwnt7")
            with caplog.at_level("WARNING", logger="zonewatch.probes.net"):
                for _ in range(3):  # the inventory's refreshes
                    one.set_zones([first, second])
            refusals = [r.getMessage() for r in caplog.records if "cannot watch" in r.getMessage()]
            assert refusals == ["net probe: cannot watch zwnt7: all 1 zone slots are taken"]
            assert one.attach_errors == 1
            assert one.attached_taps.keys() == {"zwnt6"}

            one.set_zones([second])  # the first leaves: its slot is free after a collect
            assert 71 in one.collect().zones
            one.set_zones([second])
            assert one.attached_taps.keys() == {"zwnt7"}
            net = Net(tap_b, 7)
            net.send(net.v4(socket.IPPROTO_UDP, udp(40000, 9, b"x" * 100)))
            assert wait_counts(one, 72, lambda z: z.tx_packets == 1).tx_packets == 1
    finally:
        one.set_zones([])
        one.detach()
