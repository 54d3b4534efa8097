"""The Python mirror in zonewatch/probes/records.py matches bpf/zonewatch.h as compiled."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

import pytest

from zonewatch.probes.file import FileProbe
from zonewatch.probes.kvm import KvmProbe
from zonewatch.probes.net import NetProbe
from zonewatch.probes.proc import ProcProbe
from zonewatch.probes.records import MIRRORS
from zonewatch.probes.sched import SchedProbe


@pytest.fixture(scope="module")
def programs() -> Iterator[dict[str, Any]]:
    """Every compiled program by its probe's name (the structs live in different ones)."""
    probes = [FileProbe(), KvmProbe(), SchedProbe(), NetProbe(), ProcProbe()]
    try:
        for probe in probes:
            probe.attach()
        yield {probe.name: probe.bpf for probe in probes}
    finally:
        for probe in probes:
            probe.detach()


# Where bcc sees each mirrored struct: `program:struct` for programs other than bpf/file.c.
COMPILED = [
    ("zw_file_event", "scratch", "Leaf"),
    ("zw_fd_key", "fds", "Key"),
    ("zw_fd_state", "fds", "Leaf"),
    ("kvm:zw_kvm_event", "scratch", "Leaf"),
    ("kvm:zw_sum", "pio", "Leaf"),
    ("kvm:zw_kvm_exit_key", "exits", "Key"),
    ("kvm:zw_kvm_uexit_key", "uexits", "Key"),
    ("kvm:zw_kvm_pio_key", "pio", "Key"),
    ("kvm:zw_kvm_mmio_key", "mmio", "Key"),
    ("kvm:zw_kvm_ctr_key", "counters", "Key"),
    ("kvm:zw_hist_key", "hist", "Key"),
    ("kvm:zw_vcpu_state", "vcpus", "Leaf"),
    ("sched:zw_sched_key", "totals", "Key"),
    ("sched:zw_sum", "totals", "Leaf"),
    ("sched:zw_hist_key", "hist", "Key"),
    ("sched:zw_wait_state", "waiting", "Leaf"),
    ("net:zw_flow_key", "flows", "Key"),
    ("net:zw_flow_stats", "flows", "Leaf"),
    ("net:zw_net_if_key", "zone_ifs", "Key"),
    ("net:zw_net_if", "zone_ifs", "Leaf"),
    ("net:zw_net_counters", "counters", "Leaf"),
    ("net:zw_net_event", "scratch", "Leaf"),
    ("proc:zw_proc_event", "scratch", "Leaf"),
    ("proc:zw_proc_parent", "spawned", "Leaf"),
]


def test_every_mirror_is_checked() -> None:
    checked = {c_name.rpartition(":")[2] for c_name, _, _ in COMPILED} | {"zw_hdr"}
    assert checked == set(MIRRORS)


def layout(struct: type[ctypes.Structure]) -> list[tuple[str, int, int]]:
    out = []
    for name, *_ in struct._fields_:
        f = getattr(struct, name)
        out.append((name, f.offset, f.size))
    return out


def compiled_type(bpf: Any, table: str, part: str) -> type[ctypes.Structure]:
    """The struct bcc derived from the compiled program (per-CPU leaves are arrays of it)."""
    t = getattr(bpf[table.encode()], part)
    return t._type_ if issubclass(t, ctypes.Array) else t  # type: ignore[no-any-return]


@pytest.mark.parametrize(("c_name", "table", "part"), COMPILED)
def test_mirror_matches_compiled(
    programs: dict[str, Any], c_name: str, table: str, part: str
) -> None:
    """`program:struct` names a struct of another program than bpf/file.c."""
    program, _, c_name = c_name.rpartition(":")
    compiled = compiled_type(programs[program or "file"], table, part)
    mirror = MIRRORS[c_name]
    assert ctypes.sizeof(mirror) == ctypes.sizeof(compiled)
    assert layout(mirror) == layout(compiled)


@pytest.mark.parametrize("program", ["file", "kvm", "net", "proc"])
def test_header_mirror_matches_compiled(programs: dict[str, Any], program: str) -> None:
    event = compiled_type(programs[program], "scratch", "Leaf")
    hdr_type = {name: t for name, t, *_ in event._fields_}["hdr"]
    assert layout(MIRRORS["zw_hdr"]) == layout(hdr_type)
