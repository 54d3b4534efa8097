"""A zone's pid reused at once: a micro-VMM zone exits and, before the agent's next
inventory scan, an unrelated process is made to get the same pid (ns_last_pid) and writes
files; then a new micro-VMM gets that pid too. Nothing the impostor does is attributed to
the old zone (or any), and the new zone's events carry the new zone, never the old one."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import Line
from tests.resilience.support import Agent, events_of
from zonewatch.lab.microvm import MicroVmProcess
from zonewatch.probes.file import FileProbe

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


HOLDER = r"""
import os, sys
print("ready", flush=True)
for line in sys.stdin:
    cmd, *rest = line.split()
    if cmd == "open":  # keep it open: the process may die holding it
        fd = os.open(rest[0], os.O_CREAT | os.O_WRONLY, 0o600)
        if len(rest) > 1 and fd != int(rest[1]):  # as fd number rest[1]
            os.dup2(fd, int(rest[1]))
            os.close(fd)
            fd = int(rest[1])
        print(fd, flush=True)
    elif cmd == "write":
        print(os.write(int(rest[0]), b"x" * 100), flush=True)
"""


class Holder:
    """A process that opens and writes files when told (stdin), one reply line each."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    def do(self, command: str) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


def holder(cwd: Path, pid: int | None = None) -> Holder:
    argv = [sys.executable, "-c", HOLDER]
    if pid is None:
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
    else:
        for _ in range(ATTEMPTS):
            NS_LAST_PID.write_text(str(pid - 1))
            proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)  # fmt: skip
            if proc.pid == pid:
                break
            Holder(proc).close()
        else:
            raise AssertionError(f"pid {pid} never came back")
    return Holder(proc)


def drain(probe: FileProbe) -> list[Any]:
    out: list[Any] = []
    while batch := probe.poll(200):
        out += batch
    return out


def test_a_file_the_gone_zone_held_open_is_not_the_new_zones(tmp_path: Path) -> None:
    """The old zone's process dies holding a traced file open; a new zone's process gets
    its pid and writes on the same fd number (opened before it was a zone's): that write
    is not the old zone's (the kernel's per-fd state of a gone process is dropped)."""
    probe = FileProbe()
    probe.attach()
    old = new = None
    try:
        old = holder(tmp_path)
        pid = old.proc.pid
        probe.set_zone_pids({pid: 1})
        fd = old.do("open held-by-old")
        assert [r.zone_key for r in drain(probe)] == [1]  # its open, traced
        old.close()  # killed holding it
        new = holder(tmp_path, pid)
        assert new.do(f"open new-file {fd}") == fd  # before it is a zone's: not traced
        probe.set_zone_pids({pid: 2})  # the inventory: the old zone gone, a new one, same pid
        assert new.do(f"write {fd}") == 100
        records = drain(probe)
    finally:
        for h in (old, new):
            if h is not None:
                h.close()
        probe.detach()
    assert [r for r in records if r.zone_key == 1] == []
