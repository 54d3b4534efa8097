"""The typed records that flow through the pipeline: zones, events, lost counts.

Field names follow the JSON-lines contract of shared/design.md; `to_json()` on each record
yields exactly that shape.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

DEFAULT_TENANT = "default"


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
    exit_latency_p99_us: float = 0.0
    # sched
    run_delay_p50_us: float = 0.0
    run_delay_p99_us: float = 0.0
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
                "exit_latency_p99_us": _r(self.exit_latency_p99_us),
            },
            "sched": {
                "run_delay_p50_us": _r(self.run_delay_p50_us),
                "run_delay_p99_us": _r(self.run_delay_p99_us),
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
