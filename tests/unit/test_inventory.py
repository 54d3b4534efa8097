"""The inventory over a fabricated /proc: zones appear, vanish, survive pid reuse correctly."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from zonewatch.inventory import Inventory
from zonewatch.inventory.platform import CriBundles
from zonewatch.inventory.tenants import TenantMap, TenantRule, load_tenants
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


UNIX_HEADER = "Num       RefCount Protocol Flags    Type St Inode Path\n"


def unix_line(inode: int, path: str = "") -> str:
    """A /proc/PID/net/unix line, as the kernel prints a listening (or accepted) socket."""
    return f"0000000000000000: 00000002 00000000 00010000 0001 01 {inode} {path}".rstrip() + "\n"


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
        ppid: int = 1,
        fds: dict[int, str] | None = None,
        netns: str | None = None,  # a name: processes given the same share a namespace
        net_unix: str = "",
        root: Path | None = None,
    ) -> None:
        d = self.root / str(pid)
        for sub in ("task", "fd", "fdinfo", "net"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        links = {d / "fd" / str(fd): target for fd, target in (fds or {}).items()}
        if netns is not None:
            namespace = self.root.parent / "namespaces" / netns  # one file (inode) each
            namespace.parent.mkdir(exist_ok=True)
            namespace.touch()
            (d / "ns").mkdir(exist_ok=True)
            links[d / "ns" / "net"] = str(namespace)
        if root is not None:
            links[d / "root"] = links[d / "cwd"] = str(root)
        for link, target in links.items():  # spawned again (to add threads): links replaced
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        (d / "net" / "unix").write_text(UNIX_HEADER + net_unix)
        fields = ["S", str(ppid)] + ["0"] * 17 + [str(start_time), "0"]
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


# --------------------------------------------------------------------------------------
# virtiofsd however it was started (socket path, inherited fd, Kata sandbox id, parentage)
# --------------------------------------------------------------------------------------
SANDBOX = "39083257ece670d208aa2010c1d25d74490942858af1854c99c6f95c33b9d8d6"
OTHER_SANDBOX = "a" * 64
KATA_SHARED = "/run/kata-containers/shared/sandboxes/{}/shared"


def kata_qemu(sandbox: str, socket: str | None = None) -> list[str]:
    """Kata's QEMU command line (Go runtime): no tap names (fds), a vhost-user-fs socket."""
    socket = socket or f"/run/vc/vm/{sandbox}/vhost-fs.sock"
    return [
        "/opt/kata/bin/qemu-system-x86_64",
        "-name", f"sandbox-{sandbox}",
        "-qmp", f"unix:/run/vc/vm/{sandbox}/qmp.sock,server=on,wait=off",
        "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
        "-chardev", f"socket,id=char-e8a4,path={socket}",
        "-device", "vhost-user-fs-pci,chardev=char-e8a4,tag=kataShared",
        "-netdev", "tap,id=network-0,vhost=on,vhostfds=4,fds=5",
    ]  # fmt: skip


def c_virtiofsd(source: str, fd: int = 3) -> list[str]:
    """QEMU's C virtiofsd as Kata starts it: the socket inherited as an fd."""
    return ["/usr/lib/qemu/virtiofsd", f"--fd={fd}", "-o", f"source={source}",
            "-o", "cache=auto", "-o", "no_posix_lock", "-f"]  # fmt: skip


def test_inherited_listener_ties_virtiofsd_before_the_vmm_connects(tmp_path: Path) -> None:
    """Its fd 3 is the listening socket, bound to the VMM's vhost-user socket path (its
    namespace's net/unix says so). The shared dir names no sandbox, so the socket alone
    ties it."""
    proc = FakeProc(tmp_path / "proc")
    sock = "/run/vc/vm/x/vhost-fs.sock"
    proc.spawn(600, kata_qemu(SANDBOX, sock), comm="qemu-system-x86")
    proc.spawn(
        700, c_virtiofsd("/srv/pod/shared"), comm="virtiofsd", ppid=650,
        fds={3: "socket:[555]"}, net_unix=unix_line(9, "/x") + unix_line(555, sock),
    )  # fmt: skip
    inv = Inventory(TenantMap.empty(), {"kataShared": "/run/kata-containers/shared/containers"},
                    proc=proc.root, platform=CriBundles(tmp_path / "bundles"))  # fmt: skip
    (zone,) = inv.refresh().added
    assert zone.helper_pids == (700,)
    assert [(s.tag, s.host_path, s.backend, s.guest_path) for s in zone.shares] == [
        ("kataShared", "/srv/pod/shared", "virtiofs", "/run/kata-containers/shared/containers")
    ]
    assert inv.zone_pids() == {600: zone.key, 700: zone.key}
    assert not inv.refresh()  # stable: the share is not added again on each scan


def test_accepted_connection_found_in_the_starters_namespace(tmp_path: Path) -> None:
    """Once the VMM connected, as the C virtiofsd is then: the listener (fd 3) is closed,
    the accepted connection (fd 4) carries its address; the virtiofsd unshared its network
    namespace and forked a worker, so the socket is listed only in the namespace of the
    process that started it (the shim). Both processes are the zone's."""
    proc = FakeProc(tmp_path / "proc")
    sock = "/run/vc/vm/x/vhost-fs.sock"
    proc.spawn(600, kata_qemu(SANDBOX, sock))
    proc.spawn(650, ["/usr/bin/containerd-shim-kata-v2"], comm="containerd-shim",
               net_unix=unix_line(17105, sock))  # fmt: skip
    private = "net:[4026532999]"
    proc.spawn(700, c_virtiofsd("/srv/x"), comm="virtiofsd", ppid=650,
               fds={4: "socket:[17105]"}, netns=private)  # fmt: skip
    proc.spawn(701, c_virtiofsd("/srv/x"), comm="virtiofsd", ppid=700,
               fds={3: "/1/task", 4: "socket:[17105]", 5: "/"}, netns=private)  # fmt: skip
    inv = Inventory(proc=proc.root, platform=CriBundles(tmp_path / "b"))
    (zone,) = inv.refresh().added
    assert zone.helper_pids == (700, 701)
    assert [s.host_path for s in zone.shares] == ["/srv/x"]  # one share for both


def test_a_virtiofsd_forked_by_a_helper_is_the_zones_by_parentage(tmp_path: Path) -> None:
    """The worker holds no socket and its folder names no sandbox: its parent ties it."""
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(600, kata_qemu(SANDBOX, "/run/a.sock"))
    argv = ["virtiofsd", "--socket-path=/run/a.sock", "-o", "source=/srv/a"]
    proc.spawn(700, argv, comm="virtiofsd")
    proc.spawn(701, argv, comm="virtiofsd", ppid=700, fds={3: "/1/task"})
    proc.spawn(702, argv[:1] + argv[2:], comm="virtiofsd", ppid=701)  # a grandchild
    proc.spawn(710, ["virtiofsd", "--fd=3", "-o", "source=/srv/b"], comm="virtiofsd", ppid=1)
    inv = Inventory(proc=proc.root, platform=CriBundles(tmp_path / "b"))
    (zone,) = inv.refresh().added
    assert zone.helper_pids == (700, 701, 702)


def test_kata_sandbox_id_in_the_shared_dir_ties_virtiofsd(tmp_path: Path) -> None:
    """Nothing resolvable about the socket: the sandbox id of /run/kata-containers/shared/
    sandboxes/<id>/shared matches the zone's kata.sandbox label; another pod's virtiofsd
    stays with its own pod."""
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(600, kata_qemu(SANDBOX))
    proc.spawn(610, kata_qemu(OTHER_SANDBOX))
    proc.spawn(700, c_virtiofsd(KATA_SHARED.format(SANDBOX)), comm="virtiofsd",
               fds={3: "socket:[1]"})  # fmt: skip
    proc.spawn(701, c_virtiofsd(KATA_SHARED.format(SANDBOX)), comm="virtiofsd", ppid=700)
    proc.spawn(710, c_virtiofsd(KATA_SHARED.format(OTHER_SANDBOX)), comm="virtiofsd")
    inv = Inventory(proc=proc.root, platform=CriBundles(tmp_path / "b"))
    inv.refresh()
    zones = {z.labels["kata.sandbox"]: z for z in inv.zones.values()}
    assert zones[SANDBOX].helper_pids == (700, 701)
    assert zones[OTHER_SANDBOX].helper_pids == (710,)
    assert zones[SANDBOX].shares[0].host_path == KATA_SHARED.format(SANDBOX)


def test_cloud_hypervisor_under_kata_gets_tap_helper_and_share(tmp_path: Path) -> None:
    """Kata configures Cloud Hypervisor over its API socket: the command line names no tap
    and no share. The tap comes from the tun fd's fdinfo, the share from its virtiofsd."""
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(800, ["/opt/kata/bin/cloud-hypervisor", "--api-socket",
                     f"/run/vc/vm/{SANDBOX}/clh-api.sock"],
               comm="cloud-hyperviso", tun_ifaces=("tap0_kata",))  # fmt: skip
    proc.spawn(801, ["/opt/kata/libexec/virtiofsd", "--fd=3", "--cache=auto",
                     f"--shared-dir={KATA_SHARED.format(SANDBOX)}"], comm="virtiofsd")  # fmt: skip
    inv = Inventory(proc=proc.root, platform=CriBundles(tmp_path / "b"))
    (zone,) = inv.refresh().added
    assert zone.vmm == Vmm.CLOUD_HYPERVISOR
    assert zone.name == SANDBOX
    assert zone.taps == ("tap0_kata",)
    assert zone.helper_pids == (801,)
    assert [(s.tag, s.host_path) for s in zone.shares] == [
        ("virtiofs-801", KATA_SHARED.format(SANDBOX))
    ]


@pytest.mark.parametrize(
    ("fds", "net_unix"),
    [
        ({3: "socket:[77]"}, ""),  # not in any table read
        ({3: "socket:[77]"}, unix_line(77, "/run/vc/vm/x/vhost-fs.sock") * 2),  # forged twice
        ({3: "socket:[77]"}, unix_line(77, "@abstract")),
        ({3: "socket:[77]"}, unix_line(77)),  # unbound
        ({3: "pipe:[77]"}, unix_line(77, "/run/vc/vm/x/vhost-fs.sock")),
        ({3: "socket:[77x]"}, "garbage\n\x00\xff line\n" + "0: 1 2 3 4 5\n"),
        ({}, unix_line(77, "/run/vc/vm/x/vhost-fs.sock")),  # the fd was closed
    ],
)
def test_an_unresolvable_or_forged_inherited_socket_ties_nothing(
    tmp_path: Path, fds: dict[int, str], net_unix: str
) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(600, kata_qemu(SANDBOX, "/run/vc/vm/x/vhost-fs.sock"))
    proc.spawn(700, c_virtiofsd("/srv/x"), comm="virtiofsd", fds=fds, net_unix=net_unix)
    inv = Inventory(proc=proc.root, platform=CriBundles(tmp_path / "b"))
    (zone,) = inv.refresh().added
    assert zone.helper_pids == ()
    assert zone.shares[0].host_path == ""


def test_a_huge_fd_number_in_argv_is_harmless(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(600, kata_qemu(SANDBOX))
    proc.spawn(700, c_virtiofsd(KATA_SHARED.format(SANDBOX), fd=9999999), comm="virtiofsd")
    inv = Inventory(proc=proc.root, platform=CriBundles(tmp_path / "b"))
    (zone,) = inv.refresh().added
    assert zone.helper_pids == (700,)  # still tied by its sandbox id


def test_virtiofsd_socket_on_argv_still_wins(tmp_path: Path) -> None:
    """A virtiofsd naming zone A's socket while sharing a folder of sandbox B's path serves
    A: the socket is what the VMM connects to."""
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(600, kata_qemu(SANDBOX, "/run/a.sock"))
    proc.spawn(610, kata_qemu(OTHER_SANDBOX, "/run/b.sock"))
    shared = KATA_SHARED.format(OTHER_SANDBOX)
    proc.spawn(700, ["virtiofsd", "--socket-path=/run/a.sock", f"--shared-dir={shared}"],
               comm="virtiofsd")  # fmt: skip
    inv = Inventory(proc=proc.root, platform=CriBundles(tmp_path / "b"))
    inv.refresh()
    zones = {z.labels["kata.sandbox"]: z for z in inv.zones.values()}
    assert zones[SANDBOX].helper_pids == (700,)
    assert zones[OTHER_SANDBOX].helper_pids == ()


def test_helper_that_exits_leaves_the_zone(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(600, kata_qemu(SANDBOX))
    proc.spawn(700, c_virtiofsd(KATA_SHARED.format(SANDBOX)), comm="virtiofsd")
    proc.spawn(701, c_virtiofsd(KATA_SHARED.format(SANDBOX)), comm="virtiofsd", ppid=700)
    inv = Inventory(proc=proc.root, platform=CriBundles(tmp_path / "b"))
    zone = inv.refresh().added[0]
    assert zone.helper_pids == (700, 701)
    proc.kill(701)
    (updated,) = inv.refresh().updated
    assert updated.helper_pids == (700,)
    assert inv.zone_pids() == {600: zone.key, 700: zone.key}


# --------------------------------------------------------------------------------------
# Firecracker under its jailer: the config file inside the jail
# --------------------------------------------------------------------------------------
FC_CONFIG = b'{"drives": [{"path_on_host": "/rootfs.ext4"}], "network-interfaces": [{"host_dev_name": "fc-tap0"}]}'  # noqa: E501


def jailed_firecracker(tmp_path: Path, config_at: str = "/config.json") -> tuple[FakeProc, Path]:
    jail = tmp_path / "srv" / "jailer" / "firecracker" / "vm1" / "root"
    jail.mkdir(parents=True)
    proc = FakeProc(tmp_path / "proc")
    argv = ["/firecracker", "--id", "vm1", "--api-sock", "/run/firecracker.socket",
            "--config-file", config_at]  # fmt: skip
    proc.spawn(900, argv, comm="firecracker", root=jail)
    return proc, jail


def test_jailed_firecracker_config_is_read_inside_the_jail(tmp_path: Path) -> None:
    proc, jail = jailed_firecracker(tmp_path)
    (jail / "config.json").write_bytes(FC_CONFIG)
    (tmp_path / "config.json").write_bytes(b'{"drives": [{"path_on_host": "/wrong"}]}')
    inv = Inventory(proc=proc.root, platform=CriBundles(tmp_path / "b"))
    (zone,) = inv.refresh().added
    assert zone.vmm == Vmm.FIRECRACKER and zone.name == "vm1"
    assert zone.disks == ("/rootfs.ext4",)
    assert zone.taps == ("fc-tap0",)
    assert zone.process_roots == {900: str(jail)}  # its paths are the jail's


def test_jailed_firecracker_relative_config_from_its_cwd(tmp_path: Path) -> None:
    proc, jail = jailed_firecracker(tmp_path, "config.json")
    (jail / "config.json").write_bytes(FC_CONFIG)
    inv = Inventory(proc=proc.root, platform=CriBundles(tmp_path / "b"))
    assert inv.refresh().added[0].taps == ("fc-tap0",)


@pytest.mark.parametrize("link", ["/../../../../outside.json", "../../../../outside.json"])
def test_a_link_in_the_jail_never_leads_out(tmp_path: Path, link: str) -> None:
    """A link the jail's owner planted resolves inside the jail (where it names nothing),
    never to the host's file of that name."""
    proc, jail = jailed_firecracker(tmp_path)
    (jail / "config.json").symlink_to(link)
    (tmp_path / "outside.json").write_bytes(FC_CONFIG)
    (tmp_path / "srv" / "outside.json").write_bytes(FC_CONFIG)
    inv = Inventory(proc=proc.root, platform=CriBundles(tmp_path / "b"))
    zone = inv.refresh().added[0]
    assert zone.disks == () and zone.taps == ()


@pytest.mark.timeout(10)
def test_a_fifo_or_huge_config_in_the_jail_is_refused_without_blocking(tmp_path: Path) -> None:
    proc, jail = jailed_firecracker(tmp_path)
    os.mkfifo(jail / "config.json")  # opening it to read would wait for a writer
    inv = Inventory(proc=proc.root, platform=CriBundles(tmp_path / "b"))
    assert inv.refresh().added[0].disks == ()
    proc2, jail2 = jailed_firecracker(tmp_path / "2")
    (jail2 / "config.json").write_bytes(FC_CONFIG[:-1] + b" " * (1 << 20) + b"}")
    inv2 = Inventory(proc=proc2.root, platform=CriBundles(tmp_path / "b"))
    assert inv2.refresh().added[0].disks == ()  # over MAX_CONFIG_BYTES: not parsed


# --------------------------------------------------------------------------------------
# Platform labels (CRI annotations in the sandbox's OCI bundle) and tenants from them
# --------------------------------------------------------------------------------------
def write_bundle(root: Path, sandbox: str, annotations: dict[str, str] | bytes) -> Path:
    import json

    d = root / sandbox
    d.mkdir(parents=True, exist_ok=True)
    path = d / "config.json"
    if isinstance(annotations, bytes):
        path.write_bytes(annotations)
    else:
        config = {"ociVersion": "1.1.0", "process": {"args": ["/pause"], "cwd": "/"},
                  "root": {"path": "rootfs"}, "annotations": annotations}  # fmt: skip
        path.write_text(json.dumps(config))
    return path


def cri(namespace: str, pod: str = "web-0", uid: str = "5e1c-uid") -> dict[str, str]:
    return {
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": SANDBOX,
        "io.kubernetes.cri.sandbox-namespace": namespace,
        "io.kubernetes.cri.sandbox-name": pod,
        "io.kubernetes.cri.sandbox-uid": uid,
    }


def kata_zone(tmp_path: Path, tenants: TenantMap | None = None) -> tuple[FakeProc, Inventory]:
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(600, kata_qemu(SANDBOX))
    return proc, Inventory(tenants, proc=proc.root, platform=CriBundles(tmp_path / "bundles"))


def test_kata_zone_gets_k8s_labels_and_its_namespace_as_tenant(tmp_path: Path) -> None:
    import orjson

    from zonewatch.api.convert import zone_pb
    from zonewatch.exporters.otlp import alert_attributes
    from zonewatch.model import Alert, Severity

    write_bundle(tmp_path / "bundles", SANDBOX, cri("shop"))
    _proc, inv = kata_zone(tmp_path)
    (zone,) = inv.refresh().added
    assert zone.labels == {
        "kata.sandbox": SANDBOX,
        "qemu.qmp": f"/run/vc/vm/{SANDBOX}/qmp.sock",
        "k8s.namespace": "shop",
        "k8s.pod.name": "web-0",
        "k8s.pod.uid": "5e1c-uid",
    }
    assert zone.tenant == "shop"
    assert orjson.loads(orjson.dumps(zone.to_json()))["labels"]["k8s.namespace"] == "shop"
    assert zone_pb(zone).labels["k8s.pod.name"] == "web-0"
    alert = Alert(1, zone.ref, "rule", Severity.HIGH, "summary", (), {}, 1, 1, 1, seq=1)
    otlp = alert_attributes(alert, zone.labels)
    assert (otlp["k8s.namespace.name"], otlp["k8s.pod.name"], otlp["k8s.pod.uid"]) == (
        "shop",
        "web-0",
        "5e1c-uid",
    )
    assert otlp["zonewatch.tenant.id"] == "shop"


def test_tenants_file_entries_come_before_the_namespace(tmp_path: Path) -> None:
    write_bundle(tmp_path / "bundles", SANDBOX, cri("shop"))
    tenants_file = tmp_path / "tenants.yaml"
    tenants_file.write_text(
        "version: 1\ntenants:\n"
        "  - name: shop-team\n    labels: {k8s.namespace: shop}\n"
        "  - name: other\n    zones: ['*']\n"
    )
    _proc, inv = kata_zone(tmp_path, load_tenants(tenants_file))
    assert inv.refresh().added[0].tenant == "shop-team"


def test_a_bundle_written_after_the_vmm_started_updates_labels_and_tenant(tmp_path: Path) -> None:
    _proc, inv = kata_zone(tmp_path)
    assert inv.refresh().added[0].tenant == "default"
    assert not inv.refresh()
    write_bundle(tmp_path / "bundles", SANDBOX, cri("shop"))
    (zone,) = inv.refresh().updated
    assert zone.tenant == "shop" and zone.labels["k8s.pod.name"] == "web-0"
    assert inv.by_key(zone.key) == zone
    assert not inv.refresh()


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe{}",
        b"[1, 2]",
        b'{"annotations": ["io.kubernetes.cri.sandbox-namespace"]}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"annotations": {"io.kubernetes.cri.sandbox-namespace": "shop"}}' + b" " * (1 << 20),
    ],
)
def test_a_malformed_bundle_means_no_labels_logged_once(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_bundle(tmp_path / "bundles", SANDBOX, content)
    _proc, inv = kata_zone(tmp_path)
    with caplog.at_level(logging.WARNING, logger="zonewatch.inventory.platform"):
        zone = inv.refresh().added[0]
        inv.refresh()
        inv.refresh()
    assert zone.tenant == "default"
    assert not any(key.startswith("k8s.") for key in zone.labels)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and str(path) in lines[0] and "\n" not in lines[0]


def test_hostile_annotation_values_are_escaped_and_cut(tmp_path: Path) -> None:
    import orjson

    hostile = "evil\x1b[2J\nname\u202e" + "\ud800" + "x" * 5000
    write_bundle(tmp_path / "bundles", SANDBOX, cri("sh\x1bop", pod=hostile, uid="\ud800"))
    _proc, inv = kata_zone(tmp_path)
    zone = inv.refresh().added[0]
    pod = zone.labels["k8s.pod.name"]
    assert pod.startswith("evil\\x1b[2J\\x0aname\\u202e\\ud800x")
    assert len(pod) == 256
    assert zone.labels["k8s.pod.uid"] == "\\ud800"
    assert zone.tenant == "default"  # "sh\x1bop" is no tenant name: not used as one
    orjson.dumps(zone.to_json())


def test_a_fifo_as_bundle_config_is_refused_without_blocking(tmp_path: Path) -> None:
    d = tmp_path / "bundles" / SANDBOX
    d.mkdir(parents=True)
    os.mkfifo(d / "config.json")
    _proc, inv = kata_zone(tmp_path)
    assert inv.refresh().added[0].tenant == "default"


def test_labels_only_for_kata_sandboxes(tmp_path: Path) -> None:
    """A plain QEMU zone named like a sandbox directory reads no bundle."""
    write_bundle(tmp_path / "bundles", "zone-a", cri("shop"))
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(4242, QEMU_ARGV)
    inv = Inventory(proc=proc.root, platform=CriBundles(tmp_path / "bundles"))
    zone = inv.refresh().added[0]
    assert zone.tenant == "default" and zone.labels == {}


def test_set_tenants_moves_existing_zones(tmp_path: Path) -> None:
    write_bundle(tmp_path / "bundles", SANDBOX, cri("shop"))
    proc, inv = kata_zone(tmp_path)
    proc.spawn(4242, QEMU_ARGV)
    inv.refresh()
    before = {z.name: z.tenant for z in inv.zones.values()}
    assert before == {SANDBOX: "shop", "zone-a": "default"}
    change = inv.set_tenants(TenantMap([TenantRule("acme", zones=("zone-*",))]))
    assert [(z.name, z.tenant) for z in change.updated] == [("zone-a", "acme")]
    (moved,) = change.updated
    assert inv.by_key(moved.key) == moved and inv.zones[moved.id] == moved
    assert not inv.refresh()  # the next scan keeps the new tenant


def test_kata_firecracker_in_its_jail_is_known_by_the_jails_path(tmp_path: Path) -> None:
    """Kata's jailer: chroot /run/vc/firecracker/<id>/root, argv paths inside the jail, taps
    set over the API (only the tun fd's fdinfo names them). The jail's path names the
    sandbox, so the zone gets its kata.sandbox label, name and pod labels."""
    jail = tmp_path / "run" / "vc" / "firecracker" / SANDBOX / "root"
    jail.mkdir(parents=True)
    write_bundle(tmp_path / "bundles", SANDBOX, cri("shop"))
    proc = FakeProc(tmp_path / "proc")
    argv = ["/firecracker", "--id", SANDBOX[:20], "--start-time-us", "1",
            "--api-sock", "/run/firecracker.socket"]  # fmt: skip
    proc.spawn(900, argv, comm="firecracker", root=jail, tun_ifaces=("tap0_kata",))
    proc.spawn(901, argv, comm="firecracker", root=tmp_path / "srv", tun_ifaces=("fc0",))
    inv = Inventory(proc=proc.root, platform=CriBundles(tmp_path / "bundles"))
    inv.refresh()
    zones = {z.pid: z for z in inv.zones.values()}
    kata = zones[900]
    assert (kata.vmm, kata.name, kata.tenant, kata.taps) == (
        Vmm.FIRECRACKER,
        SANDBOX,
        "shop",
        ("tap0_kata",),
    )
    assert kata.labels["kata.sandbox"] == SANDBOX and kata.labels["k8s.pod.name"] == "web-0"
    plain = zones[901]  # jailed elsewhere: no sandbox
    assert plain.name == SANDBOX[:20] and "kata.sandbox" not in plain.labels


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


def test_a_backends_root_is_followed_scan_by_scan(tmp_path: Path) -> None:
    """The C virtiofsd pivots into its folder once the VMM connects (seen before, it is at
    the host's root), and a backend that changes its root later must not keep its paths
    placed under the old one."""
    proc = FakeProc(tmp_path / "proc")
    shared = KATA_SHARED.format(SANDBOX)
    (proc.root / "self" / "ns").mkdir(parents=True)
    (proc.root / "self" / "ns" / "mnt").symlink_to("mnt:[4026531832]")
    (proc.root / "self" / "mountinfo").write_text("27 1 254:0 / / rw - ext4 /dev/vda rw\n")
    proc.spawn(600, kata_qemu(SANDBOX))
    proc.spawn(700, c_virtiofsd(shared), comm="virtiofsd", root=Path("/"))
    (proc.root / "700" / "ns").mkdir()
    (proc.root / "700" / "ns" / "mnt").symlink_to("mnt:[4026531832]")  # the host's, for now
    inv = Inventory(proc=proc.root, platform=CriBundles(tmp_path / "b"))
    (zone,) = inv.refresh().added
    assert zone.helper_pids == (700,) and zone.process_roots == {}

    def pivot(folder: str) -> None:
        (proc.root / "700" / "ns" / "mnt").unlink()
        (proc.root / "700" / "ns" / "mnt").symlink_to("mnt:[4026532174]")
        (proc.root / "700" / "mountinfo").write_text(f"76 49 254:0 {folder} / rw - ext4 x rw\n")

    pivot(shared)
    (zone,) = inv.refresh().updated
    assert zone.process_roots == {700: shared}
    assert not inv.refresh()
    pivot("/")  # back at the host's root: its paths are the host's again
    (zone,) = inv.refresh().updated
    assert zone.process_roots == {}
