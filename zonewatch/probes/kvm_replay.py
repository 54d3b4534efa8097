"""Recorded kvm:* tracepoint text in, the KvmSnapshot the live probe would have made out.

kvm:kvm_exit and kvm:kvm_entry never fire on hosts that emulate the guest (the nested PVM
of the project's machines), so their handling is checked with records captured elsewhere:
the text tracefs prints (trace, trace_pipe, `trace-cmd report`) or `perf script` prints.
Each line is parsed back to the raw codes the BPF program would have seen and fed, with the
same per-thread timestamp logic as bpf/kvm.c, into KvmSnapshotBuilder: the decoding
(kvm_reasons) and everything after it is then the same code as for live counts.

Attribution is the kernel's too: a line's thread id through the vCPU-tid map, then (when
the text carries it) its process id through the tgid map.

What text cannot give back: the kvm_run exit reason of a KVM_RUN that failed with an errno
other than EINTR (the tracepoint prints only "error"); it is counted as KVM_EXIT_UNKNOWN.
"""

from __future__ import annotations

import copy
import errno
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zonewatch.model import Zone, vcpu_tids, zone_pids
from zonewatch.probes.hist import log2_slot
from zonewatch.probes.kvm_reasons import KvmIsa, isa_of_trace_name, parse_trace_reason
from zonewatch.probes.kvm_stats import KEYS_PER_ZONE, KvmSnapshot, KvmSnapshotBuilder
from zonewatch.probes.records import HistKind, KvmCounter, MmioAccess

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_INTR = 10

# tracefs: "<comm>-<tid> [(<tgid>)] [<cpu>] [<flags>] <secs>.<frac>: <event>: <body>"
# (the tgid column appears with options/record-tgid; flags with the latency format).
_TRACEFS = re.compile(
    r"^\s*(?P<comm>.+?)-(?P<tid>\d+)\s+"
    r"(?:\(\s*(?P<tgid>\d+|-+)\)\s+)?"
    r"\[(?P<cpu>\d+)\]\s+"
    r"(?:[^\s\[\]:]{4,6}\s+)?"
    r"(?P<ts>\d+\.\d+):\s+(?P<event>\w+):\s?(?P<body>.*)$"
)
# perf script: "<comm> <tid>|<pid>/<tid> [<cpu>] <secs>.<frac>: <sys>:<event>: <body>"
_PERF = re.compile(
    r"^\s*(?P<comm>.+?)\s+(?P<first>\d+)(?:/(?P<second>\d+))?\s+"
    r"\[(?P<cpu>\d+)\]\s+"
    r"(?P<ts>\d+\.\d+):\s+(?:\d+\s+)?(?P<system>\w+):(?P<event>\w+):\s?(?P<body>.*)$"
)

_EXIT = re.compile(r"^(?:vcpu (?P<vcpu>\d+) )?reason (?P<reason>.+?) rip 0x[0-9a-fA-F]+")
_ENTRY = re.compile(r"^vcpu (?P<vcpu>\d+)")
_UEXIT = re.compile(r"^reason (?P<name>\S+) \((?P<num>-?\d+)\)")
_PIO = re.compile(r"^pio_(?P<rw>read|write) at 0x(?P<port>[0-9a-fA-F]+) size (?P<size>\d+)"
                  r" count (?P<count>\d+)")  # fmt: skip
_MMIO = re.compile(r"^mmio (?P<type>\S+) len (?P<len>\d+) gpa 0x(?P<gpa>[0-9a-fA-F]+)")
_FAST_MMIO = re.compile(r"^fast mmio at gpa 0x(?P<gpa>[0-9a-fA-F]+)")
_EMULATE = re.compile(r"\((?P<mode>real|vm16|prot16|prot32|prot64)\)(?P<failed> failed)?\s*$")
_MSR = re.compile(
    r"^msr_(?P<rw>read|write) (?P<msr>[0-9a-fA-F]+) = 0x[0-9a-fA-F]+(?P<gp> \(#GP\))?"
)
_CPUID = re.compile(r"^func (?P<func>[0-9a-fA-F]+)")
_HYPERCALL = re.compile(r"^nr 0x(?P<nr>[0-9a-fA-F]+)")

_MMIO_TYPES = {
    "unsatisfied-read": MmioAccess.UNSATISFIED_READ,
    "read": MmioAccess.READ,
    "write": MmioAccess.WRITE,
}


@dataclass(slots=True, frozen=True)
class TraceLine:
    """One tracepoint record as printed: who, where, when, which event, and its text."""

    comm: str
    tid: int
    tgid: int | None  # when the format carries it
    cpu: int
    ts_ns: int
    event: str
    body: str


def _is_hex(word: str) -> bool:
    try:
        int(word, 16)
    except ValueError:
        return False
    return True


def _ns(ts: str) -> int:
    secs, _, frac = ts.partition(".")
    return int(secs) * 1_000_000_000 + int(frac.ljust(9, "0")[:9])


def parse_line(line: str) -> TraceLine | None:
    """A tracefs or perf-script line; None for headers, comments and other text."""
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    m = _PERF.match(line)
    if m:
        first, second = int(m["first"]), m["second"]
        tid, tgid = (int(second), first) if second is not None else (first, None)
        return TraceLine(m["comm"], tid, tgid, int(m["cpu"]), _ns(m["ts"]), m["event"], m["body"])
    m = _TRACEFS.match(line)
    if m:
        raw_tgid = m["tgid"]
        tgid = int(raw_tgid) if raw_tgid and raw_tgid.isdigit() else None
        return TraceLine(
            m["comm"], int(m["tid"]), tgid, int(m["cpu"]), _ns(m["ts"]), m["event"], m["body"]
        )
    return None


@dataclass(slots=True)
class _Thread:
    """bpf/kvm.c's struct zw_vcpu_state, for one replayed thread."""

    zone_key: int
    exit_ts: int = 0
    uexit_ts: int = 0


@dataclass(slots=True)
class ReplayErrors:
    """Lines that could not be used, by reason: counted, never raised."""

    malformed: int = 0  # not a tracepoint line of a known format
    bad_body: int = 0  # a known event whose text did not parse
    by_event: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.malformed + self.bad_body


class KvmTraceReplay:
    """Feeds recorded kvm tracepoint text into the builder the live probe uses."""

    def __init__(
        self,
        tid_zones: Mapping[int, int],
        pid_zones: Mapping[int, int] | None = None,
        isa: KvmIsa | None = None,
    ) -> None:
        self._tid_zones = dict(tid_zones)
        self._pid_zones = dict(pid_zones or {})
        self.isa = isa  # None: told by the first exit reason with a name
        self.builder = KvmSnapshotBuilder(KEYS_PER_ZONE)  # capped as the kernel caps them
        self.errors = ReplayErrors()
        self.lines = 0
        self.skipped: dict[str, int] = {}  # events this replay does not count, by name
        self._threads: dict[int, _Thread] = {}
        self._unresolved: list[tuple[int, int, list[str]]] = []  # exits before the ISA was known
        self._last_ts = 0

    @classmethod
    def for_zones(cls, zones: Sequence[Zone], isa: KvmIsa | None = None) -> KvmTraceReplay:
        return cls(vcpu_tids(zones), zone_pids(zones), isa)

    # ---- input ----
    def feed(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.feed_line(line)

    def feed_file(self, path: Path) -> None:
        with path.open(encoding="utf-8", errors="replace") as f:
            self.feed(f)

    def feed_line(self, line: str) -> None:
        rec = parse_line(line)
        if rec is None:
            if line.strip() and not line.lstrip().startswith("#"):
                self.errors.malformed += 1
            return
        self.lines += 1
        self._last_ts = max(self._last_ts, rec.ts_ns)
        handler = _HANDLERS.get(rec.event)
        if handler is None:
            self.skipped[rec.event] = self.skipped.get(rec.event, 0) + 1
            return
        if rec.event in _HOT_EVENTS:
            # As bpf/kvm.c: only threads that already have state count these.
            st = self._threads.get(rec.tid)
            if st is None:
                return
            zone_key = st.zone_key
        else:
            found = self._zone_of(rec)
            if found is None:
                return  # not a zone's thread: the kernel filter would have dropped it
            zone_key = found
            self._thread(rec.tid, zone_key)  # its first per-exit event creates its state
        if not handler(self, rec, zone_key):
            self.errors.bad_body += 1
            self.errors.by_event[rec.event] = self.errors.by_event.get(rec.event, 0) + 1

    def _zone_of(self, rec: TraceLine) -> int | None:
        zone = self._tid_zones.get(rec.tid)
        if zone is None and rec.tgid is not None:
            zone = self._pid_zones.get(rec.tgid)
        return zone

    def _thread(self, tid: int, zone_key: int) -> _Thread:
        st = self._threads.get(tid)
        if st is None:
            st = self._threads[tid] = _Thread(zone_key)
        st.zone_key = zone_key
        return st

    # ---- the events (each returns False when its text does not parse) ----
    def _on_exit(self, rec: TraceLine, zone_key: int) -> bool:
        m = _EXIT.match(rec.body)
        if not m:
            return False
        words = m["reason"].split()
        vcpu = int(m["vcpu"]) if m["vcpu"] is not None else 0  # as bpf/kvm.c without vcpu_id
        if self.isa is None:  # VMX names are single words; SVM has "PF excp" and the like
            self.isa = isa_of_trace_name(words[0]) or isa_of_trace_name(" ".join(words))
        if self.isa is None and not _is_hex(words[0]):
            return False  # a name neither table knows
        self._thread(rec.tid, zone_key).exit_ts = rec.ts_ns
        if self.isa is None:  # a bare code: its ISA is told by a later named reason
            self._unresolved.append((zone_key, vcpu, words))
            return True
        self._flush_unresolved()
        return self._count_exit(zone_key, vcpu, words, self.isa)

    def _count_exit(self, zone_key: int, vcpu: int, words: list[str], isa: int) -> bool:
        try:
            code = parse_trace_reason(words, KvmIsa(isa)) if isa else int(words[0], 16)
        except ValueError:
            return False
        self.builder.exit(zone_key, vcpu, isa, code)
        return True

    def _flush_unresolved(self) -> None:
        pending, self._unresolved = self._unresolved, []
        for zone_key, vcpu, words in pending:
            if not self._count_exit(zone_key, vcpu, words, self.isa or 0):
                self.errors.bad_body += 1

    def _on_entry(self, rec: TraceLine, zone_key: int) -> bool:
        if not _ENTRY.match(rec.body):
            return False
        st = self._threads.get(rec.tid)
        if st is None:
            return True  # bpf/kvm.c has no state for a thread it never saw exit
        if st.exit_ts:
            self._latency(st.zone_key, HistKind.KVM_EXIT, rec.ts_ns - st.exit_ts)
            st.exit_ts = 0
        self._run_begins(st, rec.ts_ns)
        return True

    def _on_userspace_exit(self, rec: TraceLine, zone_key: int) -> bool:
        m = _UEXIT.match(rec.body)
        if not m:
            return False
        num = int(m["num"])
        if m["name"] == "restart":  # KVM_RUN -EINTR: the kernel set KVM_EXIT_INTR
            reason, err = KVM_EXIT_INTR, abs(num) or errno.EINTR
        elif m["name"] == "error":
            reason, err = KVM_EXIT_UNKNOWN, abs(num)
        else:
            reason, err = num, 0
        self.builder.userspace_exit(zone_key, reason, err)
        self._thread(rec.tid, zone_key).uexit_ts = rec.ts_ns
        return True

    def _on_fpu(self, rec: TraceLine, zone_key: int) -> bool:
        body = rec.body.strip()
        if body not in ("load", "unload"):
            return False
        st = self._threads.get(rec.tid)
        if body == "load" and st is not None:
            self._run_begins(st, rec.ts_ns)
        return True

    def _run_begins(self, st: _Thread, ts_ns: int) -> None:
        if st.uexit_ts:
            self._latency(st.zone_key, HistKind.KVM_USERSPACE, ts_ns - st.uexit_ts)
            st.uexit_ts = 0

    def _on_pio(self, rec: TraceLine, zone_key: int) -> bool:
        m = _PIO.match(rec.body)
        if not m:
            return False
        size, count = int(m["size"]), int(m["count"])
        direction = 1 if m["rw"] == "write" else 0
        self.builder.pio(zone_key, int(m["port"], 16) & 0xFFFF, direction, 1, size * count)
        return True

    def _on_mmio(self, rec: TraceLine, zone_key: int) -> bool:
        m = _MMIO.match(rec.body)
        if not m or m["type"] not in _MMIO_TYPES:
            return False
        access = _MMIO_TYPES[m["type"]]
        self.builder.mmio(zone_key, int(m["gpa"], 16), access, 1, int(m["len"]))
        return True

    def _on_fast_mmio(self, rec: TraceLine, zone_key: int) -> bool:
        m = _FAST_MMIO.match(rec.body)
        if not m:
            return False
        self.builder.mmio(zone_key, int(m["gpa"], 16), MmioAccess.FAST_WRITE, 1, 0)
        return True

    def _on_emulate(self, rec: TraceLine, zone_key: int) -> bool:
        m = _EMULATE.search(rec.body)
        if not m:
            return False
        kind = KvmCounter.EMULATE_FAILED if m["failed"] else KvmCounter.EMULATE
        # Code 0, as bpf/kvm.c counts them (per thread, without the mode, to stay cheap).
        self.builder.counter(zone_key, kind, 0)
        return True

    def _on_msr(self, rec: TraceLine, zone_key: int) -> bool:
        m = _MSR.match(rec.body)
        if not m:
            return False
        write, fault = m["rw"] == "write", m["gp"] is not None
        if write:
            kind = KvmCounter.MSR_WRITE_GP if fault else KvmCounter.MSR_WRITE
        else:
            kind = KvmCounter.MSR_READ_GP if fault else KvmCounter.MSR_READ
        self.builder.counter(zone_key, kind, int(m["msr"], 16))
        return True

    def _on_cpuid(self, rec: TraceLine, zone_key: int) -> bool:
        m = _CPUID.match(rec.body)
        if not m:
            return False
        self.builder.counter(zone_key, KvmCounter.CPUID, int(m["func"], 16))
        return True

    def _on_hypercall(self, rec: TraceLine, zone_key: int) -> bool:
        m = _HYPERCALL.match(rec.body)
        if not m:
            return False
        self.builder.counter(zone_key, KvmCounter.HYPERCALL, int(m["nr"], 16))
        return True

    def _latency(self, zone_key: int, kind: HistKind, ns: int) -> None:
        # Timestamps of one thread only grow; a negative gap is a merge artefact: skip it.
        if ns >= 0:
            self.builder.latency(zone_key, kind, log2_slot(ns))

    # ---- output ----
    def snapshot(self) -> KvmSnapshot:
        """The counters so far, as KvmProbe.collect() would return them (a copy: feeding
        more lines later does not change it)."""
        if self._unresolved:  # no exit in the whole text had a name: codes stand alone
            pending, self._unresolved = self._unresolved, []
            for zone_key, vcpu, words in pending:
                if not self._count_exit(zone_key, vcpu, words, 0):
                    self.errors.bad_body += 1
        return copy.deepcopy(self.builder.build(self._last_ts))


# Events bpf/kvm.c counts only for threads that have state (known_thread there).
_HOT_EVENTS = frozenset({"kvm_entry", "kvm_fpu", "kvm_emulate_insn"})

_HANDLERS: dict[str, Callable[[KvmTraceReplay, TraceLine, int], bool]] = {
    "kvm_exit": KvmTraceReplay._on_exit,
    "kvm_entry": KvmTraceReplay._on_entry,
    "kvm_userspace_exit": KvmTraceReplay._on_userspace_exit,
    "kvm_fpu": KvmTraceReplay._on_fpu,
    "kvm_pio": KvmTraceReplay._on_pio,
    "kvm_mmio": KvmTraceReplay._on_mmio,
    "kvm_fast_mmio": KvmTraceReplay._on_fast_mmio,
    "kvm_emulate_insn": KvmTraceReplay._on_emulate,
    "kvm_msr": KvmTraceReplay._on_msr,
    "kvm_cpuid": KvmTraceReplay._on_cpuid,
    "kvm_hypercall": KvmTraceReplay._on_hypercall,
}


def replay_kvm_trace(
    lines: Iterable[str],
    tid_zones: Mapping[int, int],
    pid_zones: Mapping[int, int] | None = None,
    isa: KvmIsa | None = None,
) -> KvmSnapshot:
    """Recorded kvm tracepoint text -> the KvmSnapshot of the zones in the maps."""
    replay = KvmTraceReplay(tid_zones, pid_zones, isa)
    replay.feed(lines)
    return replay.snapshot()
