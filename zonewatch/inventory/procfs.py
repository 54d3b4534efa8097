"""Small, failure-tolerant readers of /proc. A process may vanish between any two reads:
every reader returns None (or empty) then, never raises."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from zonewatch.model import NetNs

TUN_DEVICE = "/dev/net/tun"


@dataclass(slots=True, frozen=True)
class ProcStat:
    comm: str
    ppid: int
    start_time: int  # clock ticks since boot: a pid plus this names one process incarnation


def list_pids(proc: Path) -> list[int]:
    try:
        return [int(name) for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return []


def read_stat(proc: Path, pid: int) -> ProcStat | None:
    try:
        raw = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # comm may hold spaces and parentheses: it runs from the first "(" to the last ")".
    open_paren, close_paren = raw.find(b"("), raw.rfind(b")")
    if open_paren < 0 or close_paren < open_paren:
        return None
    fields = raw[close_paren + 2 :].split()
    try:
        return ProcStat(
            comm=raw[open_paren + 1 : close_paren].decode("utf-8", "backslashreplace"),
            ppid=int(fields[1]),
            start_time=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def read_cmdline(proc: Path, pid: int) -> list[str]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(arg) for arg in raw.rstrip(b"\0").split(b"\0")] if raw else []


def thread_comms(proc: Path, pid: int) -> dict[int, str]:
    comms: dict[int, str] = {}
    try:
        tids = os.listdir(proc / str(pid) / "task")
    except OSError:
        return comms
    for tid in tids:
        try:
            comm = (proc / str(pid) / "task" / tid / "comm").read_bytes()
        except OSError:
            continue
        comms[int(tid)] = comm.rstrip(b"\n").decode("utf-8", "backslashreplace")
    return comms


def fd_target(proc: Path, pid: int, fd: int) -> str | None:
    try:
        return os.fsdecode(os.readlink(os.fsencode(proc / str(pid) / "fd" / str(fd))))
    except OSError:
        return None


def net_ns(proc: Path, pid: int) -> NetNs | None:
    """The process's network namespace: its identity, and the path that enters it."""
    path = proc / str(pid) / "ns" / "net"
    try:
        return NetNs(os.stat(path).st_ino, str(path))
    except OSError:
        return None


def tap_names(proc: Path, pid: int) -> list[str]:
    """Interfaces attached through /dev/net/tun fds, from each fd's `iff:` fdinfo line."""
    names: list[str] = []
    fd_dir = proc / str(pid) / "fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return names
    for fd in fds:
        try:
            if os.readlink(fd_dir / fd) != TUN_DEVICE:
                continue
            info = (proc / str(pid) / "fdinfo" / fd).read_text(errors="replace")
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("iff:"):
                names.append(line.split(":", 1)[1].strip())
    return sorted(set(names))
