"""Issue 13 end to end: Kata-layout zones, a plain zone and an unnamed micro-VMM under one agent.

Two lab zones laid out as Kata pods of different Kubernetes namespaces (their tenants come
from the sandbox bundles: the tenants file names only the plain zone and the micro-VMM), a
plain lab zone and a micro-VMM whose vCPU thread has no name of its own. Every channel's
events arrive on the right zone and tenant; the two pods' `tap0_kata` (same name, same
ifindex) never mix, which the distinct amounts each guest sends make visible. Then the pods'
traffic (ping through the mirred path, a TCP transfer from the host to the pod IP) is the
same with the agent attached as without, and the agent leaves every qdisc and filter as it
found it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess, Line
from tests.helpers.guest_shell import RUNNER_WORKLOAD, GuestShell, qmp_execute
from tests.helpers.microvms import microvms
from zonewatch.lab import microvm as mv
from zonewatch.lab.assets import GuestAssets
from zonewatch.lab.lab import Lab
from zonewatch.lab.qemu import QemuZone, ZoneSpec

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.access(mv.KVM_DEVICE, os.R_OK | os.W_OK), reason="needs read-write /dev/kvm"
    ),
]

SHOP, BILLING, PLAIN, KVM = "shop", "billing", "e2e-plain", "e2e-kvm-unnamed"
PLAIN_TENANT, KVM_TENANT = "plain-t", "kvm-t"
# Names only the zones that are not pods: the pods' tenants must come from their bundles.
TENANTS = f"""\
version: 1
tenants:
  - name: {PLAIN_TENANT}
    zones: ["{PLAIN}"]
  - name: {KVM_TENANT}
    zones: ["{KVM}"]
"""
# Pings per zone (count, payload bytes): distinct, so a flow counted on the wrong zone shows.
PINGS = {SHOP: (3, 100), BILLING: (5, 300), PLAIN_TENANT: (4, 200)}  # by tenant
SHARES = ("--share-mount", "kataShared=/mnt/share", "--share-mount", "share=/mnt/share")
AGENT_ARGS = ("--events", "--flow-idle", "2", "--stats-interval", "1", *SHARES)


@dataclass(slots=True)
class Zones:
    shop: QemuZone
    billing: QemuZone
    plain: QemuZone
    shells: dict[str, GuestShell]
    tc_at_boot: dict[str, dict[str, str]]  # pod -> its tc state before any agent ran

    @property
    def pods(self) -> tuple[QemuZone, QemuZone]:
        return self.shop, self.billing

    @property
    def all(self) -> tuple[QemuZone, QemuZone, QemuZone]:
        return self.shop, self.billing, self.plain


@pytest.fixture(scope="module")
def zones(lab_assets: GuestAssets) -> Iterator[Zones]:
    """The three lab zones, booted together once for the module, stopped however it ends."""
    lab = Lab(assets=lab_assets)
    try:
        started = time.monotonic()
        shop, billing, plain = lab.start(
            [
                ZoneSpec("pod-shop", SHOP, RUNNER_WORKLOAD, index=30, layout="kata"),
                ZoneSpec("pod-billing", BILLING, RUNNER_WORKLOAD, index=31, layout="kata"),
                ZoneSpec(PLAIN, PLAIN_TENANT, RUNNER_WORKLOAD, index=32),
            ],
            timeout=120,
        )
        print(f"boot: {time.monotonic() - started:.1f} s {lab.boot_seconds}")
        shells = {z.tenant: GuestShell(z) for z in (shop, billing, plain)}
        yield Zones(shop, billing, plain, shells, {z.name: tc_state(z) for z in (shop, billing)})
    finally:
        lab.stop_all()


def tc_state(pod: QemuZone) -> dict[str, str]:
    """Every qdisc and ingress/egress filter on the pod's eth0 and tap0_kata (in its
    namespace) and on its veth's host end, as `tc -j` prints them."""
    state = {}
    in_pod: tuple[str, ...] = ("ip", "netns", "exec", pod.netns)
    places = [(in_pod, dev) for dev in ("eth0", "tap0_kata")]
    places.append(((), pod.host_link))
    for prefix, dev in places:
        for what in (("qdisc", "show", "dev", dev),
                     ("filter", "show", "dev", dev, "ingress"),
                     ("filter", "show", "dev", dev, "egress")):  # fmt: skip
            run = subprocess.run([*prefix, "tc", "-j", *what], capture_output=True, text=True)
            state[" ".join((dev, *what[:1], *what[4:]))] = f"{run.returncode} {run.stdout}"
    return state


def tap_ifindex(pod: QemuZone) -> int:
    out = subprocess.run(
        ["ip", "-n", pod.netns, "-j", "link", "show", "dev", "tap0_kata"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    index: int = json.loads(out)[0]["ifindex"]
    return index


def netns_inode(pod: QemuZone) -> int:
    return os.stat(pod.netns_path).st_ino


def wait_watching(agent: AgentProcess, zones: Zones) -> None:
    """Until the agent's net probe has its programs on each pod's tap (and the plain one's)."""
    for pod in zones.pods:
        agent.wait_log(f"net probe: watching tap0_kata (netns {netns_inode(pod)})", timeout=30)
    agent.wait_log(f"net probe: watching {zones.plain.tap} ", timeout=30)


def of_zone(lines: list[Line], name: str, channel: str, op: str | None = None) -> list[Line]:
    return [
        x
        for x in lines
        if x["type"] == "event"
        and x["channel"] == channel
        and x["zone"]["name"] == name
        and (op is None or x["op"] == op)
    ]


def zone_name(zone: QemuZone) -> str:
    """The name the agent knows a zone by: a pod's sandbox id, a plain zone's own name."""
    return zone.sandbox_id if zone.layout == "kata" else zone.name


def icmp_ends(lines: list[Line], zone: QemuZone) -> list[dict[str, Any]]:
    return [
        e["net"] for e in of_zone(lines, zone_name(zone), "net", "flow_end")
        if e["net"]["proto"] == "icmp"
    ]  # fmt: skip


class UnixListener:
    """A unix socket the test listens on, for QEMU to connect to (a proc `connect`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.settimeout(10)

    def accept_one(self) -> None:
        conn, _ = self.sock.accept()
        conn.close()

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def vmm_connects_to(pod: QemuZone, listener: UnixListener, chardev: str) -> None:
    """Make the pod's QEMU itself connect to `listener` (a chardev added over QMP), then
    remove the chardev again."""
    address = {"type": "unix", "data": {"path": str(listener.path)}}
    backend = {"type": "socket", "data": {"addr": address, "server": False}}
    qmp_execute(pod.qmp_socket, "chardev-add", {"id": chardev, "backend": backend})
    listener.accept_one()
    qmp_execute(pod.qmp_socket, "chardev-remove", {"id": chardev})


def test_every_channel_on_the_right_zone_and_tenant(tmp_path: Path, zones: Zones) -> None:
    started = time.monotonic()
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(TENANTS)
    listener = UnixListener(tmp_path / "vmm-connect.sock")
    with (
        microvms(tmp_path) as start_microvm,
        AgentProcess(tmp_path, *AGENT_ARGS, "--tenants", str(tenants)) as agent,
    ):
        microvm = start_microvm(KVM, rate=200.0, unnamed_threads=True)
        wait_watching(agent, zones)
        commands = {}
        for zone in zones.all:
            count, size = PINGS[zone.tenant]
            commands[zone.tenant] = zones.shells[zone.tenant].send(
                f'echo "data of {zone.tenant}" > "$ZW_SHARE/data-{zone.tenant}.txt"\n'
                f'cat "$ZW_SHARE/data-{zone.tenant}.txt"\n'
                f"ping -c {count} -s {size} -i 0.2 -W 3 $ZW_HOST_IP\n"
            )
        for pod in zones.pods:
            vmm_connects_to(pod, listener, f"zw-e2e-{pod.tenant}")
        outputs = {t: zones.shells[t].result(n, 60) for t, n in commands.items()}

        def complete(lines: list[Line]) -> bool:
            return all(icmp_ends(lines, z) for z in zones.all) and any(
                s["kvm"]["vcpus"] >= 1 for s in stats_of(lines, KVM)
            )

        agent.wait_for(complete, 60, "ping flows of every zone and the micro-VMM's vCPU")
        # Whole stats intervals after the flows ended: their packets are in some line.
        agent.wait_for(
            lambda ls: len(stats_of(ls, KVM)) >= 4,
            30, "stats lines of the micro-VMM",
        )  # fmt: skip
        lines = agent.read()
    listener.close()
    assert microvm.final_stats is not None and microvm.final_stats["iterations"] > 0
    print(f"test 1: {time.monotonic() - started:.1f} s, {len(lines)} lines")

    for tenant, (rc, output) in outputs.items():
        count, _ = PINGS[tenant]
        assert rc == 0, output
        assert f"{count} packets transmitted, {count} packets received" in output, output

    # The two pods' taps collide as in production: same name, same ifindex.
    assert len({tap_ifindex(pod) for pod in zones.pods}) == 1
    expected_tenant = {zone_name(z): z.tenant for z in zones.all}
    expected_tenant[KVM] = KVM_TENANT
    for line in lines:
        if "zone" in line and line["zone"]["name"] in expected_tenant:
            assert line["zone"]["tenant"] == expected_tenant[line["zone"]["name"]], line
    for zone in zones.all:
        assert_share_write(lines, zone)
        assert_pings(lines, zone)
    for pod in zones.pods:
        assert_vmm_connected(lines, pod, listener.path)
    assert_unnamed_vcpu(lines)


def stats_of(lines: list[Line], name: str) -> list[Line]:
    return [x for x in lines if x["type"] == "stats" and x["zone"]["name"] == name]


def assert_share_write(lines: list[Line], zone: QemuZone) -> None:
    """file: the guest's write through its own share, made by its own share server."""
    name = f"data-{zone.tenant}.txt"
    path = f"/mnt/share/{name}"
    touching = [
        x for x in lines
        if x["type"] == "event" and x["channel"] == "file" and x["file"]["path"] == path
    ]  # fmt: skip
    assert any(x["op"] == "create" for x in touching), f"no create of {path}: {touching}"
    assert {x["zone"]["name"] for x in touching} == {zone_name(zone)}
    assert {x["file"]["host_path"] for x in touching} == {str(zone.share_dir / name)}
    makers = {x["proc"]["pid"] for x in touching}
    if zone.layout == "kata":  # virtiofsd serves the pod's share, not QEMU
        assert {x["file"]["share"] for x in touching} == {"kataShared"}
        assert makers <= set(zone.virtiofsd_pids), (makers, zone.virtiofsd_pids)
    else:  # QEMU's own 9p server: the VMM's own file work
        assert {x["file"]["share"] for x in touching} == {"share"}
        assert makers == {zone.pid}


def assert_pings(lines: list[Line], zone: QemuZone) -> None:
    """net: the zone's flows carry only its own two addresses; its pings' counts are exact
    in the flow and, ARP aside, in the stats."""
    flows = of_zone(lines, zone_name(zone), "net")
    assert {(f["net"]["src_ip"], f["net"]["dst_ip"]) for f in flows} <= {
        (zone.guest_ip, zone.host_ip), (zone.host_ip, zone.guest_ip)}  # fmt: skip
    assert {f["net"]["tap"] for f in flows} == {zone.tap}
    count, size = PINGS[zone.tenant]
    (ping,) = icmp_ends(lines, zone)
    assert (ping["direction"], ping["src_ip"], ping["dst_ip"]) == (
        "egress", zone.guest_ip, zone.host_ip)  # fmt: skip
    assert (ping["tx_packets"], ping["rx_packets"]) == (count, count), ping
    assert ping["tx_payload"] == ping["rx_payload"] == count * size, ping
    assert ping["tx_bytes"] == count * (size + 28), ping  # IPv4 20 + ICMP 8 each
    stats = stats_of(lines, zone_name(zone))
    sent = sum(s["net"]["tx_packets_per_s"] * s["interval_s"] for s in stats)
    print(f"{zone.tenant}: stats say {sent:.1f} packets sent, pings {count}")
    assert count <= round(sent) <= count + 4, sent


def assert_vmm_connected(lines: list[Line], pod: QemuZone, path: Path) -> None:
    """proc: the pod's QEMU itself connected to the test's socket, once; no process other
    than the pod's QEMU and virtiofsd is in its proc events."""
    connects = [
        x["proc"] for x in of_zone(lines, zone_name(pod), "proc", "connect")
        if x["proc"]["target"] == str(path)
    ]  # fmt: skip
    assert [c["pid"] for c in connects] == [pod.pid], connects
    others = [
        x for x in of_zone(lines, zone_name(pod), "proc")
        if x["proc"]["pid"] not in (pod.pid, *pod.virtiofsd_pids)
    ]  # fmt: skip
    assert not others, others[:3]


def assert_unnamed_vcpu(lines: list[Line]) -> None:
    """kvm and sched: the micro-VMM's unnamed vCPU, its exits and its run delay."""
    kvm_stats = stats_of(lines, KVM)
    known = [s for s in kvm_stats if s["kvm"]["vcpus"] >= 1]
    assert known, kvm_stats[:2]
    assert all(s["kvm"]["vcpus"] == 1 for s in known)
    assert any(s["kvm"]["userspace_exits_per_s"] > 0 for s in known), known
    assert any(sum(s["sched"]["run_delay_hist_ns"].values()) > 0 for s in known), known


def guest_traffic(zones: Zones, pod: QemuZone, port: int, payload: bytes) -> tuple[str, bytes]:
    """The guest pings its host end through the mirred path while the host sends `payload`
    over TCP to the pod IP (the guest's `nc -l` writes it into the share); returns ping's
    summary line and the bytes the guest received."""
    shell = zones.shells[pod.tenant]
    got, done = pod.share_dir / f"got-{port}", pod.share_dir / f"got-{port}.rc"
    listen = f'nc -l -p {port} </dev/null >"$ZW_SHARE/got-{port}" 2>/dev/null'
    rc, output = shell.run(f'({listen}; echo $? >"$ZW_SHARE/got-{port}.rc") &\n', timeout=30)
    assert rc == 0, output
    ping = shell.send("ping -c 5 -i 0.2 -W 3 $ZW_HOST_IP\n")
    deadline = time.monotonic() + 30
    while True:  # the listener starts in the background: refused until it is up
        try:
            sock = socket.create_connection((pod.guest_ip, port), timeout=5)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with sock:
        sock.sendall(payload)
    rc, output = shell.result(ping, timeout=30)
    assert rc in (0, 1), output
    summary = next(line for line in output.splitlines() if "packets transmitted" in line)
    deadline = time.monotonic() + 30
    while not (done.exists() and done.read_text().strip()):  # nc exits at the sender's FIN
        assert time.monotonic() < deadline, f"{pod.name}: nc -l never ended"
        time.sleep(0.05)
    assert done.read_text().strip() == "0"
    return summary, got.read_bytes()


def test_pod_traffic_untouched_and_tc_as_before(tmp_path: Path, zones: Zones) -> None:
    started = time.monotonic()
    payload = os.urandom(200_000)
    want = hashlib.sha256(payload).hexdigest()
    without = {p.tenant: guest_traffic(zones, p, 7100, payload) for p in zones.pods}
    with AgentProcess(tmp_path, *AGENT_ARGS) as agent:
        wait_watching(agent, zones)
        during = {p.name: tc_state(p) for p in zones.pods}
        watched = {p.tenant: guest_traffic(zones, p, 7101, payload) for p in zones.pods}
        agent.wait_for(
            lambda ls: all(
                any(e["net"]["proto"] == "tcp" and e["net"]["dst_port"] == 7101
                    for e in of_zone(ls, zone_name(p), "net", "flow_end"))
                for p in zones.pods
            ), 30, "the TCP transfers' flow ends",
        )  # fmt: skip
        lines = agent.read()
    after = {p.name: tc_state(p) for p in zones.pods}
    print(f"test 2: {time.monotonic() - started:.1f} s")

    for tenant in (SHOP, BILLING):
        (summary, got), (summary_watched, got_watched) = without[tenant], watched[tenant]
        assert summary == "5 packets transmitted, 5 packets received, 0% packet loss", summary
        assert summary_watched == summary
        assert hashlib.sha256(got).hexdigest() == want, len(got)
        assert hashlib.sha256(got_watched).hexdigest() == want, len(got_watched)
    # The agent saw the transfer it did not disturb, on the right pod.
    for pod in zones.pods:
        tcp = [
            e["net"] for e in of_zone(lines, zone_name(pod), "net", "flow_end")
            if e["net"]["proto"] == "tcp" and e["net"]["dst_port"] == 7101
        ]  # fmt: skip
        # Connects refused before the guest's listener was up end in RST, carrying nothing.
        (done,) = [t for t in tcp if t["end_reason"] == "fin"]
        assert all(t["end_reason"] == "rst" and t["rx_payload"] == 0 for t in tcp if t != done)
        assert (done["direction"], done["dst_ip"]) == ("ingress", pod.guest_ip), done
        assert done["rx_payload"] == len(payload), done
        print(f"{pod.tenant}: {len(tcp) - 1} refused, then {done['rx_payload']} bytes in "
              f"{done['rx_packets']} packets")  # fmt: skip
    # Every qdisc and filter as it was when the pods booted, before any agent; while it
    # watched, its filters were there (so the comparison can fail).
    for pod in zones.pods:
        boot = zones.tc_at_boot[pod.name]
        changed = sorted(k for k in boot if during[pod.name][k] != boot[k])
        print(f"{pod.tenant}: the agent's filters were on {changed}")
        assert "eth0 filter ingress" in changed and "tap0_kata filter ingress" in changed
        assert after[pod.name] == zones.tc_at_boot[pod.name], json.dumps(
            {"boot": zones.tc_at_boot[pod.name], "after": after[pod.name]}, indent=1
        )
