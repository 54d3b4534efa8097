"""The lab's kata layout: real QEMU zones laid out as Kata's runtime lays out a pod (network
namespace, tap0_kata joined to eth0 by mirred filters, virtiofsd, sandbox id, OCI bundle),
side by side with a plain zone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from zonewatch.errors import EnvironmentProblem
from zonewatch.lab import kata, taps
from zonewatch.lab.assets import GuestAssets
from zonewatch.lab.lab import Lab, cleanup_leftovers, lab_down, lab_status
from zonewatch.lab.qemu import QemuZone, ZoneSpec
from zonewatch.lab.state import (
    NETNS_DIR,
    find_processes,
    proc_cmdline,
    proc_start_time,
    state_root,
    virtiofsd_processes,
)

pytestmark = pytest.mark.e2e
TOP_FOLDERS = [Path("/run/vc"), Path("/run/kata-containers"), Path("/run/containerd")]

WORKLOAD = """\
set -e
mkdir -p "$ZW_SHARE/out"
echo "hello from $ZW_NAME of $ZW_TENANT" > "$ZW_SHARE/out/hello.txt"
grep " $ZW_SHARE " /proc/mounts
ping -c 2 -W 3 "$ZW_HOST_IP"
"""


@dataclass(slots=True, frozen=True)
class KataTraces:
    """What a kata zone made on the host, to check that all of it goes."""

    sandbox_id: str
    netns: str
    host_link: str
    pids: tuple[int, ...]  # QEMU and virtiofsd

    @classmethod
    def of(cls, zone: QemuZone) -> KataTraces:
        pids = (zone.pid, *zone.virtiofsd_pids)
        return cls(zone.sandbox_id, zone.netns, zone.host_link, pids)

    def left(self) -> list[str]:
        """Whatever of it is still there (empty when all is gone)."""
        left = [f"pid {pid}" for pid in self.pids if proc_start_time(pid) is not None]
        left += [f"process {pid}" for pid, _ in find_processes(self._mentions_sandbox)]
        if Path(NETNS_DIR, self.netns).exists():
            left.append(f"netns {self.netns}")
        if taps.tap_exists(self.host_link):
            left.append(f"link {self.host_link}")
        for root in (kata.VM_ROOT, kata.SHARED_ROOT, kata.BUNDLE_ROOT):
            if (root / self.sandbox_id).exists():
                left.append(str(root / self.sandbox_id))
        return left

    def _mentions_sandbox(self, argv: list[str]) -> bool:
        return any(self.sandbox_id in arg for arg in argv)


def netns_inode(path: str | Path) -> int:
    return os.stat(path).st_ino


def link_in(netns: str, name: str) -> dict[str, object]:
    out = subprocess.run(
        ["ip", "-n", netns, "-j", "link", "show", "dev", name],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (link,) = json.loads(out)
    assert isinstance(link, dict)
    return link


def ingress_filters(netns: str, dev: str) -> str:
    return subprocess.run(
        ["tc", "-s", "-n", netns, "filter", "show", "dev", dev, "ingress"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def thread_names(pid: int) -> set[str]:
    task = Path(f"/proc/{pid}/task")
    return {(task / tid / "comm").read_text().strip() for tid in os.listdir(task)}


def test_two_kata_zones_and_a_plain_zone_side_by_side(lab: Lab) -> None:
    tops_before = [p for p in TOP_FOLDERS if p.exists()]
    pod_a, pod_b, plain = lab.start(
        [
            ZoneSpec("pod-a", "acme", WORKLOAD, index=0, layout="kata"),
            ZoneSpec("pod-b", "globex", WORKLOAD, index=1, layout="kata"),
            ZoneSpec("zone-p", "acme", WORKLOAD, index=2),
        ]
    )
    print(f"boot seconds: {lab.boot_seconds}")
    host_netns = netns_inode("/proc/self/ns/net")

    # Every zone: its workload wrote through its share and pinged the host end.
    for zone in (pod_a, pod_b, plain):
        assert zone.wait_workload_exit(timeout=30) == 0, zone.console_tail()
        console = zone.console_text()
        assert "2 packets transmitted, 2 packets received" in console, console
        assert f"from {zone.host_ip}" in console
        hello = zone.share_dir / "out" / "hello.txt"
        assert hello.read_text() == f"hello from {zone.name} of {zone.tenant}\n"
    assert re.search(r"^share /mnt/share 9p ", plain.console_text(), re.MULTILINE)
    assert plain.host_link == plain.tap == "zwtap2"
    assert netns_inode(f"/proc/{plain.pid}/ns/net") == host_netns

    tap_indexes = set()
    for zone in (pod_a, pod_b):
        sandbox_id = zone.sandbox_id
        assert re.fullmatch(r"[0-9a-f]{64}", sandbox_id)
        assert re.search(r"^kataShared /mnt/share virtiofs ", zone.console_text(), re.MULTILINE)
        assert zone.share_dir == kata.SHARED_ROOT / sandbox_id / "shared"

        # QEMU runs in the pod's namespace, named and wired as Kata's runtime does it.
        assert netns_inode(f"/proc/{zone.pid}/ns/net") == netns_inode(zone.netns_path)
        assert netns_inode(zone.netns_path) != host_netns
        argv = proc_cmdline(zone.pid)
        assert argv[argv.index("-name") + 1] == f"sandbox-{sandbox_id}"
        assert not any("debug-threads" in arg for arg in argv)
        assert f"unix:/run/vc/vm/{sandbox_id}/qmp.sock,server=on,wait=off" in argv
        assert any("ifname=tap0_kata,script=no,downscript=no" in arg for arg in argv)
        assert zone.qmp_socket.is_socket()
        names = thread_names(zone.pid)
        assert not any(re.match(r"CPU \d+/", name) for name in names), names

        # The pod network: tap0_kata and eth0 (with the pod IP) in the namespace, joined by
        # mirred redirects both ways; the guest NIC has eth0's MAC; the host end outside.
        tap = link_in(zone.netns, "tap0_kata")
        tap_indexes.add(tap["ifindex"])
        eth0 = link_in(zone.netns, "eth0")
        assert any(f"mac={eth0['address']}" in arg for arg in argv)
        assert f"{zone.guest_ip}/30" in subprocess.run(
            ["ip", "-n", zone.netns, "-4", "addr", "show", "dev", "eth0"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        # The guest's pings went through both redirects (each counts what it sent on).
        for dev, other in (("eth0", "tap0_kata"), ("tap0_kata", "eth0")):
            filters = ingress_filters(zone.netns, dev)
            assert f"Egress Redirect to device {other}" in filters
            sent = re.search(r"Sent \d+ bytes (\d+) pkt", filters)
            assert sent is not None and int(sent.group(1)) >= 2, filters
        assert taps.tap_addresses(zone.host_link) == [f"{zone.host_ip}/30"]

        # virtiofsd: started with the socket as fd 3, forked into namespaces of its own.
        vfsd = zone.virtiofsd_pids
        assert len(vfsd) == 2, vfsd
        for pid in vfsd:
            vargv = proc_cmdline(pid)
            assert vargv[:2] == ["/usr/lib/qemu/virtiofsd", "--fd=3"]
            assert f"source={zone.share_dir}" in vargv
            assert netns_inode(f"/proc/{pid}/ns/net") not in (host_netns, netns_inode(
                zone.netns_path))  # fmt: skip

        # The sandbox's OCI bundle, where containerd keeps it, with the CRI annotations.
        config = json.loads(zone.bundle_config.read_text())
        assert zone.bundle_config == kata.BUNDLE_ROOT / sandbox_id / "config.json"
        annotations = config["annotations"]
        assert annotations["io.kubernetes.cri.container-type"] == "sandbox"
        assert annotations["io.kubernetes.cri.sandbox-id"] == sandbox_id
        assert annotations["io.kubernetes.cri.sandbox-namespace"] == zone.tenant
        assert annotations["io.kubernetes.cri.sandbox-name"] == zone.name
        assert re.fullmatch(r"[0-9a-f-]{36}", annotations["io.kubernetes.cri.sandbox-uid"])
        assert config["ociVersion"] and config["process"]["args"] and config["root"]["path"]

    # Same tap name and ifindex in both pods: as in production, only the namespace differs.
    assert tap_indexes == {3}
    assert pod_a.netns != pod_b.netns
    assert pod_a.sandbox_id != pod_b.sandbox_id
    status = {s["name"]: s for s in lab_status()}
    for zone in (pod_a, pod_b):
        entry = status[zone.name]
        assert (entry["layout"], entry["sandbox_id"], entry["netns"], entry["pod_ip"],
                entry["host_ip"], entry["bundle"], entry["tap"]) == (
            "kata", zone.sandbox_id, zone.netns, zone.guest_ip, zone.host_ip,
            str(zone.bundle_config), "tap0_kata")  # fmt: skip
        assert entry["virtiofsd_pids"] == zone.virtiofsd_pids
    assert status["zone-p"]["layout"] == "plain"
    tenants = {t["name"]: t["zones"] for t in yaml.safe_load(lab.tenants_yaml())["tenants"]}
    assert tenants == {"acme": ["pod-a", pod_a.sandbox_id, "zone-p"],
                       "globex": ["pod-b", pod_b.sandbox_id]}  # fmt: skip

    traces = [KataTraces.of(zone) for zone in (pod_a, pod_b)]
    lab.stop_all()
    for trace in traces:
        assert trace.left() == []
    assert not taps.tap_exists("zwtap2")
    # The folders above the sandboxes' go too, unless they were there before.
    assert [p for p in TOP_FOLDERS if p.exists()] == tops_before


def test_lab_up_kata_from_the_cli_then_lab_down(lab_assets: GuestAssets, tmp_path: Path) -> None:
    workload = tmp_path / "workload.sh"
    workload.write_text('echo "up in $ZW_NAME" > "$ZW_SHARE/up.txt"\n')
    up = subprocess.run(
        [sys.executable, "-m", "zonewatch", "lab", "up", "--zones", "1", "--layout", "kata",
         "--workload", str(workload)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        (zone,) = json.loads(up.stdout)
        assert (zone["layout"], zone["alive"], zone["tap"]) == ("kata", True, "tap0_kata")
        status = subprocess.run(
            [sys.executable, "-m", "zonewatch", "lab", "status", "--json"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        (listed,) = json.loads(status.stdout)
        table = subprocess.run(
            [sys.executable, "-m", "zonewatch", "lab", "status"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.splitlines()  # fmt: skip
        assert table[1].split() == [zone["name"], zone["tenant"], "kata", str(zone["pid"]),
                                    "yes", zone["host_link"], zone["guest_ip"]]  # fmt: skip
        assert listed["sandbox_id"] == zone["sandbox_id"]
        assert listed["pid"] == zone["pid"]
        # The `lab up` process is gone; QEMU and virtiofsd live on in sessions of their own.
        assert len(listed["virtiofsd_pids"]) == 2
        up_file = Path(zone["share"]) / "up.txt"
        assert wait_until(up_file.exists, 20.0)
        assert up_file.read_text() == f"up in {zone['name']}\n"
        trace = KataTraces(zone["sandbox_id"], zone["netns"], zone["host_link"],
                           (zone["pid"], *listed["virtiofsd_pids"]))  # fmt: skip
        down = subprocess.run(
            [sys.executable, "-m", "zonewatch", "lab", "down"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert down.returncode == 0, down.stderr
        assert "stopped 1 zone(s)" in down.stdout
    finally:
        lab_down()
    assert trace.left() == []
    assert not state_root().exists()
    assert kata.lab_netns_names() == []


def test_kata_leftovers_of_a_killed_run_are_cleaned(lab_assets: GuestAssets) -> None:
    script = textwrap.dedent(
        """
        import time
        from zonewatch.lab.qemu import QemuZone, ZoneSpec
        zone = QemuZone(ZoneSpec("pod-orphan", "acme", "true", index=9, layout="kata")).start()
        print(zone.pid, zone.sandbox_id, flush=True)
        time.sleep(120)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as owner:
        try:
            assert owner.stdout is not None
            pid_text, sandbox_id = owner.stdout.readline().split()
            sandbox = kata.Sandbox(sandbox_id, "pod-orphan", "acme", "", kata.pod_addressing(9))
            trace = KataTraces(sandbox_id, sandbox.net.netns, sandbox.net.host_link,
                               (int(pid_text),))  # fmt: skip
            assert virtiofsd_processes(str(sandbox.share_dir))
        finally:
            owner.send_signal(signal.SIGKILL)
            owner.wait()
    try:
        # QEMU and virtiofsd die with their owner; what it could not clean stays until the
        # next cleanup.
        assert wait_until(lambda: not virtiofsd_processes(str(sandbox.share_dir)), 10.0)
        assert wait_until(lambda: proc_start_time(int(pid_text)) is None, 10.0)
        assert Path(NETNS_DIR, "zw-kata-9").exists()
        assert sandbox.config_path.is_file()
    finally:
        cleanup_leftovers()
    assert trace.left() == []
    assert not (state_root() / "pod-orphan").exists()


def test_a_kata_zone_that_cannot_start_leaves_nothing(lab: Lab) -> None:
    """The pod's /30 is taken on the host: the start fails with one clear line, before QEMU
    or virtiofsd, and undoes what it made (its recorded sandbox, folders, namespace)."""
    squatter = "zwkdummy11"
    subprocess.run(["ip", "tuntap", "add", "dev", squatter, "mode", "tap"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "10.216.11.1/30", "dev", squatter], check=True)
        with pytest.raises(EnvironmentProblem, match=r"zwkdummy11: already holds 10\.216\.11\.1"):
            lab.start([ZoneSpec("pod-bad", "acme", "true", index=11, layout="kata")])
        assert lab.zones == ()
        assert not Path(NETNS_DIR, "zw-kata-11").exists()
        assert not taps.tap_exists("zwkata11")
        assert not (state_root() / "pod-bad").exists()
        for root in (kata.VM_ROOT, kata.SHARED_ROOT, kata.BUNDLE_ROOT):
            assert not root.exists() or list(root.iterdir()) == []
        assert find_processes(lambda argv: "pod-bad" in " ".join(argv)) == []
    finally:
        subprocess.run(["ip", "link", "del", squatter], check=False)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; returns whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())
