"""A zone's pid reused at once: a micro-VMM zone exits and, before the agent's next
inventory scan, an unrelated process is made to get the same pid (ns_last_pid) and writes
files; then a new micro-VMM gets that pid too. Nothing the impostor does is attributed to
the old zone (or any), and the new zone's events carry the new zone, never the old one."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.helpers.agent import Line
from tests.resilience.support import Agent, events_of
from zonewatch.lab.microvm import MicroVmProcess

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
ATTEMPTS = 500  # other processes on the host may take the pid first: try again


@pytest.fixture
def agent(tmp_path: Path, tokens_file: Path) -> Iterator[Agent]:
    a = Agent(tmp_path, tokens_file, "--events", "--no-stats")
    try:
        yield a
    finally:
        a.stop()


def spawn_with_pid(pid: int, argv: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    """Start argv as process `pid` (root: the next pid is ns_last_pid + 1)."""
    for _ in range(ATTEMPTS):
        NS_LAST_PID.write_text(str(pid - 1))
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    raise AssertionError(f"pid {pid} never came back in {ATTEMPTS} attempts")


def ts_s(line: Line) -> float:
    return datetime.fromisoformat(line["ts"][:26] + "+00:00").timestamp()


def wait_gone_from_list(agent: Agent, name: str) -> None:
    deadline = time.monotonic() + 10
    while name in agent.timed_list_zones()[1]:
        assert time.monotonic() < deadline, f"{name} still listed"
        time.sleep(0.05)  # the agent rescans on its own cadence: nothing to await


def test_a_reused_pid_never_inherits_the_gone_zone(agent: Agent, tmp_path: Path) -> None:
    for d in ("old", "new", "impostor"):
        (tmp_path / d).mkdir()
    old = MicroVmProcess("reuse-old", rate=20, file_dir=tmp_path / "old").start()
    try:
        agent.wait_for(lambda lines: len(events_of(lines, "reuse-old")) >= 10, 20, "old's events")
        pid = old.pid
        old_id = events_of(agent.lines, "reuse-old")[0]["zone"]["id"]
    finally:
        old.close()
    exited = time.time()
    # An unrelated process with the old zone's pid writes files: a shell's redirections
    # open them in the shell itself.
    impostor = spawn_with_pid(
        pid,
        ["sh", "-c", 'i=0; while [ $i -lt 200 ]; do : > "impostor-$i"; i=$((i+1)); done'],
        tmp_path / "impostor",
    )
    still_listed = "reuse-old" in agent.timed_list_zones()[1]
    assert impostor.wait(10) == 0
    impostor.stderr.close()  # type: ignore[union-attr]
    assert len(list((tmp_path / "impostor").iterdir())) == 200
    wait_gone_from_list(agent, "reuse-old")
    # A new zone gets the pid too: its events are its own.
    new_vm = MicroVmProcess("reuse-new", rate=20, file_dir=tmp_path / "new")
    new_vm.proc = spawn_with_pid(pid, new_vm.command(), tmp_path)
    try:
        agent.wait_for(lambda lines: len(events_of(lines, "reuse-new")) >= 10, 20, "new's events")
        new_vm.proc.send_signal(signal.SIGTERM)
    finally:
        new_vm.close()
    lines = agent.read()
    events = [x for x in lines if x["type"] == "event"]
    mentions_impostor = [x for x in events if "impostor" in str(x)]
    assert mentions_impostor == [], mentions_impostor[:3]
    late_old = [x for x in events_of(lines, "reuse-old") if ts_s(x) > exited + 0.05]
    assert late_old == [], late_old[:3]
    new_events = events_of(lines, "reuse-new")
    assert {x["proc"]["pid"] for x in new_events} == {pid}
    assert all(x["zone"]["id"] != old_id and f"-{pid}-" in x["zone"]["id"] for x in new_events)
    assert not [x for x in events_of(lines, "reuse-old") if "/new/" in x["file"]["host_path"]]
    print(
        f"pid {pid} reused by an impostor {'before' if still_listed else 'after'} the agent's "
        f"rescan and by a new zone; {len(events_of(lines, 'reuse-old'))} events for the old "
        f"zone, {len(new_events)} for the new, 0 for the impostor"
    )
