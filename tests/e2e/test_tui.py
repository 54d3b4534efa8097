"""Issue 7 end to end: `zonewatch top` in tmux (80x24) against a real agent (`zonewatch run
--grpc --rules rules`) watching two lab zones of two tenants.

The acme zone's workload, once the host says go, writes an SSH authorized_keys file under
a directory whose name holds terminal escape sequences (ESC [2J clears the screen, ESC [31m
paints red) and creates a file whose name holds them too. The default rule "SSH authorized
keys written through a share" fires during the test; the alert reaches the UI through the
gRPC stream and shows the path escaped, while the screen keeps its header, table and footer.
Sort, filter, drill-down and quit are driven by keys; a tenant-scoped token sees only its
tenant's zone.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.agent import AgentProcess
from tests.helpers.tmux import Tmux
from zonewatch.lab.lab import Lab
from zonewatch.lab.qemu import QemuZone, ZoneSpec

ROOT = Path(__file__).resolve().parents[2]
ACME, GLOBEX = "tui-acme-1", "tui-globex-1"
# busybox printf turns \033 into ESC. The key write is what the rule sees; the plain file
# is a second hostile name. Then the zone idles, so it stays in the agent's snapshots.
WORKLOAD = r"""
while [ ! -e /mnt/share/go ]; do sleep 0.1; done
d="/mnt/share/$(printf 'x\033[2J\033[31m')"
mkdir -p "$d/.ssh"
echo "ssh-ed25519 AAAA test" > "$d/.ssh/authorized_keys"
echo x > "/mnt/share/$(printf 'evil\033[2J\033[Hname')"
while true; do sleep 1; done
"""
IDLE = "while true; do sleep 1; done"
TOKENS = """version: 1
tokens:
  - name: admin
    token: tui-admin-token-1
    tenants: ["*"]
  - name: acme
    token: tui-acme-token-1
    tenants: [acme]
"""
ESCAPED_DIR = "x\\x1b[2J\\x1b[31m"
RULE = "SSH authorized keys written through a share"


@pytest.fixture
def zones(lab: Lab) -> list[QemuZone]:
    return lab.start([ZoneSpec(ACME, "acme", WORKLOAD, index=61),
                      ZoneSpec(GLOBEX, "globex", IDLE, index=62)])  # fmt: skip


@pytest.fixture
def agent(tmp_path: Path, lab: Lab, zones: list[QemuZone]) -> Iterator[tuple[AgentProcess, str]]:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS)
    tokens.chmod(0o600)
    address = f"unix:{tmp_path}/zw.sock"
    with AgentProcess(
        tmp_path,
        "--tenants", str(lab.write_tenants(tmp_path / "tenants.yaml")),
        "--rules", str(ROOT / "rules"),
        "--grpc", address,
        "--tokens", str(tokens),
        "--journal", str(tmp_path / "journal"),
    ) as running:  # fmt: skip
        yield running, address


def top(address: str, token: str) -> list[str]:
    return [sys.executable, "-m", "zonewatch", "top", "--server", address, "--token", token]


def zone_rows(screen: str) -> list[str]:
    """The zone table's rows: the lines under the column header, down to the alerts."""
    lines = screen.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ZONE "))
    rows = []
    for line in lines[start + 1 :]:
        if "ALERTS" in line:
            break
        if line.strip():
            rows.append(line)
    return rows


def intact(screen: str) -> bool:
    """Header on the first line, column titles on the third, the footer on the last: an
    escape sequence that got through (a clear, a cursor move) would have broken these."""
    lines = screen.splitlines()
    return (
        len(lines) >= 23
        and lines[0].startswith(" zonewatch top ")
        and lines[2].startswith("ZONE ")
        and "Quit" in lines[-1]
    )


def drill_down_intact(screen: str) -> bool:
    lines = screen.splitlines()
    return len(lines) >= 23 and lines[0].startswith(" zonewatch zone ") and "Back" in lines[-1]


def only(screen: str, zone: str) -> bool:
    """The table shows exactly one row, of `zone`."""
    rows = zone_rows(screen)
    return len(rows) == 1 and rows[0].startswith(zone)


def shown(screen: str) -> set[str]:
    """The zone names in the table (not in the alerts pane)."""
    return {row.split()[0] for row in zone_rows(screen)}


def test_top_against_a_live_agent(
    tmp_path: Path, zones: list[QemuZone], agent: tuple[AgentProcess, str]
) -> None:
    running, address = agent
    ui = Tmux(top(address, "tui-admin-token-1"), tmp_path)
    try:
        screen = ui.wait(lambda s: shown(s) >= {ACME, GLOBEX} and intact(s), "both zones")
        assert "unreachable" not in screen

        # An alert raised now, by a default rule, on a path holding escape sequences.
        for zone in zones:
            (zone.share_dir / "go").write_text("")
        screen = ui.wait(lambda s: RULE[:20] in s, "the alert in the alerts pane", timeout=90)
        assert intact(screen)
        assert "\x1b" not in screen
        alert_line = next(line for line in screen.splitlines() if RULE[:20] in line)
        assert "HIGH" in alert_line and f"acme/{ACME}" in alert_line
        running.wait_for(
            lambda lines: any(x["type"] == "alert" and x["rule"] == RULE for x in lines),
            timeout=10,
            what="the alert in the agent's own JSON lines",
        )

        # Sort: s moves to the next column (from exits/s to the top exit reason).
        ui.keys("s")
        screen = ui.wait(lambda s: "sort: top exit reason" in s, "sorted by reason")
        assert "REASON▲" in screen.splitlines()[2]
        # Filter: / globex Enter leaves the globex zone only.
        ui.keys("/")
        ui.keys("-l", "globex")
        ui.keys("Enter")
        screen = ui.wait(lambda s: "filter: globex" in s and only(s, GLOBEX), "the filter")
        assert ACME not in shown(screen)
        ui.keys("Escape")  # clears the filter
        ui.wait(lambda s: "filter:" not in s and shown(s) >= {ACME, GLOBEX}, "unfiltered")

        # Drill into the acme zone: its alert, with the escaped directory name in the path.
        ui.keys("/")
        ui.keys("-l", ACME)
        ui.keys("Enter")
        # The table has the focus back (its Enter hint is in the footer): Enter drills.
        ui.wait(lambda s: only(s, ACME) and "⏎ Zone" in s.splitlines()[-1], "acme only")
        ui.keys("Enter")
        ui.wait(lambda s: s.startswith(" zonewatch zone "), "the drill-down")
        ui.keys("End")
        screen = ui.wait(
            lambda s: ESCAPED_DIR in s and drill_down_intact(s),
            "the escaped path in the zone's alerts",
        )
        assert "\x1b" not in screen
        assert f"/{ESCAPED_DIR}/.ssh/authorized_keys" in screen
        ui.keys("Escape")
        ui.wait(lambda s: s.startswith(" zonewatch top "), "back on the main screen")

        ui.keys("q")
        assert ui.wait_exit() == 0
    finally:
        ui.kill()


def test_a_tenant_token_sees_only_its_tenant(
    tmp_path: Path, zones: list[QemuZone], agent: tuple[AgentProcess, str]
) -> None:
    _running, address = agent
    ui = Tmux(top(address, "tui-acme-token-1"), tmp_path)
    try:
        screen = ui.wait(lambda s: ACME in shown(s) and intact(s), "the acme zone")
        rows = zone_rows(screen)
        assert rows and all(" acme " in r for r in rows), rows
        assert GLOBEX not in screen
        ui.keys("q")
        assert ui.wait_exit() == 0
    finally:
        ui.kill()


def test_unreachable_agent_is_shown_and_retried(tmp_path: Path) -> None:
    address = f"unix:/tmp/zw-nobody-{uuid.uuid4().hex[:6]}.sock"  # short: the status fits
    ui = Tmux(top(address, "x"), tmp_path)
    try:
        screen = ui.wait(lambda s: "agent unreachable" in s, "the unreachable status")
        assert f"agent unreachable: {address}, retrying" in screen
        assert "Traceback" not in screen
        ui.wait(lambda s: "(attempt 3)" in s, "a third attempt")
        ui.keys("q")
        assert ui.wait_exit() == 0
    finally:
        ui.kill()


def test_run_tui_shows_the_escaped_file_name_in_recent_file_operations(
    tmp_path: Path, lab: Lab, zones: list[QemuZone]
) -> None:
    """`zonewatch run --tui --events`: the UI reads the agent in-process, so the drill-down
    lists the zone's recent file operations, the ESC-named file among them, escaped."""
    tenants = lab.write_tenants(tmp_path / "tenants.yaml")
    command = [sys.executable, "-m", "zonewatch", "run", "--tui", "--events",
               "--tenants", str(tenants), "--journal", str(tmp_path / "journal")]  # fmt: skip
    ui = Tmux(command, tmp_path)
    try:
        ui.wait(lambda s: shown(s) >= {ACME, GLOBEX} and intact(s), "both zones", timeout=90)
        for zone in zones:
            (zone.share_dir / "go").write_text("")
        ui.keys("/")
        ui.keys("-l", ACME)
        ui.keys("Enter")
        ui.wait(lambda s: only(s, ACME) and "⏎ Zone" in s.splitlines()[-1], "acme only")
        ui.keys("Enter")
        ui.wait(lambda s: s.startswith(" zonewatch zone "), "the drill-down")
        screen = ui.wait(
            lambda s: "evil\\x1b[2J\\x1b[Hname" in s and drill_down_intact(s),
            "the escaped file name in the recent file operations",
            timeout=60,
        )
        assert "\x1b" not in screen
        assert "RECENT FILE OPERATIONS" in screen
        ui.keys("q")  # quitting the UI stops the agent
        assert ui.wait_exit(timeout=30) == 0
    finally:
        ui.kill()
