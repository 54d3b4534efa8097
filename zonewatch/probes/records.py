"""The Python mirror of bpf/zonewatch.h: record layouts, op codes and the decoder registry.

This is the one place the C structs are mirrored; tests/integration/test_records_layout.py
checks sizes and offsets against bcc's view of the compiled program.
"""

from __future__ import annotations

import ctypes
import enum
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

ZW_COMM_LEN = 16
ZW_PATH_MAX = 256


class RecordType(enum.IntEnum):
    FILE = 1
    KVM = 2
    NET = 3
    PROC = 4


class FileOp(enum.IntEnum):
    OPEN = 1
    MKDIR = 2
    UNLINK = 3
    RMDIR = 4
    RENAME = 5
    LINK = 6
    SYMLINK = 7
    CHMOD = 8
    CHOWN = 9
    TRUNCATE = 10
    SETXATTR = 11
    MKNOD = 12
    READ = 13
    WRITE = 14
    CLOSE = 15


class LostSource(enum.IntEnum):
    RINGBUF = 0
    PENDING = 1


class ZwHdr(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_uint16),
        ("size", ctypes.c_uint16),
        ("zone_key", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("comm", ctypes.c_char * ZW_COMM_LEN),
    )


class ZwFileEvent(ctypes.Structure):
    _fields_ = (
        ("hdr", ZwHdr),
        ("op", ctypes.c_uint32),
        ("dirfd", ctypes.c_int32),
        ("dirfd2", ctypes.c_int32),
        ("mode", ctypes.c_uint32),
        ("ret", ctypes.c_int64),
        ("flags", ctypes.c_uint64),
        ("bytes_read", ctypes.c_uint64),
        ("bytes_written", ctypes.c_uint64),
        ("path", ctypes.c_char * ZW_PATH_MAX),
        ("path2", ctypes.c_char * ZW_PATH_MAX),
    )


class ZwFdKey(ctypes.Structure):
    _fields_ = (("pid", ctypes.c_uint32), ("fd", ctypes.c_int32))


class ZwFdState(ctypes.Structure):
    _fields_ = (
        ("bytes_read", ctypes.c_uint64),
        ("bytes_written", ctypes.c_uint64),
        ("zone_key", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    )


# Every mirrored struct by its C name, for the layout check.
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "zw_hdr": ZwHdr,
    "zw_file_event": ZwFileEvent,
    "zw_fd_key": ZwFdKey,
    "zw_fd_state": ZwFdState,
}


def c_string(raw: bytes) -> bytes:
    """A NUL-terminated C buffer as bytes (still undecoded: guests choose these bytes)."""
    return raw.partition(b"\0")[0]


# Decoding reads records with struct, not ctypes: one unpack_from per record hands back
# every field at once (a ctypes from_buffer_copy plus an attribute read per field cost
# three times as much). The struct formats are derived from the ctypes mirrors, so the
# mirrors stay the one description of the layout that the layout test checks.
_SCALARS: dict[type[Any], str] = {
    ctypes.c_int8: "b", ctypes.c_uint8: "B", ctypes.c_int16: "h", ctypes.c_uint16: "H",
    ctypes.c_int32: "i", ctypes.c_uint32: "I", ctypes.c_int64: "q", ctypes.c_uint64: "Q",
}  # fmt: skip


def struct_layout(cls: type[ctypes.Structure], prefix: str = "") -> tuple[str, list[str]]:
    """A mirrored struct as a struct format (native byte order, padding explicit) and the
    name of each item unpacking yields, nested fields as `hdr.pid`. Byte arrays (c_char,
    c_uint8) are one bytes item each, other arrays one item per element (`args.0`)."""
    fmt: list[str] = []
    names: list[str] = []
    pos = 0
    for entry in cls._fields_:
        name, ctype = entry[0], entry[1]
        offset = getattr(cls, name).offset
        if offset > pos:
            fmt.append(f"{offset - pos}x")
        full = prefix + name
        if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
            sub, sub_names = struct_layout(ctype, full + ".")
            fmt.append(sub)
            names += sub_names
        elif isinstance(ctype, type) and issubclass(ctype, ctypes.Array):
            elem: Any = getattr(ctype, "_type_")  # noqa: B009 (typeshed types these oddly)
            length: int = getattr(ctype, "_length_")  # noqa: B009
            if elem in (ctypes.c_char, ctypes.c_uint8):
                fmt.append(f"{length}s")
                names.append(full)
            else:
                fmt.append(f"{length}{_SCALARS[elem]}")
                names += [f"{full}.{i}" for i in range(length)]
        else:
            fmt.append(_SCALARS[ctype])
            names.append(full)
        pos = offset + ctypes.sizeof(ctype)
    if ctypes.sizeof(cls) > pos:
        fmt.append(f"{ctypes.sizeof(cls) - pos}x")
    return "".join(fmt), names


def unpacker(cls: type[ctypes.Structure], expect: Iterable[str]) -> struct.Struct:
    """The struct of a mirror, checked to unpack exactly the items `expect` names, in
    order (a decoder unpacks them positionally: a mirror change must not shift them)."""
    fmt, names = struct_layout(cls)
    if names != list(expect):
        raise AssertionError(f"{cls.__name__} unpacks {names}, decoder expects {list(expect)}")
    packed = struct.Struct("=" + fmt)
    assert packed.size == ctypes.sizeof(cls), cls.__name__
    return packed


def _by_code(op_enum: type[enum.IntEnum]) -> Callable[[int], Any]:
    """An enum's members by code; an unknown code raises ValueError, as the enum does."""
    members = {int(m): m for m in op_enum}

    def member(code: int) -> Any:
        found = members.get(code)
        if found is None:
            raise ValueError(f"{code} is not a valid {op_enum.__name__}")
        return found

    return member


_HDR_TYPE = struct.Struct("=H")
_HDR_NAMES = ("hdr.type", "hdr.size", "hdr.zone_key", "hdr.ts_ns", "hdr.pid", "hdr.tid", "hdr.comm")


@dataclass(slots=True)
class FileRecord:
    """A decoded file record, before attribution and path resolution."""

    zone_key: int
    ts_mono_ns: int
    pid: int
    tid: int
    comm: bytes
    op: FileOp
    dirfd: int
    dirfd2: int
    mode: int
    ret: int
    flags: int
    bytes_read: int
    bytes_written: int
    path: bytes
    path2: bytes


_FILE = unpacker(
    ZwFileEvent,
    (*_HDR_NAMES, "op", "dirfd", "dirfd2", "mode", "ret", "flags", "bytes_read",
     "bytes_written", "path", "path2"),
)  # fmt: skip
_file_op = _by_code(FileOp)


def decode_file(data: bytes) -> FileRecord:
    (_, _, zone_key, ts, pid, tid, comm, op, dirfd, dirfd2, mode, ret, flags, bytes_read,
     bytes_written, path, path2) = _FILE.unpack_from(data)  # fmt: skip
    return FileRecord(
        zone_key, ts, pid, tid, comm.partition(b"\0")[0], _file_op(op), dirfd, dirfd2, mode,
        ret, flags, bytes_read, bytes_written, path.partition(b"\0")[0],
        path2.partition(b"\0")[0],
    )  # fmt: skip


class ZoneRecord(Protocol):
    """What every decoded record carries: the zone key the kernel filter matched."""

    @property
    def zone_key(self) -> int: ...


Record = FileRecord
DECODERS: dict[int, tuple[int, Callable[[bytes], Record]]] = {
    RecordType.FILE: (ctypes.sizeof(ZwFileEvent), decode_file),
}


@dataclass(slots=True)
class DecodeErrors:
    """Records that could not be decoded, by reason: counted and reported, never a crash."""

    short: int = 0
    unknown_type: int = 0
    bad_value: int = 0
    by_type: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.short + self.unknown_type + self.bad_value


R = TypeVar("R")
_HDR_SIZE = ctypes.sizeof(ZwHdr)


def decode_with(
    registry: Mapping[int, tuple[int, Callable[[bytes], R]]], data: bytes, errors: DecodeErrors
) -> R | None:
    """Decode one record through `registry`, keyed by its header's type: short, unknown
    and bad records are counted, not raised."""
    if len(data) < _HDR_SIZE:
        errors.short += 1
        return None
    (rtype,) = _HDR_TYPE.unpack_from(data)
    entry = registry.get(rtype)
    if entry is None:
        errors.unknown_type += 1
        errors.by_type[rtype] = errors.by_type.get(rtype, 0) + 1
        return None
    size, decoder = entry
    if len(data) < size:
        errors.short += 1
        return None
    try:
        return decoder(data)  # decoders read the first `size` bytes only
    except ValueError:  # an op code this build does not know
        errors.bad_value += 1
        return None


def decode_all(
    registry: Mapping[int, tuple[int, Callable[[bytes], R]]],
    batch: Iterable[bytes],
    errors: DecodeErrors,
) -> list[R]:
    """decode_with() over a batch of records (a ring buffer's drain), in order; the records
    that do not decode are counted in `errors` and left out."""
    out: list[R] = []
    append = out.append
    get = registry.get
    unpack_type = _HDR_TYPE.unpack_from
    for data in batch:
        n = len(data)
        if n < _HDR_SIZE:
            errors.short += 1
            continue
        (rtype,) = unpack_type(data)
        entry = get(rtype)
        if entry is None or n < entry[0]:
            decode_with(registry, data, errors)  # counts why
            continue
        try:
            append(entry[1](data))
        except ValueError:
            errors.bad_value += 1
    return out


def decode(data: bytes, errors: DecodeErrors) -> Record | None:
    """A file-channel record (the DECODERS registry)."""
    return decode_with(DECODERS, data, errors)


# ==== kvm and sched channels (bpf/kvm.c, bpf/sched.c) ====================================
# Their frequent facts are counted in kernel maps; the map keys and values below are part of
# the wire contract, mirrored like the records. Only sampled kvm records use the registry.


class CountLostSource(enum.IntEnum):
    """enum zw_count_lost_source: the `lost` per-CPU array slots of the counting channels."""

    RINGBUF = 0
    MAP_FULL = 1
    RATE_LIMITED = 2
    STATE_FULL = 3


class KvmOp(enum.IntEnum):
    """enum zw_kvm_op: what a sampled kvm record reports."""

    HYPERCALL = 1
    HV_HYPERCALL = 2
    XEN_HYPERCALL = 3
    MSR_WRITE = 4


KVM_F_FAULT = 1  # the MSR access raised #GP
KVM_F_FAST = 2  # a Hyper-V "fast" hypercall (arguments in registers)
KVM_KEY_OTHER = 1  # a pio/mmio/counters key holding a zone's keys past its budget


class KvmCounter(enum.IntEnum):
    """enum zw_kvm_counter: the kinds of the kvm `counters` map."""

    HYPERCALL = 1
    MSR_READ = 2
    MSR_WRITE = 3
    MSR_READ_GP = 4
    MSR_WRITE_GP = 5
    EMULATE = 6
    EMULATE_FAILED = 7
    CPUID = 8
    HV_HYPERCALL = 9
    XEN_HYPERCALL = 10


class MmioAccess(enum.IntEnum):
    """enum zw_kvm_mmio_access: kvm_mmio's `type`, plus fast (ioeventfd) writes."""

    UNSATISFIED_READ = 0
    READ = 1
    WRITE = 2
    FAST_WRITE = 3


class HistKind(enum.IntEnum):
    """enum zw_hist_kind: which latency a log2 histogram holds."""

    KVM_EXIT = 1
    KVM_USERSPACE = 2
    RUN_DELAY = 3


class SchedTotal(enum.IntEnum):
    """enum zw_sched_total: the kinds of the sched `totals` map."""

    RUN_DELAY = 1
    VCPU_ONCPU = 2
    OTHER_ONCPU = 3


class ZwKvmEvent(ctypes.Structure):
    _fields_ = (
        ("hdr", ZwHdr),
        ("op", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("code", ctypes.c_uint64),
        ("args", ctypes.c_uint64 * 6),
    )


class ZwSum(ctypes.Structure):
    _fields_ = (("count", ctypes.c_uint64), ("total", ctypes.c_uint64))


class ZwKvmExitKey(ctypes.Structure):
    _fields_ = (
        ("zone_key", ctypes.c_uint32),
        ("vcpu_id", ctypes.c_uint32),
        ("reason", ctypes.c_uint32),
        ("isa", ctypes.c_uint32),
    )


class ZwKvmUexitKey(ctypes.Structure):
    _fields_ = (
        ("zone_key", ctypes.c_uint32),
        ("reason", ctypes.c_uint32),
        ("err", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    )


class ZwKvmPioKey(ctypes.Structure):
    _fields_ = (
        ("zone_key", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("dir", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
    )


class ZwKvmMmioKey(ctypes.Structure):
    _fields_ = (
        ("zone_key", ctypes.c_uint32),
        ("access", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("page", ctypes.c_uint64),
    )


class ZwKvmCtrKey(ctypes.Structure):
    _fields_ = (
        ("zone_key", ctypes.c_uint32),
        ("kind", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("code", ctypes.c_uint64),
    )


class ZwHistKey(ctypes.Structure):
    _fields_ = (
        ("zone_key", ctypes.c_uint32),
        ("kind", ctypes.c_uint16),
        ("slot", ctypes.c_uint16),
    )


class ZwSchedKey(ctypes.Structure):
    _fields_ = (("zone_key", ctypes.c_uint32), ("kind", ctypes.c_uint32))


ZW_HIST_SLOTS = 48


class ZwVcpuState(ctypes.Structure):
    _fields_ = (
        ("exit_ts", ctypes.c_uint64),
        ("uexit_ts", ctypes.c_uint64),
        ("zone_key", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("emulated", ctypes.c_uint64),
        ("emulate_failed", ctypes.c_uint64),
        ("exit_lat", ctypes.c_uint64 * ZW_HIST_SLOTS),
        ("user_lat", ctypes.c_uint64 * ZW_HIST_SLOTS),
    )


class ZwWaitState(ctypes.Structure):
    _fields_ = (
        ("since_ns", ctypes.c_uint64),
        ("zone_key", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    )


MIRRORS.update(
    {
        "zw_kvm_event": ZwKvmEvent,
        "zw_sum": ZwSum,
        "zw_kvm_exit_key": ZwKvmExitKey,
        "zw_kvm_uexit_key": ZwKvmUexitKey,
        "zw_kvm_pio_key": ZwKvmPioKey,
        "zw_kvm_mmio_key": ZwKvmMmioKey,
        "zw_kvm_ctr_key": ZwKvmCtrKey,
        "zw_hist_key": ZwHistKey,
        "zw_sched_key": ZwSchedKey,
        "zw_vcpu_state": ZwVcpuState,
        "zw_wait_state": ZwWaitState,
    }
)


@dataclass(slots=True)
class KvmRecord:
    """A sampled kvm record (hypercall or MSR write), before attribution."""

    zone_key: int
    ts_mono_ns: int
    pid: int
    tid: int
    comm: bytes
    op: KvmOp
    flags: int
    code: int  # hypercall number / Hyper-V call code, or MSR index
    args: tuple[int, ...]  # hypercall arguments; for an MSR write, (value, 0, ...)

    @property
    def faulted(self) -> bool:
        return bool(self.flags & KVM_F_FAULT)


_KVM = unpacker(ZwKvmEvent, (*_HDR_NAMES, "op", "flags", "code", *(f"args.{i}" for i in range(6))))
_kvm_op = _by_code(KvmOp)


def decode_kvm(data: bytes) -> KvmRecord:
    t = _KVM.unpack_from(data)
    return KvmRecord(
        zone_key=t[2],
        ts_mono_ns=t[3],
        pid=t[4],
        tid=t[5],
        comm=c_string(t[6]),
        op=_kvm_op(t[7]),
        flags=t[8],
        code=t[9],
        args=t[10:16],
    )


# The kvm channel's registry. `decode()` above serves the file channel's `Record`; when the
# pipeline dispatches on record type, these entries can join DECODERS.
KVM_DECODERS: dict[int, tuple[int, Callable[[bytes], KvmRecord]]] = {
    RecordType.KVM: (ctypes.sizeof(ZwKvmEvent), decode_kvm),
}


# ==== net channel (bpf/net.c) ============================================================
# Flow and DNS records from the tc programs on zones' taps, and the flow table and per-zone
# counter maps user space reads each interval.

ZW_DNS_MAX = 512


class NetDir(enum.IntEnum):
    """enum zw_net_dir: a packet's direction from the zone's point of view."""

    EGRESS = 1  # the zone sent it
    INGRESS = 2  # sent to the zone


class NetOp(enum.IntEnum):
    """enum zw_net_op."""

    FLOW_START = 1
    FLOW_END = 2
    DNS = 3


FLOW_FIN_EGRESS = 1
FLOW_FIN_INGRESS = 2
FLOW_ENDED = 4


class ZwFlowKey(ctypes.Structure):
    _fields_ = (
        ("zone_key", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("_pad", ctypes.c_uint16),
        ("local_ip", ctypes.c_uint8 * 16),
        ("remote_ip", ctypes.c_uint8 * 16),
    )


class ZwFlowStats(ctypes.Structure):
    _fields_ = (
        ("first_ns", ctypes.c_uint64),
        ("last_ns", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64 * 2),
        ("packets", ctypes.c_uint64 * 2),
        ("payload", ctypes.c_uint64 * 2),
        ("ifindex", ctypes.c_uint32),
        ("initiator", ctypes.c_uint32),
        ("tcp_flags", ctypes.c_uint64),
        ("state", ctypes.c_uint64),
    )


# bpf/net.c's netns_id() until user space patches the program instance (ZW_NETNS_UNPATCHED).
NETNS_UNPATCHED = 0x5A57A5A5D1CEC0DE


class ZwNetIfKey(ctypes.Structure):
    _fields_ = (
        ("netns", ctypes.c_uint64),
        ("ifindex", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    )


class ZwNetIf(ctypes.Structure):
    _fields_ = (
        ("zone_key", ctypes.c_uint32),
        ("slot", ctypes.c_uint32),
        ("tap_ifindex", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    )


class ZwNetCounters(ctypes.Structure):
    _fields_ = (
        ("bytes", ctypes.c_uint64 * 2),
        ("packets", ctypes.c_uint64 * 2),
        ("new_flows", ctypes.c_uint64),
        ("dns_queries", ctypes.c_uint64),
        ("malformed", ctypes.c_uint64),
        ("truncated", ctypes.c_uint64),
        ("fragments", ctypes.c_uint64),
        ("other", ctypes.c_uint64),
    )


class ZwNetEvent(ctypes.Structure):
    _fields_ = (
        ("hdr", ZwHdr),
        ("op", ctypes.c_uint32),
        ("dir", ctypes.c_uint16),
        ("dns_len", ctypes.c_uint16),
        ("key", ZwFlowKey),
        ("_pad", ctypes.c_uint32),
        ("flow", ZwFlowStats),
        ("dns", ctypes.c_uint8 * ZW_DNS_MAX),
    )


MIRRORS.update(
    {
        "zw_flow_key": ZwFlowKey,
        "zw_flow_stats": ZwFlowStats,
        "zw_net_if_key": ZwNetIfKey,
        "zw_net_if": ZwNetIf,
        "zw_net_counters": ZwNetCounters,
        "zw_net_event": ZwNetEvent,
    }
)


@dataclass(slots=True, frozen=True)
class FlowKey:
    """A flow from the zone's side: local is the zone's end. Addresses are 4 or 16 bytes."""

    zone_key: int
    family: int  # 4 or 6
    proto: int  # IPPROTO_*
    local_ip: bytes
    local_port: int
    remote_ip: bytes
    remote_port: int


@dataclass(slots=True)
class FlowTotals:
    """A flow's totals; tx is what the zone sent, rx what it was sent."""

    first_mono_ns: int
    last_mono_ns: int
    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int
    tx_payload: int
    rx_payload: int
    ifindex: int
    initiator: NetDir
    tcp_flags: int
    state: int

    @property
    def ended(self) -> bool:
        return bool(self.state & FLOW_ENDED)


def flow_key(raw: ZwFlowKey) -> FlowKey:
    width = 4 if raw.family == 4 else 16
    return FlowKey(
        zone_key=raw.zone_key,
        family=raw.family,
        proto=raw.proto,
        local_ip=bytes(raw.local_ip)[:width],
        local_port=raw.local_port,
        remote_ip=bytes(raw.remote_ip)[:width],
        remote_port=raw.remote_port,
    )


def flow_totals(raw: ZwFlowStats) -> FlowTotals:
    """Raises ValueError for an initiator this build does not know."""
    return FlowTotals(
        first_mono_ns=raw.first_ns,
        last_mono_ns=raw.last_ns,
        tx_bytes=raw.bytes[0],
        rx_bytes=raw.bytes[1],
        tx_packets=raw.packets[0],
        rx_packets=raw.packets[1],
        tx_payload=raw.payload[0],
        rx_payload=raw.payload[1],
        ifindex=raw.ifindex,
        initiator=NetDir(raw.initiator),
        tcp_flags=raw.tcp_flags,
        state=raw.state,
    )


@dataclass(slots=True)
class NetRecord:
    """A decoded net record (flow start or end, DNS query), before attribution.

    `dns` holds the guest's DNS message as copied (undecoded: the guest chose every byte).
    Flow ends found idle by user space are NetRecords too, with `idle` set.
    """

    zone_key: int
    ts_mono_ns: int
    op: NetOp
    dir: NetDir
    key: FlowKey
    flow: FlowTotals
    dns: bytes = b""
    idle: bool = False


_NET = unpacker(
    ZwNetEvent,
    (*_HDR_NAMES, "op", "dir", "dns_len", "key.zone_key", "key.family", "key.proto",
     "key.local_port", "key.remote_port", "key._pad", "key.local_ip", "key.remote_ip", "_pad",
     "flow.first_ns", "flow.last_ns", "flow.bytes.0", "flow.bytes.1", "flow.packets.0",
     "flow.packets.1", "flow.payload.0", "flow.payload.1", "flow.ifindex", "flow.initiator",
     "flow.tcp_flags", "flow.state", "dns"),
)  # fmt: skip
_net_op = _by_code(NetOp)
_net_dir = _by_code(NetDir)


def decode_net(data: bytes) -> NetRecord:
    (_, _, zone_key, ts, _, _, _, op, direction, dns_len, k_zone, family, proto, lport,
     rport, _, lip, rip, _, first, last, tx_b, rx_b, tx_p, rx_p, tx_pl, rx_pl, ifindex,
     initiator, tcp_flags, state, dns) = _NET.unpack_from(data)  # fmt: skip
    width = 4 if family == 4 else 16
    return NetRecord(
        zone_key,
        ts,
        _net_op(op),
        _net_dir(direction),
        FlowKey(k_zone, family, proto, lip[:width], lport, rip[:width], rport),
        FlowTotals(
            first,
            last,
            tx_b,
            rx_b,
            tx_p,
            rx_p,
            tx_pl,
            rx_pl,
            ifindex,
            _net_dir(initiator),
            tcp_flags,
            state,
        ),
        dns[: min(dns_len, ZW_DNS_MAX)],
    )


NET_DECODERS: dict[int, tuple[int, Callable[[bytes], NetRecord]]] = {
    RecordType.NET: (ctypes.sizeof(ZwNetEvent), decode_net),
}


# ==== proc channel (bpf/proc.c) ===========================================================
# What zones' VMM and backend processes (and what they spawn) do themselves: one record per
# call, rare by nature.

ZW_ARGS_MAX = 512


class ProcOp(enum.IntEnum):
    """enum zw_proc_op."""

    EXEC = 1
    FORK = 2
    EXIT = 3
    PTRACE = 4
    MOUNT = 5
    SETUID = 6
    SETGID = 7
    CAPSET = 8
    MODULE_LOAD = 9
    BPF = 10
    MEMFD = 11
    CONNECT = 12
    BIND = 13
    MOVE_MOUNT = 14
    SETNS = 15
    UNSHARE = 16
    CHROOT = 17
    PIVOT_ROOT = 18
    OPEN_BY_HANDLE = 19
    PROCESS_VM_READV = 20
    PROCESS_VM_WRITEV = 21
    PIDFD_GETFD = 22
    IO_URING_SETUP = 23
    USERFAULTFD = 24
    KEXEC_LOAD = 25
    PERF_EVENT_OPEN = 26
    KEXEC_FILE_LOAD = 27


PROC_F_SPAWNED = 1  # spawned by a zone process, followed by the kernel


class ZwProcEvent(ctypes.Structure):
    _fields_ = (
        ("hdr", ZwHdr),
        ("op", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ret", ctypes.c_int64),
        ("ppid", ctypes.c_uint32),
        ("target_pid", ctypes.c_uint32),
        ("arg", ctypes.c_uint64 * 3),
        ("addr", ctypes.c_uint8 * 16),
        ("args_len", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("pcomm", ctypes.c_char * ZW_COMM_LEN),
        # Bytes, not c_char: ctypes cuts c_char arrays at the first NUL, and these hold
        # NUL-separated argv and abstract AF_UNIX names (which start with NUL).
        ("path", ctypes.c_uint8 * ZW_PATH_MAX),
        ("path2", ctypes.c_char * ZW_PATH_MAX),
        ("args", ctypes.c_uint8 * ZW_ARGS_MAX),
    )


class ZwProcParent(ctypes.Structure):
    _fields_ = (
        ("ppid", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("pcomm", ctypes.c_char * ZW_COMM_LEN),
    )


MIRRORS.update({"zw_proc_event": ZwProcEvent, "zw_proc_parent": ZwProcParent})


@dataclass(slots=True)
class ProcRecord:
    """A decoded proc record, before attribution. Byte strings are as the process passed
    them (undecoded: a taken-over VMM chooses them)."""

    zone_key: int
    ts_mono_ns: int
    pid: int
    tid: int
    comm: bytes
    op: ProcOp
    flags: int
    ret: int
    ppid: int
    target_pid: int
    arg: tuple[int, int, int]
    addr: bytes
    pcomm: bytes
    path: bytes
    path2: bytes
    args: bytes  # NUL-separated (exec argv; mount: the fstype)

    @property
    def spawned(self) -> bool:
        return bool(self.flags & PROC_F_SPAWNED)


_PROC = unpacker(
    ZwProcEvent,
    (*_HDR_NAMES, "op", "flags", "ret", "ppid", "target_pid", "arg.0", "arg.1", "arg.2",
     "addr", "args_len", "_pad", "pcomm", "path", "path2", "args"),
)  # fmt: skip
_proc_op = _by_code(ProcOp)


def decode_proc(data: bytes) -> ProcRecord:
    (_, _, zone_key, ts, pid, tid, comm, op, flags, ret, ppid, target_pid, a0, a1, a2, addr,
     args_len, _, pcomm, path, path2, args) = _PROC.unpack_from(data)  # fmt: skip
    return ProcRecord(
        zone_key=zone_key,
        ts_mono_ns=ts,
        pid=pid,
        tid=tid,
        comm=c_string(comm),
        op=_proc_op(op),
        flags=flags,
        ret=ret,
        ppid=ppid,
        target_pid=target_pid,
        arg=(a0, a1, a2),
        addr=addr,
        pcomm=c_string(pcomm),
        # AF_UNIX paths are fixed-size (an abstract name starts with NUL): kept whole here.
        path=path,
        path2=c_string(path2),
        args=args[: min(args_len, ZW_ARGS_MAX)],
    )


PROC_DECODERS: dict[int, tuple[int, Callable[[bytes], ProcRecord]]] = {
    RecordType.PROC: (ctypes.sizeof(ZwProcEvent), decode_proc),
}
