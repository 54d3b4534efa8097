"""VMM recognition from argv: real command lines as libvirt, Kata and the VMM projects'
own docs write them, and hostile ones that must never crash the inventory."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Callable

import pytest

from zonewatch.inventory.cmdline import (
    LABEL_CH_API_SOCKET,
    LABEL_CROSVM_SOCKET,
    LABEL_FC_API_SOCK,
    LABEL_FC_CONFIG_FILE,
    LABEL_FC_ID,
    LABEL_KATA_SANDBOX,
    LABEL_QEMU_QMP,
    LABEL_QEMU_UUID,
    MAX_ARG_LEN,
    MAX_ITEMS,
    MAX_NAME_LEN,
    VCPU_THREAD_PATTERN,
    VirtiofsdSpec,
    VmmSpec,
    kata_sandbox_id,
    parse_virtiofsd_cmdline,
    parse_vmm_cmdline,
    vcpu_index,
)
from zonewatch.model import Share, Vmm

pytestmark = pytest.mark.unit

SANDBOX = "39083257ece670d208aa2010c1d25d74490942858af1854c99c6f95c33b9d8d6"


def spec_of(argv: list[str], read_file: Callable[[str], bytes] | None = None) -> VmmSpec:
    spec = parse_vmm_cmdline(argv, read_file)
    assert spec is not None, argv
    return spec


# --------------------------------------------------------------------------------------
# QEMU
# --------------------------------------------------------------------------------------
# libvirt 9.x/10.x: JSON -device/-netdev/-blockdev/-object, the monitor and taps by fd.
LIBVIRT_QEMU = [
    "/usr/bin/qemu-system-x86_64",
    "-name", "guest=web-1,debug-threads=on",
    "-S",
    "-object", '{"qom-type":"secret","id":"masterKey0","format":"raw",'
               '"file":"/var/lib/libvirt/qemu/domain-3-web-1/master-key.aes"}',
    "-machine", "pc-q35-8.2,usb=off,vmport=off,dump-guest-core=off,memory-backend=pc.ram",
    "-accel", "kvm",
    "-cpu", "host,migratable=on",
    "-m", "size=2097152k",
    "-object", '{"qom-type":"memory-backend-memfd","id":"pc.ram","share":true,'
               '"size":2147483648}',
    "-overcommit", "mem-lock=off",
    "-smp", "2,sockets=2,cores=1,threads=1",
    "-uuid", "8a1c6f0e-5f0b-4d6e-9a59-3b1f8f0f2a11",
    "-no-user-config",
    "-nodefaults",
    "-chardev", "socket,id=charmonitor,fd=32,server=on,wait=off",
    "-mon", "chardev=charmonitor,id=monitor,mode=control",
    "-rtc", "base=utc,driftfix=slew",
    "-no-shutdown",
    "-boot", "strict=on",
    "-blockdev", '{"driver":"file","filename":"/var/lib/libvirt/images/web-1.qcow2",'
                 '"node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}',
    "-blockdev", '{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2",'
                 '"file":"libvirt-1-storage"}',
    "-device", '{"driver":"virtio-blk-pci","bus":"pci.3","addr":"0x0",'
               '"drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1}',
    "-chardev", "socket,id=chr-vu-fs0,path=/var/lib/libvirt/qemu/domain-3-web-1/fs0-fs.sock",
    "-device", '{"driver":"vhost-user-fs-pci","id":"fs0","chardev":"chr-vu-fs0",'
               '"queue-size":1024,"tag":"data","bus":"pci.1","addr":"0x0"}',
    "-fsdev", "local,security_model=mapped,id=fsdev-fs1,path=/srv/export",
    "-device", '{"driver":"virtio-9p-pci","id":"fs1","fsdev":"fsdev-fs1",'
               '"mount_tag":"export","bus":"pci.2","addr":"0x0"}',
    "-netdev", '{"type":"tap","fd":"34","vhost":true,"vhostfd":"36","id":"hostnet0"}',
    "-device", '{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0",'
               '"mac":"52:54:00:6b:3c:58","bus":"pci.4","addr":"0x0"}',
    "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    "-msg", "timestamp=on",
]  # fmt: skip


def test_libvirt_qemu_json_devices() -> None:
    spec = spec_of(LIBVIRT_QEMU)
    assert spec.vmm == Vmm.QEMU
    assert spec.name == "web-1"
    assert spec.disks == ("/var/lib/libvirt/images/web-1.qcow2",)
    assert spec.shares == (
        Share("export", "/srv/export", "9p"),
        Share("data", "", "virtiofs"),
    )
    assert spec.vhost_user_sockets == ("/var/lib/libvirt/qemu/domain-3-web-1/fs0-fs.sock",)
    assert spec.tap_names == ()  # libvirt passes the tap as fd=34
    assert spec.labels == {LABEL_QEMU_UUID: "8a1c6f0e-5f0b-4d6e-9a59-3b1f8f0f2a11"}


def test_older_libvirt_monitor_socket_becomes_the_qmp_label() -> None:
    argv = [
        "/usr/libexec/qemu-kvm",
        "-name", "db-2",
        "-chardev", "socket,id=charmonitor,path=/var/lib/libvirt/qemu/domain-7-db-2/monitor.sock,"
                    "server=on,wait=off",
        "-mon", "chardev=charmonitor,id=monitor,mode=control",
        "-drive", "file=/var/lib/libvirt/images/db-2.img,format=raw,if=none,id=drive-virtio-disk0",
    ]  # fmt: skip
    spec = spec_of(argv)
    assert spec.vmm == Vmm.QEMU
    assert spec.name == "db-2"
    assert spec.labels[LABEL_QEMU_QMP] == "/var/lib/libvirt/qemu/domain-7-db-2/monitor.sock"
    assert spec.disks == ("/var/lib/libvirt/images/db-2.img",)


def test_hand_written_qemu_taps_shares_disks_and_comma_escapes() -> None:
    argv = [
        "qemu-system-x86_64",
        "-enable-kvm",
        "-name", "my,,vm",
        "-nographic",
        "-netdev", "tap,id=n0,ifname=zwtap0,script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=n0",
        "-nic", "tap,ifname=zwtap1,model=virtio-net-pci",
        "-net", "tap,ifname=zwtap2",
        "-net", "nic",
        "-netdev", "tap,id=n3,ifname=zwtap0",  # the same tap twice is listed once
        "-virtfs", "local,path=/srv/code,,v2,mount_tag=code,security_model=none,id=code",
        "-drive", "file=/var/lib/vms/a,,b.qcow2,format=qcow2,if=virtio",
        "-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd",
        "-drive", "file=nbd:127.0.0.1:10809,if=virtio",
        "-drive", "file=file:/var/lib/vms/c.raw,if=virtio",
        "-hda", "/var/lib/vms/d,e.img",
        "-blockdev", "driver=qcow2,node-name=q1,file.driver=file,file.filename=/vm/e.qcow2",
        "-append", "console=ttyS0 -name evil -netdev tap,ifname=evil0",
    ]  # fmt: skip
    spec = spec_of(argv)
    assert spec.name == "my,vm"
    assert spec.tap_names == ("zwtap0", "zwtap1", "zwtap2")
    assert spec.shares == (Share("code", "/srv/code,v2", "9p"),)
    assert spec.disks == (
        "/var/lib/vms/a,b.qcow2",
        "/var/lib/vms/c.raw",
        "/var/lib/vms/d,e.img",
        "/vm/e.qcow2",
    )


def test_qemu_values_that_look_like_options_belong_to_their_option() -> None:
    # QEMU takes the next element as the value, whatever it looks like.
    argv = [
        "qemu-system-x86_64",
        "-append", "-name",
        "-name", "real",
        "-kernel", "-netdev",
        "-netdev", "tap,id=n0,ifname=realtap",
        "-sandbox", "-drive",
        "-nographic",
        "-drive", "file=/real.img",
    ]  # fmt: skip
    spec = spec_of(argv)
    assert (spec.name, spec.tap_names, spec.disks) == ("real", ("realtap",), ("/real.img",))


def test_qemu_9p_device_may_come_before_its_fsdev_and_only_local_fsdevs_count() -> None:
    argv = [
        "/usr/bin/qemu-system-aarch64",
        "-device", "virtio-9p-pci,fsdev=fs0,mount_tag=share",
        "-device", "virtio-9p-device,fsdev=fs1,mount_tag=proxied",
        "-device", "virtio-9p-pci,fsdev=missing,mount_tag=ghost",
        "-device", "virtio-9p-device,fsdev=fs2,mount_tag=mmio",  # virtio-mmio (aarch64 virt)
        "-fsdev", "local,id=fs0,path=/srv/a/share,security_model=mapped-xattr",
        "-fsdev", "proxy,id=fs1,socket=/run/virtfs-proxy.sock",
        "-fsdev", "local,id=fs2,path=/srv/mmio,security_model=none",
    ]  # fmt: skip
    spec = spec_of(argv)
    assert spec.shares == (Share("share", "/srv/a/share", "9p"), Share("mmio", "/srv/mmio", "9p"))
    assert spec.name == ""


def test_qemu_vhost_user_fs_without_a_socket_path_keeps_the_share_only() -> None:
    argv = [
        "qemu-system-x86_64",
        "--name", "guest=dash",
        "-chardev", "socket,id=c0,fd=7",
        "-device", "vhost-user-fs-pci,chardev=c0,tag=t0",
        "-device", "vhost-user-fs-pci,chardev=nowhere,tag=t1",
    ]  # fmt: skip
    spec = spec_of(argv)
    assert spec.name == "dash"
    assert spec.shares == (Share("t0", "", "virtiofs"), Share("t1", "", "virtiofs"))
    assert spec.vhost_user_sockets == ()


def test_lab_qemu_argv_with_tcg_and_debug_threads() -> None:
    argv = [
        "/usr/bin/qemu-system-x86_64",
        "-name", "zone-a,debug-threads=on",
        "-m", "256",
        "-netdev", "tap,id=n0,ifname=zwtap0,script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=n0",
        "-fsdev", "local,id=fs0,path=/srv/a/share,security_model=mapped-xattr",
        "-device", "virtio-9p-pci,fsdev=fs0,mount_tag=share",
    ]  # fmt: skip
    spec = spec_of(argv)
    assert (spec.vmm, spec.name, spec.tap_names) == (Vmm.QEMU, "zone-a", ("zwtap0",))
    assert spec.shares == (Share("share", "/srv/a/share", "9p"),)


@pytest.mark.parametrize(
    "exe",
    [
        "qemu-system-x86_64",
        "/usr/bin/qemu-system-aarch64",
        "/usr/libexec/qemu-kvm",
        "/usr/bin/qemu-system-riscv64",
        "/opt/kata/bin/qemu-system-x86_64-tdx-experimental",
    ],
)
def test_qemu_system_binaries_are_recognised(exe: str) -> None:
    spec = parse_vmm_cmdline([exe, "-name", "x"])
    assert spec is not None
    assert spec.vmm in (Vmm.QEMU, Vmm.KATA)


@pytest.mark.parametrize(
    "exe",
    [
        "qemu-x86_64",  # user-mode emulation, no VM
        "qemu-img",
        "qemu-nbd",
        "/usr/bin/qemu-ga",
        "/usr/bin/virtiofsd",
        "/usr/sbin/libvirtd",
        "/bin/bash",
        "qemu-system-",
        "xqemu-system-x86_64",
    ],
)
def test_other_binaries_are_not_vmms(exe: str) -> None:
    assert parse_vmm_cmdline([exe, "-name", "x", "-netdev", "tap,ifname=t0"]) is None


# --------------------------------------------------------------------------------------
# Kata
# --------------------------------------------------------------------------------------
# The Go runtime with virtio-fs (kata-containers/kata-containers#4118, #3717).
KATA_GO_QEMU = [
    "/opt/kata/bin/qemu-system-x86_64",
    "-name", f"sandbox-{SANDBOX}",
    "-uuid", "fa535631-81c2-4962-a5ce-095aa5e5b7aa",
    "-machine", "q35,accel=kvm,kernel_irqchip=on,nvdimm=on",
    "-cpu", "host,pmu=off",
    "-qmp", f"unix:/run/vc/vm/{SANDBOX}/qmp.sock,server=on,wait=off",
    "-m", "2048M,slots=10,maxmem=386700M",
    "-device", "pci-bridge,bus=pcie.0,id=pci-bridge-0,chassis_nr=1,shpc=on,addr=2",
    "-device", "virtio-serial-pci,disable-modern=false,id=serial0",
    "-device", "virtconsole,chardev=charconsole0,id=console0",
    "-chardev", f"socket,id=charconsole0,path=/run/vc/vm/{SANDBOX}/console.sock,"
                "server=on,wait=off",
    "-device", "nvdimm,id=nv0,memdev=mem0,unarmed=on",
    "-object", "memory-backend-file,id=mem0,mem-path=/opt/kata/share/kata-containers/"
               "kata-clearlinux-latest.image,size=268435456,readonly=on",
    "-device", "virtio-scsi-pci,id=scsi0,disable-modern=false",
    "-object", "rng-random,id=rng0,filename=/dev/urandom",
    "-device", "virtio-rng-pci,rng=rng0",
    "-device", "vhost-vsock-pci,disable-modern=false,vhostfd=3,id=vsock-1595,guest-cid=1595",
    "-chardev", f"socket,id=char-e8a40c96c0a36c55,path=/run/vc/vm/{SANDBOX}/vhost-fs.sock",
    "-device", "vhost-user-fs-pci,chardev=char-e8a40c96c0a36c55,tag=kataShared",
    "-netdev", "tap,id=network-0,vhost=on,vhostfds=4,fds=5",
    "-device", "driver=virtio-net-pci,netdev=network-0,mac=02:42:ac:11:00:02,"
               "disable-modern=false,mq=on,vectors=4",
    "-rtc", "base=utc,driftfix=slew,clock=host",
    "-global", "kvm-pit.lost_tick_policy=discard",
    "-vga", "none",
    "-no-user-config",
    "-nodefaults",
    "-nographic",
    "--no-reboot",
    "-daemonize",
    "-object", "memory-backend-file,id=dimm1,size=2048M,mem-path=/dev/shm,share=on",
    "-numa", "node,memdev=dimm1",
    "-kernel", "/opt/kata/share/kata-containers/vmlinux-5.15.26-90",
    "-append", "tsc=reliable no_timer_check rcupdate.rcu_expedited=1 console=hvc0",
    "-pidfile", f"/run/vc/vm/{SANDBOX}/pid",
    "-smp", "1,cores=1,threads=1,sockets=12,maxcpus=12",
]  # fmt: skip


def test_kata_go_runtime_qemu_with_virtiofs() -> None:
    spec = spec_of(KATA_GO_QEMU)
    assert spec.vmm == Vmm.KATA
    assert spec.name == SANDBOX
    assert spec.labels[LABEL_KATA_SANDBOX] == SANDBOX
    assert spec.labels[LABEL_QEMU_QMP] == f"/run/vc/vm/{SANDBOX}/qmp.sock"
    assert spec.shares == (Share("kataShared", "", "virtiofs"),)
    assert spec.vhost_user_sockets == (f"/run/vc/vm/{SANDBOX}/vhost-fs.sock",)
    # The guest image is mapped as an nvdimm; /dev/shm guest RAM is no disk.
    assert spec.disks == ("/opt/kata/share/kata-containers/kata-clearlinux-latest.image",)
    assert spec.tap_names == ()  # fds=5


def test_kata_go_runtime_qemu_with_9p_listed_before_its_fsdev() -> None:
    argv = [
        "/usr/share/kata-containers/binary/qemu-system-aarch64",
        "-name", f"sandbox-{SANDBOX}",
        "-device", "virtio-9p-pci,disable-modern=false,fsdev=extra-9p-kataShared,"
                   "mount_tag=kataShared,romfile=",
        "-fsdev", f"local,id=extra-9p-kataShared,path=/run/kata-containers/shared/sandboxes/"
                  f"{SANDBOX},security_model=none,multidevs=remap",
    ]  # fmt: skip
    spec = spec_of(argv)
    assert spec.vmm == Vmm.KATA
    assert spec.shares == (
        Share("kataShared", f"/run/kata-containers/shared/sandboxes/{SANDBOX}", "9p"),
    )


def test_kata_runtime_rs_qemu() -> None:
    # As runtime-rs logs it (kata-containers/kata-containers#11496, #12235): "-sandbox on"
    # arrives as one argv element, QMP over an inherited fd, a -blockdev image.
    argv = [
        "/opt/kata/bin/qemu-system-x86_64",
        "-name", "sandbox-hello",
        "-kernel", "/opt/kata/share/kata-containers/vmlinux-6.12.28-153",
        "-smp", "1,maxcpus=12",
        "-machine", "q35,accel=kvm,nvdimm=on",
        "-qmp", "unix:fd=16,server=on,wait=off",
        "-sandbox on",
        "-device", "vhost-vsock-pci,vhostfd=17,guest-cid=2572565314",
        "-netdev", "tap,id=network-tap0_kata,vhost=on,vhostfds=20,fds=19",
        "-device", "virtio-net-pci,netdev=network-tap0_kata,mac=be:dc:2d:86:e6:69,mq=on",
        "-chardev", "socket,id=virtiofsd-chardev,path=/run/kata/hello/root/virtiofsd.sock",
        "-device", "vhost-user-fs-pci,chardev=virtiofsd-chardev,tag=kataShared",
        "-blockdev", "driver=file,node-name=image-73f9bcd0dec8c9c4,filename=/opt/kata/share/"
                     "kata-containers/kata-ubuntu-noble-confidential.image,aio=threads,"
                     "cache.direct=off,cache.no-flush=off,auto-read-only=on",
        "-device", "virtio-blk-pci,drive=image-73f9bcd0dec8c9c4,config-wce=off,share-rw=on",
        "-no-reboot",
    ]  # fmt: skip
    spec = spec_of(argv)
    assert spec.vmm == Vmm.KATA
    assert spec.name == "hello"
    assert spec.labels == {LABEL_KATA_SANDBOX: "hello"}  # no QMP path: it is an fd
    assert spec.vhost_user_sockets == ("/run/kata/hello/root/virtiofsd.sock",)
    assert spec.disks == ("/opt/kata/share/kata-containers/kata-ubuntu-noble-confidential.image",)


def test_kata_recognised_by_path_takes_the_sandbox_id_from_its_sockets() -> None:
    argv = [
        "/opt/kata/bin/qemu-system-x86_64",
        "-name", "custom",
        "-qmp", "unix:/run/vc/vm/abc123/qmp.sock,server=on,wait=off",
    ]  # fmt: skip
    spec = spec_of(argv)
    assert (spec.vmm, spec.name, spec.labels[LABEL_KATA_SANDBOX]) == (Vmm.KATA, "abc123", "abc123")


def test_kata_path_without_any_sandbox_id_keeps_the_guest_name() -> None:
    spec = spec_of(["/opt/kata/bin/qemu-system-x86_64", "-name", "custom"])
    assert (spec.vmm, spec.name) == (Vmm.KATA, "custom")
    assert LABEL_KATA_SANDBOX not in spec.labels


@pytest.mark.parametrize(
    "name", ["sandbox-", "sandbox-../etc", "sandbox- x", "sandbox-" + "a" * 200]
)
def test_a_malformed_sandbox_name_is_not_kata(name: str) -> None:
    spec = spec_of(["/usr/bin/qemu-system-x86_64", "-name", name])
    assert spec.vmm == Vmm.QEMU
    assert LABEL_KATA_SANDBOX not in spec.labels


@pytest.mark.parametrize(
    ("path", "sandbox"),
    [
        (f"/run/vc/vm/{SANDBOX}/qmp.sock", SANDBOX),
        ("/run/kata/hello/root/virtiofsd.sock", "hello"),
        (f"/run/kata-containers/shared/sandboxes/{SANDBOX}/shared", SANDBOX),
        ("/run/vc/firecracker/abc/root/run/firecracker.socket", "abc"),
        ("/run/kata/firecracker/abc/root", "abc"),
        ("/run/vc/vm/abc", "abc"),
        ("/run/vc/vm/", ""),
        ("/run/vc/vm/../x", ""),
        ("/var/run/other/abc", ""),
        ("", ""),
    ],
)
def test_kata_sandbox_id(path: str, sandbox: str) -> None:
    assert kata_sandbox_id(path) == sandbox


# --------------------------------------------------------------------------------------
# Firecracker
# --------------------------------------------------------------------------------------
# The getting-started config file (firecracker-microvm/firecracker docs).
FC_CONFIG = {
    "boot-source": {
        "kernel_image_path": "vmlinux-5.10.204",
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
    },
    "drives": [
        {
            "drive_id": "rootfs",
            "path_on_host": "/srv/fc/ubuntu-22.04.ext4",
            "is_root_device": True,
            "is_read_only": False,
        },
        {"drive_id": "vhost", "socket": "/run/vhost-blk.sock", "is_root_device": False},
    ],
    "network-interfaces": [
        {"iface_id": "net1", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}
    ],
    "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": False},
}


def reader(content: bytes | Exception) -> Callable[[str], bytes]:
    def read(path: str) -> bytes:
        read.paths.append(path)  # type: ignore[attr-defined]
        if isinstance(content, Exception):
            raise content
        return content

    read.paths = []  # type: ignore[attr-defined]
    return read


def test_firecracker_with_config_file() -> None:
    read = reader(json.dumps(FC_CONFIG).encode())
    argv = [
        "./firecracker",
        "--id", "web-3",
        "--api-sock", "/tmp/firecracker.socket",
        "--config-file", "vm_config.json",
    ]  # fmt: skip
    spec = spec_of(argv, read)
    assert read.paths == ["vm_config.json"]  # type: ignore[attr-defined]
    assert spec.vmm == Vmm.FIRECRACKER
    assert spec.name == "web-3"
    assert spec.disks == ("/srv/fc/ubuntu-22.04.ext4",)
    assert spec.tap_names == ("tap0",)
    assert spec.labels == {
        LABEL_FC_ID: "web-3",
        LABEL_FC_API_SOCK: "/tmp/firecracker.socket",
        LABEL_FC_CONFIG_FILE: "vm_config.json",
    }


def test_firecracker_under_the_jailer() -> None:
    # jailer execs /firecracker --id ID --start-time-us .. --start-time-cpu-us ..
    # --parent-cpu-time-us .. followed by the arguments given after its "--".
    argv = [
        "/firecracker",
        "--id", "551e7604-e35c-42b3-b825-416853441234",
        "--start-time-us", "1732540800123456",
        "--start-time-cpu-us", "423",
        "--parent-cpu-time-us", "1732",
        "--api-sock", "/run/firecracker.socket",
        "--config-file", "/vmconfig.json",
    ]  # fmt: skip
    spec = spec_of(argv, reader(json.dumps(FC_CONFIG).encode()))
    assert spec.name == "551e7604-e35c-42b3-b825-416853441234"
    assert spec.disks == ("/srv/fc/ubuntu-22.04.ext4",)


def test_firecracker_without_id_is_named_after_its_api_socket() -> None:
    spec = spec_of(["firecracker", "--api-sock", "/run/fc/fc-web-4.sock"])
    assert spec.name == "fc-web-4"
    assert spec.disks == ()
    assert LABEL_FC_ID not in spec.labels


def test_firecracker_config_is_not_read_without_a_reader() -> None:
    spec = spec_of(["firecracker", "--no-api", "--config-file", "/etc/vm.json"])
    assert spec.disks == ()
    assert spec.labels == {LABEL_FC_CONFIG_FILE: "/etc/vm.json"}


@pytest.mark.parametrize(
    "content",
    [
        FileNotFoundError(2, "No such file"),
        PermissionError(13, "denied"),
        RuntimeError("reader bug"),
        b"",
        b"{not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
        b'{"drives": "rootfs", "network-interfaces": {"host_dev_name": "tap0"}}',
        b'{"drives": [{"path_on_host": 5}, "x", null],'
        b' "network-interfaces": [{"host_dev_name": []}]}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"drives": [' + b'{"path_on_host": "/x"},' * 10 + b"]",  # trailing comma: invalid
        b" " * (2 * 1024 * 1024),
    ],
)
def test_bad_firecracker_config_yields_nothing_from_it(content: bytes | Exception) -> None:
    spec = spec_of(["firecracker", "--id", "f1", "--config-file", "/c.json"], reader(content))
    assert (spec.name, spec.disks, spec.tap_names) == ("f1", (), ())


def test_firecracker_config_with_invalid_tap_names_keeps_only_valid_ones() -> None:
    config = {
        "network-interfaces": [
            {"host_dev_name": "tap-ok"},
            {"host_dev_name": "a" * 16},
            {"host_dev_name": "../etc"},
            {"host_dev_name": "tap 1"},
        ]
    }
    spec = spec_of(["firecracker", "--config-file", "c.json"], reader(json.dumps(config).encode()))
    assert spec.tap_names == ("tap-ok",)


def test_kata_firecracker_without_jailer() -> None:
    root = f"/run/vc/firecracker/{SANDBOX}/root"
    argv = [
        "/opt/kata/bin/firecracker",
        "--api-sock", f"{root}/run/firecracker.socket",
        "--config-file", f"{root}/fcConfig.json",
    ]  # fmt: skip
    spec = spec_of(argv)
    assert spec.vmm == Vmm.FIRECRACKER
    assert spec.name == SANDBOX
    assert spec.labels[LABEL_KATA_SANDBOX] == SANDBOX


def test_firecracker_ignores_arguments_after_double_dash() -> None:
    spec = spec_of(["firecracker", "--api-sock", "/tmp/a.sock", "--", "--id", "late"])
    assert spec.name == "a"
    assert LABEL_FC_ID not in spec.labels


@pytest.mark.parametrize(
    ("exe", "recognised"),
    [
        ("firecracker", True),
        ("/usr/local/bin/firecracker-v1.7.0-x86_64", True),
        ("firecracker-containerd", False),
        ("firecracker-ctr", False),
        ("jailer", False),
        ("firectl", False),
    ],
)
def test_firecracker_binary_names(exe: str, recognised: bool) -> None:
    assert (parse_vmm_cmdline([exe, "--id", "x"]) is not None) == recognised


# --------------------------------------------------------------------------------------
# Cloud Hypervisor
# --------------------------------------------------------------------------------------
def test_cloud_hypervisor_docs_command_line() -> None:
    # docs/fs.md and the README: several values may follow one --disk/--net/--fs.
    argv = [
        "./cloud-hypervisor",
        "--kernel", "./hypervisor-fw",
        "--disk", "path=focal-server-cloudimg-amd64.raw", "path=/tmp/ubuntu-cloudinit.img",
        "--cpus", "boot=4",
        "--memory", "size=1024M,shared=on",
        "--net", "tap=ich0,mac=12:34:56:78:90:ab,ip=192.168.249.1,mask=255.255.255.0",
        "tap=,mac=,ip=,mask=",
        "--fs", "tag=myfs,socket=/tmp/virtiofs,num_queues=1,queue_size=512",
        "--pmem", "file=/srv/ch/pmem.img,size=1G",
        "--api-socket", "/tmp/ch-web-2.sock",
        "-v",
    ]  # fmt: skip
    spec = spec_of(argv)
    assert spec.vmm == Vmm.CLOUD_HYPERVISOR
    assert spec.name == "ch-web-2"
    assert spec.disks == (
        "focal-server-cloudimg-amd64.raw",
        "/tmp/ubuntu-cloudinit.img",
        "/srv/ch/pmem.img",
    )
    assert spec.tap_names == ("ich0",)  # "tap=" lets CH pick a name: unknown here
    assert spec.shares == (Share("myfs", "", "virtiofs"),)
    assert spec.vhost_user_sockets == ("/tmp/virtiofs",)
    assert spec.labels == {LABEL_CH_API_SOCKET: "/tmp/ch-web-2.sock"}


def test_cloud_hypervisor_brackets_quotes_and_option_forms() -> None:
    argv = [
        "cloud-hypervisor-static",
        "--api-socket=path=/run/ch/api.sock",
        "--disk=path=/img/a.raw,readonly=on",
        "--net", "fd=[3,4],mac=12:34:56:78:90:01,num_queues=4",
        "--net", 'tap="chtap1",mac=12:34:56:78:90:02',
        "--net", "vhost_user=true,socket=/run/ovs/vhu.sock,tap=notatap",
        "--disk", "path=/img/[unbalanced.raw",
        "--fs", "tag=t,socket=/run/fs.sock", "--serial", "tty",
    ]  # fmt: skip
    spec = spec_of(argv)
    assert spec.tap_names == ("chtap1",)
    assert spec.disks == ("/img/a.raw",)
    assert spec.vhost_user_sockets == ("/run/fs.sock",)
    assert spec.labels[LABEL_CH_API_SOCKET] == "/run/ch/api.sock"
    assert spec.name == "ch"  # "api.sock" is generic: the directory names the VM


def test_cloud_hypervisor_api_socket_as_fd_gives_no_name() -> None:
    spec = spec_of(["cloud-hypervisor", "--api-socket", "fd=3"])
    assert spec.name == ""
    assert spec.labels == {}


def test_kata_cloud_hypervisor() -> None:
    # Kata's clh.go: only --api-socket (plus -vv when debugging); the rest goes over the API.
    argv = [
        "/opt/kata/bin/cloud-hypervisor",
        "--api-socket",
        f"/run/vc/vm/{SANDBOX}/clh-api.sock",
        "-vv",
    ]
    spec = spec_of(argv)
    assert spec.vmm == Vmm.CLOUD_HYPERVISOR
    assert spec.name == SANDBOX
    assert spec.labels == {
        LABEL_CH_API_SOCKET: f"/run/vc/vm/{SANDBOX}/clh-api.sock",
        LABEL_KATA_SANDBOX: SANDBOX,
    }


def test_ch_remote_is_no_vmm() -> None:
    assert parse_vmm_cmdline(["ch-remote", "--api-socket", "/tmp/ch.sock", "info"]) is None


# --------------------------------------------------------------------------------------
# crosvm
# --------------------------------------------------------------------------------------
def test_crosvm_run() -> None:
    argv = [
        "/usr/bin/crosvm",
        "--log-level", "debug",
        "run",
        "--cpus", "2",
        "--mem", "2048",
        "--rwdisk", "/home/u/rootfs.img,sparse=false",
        "-r", "/home/u/ro-root.img",
        "--block", "path=/home/u/data.img,ro=true",
        "--pmem-device", "/home/u/pmem.img",
        "-p", "root=/dev/vda --socket /not/this",
        "--shared-dir", "/home/u/share:hostshare:type=fs:cache=always:timeout=3600",
        "--shared-dir", "/home/u/p9:p9share",
        "--net", "tap-name=crosvm_tap,mac=aa:bb:cc:dd:ee:ff",
        "--tap-name", "vmtap0",
        "--tap-fd", "7",
        "--socket", "/run/crosvm/vm1.sock",
        "--vhost-user-fs", "/run/vufs.sock:vutag",
        "--vhost-user-fs", "socket=/run/vufs2.sock,tag=vutag2",
        "--vhost-user", "type=fs,socket=/run/vufs3.sock",
        "/home/u/bzImage",
    ]  # fmt: skip
    spec = spec_of(argv)
    assert spec.vmm == Vmm.CROSVM
    assert spec.name == "vm1"
    assert spec.disks == (
        "/home/u/rootfs.img",
        "/home/u/ro-root.img",
        "/home/u/data.img",
        "/home/u/pmem.img",
    )
    assert spec.shares == (
        Share("hostshare", "/home/u/share", "virtiofs"),  # crosvm serves it itself
        Share("p9share", "/home/u/p9", "9p"),
        Share("vutag", "", "virtiofs"),
        Share("vutag2", "", "virtiofs"),
    )
    assert spec.tap_names == ("crosvm_tap", "vmtap0")
    assert spec.vhost_user_sockets == ("/run/vufs.sock", "/run/vufs2.sock", "/run/vufs3.sock")
    assert spec.labels == {LABEL_CROSVM_SOCKET: "/run/crosvm/vm1.sock"}


@pytest.mark.parametrize(
    "argv",
    [
        ["crosvm", "stop", "/run/crosvm/vm1.sock"],
        ["crosvm", "device", "fs", "--socket", "/run/x.sock", "--tag", "t", "--shared-dir", "/s"],
        ["crosvm", "--log-level", "run", "version"],  # "run" is the log level's value
        ["crosvm"],
        ["crosvm", "--extended-status"],
    ],
)
def test_crosvm_without_run_is_no_vm(argv: list[str]) -> None:
    assert parse_vmm_cmdline(argv) is None


def test_crosvm_generic_socket_name_gives_no_name() -> None:
    spec = spec_of(["crosvm", "run", "-s", "/tmp/crosvm.sock", "vmlinux"])
    assert spec.name == ""
    assert spec.labels == {LABEL_CROSVM_SOCKET: "/tmp/crosvm.sock"}


# --------------------------------------------------------------------------------------
# The lab's micro-VMM
# --------------------------------------------------------------------------------------
def test_lab_microvm_as_microvmprocess_starts_it() -> None:
    argv = [
        "/work/main/.venv/bin/python", "-m", "zonewatch.lab.microvm",
        "--name", "paced", "--rate", "2000.0", "--pio-per-iter", "1",
        "--mmio-per-iter", "1", "--port", "0x80", "--mmio-addr", "0xd0000000",
        "--duration", "0.0", "--stats", "/tmp/zw-microvm-x/paced.json",
        "--parent-pid", "1234",
    ]  # fmt: skip
    spec = spec_of(argv)
    assert spec == VmmSpec(Vmm.MICROVM, "paced", (), (), (), (), {})


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["python3", "-m", "zonewatch.lab.microvm", "--name=x"], "x"),
        (
            [
                "/usr/bin/python3.11",
                "-u",
                "-X",
                "dev",
                "-m",
                "zonewatch.lab.microvm",
                "--name",
                "y",
            ],
            "y",
        ),
        (["python", "-Im", "zonewatch.lab.microvm", "--nam", "z"], "z"),
        (["python3", "-mzonewatch.lab.microvm", "--rate", "1", "--name", "w"], "w"),
        (["python3", "-Wignore", "-m", "zonewatch.lab.microvm"], ""),
    ],
)
def test_lab_microvm_spellings(argv: list[str], name: str) -> None:
    spec = spec_of(argv)
    assert (spec.vmm, spec.name) == (Vmm.MICROVM, name)


@pytest.mark.parametrize(
    "argv",
    [
        ["python3", "-m", "zonewatch.lab.other", "--name", "x"],
        ["python3", "script.py", "-m", "zonewatch.lab.microvm", "--name", "x"],
        ["python3", "-c", "import x", "-m", "zonewatch.lab.microvm"],
        ["python3", "-", "-m", "zonewatch.lab.microvm"],
        ["python3", "-W", "-m", "zonewatch.lab.microvm"],  # -m is -W's value here
        ["python3", "-m"],
        ["perl", "-m", "zonewatch.lab.microvm", "--name", "x"],
        ["pythonista", "-m", "zonewatch.lab.microvm"],
    ],
)
def test_other_python_processes_are_no_vmm(argv: list[str]) -> None:
    assert parse_vmm_cmdline(argv) is None


# --------------------------------------------------------------------------------------
# virtiofsd
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (  # the Rust virtiofsd README
            ["/usr/libexec/virtiofsd", "--socket-path=/tmp/vfsd.sock", "--shared-dir", "/mnt",
             "--announce-submounts", "--inode-file-handles=mandatory"],
            VirtiofsdSpec("/tmp/vfsd.sock", "/mnt", ""),
        ),
        (  # Kata's Go runtime with the Rust virtiofsd: the socket is passed as fd 3
            ["/opt/kata/libexec/virtiofsd", "--syslog", "--cache=auto",
             f"--shared-dir=/run/kata-containers/shared/sandboxes/{SANDBOX}/shared",
             "--fd=3", "--thread-pool-size=1", "--announce-submounts"],
            VirtiofsdSpec("", f"/run/kata-containers/shared/sandboxes/{SANDBOX}/shared", "", 3),
        ),
        (  # Kata 2.x with QEMU's C virtiofsd (kata-containers#4118)
            ["/opt/kata/libexec/kata-qemu/virtiofsd", "--syslog", "-o", "cache=auto",
             "-o", "no_posix_lock", "-o", f"source=/run/kata-containers/shared/sandboxes/"
             f"{SANDBOX}/shared", "--fd=3", "-f", "--thread-pool-size=1"],
            VirtiofsdSpec("", f"/run/kata-containers/shared/sandboxes/{SANDBOX}/shared", "", 3),
        ),
        (  # the socket alone, inherited: tied to its zone through the fd's bound path
            ["/usr/lib/qemu/virtiofsd", "--fd", "7", "-f"],
            VirtiofsdSpec("", "", "", 7),
        ),
        (  # a descriptor that is no number, or absurd, is no descriptor
            ["virtiofsd", "--fd=-1", "--fd=3x", "--fd=99999999", "--fd=\u0663", "-o", "source=/s"],
            VirtiofsdSpec("", "/s", "", -1),
        ),
        (  # QEMU's docs/tools/virtiofsd.rst
            ["virtiofsd", "--socket-path=/var/run/vm001-vhost-fs.sock",
             "-o", "source=/var/lib/fs/vm001,cache=none"],
            VirtiofsdSpec("/var/run/vm001-vhost-fs.sock", "/var/lib/fs/vm001", ""),
        ),
        (  # the oldest C option, an escaped comma, and -oOPT glued
            ["virtiofsd", "-o", "vhost_user_socket=/tmp/vhostqemu", "-osource=/srv/a\\,b"],
            VirtiofsdSpec("/tmp/vhostqemu", "/srv/a,b", ""),
        ),
        (
            ["virtiofsd", "--socket-path", "/run/v.sock", "--shared-dir", "/srv/s", "--tag", "myfs",
             "--sandbox", "chroot", "--cache", "never"],
            VirtiofsdSpec("/run/v.sock", "/srv/s", "myfs"),
        ),
    ],
)  # fmt: skip
def test_virtiofsd_command_lines(argv: list[str], expected: VirtiofsdSpec) -> None:
    assert parse_virtiofsd_cmdline(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["virtiofsd", "--print-capabilities"],
        ["virtiofsd", "--help"],
        ["virtiofsd", "--socket-path"],  # no value
        ["virtiofsd", "--shared-dir", "--socket-path", "--fd"],
        ["/usr/bin/qemu-system-x86_64", "--socket-path=/x.sock", "--shared-dir", "/s"],
        ["notvirtiofsd", "--socket-path=/x.sock"],
        [],
    ],
)
def test_not_a_usable_virtiofsd(argv: list[str]) -> None:
    assert parse_virtiofsd_cmdline(argv) is None


def test_a_vmm_is_no_virtiofsd_and_a_virtiofsd_no_vmm() -> None:
    vfsd = ["virtiofsd", "--socket-path=/tmp/v.sock", "--shared-dir=/srv"]
    assert parse_vmm_cmdline(vfsd) is None
    assert parse_virtiofsd_cmdline(KATA_GO_QEMU) is None


# --------------------------------------------------------------------------------------
# vCPU threads
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("comm", "index"),
    [
        ("CPU 0/KVM", 0),
        ("CPU 11/KVM", 11),
        ("CPU 3/TCG", 3),
        ("ALL CPUs/TCG", None),
        ("fc_vcpu 0", 0),
        ("fc_vcpu 31", 31),
        ("vcpu0", 0),
        ("vcpu15", 15),
        ("crosvm_vcpu0", 0),
        ("crosvm_vcpu7", 7),
        ("zw-vcpu0", 0),
    ],
)
def test_vcpu_thread_names(comm: str, index: int | None) -> None:
    assert VCPU_THREAD_PATTERN.match(comm)
    assert VCPU_THREAD_PATTERN.fullmatch(comm)
    assert vcpu_index(comm) == index


@pytest.mark.parametrize(
    "comm",
    [
        "qemu-system-x86",  # QEMU without debug-threads: every thread has this comm
        "IO mon_iothread",
        "vhost-4242",
        "kvm-nx-lpage-re",
        "kvm-pit/4242",
        "fc_vmm",
        "fc_api",
        "firecracker",
        "vmm",
        "http-server",
        "virtio-blk",
        "crosvm_vcpu",
        "vcpu",
        "CPU /KVM",
        "CPU 0/KVMx",
        "CPU 0/KVM\n",
        "xCPU 0/KVM",
        "CPU \u0663/KVM",  # Arabic-Indic digit
        "fc_vcpu  1",
        "vcpu0 ",
        " vcpu0",
        "zw-vcpu",
        "zw-microvm",
        "",
    ],
)
def test_not_vcpu_thread_names(comm: str) -> None:
    assert VCPU_THREAD_PATTERN.match(comm) is None
    assert VCPU_THREAD_PATTERN.search(comm) is None
    assert vcpu_index(comm) is None


# --------------------------------------------------------------------------------------
# Hostile and malformed input
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        [],
        [""],
        ["", "-name", "x"],
        "qemu-system-x86_64 -name x",  # a string is no argv
        b"qemu-system-x86_64\0-name\0x",
        ["qemu-system-x86_64\x00", "-name", "x"],
        ["/", "-name", "x"],
        ["x" * (MAX_ARG_LEN + 1)],
    ],
)
def test_garbage_is_no_vmm(argv: object) -> None:
    assert parse_vmm_cmdline(argv) is None  # type: ignore[arg-type]
    assert parse_virtiofsd_cmdline(argv) is None  # type: ignore[arg-type]


def test_non_string_elements_are_inert() -> None:
    argv: list[object] = ["qemu-system-x86_64", None, 5, b"-name", "-name", "ok", ["-netdev"]]
    spec = parse_vmm_cmdline(argv)  # type: ignore[arg-type]
    assert spec is not None and spec.name == "ok"


def test_a_sequence_whose_iteration_fails_is_no_vmm() -> None:
    class Exploding(list[str]):
        def __iter__(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    assert parse_vmm_cmdline(Exploding(["qemu-system-x86_64"])) is None


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("two\nlines", "two\\x0alines"),
        ("tab\there", "tab\\x09here"),
        ("rtl\u202eevil", "rtl\\u202eevil"),
        ("bell\x07", "bell\\x07"),
        ("caf\u00e9-\u6771\u4eac", "caf\u00e9-\u6771\u4eac"),  # printable non-ASCII stays
        ("bad" + os.fsdecode(b"\xff\xc3"), "bad\\xff\\xc3"),  # invalid UTF-8: its bytes
    ],
)
def test_names_never_carry_control_characters(raw: str, clean: str) -> None:
    spec = spec_of(["qemu-system-x86_64", "-name", f"guest={raw}"])
    assert spec.name == clean
    assert spec.name.isprintable()
    fc = spec_of(["firecracker", "--id", raw])
    assert fc.name == clean
    assert fc.labels[LABEL_FC_ID] == clean


def test_long_names_are_bounded() -> None:
    spec = spec_of(["qemu-system-x86_64", "-name", "n" * 100_000])
    assert spec.name == "n" * MAX_NAME_LEN
    escaped = spec_of(["qemu-system-x86_64", "-name", "\x1b" * 100_000])
    assert len(escaped.name) <= MAX_NAME_LEN
    assert escaped.name.isprintable()


def test_an_element_longer_than_the_kernel_allows_is_skipped() -> None:
    spec = spec_of(["qemu-system-x86_64", "-name", "x" * (MAX_ARG_LEN + 1), "-m", "1G"])
    assert spec.name == ""


@pytest.mark.parametrize(
    "ifname",
    [
        "a" * 16,  # IFNAMSIZ - 1 = 15 bytes at most
        "\u00e9" * 8,  # 16 bytes in UTF-8
        "..",
        ".",
        "tap/0",
        "tap:0",
        "tap 0",
        "tap\t0",
        "tap%d",
        "t\u00e0p",  # U+00E0 encodes as C3 A0; the kernel's isspace() takes 0xA0 as space
    ],
)
def test_invalid_interface_names_are_dropped(ifname: str) -> None:
    spec = spec_of(["qemu-system-x86_64", "-netdev", f"tap,id=n,ifname={ifname}"])
    assert spec.tap_names == ()
    fc = spec_of(
        ["firecracker", "--config-file", "c"],
        reader(json.dumps({"network-interfaces": [{"host_dev_name": ifname}]}).encode()),
    )
    assert fc.tap_names == ()


def test_a_15_byte_interface_name_is_kept() -> None:
    spec = spec_of(["qemu-system-x86_64", "-netdev", "tap,id=n,ifname=" + "t" * 15])
    assert spec.tap_names == ("t" * 15,)


def test_undecodable_bytes_survive_as_surrogates() -> None:
    # /proc/PID/cmdline is bytes; the inventory decodes it with os.fsdecode.
    raw_path = os.fsdecode(b"/srv/\xff\xfeimg.raw")
    spec = spec_of(["qemu-system-x86_64", "-drive", f"file={raw_path},if=virtio"])
    assert spec.disks == (raw_path,)
    assert os.fsencode(spec.disks[0]) == b"/srv/\xff\xfeimg.raw"


@pytest.mark.parametrize(
    "value",
    [
        "{",
        "{}",
        '{"driver": 5}',
        "[1,2]",
        '{"driver":"virtio-9p-pci","fsdev":{"deep":' * 5000 + "1" + "}" * 10000,
        "[" * 50_000 + "]" * 50_000,
        '{"driver":"vhost-user-fs-pci","chardev":null,"tag":["x"]}',
        '{"driver":"virtio-blk-pci","drive":"' + "9" * 10_000 + '"}',
        '{"x": 1' + "0" * 5000 + "}",  # an integer past Python's digit limit
        ",,,,,",
        "=,=,=",
        ",",
        "",
    ],
)
def test_malformed_option_values_are_skipped(value: str) -> None:
    argv = ["qemu-system-x86_64", "-name", "ok"]
    for opt in ("-device", "-netdev", "-blockdev", "-object", "-drive", "-fsdev", "-chardev"):
        argv += [opt, value]
    spec = spec_of(argv)
    assert spec.name == "ok"
    assert spec.shares == ()
    assert spec.tap_names == ()


def test_options_without_values_at_the_end() -> None:
    for exe, opt in [
        ("qemu-system-x86_64", "-name"),
        ("qemu-system-x86_64", "-netdev"),
        ("firecracker", "--id"),
        ("cloud-hypervisor", "--disk"),
        ("crosvm", "--shared-dir"),
    ]:
        argv = [exe, "run", opt] if exe == "crosvm" else [exe, opt]
        spec = spec_of(argv)
        assert (spec.name, spec.disks, spec.shares, spec.tap_names) == ("", (), (), ())


@pytest.mark.timeout(60)
def test_a_huge_argv_is_bounded() -> None:
    argv = ["qemu-system-x86_64", "-name", "big"]
    for i in range(200_000):
        argv += ["-netdev", f"tap,id=n{i},ifname=t{i}"]
    spec = spec_of(argv)
    assert spec.name == "big"
    assert 0 < len(spec.tap_names) <= MAX_ITEMS
    assert len(set(spec.tap_names)) == len(spec.tap_names)


@pytest.mark.timeout(60)
def test_a_huge_total_argv_is_cut_not_refused() -> None:
    # 200 elements of 100 KiB: 20 MB, past the 8 MiB budget; what precedes the cut is read.
    argv = ["cloud-hypervisor", "--api-socket", "/run/ch/big.sock"]
    argv += ["--cmdline", "x" * 100_000] * 100
    argv += ["--disk", "path=/late.img"]
    spec = spec_of(argv)
    assert spec.name == "big"
    assert spec.disks == ()


def test_many_distinct_items_are_capped() -> None:
    argv = ["cloud-hypervisor", "--disk"] + [f"path=/d/{i}.raw" for i in range(5000)]
    assert len(spec_of(argv).disks) == MAX_ITEMS


def test_vmm_spec_is_immutable() -> None:
    spec = spec_of(["qemu-system-x86_64", "-name", "x"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "y"  # type: ignore[misc]


EXES = [
    "qemu-system-x86_64",
    "/opt/kata/bin/qemu-system-x86_64",
    "firecracker",
    "cloud-hypervisor",
    "crosvm",
    "python3",
    "virtiofsd",
]
TOKENS = [
    "-name", "-netdev", "-device", "-fsdev", "-chardev", "-drive", "-blockdev", "-object",
    "-qmp", "-mon", "-virtfs", "--id", "--api-sock", "--config-file", "--disk", "--net",
    "--fs", "--api-socket", "run", "--shared-dir", "--socket", "-m", "zonewatch.lab.microvm",
    "--name", "--", "-o", "--fd", "--tag", "tap,ifname=t0", "{", '{"driver":"virtio-9p-pci"}',
    ",,", "=", "[", '"', ":", "local,id=f,path=/p", "virtio-9p-pci,fsdev=f,mount_tag=t",
    "socket,id=c,path=/s", "vhost-user-fs-pci,chardev=c,tag=t", "path=/d", "tap=x",
    "tag=t,socket=/s", "/a:b:type=fs", "sandbox-x", "unix:/run/vc/vm/x/qmp.sock",
]  # fmt: skip
ALPHABET = 'aZ09-_=,:;./[]{}"\\ \t\n\x00\x1b\x7f\u00a0\u202e\u6771\udcff'


def random_token(rng: random.Random) -> str:
    if rng.random() < 0.6:
        token = rng.choice(TOKENS)
        if rng.random() < 0.3:  # splice garbage into a meaningful token
            at = rng.randrange(len(token) + 1)
            token = token[:at] + "".join(rng.choices(ALPHABET, k=rng.randrange(4))) + token[at:]
        return token
    return "".join(rng.choices(ALPHABET, k=rng.randrange(40)))


@pytest.mark.timeout(120)
def test_fuzz_never_raises() -> None:
    rng = random.Random(20261123)  # fixed: a failure reproduces
    config = reader(b'{"drives": [{"path_on_host": "/x"}], "network-interfaces": [{}]}')
    for _ in range(5000):
        argv = [rng.choice(EXES), *(random_token(rng) for _ in range(rng.randrange(30)))]
        spec = parse_vmm_cmdline(argv, config)
        if spec is not None:
            assert isinstance(spec, VmmSpec)
            assert spec.name.isprintable() and len(spec.name) <= MAX_NAME_LEN, argv
            assert all(isinstance(s, Share) and s.tag for s in spec.shares), argv
            assert all(
                0 < len(t.encode("utf-8", "surrogateescape")) <= 15 for t in spec.tap_names
            ), argv
            assert all(v.isprintable() for v in spec.labels.values()), argv
            assert all("\x00" not in p for p in spec.disks + spec.vhost_user_sockets), argv
        vfsd = parse_virtiofsd_cmdline(argv)
        assert vfsd is None or bool(vfsd.socket_path or vfsd.shared_dir), argv
