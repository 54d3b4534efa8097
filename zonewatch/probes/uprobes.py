"""Per-process uprobes on libc: the file channel's low-overhead hooks (bpf/file.c built
with -DZW_FILE_UPROBES).

A uprobe bound to one process costs that process only, on the calls it hooks; syscall
tracepoints tax every syscall on the host. `LibcUprobes` follows the zone filter: when a
backend process appears, every hooked libc function of the libc that process maps gets a
uprobe (and a uretprobe where the program needs the result) bound to its pid; when it
goes, they are detached. A uprobe bound to a process's tgid fires in every thread of it,
threads created later included (the kernel filters uprobes by address space).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import logging
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zonewatch.probes.loader import import_bcc, tracefs
from zonewatch.probes.tls import errno_tls_offset

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LibcHook:
    entry: str  # program run at the call (bpf/file.c with -DZW_FILE_UPROBES)
    ret: str | None  # program run at the return, or None
    symbols: tuple[str, ...]  # libc names of the function (aliases share an address)


# What QEMU's 9p local backend and virtiofsd call (`nm -D` of both: openat64, open64,
# mkdirat, renameat, unlinkat, fchmodat, lsetxattr, preadv64, pwritev64, pread64, pwrite64,
# close, ...), mirroring bpf/file.c's syscall list. The first hook naming an address wins:
# aliases (open/open64, pread/pread64, ...) are hooked once.
#
# File data moves through the positional calls (pread64/pwrite64/preadv/pwritev): both
# backends use them for guest files. The stream calls (read/write/readv/writev) are left
# out unless asked for (STREAM_IO_HOOKS): a VMM makes them for its eventfds, taps and
# sockets (QEMU reads and writes a tap per frame), and every hooked call traps, tracked fd
# or not. A file read or written with them shows its open but no I/O or close then.
LIBC_HOOKS: tuple[LibcHook, ...] = (
    LibcHook("zw_openat", "zw_path_ret", ("openat", "openat64")),
    LibcHook("zw_open", "zw_path_ret", ("open", "open64")),
    LibcHook("zw_creat", "zw_path_ret", ("creat", "creat64")),
    LibcHook("zw_mkdirat", "zw_path_ret", ("mkdirat",)),
    LibcHook("zw_mkdir", "zw_path_ret", ("mkdir",)),
    LibcHook("zw_mknodat", "zw_path_ret", ("mknodat",)),
    LibcHook("zw_unlinkat", "zw_path_ret", ("unlinkat",)),
    LibcHook("zw_unlink", "zw_path_ret", ("unlink",)),
    LibcHook("zw_rmdir", "zw_path_ret", ("rmdir",)),
    LibcHook("zw_renameat2", "zw_path_ret", ("renameat2",)),
    LibcHook("zw_renameat", "zw_path_ret", ("renameat",)),
    LibcHook("zw_rename", "zw_path_ret", ("rename",)),
    LibcHook("zw_linkat", "zw_path_ret", ("linkat",)),
    LibcHook("zw_symlinkat", "zw_path_ret", ("symlinkat",)),
    LibcHook("zw_fchmodat", "zw_path_ret", ("fchmodat",)),
    LibcHook("zw_fchmod", "zw_path_ret", ("fchmod",)),
    LibcHook("zw_fchownat", "zw_path_ret", ("fchownat",)),
    LibcHook("zw_fchown", "zw_path_ret", ("fchown",)),
    LibcHook("zw_truncate", "zw_path_ret", ("truncate", "truncate64")),
    LibcHook("zw_ftruncate", "zw_path_ret", ("ftruncate", "ftruncate64")),
    LibcHook("zw_setxattr", "zw_path_ret", ("lsetxattr", "setxattr")),
    LibcHook("zw_fsetxattr", "zw_path_ret", ("fsetxattr",)),
    LibcHook("zw_io", "zw_write_ret", ("pwrite64", "pwrite", "pwritev64", "pwritev",
                                       "pwritev64v2", "pwritev2")),
    LibcHook("zw_io", "zw_read_ret", ("pread64", "pread", "preadv64", "preadv",
                                      "preadv64v2", "preadv2")),
    LibcHook("zw_close", None, ("close",)),
)  # fmt: skip
STREAM_IO_HOOKS: tuple[LibcHook, ...] = (
    LibcHook("zw_io", "zw_write_ret", ("write", "writev")),
    LibcHook("zw_io", "zw_read_ret", ("read", "readv")),
)

_instances = itertools.count(1)  # trace event groups: zw<agent pid>_<instance>
_LIBC_NAME = re.compile(r"/libc(-[0-9.]+)?\.so(\.[0-9]+)*$")


def libc_path(pid: int) -> str | None:
    """The libc an existing process maps (executable), as a path this process can open:
    its own path when that is the very file mapped, else through /proc/PID/root (another
    mount namespace). The mapped file is told by /proc/PID/map_files: a process pivoted
    into another root (QEMU's virtiofsd, into its share) maps the host's libc by a path
    its new root no longer holds."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or "x" not in parts[1]:
            continue
        path = parts[5]
        if not _LIBC_NAME.search(path):
            continue
        rooted = f"/proc/{pid}/root{path}"
        try:
            mapped = os.stat(f"/proc/{pid}/map_files/{parts[0]}")
        except OSError:  # no map_files (not root): the process's own view
            return rooted if os.path.exists(rooted) else None
        for candidate in (path, rooted):
            try:
                st = os.stat(candidate)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (mapped.st_dev, mapped.st_ino):
                return candidate
        return None
    return None


@dataclass(frozen=True, slots=True)
class Site:
    """One hooked function of one libc file: where it is and which programs run there."""

    offset: int  # in the file (what a uprobe names)
    symbol: str
    entry: str
    ret: str | None


def resolve_sites(path: str, hooks: Iterable[LibcHook] = LIBC_HOOKS) -> list[Site]:
    """Where each hooked function of the libc at `path` is; aliases once, absent ones
    (an older libc without renameat2, say) left out."""
    bcc = import_bcc()
    sites: list[Site] = []
    seen: set[int] = set()
    for hook in hooks:
        for symbol in hook.symbols:
            try:  # bcc's own resolver (ELF symbol -> file offset), as attach_uprobe uses
                _, offset = bcc.BPF._check_path_symbol(path.encode(), symbol.encode(), None, -1)
            except Exception:  # bcc raises bare Exception for a missing symbol
                log.debug("file uprobes: no %s in %s", symbol, path)
                continue
            if offset in seen:
                continue
            seen.add(offset)
            sites.append(Site(offset, symbol, hook.entry, hook.ret))
    return sites


PERF_TYPE_TRACEPOINT = 2
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}.get(os.uname().machine, 298)
_ATTR = struct.Struct(
    "=IIQQQQQ"
)  # type, size, config, sample_period, sample_type, read_format, flags
_ATTR_SIZE = 128  # PERF_ATTR_SIZE_VER8; the rest is zero
_libc = ctypes.CDLL(None, use_errno=True)


def perf_event_open_tracepoint(event_id: int, pid: int) -> int:
    """A perf event on trace event `event_id` bound to process `pid` (all its threads)."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _ATTR.pack_into(attr, 0, PERF_TYPE_TRACEPOINT, _ATTR_SIZE, event_id, 1, 0, 0, 0)
    fd = _libc.syscall(_NR_PERF_EVENT_OPEN, attr, pid, -1, -1, ctypes.c_ulong(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(
            err, f"perf_event_open(trace event {event_id}, pid {pid}): {os.strerror(err)}"
        )
    return int(fd)


def _ioctl(fd: int, request: int, arg: int = 0) -> None:
    if _libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(arg)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioctl {request:#x}: {os.strerror(err)}")


@dataclass(slots=True)
class _Event:
    """One uprobe trace event (a site's entry or return) and the perf event that holds the
    program on it."""

    name: str
    id: int  # -1 until read from tracefs
    anchor_fd: int  # -1 until opened


class LibcUprobes:
    """Keeps uprobes on the libc of exactly the given processes (by pid).

    Each hooked site of each libc file is one uprobe trace event made in tracefs
    (`uprobe_events`, group `zw<agent pid>_<n>`), shared by every zone process: hooking a
    process is one perf event per site bound to its pid, which adds its address space to
    the uprobe's filter (only hooked processes get the breakpoints); unhooking closes them.
    The program is attached once per trace event, through an anchor perf event bound to an
    idle helper process, so that no zone's leaving takes it away.

    Why not one uprobe per process and site (what bcc's attach_uprobe(pid=) makes): removing
    a uprobe trace event waits for an RCU grace period under a host-wide mutex (~0.12 s
    measured on CI's VM; ~8 s for the 67 probes of one process, serial). Shared, that cost
    is paid once, when the probe detaches, not each time a zone goes.
    """

    def __init__(self, bpf: Any, hooks: tuple[LibcHook, ...] = LIBC_HOOKS) -> None:
        self._bpf = bpf
        self._hooks = hooks
        self._group = f"zw{os.getpid()}_{next(_instances)}"
        self._tracefs = tracefs()
        self._events: dict[tuple[int, int], list[_Event]] = {}  # libc (dev, ino) -> events
        self._fns: dict[str, int] = {}  # program name -> loaded program fd
        self._attached: dict[int, list[int]] = {}  # pid -> its perf event fds
        self._keys: dict[int, int] = {}  # pid -> zone key when hooked (or tried)
        self.unhooked: dict[int, str] = {}  # pid -> why it has no uprobes
        self._anchor: subprocess.Popen[bytes] | None = None
        remove_stale_events(self._tracefs)

    @property
    def pids(self) -> set[int]:
        return set(self._attached)

    def sync(self, pids: Mapping[int, int]) -> None:
        """Hook exactly these processes (pid -> zone key). A pid whose zone key changed is
        another process now (the inventory gives a reused pid a new zone): its perf events
        were bound to the old one, so it is hooked anew."""
        for pid in [p for p, key in self._keys.items() if pids.get(p) != key]:
            self._detach(pid)
            self.unhooked.pop(pid, None)
            del self._keys[pid]
        for pid, key in pids.items():
            if pid not in self._keys:
                self._keys[pid] = key
                self._attach(pid)

    def _fn(self, name: str) -> int:
        fd = self._fns.get(name)
        if fd is None:
            bcc = import_bcc()
            fd = self._fns[name] = self._bpf.load_func(name.encode(), bcc.BPF.KPROBE).fd
        return fd

    def _anchor_pid(self) -> int:
        if self._anchor is None or self._anchor.poll() is not None:
            # Waits on a pipe until the probe detaches, or until this process dies in any
            # way (the pipe closes): it runs no hooked code meanwhile, so it never traps.
            # This interpreter, not a `sleep` binary the agent's image may not have.
            self._anchor = subprocess.Popen(
                [sys.executable, "-S", "-E", "-c", "import sys; sys.stdin.buffer.read()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                close_fds=True,
            )
        return self._anchor.pid

    def _events_of(self, path: str) -> list[_Event]:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        events = self._events.get(key)
        if events is not None:
            return events
        events = []
        try:
            for site in resolve_sites(path, self._hooks):
                for kind, fn in (("p", site.entry), ("r", site.ret)):
                    if fn is None:
                        continue
                    name = f"{kind}_{st.st_ino:x}_{site.offset:x}"
                    self._write_events(f"{kind}:{self._group}/{name} {path}:{site.offset:#x}")
                    event = _Event(name, -1, -1)
                    events.append(event)  # from here on removed again if anything fails
                    event.id = int(
                        (self._tracefs / "events" / self._group / name / "id").read_text()
                    )
                    event.anchor_fd = perf_event_open_tracepoint(event.id, self._anchor_pid())
                    _ioctl(event.anchor_fd, PERF_EVENT_IOC_SET_BPF, self._fn(fn))
                    _ioctl(event.anchor_fd, PERF_EVENT_IOC_ENABLE)
        except OSError:
            self._remove(events)
            raise
        self._events[key] = events
        return events

    def _write_events(self, line: str) -> None:
        write_uprobe_events(self._tracefs, line)

    def _attach(self, pid: int) -> None:
        path = libc_path(pid)
        if path is None:
            self.unhooked[pid] = "maps no libc (static, or gone)"
            log.warning("file uprobes: pid %d maps no libc: its file operations are not seen", pid)
            return
        fds: list[int] = []
        try:
            for event in self._events_of(path):
                fd = perf_event_open_tracepoint(event.id, pid)
                fds.append(fd)
                _ioctl(fd, PERF_EVENT_IOC_ENABLE)
        except OSError as exc:  # the process may have exited meanwhile
            hint = ""
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                hint = f" (is {self._tracefs} mounted read-write?)"
            log.warning("file uprobes: pid %d not hooked: %s%s", pid, exc, hint)
            for fd in fds:
                os.close(fd)
            self.unhooked[pid] = str(exc)
            return
        self._attached[pid] = fds
        tpoff = errno_tls_offset(pid, path)
        if tpoff is not None:
            table = self._bpf[b"errno_tls"]
            table[table.Key(pid)] = table.Leaf(tpoff)
        log.info("file uprobes: hooked pid %d (%d probes on %s)", pid, len(fds), path)

    def _detach(self, pid: int) -> None:
        fds = self._attached.pop(pid, [])
        table = self._bpf[b"errno_tls"]
        with contextlib.suppress(KeyError):
            del table[table.Key(pid)]
        for fd in fds:
            os.close(fd)  # the trace event lives on (the anchor holds it): no grace period
        if fds:
            log.info("file uprobes: unhooked pid %d", pid)

    def _remove(self, events: list[_Event]) -> None:
        for event in events:
            if event.anchor_fd >= 0:
                os.close(event.anchor_fd)  # the last user: the kernel waits a grace period here
            try:
                self._write_events(f"-:{self._group}/{event.name}")
            except OSError as exc:
                log.debug("file uprobes: removing %s: %s", event.name, exc)

    def close(self) -> None:
        """Unhook every process and remove the trace events."""
        for pid in list(self._attached):
            self._detach(pid)
        self._keys.clear()
        self.unhooked.clear()
        for events in self._events.values():
            self._remove(events)
        self._events.clear()
        if self._anchor is not None:
            self._anchor.kill()
            self._anchor.wait()
            if self._anchor.stdin is not None:
                self._anchor.stdin.close()
            self._anchor = None


def remove_stale_events(tracefs_dir: Path) -> None:
    """Remove the uprobe trace events of agents that are gone (killed before they could)."""
    try:
        lines = (tracefs_dir / "uprobe_events").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        match = re.match(r"[pr]:(zw(\d+)_\d+)/(\S+) ", line)
        if match is None or Path(f"/proc/{match.group(2)}").exists():
            continue
        try:
            write_uprobe_events(tracefs_dir, f"-:{match.group(1)}/{match.group(3)}")
        except OSError as exc:
            log.debug("file uprobes: removing stale %s: %s", line, exc)


def write_uprobe_events(tracefs_dir: Path, line: str) -> None:
    """One command to tracefs's uprobe_events (appended: a plain open would clear every
    uprobe event on the host, Python's append mode seeks, which tracefs refuses)."""
    fd = os.open(tracefs_dir / "uprobe_events", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
