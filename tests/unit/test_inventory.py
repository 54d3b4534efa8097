"""The inventory over a fabricated /proc: zones appear, vanish, survive pid reuse correctly."""

from __future__ import annotations

import os
from pathlib import Path

from zonewatch.inventory import Inventory
from zonewatch.inventory.tenants import TenantMap, load_tenants
from zonewatch.model import Vmm

QEMU_ARGV = [
    "/usr/bin/qemu-system-x86_64",
    "-name",
    "zone-a,debug-threads=on",
    "-m",
    "256",
    "-netdev",
    "tap,id=n0,ifname=zwtap0,script=no,downscript=no",
    "-device",
    "virtio-net-pci,netdev=n0",
    "-fsdev",
    "local,id=fs0,path=/srv/a/share,security_model=mapped-xattr",
    "-device",
    "virtio-9p-pci,fsdev=fs0,mount_tag=share",
]


class FakeProc:
    def __init__(self, root: Path) -> None:
        self.root = root

    def spawn(
        self,
        pid: int,
        argv: list[str],
        start_time: int = 100,
        comm: str = "qemu-system-x86",
        threads: dict[int, str] | None = None,
        tun_ifaces: tuple[str, ...] = (),
    ) -> None:
        d = self.root / str(pid)
        for sub in ("task", "fd", "fdinfo"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        fields = ["S", "1"] + ["0"] * 17 + [str(start_time), "0"]
        (d / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}")
        (d / "cmdline").write_bytes(b"\0".join(os.fsencode(a) for a in argv) + b"\0")
        for tid, tcomm in (threads or {pid: comm}).items():
            (d / "task" / str(tid)).mkdir(exist_ok=True)
            (d / "task" / str(tid) / "comm").write_text(tcomm + "\n")
        for i, iface in enumerate(tun_ifaces):
            fd = 20 + i
            (d / "fd" / str(fd)).symlink_to("/dev/net/tun")
            (d / "fdinfo" / str(fd)).write_text(f"pos:\t0\nflags:\t02\niff:\t{iface}\n")

    def kill(self, pid: int) -> None:
        import shutil

        shutil.rmtree(self.root / str(pid))


def test_qemu_zone_with_vcpus_tap_share_and_tenant(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(
        4242,
        QEMU_ARGV,
        threads={4242: "qemu-system-x86", 4250: "CPU 0/TCG", 4251: "CPU 1/TCG", 4252: "worker"},
        tun_ifaces=("zwtap0",),
    )
    proc.spawn(77, ["/bin/bash"], comm="bash")
    tenants_file = tmp_path / "tenants.yaml"
    tenants_file.write_text("version: 1\ntenants:\n  - name: acme\n    zones: ['zone-*']\n")
    inv = Inventory(load_tenants(tenants_file), {"share": "/mnt/share"}, proc=proc.root)
    change = inv.refresh()
    assert [z.name for z in change.added] == ["zone-a"]
    zone = change.added[0]
    assert zone.vmm == Vmm.QEMU
    assert zone.tenant == "acme"
    assert zone.pid == 4242
    assert zone.vcpu_tids == (4250, 4251)
    assert zone.taps == ("zwtap0",)
    assert [(s.tag, s.host_path, s.guest_path) for s in zone.shares] == [
        ("share", "/srv/a/share", "/mnt/share")
    ]
    assert inv.zone_pids() == {4242: zone.key}
    assert not inv.refresh()  # nothing changed


def test_vanished_zone_is_removed_but_resolvable_by_key_for_a_while(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(4242, QEMU_ARGV)
    inv = Inventory(TenantMap.empty(), proc=proc.root)
    zone = inv.refresh().added[0]
    proc.kill(4242)
    change = inv.refresh()
    assert [z.id for z in change.removed] == [zone.id]
    assert inv.zones == {}
    assert inv.zone_pids() == {}
    by_key = inv.by_key(zone.key)
    assert by_key is not None and by_key.id == zone.id


def test_reused_pid_is_a_new_zone_with_a_new_key(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(4242, QEMU_ARGV, start_time=100)
    inv = Inventory(TenantMap.empty(), proc=proc.root)
    first = inv.refresh().added[0]
    proc.kill(4242)
    proc.spawn(4242, QEMU_ARGV, start_time=999)
    change = inv.refresh()
    assert [z.id for z in change.removed] == [first.id]
    assert len(change.added) == 1
    second = change.added[0]
    assert second.id != first.id
    assert second.key != first.key
    assert inv.zone_pids() == {4242: second.key}


def test_exec_into_a_vmm_is_noticed(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(500, ["/bin/sh", "-c", "exec qemu"], comm="sh")
    inv = Inventory(TenantMap.empty(), proc=proc.root)
    assert not inv.refresh().added
    proc.kill(500)
    proc.spawn(500, QEMU_ARGV, comm="qemu-system-x86")  # same pid and start time, new comm
    assert [z.pid for z in inv.refresh().added] == [500]


def test_virtiofsd_becomes_the_zones_helper(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(
        600,
        [
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "kz",
            "-chardev",
            "socket,id=char0,path=/run/vfs/kz.sock",
            "-device",
            "vhost-user-fs-pci,chardev=char0,tag=rootfs",
        ],
    )
    proc.spawn(
        601,
        [
            "/usr/libexec/virtiofsd",
            "--socket-path=/run/vfs/kz.sock",
            "--shared-dir",
            "/srv/kz/rootfs",
        ],
        comm="virtiofsd",
    )
    inv = Inventory(TenantMap.empty(), proc=proc.root)
    zone = inv.refresh().added[0]
    assert zone.helper_pids == (601,)
    assert [(s.tag, s.host_path, s.backend) for s in zone.shares] == [
        ("rootfs", "/srv/kz/rootfs", "virtiofs")
    ]
    assert inv.zone_pids() == {600: zone.key, 601: zone.key}


def test_unreadable_or_garbage_processes_are_skipped(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    (proc.root / "900").mkdir(parents=True)
    (proc.root / "900" / "stat").write_text("nonsense")
    proc.spawn(4242, QEMU_ARGV)
    inv = Inventory(TenantMap.empty(), proc=proc.root)
    assert [z.pid for z in inv.refresh().added] == [4242]


def test_invalid_utf8_in_share_disk_and_tap_names_is_escaped_not_fatal(tmp_path: Path) -> None:
    """argv may hold any bytes; what the zone carries is valid UTF-8 for JSON and gRPC, and
    share paths are escaped as the file channel decodes paths (\\xNN), so they still match."""
    import orjson

    from zonewatch.api.convert import zone_pb

    bad = os.fsdecode(b"\xff\xfe")
    argv = [
        a.replace("/srv/a/share", f"/srv/{bad}/share").replace("zwtap0", f"tap{bad}")
        for a in QEMU_ARGV
    ]
    argv += ["-drive", f"file=/img/{bad}.qcow2,if=virtio"]
    proc = FakeProc(tmp_path)
    proc.spawn(10, argv)
    inv = Inventory(proc=tmp_path)
    inv.refresh()
    (zone,) = inv.zones.values()
    assert zone.shares[0].host_path == "/srv/\\xff\\xfe/share"
    assert zone.disks == ("/img/\\xff\\xfe.qcow2",)
    assert zone.taps == ("tap\\xff\\xfe",)
    orjson.dumps(zone.to_json())  # raised TypeError (surrogates) before
    zone_pb(zone).SerializeToString()  # raised UnicodeEncodeError before


KATA_ARGV = ["/opt/kata/bin/qemu-system-x86_64", "-name", "sandbox-" + "ab" * 32, "-m", "256"]
UNNAMED = "qemu-system-x86"  # every thread's comm without debug-threads=on


def test_vcpu_threads_seen_running_join_a_zone_with_unnamed_threads(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(500, KATA_ARGV, threads={500: UNNAMED, 501: UNNAMED, 502: UNNAMED, 503: UNNAMED})
    inv = Inventory(TenantMap.empty(), proc=proc.root)
    (zone,) = inv.refresh().added
    assert zone.vcpu_tids == ()  # no name tells the vCPUs apart
    inv.observe_vcpu_threads({501: zone.key, 503: zone.key})
    change = inv.refresh()
    assert [z.vcpu_tids for z in change.updated] == [(501, 503)]
    assert not inv.refresh()  # the same observation: nothing new

    # vCPU 503 exits: gone from the VMM's task list, so gone even if the last observation
    # (read before it exited) still names it.
    (proc.root / "500" / "task" / "503" / "comm").unlink()
    (proc.root / "500" / "task" / "503").rmdir()
    change = inv.refresh()
    assert [z.vcpu_tids for z in change.updated] == [(501,)]
    # The next observation no longer has it: a thread taking tid 503 in this VMM later is
    # no vCPU until it is seen running KVM_RUN itself.
    inv.observe_vcpu_threads({501: zone.key})
    proc.spawn(500, KATA_ARGV, threads={503: UNNAMED})
    assert not inv.refresh()
    assert inv.zones[zone.id].vcpu_tids == (501,)


def test_a_seen_tid_only_joins_its_own_zone_while_it_is_that_vmms_thread(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(500, KATA_ARGV, threads={500: UNNAMED, 501: UNNAMED})
    proc.spawn(600, KATA_ARGV, threads={600: UNNAMED, 601: UNNAMED})
    inv = Inventory(TenantMap.empty(), proc=proc.root)
    zones = {z.pid: z for z in inv.refresh().added}
    a, b = zones[500], zones[600]
    # A stale observation: tid 601 seen for zone a (a reused tid, now zone b's thread), and
    # a key of a zone that is gone.
    inv.observe_vcpu_threads({501: a.key, 601: a.key, 700: 999})
    inv.refresh()
    assert inv.zones[a.id].vcpu_tids == (501,)
    assert inv.zones[b.id].vcpu_tids == ()


def test_named_and_seen_vcpu_threads_are_one_set(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    threads = {4242: "qemu-system-x86", 4250: "CPU 0/KVM", 4251: "CPU 1/KVM", 4252: "worker"}
    proc.spawn(4242, QEMU_ARGV, threads=threads)
    inv = Inventory(TenantMap.empty(), proc=proc.root)
    (zone,) = inv.refresh().added
    assert zone.vcpu_tids == (4250, 4251)
    inv.observe_vcpu_threads({4250: zone.key, 4251: zone.key})  # named ones, seen as well
    assert not inv.refresh()
    inv.observe_vcpu_threads({})  # a named thread needs no sighting
    assert not inv.refresh()
    assert inv.zones[zone.id].vcpu_tids == (4250, 4251)
