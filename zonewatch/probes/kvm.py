"""The kvm channel's probe: bpf/kvm.c on the kvm:* tracepoints, filtered by zone thread.

Counts live in kernel maps; collect() reads them in batches into a cumulative KvmSnapshot
(kvm_stats). poll() returns the few sampled records (hypercalls, MSR writes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from zonewatch.model import Zone, vcpu_tids, zone_pids
from zonewatch.probes.base import LeavingZones, ZonePidFilter, sum_percpu
from zonewatch.probes.kvm_stats import (
    KEYS_PER_ZONE,
    OTHER,
    ExitKey,
    IoCount,
    KvmSnapshot,
    KvmSnapshotBuilder,
    MmioKey,
    PioKey,
    UserspaceExitKey,
    ZoneKvm,
)
from zonewatch.probes.loader import (
    load_program,
    tracepoint_defines,
    tracepoint_fields,
    unload_program,
)
from zonewatch.probes.maps import MapReader, RecordRingReader
from zonewatch.probes.records import (
    KVM_DECODERS,
    KVM_KEY_OTHER,
    CountLostSource,
    HistKind,
    KvmCounter,
    KvmRecord,
)

# The snapshot types are part of this probe's API: importable from here.
__all__ = [
    "DETAIL_TRACEPOINTS",
    "KVM_TRACEPOINTS",
    "LEAN_TRACEPOINTS",
    "OTHER",
    "ExitKey",
    "IoCount",
    "KvmProbe",
    "KvmSnapshot",
    "MmioKey",
    "PioKey",
    "UserspaceExitKey",
    "ZoneKvm",
]

log = logging.getLogger(__name__)

# The kvm tracepoints bpf/kvm.c hooks (each behind -DZW_TP_<name>).
KVM_TRACEPOINTS = (
    "kvm_exit", "kvm_entry", "kvm_userspace_exit", "kvm_fpu",
    "kvm_pio", "kvm_mmio", "kvm_fast_mmio",
    "kvm_emulate_insn", "kvm_cpuid", "kvm_msr",
    "kvm_hypercall", "kvm_hv_hypercall", "kvm_xen_hypercall",
)  # fmt: skip

# Fire per emulated guest instruction (real mode under PVM emulates every one) and per
# KVM_RUN (FPU load/put): the emulation counts and the VMM-time-per-exit histogram cost
# the zone most, so `zonewatch run` attaches them only with --kvm-detail.
DETAIL_TRACEPOINTS = ("kvm_emulate_insn", "kvm_fpu")
LEAN_TRACEPOINTS = tuple(tp for tp in KVM_TRACEPOINTS if tp not in DETAIL_TRACEPOINTS)

# The per-zone counter maps collect() reads.
COUNTER_MAPS = ("exits", "uexits", "pio", "mmio", "counters", "hist")
# Per-zone bookkeeping keyed by the zone key: the sample budget, the keys made (new_key).
ZONE_KEYED_MAPS = ("budget", "zone_keys")

# Tracepoints attached raw when their format is exactly this (so TP_PROTO is the one
# bpf/kvm.c reads its arguments from): the ones that fire per exit. A raw tracepoint
# hands the program the call's arguments; a classic one first copies them into a trace
# record at every firing.
# kvm_mmio's `val` was a u64 on older kernels and is a pointer now; bpf/kvm.c reads only the
# arguments before it, the same in both.
RAW_FORMATS: dict[str, set[str]] = {
    "kvm_fpu": {"load"},
    "kvm_emulate_insn": {"rip", "csbase", "len", "insn", "flags", "failed"},
    "kvm_userspace_exit": {"reason", "errno"},
    "kvm_pio": {"rw", "port", "size", "count", "val"},
    "kvm_mmio": {"type", "len", "gpa", "val"},
    "kvm_fast_mmio": {"gpa"},
    "kvm_msr": {"write", "ecx", "data", "exception"},
}


def _or_other(key: Any, value: int) -> int:
    """A map key's port, page or code, or OTHER for the zone's keys past its budget."""
    return OTHER if key.flags & KVM_KEY_OTHER else int(value)


def _zone_key(key: Any, value: Any) -> int:
    """The zone of a map entry: in the key of counter maps, in the value of `vcpus`."""
    holder = key if hasattr(key, "zone_key") else value
    return int(holder.zone_key)


class KvmProbe:
    """Loads bpf/kvm.c; counts per zone in kernel maps, samples hypercalls and MSR writes."""

    name = "kvm"

    def __init__(
        self,
        *,
        ringbuf_pages: int = 64,
        samples_per_sec: int = 64,
        max_counters: int = 16384,
        max_vcpu_threads: int = 8192,
        keys_per_zone: int = KEYS_PER_ZONE,
        tracepoints: Sequence[str] = KVM_TRACEPOINTS,
        raw: bool = True,
    ) -> None:
        """`raw=False` attaches every tracepoint classic (the fallback path, for tests)."""
        self._ringbuf_pages = ringbuf_pages
        self._samples_per_sec = samples_per_sec
        self._max_counters = max_counters
        self._max_vcpu_threads = max_vcpu_threads
        self._keys_per_zone = keys_per_zone
        self._tracepoints = tuple(tracepoints)
        self._raw_allowed = raw
        self._bpf: Any = None
        self._pids: ZonePidFilter | None = None
        self._tids: ZonePidFilter | None = None
        self._reader: RecordRingReader[KvmRecord] | None = None
        self._maps = MapReader()
        self._zone_keys: set[int] = set()
        self._leaving = LeavingZones()
        self.attached: list[str] = []
        self.missing: list[str] = []
        self.raw: list[str] = []  # tracepoints attached raw (see bpf/kvm.c)

    def attach(self) -> None:
        cflags, self.missing = tracepoint_defines("kvm", self._tracepoints)
        self.attached = [tp for tp in self._tracepoints if tp not in self.missing]
        if self.missing:
            log.info("kvm probe: no tracepoint for %s; not watched", ", ".join(self.missing))
        if "vcpu_id" in tracepoint_fields("kvm", "kvm_exit"):
            cflags.append("-DZW_KVM_EXIT_VCPU_ID=1")  # older kernels (4.x) lack it
        self.raw = [
            tp
            for tp, fields in RAW_FORMATS.items()
            if self._raw_allowed and tp in self.attached and tracepoint_fields("kvm", tp) == fields
        ]
        cflags += [f"-DZW_RAW_{tp}=1" for tp in self.raw]
        cflags += [
            f"-DZW_RINGBUF_PAGES={self._ringbuf_pages}",
            f"-DZW_KVM_SAMPLES_PER_SEC={self._samples_per_sec}",
            f"-DZW_MAX_COUNTERS={self._max_counters}",
            f"-DZW_MAX_VCPU_THREADS={self._max_vcpu_threads}",
            f"-DZW_KVM_KEYS_PER_ZONE={self._keys_per_zone}",
        ]
        self._bpf = load_program("kvm.c", cflags)
        self._pids = ZonePidFilter(self._bpf[b"zone_pids"])
        self._tids = ZonePidFilter(self._bpf[b"zone_tids"])
        self._reader = RecordRingReader(self._bpf, "events", KVM_DECODERS)

    @property
    def bpf(self) -> Any:
        return self._bpf

    def set_zones(self, zones: Sequence[Zone]) -> None:
        """Attribute by vCPU tid first, then by VMM tgid (vCPU threads not yet inventoried)."""
        assert self._pids is not None, "attach() first"
        assert self._tids is not None
        self._pids.sync(zone_pids(zones))
        self._tids.sync(vcpu_tids(zones))
        keys = {z.key for z in zones}
        # Gone zones' entries (and their threads' state) are read one last time by the next
        # collect(), then deleted.
        self._leaving.follow(self._zone_keys, keys)
        self._zone_keys = keys

    def vcpu_threads(self) -> dict[int, int]:
        """Threads seen running KVM_RUN for a zone (tid -> zone key): every thread with a
        state in `vcpus`, which a zone thread gets at its first exit. The kernel drops a
        thread's state as it exits, so a dead thread leaves and a reused tid starts over.
        Named or not: this is how a zone whose threads have no names (Kata's QEMU) shows
        its vCPUs. States of zones that already left the inventory are skipped."""
        assert self._bpf is not None, "attach() first"
        return {
            tid if isinstance(tid, int) else int(tid.value): int(st.zone_key)
            for tid, st in self._maps.items(self._bpf[b"vcpus"])
            if st.zone_key in self._zone_keys
        }

    def ring_fds(self) -> list[int]:
        return [self._reader.fd] if self._reader else []

    def poll(self, timeout_ms: int) -> list[KvmRecord]:
        assert self._reader is not None, "attach() first"
        return self._reader.poll(timeout_ms)

    def collect(self) -> KvmSnapshot:
        """Every zone's cumulative counters, read from the kernel maps in batches.

        The per-zone maps hold what exited threads folded into them; live vCPU threads'
        shares (emulated instructions, latency slots) are added from their state. The maps
        are read before the states, so a thread exiting in between is missed once and
        counted by the next call: the counts never go backwards.

        Zones that left the inventory since the last call appear one last time, then their
        entries are deleted so the maps only hold live zones; the call after that deletes
        what a program already running at that moment added back.
        """
        assert self._bpf is not None, "attach() first"
        bpf = self._bpf
        b = KvmSnapshotBuilder()
        ts = time.monotonic_ns()
        retired, purged = self._leaving.next_collect()
        gone = retired | purged
        # States first: a thread without one counts nothing more (its tid and tgid already
        # left zone_tids and zone_pids), so the maps' entries are not made again.
        stale: dict[str, list[Any]] = {name: [] for name in ("vcpus", *COUNTER_MAPS)}

        def read(name: str) -> list[tuple[Any, Any]]:
            items = self._maps.items(bpf[name.encode()])
            if not gone:
                return items
            reported = []
            for k, v in items:
                zone = _zone_key(k, v)
                if zone in gone:
                    stale[name].append(k)
                if zone not in purged:
                    reported.append((k, v))
            return reported

        for k, v in read("exits"):
            b.exit(k.zone_key, k.vcpu_id, k.isa, k.reason, int(v))
        for k, v in read("uexits"):
            b.userspace_exit(k.zone_key, k.reason, k.err, int(v))
        for k, v in read("pio"):
            b.pio(k.zone_key, _or_other(k, k.port), k.dir, v.count, v.total)
        for k, v in read("mmio"):
            b.mmio(k.zone_key, _or_other(k, k.page), k.access, v.count, v.total)
        for k, v in read("counters"):
            b.counter(k.zone_key, k.kind, _or_other(k, k.code), int(v))
        for k, v in read("hist"):
            b.latency(k.zone_key, k.kind, k.slot, int(v))
        for _tid, st in read("vcpus"):
            zone = st.zone_key
            if st.emulated:
                b.counter(zone, KvmCounter.EMULATE, 0, st.emulated)
            if st.emulate_failed:
                b.counter(zone, KvmCounter.EMULATE_FAILED, 0, st.emulate_failed)
            for slot, n in enumerate(st.exit_lat):
                if n:
                    b.latency(zone, HistKind.KVM_EXIT, slot, n)
            for slot, n in enumerate(st.user_lat):
                if n:
                    b.latency(zone, HistKind.KVM_USERSPACE, slot, n)
        for name in ZONE_KEYED_MAPS:  # keyed by the zone key itself: nothing to read
            stale[name] = list(gone)
        for name, keys in stale.items():
            if keys:
                self._maps.delete(bpf[name.encode()], keys)
        return b.build(ts)

    def lost(self) -> dict[str, int]:
        """Cumulative losses by source. `kvm.rate_limited` are samples over the per-zone
        budget: still counted in the maps, just not sent as records."""
        if self._bpf is None or self._reader is None:
            return {}
        table = self._bpf[b"lost"]
        return {
            "kvm.ringbuf": sum_percpu(table, CountLostSource.RINGBUF),
            "kvm.map_full": sum_percpu(table, CountLostSource.MAP_FULL),
            "kvm.rate_limited": sum_percpu(table, CountLostSource.RATE_LIMITED),
            "kvm.state_full": sum_percpu(table, CountLostSource.STATE_FULL),
            "kvm.decode": self._reader.errors.total,
        }

    def detach(self) -> None:
        if self._bpf is not None:
            unload_program(self._bpf)
            self._bpf = None
            self._pids = None
            self._tids = None
            self._reader = None
            self._zone_keys = set()
            self._leaving.clear()
