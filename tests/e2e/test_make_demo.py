"""Issue 8: `make demo` in a terminal (tmux, 160x45) shows the zones and the compromised
zone's alerts within 60 s; Ctrl-C leaves no process, tap, tc filter or file behind.

The clock starts when tmux starts `make demo` (setup's check, three TCG boots, the micro-VMM,
the agent compiling its BPF programs, the compromised workload's first rounds) and stops at
the first screen capture that shows each thing; the pane is captured every 0.1 s.

What the demo started is found, while it runs, as the descendants of the pane's process
(QEMUs, micro-VMM, agent) and from the lab's records of its zones (taps, zone folders);
TMPDIR points into this test's folder, so every temporary file the demo and its children
make lands where the test can see that none is left. Whatever happens, the test ends with
the tmux session killed and anything of the demo's still there removed, and nothing else
(other lab zones on this host are left alone).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.tmux import Tmux
from zonewatch.lab import taps
from zonewatch.lab.assets import GuestAssets
from zonewatch.lab.state import kill_process, pid_alive, proc_cmdline, proc_start_time, read_records

ZONES = ("shop-web", "shop-db", "ledger")
COMPROMISED = "shop-web"
ALERTS = {
    "metadata": "Cloud metadata service contacted from a zone",
    "lateral": "Connection to another tenant's zone",
    "escape attempt": "Device node created through a share",
}
WITHIN_S = 60.0
TEARDOWN_S = 60.0


def children_of() -> dict[int, list[int]]:
    """ppid -> pids, from /proc now."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(root: int) -> dict[int, tuple[int, str]]:
    """pid -> (start time, command line) of every process below `root`."""
    tree = children_of()
    out: dict[int, tuple[int, str]] = {}
    stack = list(tree.get(root, []))
    while stack:
        pid = stack.pop()
        start = proc_start_time(pid)
        if start is not None:
            out[pid] = (start, " ".join(proc_cmdline(pid)))
        stack.extend(tree.get(pid, []))
    return out


def shown_zones(screen: str) -> set[str]:
    """Zone names in the zone table: the rows between its column header and the alerts."""
    lines = screen.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ZONE "))
    names = set()
    for line in lines[start + 1 :]:
        if "ALERTS" in line:
            break
        if line.strip():
            names.add(line.split()[0])
    return names


def tc_filters(tap: str) -> str:
    return "".join(
        subprocess.run(
            ["tc", "filter", "show", "dev", tap, hook], capture_output=True, text=True, check=False
        ).stdout
        for hook in ("ingress", "egress")
    )


def lab_taps() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {
        line.split(": ")[1].split("@")[0]
        for line in out.splitlines()
        if line.split(": ")[1].startswith(taps.TAP_PREFIX)
    }


@dataclass
class Demo:
    ui: Tmux
    tmpdir: Path
    started: float
    processes: dict[int, tuple[int, str]] = field(default_factory=dict)
    taps: set[str] = field(default_factory=set)
    zone_dirs: set[Path] = field(default_factory=set)
    seen: dict[str, float] = field(default_factory=dict)

    def track(self) -> None:
        self.processes.update(descendants(self.ui.pane_pid()))
        for record in read_records():
            if record.name in ZONES:
                self.taps.add(record.tap)
                self.zone_dirs.add(Path(record.zone_dir))

    def leftovers(self) -> list[str]:
        left = [
            f"process {pid}: {cmd}"
            for pid, (start, cmd) in self.processes.items()
            if pid_alive(pid, start)
        ]
        left += [f"tap {tap}" for tap in self.taps & lab_taps()]
        left += [f"tc filters on {tap}" for tap in self.taps if tc_filters(tap).strip()]
        left += [f"zone folder {d}" for d in self.zone_dirs if d.exists()]
        left += [f"temporary file {p}" for p in self.tmpdir.iterdir()]
        return left

    def remove_leftovers(self) -> None:
        """After a failure: end what the demo left, and only that."""
        for pid, (start, _cmd) in self.processes.items():
            kill_process(pid, start)
        for record in read_records():
            if record.name in ZONES:
                kill_process(record.pid, record.start_time)
        for tap in self.taps & lab_taps():
            with contextlib.suppress(Exception):
                taps.delete_tap(tap)
        for d in self.zone_dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def demo(lab_assets: GuestAssets, tmp_path: Path) -> Iterator[Demo]:
    running = [r.name for r in read_records() if r.name in ZONES and r.alive()]
    if running:
        pytest.skip(f"a demo is already running here (zones {', '.join(running)})")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    ui = Tmux(
        ["make", "demo"], tmp_path, width=160, height=45, prefix="zw-demo",
        env={"TMPDIR": str(tmpdir)},
    )  # fmt: skip
    run = Demo(ui, tmpdir, time.monotonic())
    try:
        yield run
    finally:
        ui.kill()  # the demo takes SIGHUP as Ctrl-C; what it does not clean, we do
        with contextlib.suppress(Exception):
            run.track()
        deadline = time.monotonic() + 30
        while run.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        run.remove_leftovers()


def test_make_demo_shows_the_attack_and_ctrl_c_leaves_nothing(demo: Demo) -> None:
    def look(screen: str) -> bool:
        now = time.monotonic() - demo.started
        demo.track()
        if "zones" not in demo.seen and set(ZONES) <= shown_zones(screen):
            demo.seen["zones"] = now
        for what, rule in ALERTS.items():
            if what not in demo.seen and f"/{COMPROMISED} {rule}" in screen:
                demo.seen[what] = now
        return len(demo.seen) == 1 + len(ALERTS)

    try:
        screen = demo.ui.wait(look, "the zones and the compromised zone's alerts", WITHIN_S)
    except AssertionError as exc:
        raise AssertionError(f"seen within {WITHIN_S:.0f} s: {demo.seen}\n{exc}") from None
    for what, seconds in demo.seen.items():
        print(f"demo: {what} on screen {seconds:.1f} s after `make demo` started")
    assert "Traceback" not in screen

    # What there is to clean up: three QEMUs, the micro-VMM and the agent; three taps,
    # each with the agent's tc filters.
    commands = [cmd for _start, cmd in demo.processes.values()]
    assert sum("qemu-system" in c for c in commands) == 3, commands
    assert any("zonewatch.lab.microvm" in c for c in commands), commands
    assert any("zonewatch -v run" in c and "--tui" in c for c in commands), commands
    assert len(demo.taps) == 3, demo.taps
    assert all(tc_filters(tap).strip() for tap in demo.taps), demo.taps

    demo.ui.keys("C-c")
    stopping = time.monotonic()
    assert demo.ui.wait_exit(timeout=TEARDOWN_S) == 0, demo.ui.screen()
    deadline = time.monotonic() + 10  # the pane's command has exited: this is a backstop
    while (left := demo.leftovers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"demo: exited {time.monotonic() - stopping:.1f} s after Ctrl-C")
    assert not left, left
