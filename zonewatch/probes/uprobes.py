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

import logging
import os
import queue
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zonewatch.probes.loader import import_bcc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LibcHook:
    entry: str  # program run at the call (bpf/file.c with -DZW_FILE_UPROBES)
    ret: str | None  # program run at the return, or None
    symbols: tuple[str, ...]  # libc names of the function (aliases share an address)


# read/write and friends take the fd first and return ssize_t.
WRITES = ("write", "pwrite64", "pwrite", "writev", "pwritev64", "pwritev", "pwritev64v2",
          "pwritev2")  # fmt: skip
READS = ("read", "pread64", "pread", "readv", "preadv64", "preadv", "preadv64v2", "preadv2")

# What QEMU's 9p local backend and virtiofsd call (`nm -D` of both: openat64, open64,
# mkdirat, renameat, unlinkat, fchmodat, lsetxattr, preadv64, pwritev64, close, ...),
# mirroring bpf/file.c's syscall list. The first hook naming an address wins: aliases
# (open/open64, pread/pread64, ...) are hooked once.
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
    LibcHook("zw_io", "zw_write_ret", WRITES),
    LibcHook("zw_io", "zw_read_ret", READS),
    LibcHook("zw_close", None, ("close",)),
)

_LIBC_NAME = re.compile(r"/libc(-[0-9.]+)?\.so(\.[0-9]+)*$")


def libc_path(pid: int) -> str | None:
    """The libc an existing process maps (executable), as a path this process can open
    (through /proc/PID/root when the process lives in another mount namespace)."""
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
            mine, theirs = os.stat(path), os.stat(rooted)
        except OSError:
            return rooted if os.path.exists(rooted) else None
        same = (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
        return path if same else rooted
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


@dataclass(slots=True)
class _Probe:
    fd: int
    event: bytes


class LibcUprobes:
    """Keeps uprobes on the libc of exactly the given processes (by pid).

    The perf events are this class's own (not bcc's table of them): removing a uprobe
    takes the kernel an RCU grace period under a host-wide mutex (~0.12 s measured on
    CI's VM, so ~8 s for a process's ~67 probes), so the events of a process that went
    are closed by a background thread, never in the agent's loop.
    """

    def __init__(self, bpf: Any) -> None:
        self._bpf = bpf
        self._lib = import_bcc().lib
        self._sites: dict[tuple[int, int], list[Site]] = {}  # (st_dev, st_ino) -> sites
        self._fns: dict[str, int] = {}  # program name -> loaded program fd
        self._attached: dict[int, list[_Probe]] = {}
        self.unhooked: dict[int, str] = {}  # pid -> why it has no uprobes
        self._closing: queue.SimpleQueue[list[_Probe] | None] = queue.SimpleQueue()
        self._closer: threading.Thread | None = None

    @property
    def pids(self) -> set[int]:
        return set(self._attached)

    def sync(self, pids: Iterable[int]) -> None:
        wanted = set(pids)
        for pid in set(self._attached) - wanted:
            self._detach(pid)
        for pid in set(self.unhooked) - wanted:
            del self.unhooked[pid]
        for pid in wanted - set(self._attached) - set(self.unhooked):
            self._attach(pid)

    def _sites_of(self, path: str) -> list[Site]:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key not in self._sites:
            self._sites[key] = resolve_sites(path)
        return self._sites[key]

    def _fn(self, name: str) -> int:
        fd = self._fns.get(name)
        if fd is None:
            bcc = import_bcc()
            fd = self._fns[name] = self._bpf.load_func(name.encode(), bcc.BPF.KPROBE).fd
        return fd

    def _attach(self, pid: int) -> None:
        path = libc_path(pid)
        if path is None:
            self.unhooked[pid] = "maps no libc (static, or gone)"
            log.warning("file uprobes: pid %d maps no libc: its file operations are not seen", pid)
            return
        probes: list[_Probe] = []
        try:
            for site in self._sites_of(path):
                for kind, fn in ((0, site.entry), (1, site.ret)):
                    if fn is None:
                        continue
                    # Unique on the host: other agents (and tests) hook the same pid too.
                    event = f"zw_{os.getpid()}_{pid}_{site.offset:x}_{'pr'[kind]}".encode()
                    fd = self._lib.bpf_attach_uprobe(
                        self._fn(fn), kind, event, path.encode(), site.offset, pid
                    )
                    if fd < 0:
                        raise OSError(-fd, f"attaching {site.symbol} ({fn}) failed")
                    probes.append(_Probe(fd, event))
        except (OSError, Exception) as exc:  # bcc raises bare Exception; the pid may be gone
            log.warning("file uprobes: pid %d not hooked: %s", pid, exc)
            self._close_later(probes)
            self.unhooked[pid] = str(exc)
            return
        self._attached[pid] = probes
        log.debug("file uprobes: %d probes on %s in pid %d", len(probes), path, pid)

    def _detach(self, pid: int) -> None:
        self._close_later(self._attached.pop(pid, []))

    def _close_later(self, probes: list[_Probe]) -> None:
        if not probes:
            return
        if self._closer is None:
            self._closer = threading.Thread(target=self._close_loop, name="zw-uprobe-close")
            self._closer.daemon = True
            self._closer.start()
        self._closing.put(probes)

    def _close_loop(self) -> None:
        while (probes := self._closing.get()) is not None:
            for probe in probes:
                self._lib.bpf_close_perf_event_fd(probe.fd)
                self._lib.bpf_detach_uprobe(probe.event)  # a no-op unless made in tracefs

    def close(self, wait: bool = True) -> None:
        """Detach every process's probes; with `wait`, return once they are all gone."""
        for pid in list(self._attached):
            self._detach(pid)
        if self._closer is not None:
            self._closing.put(None)
            if wait:
                self._closer.join()
            self._closer = None
