"""The file channel's probe, filtered by zone pid in the kernel, on one of two hooks:

tracepoints  bpf/file.c on syscall tracepoints (the default). A raw syscall cannot bypass
             them, but attaching any syscall tracepoint moves every syscall of every
             process on the host onto the traced slow path.
uprobes      bpf/file.c built with -DZW_FILE_UPROBES: uprobes on the libc wrappers of
             each zone process, attached when it appears and detached when it goes
             (zonewatch/probes/uprobes.py). Nothing else on the host pays; a backend that
             makes raw syscalls is not seen.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from zonewatch.model import Zone, zone_pids
from zonewatch.probes.base import ZonePidFilter, sum_percpu
from zonewatch.probes.loader import load_program, syscall_tracepoint_defines, unload_program
from zonewatch.probes.maps import MapReader, RecordRingReader
from zonewatch.probes.records import DECODERS, LostSource, Record
from zonewatch.probes.tls import task_fsbase_offset
from zonewatch.probes.uprobes import LIBC_HOOKS, STREAM_IO_HOOKS, LibcUprobes

log = logging.getLogger(__name__)

# The syscalls whose tracepoints bpf/file.c hooks (each behind -DZW_TP_<name>).
FILE_SYSCALLS = (
    "openat", "openat2", "open", "creat",
    "mkdirat", "mkdir", "mknodat", "unlinkat", "unlink", "rmdir",
    "renameat2", "renameat", "rename", "linkat", "symlinkat",
    "fchmodat", "fchmodat2", "fchmod", "fchownat", "fchown", "truncate", "ftruncate",
    "lsetxattr", "setxattr", "fsetxattr",
    "write", "pwrite64", "writev", "pwritev", "pwritev2",
    "read", "pread64", "readv", "preadv", "preadv2",
)  # fmt: skip
ENTER_ONLY_SYSCALLS = ("close",)

FileHooks = Literal["tracepoints", "uprobes"]
FILE_HOOKS: tuple[FileHooks, ...] = ("tracepoints", "uprobes")


class FileProbe:
    """Loads bpf/file.c (for uprobes with -DZW_FILE_UPROBES); its records are file
    operations of zone processes, the same records either way."""

    name = "file"

    def __init__(
        self,
        ringbuf_pages: int = 256,
        hooks: FileHooks = "tracepoints",
        uprobe_stream_io: bool = False,
    ) -> None:
        """`uprobe_stream_io`: with uprobes, also hook read/write/readv/writev (see
        zonewatch/probes/uprobes.py: a VMM calls them per eventfd wake-up and tap frame)."""
        if hooks not in FILE_HOOKS:
            raise ValueError(f"file hooks: {hooks!r} is none of {', '.join(FILE_HOOKS)}")
        self.hooks = hooks
        self._uprobe_hooks = LIBC_HOOKS + (STREAM_IO_HOOKS if uprobe_stream_io else ())
        self._ringbuf_pages = ringbuf_pages
        self._bpf: Any = None
        self._filter: ZonePidFilter | None = None
        self._maps = MapReader()
        self._reader: RecordRingReader[Record] | None = None
        self._uprobes: LibcUprobes | None = None
        self.missing: list[str] = []

    def attach(self) -> None:
        if self.hooks == "uprobes":
            cflags = ["-DZW_FILE_UPROBES=1", f"-DZW_RINGBUF_PAGES={self._ringbuf_pages}"]
            fsbase = task_fsbase_offset() if os.uname().machine == "x86_64" else None
            if fsbase is not None:  # failed calls report -errno (zonewatch/probes/tls.py)
                cflags.append(f"-DZW_TASK_FSBASE={fsbase}")
            self._bpf = load_program("file.c", cflags)
            self._uprobes = LibcUprobes(self._bpf, self._uprobe_hooks)
        else:
            self._bpf = load_program("file.c", self._tracepoint_cflags())
        self._filter = ZonePidFilter(self._bpf[b"zone_pids"])
        self._reader = RecordRingReader(self._bpf, "events", DECODERS)

    def _tracepoint_cflags(self) -> list[str]:
        cflags, self.missing = syscall_tracepoint_defines(FILE_SYSCALLS)
        # close has no exit probe; only its entry must exist.
        close_flags, missing_close = syscall_tracepoint_defines(ENTER_ONLY_SYSCALLS)
        cflags += close_flags
        self.missing += missing_close
        if self.missing:
            log.info(
                "file probe: no tracepoint for %s; those syscalls are not watched",
                ", ".join(self.missing),
            )
        cflags.append(f"-DZW_RINGBUF_PAGES={self._ringbuf_pages}")
        return cflags

    @property
    def bpf(self) -> Any:
        return self._bpf

    def set_zones(self, zones: Sequence[Zone]) -> None:
        self.set_zone_pids(zone_pids(zones))

    def set_zone_pids(self, pids: Mapping[int, int]) -> None:
        assert self._filter is not None, "attach() first"
        leaving = self._filter.leaving(pids)
        if leaving:  # before the filter takes a reused pid: no new entry can be made yet
            self._forget_fds(leaving)
        self._filter.sync(pids)
        if self._uprobes is not None:
            # After the filter: a process hooked is already a zone's, so its first call
            # is attributed.
            self._uprobes.sync(pids)

    def _forget_fds(self, pids: set[int]) -> None:
        """Drop the kernel's per-fd state of processes that left their zone: a process that
        died holding a traced file leaves its entry, which a reused pid's I/O on that fd
        number would otherwise count (and report) as the gone zone's."""
        fds = self._bpf[b"fds"]
        stale = [k for k, _v in self._maps.items(fds) if k.pid in pids]
        self._maps.delete(fds, stale)

    @property
    def hooked_pids(self) -> set[int]:
        """uprobes: the processes whose libc is hooked now (empty with tracepoints)."""
        return self._uprobes.pids if self._uprobes is not None else set()

    def ring_fds(self) -> list[int]:
        return [self._reader.fd] if self._reader else []

    def poll(self, timeout_ms: int) -> list[Record]:
        assert self._reader is not None, "attach() first"
        return self._reader.poll(timeout_ms)

    def lost(self) -> dict[str, int]:
        """Cumulative records lost, by source (kernel ring buffer, stash, decoding)."""
        if self._bpf is None or self._reader is None:
            return {}
        table = self._bpf[b"lost"]
        return {
            "file.ringbuf": sum_percpu(table, LostSource.RINGBUF),
            "file.pending": sum_percpu(table, LostSource.PENDING),
            "file.decode": self._reader.errors.total,
        }

    def detach(self) -> None:
        if self._uprobes is not None:
            self._uprobes.close()
            self._uprobes = None
        if self._bpf is not None:
            unload_program(self._bpf)
            self._bpf = None
            self._filter = None
            self._reader = None
