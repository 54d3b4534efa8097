"""A micro-VMM's vCPU thread alone on one core, and a CPU hog to share that core with it:
how the sched tests make run delay happen on purpose."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HOG = "while True:\n    pass\n"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(cond: Callable[[], bool], timeout: float, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(poll)


@contextmanager
def vcpu_alone_on_a_core(vmm_pid: int, vcpu_tid: int) -> Iterator[int]:
    """Pin the vCPU thread to this process's last core and the VMM's other threads and this
    process to the rest; yields the core. This process's affinity is restored after."""
    mine = os.sched_getaffinity(0)
    core = max(mine)
    others = mine - {core}
    try:
        for task in Path(f"/proc/{vmm_pid}/task").iterdir():
            tid = int(task.name)
            os.sched_setaffinity(tid, {core} if tid == vcpu_tid else others)
        os.sched_setaffinity(0, others)
        yield core
    finally:
        os.sched_setaffinity(0, mine)


@contextmanager
def hog_on(core: int) -> Iterator[None]:
    """A busy loop pinned to `core`, really running before this yields; killed after."""
    hog = subprocess.Popen([sys.executable, "-c", HOG])
    try:
        os.sched_setaffinity(hog.pid, {core})
        wait_until(lambda: cpu_seconds(hog.pid) >= 0.2, timeout=10)
        yield
    finally:
        hog.kill()
        hog.wait()
