"""The typed records that flow through the pipeline: zones, events, lost counts.

Field names follow the JSON-lines contract of shared/design.md; `to_json()` on each record
yields exactly that shape.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

DEFAULT_TENANT = "default"


def visible_char(c: str) -> str:
    """A non-printable character as an escape; an invalid UTF-8 byte (a surrogate escape, as
    argv and paths decode it) as that byte."""
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def utf8_text(text: str) -> str:
    """`text` as valid UTF-8: invalid bytes that argv or a path decoded to surrogates become
    visible \\xNN escapes (as the file channel decodes paths), other lone surrogates
    \\uNNNN. For strings that reach JSON, protobuf and labels."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(visible_char(c) if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    return text


def utf8_all(value: Any) -> Any:
    """utf8_text over every string of a JSON-like value (tuples become lists)."""
    if isinstance(value, str):
        return utf8_text(value)
    if isinstance(value, dict):
        return {utf8_all(k): utf8_all(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [utf8_all(v) for v in value]
    return value


def json_bytes(obj: Any, option: int = 0) -> bytes:
    """orjson.dumps, never failing on a string that is not valid UTF-8 (a lone surrogate):
    such strings are escaped (utf8_text) instead. Nothing a guest names breaks a line."""
    try:
        return orjson.dumps(obj, option=option)
    except TypeError:
        return orjson.dumps(utf8_all(obj), option=option)


class Vmm(enum.StrEnum):
    QEMU = "qemu"
    KATA = "kata-qemu"
    FIRECRACKER = "firecracker"
    CLOUD_HYPERVISOR = "cloud-hypervisor"
    CROSVM = "crosvm"
    MICROVM = "zw-microvm"  # the lab's own micro-VMM on raw KVM ioctls


@dataclass(slots=True, frozen=True)
class Share:
    """A host folder the zone reaches through a device backend (9p or virtio-fs)."""

    tag: str  # the mount tag the guest mounts
    host_path: str
    backend: str  # "9p" or "virtiofs"
    guest_path: str = "/"  # where the guest sees the share's root


@dataclass(slots=True, frozen=True)
class NetNs:
    """The network namespace a zone's VMM (and so its taps) lives in."""

    inode: int  # the namespace's identity (stat of /proc/PID/ns/net) while it lives
    path: str  # where to enter it: /proc/<the VMM's pid>/ns/net


@dataclass(slots=True, frozen=True)
class ZoneRef:
    """What every event and alert carries about its zone (the `zone` JSON object)."""

    id: str
    name: str
    tenant: str
    vmm: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "tenant": self.tenant, "vmm": self.vmm}


@dataclass(slots=True)
class Zone:
    """One VM-isolated workload on this host, as the inventory sees it now."""

    id: str  # stable for this incarnation: vmm, pid and process start time
    key: int  # small integer used in kernel maps; never reused within an agent's life
    name: str
    tenant: str
    vmm: Vmm
    pid: int
    start_time: int  # /proc/PID/stat starttime (clock ticks since boot): tells pid reuse apart
    vcpu_tids: tuple[int, ...] = ()
    taps: tuple[str, ...] = ()
    shares: tuple[Share, ...] = ()
    disks: tuple[str, ...] = ()
    helper_pids: tuple[int, ...] = ()  # backend processes acting for the zone (virtiofsd)
    labels: dict[str, str] = field(default_factory=dict)
    netns: NetNs | None = None  # where its taps are; None: unknown, taken as the agent's own
    # Zone processes whose "/" is not the host's: pid -> the host directory it is (a jail;
    # the folder QEMU's virtiofsd pivoted into). Their paths are relative to it.
    process_roots: dict[int, str] = field(default_factory=dict)

    @property
    def ref(self) -> ZoneRef:
        return ZoneRef(self.id, self.name, self.tenant, str(self.vmm))

    @property
    def pids(self) -> tuple[int, ...]:
        """Every process whose syscalls act on the zone's behalf."""
        return (self.pid, *self.helper_pids)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "tenant": self.tenant,
            "vmm": str(self.vmm),
            "pid": self.pid,
            "vcpu_tids": list(self.vcpu_tids),
            "taps": list(self.taps),
            "shares": [
                {
                    "tag": s.tag,
                    "host_path": s.host_path,
                    "backend": s.backend,
                    "guest_path": s.guest_path,
                }
                for s in self.shares
            ],
            "disks": list(self.disks),
            "helper_pids": list(self.helper_pids),
            "labels": dict(self.labels),
            "netns": self.netns.inode if self.netns else None,
        }


def zone_pids(zones: Iterable[Zone]) -> dict[int, int]:
    """Every process acting for a zone -> the zone's key (the kernel filters' content)."""
    return {pid: zone.key for zone in zones for pid in zone.pids}


def vcpu_tids(zones: Iterable[Zone]) -> dict[int, int]:
    """Every vCPU thread -> its zone's key."""
    return {tid: zone.key for zone in zones for tid in zone.vcpu_tids}


def rfc3339_ns(ts_ns: int) -> str:
    """Wall-clock nanoseconds since the epoch as RFC 3339 UTC with nanosecond precision."""
    seconds, nanos = divmod(ts_ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{nanos:09d}Z"


@dataclass(slots=True)
class FileEvent:
    """A file operation a zone's backend made on the guest's behalf (channel `file`)."""

    ts_ns: int  # wall clock, ns since the epoch
    zone: ZoneRef
    op: str  # open, create, read, write, close, rename, unlink, rmdir, mkdir, chmod, ...
    path: str  # as the guest sees it ("" when outside every share)
    host_path: str
    pid: int
    tid: int
    comm: str
    ret: int = 0  # the syscall's return value; negative errno on failure
    new_path: str = ""  # rename and link targets, as the guest sees them
    new_host_path: str = ""
    flags: int = 0
    mode: int = 0
    bytes_read: int = 0  # read: the first read's bytes; close: the open period's total
    bytes_written: int = 0
    share: str = ""  # the mount tag, "" when outside every share

    channel = "file"

    def to_json(self) -> dict[str, Any]:
        file: dict[str, Any] = {
            "path": self.path,
            "host_path": self.host_path,
            "share": self.share,
            "ret": self.ret,
        }
        if self.new_path or self.new_host_path:
            file["new_path"] = self.new_path
            file["new_host_path"] = self.new_host_path
        if self.bytes_read:
            file["bytes_read"] = self.bytes_read
        if self.bytes_written:
            file["bytes_written"] = self.bytes_written
        if self.flags:
            file["flags"] = self.flags
        if self.mode:
            file["mode"] = self.mode
        return {
            "type": "event",
            "ts": rfc3339_ns(self.ts_ns),
            "zone": self.zone.to_json(),
            "channel": "file",
            "op": self.op,
            "file": file,
            "proc": {"pid": self.pid, "tid": self.tid, "comm": self.comm},
        }


@dataclass(slots=True)
class KvmEvent:
    """A sampled, telling kvm event (hypercall, MSR write); everything frequent is counted
    in kernel maps and reaches user space only as ZoneStats."""

    ts_ns: int
    zone: ZoneRef
    op: str  # hypercall, hv_hypercall, xen_hypercall, msr_write
    pid: int
    tid: int
    comm: str
    code: int  # hypercall number / Hyper-V call code, or MSR index
    args: tuple[int, ...] = ()  # hypercall arguments; for an MSR write, (value,)
    faulted: bool = False  # the MSR access raised #GP

    channel = "kvm"

    def to_json(self) -> dict[str, Any]:
        kvm: dict[str, Any] = {"args": [f"{a:#x}" for a in self.args], "faulted": self.faulted}
        if self.op == "msr_write":
            kvm["msr"] = f"{self.code:#x}"
        else:
            kvm["hypercall_nr"] = self.code
        return {
            "type": "event",
            "ts": rfc3339_ns(self.ts_ns),
            "zone": self.zone.to_json(),
            "channel": "kvm",
            "op": self.op,
            "kvm": kvm,
            "proc": {"pid": self.pid, "tid": self.tid, "comm": self.comm},
        }


@dataclass(slots=True, frozen=True)
class Lost:
    """Events the kernel or a queue dropped; reported, never silent."""

    ts_ns: int
    source: str
    count: int

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "lost",
            "ts": rfc3339_ns(self.ts_ns),
            "source": self.source,
            "count": self.count,
        }


class Severity(enum.IntEnum):
    """Alert severities, ordered so `>=` filters work (names as in the JSON contract)."""

    INFO = 1
    LOW = 2
    MEDIUM = 3
    HIGH = 4
    CRITICAL = 5

    @classmethod
    def parse(cls, name: str) -> Severity:
        try:
            return cls[name.upper()]
        except KeyError:
            choices = "|".join(s.name.lower() for s in cls)
            raise ValueError(f"unknown severity {name!r} (expected {choices})") from None

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(slots=True)
class Alert:
    """A rule's verdict on a zone's evidence (type "alert" in the JSON contract).

    Repeats of one rule and key inside the de-duplication window fold into one alert:
    `count` events between `first_ts_ns` and `last_ts_ns`. `seq` is given by the journal.
    """

    ts_ns: int
    zone: ZoneRef
    rule: str
    severity: Severity
    summary: str
    tags: tuple[str, ...] = ()
    evidence: dict[str, Any] = field(default_factory=dict)
    count: int = 1
    first_ts_ns: int = 0
    last_ts_ns: int = 0
    lost_in_window: int = 0  # events lost while this alert's window was open: trust accordingly
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "alert",
            "seq": self.seq,
            "ts": rfc3339_ns(self.ts_ns),
            "zone": self.zone.to_json(),
            "rule": self.rule,
            "severity": str(self.severity),
            "summary": self.summary,
            "tags": list(self.tags),
            "evidence": self.evidence,
            "count": self.count,
            "first_ts": rfc3339_ns(self.first_ts_ns or self.ts_ns),
            "last_ts": rfc3339_ns(self.last_ts_ns or self.ts_ns),
            "lost_in_window": self.lost_in_window,
        }


@dataclass(slots=True)
class ZoneStats:
    """One zone's rates over the last interval (type "stats" in the JSON contract).

    The aggregator fills one per zone each interval; the UI, the metrics sinks and the
    windowed rules read them (rule fields `kvm.*`, `sched.*`, `net.*`, `file.*` below).
    Rates are per second. Detail maps (by exit reason, by port) are bounded by the probes.
    Latency histograms (`*_hist_ns`) count the interval's samples by log2 bucket, keyed by
    the bucket's lower bound in ns ("1024" holds 1024..2047 ns; "0" holds 0).
    """

    ts_ns: int
    zone: ZoneRef
    interval_s: float
    vcpus: int = 0
    # kvm
    exits_per_s: float = 0.0
    exits_by_reason: dict[str, float] = field(default_factory=dict)
    userspace_exits_per_s: float = 0.0
    pio_per_s: float = 0.0
    mmio_per_s: float = 0.0
    hypercalls_per_s: float = 0.0
    msr_writes_per_s: float = 0.0
    pio_ports: dict[str, float] = field(default_factory=dict)  # "0x3f8/out" -> per second
    mmio_pages: dict[str, float] = field(default_factory=dict)  # "0xfee00000/write" -> per s
    exit_latency_p50_us: float = 0.0  # VM exit -> entry, where kvm_exit fires
    exit_latency_p99_us: float = 0.0
    exit_latency_hist_ns: dict[str, int] = field(default_factory=dict)
    vmm_latency_p50_us: float = 0.0  # the VMM's time per return to user space
    vmm_latency_p99_us: float = 0.0
    vmm_latency_hist_ns: dict[str, int] = field(default_factory=dict)
    # sched
    run_delay_p50_us: float = 0.0
    run_delay_p99_us: float = 0.0
    run_delay_hist_ns: dict[str, int] = field(default_factory=dict)
    run_delay_pct: float = 0.0  # share of the interval vCPUs were runnable but waiting (steal)
    cpu_pct: float = 0.0  # of one CPU, summed over the zone's vCPU threads
    # net
    rx_bytes_per_s: float = 0.0
    tx_bytes_per_s: float = 0.0
    rx_packets_per_s: float = 0.0
    tx_packets_per_s: float = 0.0
    new_flows_per_s: float = 0.0
    malformed_per_s: float = 0.0
    # file
    file_ops_per_s: float = 0.0
    # rules
    open_alerts: int = 0

    @property
    def top_exit_reason(self) -> str:
        if not self.exits_by_reason:
            return ""
        return max(self.exits_by_reason.items(), key=lambda item: item[1])[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "stats",
            "ts": rfc3339_ns(self.ts_ns),
            "zone": self.zone.to_json(),
            "interval_s": self.interval_s,
            "kvm": {
                "vcpus": self.vcpus,
                "exits_per_s": _r(self.exits_per_s),
                "top_exit_reason": self.top_exit_reason,
                "exits_by_reason": _rd(self.exits_by_reason),
                "userspace_exits_per_s": _r(self.userspace_exits_per_s),
                "pio_per_s": _r(self.pio_per_s),
                "mmio_per_s": _r(self.mmio_per_s),
                "hypercalls_per_s": _r(self.hypercalls_per_s),
                "msr_writes_per_s": _r(self.msr_writes_per_s),
                "pio_ports": _rd(self.pio_ports),
                "mmio_pages": _rd(self.mmio_pages),
                "exit_latency_p50_us": _r(self.exit_latency_p50_us),
                "exit_latency_p99_us": _r(self.exit_latency_p99_us),
                "exit_latency_hist_ns": self.exit_latency_hist_ns,
                "vmm_latency_p50_us": _r(self.vmm_latency_p50_us),
                "vmm_latency_p99_us": _r(self.vmm_latency_p99_us),
                "vmm_latency_hist_ns": self.vmm_latency_hist_ns,
            },
            "sched": {
                "run_delay_p50_us": _r(self.run_delay_p50_us),
                "run_delay_p99_us": _r(self.run_delay_p99_us),
                "run_delay_hist_ns": self.run_delay_hist_ns,
                "run_delay_pct": _r(self.run_delay_pct),
                "cpu_pct": _r(self.cpu_pct),
            },
            "net": {
                "rx_bytes_per_s": _r(self.rx_bytes_per_s),
                "tx_bytes_per_s": _r(self.tx_bytes_per_s),
                "rx_packets_per_s": _r(self.rx_packets_per_s),
                "tx_packets_per_s": _r(self.tx_packets_per_s),
                "new_flows_per_s": _r(self.new_flows_per_s),
                "malformed_per_s": _r(self.malformed_per_s),
            },
            "file": {"ops_per_s": _r(self.file_ops_per_s)},
            "alerts": {"open": self.open_alerts},
        }


def _r(rate: float) -> float:
    """Rates in JSON: three decimals are plenty and keep lines short."""
    return round(rate, 3)


def _rd(rates: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in rates.items()}


@dataclass(slots=True)
class NetEvent:
    """A flow starting or ending on a zone's tap, or a DNS query it sent (channel `net`).

    Flows are seen from the zone's side: `direction` is "egress" when the zone opened the
    flow (src is the zone), "ingress" when it was opened towards the zone (dst is the zone);
    for a DNS query, the packet's direction. tx is what the zone sent, rx what it was sent.
    """

    ts_ns: int
    zone: ZoneRef
    op: str  # flow_start, flow_end, dns
    direction: str  # egress, ingress (from the zone's point of view)
    proto: str  # tcp, udp, icmp, icmpv6, or the IP protocol number
    src_ip: str
    dst_ip: str
    src_port: int = 0  # ICMP echo: the identifier; other ICMP: type << 8 | code in dst_port
    dst_port: int = 0
    bytes: int = 0  # IP bytes both ways, headers included
    packets: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    rx_packets: int = 0
    tx_payload: int = 0  # L4 payload bytes the zone sent (headers aside)
    rx_payload: int = 0
    tcp_flags: tuple[str, ...] = ()  # every flag seen so far, e.g. ("SYN", "ACK", "FIN")
    end_reason: str = ""  # flow_end: fin, rst or idle
    duration_s: float = 0.0  # first packet to last seen, to a kernel tick (4 ms at HZ=250)
    tap: str = ""
    dns_qname: str = ""  # non-printable bytes escaped as \DDD
    dns_qtype: str = ""  # A, AAAA, ... or TYPEnnn
    dns_error: str = ""  # why the question did not parse ("" when it did)

    channel = "net"

    def to_json(self) -> dict[str, Any]:
        net: dict[str, Any] = {
            "src_ip": self.src_ip,
            "dst_ip": self.dst_ip,
            "src_port": self.src_port,
            "dst_port": self.dst_port,
            "proto": self.proto,
            "direction": self.direction,
            "bytes": self.bytes,
            "packets": self.packets,
            "tx_bytes": self.tx_bytes,
            "rx_bytes": self.rx_bytes,
            "tx_packets": self.tx_packets,
            "rx_packets": self.rx_packets,
            "tx_payload": self.tx_payload,
            "rx_payload": self.rx_payload,
            "tcp_flags": list(self.tcp_flags),
        }
        if self.tap:
            net["tap"] = self.tap
        if self.op == "flow_end":
            net["end_reason"] = self.end_reason
            net["duration_s"] = round(self.duration_s, 6)
        if self.op == "dns":
            net["dns_qname"] = self.dns_qname
            net["dns_qtype"] = self.dns_qtype
            if self.dns_error:
                net["dns_error"] = self.dns_error
        return {
            "type": "event",
            "ts": rfc3339_ns(self.ts_ns),
            "zone": self.zone.to_json(),
            "channel": "net",
            "op": self.op,
            "net": net,
        }


@dataclass(slots=True)
class ProcEvent:
    """What a zone's VMM or backend process did itself (channel `proc`): exec, fork, exit,
    ptrace, mount, setuid, module_load, bpf, open_outside_share, connect, ..."""

    ts_ns: int
    zone: ZoneRef
    op: str
    pid: int
    ppid: int = 0
    comm: str = ""
    tid: int = 0
    pcomm: str = ""  # the parent's comm (for exec: the process that spawned)
    exe: str = ""
    args: str = ""  # the command line, space-separated (exec)
    target: str = ""  # host path, module name or ptrace target the call acted on
    ret: int = 0
    spawned: bool = False  # a process a zone process started (followed by the kernel)
    sock_addr: str = ""  # connect/bind: the IPv4/IPv6 address ("" for other families)
    sock_port: int = 0  # connect/bind: the port

    channel = "proc"

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "event",
            "ts": rfc3339_ns(self.ts_ns),
            "zone": self.zone.to_json(),
            "channel": "proc",
            "op": self.op,
            "proc": {
                "pid": self.pid,
                "tid": self.tid,
                "ppid": self.ppid,
                "comm": self.comm,
                "pcomm": self.pcomm,
                "exe": self.exe,
                "args": self.args,
                "target": self.target,
                "ret": self.ret,
                "spawned": self.spawned,
                **(
                    {"sock_addr": self.sock_addr, "sock_port": self.sock_port}
                    if self.sock_addr
                    else {}
                ),
            },
        }


class GenericEvent:
    """An event of a channel that has no class of its own here (a replayed recording
    keeps it whole). Each channel section's keys become attributes, the event's own
    channel first, so rules read it as they read a typed event; a missing one reads None.
    Not slotted on purpose: its attributes are whatever the recording holds."""

    def __init__(
        self, ts_ns: int, zone: ZoneRef, channel: str, op: str, sections: dict[str, Any]
    ) -> None:
        self.ts_ns = ts_ns
        self.zone = zone
        self.channel = channel
        self.op = op
        self.sections = sections
        for name in sorted(sections, key=lambda s: s != channel):
            for key, value in sections[name].items():
                self.__dict__.setdefault(key, value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None  # only reached for attributes the recording did not have

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "event",
            "ts": rfc3339_ns(self.ts_ns),
            "zone": self.zone.to_json(),
            "channel": self.channel,
            "op": self.op,
            **self.sections,
        }


# -- reading JSON lines back (replay, rule fixtures) --------------------------------------

_EPOCH_SECONDS: dict[str, int] = {}
_ZONE_REFS: dict[tuple[str, str, str, str], ZoneRef] = {}


def parse_rfc3339_ns(text: str) -> int:
    """The inverse of rfc3339_ns (also takes fewer fraction digits and a +00:00 suffix).
    Whole seconds are memoised: a recording's lines share them, and parsing dominates."""
    text = text.removesuffix("Z").removesuffix("+00:00")
    base, _, frac = text.partition(".")
    seconds = _EPOCH_SECONDS.get(base)
    if seconds is None:
        seconds = int(datetime.fromisoformat(base).replace(tzinfo=UTC).timestamp())
        if len(_EPOCH_SECONDS) > 100_000:
            _EPOCH_SECONDS.clear()
        _EPOCH_SECONDS[base] = seconds
    nanos = int(frac[:9].ljust(9, "0")) if frac else 0
    return seconds * 1_000_000_000 + nanos


def zone_ref_from_json(obj: dict[str, Any]) -> ZoneRef:
    key = (
        str(obj.get("id", "")),
        str(obj.get("name", "")),
        str(obj.get("tenant", DEFAULT_TENANT)),
        str(obj.get("vmm", "")),
    )
    ref = _ZONE_REFS.get(key)
    if ref is None:
        if len(_ZONE_REFS) > 100_000:
            _ZONE_REFS.clear()
        ref = _ZONE_REFS[key] = ZoneRef(*key)
    return ref


def file_event_from_json(obj: dict[str, Any]) -> FileEvent:
    f = obj.get("file") or {}
    p = obj.get("proc") or {}
    return FileEvent(
        ts_ns=parse_rfc3339_ns(obj["ts"]),
        zone=zone_ref_from_json(obj.get("zone") or {}),
        op=str(obj.get("op", "")),
        path=str(f.get("path", "")),
        host_path=str(f.get("host_path", "")),
        pid=int(p.get("pid", 0)),
        tid=int(p.get("tid", 0)),
        comm=str(p.get("comm", "")),
        ret=int(f.get("ret", 0)),
        new_path=str(f.get("new_path", "")),
        new_host_path=str(f.get("new_host_path", "")),
        flags=int(f.get("flags", 0)),
        mode=int(f.get("mode", 0)),
        bytes_read=int(f.get("bytes_read", 0)),
        bytes_written=int(f.get("bytes_written", 0)),
        share=str(f.get("share", "")),
    )


def proc_event_from_json(obj: dict[str, Any]) -> ProcEvent:
    p = obj.get("proc") or {}
    return ProcEvent(
        ts_ns=parse_rfc3339_ns(obj["ts"]),
        zone=zone_ref_from_json(obj.get("zone") or {}),
        op=str(obj.get("op", "")),
        pid=int(p.get("pid", 0)),
        ppid=int(p.get("ppid", 0)),
        comm=str(p.get("comm", "")),
        tid=int(p.get("tid", 0)),
        pcomm=str(p.get("pcomm", "")),
        exe=str(p.get("exe", "")),
        args=str(p.get("args", "")),
        target=str(p.get("target", "")),
        ret=int(p.get("ret", 0)),
        spawned=bool(p.get("spawned", False)),
        sock_addr=str(p.get("sock_addr", "")),
        sock_port=int(p.get("sock_port", 0)),
    )


def kvm_event_from_json(obj: dict[str, Any]) -> KvmEvent:
    k = obj.get("kvm") or {}
    p = obj.get("proc") or {}
    code = k.get("msr", k.get("hypercall_nr", 0))
    return KvmEvent(
        ts_ns=parse_rfc3339_ns(obj["ts"]),
        zone=zone_ref_from_json(obj.get("zone") or {}),
        op=str(obj.get("op", "")),
        pid=int(p.get("pid", 0)),
        tid=int(p.get("tid", 0)),
        comm=str(p.get("comm", "")),
        code=int(code, 0) if isinstance(code, str) else int(code),
        args=tuple(int(a, 0) if isinstance(a, str) else int(a) for a in k.get("args", ())),
        faulted=bool(k.get("faulted", False)),
    )


def net_event_from_json(obj: dict[str, Any]) -> NetEvent:
    n = obj.get("net") or {}
    return NetEvent(
        ts_ns=parse_rfc3339_ns(obj["ts"]),
        zone=zone_ref_from_json(obj.get("zone") or {}),
        op=str(obj.get("op", "")),
        direction=str(n.get("direction", "")),
        proto=str(n.get("proto", "")),
        src_ip=str(n.get("src_ip", "")),
        dst_ip=str(n.get("dst_ip", "")),
        src_port=int(n.get("src_port", 0)),
        dst_port=int(n.get("dst_port", 0)),
        bytes=int(n.get("bytes", 0)),
        packets=int(n.get("packets", 0)),
        tx_bytes=int(n.get("tx_bytes", 0)),
        rx_bytes=int(n.get("rx_bytes", 0)),
        tx_packets=int(n.get("tx_packets", 0)),
        rx_packets=int(n.get("rx_packets", 0)),
        tx_payload=int(n.get("tx_payload", 0)),
        rx_payload=int(n.get("rx_payload", 0)),
        tcp_flags=tuple(str(f) for f in n.get("tcp_flags", ())),
        end_reason=str(n.get("end_reason", "")),
        duration_s=float(n.get("duration_s", 0.0)),
        tap=str(n.get("tap", "")),
        dns_qname=str(n.get("dns_qname", "")),
        dns_qtype=str(n.get("dns_qtype", "")),
        dns_error=str(n.get("dns_error", "")),
    )


def generic_event_from_json(obj: dict[str, Any]) -> GenericEvent:
    skip = {"type", "ts", "zone", "channel", "op"}
    sections = {k: v for k, v in obj.items() if k not in skip and isinstance(v, dict)}
    return GenericEvent(
        parse_rfc3339_ns(obj["ts"]),
        zone_ref_from_json(obj.get("zone") or {}),
        str(obj.get("channel", "")),
        str(obj.get("op", "")),
        sections,
    )


def zone_stats_from_json(obj: dict[str, Any]) -> ZoneStats:
    k = obj.get("kvm") or {}
    s = obj.get("sched") or {}
    n = obj.get("net") or {}

    def rates(d: Any) -> dict[str, float]:
        return {str(key): float(v) for key, v in (d or {}).items()}

    def counts(d: Any) -> dict[str, int]:
        return {str(key): int(v) for key, v in (d or {}).items()}

    return ZoneStats(
        ts_ns=parse_rfc3339_ns(obj["ts"]),
        zone=zone_ref_from_json(obj.get("zone") or {}),
        interval_s=float(obj.get("interval_s", 1.0)),
        vcpus=int(k.get("vcpus", 0)),
        exits_per_s=float(k.get("exits_per_s", 0.0)),
        exits_by_reason=rates(k.get("exits_by_reason")),
        userspace_exits_per_s=float(k.get("userspace_exits_per_s", 0.0)),
        pio_per_s=float(k.get("pio_per_s", 0.0)),
        mmio_per_s=float(k.get("mmio_per_s", 0.0)),
        hypercalls_per_s=float(k.get("hypercalls_per_s", 0.0)),
        msr_writes_per_s=float(k.get("msr_writes_per_s", 0.0)),
        pio_ports=rates(k.get("pio_ports")),
        mmio_pages=rates(k.get("mmio_pages")),
        exit_latency_p50_us=float(k.get("exit_latency_p50_us", 0.0)),
        exit_latency_p99_us=float(k.get("exit_latency_p99_us", 0.0)),
        exit_latency_hist_ns=counts(k.get("exit_latency_hist_ns")),
        vmm_latency_p50_us=float(k.get("vmm_latency_p50_us", 0.0)),
        vmm_latency_p99_us=float(k.get("vmm_latency_p99_us", 0.0)),
        vmm_latency_hist_ns=counts(k.get("vmm_latency_hist_ns")),
        run_delay_p50_us=float(s.get("run_delay_p50_us", 0.0)),
        run_delay_p99_us=float(s.get("run_delay_p99_us", 0.0)),
        run_delay_hist_ns=counts(s.get("run_delay_hist_ns")),
        run_delay_pct=float(s.get("run_delay_pct", 0.0)),
        cpu_pct=float(s.get("cpu_pct", 0.0)),
        rx_bytes_per_s=float(n.get("rx_bytes_per_s", 0.0)),
        tx_bytes_per_s=float(n.get("tx_bytes_per_s", 0.0)),
        rx_packets_per_s=float(n.get("rx_packets_per_s", 0.0)),
        tx_packets_per_s=float(n.get("tx_packets_per_s", 0.0)),
        new_flows_per_s=float(n.get("new_flows_per_s", 0.0)),
        malformed_per_s=float(n.get("malformed_per_s", 0.0)),
        file_ops_per_s=float((obj.get("file") or {}).get("ops_per_s", 0.0)),
        open_alerts=int((obj.get("alerts") or {}).get("open", 0)),
    )


# channel -> decoder of its `event` lines; channels not named here become GenericEvent.
# (A channel that gets its own event class registers its decoder here.)
EVENT_DECODERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "file": file_event_from_json,
    "proc": proc_event_from_json,
    "kvm": kvm_event_from_json,
    "net": net_event_from_json,
}


def record_from_json(obj: dict[str, Any]) -> Any:
    """One JSON line back into its record: an event, ZoneStats or Lost (None for alerts
    and unknown types). Raises KeyError/ValueError/TypeError on a malformed line."""
    kind = obj.get("type")
    if kind == "event":
        decode: Callable[[dict[str, Any]], Any] = EVENT_DECODERS.get(
            str(obj.get("channel", "")), generic_event_from_json
        )
        return decode(obj)
    if kind == "stats":
        return zone_stats_from_json(obj)
    if kind == "lost":
        return Lost(parse_rfc3339_ns(obj["ts"]), str(obj["source"]), int(obj["count"]))
    return None
