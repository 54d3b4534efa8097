"""Compile and load bpf/*.c through bcc, with the kernel probed for what exists.

bcc is imported lazily: unit tests, `--help` and replay run on machines without it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from zonewatch.errors import EnvironmentProblem

BPF_DIR = Path(os.environ.get("ZONEWATCH_BPF_DIR", Path(__file__).resolve().parents[2] / "bpf"))
TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem(what, "needs root (CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)")


def tracefs() -> Path:
    """The mounted tracefs, mounting it (and debugfs, which bcc reads) when missing."""
    for mount_point, fstype in (
        (Path("/sys/kernel/tracing"), "tracefs"),
        (Path("/sys/kernel/debug"), "debugfs"),
    ):
        if mount_point.is_dir() and not os.path.ismount(mount_point):
            subprocess.run(
                ["mount", "-t", fstype, "nodev", str(mount_point)], check=False, capture_output=True
            )
    for candidate in TRACEFS_CANDIDATES:
        if (candidate / "events").is_dir():
            return candidate
    raise EnvironmentProblem(
        "tracefs", "not mounted and could not be mounted at /sys/kernel/tracing"
    )


def tracepoint_exists(category: str, event: str) -> bool:
    return (tracefs() / "events" / category / event / "format").is_file()


def syscall_tracepoint_defines(syscalls: Iterable[str]) -> tuple[list[str], list[str]]:
    """cflags enabling each syscall probe whose enter and exit tracepoints both exist.

    Returns (cflags, missing syscall names) so the caller can say what is switched off.
    """
    cflags: list[str] = []
    missing: list[str] = []
    for name in syscalls:
        if tracepoint_exists("syscalls", f"sys_enter_{name}") and tracepoint_exists(
            "syscalls", f"sys_exit_{name}"
        ):
            cflags.append(f"-DZW_TP_{name}=1")
        else:
            missing.append(name)
    return cflags, missing


def import_bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:
        raise EnvironmentProblem(
            "bcc", f"cannot import bcc ({exc}); run `make setup` (Debian package python3-bpfcc)"
        ) from exc
    return bcc


def load_program(source: str, cflags: Iterable[str] = ()) -> Any:
    """Compile bpf/<source> with the shared header on the include path and load it.

    bcc attaches every TRACEPOINT_PROBE of the program as it loads.
    """
    require_root(f"bpf/{source}")
    tracefs()
    bcc = import_bcc()
    path = BPF_DIR / source
    if not path.is_file():
        raise EnvironmentProblem(str(path), "BPF source not found (set ZONEWATCH_BPF_DIR)")
    flags = [f"-I{BPF_DIR}", "-Wno-macro-redefined", *cflags]
    try:
        return bcc.BPF(src_file=str(path).encode(), cflags=flags)
    except Exception as exc:  # bcc raises bare Exception on compile or load failure
        raise EnvironmentProblem(f"bpf/{source}", f"failed to compile or load: {exc}") from exc


PERF_EVENT_IOC_DISABLE = 0x2401
# Closes the perf event fds it inherited (argv), all at once, then exits.
_CLOSER = (
    "import os, sys, threading\n"
    "ts = [threading.Thread(target=os.close, args=(int(a),)) for a in sys.argv[1:]]\n"
    "for t in ts: t.start()\n"
    "for t in ts: t.join()\n"
)
_closers: list[subprocess.Popen[bytes]] = []


def unload_program(bpf: Any) -> None:
    """Detach and unload what load_program made (bcc's cleanup), without waiting for the
    kernel to unhook the tracepoints.

    Unhooking a tracepoint waits out RCU grace periods under a kernel-wide mutex
    (perf_trace_destroy): about 45-95 ms per tracepoint on this kind of host, so bcc's
    cleanup() took 10 s for the agent's ~120 tracepoints, and closing them from parallel
    threads still 5 s. So the tracepoints are disabled here (their programs stop running at
    once) and a short-lived process that inherits their fds makes the last close: this
    process returns at once, the kernel finishes unhooking in the background (seconds)."""
    fds = list(bpf.tracepoint_fds.values())
    if fds:
        for fd in fds:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, PERF_EVENT_IOC_DISABLE, 0)
        _hand_over(fds)
        for fd in fds:
            os.close(fd)  # the closer still holds each: no unhooking waited for here
        bpf.tracepoint_fds.clear()
    bpf.cleanup()


def _hand_over(fds: list[int]) -> None:
    """Start the closer with `fds` (its own session: a ^C meant for the agent is not for it);
    when it cannot start, close them here, in parallel threads."""
    _closers[:] = [p for p in _closers if p.poll() is None]  # reap the finished ones
    try:
        _closers.append(
            subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _CLOSER, *map(str, fds)],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        return
    except OSError:
        pass
    close = import_bcc().lib.bpf_close_perf_event_fd
    dups = [os.dup(fd) for fd in fds]  # the caller closes the originals
    with ThreadPoolExecutor(max_workers=min(len(dups), 64)) as pool:
        list(pool.map(close, dups))


def tracepoint_defines(category: str, events: Iterable[str]) -> tuple[list[str], list[str]]:
    """cflags enabling each probe whose tracepoint exists (-DZW_TP_<event>), and the missing.

    Returns (cflags, missing event names) so the caller can say what is switched off.
    """
    cflags: list[str] = []
    missing: list[str] = []
    for event in events:
        if tracepoint_exists(category, event):
            cflags.append(f"-DZW_TP_{event}=1")
        else:
            missing.append(event)
    return cflags, missing


def tracepoint_fields(category: str, event: str) -> set[str]:
    """The field names a tracepoint's format declares (empty when it does not exist).

    Fields come and go between kernel versions (4.x kvm_exit has no vcpu_id): the loader
    compiles the matching variant instead of failing on an unknown member.
    """
    try:
        text = (tracefs() / "events" / category / event / "format").read_text()
    except FileNotFoundError:
        return set()
    fields: set[str] = set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("field:"):
            continue
        decl = line.split(";", 1)[0].removeprefix("field:").strip()
        name = decl.split()[-1].split("[", 1)[0]
        if not name.startswith("common_"):
            fields.add(name)
    return fields
