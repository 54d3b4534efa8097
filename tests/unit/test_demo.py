"""`make demo` without zones: the guest scripts parse in busybox sh (what the guests run),
and the agent command line follows the terminal (UI) or not (JSON lines)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from zonewatch import demo
from zonewatch.lab import workloads

SCRIPTS = {
    "orders": workloads.ORDERS,
    "ledger": workloads.LEDGER,
    "compromised": workloads.compromised("10.213.1.2"),
    "attacks": workloads.gate("go")
    + workloads.route_via_host(workloads.METADATA_IP)
    + workloads.metadata_request()
    + workloads.connect("10.213.1.2", 5432, "hi", tries=5)
    + workloads.port_scan("$ZW_HOST_IP", 30, 20000, marker="ZW-ACT scan")
    + workloads.plant_ssh_key(marker="ZW-ACT keys")
    + workloads.share_escape_attempt(),
}


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox is not installed")
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_guest_scripts_parse_in_busybox_sh(name: str) -> None:
    result = subprocess.run(
        ["busybox", "sh", "-n", "-c", SCRIPTS[name]], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_the_compromised_loop_does_every_step_against_its_target() -> None:
    script = workloads.compromised("10.213.1.2")
    assert script.count("while true; do") == 1
    for needle in (
        "ip route add 169.254.169.254/32 via $ZW_HOST_IP",
        "ip route add 10.213.1.2/32 via $ZW_HOST_IP",
        "nc -w 1 169.254.169.254 80",
        *(f"nc -w 1 10.213.1.2 {port}" for port in workloads.LATERAL_PORTS),
        "mknod $ZW_SHARE/.cache/sda b 8 0",
        "$ZW_SHARE/root/.ssh/authorized_keys",
        f"seq 1 {workloads.SCAN_PORTS}",
    ):
        assert needle in script, needle


def test_agent_command_ui_or_json_lines(tmp_path: Path) -> None:
    args = demo.parse_args([])
    ui = demo.agent_command(tmp_path / "t.yaml", tmp_path, args, tui=True)
    assert "--tui" in ui and "--jsonl" not in ui and "--events" in ui
    assert ui[ui.index("--rules") + 1] == str(demo.RULES)
    assert ui[ui.index("--journal") + 1] == str(tmp_path / "journal")  # gone with the demo
    args = demo.parse_args(["--jsonl", "--duration", "5", "--no-events"])
    lines = demo.agent_command(tmp_path / "t.yaml", tmp_path, args, tui=False)
    assert "--tui" not in lines and lines[lines.index("--jsonl") + 1] == "-"
    assert lines[lines.index("--duration") + 1] == "5.0" and "--events" not in lines


def test_the_agent_maps_both_layouts_shares_to_the_guest_path(tmp_path: Path) -> None:
    cmd = demo.agent_command(tmp_path / "t.yaml", tmp_path, demo.parse_args([]), tui=False)
    mounts = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--share-mount"]
    assert mounts == ["share=/mnt/share", "kataShared=/mnt/share"]
    assert demo.parse_args([]).layout == "plain"
    assert demo.parse_args(["--layout", "kata"]).layout == "kata"


def test_without_a_terminal_the_demo_says_it_prints_json_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert not demo.use_tui(demo.parse_args([]))  # pytest captures: no terminal here
    assert "not a terminal: JSON lines instead of the UI" in capsys.readouterr().err
    assert not demo.use_tui(demo.parse_args(["--jsonl"]))
    assert capsys.readouterr().err == ""
