"""Every field a rule may name, in ONE table: its type, its doc, and how to read it from
each channel's event class.

A source is an attribute path (compiled to `operator.attrgetter`, the fastest field access
Python has) or a builder that receives the engine's lookups (for fields that need the
zone-address map). The same table generates the field reference (`zonewatch rules fields`).
"""

from __future__ import annotations

import enum
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from zonewatch.model import ZoneRef

Getter = Callable[[Any], Any]

CHANNELS = ("file", "proc", "net", "kvm", "stats")
EVENT_CHANNELS = ("file", "proc", "net", "kvm")


class FieldType(enum.StrEnum):
    STR = "str"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    IP = "ip"  # a str holding an IPv4/IPv6 address: also takes `cidr`
    MAP = "map"  # str -> number (exit reasons, ports): for baseline_shift


NUMERIC = (FieldType.INT, FieldType.FLOAT)


@dataclass(slots=True)
class Lookups:
    """What derived fields read besides the event; the engine refreshes it per batch."""

    addresses: Mapping[str, ZoneRef] = field(default_factory=dict)  # zone IP -> its zone


Source = str | Callable[[Lookups], Getter]


@dataclass(slots=True, frozen=True)
class Field:
    name: str
    type: FieldType
    doc: str
    sources: Mapping[str, Source]  # channel -> how to read it there

    def getter(self, channel: str, lookups: Lookups) -> Getter:
        source = self.sources[channel]
        if isinstance(source, str):
            return attrgetter(source)
        return source(lookups)


O_ACCMODE = 0o3
O_CREAT = 0o100
O_TRUNC = 0o1000
WRITE_OPS = frozenset({"write", "create", "truncate", "rename", "link", "symlink", "mknod"})


def _file_writable(_: Lookups) -> Getter:
    def get(e: Any) -> bool:
        return e.op in WRITE_OPS or bool(e.flags & (O_ACCMODE | O_CREAT | O_TRUNC))

    return get


def _dst_zone_attr(attr: str) -> Callable[[Lookups], Getter]:
    def build(lookups: Lookups) -> Getter:
        def get(e: Any) -> str:
            zone = lookups.addresses.get(e.dst_ip)
            return "" if zone is None else str(getattr(zone, attr))

        return get

    return build


def _dst_other_tenant(lookups: Lookups) -> Getter:
    def get(e: Any) -> bool:
        zone = lookups.addresses.get(e.dst_ip)
        return zone is not None and zone.tenant != e.zone.tenant

    return get


def _per_vcpu(_: Lookups) -> Getter:
    return lambda s: s.exits_per_s / (s.vcpus or 1)


def _basename(attr: str) -> Callable[[Lookups], Getter]:
    get_path = attrgetter(attr)
    return lambda _: lambda e: posixpath.basename(get_path(e))


def _dirname(attr: str) -> Callable[[Lookups], Getter]:
    get_path = attrgetter(attr)
    return lambda _: lambda e: posixpath.dirname(get_path(e))


def _constant(value: str) -> Callable[[Lookups], Getter]:
    return lambda _: lambda _e: value


def _all(source: Source, channels: tuple[str, ...] = CHANNELS) -> dict[str, Source]:
    return dict.fromkeys(channels, source)


S, N, F, B, IP, M = (FieldType.STR, FieldType.INT, FieldType.FLOAT, FieldType.BOOL,
                     FieldType.IP, FieldType.MAP)  # fmt: skip
_STATS = ("stats",)
_BACKEND = ("file", "proc", "kvm")  # events made by a process of the zone

_TABLE: tuple[Field, ...] = (
    # every channel
    Field("channel", S, "the evidence channel: file, proc, net, kvm or stats",
          {**_all("channel", EVENT_CHANNELS), "stats": _constant("stats")}),
    Field("op", S, "what happened (open, exec, flow_start, ...; `snapshot` for stats)",
          {**_all("op", EVENT_CHANNELS), "stats": _constant("snapshot")}),
    Field("zone.id", S, "the zone's id (stable for one incarnation)", _all("zone.id")),
    Field("zone.name", S, "the zone's name", _all("zone.name")),
    Field("zone.tenant", S, "the zone's tenant", _all("zone.tenant")),
    Field("zone.vmm", S, "the zone's VMM (qemu, firecracker, ...)", _all("zone.vmm")),
    # the process that acted (file, proc, kvm events)
    Field("proc.pid", N, "pid of the VMM or backend process", _all("pid", _BACKEND)),
    Field("proc.tid", N, "thread id", _all("tid", _BACKEND)),
    Field("proc.comm", S, "the process's command name", _all("comm", _BACKEND)),
    Field("proc.ppid", N, "parent pid", {"proc": "ppid"}),
    Field("proc.pcomm", S, "the parent's command name (exec: the VMM that spawned)",
          {"proc": "pcomm"}),
    Field("proc.exe", S, "executable path (exec)", {"proc": "exe"}),
    Field("proc.args", S, "command line, space-separated (exec)", {"proc": "args"}),
    Field("proc.target", S, "what the call acted on: host path (open_outside_share, mount, "
          "chroot, pivot_root), module name, \"pid (comm)\" (ptrace, process_vm_*, "
          "pidfd_getfd), namespace (setns: net:[4026531840]; \"fd N\" when the caller "
          "closed it first), open_by_handle_at's mount, perf event type (perf_event_open: "
          "hardware, software, tracepoint, kprobe, ...)",
          {"proc": "target"}),
    Field("proc.target_pid", N, "the other process acted on: ptrace, process_vm_readv/writev, "
          "pidfd_getfd (0 when its pidfd was gone), perf_event_open (-1: every process)",
          {"proc": "target_pid"}),
    Field("proc.flags", N, "the call's flags: setns/unshare/fork CLONE_NEW*, "
          "open_by_handle_at open flags, io_uring_setup params flags, userfaultfd, kexec, "
          "perf_event_open flags", {"proc": "flags"}),
    Field("proc.namespaces", S, "setns/unshare/fork: namespace kinds entered or created, "
          "comma-separated (mnt, uts, ipc, user, pid, net, cgroup, time)",
          {"proc": "namespaces"}),
    Field("proc.caps", S, "capset: the effective capabilities asked for, comma-separated "
          "(CAP_SYS_ADMIN, ...)", {"proc": "caps"}),
    Field("proc.effective_only", B, "setuid/setgid: only the effective id switched, real and "
          "saved kept (setresuid(-1, id, -1): a file server acting for a request)",
          {"proc": "effective_only"}),
    Field("proc.ret", N, "the call's return value; negative errno on failure", {"proc": "ret"}),
    Field("proc.spawned", B, "the process was started by a zone process (followed)",
          {"proc": "spawned"}),
    Field("proc.sock.addr", IP, "connect/bind: the IPv4/IPv6 address (\"\" for unix and "
          "other families)", {"proc": "sock_addr"}),
    Field("proc.sock.port", N, "connect/bind: the port (0 for unix and other families)",
          {"proc": "sock_port"}),
    # file
    Field("file.path", S, "path as the guest sees it (\"\" outside every share)",
          {"file": "path"}),
    Field("file.name", S, "the last component of file.path", {"file": _basename("path")}),
    Field("file.directory", S, "file.path without its last component",
          {"file": _dirname("path")}),
    Field("file.host_path", S, "path on the host", {"file": "host_path"}),
    Field("file.share", S, "the share's mount tag (\"\" outside every share)",
          {"file": "share"}),
    Field("file.new_path", S, "rename/link target as the guest sees it", {"file": "new_path"}),
    Field("file.new_name", S, "the last component of file.new_path",
          {"file": _basename("new_path")}),
    Field("file.new_host_path", S, "rename/link target on the host",
          {"file": "new_host_path"}),
    Field("file.ret", N, "the syscall's return value; negative errno on failure "
          "(-1 with --file-hooks uprobes on a kernel without BTF)", {"file": "ret"}),
    Field("file.flags", N, "open flags", {"file": "flags"}),
    Field("file.mode", N, "create/chmod mode", {"file": "mode"}),
    Field("file.bytes_read", N, "bytes read (close: the open period's total)",
          {"file": "bytes_read"}),
    Field("file.bytes_written", N, "bytes written (close: the open period's total)",
          {"file": "bytes_written"}),
    Field("file.writable", B, "the op writes, or the open asked for write/create/truncate",
          {"file": _file_writable}),
    # net events
    Field("net.src_ip", IP, "source address", {"net": "src_ip"}),
    Field("net.dst_ip", IP, "destination address", {"net": "dst_ip"}),
    Field("net.src_port", N, "source port", {"net": "src_port"}),
    Field("net.dst_port", N, "destination port", {"net": "dst_port"}),
    Field("net.proto", S, "tcp, udp, icmp, ...", {"net": "proto"}),
    Field("net.direction", S, "egress (from the zone) or ingress", {"net": "direction"}),
    Field("net.bytes", N, "IP bytes of the flow both ways (flow_end: the total)",
          {"net": "bytes"}),
    Field("net.tx_bytes", N, "bytes the zone sent in the flow", {"net": "tx_bytes"}),
    Field("net.rx_bytes", N, "bytes the zone received in the flow", {"net": "rx_bytes"}),
    Field("net.packets", N, "packets of the flow", {"net": "packets"}),
    Field("net.dns_qname", S, "the queried name (op dns)", {"net": "dns_qname"}),
    Field("net.dns_qtype", S, "the query type: A, AAAA, ... (op dns)", {"net": "dns_qtype"}),
    Field("net.end_reason", S, "why the flow ended: fin, rst or idle (flow_end)",
          {"net": "end_reason"}),
    Field("net.tap", S, "the zone's tap interface", {"net": "tap"}),
    Field("net.dst_zone", S, "name of the zone owning net.dst_ip (\"\" if none)",
          {"net": _dst_zone_attr("name")}),
    Field("net.dst_tenant", S, "tenant of the zone owning net.dst_ip (\"\" if none)",
          {"net": _dst_zone_attr("tenant")}),
    Field("net.dst_other_tenant", B, "net.dst_ip belongs to a zone of another tenant",
          {"net": _dst_other_tenant}),
    # kvm events (sampled hypercalls, MSR writes)
    Field("kvm.code", N, "hypercall number or MSR index", {"kvm": "code"}),
    Field("kvm.faulted", B, "the MSR access raised #GP", {"kvm": "faulted"}),
    # stats snapshots (model.ZoneStats; rates per second)
    Field("stats.interval_s", F, "the snapshot's interval", {"stats": "interval_s"}),
    Field("kvm.vcpus", N, "vCPUs of the zone", {"stats": "vcpus"}),
    Field("kvm.exits_per_s", F, "VM exits per second", {"stats": "exits_per_s"}),
    Field("kvm.exits_per_vcpu_s", F, "VM exits per second per vCPU", {"stats": _per_vcpu}),
    Field("kvm.top_exit_reason", S, "the most frequent exit reason",
          {"stats": "top_exit_reason"}),
    Field("kvm.exits_by_reason", M, "exits per second by reason (the exit profile)",
          {"stats": "exits_by_reason"}),
    Field("kvm.userspace_exits_per_s", F, "returns to the VMM per second",
          {"stats": "userspace_exits_per_s"}),
    Field("kvm.pio_per_s", F, "port I/O exits per second", {"stats": "pio_per_s"}),
    Field("kvm.mmio_per_s", F, "MMIO exits per second", {"stats": "mmio_per_s"}),
    Field("kvm.hypercalls_per_s", F, "hypercalls per second", {"stats": "hypercalls_per_s"}),
    Field("kvm.msr_writes_per_s", F, "MSR writes per second", {"stats": "msr_writes_per_s"}),
    Field("kvm.pio_ports", M, "port I/O per second by port/direction (other/...: ports past "
          "the zone's first 256)", {"stats": "pio_ports"}),
    Field("kvm.mmio_pages", M, "MMIO per second by page/direction (other/...: pages past the "
          "zone's first 256)", {"stats": "mmio_pages"}),
    Field("kvm.exit_latency_p50_us", F, "median exit handling time (exit to entry)",
          {"stats": "exit_latency_p50_us"}),
    Field("kvm.exit_latency_p99_us", F, "99th percentile exit handling time",
          {"stats": "exit_latency_p99_us"}),
    Field("kvm.vmm_latency_p50_us", F, "median time the VMM took per return to it",
          {"stats": "vmm_latency_p50_us"}),
    Field("kvm.vmm_latency_p99_us", F, "99th percentile time the VMM took per return",
          {"stats": "vmm_latency_p99_us"}),
    Field("sched.run_delay_p50_us", F, "median wait of a vCPU thread to run",
          {"stats": "run_delay_p50_us"}),
    Field("sched.run_delay_p99_us", F, "99th percentile wait of a vCPU thread to run",
          {"stats": "run_delay_p99_us"}),
    Field("sched.cpu_pct", F, "CPU of the vCPU threads, % of one CPU", {"stats": "cpu_pct"}),
    Field("net.rx_bytes_per_s", F, "bytes per second into the zone",
          {"stats": "rx_bytes_per_s"}),
    Field("net.tx_bytes_per_s", F, "bytes per second out of the zone (egress)",
          {"stats": "tx_bytes_per_s"}),
    Field("net.rx_packets_per_s", F, "packets per second in", {"stats": "rx_packets_per_s"}),
    Field("net.tx_packets_per_s", F, "packets per second out", {"stats": "tx_packets_per_s"}),
    Field("net.new_flows_per_s", F, "new flows per second", {"stats": "new_flows_per_s"}),
    Field("net.malformed_per_s", F, "malformed packets per second",
          {"stats": "malformed_per_s"}),
    Field("file.ops_per_s", F, "file operations per second", {"stats": "file_ops_per_s"}),
    Field("alerts.open", N, "alerts open on the zone", {"stats": "open_alerts"}),
)  # fmt: skip

FIELDS: dict[str, Field] = {f.name: f for f in _TABLE}


def field_reference() -> str:
    """The field reference as Markdown (generated from the table above)."""
    lines = ["| field | type | channels | meaning |", "|---|---|---|---|"]
    for f in _TABLE:
        channels = ", ".join(c for c in CHANNELS if c in f.sources)
        lines.append(f"| `{f.name}` | {f.type} | {channels} | {f.doc} |")
    return "\n".join(lines)
