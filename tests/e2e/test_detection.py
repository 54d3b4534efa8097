"""Issue 5, end to end: lab zones attack, the agent's default rules alert within 2 s.

- lateral movement: a zone of tenant acme connects to a zone of tenant globex (routed
  through the host, forwarding switched on for those two taps only);
- cloud metadata: a zone connects to 169.254.169.254, which this test puts on the host end
  of that zone's tap, with a listener there (the traffic never leaves the tap);
- port scan: a zone probes 30 closed ports on the host end of its tap;
- sensitive file: a zone writes root/.ssh/authorized_keys in its 9p share;
- device node: the same zone tries to get out through its share (see
  zonewatch.lab.workloads.share_escape_attempt): the host sees the block device node;
- escape: QEMU's 9p server resolves guest paths inside the share (symlinks are followed by
  the guest, in the guest), so no guest action here makes the VMM open a host file outside
  it. What the rule is for, a taken-over VMM opening host files, is produced through the
  VMM itself: its monitor (`drive_add` opens /etc/shadow; `chardev-add socket` makes it
  connect out to an IP address; `netdev_add bridge` with a helper makes QEMU fork and
  exec a program: the proc channel's fork/exec);
- a benign zone doing file work and pings in the same run raises nothing but the `audit.*`
  findings the agent raises for every lab zone (lab QEMUs run as root, unconfined).

The network and share attacks run twice in the same run, booted together: on plain lab zones
and on Kata-layout zones (docs/lab.md). A kata guest's traffic goes tap0_kata -> mirred ->
eth0 -> veth -> the veth's host end `zwkata<i>` in the host namespace, which stands for the
tap's host end above (metadata address, listener, forwarding); its share is virtiofs,
served by virtiofsd (another process than QEMU), and the agent knows the pod by its sandbox
id (named after it in alerts) and its tenant by its bundle and the tenants file.

Latency: from the moment the test sees the guest's console marker (printed right before the
action; for the monitor, the moment the test sends the command) to the moment it reads the
alert from the agent's JSON lines. Both are polled every 20 ms, so this is an upper bound.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from tests.helpers.agent import AgentProcess, Line
from zonewatch.lab.assets import GuestAssets
from zonewatch.lab.kata import pod_addressing
from zonewatch.lab.lab import Lab, tenant_entries, tenants_yaml
from zonewatch.lab.qemu import QemuZone, ZoneSpec
from zonewatch.lab.taps import addressing
from zonewatch.lab.workloads import (
    METADATA_IP,
    SCAN_BASE,
    SCAN_PORTS,
    SSH_KEY,
    connect,
    gate,
    metadata_request,
    plant_ssh_key,
    port_scan,
    route_via_host,
    share_escape_attempt,
)
from zonewatch.model import parse_rfc3339_ns

RULES = Path(__file__).resolve().parents[2] / "rules"
LAYOUTS = ("plain", "kata")
ESCAPE, BENIGN = 63, 64
LATERAL_PORT = 5432
MAX_LATENCY_S = 2.0


@dataclass(frozen=True, slots=True)
class Cast:
    """The zones that play the network and share attacks on one layout, by index."""

    layout: str
    lateral: int
    target: int
    attacker: int

    def guest_ip(self, index: int) -> str:
        net = pod_addressing(index) if self.layout == "kata" else addressing(index)
        return net.guest_ip


CASTS = {"plain": Cast("plain", 60, 61, 62), "kata": Cast("kata", 70, 71, 72)}


def attack_workloads(cast: Cast) -> dict[int, str]:
    """The lateral pair's and the attacker's scripts (the same on either layout)."""
    target_ip, lateral_ip = cast.guest_ip(cast.target), cast.guest_ip(cast.lateral)
    return {
        cast.lateral: route_via_host(target_ip)
        + gate("lateral")
        + "echo ZW-ACT lateral\n"
        # The target's listener may come up a moment late: retry, each try is a new flow.
        + connect(target_ip, LATERAL_PORT, "hello-from-acme", tries=5),
        cast.target: route_via_host(lateral_ip)
        + gate("start")
        + "ping -c 1 -W 2 $ZW_HOST_IP\n"
        + "echo ZW-LISTENING\n"
        + f"nc -l -p {LATERAL_PORT} > /tmp/got\n"
        + 'echo "ZW-GOT $(cat /tmp/got)"\n',
        cast.attacker: route_via_host(METADATA_IP)
        + gate("metadata")
        + "echo ZW-ACT metadata\n"
        + metadata_request()
        + gate("scan")
        + port_scan("$ZW_HOST_IP", SCAN_PORTS, SCAN_BASE, marker="ZW-ACT scan")
        + gate("keys")
        + plant_ssh_key(marker="ZW-ACT keys")
        + gate("device")
        + "echo ZW-ACT device\n"
        + share_escape_attempt(),
    }


WORKLOADS = {
    **attack_workloads(CASTS["plain"]),
    **attack_workloads(CASTS["kata"]),
    ESCAPE: "true\n",
    BENIGN: gate("benign")
    + "mkdir -p /mnt/share/work\n"
    + "for i in 1 2 3; do echo data $i > /mnt/share/work/f$i.txt; cat /mnt/share/work/f$i.txt;"
    " done\n" + "ping -c 2 $ZW_HOST_IP\n" + "rm -r /mnt/share/work\n" + "echo ZW-BENIGN-DONE\n",
}
NAMES = {
    60: ("det-lateral", "acme"),
    61: ("det-target", "globex"),
    62: ("det-attacker", "acme"),
    ESCAPE: ("det-escape", "globex"),
    BENIGN: ("det-benign", "acme"),
    70: ("det-pod-lateral", "acme"),
    71: ("det-pod-target", "globex"),
    72: ("det-pod-attacker", "acme"),
}
KATA_ZONES = (CASTS["kata"].lateral, CASTS["kata"].target, CASTS["kata"].attacker)


def agent_name(zone: QemuZone) -> str:
    """The name the agent knows the zone by: a Kata pod's is its sandbox id."""
    return zone.sandbox_id if zone.layout == "kata" else zone.name


class MonitoredZone(QemuZone):
    """A lab zone whose QEMU also has a human monitor on a unix socket (the VMM's own
    control channel: what a taken-over VMM would do, done through it)."""

    @property
    def monitor_path(self) -> Path:
        return self.zone_dir / "monitor.sock"

    def command(self, assets: GuestAssets) -> list[str]:
        return [
            *super().command(assets),
            "-monitor",
            f"unix:{self.monitor_path},server=on,wait=off",
        ]

    def monitor(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.monitor_path))
            _read_prompt(s)
            s.sendall(command.encode() + b"\n")
            return _read_prompt(s)


def _read_prompt(s: socket.socket) -> str:
    data = b""
    while not data.endswith(b"(qemu) "):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


class MetadataListener:
    """An HTTP-ish listener on 169.254.169.254:80, an address this test gives the host end of
    each attacker's network (so the guests' metadata traffic ends on this machine)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes]] = []  # (peer address, what it sent)
        self._stop = threading.Event()
        self._sock = socket.create_server((METADATA_IP, 80))
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    self.requests.append((peer[0], conn.recv(4096)))
                    conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@contextlib.contextmanager
def host_network(zones: dict[int, QemuZone]) -> Iterator[MetadataListener]:
    """The host side of the attacks, undone whatever happens: the metadata address on each
    attacker's host end with a listener, and forwarding between each lateral pair's host
    ends only (a tap, or a kata pod's veth)."""
    casts = CASTS.values()
    metadata_links = [zones[c.attacker].host_link for c in casts]
    forwarding = [
        Path(f"/proc/sys/net/ipv4/conf/{zones[i].host_link}/forwarding")
        for c in casts
        for i in (c.lateral, c.target)
    ]
    added: list[int] = []
    with IPRoute() as ipr:
        listener: MetadataListener | None = None
        try:
            for link in metadata_links:
                index = ipr.link_lookup(ifname=link)[0]
                ipr.addr("add", index=index, address=METADATA_IP, prefixlen=32)
                added.append(index)
            listener = MetadataListener()
            for f in forwarding:
                f.write_text("1\n")
            yield listener
        finally:
            for f in forwarding:
                with contextlib.suppress(OSError):
                    f.write_text("0\n")
            if listener is not None:
                listener.close()
            for index in added:
                with contextlib.suppress(Exception):
                    ipr.addr("del", index=index, address=METADATA_IP, prefixlen=32)


@dataclass
class Timing:
    latency_s: float  # console marker (or monitor command) seen -> alert read
    event_to_alert_s: float  # the evidence event's kernel time -> alert read
    alert: Line = field(repr=False)


@dataclass
class Run:
    zones: dict[int, QemuZone]
    agent: AgentProcess
    listener: MetadataListener
    timings: dict[tuple[str, str], Timing] = field(default_factory=dict)  # (layout, attack)


def alerts(lines: list[Line], zone: str, rule: str | None = None) -> list[Line]:
    return [
        x
        for x in lines
        if x["type"] == "alert"
        and x["zone"]["name"] == zone
        and (rule is None or x["rule"] == rule)
    ]


def time_alert(
    run: Run, zone: QemuZone, rule: str, marker: str | float, timeout: float = 60.0
) -> Timing:
    """Poll the console for `marker` and the agent for the alert; time one against the other.
    A float marker is the monotonic time the test itself acted."""
    marker_at = marker if isinstance(marker, float) else None
    marker = marker if isinstance(marker, str) else ""
    pattern = re.compile(rf"^{re.escape(marker)}\r?$", re.MULTILINE) if marker else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker_at is None and pattern is not None and pattern.search(zone.console_text()):
            marker_at = time.monotonic()
        found = alerts(run.agent.read(), agent_name(zone), rule)
        if found:
            seen, seen_wall = time.monotonic(), time.time_ns()
            assert marker_at is not None, f"{rule}: alert before the marker {marker!r}"
            return Timing(
                seen - marker_at, (seen_wall - parse_rfc3339_ns(found[0]["first_ts"])) / 1e9,
                found[0],
            )  # fmt: skip
        time.sleep(0.02)
    raise AssertionError(
        f"no {rule!r} alert for {zone.name} within {timeout}s (marker seen: {marker_at})\n"
        f"--- console ---\n{zone.console_tail()}\n--- agent log ---\n"
        f"{run.agent.log.read_text()[-3000:]}"
    )


def net_events(lines: list[Line], zone: str) -> list[Line]:
    return [
        x
        for x in lines
        if x["type"] == "event" and x["channel"] == "net" and x["zone"]["name"] == zone
    ]


def go(zone: QemuZone, name: str) -> None:
    (zone.share_dir / f"go-{name}").write_text("")


@pytest.fixture(scope="module")
def run(lab_assets: GuestAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("detection")
    lab = Lab(assets=lab_assets)
    escape = MonitoredZone(
        ZoneSpec(*NAMES[ESCAPE], workload=WORKLOADS[ESCAPE], index=ESCAPE), assets=lab_assets
    )
    try:
        escape.start()
        started = lab.start(
            [
                ZoneSpec(
                    *NAMES[i],
                    workload=WORKLOADS[i],
                    index=i,
                    layout="kata" if i in KATA_ZONES else "plain",
                )
                for i in NAMES
                if i != ESCAPE
            ],
            timeout=180,
        )
        escape.wait_ready(timeout=180)
        zones = {z.spec.index: z for z in [*started, escape]}
        tenants = tmp / "tenants.yaml"
        tenants.write_text(tenants_yaml(tenant_entries(z.record for z in zones.values())))
        with (
            host_network(zones) as listener,
            AgentProcess(
                tmp, "--events", "--rules", str(RULES), "--tenants", str(tenants),
                "--share-mount", "share=/mnt/share", "--share-mount", "kataShared=/mnt/share",
                "--flow-idle", "5",
            ) as agent,
        ):  # fmt: skip
            for zone in zones.values():
                where = f" (netns {zone.netns_path.stat().st_ino})" if zone.layout == "kata" else ""
                agent.wait_log(f"net probe: watching {zone.tap}{where}", timeout=30)
            yield Run(zones, agent, listener)
    finally:
        escape.stop()
        lab.stop_all()


def attack(run: Run, cast: Cast) -> None:
    """The network and share attacks of one layout's zones, one after the other, each timed."""
    lateral, target, attacker = (run.zones[i] for i in (cast.lateral, cast.target, cast.attacker))
    target_ip = cast.guest_ip(cast.target)
    # The target shows itself on its tap first: that is how the agent learns its address.
    go(target, "start")
    target.wait_for_console(r"ZW-LISTENING", timeout=60)
    run.agent.wait_for(
        lambda lines: any(
            e["net"]["src_ip"] == target_ip for e in net_events(lines, agent_name(target))
        ),
        timeout=30,
        what=f"the {cast.layout} target zone's first flow",
    )
    steps = [  # attack, zone, its gate, rule, console marker
        ("lateral", lateral, "lateral", "Connection to another tenant's zone", "ZW-ACT lateral"),
        ("metadata", attacker, "metadata", "Cloud metadata service contacted from a zone",
         "ZW-ACT metadata"),
        ("port scan", attacker, "scan", "Port scan from a zone", "ZW-ACT scan 26"),
        ("authorized_keys", attacker, "keys", "SSH authorized keys written through a share",
         "ZW-ACT keys"),
        ("device node", attacker, "device", "Device node created through a share",
         "ZW-ACT device"),
    ]  # fmt: skip
    for name, zone, gate_name, rule, marker in steps:
        go(zone, gate_name)
        run.timings[(cast.layout, name)] = time_alert(run, zone, rule, marker)


@pytest.fixture(scope="module")
def attacked(run: Run) -> Run:
    """Every attack once, one after the other, each timed; the benign zone works alongside."""
    z = run.zones
    go(z[BENIGN], "benign")
    for cast in CASTS.values():
        attack(run, cast)
    escape = z[ESCAPE]
    assert isinstance(escape, MonitoredZone)
    started = time.monotonic()
    escape.monitor("drive_add 0 if=none,id=zwesc,file=/etc/shadow,format=raw,readonly=on")
    run.timings[("plain", "host path outside the share")] = time_alert(
        run, escape, "Zone VMM opened a host path outside its share", started
    )
    started = time.monotonic()
    # A taken-over VMM's own connection out (a client socket chardev): to the metadata
    # listener, a non-loopback address on this host.
    escape.monitor(f"chardev-add socket,id=zwc2,host={METADATA_IP},port=80")
    run.timings[("plain", "VMM connected out")] = time_alert(
        run, escape, "Zone VMM connected to a network address", started
    )
    started = time.monotonic()
    escape.monitor("netdev_add bridge,id=zwesc,br=zwnobr,helper=/bin/true")
    run.timings[("plain", "VMM spawned a program")] = time_alert(
        run, escape, "Zone VMM spawned a process", started
    )
    for (layout, name), timing in run.timings.items():
        print(
            f"{layout} {name}: alert {timing.latency_s:.3f} s after the action was seen, "
            f"{timing.event_to_alert_s:.3f} s after its event"
        )
    return run


@dataclass(frozen=True, slots=True)
class Expected:
    """What an attack's alert must say."""

    zone: int  # the attacking zone's index
    evidence: dict[str, Any]  # items the alert's evidence must hold
    summary: str  # text its summary must hold ({target}: the name the agent knows it by)


def expected(cast: Cast) -> dict[str, Expected]:
    """The network and share attacks' alerts on one layout."""
    target_ip = cast.guest_ip(cast.target)
    return {
        "lateral": Expected(
            cast.lateral,
            {"net.dst_ip": target_ip},
            f"{target_ip}:{LATERAL_PORT} (zone {{target}} of tenant globex)",
        ),
        "metadata": Expected(cast.attacker, {"net.dst_ip": METADATA_IP}, f"{METADATA_IP}:80"),
        "port scan": Expected(
            cast.attacker, {"distinct(net.dst_port, 60s)": 26}, "probed 26 ports"
        ),
        "authorized_keys": Expected(
            cast.attacker, {"file.path": "/mnt/share/root/.ssh/authorized_keys"}, "op=create"
        ),
        "device node": Expected(
            cast.attacker,
            {"file.path": "/mnt/share/.cache/sda"},
            "created device node or special file /mnt/share/.cache/sda",
        ),
    }


VMM_ATTACKS = {
    "host path outside the share": Expected(
        ESCAPE, {"proc.target": "/etc/shadow"}, "qemu-system-x86"
    ),
    "VMM connected out": Expected(ESCAPE, {"proc.sock.addr": METADATA_IP}, f"{METADATA_IP}:80"),
    "VMM spawned a program": Expected(ESCAPE, {}, "qemu-system-x86 (pid"),
}
EXPECTED = {
    (layout, name): e for layout, cast in CASTS.items() for name, e in expected(cast).items()
} | {("plain", name): e for name, e in VMM_ATTACKS.items()}


@pytest.mark.parametrize(
    ("layout", "attack"), [pytest.param(*key, id=" ".join(key)) for key in EXPECTED]
)
def test_attack_raises_its_alert_within_2s(attacked: Run, layout: str, attack: str) -> None:
    want = EXPECTED[(layout, attack)]
    timing = attacked.timings[(layout, attack)]
    zone = attacked.zones[want.zone]
    target = agent_name(attacked.zones[CASTS[layout].target])
    assert timing.alert["zone"]["tenant"] == zone.tenant
    assert want.evidence.items() <= timing.alert["evidence"].items(), timing.alert
    assert want.summary.format(target=target) in timing.alert["summary"], timing.alert
    assert timing.latency_s <= MAX_LATENCY_S, timing
    assert timing.event_to_alert_s <= MAX_LATENCY_S, timing


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_attacks_really_happened(attacked: Run, layout: str) -> None:
    """The traffic reached its (local) peers, the other tenant's zone and the listener; the
    key reached the share."""
    cast, z = CASTS[layout], attacked.zones
    z[cast.target].wait_for_console(r"ZW-GOT hello-from-acme", timeout=30)
    assert any(
        peer == cast.guest_ip(cast.attacker) and data.startswith(b"GET /latest/meta-data/")
        for peer, data in attacked.listener.requests
    ), attacked.listener.requests
    attacker = z[cast.attacker]
    scan = attacked.timings[(layout, "port scan")].alert
    assert scan["evidence"]["net.dst_ip"] == attacker.host_ip
    # The key landed in the share, written by the zone's share server: QEMU's 9p, or (kata)
    # virtiofsd, which the agent attributes to the pod.
    assert SSH_KEY in (attacker.share_dir / "root/.ssh/authorized_keys").read_text()
    servers = set(attacker.virtiofsd_pids) if layout == "kata" else {attacker.pid}
    created = [
        x
        for x in attacked.agent.read()
        if x["type"] == "event" and x["zone"]["name"] == agent_name(attacker)
        and x.get("op") == "create"
        and x["file"]["path"] == "/mnt/share/root/.ssh/authorized_keys"
    ]  # fmt: skip
    assert created, "no create event of authorized_keys"
    assert created[0]["proc"]["pid"] in servers, (created[0], servers)
    assert created[0]["file"]["host_path"] == f"{attacker.share_dir}/root/.ssh/authorized_keys"


def test_the_vmm_really_spawned_a_program(attacked: Run) -> None:
    escape = attacked.zones[ESCAPE]
    spawned = [
        x
        for x in attacked.agent.read()
        if x["type"] == "event" and x["channel"] == "proc" and x["op"] == "exec"
        and x["zone"]["name"] == escape.name
    ]  # fmt: skip
    assert spawned and spawned[0]["proc"]["exe"] == "/bin/true" and spawned[0]["proc"]["spawned"]


def test_benign_zone_raises_nothing_but_audit_findings(attacked: Run) -> None:
    benign = attacked.zones[BENIGN]
    benign.wait_for_console(r"ZW-BENIGN-DONE", timeout=60)
    attacked.agent.wait_for(
        lambda lines: any(
            x["type"] == "event" and x["zone"]["name"] == benign.name
            and x.get("op") == "rmdir" and x["file"]["path"] == "/mnt/share/work"
            for x in lines
        ),
        timeout=30,
        what="the benign zone's last file event",
    )  # fmt: skip
    raised = alerts(attacked.agent.read(), benign.name)
    # Lab QEMUs run as root without seccomp: the audit findings are true for every zone.
    assert raised and all(a["rule"].startswith("audit.") for a in raised), [
        (a["rule"], a["summary"]) for a in raised
    ]
