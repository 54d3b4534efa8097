"""bpf/net.c on Kata-like pods made by hand (tests/helpers/pods.py): every pod's tap is
`tap0_kata` with the same ifindex in its own network namespace, held by a "guest" process,
and joined to the pod's eth0 by the owner's `ingress` qdiscs and mirred filters. The probe
tells the pods apart, sees both directions exactly once, never changes a frame's fate, and
leaves every qdisc and filter as it found it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tests.helpers.pods import TAP, Pod, kata_pod
from tests.integration.test_net_probe import drain, wait_counts
from zonewatch import coverage
from zonewatch.coverage import CHANNELS
from zonewatch.lab.tapfd import TapFd, ipv4, udp
from zonewatch.model import Vmm, Zone
from zonewatch.probes import tc
from zonewatch.probes.net import NetProbe, net_event
from zonewatch.probes.records import NetDir

ZONE_A, ZONE_B, ZONE_C = 81, 82, 83
HOST_PORT, GUEST_PORT = 7100, 7200
KATA_PRIO = 49152  # what tc gives the owner's first filter


@pytest.fixture(scope="module")
def probe() -> Iterator[NetProbe]:
    p = NetProbe()
    p.attach()
    try:
        yield p
    finally:
        p.detach()


@pytest.fixture
def pods() -> Iterator[tuple[Pod, Pod]]:
    with kata_pod("zwnp1", 1) as a, kata_pod("zwnp2", 2) as b:
        yield a, b


class HostEnd:
    """A UDP socket on the host end of a pod's veth: what the guest's frames reach."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((pod.host_ip, HOST_PORT))
        self.sock.settimeout(0.2)

    def to_guest(self, payloads: list[bytes]) -> None:
        for p in payloads:
            self.sock.sendto(p, (self.pod.guest_ip, GUEST_PORT))

    def received(self, count: int, timeout: float = 3.0) -> list[bytes]:
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            try:
                got.append(self.sock.recv(65536))
            except TimeoutError:
                continue
        return got

    def close(self) -> None:
        self.sock.close()


def udp_payloads(frames: list[bytes]) -> list[bytes]:
    """The UDP payload of each IPv4 frame the guest read (14 + 20 + 8 header bytes)."""
    return [f[42:] for f in frames if f[12:14] == b"\x08\x00" and f[23] == 17]


def exchange(pod: Pod, host: HostEnd, n: int, tag: bytes) -> tuple[list[bytes], list[bytes]]:
    """n datagrams each way: (what the guest read, what the host received)."""
    assert pod.guest is not None
    to_guest = [tag + b"-down-%d" % i for i in range(n)]
    to_host = [tag + b"-up-%d" % i for i in range(n)]
    host.to_guest(to_guest)
    read = udp_payloads(pod.guest.recv(n, 3.0))
    for i, p in enumerate(to_host):
        pod.guest.send(pod.udp_from_guest(GUEST_PORT + i, HOST_PORT, p))
    return read, host.received(n)


def test_two_pods_with_the_same_tap_are_told_apart(probe: NetProbe, pods: tuple[Pod, Pod]) -> None:
    a, b = pods
    assert a.ifindex(TAP) == b.ifindex(TAP)  # the collision the probe must resolve
    za, zb = a.zone(ZONE_A), b.zone(ZONE_B)
    assert za.taps == zb.taps == (TAP,)
    assert za.netns is not None and zb.netns is not None and za.netns.inode != zb.netns.inode
    with TapFd("zwnp3t") as plain, ExitStack() as stack:
        plain.configure("10.216.3.1", 30, guest_ip="10.216.3.2")
        zc = Zone(id="c", key=ZONE_C, name="c", tenant="t", vmm=Vmm.QEMU, pid=0, start_time=0,
                  taps=("zwnp3t",))  # fmt: skip
        stack.callback(probe.set_zones, [])
        entries = probe.netns_entries
        probe.set_zones([za, zb, zc])
        assert probe.blind_spots() == {}
        assert probe.netns_entries == entries + 2  # each pod's namespace entered once...
        for _ in range(3):
            probe.set_zones([za, zb, zc])  # ...and not again while nothing changes there
        probe.poll(0)
        assert probe.netns_entries == entries + 2
        hosts = [HostEnd(a), HostEnd(b)]
        for h in hosts:
            stack.callback(h.close)
        before = {k: probe.collect().zone(k) for k in (ZONE_A, ZONE_B, ZONE_C)}

        sent = {ZONE_A: 3, ZONE_B: 5}
        for pod, host, key in ((a, hosts[0], ZONE_A), (b, hosts[1], ZONE_B)):
            read, received = exchange(pod, host, sent[key], pod.netns.encode())
            assert len(read) == len(received) == sent[key]
        plain.write(plain.frame(0x0800, ipv4("10.216.3.2", "10.216.3.1", 17, udp(1, 9, b"c"))))

        for key, n in sent.items():
            z = wait_counts(probe, key, lambda z, n=n, k=key: z.since(before[k]).rx_packets >= n)
            z = z.since(before[key])
            # Each way exactly what was sent: frames to the guest are seen once, on eth0's
            # ingress (never again on the tap they are redirected out of).
            assert (z.tx_packets, z.rx_packets) == (n, n), key
            assert (z.malformed, z.truncated, z.other) == (0, 0, 0)
        zc_now = wait_counts(probe, ZONE_C, lambda z: z.tx_packets > before[ZONE_C].tx_packets)
        assert zc_now.since(before[ZONE_C]).tx_packets == 1

        flows = [(k, f) for k, f in probe.collect().flows if k.zone_key in (ZONE_A, ZONE_B)]
        for key, pod in ((ZONE_A, a), (ZONE_B, b)):
            mine = [(k, f) for k, f in flows if k.zone_key == key]
            assert {socket.inet_ntoa(k.local_ip) for k, _ in mine} == {pod.guest_ip}
            assert {f.ifindex for _, f in mine} == {pod.ifindex(TAP)}  # rx ones too
            assert sum(f.rx_packets for _, f in mine) == sent[key]
            assert sum(f.tx_packets for _, f in mine) == sent[key]
        records = drain(probe, lambda rs: len(rs) >= 2 * (3 + 5))
        by_zone = {(r.zone_key, r.key.local_port, r.dir) for r in records}
        assert {
            (ZONE_A, GUEST_PORT, NetDir.INGRESS),
            (ZONE_B, GUEST_PORT, NetDir.INGRESS),
        } <= by_zone
        for r in records:
            if r.zone_key in (ZONE_A, ZONE_B):
                pod = a if r.zone_key == ZONE_A else b
                assert socket.inet_ntoa(r.key.local_ip) == pod.guest_ip
                assert net_event(r, za if r.zone_key == ZONE_A else zb, 0).tap == TAP

        # Once the pods' zones are gone, the probe holds neither namespace open.
        probe.set_zones([])
        assert probe.watched() == {}
        held = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own fd is closed by now
                held.add(os.readlink(f"/proc/self/fd/{fd}"))
        assert not held & {f"net:[{za.netns.inode}]", f"net:[{zb.netns.inode}]"}


def tc_state(pod: Pod) -> tuple[object, ...]:
    """Every qdisc and filter of the pod's eth0 and tap, as tc shows them."""
    out: list[object] = [json.loads(pod.tc("-j", "qdisc", "show"))]
    for dev in ("eth0", TAP):
        for parent in ("ffff:", "ffff:fff2", "ffff:fff3"):
            shown = subprocess.run(
                ["tc", "-n", pod.netns, "-j", "filter", "show", "dev", dev, "parent", parent],
                capture_output=True, text=True,
            )  # fmt: skip
            out.append((dev, parent, shown.stdout.strip()))
    return tuple(out)


def test_watching_a_pod_changes_no_frames_fate_and_leaves_its_tc_as_it_was() -> None:
    """The same datagrams reach the guest and the host with the probe watching as without
    it; our filters sit before the owner's mirred (which still runs: the programs return
    TC_ACT_UNSPEC), and after detach every qdisc and filter is as it was."""
    with kata_pod("zwnp4", 4) as pod:
        host = HostEnd(pod)
        probe = NetProbe()
        try:
            before = tc_state(pod)
            n = 20
            read0, got0 = exchange(pod, host, n, b"without")
            probe.attach()
            probe.set_zones([pod.zone(ZONE_A)])
            assert probe.blind_spots() == {}
            # Ours come first on both hooks, the owner's mirred after.
            for dev in ("eth0", TAP):
                shown = json.loads(pod.tc("-j", "filter", "show", "dev", dev, "parent", "ffff:"))
                prios = list(dict.fromkeys((f["pref"], f["kind"]) for f in shown))
                assert prios == [(tc.FILTER_PRIO, "bpf"), (KATA_PRIO, "u32")], dev
            read1, got1 = exchange(pod, host, n, b"watched")
            assert [p.replace(b"without", b"") for p in read0] == [
                p.replace(b"watched", b"") for p in read1
            ]
            assert len(read1) == len(got1) == n
            assert [p.replace(b"without", b"") for p in got0] == [
                p.replace(b"watched", b"") for p in got1
            ]
            z = wait_counts(probe, ZONE_A, lambda z: z.rx_packets >= n and z.tx_packets >= n)
            assert (z.tx_packets, z.rx_packets) == (n, n)
            probe.detach()
            assert tc_state(pod) == before
        finally:
            probe.detach()
            host.close()


def test_with_one_program_for_all_namespaces_a_second_zone_on_an_ifindex_is_refused(
    pods: tuple[Pod, Pod], caplog: pytest.LogCaptureFixture
) -> None:
    """As where the programs cannot be patched per namespace: the first pod is watched, the
    second (same ifindex) is refused, logged once and reported as a blind spot; the first
    one's counts stay its own."""
    a, b = pods
    probe = NetProbe(per_netns_programs=False)
    probe.attach()
    try:
        assert not probe.per_netns_programs
        with caplog.at_level("WARNING", logger="zonewatch.probes.net"):
            for _ in range(3):
                probe.set_zones([a.zone(ZONE_A), b.zone(ZONE_B)])
        warned = [r.getMessage() for r in caplog.records if "cannot watch" in r.getMessage()]
        assert len(warned) == 1
        assert "cannot tell network namespaces apart" in warned[0]
        spots = probe.blind_spots()
        assert spots.keys() == {ZONE_B}
        assert "already watched for zone 81" in spots[ZONE_B]
        assert probe.blind_counts["ifindex_clash"] == 1
        host_b = HostEnd(b)
        host_a = HostEnd(a)
        try:
            exchange(b, host_b, 4, b"b")
            exchange(a, host_a, 2, b"a")
        finally:
            host_a.close()
            host_b.close()
        z = wait_counts(probe, ZONE_A, lambda z: z.rx_packets >= 2 and z.tx_packets >= 2)
        assert (z.tx_packets, z.rx_packets) == (2, 2)
        assert ZONE_B not in probe.collect().zones
    finally:
        probe.set_zones([])
        probe.detach()


def test_blind_spots_say_why(probe: NetProbe) -> None:
    """A namespace that cannot be entered, a tap that is not there, and a tap whose owner
    left no way to see what the zone is sent: each is reported for its zone, with a reason."""
    HALF, GONE, MISSING = 91, 92, 93  # this test's own zones
    with kata_pod("zwnp5", 5, redirect_to_tap=False) as pod, ExitStack() as stack:
        stack.callback(probe.set_zones, [])
        half = pod.zone(HALF)
        assert half.netns is not None
        gone = Zone(id="g", key=GONE, name="g", tenant="t", vmm=Vmm.KATA, pid=0,
                    start_time=0, taps=(TAP,),
                    netns=type(half.netns)(half.netns.inode + 1, "/proc/0/ns/net"))  # fmt: skip
        missing = Zone(id="m", key=MISSING, name="m", tenant="t", vmm=Vmm.QEMU, pid=0,
                       start_time=0, taps=("zwnp-none",))  # fmt: skip
        errors = probe.attach_errors
        probe.set_zones([half, gone, missing])
        spots = probe.blind_spots()
        assert spots.keys() == {HALF, GONE, MISSING}
        assert "frames to the zone are unseen" in spots[HALF]
        assert "cannot enter it" in spots[GONE]
        assert spots[MISSING] == "zwnp-none: no such device there"
        assert probe.attach_errors == errors + 3
        # The same, by cause (the reason codes of zonewatch zones and /metrics).
        causes = probe.blind_causes()
        assert {key: set(c) for key, c in causes.items()} == {
            HALF: {"no_rx_hook"}, GONE: {"netns"}, MISSING: {"tap_missing"},
        }  # fmt: skip
        assert causes[MISSING]["tap_missing"] == spots[MISSING]
        covered = coverage.from_probes([half, gone, missing], CHANNELS, causes)
        assert [v.reason for c in covered for v in c.blind() if v.channel == "net"] == [
            "no_rx_hook", "netns", "tap_missing",
        ]  # fmt: skip
        # The half-seen pod still counts what its guest sends.
        assert pod.guest is not None
        pod.guest.send(pod.udp_from_guest(GUEST_PORT, HOST_PORT, b"half"))
        assert wait_counts(probe, HALF, lambda z: z.tx_packets >= 1).tx_packets == 1
        probe.set_zones([])
        assert probe.blind_spots() == {}


def test_a_dead_agents_filter_in_a_pod_is_removed_on_entering(probe: NetProbe) -> None:
    with kata_pod("zwnp6", 6) as pod, ExitStack() as stack:
        stack.callback(probe.set_zones, [])
        tap = pod.ifindex(TAP)
        fd = probe.bpf.load_func(b"zw_net_zone_tx", __import__("bcc").BPF.SCHED_CLS).fd
        removed = probe.leftovers_removed
        from pyroute2 import IPRoute

        with IPRoute(netns=pod.netns, flags=0) as ipr:
            ipr.tc(
                "add-filter", "bpf", tap, 0x98, fd=fd, name="zw_net_zone_tx:999999999:1",
                parent=tc.INGRESS_QDISC, classid=1, direct_action=True, prio=7,
                protocol=tc.ETH_P_ALL,
            )  # fmt: skip
        probe.set_zones([pod.zone(ZONE_A)])
        assert probe.leftovers_removed == removed + 1
        names = [
            f["options"].get("bpf_name", "") if f["kind"] == "bpf" else f["kind"]
            for f in json.loads(pod.tc("-j", "filter", "show", "dev", TAP, "parent", "ffff:"))
            if "options" in f
        ]
        assert not any("999999999" in n for n in names)
        assert sum(n.startswith("zw_net_zone_tx:") for n in names) == 1


def test_the_fate_check_catches_a_program_that_ends_classification() -> None:
    """The control for the test above: a filter before Kata's mirred that returns TC_ACT_OK
    (as ours once did) ends classification there, and the guest receives nothing."""
    from bcc import BPF
    from pyroute2 import IPRoute

    src = "#include <uapi/linux/pkt_cls.h>\nint ends(struct __sk_buff *skb) { return TC_ACT_OK; }"
    bpf = BPF(text=src.encode())
    try:
        fd = bpf.load_func(b"ends", BPF.SCHED_CLS).fd
        with kata_pod("zwnp7", 7) as pod:
            host = HostEnd(pod)
            try:
                read, _got = exchange(pod, host, 3, b"open")
                assert len(read) == 3
                with IPRoute(netns=pod.netns, flags=0) as ipr:
                    ipr.tc(
                        "add-filter", "bpf", pod.ifindex("eth0"), 1, fd=fd, name="ends",
                        parent=tc.INGRESS_QDISC, classid=1, direct_action=True,
                        prio=tc.FILTER_PRIO, protocol=tc.ETH_P_ALL,
                    )  # fmt: skip
                read, _got = exchange(pod, host, 3, b"cut")
                assert read == []
            finally:
                host.close()
    finally:
        bpf.cleanup()
