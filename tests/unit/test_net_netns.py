"""Where a zone's taps live, as the inventory reads it from recorded /proc trees, and the
program patching that gives each network namespace its own instance of bpf/net.c."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from tests.unit.test_inventory import QEMU_ARGV, FakeProc
from zonewatch.inventory import procfs
from zonewatch.inventory.inventory import Inventory
from zonewatch.model import NetNs
from zonewatch.probes.net import placeholder_offsets
from zonewatch.probes.records import NETNS_UNPATCHED


def pod(proc: FakeProc, pid: int, netns: Path) -> None:
    """A VMM holding tap0_kata, its /proc/PID/ns/net standing for the namespace file."""
    proc.spawn(pid, QEMU_ARGV, tun_ifaces=("tap0_kata",))
    (proc.root / str(pid) / "ns").mkdir()
    (proc.root / str(pid) / "ns" / "net").hardlink_to(netns)


def test_zones_whose_taps_share_a_name_carry_their_own_namespace(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    ns_a, ns_b = tmp_path / "ns-a", tmp_path / "ns-b"
    ns_a.write_text("")
    ns_b.write_text("")
    pod(proc, 100, ns_a)
    pod(proc, 200, ns_b)
    proc.spawn(300, QEMU_ARGV)  # no ns/net to read: unknown
    zones = {z.pid: z for z in Inventory(proc=proc.root).refresh().added}
    assert zones[100].taps == zones[200].taps == ("tap0_kata", "zwtap0")
    assert zones[100].netns == NetNs(os.stat(ns_a).st_ino, str(proc.root / "100/ns/net"))
    assert zones[200].netns == NetNs(os.stat(ns_b).st_ino, str(proc.root / "200/ns/net"))
    assert zones[300].netns is None
    assert zones[100].to_json()["netns"] == os.stat(ns_a).st_ino
    assert zones[300].to_json()["netns"] is None


def test_net_ns_of_a_vanished_process_is_none(tmp_path: Path) -> None:
    assert procfs.net_ns(tmp_path, 4242) is None


def ld_imm64(dst: int, value: int) -> bytes:
    low, high = value & 0xFFFFFFFF, value >> 32
    return struct.pack("<BBhI", 0x18, dst, 0, low) + struct.pack("<BBhI", 0, 0, 0, high)


def test_the_namespace_placeholder_is_found_only_where_it_is_loaded_whole() -> None:
    mov = struct.pack("<BBhi", 0xB7, 1, 0, 7)  # r1 = 7
    half = struct.pack("<BBhI", 0xB7, 2, 0, NETNS_UNPATCHED & 0xFFFFFFFF)  # its low half alone
    program = mov + half + ld_imm64(3, NETNS_UNPATCHED) + mov
    assert placeholder_offsets(program) == [16]
    assert placeholder_offsets(mov + half + ld_imm64(3, 0x1234)) == []
    assert placeholder_offsets(ld_imm64(1, NETNS_UNPATCHED) * 2) == [0, 16]
