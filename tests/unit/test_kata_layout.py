"""The lab's kata layout, without booting anything: addressing, the sandbox's paths and
bundle, the commands that build a pod network, QEMU's command line, records and the CLI."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from zonewatch.cli import build_parser
from zonewatch.errors import ConfigError
from zonewatch.lab import kata, taps
from zonewatch.lab.assets import INIT_SCRIPT, GuestAssets
from zonewatch.lab.cli import status_table
from zonewatch.lab.lab import tenant_entries
from zonewatch.lab.qemu import QEMU_BINARY, QemuZone, ZoneSpec, zone_env
from zonewatch.lab.state import LabError, ZoneRecord

pytestmark = pytest.mark.unit


def test_pod_addressing_owns_a_range_of_its_own() -> None:
    first, last = kata.pod_addressing(0), kata.pod_addressing(255)
    assert (first.netns, first.host_link, first.tap) == ("zw-kata-0", "zwkata0", "tap0_kata")
    assert (first.host_ip, first.guest_ip, first.network) == (
        "10.216.0.1", "10.216.0.2", "10.216.0.0/30")  # fmt: skip
    assert (last.host_ip, last.guest_ip, last.netns_path) == (
        "10.216.255.1", "10.216.255.2", "/run/netns/zw-kata-255")  # fmt: skip
    assert len(last.host_link) <= 15
    kata_nets = {ipaddress.IPv4Network(kata.pod_addressing(i).network) for i in range(256)}
    plain_nets = {ipaddress.IPv4Network(taps.addressing(i).network) for i in range(256)}
    assert len(kata_nets) == 256
    assert not any(k.overlaps(p) for k in kata_nets for p in plain_nets)
    macs = {kata.pod_addressing(i).mac for i in range(256)}
    assert len(macs) == 256 and not macs & {taps.addressing(i).mac for i in range(256)}


@pytest.mark.parametrize("index", [-1, 256])
def test_pod_addressing_refuses_an_index_out_of_range(index: int) -> None:
    with pytest.raises(ConfigError, match=r"outside 0\.\.255"):
        kata.pod_addressing(index)


def test_a_sandbox_lives_at_katas_and_containerds_paths() -> None:
    sandbox = kata.Sandbox.new("pod-a", "acme", 3)
    sid = sandbox.sandbox_id
    assert kata.is_sandbox_id(sid)
    assert sandbox.qmp_socket == Path(f"/run/vc/vm/{sid}/qmp.sock")
    assert sandbox.virtiofsd_socket == Path(f"/run/vc/vm/{sid}/vhost-fs.sock")
    assert sandbox.share_dir == Path(f"/run/kata-containers/shared/sandboxes/{sid}/shared")
    assert sandbox.config_path == Path(
        f"/run/containerd/io.containerd.runtime.v2.task/k8s.io/{sid}/config.json"
    )
    assert kata.Sandbox.from_json(sandbox.to_json()) == sandbox
    assert kata.Sandbox.new("pod-a", "acme", 3).sandbox_id != sid


@pytest.mark.parametrize("bad", ["../../etc", "", "A" * 64, "0" * 63, "0" * 63 + "/"])
def test_a_recorded_sandbox_id_that_is_no_id_is_refused(bad: str, tmp_path: Path) -> None:
    data = kata.Sandbox.new("pod-a", "acme", 3).to_json() | {"sandbox_id": bad}
    with pytest.raises(ValueError, match="not a sandbox id"):
        kata.Sandbox.from_json(data)
    (tmp_path / kata.SANDBOX_FILE).write_text(json.dumps(data))
    assert kata.read_sandbox_file(tmp_path) is None
    with pytest.raises(LabError, match="not a sandbox id"):
        kata.remove_sandbox_files(bad)


def test_the_bundle_config_carries_the_cri_annotations(tmp_path: Path) -> None:
    sandbox = kata.Sandbox.new("pod-a", "acme", 4)
    config = json.loads(json.dumps(kata.bundle_config(sandbox, tmp_path)))
    assert config["ociVersion"] == "1.1.0"
    assert config["process"]["args"] == ["/pause"]
    assert config["root"] == {"path": "rootfs", "readonly": True}
    assert config["annotations"] == {
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": sandbox.sandbox_id,
        "io.kubernetes.cri.sandbox-namespace": "acme",
        "io.kubernetes.cri.sandbox-name": "pod-a",
        "io.kubernetes.cri.sandbox-uid": sandbox.pod_uid,
        "io.zonewatch.lab.state-dir": str(tmp_path),
    }
    assert {"type": "network", "path": "/run/netns/zw-kata-4"} in config["linux"]["namespaces"]


def test_lab_down_finds_only_the_bundles_its_own_lab_made(tmp_path: Path) -> None:
    root, state = tmp_path / "bundles", tmp_path / "state"

    def bundle(name: str, text: str) -> None:
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(text)

    ours, other = kata.new_sandbox_id(), kata.new_sandbox_id()
    annotated = {"annotations": {kata.STATE_ANNOTATION: str(state)}}
    bundle(ours, json.dumps(annotated))
    bundle(other, json.dumps({"annotations": {kata.STATE_ANNOTATION: "/elsewhere"}}))
    bundle(kata.new_sandbox_id(), json.dumps({"ociVersion": "1.1.0"}))  # a real pod's
    bundle(kata.new_sandbox_id(), "{not json")
    bundle(kata.new_sandbox_id(), json.dumps({"annotations": ["not", "a", "map"]}))
    bundle("not-a-sandbox-id", json.dumps(annotated))
    assert kata.bundles_of(state, root) == [ours]
    assert kata.bundles_of(state, tmp_path / "missing") == []


def test_the_pod_network_is_built_as_katas_tcfilter_model() -> None:
    net = kata.pod_addressing(7)
    cmds = [" ".join(c) for c in kata.pod_network_commands(net)]
    assert cmds[0] == "ip netns add zw-kata-7"
    veth = cmds.index("ip link add zwkata7 type veth peer name eth0 netns zw-kata-7")
    tap = cmds.index("ip -n zw-kata-7 tuntap add dev tap0_kata mode tap")
    assert veth < tap  # eth0 gets ifindex 2, tap0_kata 3, in every pod
    assert "ip -n zw-kata-7 addr add 10.216.7.2/30 dev eth0" in cmds
    assert "ip -n zw-kata-7 link set eth0 address 52:54:00:5a:4b:07" in cmds
    redirect = "u32 match u32 0 0 action mirred egress redirect dev"
    for dev, other in (("eth0", "tap0_kata"), ("tap0_kata", "eth0")):
        assert f"tc -n zw-kata-7 qdisc add dev {dev} ingress" in cmds
        assert (f"tc -n zw-kata-7 filter add dev {dev} parent ffff: protocol all "
                f"{redirect} {other}") in cmds  # fmt: skip
    host = [" ".join(c) for c in kata.host_end_commands(net)]
    assert host == ["ip addr add 10.216.7.1/30 dev zwkata7", "ip link set zwkata7 up"]


def test_zone_env_names_the_share_and_addresses_of_each_layout() -> None:
    env_kata = zone_env(ZoneSpec("pod-a", "acme", "true", index=2, layout="kata"))
    assert "export ZW_SHARE_FS=virtiofs\n" in env_kata
    assert "export ZW_SHARE_TAG=kataShared\n" in env_kata
    assert "export ZW_GUEST_IP=10.216.2.2\n" in env_kata
    assert "export ZW_HOST_IP=10.216.2.1\n" in env_kata
    assert "export ZW_SHARE=/mnt/share\n" in env_kata
    env_plain = zone_env(ZoneSpec("zone-a", "acme", "true", index=2))
    assert "export ZW_SHARE_FS=9p\n" in env_plain
    assert "export ZW_SHARE_TAG=share\n" in env_plain
    assert "export ZW_GUEST_IP=10.213.2.2\n" in env_plain


def test_the_guest_init_is_valid_sh_and_mounts_virtiofs_when_told() -> None:
    check = subprocess.run(["sh", "-n"], input=INIT_SCRIPT, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    assert 'if [ "$ZW_SHARE_FS" = virtiofs ]; then' in INIT_SCRIPT
    assert "load_modules order.virtiofs" in INIT_SCRIPT


def test_an_unknown_layout_is_refused() -> None:
    with pytest.raises(ConfigError, match="layout: 'docker' is not one of plain, kata"):
        ZoneSpec("zone-a", "acme", "true", index=0, layout="docker")  # type: ignore[arg-type]


def _assets(tmp_path: Path) -> GuestAssets:
    return GuestAssets(
        root=tmp_path, kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd",
        vmlinuz=tmp_path / "vmlinuz", kernel_package="linux-image-x", kernel_version="1",
        kernel_release="6.1.0-x", modules=("9p",), virtiofs_modules=("fuse", "virtiofs"),
    )  # fmt: skip


@pytest.mark.skipif(shutil.which(QEMU_BINARY) is None, reason=f"{QEMU_BINARY} is missing")
def test_qemu_command_of_a_kata_zone(tmp_path: Path) -> None:
    spec = ZoneSpec("pod-a", "acme", "true", index=1, memory_mb=320, layout="kata")
    zone = QemuZone(spec, state_dir=tmp_path)
    argv = zone.command(_assets(tmp_path))
    sid = zone.sandbox_id

    def after(flag: str) -> list[str]:
        return [argv[i + 1] for i, a in enumerate(argv) if a == flag]

    assert after("-name") == [f"sandbox-{sid}"]
    assert not any("debug-threads" in a for a in argv)
    assert after("-qmp") == [f"unix:/run/vc/vm/{sid}/qmp.sock,server=on,wait=off"]
    assert after("-m") == ["320"]
    assert after("-object") == ["memory-backend-memfd,id=mem,size=320M,share=on"]
    assert after("-numa") == ["node,memdev=mem"]
    assert after("-netdev") == ["tap,id=network-0,ifname=tap0_kata,script=no,downscript=no"]
    assert after("-chardev") == [f"socket,id=char-virtiofs,path=/run/vc/vm/{sid}/vhost-fs.sock"]
    assert "vhost-user-fs-pci,chardev=char-virtiofs,tag=kataShared" in after("-device")
    assert "virtio-net-pci,netdev=network-0,mac=52:54:00:5a:4b:01" in after("-device")
    assert not any("9p" in a for a in argv)
    assert (zone.tap, zone.host_link, zone.netns) == ("tap0_kata", "zwkata1", "zw-kata-1")
    assert zone.share_dir == kata.SHARED_ROOT / sid / "shared"

    plain = QemuZone(ZoneSpec("zone-a", "acme", "true", index=1), state_dir=tmp_path)
    plain_argv = plain.command(_assets(tmp_path))
    assert plain_argv[plain_argv.index("-name") + 1] == "zone-a,debug-threads=on"
    assert (plain.tap, plain.host_link) == ("zwtap1", "zwtap1")
    with pytest.raises(LabError, match="zone-a: is not a kata zone"):
        _ = plain.sandbox_id


def test_records_of_either_layout_and_of_older_labs_read_back(tmp_path: Path) -> None:
    old = {
        "name": "zone-a", "tenant": "acme", "index": 0, "pid": 0, "start_time": 0,
        "tap": "zwtap0", "host_ip": "10.213.0.1", "guest_ip": "10.213.0.2",
        "share": str(tmp_path), "console": "c", "zone_dir": str(tmp_path), "detached": False,
    }  # fmt: skip
    record = ZoneRecord.from_json(old)
    assert (record.layout, record.host_link, record.sandbox_id) == ("plain", "zwtap0", "")
    assert "sandbox_id" not in record.status()
    sid = kata.new_sandbox_id()
    kata_record = ZoneRecord.from_json(
        old | {"layout": "kata", "tap": "tap0_kata", "host_link": "zwkata0", "sandbox_id": sid,
               "netns": "zw-kata-0", "bundle": "b", "qmp": "q", "guest_ip": "10.216.0.2"}
    )  # fmt: skip
    assert ZoneRecord.from_json(kata_record.to_json()) == kata_record
    status = kata_record.status()
    assert (status["layout"], status["sandbox_id"], status["netns_path"], status["pod_ip"]) == (
        "kata", sid, "/run/netns/zw-kata-0", "10.216.0.2")  # fmt: skip
    assert status["virtiofsd_pids"] == []
    # The tenants file names a kata zone by its sandbox id too (Kata's QEMU says only that).
    assert record.known_names() == ("zone-a",)
    assert tenant_entries([record, kata_record]) == [
        ("zone-a", "acme"), ("zone-a", "acme"), (sid, "acme")]  # fmt: skip


def test_lab_status_table_fits_80_columns_and_the_cli_takes_layout_and_json() -> None:
    zone = {"name": "n" * 40, "tenant": "t" * 40, "layout": "kata", "pid": 4194304,
            "alive": True, "host_link": "zwkata255", "guest_ip": "10.216.255.2"}  # fmt: skip
    assert all(len(line) <= 80 for line in status_table([zone]).splitlines())
    parser = build_parser()
    assert parser.parse_args(["lab", "up", "--layout", "kata"]).layout == "kata"
    assert parser.parse_args(["lab", "run", "w.sh"]).layout == "plain"
    assert parser.parse_args(["lab", "status", "--json"]).json is True
    with pytest.raises(SystemExit):
        parser.parse_args(["lab", "up", "--layout", "docker"])
