"""Issue 2, end to end: two lab zones of two tenants create, write, rename and delete files in
their 9p shares; the agent's JSON lines name the right zone, tenant, op and guest path, and
the test's own touching of the same host folders produces nothing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.helpers.agent import AgentProcess, Line
from zonewatch.lab.qemu import QemuZone, ZoneSpec

# Waits for the host's "go" file, then works on its own files; 9p walks to test for "go"
# open no files, so nothing before "go" is a file event.
WORKLOAD = """
while [ ! -e /mnt/share/go ]; do sleep 0.1; done
mkdir /mnt/share/{n}-dir
echo "hello from {n}" > /mnt/share/{n}-dir/notes.txt
mv /mnt/share/{n}-dir/notes.txt /mnt/share/{n}-dir/renamed.txt
cat /mnt/share/{n}-dir/renamed.txt
rm /mnt/share/{n}-dir/renamed.txt
rmdir /mnt/share/{n}-dir
"""

TENANTS = """version: 1
tenants:
  - name: acme
    zones: ["e2e-acme-*"]
  - name: globex
    zones: ["e2e-globex-*"]
"""


@pytest.fixture
def zones(tmp_path: Path) -> Iterator[list[QemuZone]]:
    specs = [
        ZoneSpec(name="e2e-acme-1", tenant="acme", workload=WORKLOAD.format(n="acme"), index=41),
        ZoneSpec(
            name="e2e-globex-1", tenant="globex", workload=WORKLOAD.format(n="globex"), index=42
        ),
    ]
    started: list[QemuZone] = []
    try:
        for spec in specs:
            started.append(QemuZone(spec).start())
        for zone in started:
            zone.wait_ready(timeout=90)
        yield started
    finally:
        for zone in started:
            zone.stop()


def file_events(lines: list[Line], zone_name: str) -> list[Line]:
    return [
        x
        for x in lines
        if x["type"] == "event" and x["channel"] == "file" and x["zone"]["name"] == zone_name
    ]


def zones_json(tenants: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "zonewatch", "zones", "--json", "--tenants", str(tenants)],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    return orjson.loads(out)  # type: ignore[no-any-return]


@pytest.mark.parametrize("hooks", ["tracepoints", "uprobes"])
def test_file_activity_of_two_tenants_zones(
    tmp_path: Path, zones: list[QemuZone], hooks: str
) -> None:
    """Either way of hooking the file channel (syscall tracepoints, or uprobes on each QEMU's
    libc: its 9p server's openat64, mkdirat, renameat, unlinkat, preadv64, pwritev64 run in
    worker threads) gives the same events."""
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(TENANTS)
    with AgentProcess(
        tmp_path,
        "--events",
        "--tenants",
        str(tenants),
        "--share-mount",
        "share=/mnt/share",
        "--file-hooks",
        hooks,
    ) as agent:
        # The host touches the same folders: no zone process does this, so no event.
        for zone in zones:
            (zone.share_dir / "host-touch.txt").write_text("host")
            (zone.share_dir / "host-touch.txt").rename(zone.share_dir / "host-moved.txt")
            (zone.share_dir / "host-moved.txt").unlink()
            (zone.share_dir / "go").write_text("")
        for zone in zones:
            assert zone.wait_workload_exit(timeout=60) == 0
        for zone, n in zip(zones, ("acme", "globex"), strict=True):
            agent.wait_for(
                lambda lines, z=zone, n=n: any(
                    e["op"] == "rmdir" and e["file"]["path"] == f"/mnt/share/{n}-dir"
                    for e in file_events(lines, z.name)
                ),
                timeout=30,
                what=f"{zone.name}'s rmdir",
            )
        lines = agent.read()
    if hooks == "uprobes":
        for zone in zones:
            assert f"file uprobes: hooked pid {zone.pid} " in agent.log.read_text()

    for zone, n in zip(zones, ("acme", "globex"), strict=True):
        events = file_events(lines, zone.name)
        assert {e["zone"]["tenant"] for e in events} == {zone.tenant}
        assert {e["zone"]["vmm"] for e in events} == {"qemu"}
        assert {e["proc"]["pid"] for e in events} == {zone.pid}
        ops = [(e["op"], e["file"]["path"]) for e in events]
        d = f"/mnt/share/{n}-dir"
        for expected in [
            ("mkdir", d),
            ("create", f"{d}/notes.txt"),
            ("write", f"{d}/notes.txt"),
            ("read", f"{d}/renamed.txt"),
            ("unlink", f"{d}/renamed.txt"),
            ("rmdir", d),
        ]:
            assert expected in ops, (expected, ops)
        rename = next(e for e in events if e["op"] == "rename")
        assert rename["file"]["path"] == f"{d}/notes.txt"
        assert rename["file"]["new_path"] == f"{d}/renamed.txt"
        assert rename["file"]["host_path"] == str(zone.share_dir / f"{n}-dir" / "notes.txt")
        write_close = [
            e for e in events if e["op"] == "close" and e["file"]["path"] == f"{d}/notes.txt"
        ]
        assert write_close and write_close[0]["file"]["bytes_written"] == len(f"hello from {n}\n")
        # Each zone's events are its own: nothing of the other zone's files.
        other = "globex" if n == "acme" else "acme"
        assert not any(other in e["file"]["host_path"] for e in events)
    everything = [x for x in lines if x["type"] == "event" and x["channel"] == "file"]
    assert not any("host-" in e["file"]["host_path"] for e in everything)
    assert not any(x["type"] == "lost" for x in lines)


def test_zones_json_lists_lab_zones_and_drops_stopped_ones(
    tmp_path: Path, zones: list[QemuZone]
) -> None:
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(TENANTS)
    listed = {z["name"]: z for z in zones_json(tenants)}
    for zone in zones:
        entry = listed[zone.name]
        assert entry["pid"] == zone.pid
        assert entry["tenant"] == zone.tenant
        assert entry["taps"] == [zone.tap]
        assert entry["vcpu_tids"], entry
        assert [s["host_path"] for s in entry["shares"]] == [str(zone.share_dir)]  # type: ignore[index]
    zones[0].stop()
    listed = {z["name"]: z for z in zones_json(tenants)}
    assert zones[0].name not in listed
    assert zones[1].name in listed


@pytest.mark.parametrize("hooks", ["tracepoints", "uprobes"])
def test_a_zone_that_boots_and_stops_while_the_agent_runs(tmp_path: Path, hooks: str) -> None:
    """The inventory follows zones that come and go under a running agent: a zone booted
    after the agent attached is watched within a second of its QEMU appearing, and once it
    stops it leaves the kernel filter (its pid is no zone any more); with uprobes, its QEMU
    is hooked when it appears and unhooked when it goes."""
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(TENANTS)
    with AgentProcess(
        tmp_path,
        "--events",
        "--tenants",
        str(tenants),
        "--share-mount",
        "share=/mnt/share",
        "--file-hooks",
        hooks,
    ) as agent:
        spec = ZoneSpec("e2e-acme-late", "acme", WORKLOAD.format(n="late"), index=43)
        with QemuZone(spec) as zone:
            agent.wait_log(f"zone up: {spec.name}", timeout=5)
            zone.wait_ready(timeout=90)
            (zone.share_dir / "go").write_text("")
            assert zone.wait_workload_exit(timeout=60) == 0
            agent.wait_for(
                lambda lines: any(e["op"] == "rmdir" for e in file_events(lines, spec.name)),
                timeout=30,
                what="the late zone's rmdir",
            )
            pid = zone.pid
        agent.wait_log(f"zone gone: {spec.name} (pid {pid})", timeout=5)
        if hooks == "uprobes":
            assert f"file uprobes: hooked pid {pid} " in agent.log.read_text()
            agent.wait_log(f"file uprobes: unhooked pid {pid}", timeout=5)
    events = file_events(agent.lines, spec.name)
    assert {e["zone"]["tenant"] for e in events} == {"acme"}
    assert ("create", "/mnt/share/late-dir/notes.txt") in [
        (e["op"], e["file"]["path"]) for e in events
    ]
