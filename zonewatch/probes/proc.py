"""The proc channel's probe: bpf/proc.c, what zones' VMM and backend processes do themselves.

Exec, fork and exit come from scheduler/task tracepoints, which cost unrelated syscalls
nothing. The rest (ptrace, mount, set*id, capset, module loads, bpf, memfd_create, connect,
bind, and execve's argv) needs syscall tracepoints, which put every syscall on the host on
the traced slow path: `syscalls=False` (`zonewatch run --no-proc-syscalls`) leaves them out.

Processes a zone process spawns are followed by the kernel (added to its filter at fork,
dropped at exit) and marked `spawned`. Opens outside a zone's shares come from the file
channel (`outside_share_event`), so no second openat tracepoint is needed here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zonewatch.errors import EnvironmentProblem
from zonewatch.model import FileEvent, ProcEvent, Zone, ZoneRef, zone_pids
from zonewatch.probes.base import ZonePidFilter, sum_percpu
from zonewatch.probes.loader import (
    load_program,
    syscall_tracepoint_defines,
    tracepoint_defines,
    tracepoint_fields,
    unload_program,
)
from zonewatch.probes.maps import RecordRingReader
from zonewatch.probes.records import (
    PROC_DECODERS,
    CountLostSource,
    ProcOp,
    ProcRecord,
    c_string,
)

log = logging.getLogger(__name__)

# The syscalls whose enter and exit tracepoints bpf/proc.c hooks (each -DZW_TP_<name>).
PROC_SYSCALLS = (
    "execve", "execveat", "ptrace", "mount", "move_mount",
    "setuid", "setreuid", "setresuid", "setgid", "setregid", "setresgid", "capset",
    "init_module", "finit_module", "bpf", "memfd_create", "connect", "bind",
)  # fmt: skip
# The tracepoints of the cheap half: without them there is no proc channel at all.
BASE_TRACEPOINTS = (
    ("task", "task_newtask"),
    ("sched", "sched_process_exec"),
    ("sched", "sched_process_exit"),
)
OP_NAMES = {
    ProcOp.EXEC: "exec",
    ProcOp.FORK: "fork",
    ProcOp.EXIT: "exit",
    ProcOp.PTRACE: "ptrace",
    ProcOp.MOUNT: "mount",
    ProcOp.MOVE_MOUNT: "mount",
    ProcOp.SETUID: "setuid",
    ProcOp.SETGID: "setgid",
    ProcOp.CAPSET: "capset",
    ProcOp.MODULE_LOAD: "module_load",
    ProcOp.BPF: "bpf",
    ProcOp.MEMFD: "memfd_create",
    ProcOp.CONNECT: "connect",
    ProcOp.BIND: "bind",
}
# Keyed by the code (never a positional table): include/uapi/linux/ptrace.h.
PTRACE_REQUESTS = {
    0: "PTRACE_TRACEME", 1: "PTRACE_PEEKTEXT", 2: "PTRACE_PEEKDATA", 3: "PTRACE_PEEKUSR",
    4: "PTRACE_POKETEXT", 5: "PTRACE_POKEDATA", 6: "PTRACE_POKEUSR", 7: "PTRACE_CONT",
    8: "PTRACE_KILL", 9: "PTRACE_SINGLESTEP", 12: "PTRACE_GETREGS", 13: "PTRACE_SETREGS",
    16: "PTRACE_ATTACH", 17: "PTRACE_DETACH", 24: "PTRACE_SYSCALL",
    0x4200: "PTRACE_SETOPTIONS", 0x4206: "PTRACE_SEIZE", 0x4207: "PTRACE_INTERRUPT",
}  # fmt: skip
# include/uapi/linux/bpf.h enum bpf_cmd.
BPF_COMMANDS = {
    0: "BPF_MAP_CREATE", 1: "BPF_MAP_LOOKUP_ELEM", 2: "BPF_MAP_UPDATE_ELEM",
    3: "BPF_MAP_DELETE_ELEM", 4: "BPF_MAP_GET_NEXT_KEY", 5: "BPF_PROG_LOAD", 6: "BPF_OBJ_PIN",
    7: "BPF_OBJ_GET", 8: "BPF_PROG_ATTACH", 9: "BPF_PROG_DETACH", 10: "BPF_PROG_TEST_RUN",
    11: "BPF_PROG_GET_NEXT_ID", 12: "BPF_MAP_GET_NEXT_ID", 13: "BPF_PROG_GET_FD_BY_ID",
    14: "BPF_MAP_GET_FD_BY_ID", 15: "BPF_OBJ_GET_INFO_BY_FD", 16: "BPF_PROG_QUERY",
    17: "BPF_RAW_TRACEPOINT_OPEN", 18: "BPF_BTF_LOAD", 19: "BPF_BTF_GET_FD_BY_ID",
    20: "BPF_TASK_FD_QUERY", 21: "BPF_MAP_LOOKUP_AND_DELETE_ELEM", 22: "BPF_MAP_FREEZE",
    23: "BPF_BTF_GET_NEXT_ID", 24: "BPF_MAP_LOOKUP_BATCH",
    25: "BPF_MAP_LOOKUP_AND_DELETE_BATCH", 26: "BPF_MAP_UPDATE_BATCH",
    27: "BPF_MAP_DELETE_BATCH", 28: "BPF_LINK_CREATE", 29: "BPF_LINK_UPDATE",
    30: "BPF_LINK_GET_FD_BY_ID", 31: "BPF_LINK_GET_NEXT_ID", 32: "BPF_ENABLE_STATS",
    33: "BPF_ITER_CREATE", 34: "BPF_LINK_DETACH", 35: "BPF_PROG_BIND_MAP",
    36: "BPF_TOKEN_CREATE",
}  # fmt: skip
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
UNCHANGED_ID = 0xFFFFFFFF
OPEN_OPS = frozenset({"open", "create"})


def text(raw: bytes) -> str:
    """Bytes a process chose, as a str every sink survives (invalid UTF-8 escaped)."""
    return raw.decode("utf-8", "backslashreplace")


def _readlink(path: Path) -> str:
    try:
        return text(os.readlink(os.fsencode(path)))
    except OSError:  # gone already, or not ours to read
        return ""


def _comm(proc: Path, pid: int) -> str:
    try:
        return text((proc / str(pid) / "comm").read_bytes().rstrip(b"\n"))
    except OSError:
        return ""


def _cmdline(proc: Path, pid: int) -> str:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    return " ".join(text(a) for a in raw.rstrip(b"\0").split(b"\0"))


def _ppid(proc: Path, pid: int) -> int:
    try:
        stat = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return 0
    # The comm in parentheses may hold anything: fields start after its last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 else 0


def _nul_list(raw: bytes) -> list[str]:
    return [text(a) for a in raw.split(b"\0") if a]


def _sock_ip(rec: ProcRecord) -> str:
    """A connect/bind record's IPv4/IPv6 address as text; "" for other families."""
    if rec.arg[0] == AF_INET:
        return str(ipaddress.IPv4Address(rec.addr[:4]))
    if rec.arg[0] == AF_INET6:
        return str(ipaddress.IPv6Address(rec.addr[:16]))
    return ""


def _sockaddr(rec: ProcRecord) -> str:
    family, port = rec.arg[0], rec.arg[1]
    if family == AF_INET:
        return f"{_sock_ip(rec)}:{port}"
    if family == AF_INET6:
        return f"[{_sock_ip(rec)}]:{port}"
    if family == AF_UNIX:
        path = rec.path[:108]
        if path.startswith(b"\0"):  # abstract: shown as ss shows it
            return "@" + text(path[1:].rstrip(b"\0"))
        return text(c_string(path))
    return f"family {family}"


def _ids(rec: ProcRecord) -> str:
    return ",".join(str(i) for i in rec.arg if i != UNCHANGED_ID)


def proc_event(
    rec: ProcRecord,
    zone: Zone,
    wall_ns: int,
    proc: Path = Path("/proc"),
    ref: ZoneRef | None = None,
) -> ProcEvent:
    """A proc record as its zone's `proc` event (wall_ns: the record's time; ref: the
    zone's ZoneRef when the caller has it). /proc fills what the kernel could not see
    (argv without the execve tracepoint, names of pids)."""
    op = rec.op
    event = ProcEvent(
        ts_ns=wall_ns,
        zone=zone.ref if ref is None else ref,
        op=OP_NAMES[op],
        pid=rec.pid,
        tid=rec.tid,
        comm=text(rec.comm),
        ppid=rec.ppid,
        pcomm=text(rec.pcomm),
        ret=rec.ret,
        spawned=rec.spawned,
    )
    if op == ProcOp.EXEC:
        event.exe = text(c_string(rec.path))
        event.args = " ".join(_nul_list(rec.args)) or _cmdline(proc, rec.pid)
        if event.exe.startswith("/dev/fd/"):
            # exec of an fd (fexecve of a memfd: code that never was a file) names the file.
            event.target = _readlink(proc / str(rec.pid) / "exe")
        if not event.ppid:
            event.ppid = _ppid(proc, rec.pid)
            event.pcomm = _comm(proc, event.ppid) if event.ppid else ""
    elif op == ProcOp.FORK:
        # Told as the child's event (what rules ask of any spawned process: who started
        # what): the child runs its parent's program until it execs.
        event.pid = event.tid = rec.target_pid
        event.ppid, event.pcomm = rec.pid, event.comm
        event.exe = _readlink(proc / str(rec.pid) / "exe")
        event.spawned = True
    elif op == ProcOp.PTRACE:
        comm = _comm(proc, rec.target_pid)
        event.target = f"{rec.target_pid} ({comm})" if comm else str(rec.target_pid)
        event.args = PTRACE_REQUESTS.get(rec.arg[0], f"request {rec.arg[0]:#x}")
    elif op in (ProcOp.MOUNT, ProcOp.MOVE_MOUNT):
        event.target = text(c_string(rec.path))
        fstype = " ".join(_nul_list(rec.args))
        parts = [f"source={text(rec.path2)}"] if rec.path2 else []
        parts += [f"type={fstype}"] if fstype else []
        event.args = " ".join([*parts, f"flags={rec.arg[0]:#x}"])
    elif op in (ProcOp.SETUID, ProcOp.SETGID):
        event.target = _ids(rec)
    elif op == ProcOp.CAPSET:
        eff, perm, inh = rec.arg
        event.target = f"eff={eff:#x} perm={perm:#x} inh={inh:#x}"
    elif op == ProcOp.MODULE_LOAD:
        if rec.arg[0]:  # init_module: an image from memory, no file
            event.target = f"init_module ({rec.arg[0]} bytes)"
        else:
            fd = rec.arg[1]
            event.target = _readlink(proc / str(rec.pid) / "fd" / str(fd)) or f"fd {fd}"
        event.args = text(rec.path2)
    elif op == ProcOp.BPF:
        event.target = BPF_COMMANDS.get(rec.arg[0], f"cmd {rec.arg[0]}")
    elif op == ProcOp.MEMFD:
        event.target = text(c_string(rec.path))
    elif op in (ProcOp.CONNECT, ProcOp.BIND):
        event.target = _sockaddr(rec)
        event.sock_addr = _sock_ip(rec)
        event.sock_port = rec.arg[1] if event.sock_addr else 0
    return event


def outside_share_event(event: FileEvent) -> ProcEvent | None:
    """A zone process opening a host path outside every share of its zone, as the proc
    channel's `open_outside_share` (the file channel saw the open; None for the rest)."""
    if event.share or event.op not in OPEN_OPS or not event.host_path.startswith("/"):
        return None
    return ProcEvent(
        ts_ns=event.ts_ns,
        zone=event.zone,
        op="open_outside_share",
        pid=event.pid,
        tid=event.tid,
        comm=event.comm,
        target=event.host_path,
        ret=event.ret,
    )


class ProcProbe:
    """Loads bpf/proc.c; its records are what zone processes do themselves."""

    name = "proc"

    def __init__(self, *, syscalls: bool = True, ringbuf_pages: int = 64) -> None:
        self.syscalls = syscalls
        self._ringbuf_pages = ringbuf_pages
        self._bpf: Any = None
        self._filter: ZonePidFilter | None = None
        self._reader: RecordRingReader[ProcRecord] | None = None
        self._zone_keys: set[int] = set()
        self.missing: list[str] = []

    def attach(self) -> None:
        cflags: list[str] = []
        for category, event in BASE_TRACEPOINTS:
            flags, missing = tracepoint_defines(category, [event])
            if missing:
                raise EnvironmentProblem(f"{category}:{event}", "tracepoint missing")
            cflags += flags
        if "group_dead" in tracepoint_fields("sched", "sched_process_exit"):
            cflags.append("-DZW_EXIT_GROUP_DEAD=1")
        if self.syscalls:
            flags, self.missing = syscall_tracepoint_defines(PROC_SYSCALLS)
            cflags += flags
            exit_group, missing_exit = tracepoint_defines("syscalls", ["sys_enter_exit_group"])
            cflags += exit_group
            self.missing += missing_exit
            if self.missing:
                log.info(
                    "proc probe: no tracepoint for %s; those calls are not watched",
                    ", ".join(self.missing),
                )
        else:
            log.info("proc probe: exec, fork and exit only (no syscall tracepoints)")
        cflags.append(f"-DZW_RINGBUF_PAGES={self._ringbuf_pages}")
        self._bpf = load_program("proc.c", cflags)
        self._filter = ZonePidFilter(self._bpf[b"zone_pids"])
        self._reader = RecordRingReader(self._bpf, "events", PROC_DECODERS)

    @property
    def bpf(self) -> Any:
        return self._bpf

    def set_zones(self, zones: Sequence[Zone]) -> None:
        self._zone_keys = {z.key for z in zones}
        self.set_zone_pids(zone_pids(zones))

    def set_zone_pids(self, pids: Mapping[int, int]) -> None:
        assert self._filter is not None, "attach() first"
        self._filter.sync(pids)
        self._forget_orphans(set(pids.values()) | self._zone_keys)

    def _forget_orphans(self, keys: set[int]) -> None:
        """Followed processes of zones that are gone leave the filter (it stays bounded)."""
        table, spawned = self._bpf[b"zone_pids"], self._bpf[b"spawned"]
        for pid in list(spawned.keys()):
            zone = table.get(pid)
            if zone is None or zone.value not in keys:
                with contextlib.suppress(KeyError):
                    del table[pid]
                with contextlib.suppress(KeyError):
                    del spawned[pid]

    def followed(self) -> dict[int, int]:
        """Processes the kernel follows because a zone process spawned them -> parent."""
        assert self._bpf is not None, "attach() first"
        return {int(k.value): int(v.ppid) for k, v in self._bpf[b"spawned"].items()}

    def ring_fds(self) -> list[int]:
        return [self._reader.fd] if self._reader else []

    def poll(self, timeout_ms: int) -> list[ProcRecord]:
        assert self._reader is not None, "attach() first"
        return self._reader.poll(timeout_ms)

    def lost(self) -> dict[str, int]:
        if self._bpf is None or self._reader is None:
            return {}
        table = self._bpf[b"lost"]
        return {
            "proc.ringbuf": sum_percpu(table, CountLostSource.RINGBUF),
            "proc.unfollowed": sum_percpu(table, CountLostSource.MAP_FULL),
            "proc.pending": sum_percpu(table, CountLostSource.STATE_FULL),
            "proc.decode": self._reader.errors.total,
        }

    def detach(self) -> None:
        if self._bpf is not None:
            unload_program(self._bpf)
            self._bpf = None
            self._filter = None
            self._reader = None
