"""What the kvm channel counts per zone, as cumulative snapshots, and the one builder that
makes them.

The live probe (KvmProbe.collect, from kernel maps) and the replay of recorded tracepoint
text (kvm_replay) both feed raw codes into KvmSnapshotBuilder; names come from
kvm_reasons only when a snapshot is read. So the decoding and everything after it is the
same code whichever way the counts arrived.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from zonewatch.probes.hist import Log2Hist
from zonewatch.probes.kvm_reasons import exit_reason_name, userspace_exit_name
from zonewatch.probes.records import HistKind, KvmCounter, MmioAccess

PAGE_MASK = ~0xFFF
# The port, page or code of a zone's "other" key: its keys past the per-zone budget
# (bpf/kvm.c new_key, ZW_KVM_KEY_OTHER), counted together. No real one is negative.
OTHER = -1
KEYS_PER_ZONE = 256  # ZW_KVM_KEYS_PER_ZONE


def code_name(code: int) -> str:
    """A port, page or counter code as the snapshots name it."""
    return "other" if code == OTHER else f"{code:#x}"


@dataclass(slots=True, frozen=True)
class ExitKey:
    """A hardware exit (kvm_exit): which vCPU, which ISA's reason code."""

    vcpu: int
    isa: int  # KvmIsa: 1 VMX, 2 SVM
    reason: int  # as the hardware reports it (VMX flag bits included)

    @property
    def name(self) -> str:
        return exit_reason_name(self.isa, self.reason)


@dataclass(slots=True, frozen=True)
class UserspaceExitKey:
    """A return of KVM_RUN to the VMM (kvm_userspace_exit)."""

    reason: int  # kvm_run.exit_reason, KVM_EXIT_*
    err: int = 0  # 0, or the errno KVM_RUN failed with (EINTR: a signal interrupted it)

    @property
    def name(self) -> str:
        name = userspace_exit_name(self.reason)
        if self.err:
            return f"{name} ({errno.errorcode.get(self.err, str(self.err))})"
        return name


@dataclass(slots=True, frozen=True)
class PioKey:
    port: int
    direction: int  # 0 in, 1 out

    @property
    def name(self) -> str:
        return f"{code_name(self.port)}/{'out' if self.direction else 'in'}"


@dataclass(slots=True, frozen=True)
class MmioKey:
    page: int  # guest-physical address of the 4 KiB page, or OTHER
    access: int  # MmioAccess

    @property
    def name(self) -> str:
        try:
            kind = MmioAccess(self.access).name.lower()
        except ValueError:
            kind = str(self.access)
        return f"{code_name(self.page)}/{kind}"


@dataclass(slots=True, frozen=True)
class CounterKey:
    kind: int  # KvmCounter
    code: int  # hypercall nr, MSR index, CPUID leaf, emulation mode; or OTHER


@dataclass(slots=True)
class IoCount:
    count: int = 0  # exits (accesses)
    bytes: int = 0  # data moved: size * count for PIO, len for MMIO

    def since(self, earlier: IoCount | None) -> IoCount:
        if earlier is None or self.count < earlier.count:
            return IoCount(self.count, self.bytes)
        return IoCount(self.count - earlier.count, self.bytes - earlier.bytes)


def _since(now: dict[Any, int], earlier: dict[Any, int]) -> dict[Any, int]:
    """Per-key growth; a key that went down was reset (purged) and counts from zero."""
    out: dict[Any, int] = {}
    for key, value in now.items():
        before = earlier.get(key, 0)
        delta = value - before if value >= before else value
        if delta:
            out[key] = delta
    return out


@dataclass(slots=True)
class ZoneKvm:
    """One zone's kvm counters: cumulative as read, or a window after since()."""

    exits: dict[ExitKey, int] = field(default_factory=dict)
    userspace_exits: dict[UserspaceExitKey, int] = field(default_factory=dict)
    pio: dict[PioKey, IoCount] = field(default_factory=dict)
    mmio: dict[MmioKey, IoCount] = field(default_factory=dict)
    counters: dict[CounterKey, int] = field(default_factory=dict)
    exit_latency: Log2Hist = field(default_factory=Log2Hist)  # kvm_exit -> kvm_entry, ns
    userspace_latency: Log2Hist = field(default_factory=Log2Hist)  # VMM time per exit, ns

    # ---- totals ----
    @property
    def exits_total(self) -> int:
        return sum(self.exits.values())

    @property
    def userspace_exits_total(self) -> int:
        return sum(self.userspace_exits.values())

    @property
    def pio_total(self) -> int:
        return sum(c.count for c in self.pio.values())

    @property
    def mmio_total(self) -> int:
        return sum(c.count for c in self.mmio.values())

    @property
    def emulated_total(self) -> int:
        return sum(self.counter(KvmCounter.EMULATE).values()) + sum(
            self.counter(KvmCounter.EMULATE_FAILED).values()
        )

    # ---- views by name (decoded here, the same for live and replayed counts) ----
    def exits_by_reason(self) -> dict[str, int]:
        """Exit counts by reason name, summed over vCPUs."""
        out: dict[str, int] = {}
        for key, n in self.exits.items():
            out[key.name] = out.get(key.name, 0) + n
        return out

    def userspace_exits_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, n in self.userspace_exits.items():
            out[key.name] = out.get(key.name, 0) + n
        return out

    def counter(self, kind: KvmCounter) -> dict[int, int]:
        """One kind of the counters map: code (hypercall nr, MSR index, ...) -> count."""
        return {k.code: n for k, n in self.counters.items() if k.kind == kind}

    def pio_ports(self, direction: int | None = None) -> dict[int, int]:
        """Accesses per port (both directions unless one is given)."""
        out: dict[int, int] = {}
        for key, c in self.pio.items():
            if direction is None or key.direction == direction:
                out[key.port] = out.get(key.port, 0) + c.count
        return out

    def mmio_pages(self, access: MmioAccess | None = None) -> dict[int, int]:
        """Accesses per guest-physical page (every access kind unless one is given)."""
        out: dict[int, int] = {}
        for key, c in self.mmio.items():
            if access is None or key.access == access:
                out[key.page] = out.get(key.page, 0) + c.count
        return out

    def since(self, earlier: ZoneKvm) -> ZoneKvm:
        return ZoneKvm(
            exits=_since(self.exits, earlier.exits),
            userspace_exits=_since(self.userspace_exits, earlier.userspace_exits),
            pio={k: d for k, v in self.pio.items() if (d := v.since(earlier.pio.get(k))).count},
            mmio={k: d for k, v in self.mmio.items() if (d := v.since(earlier.mmio.get(k))).count},
            counters=_since(self.counters, earlier.counters),
            exit_latency=self.exit_latency.since(earlier.exit_latency),
            userspace_latency=self.userspace_latency.since(earlier.userspace_latency),
        )

    def to_json(self) -> dict[str, Any]:
        """The `kvm` part of a zone's stats snapshot: names, not codes; bounded keys."""
        return {
            "exits": self.exits_by_reason(),
            "userspace_exits": self.userspace_exits_by_reason(),
            "pio": {k.name: c.count for k, c in sorted(self.pio.items(), key=_pio_order)},
            "mmio": {k.name: c.count for k, c in sorted(self.mmio.items(), key=_mmio_order)},
            "emulated": self.emulated_total,
            "hypercalls": {code_name(c): n for c, n in self.counter(KvmCounter.HYPERCALL).items()},
            "msr_writes": {code_name(m): n for m, n in self.counter(KvmCounter.MSR_WRITE).items()},
            "exit_latency_ns": self.exit_latency.to_json(),
            "userspace_latency_ns": self.userspace_latency.to_json(),
        }


def _pio_order(item: tuple[PioKey, IoCount]) -> tuple[int, int]:
    return item[0].port, item[0].direction


def _mmio_order(item: tuple[MmioKey, IoCount]) -> tuple[int, int]:
    return item[0].page, item[0].access


@dataclass(slots=True)
class KvmSnapshot:
    """Every zone's kvm counters at one moment (CLOCK_MONOTONIC ns)."""

    ts_mono_ns: int
    zones: dict[int, ZoneKvm] = field(default_factory=dict)

    def zone(self, key: int) -> ZoneKvm:
        """A zone's counters; all zero for a zone that did nothing yet."""
        return self.zones.get(key) or ZoneKvm()

    def since(self, earlier: KvmSnapshot) -> KvmSnapshot:
        """The window between two snapshots: counts added after `earlier`."""
        return KvmSnapshot(
            ts_mono_ns=self.ts_mono_ns,
            zones={k: z.since(earlier.zone(k)) for k, z in self.zones.items()},
        )


class KvmSnapshotBuilder:
    """Raw codes and counts in (from kernel maps or replayed records), a KvmSnapshot out.

    With `keys_per_zone`, the builder caps each zone's ports, pages and nonzero counter
    codes as bpf/kvm.c does (the replay's case); without it the keys come capped already.
    """

    def __init__(self, keys_per_zone: int | None = None) -> None:
        self._zones: dict[int, ZoneKvm] = {}
        self._keys_per_zone = keys_per_zone
        self._made: dict[tuple[int, str], int] = {}  # (zone, map) -> keys made (new_key)
        self.unknown_hist_kinds = 0

    def _capped(self, zone_key: int, known: dict[Any, Any], key: Any, other: Any) -> Any:
        """`key`, or `other` when it is new and its zone has made its share of keys."""
        if self._keys_per_zone is None or key in known:
            return key
        kind = type(key).__name__
        made = self._made.get((zone_key, kind), 0)
        if made >= self._keys_per_zone:
            return other
        self._made[zone_key, kind] = made + 1
        return key

    def _zone(self, zone_key: int) -> ZoneKvm:
        zone = self._zones.get(zone_key)
        if zone is None:
            zone = self._zones[zone_key] = ZoneKvm()
        return zone

    def exit(self, zone_key: int, vcpu: int, isa: int, reason: int, n: int = 1) -> None:
        exits = self._zone(zone_key).exits
        key = ExitKey(vcpu, isa, reason)
        exits[key] = exits.get(key, 0) + n

    def userspace_exit(self, zone_key: int, reason: int, err: int = 0, n: int = 1) -> None:
        uexits = self._zone(zone_key).userspace_exits
        key = UserspaceExitKey(reason, err)
        uexits[key] = uexits.get(key, 0) + n

    def pio(self, zone_key: int, port: int, direction: int, n: int = 1, nbytes: int = 0) -> None:
        pio = self._zone(zone_key).pio
        key = self._capped(zone_key, pio, PioKey(port, direction), PioKey(OTHER, direction))
        c = pio.setdefault(key, IoCount())
        c.count += n
        c.bytes += nbytes

    def mmio(self, zone_key: int, gpa: int, access: int, n: int = 1, nbytes: int = 0) -> None:
        mmio = self._zone(zone_key).mmio
        page = OTHER if gpa == OTHER else gpa & PAGE_MASK
        key = self._capped(zone_key, mmio, MmioKey(page, access), MmioKey(OTHER, access))
        c = mmio.setdefault(key, IoCount())
        c.count += n
        c.bytes += nbytes

    def counter(self, zone_key: int, kind: int, code: int, n: int = 1) -> None:
        counters = self._zone(zone_key).counters
        key = CounterKey(kind, code)
        if code:
            key = self._capped(zone_key, counters, key, CounterKey(kind, OTHER))
        counters[key] = counters.get(key, 0) + n

    def latency(self, zone_key: int, kind: int, slot: int, n: int = 1) -> None:
        zone = self._zone(zone_key)
        if kind == HistKind.KVM_EXIT:
            zone.exit_latency.add(slot, n)
        elif kind == HistKind.KVM_USERSPACE:
            zone.userspace_latency.add(slot, n)
        else:
            self.unknown_hist_kinds += n

    def build(self, ts_mono_ns: int) -> KvmSnapshot:
        return KvmSnapshot(ts_mono_ns=ts_mono_ns, zones=self._zones)
