"""The zone lab itself: real QEMU guests with a tap and a 9p share, booted from the host."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from zonewatch.lab import taps
from zonewatch.lab.assets import GuestAssets, ensure_assets
from zonewatch.lab.lab import Lab, cleanup_leftovers, lab_down, lab_status, tenants_yaml
from zonewatch.lab.qemu import ZoneSpec
from zonewatch.lab.state import proc_cmdline, proc_start_time, state_root

pytestmark = pytest.mark.e2e

WORKLOAD = """\
set -e
mkdir -p /mnt/share/out
echo "hello from $ZW_NAME of $ZW_TENANT" > /mnt/share/out/hello.txt
seq 1 100 > /mnt/share/numbers.txt
ping -c 2 -W 3 "$ZW_HOST_IP"
"""


def _processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains `text`."""
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return [
        pid
        for pid in pids
        if proc_start_time(pid) is not None and any(text in a for a in proc_cmdline(pid))
    ]


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc_start_time(pid) is None:
            return True
        time.sleep(0.05)
    return False


def test_two_zones_boot_in_parallel_share_files_and_reach_the_host(lab: Lab) -> None:
    started = time.monotonic()
    zone_a, zone_b = lab.start(
        [
            ZoneSpec("zone-a", "acme", WORKLOAD, index=0),
            ZoneSpec("zone-b", "globex", WORKLOAD, index=1),
        ]
    )
    booted = time.monotonic() - started
    print(f"boot seconds: {lab.boot_seconds} (both ready after {booted:.2f} s)")
    # Boots overlap: both were ready well before two sequential boots would be.
    assert booted < sum(lab.boot_seconds.values()) + 1.0

    for zone in (zone_a, zone_b):
        assert zone.wait_workload_exit(timeout=30) == 0, zone.console_tail()
        console = zone.console_text()
        assert re.search(r"2 packets transmitted, 2 packets received", console), console
        assert f"from {zone.host_ip}" in console

        hello = zone.share_dir / "out" / "hello.txt"
        assert hello.read_text() == f"hello from {zone.name} of {zone.tenant}\n"
        numbers = (zone.share_dir / "numbers.txt").read_text()
        assert numbers == "".join(f"{i}\n" for i in range(1, 101))

        assert taps.tap_addresses(zone.tap) == [f"{zone.host_ip}/30"]
        argv = proc_cmdline(zone.pid)
        assert argv[argv.index("-name") + 1] == f"{zone.name},debug-threads=on"
        assert any(f"ifname={zone.tap}," in arg for arg in argv)

    assert zone_a.tap != zone_b.tap
    assert zone_a.host_ip != zone_b.host_ip
    assert {s["name"] for s in lab_status() if s["alive"]} >= {"zone-a", "zone-b"}
    assert lab.tenants_yaml() == (
        "version: 1\n"
        "tenants:\n"
        '  - name: "acme"\n'
        '    zones: ["zone-a"]\n'
        '  - name: "globex"\n'
        '    zones: ["zone-b"]\n'
    )

    gone = [(z.pid, z.tap, z.zone_dir) for z in (zone_a, zone_b)]
    lab.stop_all()
    for pid, tap, zone_dir in gone:
        assert proc_start_time(pid) is None
        assert not taps.tap_exists(tap)
        assert not zone_dir.exists()
        assert _processes_mentioning(str(zone_dir)) == []
    assert lab.zones == ()


def test_lab_up_and_down_from_separate_processes(lab_assets: GuestAssets, tmp_path: Path) -> None:
    workload = tmp_path / "workload.sh"
    workload.write_text('echo "up in $ZW_NAME" > /mnt/share/up.txt\n')
    up = subprocess.run(
        [sys.executable, "-m", "zonewatch.lab", "up", "--zones", "1", "--tenants", "acme",
         "--workload", str(workload)],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        (zone,) = json.loads(up.stdout)
        assert zone["alive"]
        assert zone["name"] == "zone-a"
        assert zone["tenant"] == "acme"
        assert taps.tap_addresses(zone["tap"]) == [f"{zone['host_ip']}/30"]

        # The `lab up` process is gone; its zone lives on, and is no child of ours.
        status = {s["name"]: s for s in lab_status()}
        assert status["zone-a"]["alive"]
        assert status["zone-a"]["pid"] == zone["pid"]
        stat = Path(f"/proc/{zone['pid']}/stat").read_text()
        assert int(stat[stat.rindex(")") + 2 :].split()[1]) != os.getpid()

        up_file = Path(zone["share"]) / "up.txt"
        deadline = time.monotonic() + 20
        while not up_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert up_file.read_text() == "up in zone-a\n"
        assert "ZW-WORKLOAD-EXIT 0" in Path(zone["console"]).read_text()
        tenants = (state_root() / "tenants.yaml").read_text()
        assert 'zones: ["zone-a"]' in tenants

        assert lab_down() == 1
    finally:
        lab_down()

    assert proc_start_time(zone["pid"]) is None
    assert taps.list_taps() == []
    assert not state_root().exists()
    assert lab_status() == []
    again = subprocess.run(
        [sys.executable, "-m", "zonewatch", "lab", "down"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "stopped 0 zone(s)" in again.stdout


def test_zone_dies_with_its_process_and_leftovers_are_cleaned(lab_assets: GuestAssets) -> None:
    script = textwrap.dedent(
        """
        import time
        from zonewatch.lab.qemu import QemuZone, ZoneSpec
        zone = QemuZone(ZoneSpec("zone-orphan", "acme", "true", index=7)).start()
        print(zone.pid, flush=True)
        time.sleep(120)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as owner:
        try:
            assert owner.stdout is not None
            pid = int(owner.stdout.readline())
            assert proc_start_time(pid) is not None
        finally:
            owner.send_signal(signal.SIGKILL)
            owner.wait()
    try:
        assert _wait_gone(pid), "QEMU outlived the process that started it"
        # What the killed process could not clean: its tap and state folder.
        assert taps.tap_exists("zwtap7")
        assert (state_root() / "zone-orphan").is_dir()
    finally:
        cleanup_leftovers()
    assert not taps.tap_exists("zwtap7")
    assert not (state_root() / "zone-orphan").exists()


def test_assets_are_built_once_and_the_tenants_file_is_valid_yaml(
    lab_assets: GuestAssets,
) -> None:
    started = time.monotonic()
    again = ensure_assets()
    assert time.monotonic() - started < 0.1  # only the stamp is read
    assert again == lab_assets
    assert again.kernel.is_file() and again.initrd.is_file()
    assert again.kernel_package.startswith("linux-image-")
    assert again.modules[-1] == "9p"

    text = tenants_yaml([("zone-a", "acme"), ("zone-b", "globex"), ("zone-c", "acme")])
    assert yaml.safe_load(text) == {
        "version": 1,
        "tenants": [
            {"name": "acme", "zones": ["zone-a", "zone-c"]},
            {"name": "globex", "zones": ["zone-b"]},
        ],
    }
    assert yaml.safe_load(tenants_yaml([])) == {"version": 1, "tenants": []}
