"""The net channel's probe: bpf/net.c as tc programs on every zone's tap.

The programs count each zone's frames and keep a flow table in the kernel; the ring buffer
carries only new flows, TCP ends (FIN both ways, RST) and DNS queries. User space:
- keeps our tc filters (probes/tc.py says where) on each tap the inventory names, in the
  network namespace the tap lives in (a Kata pod's own: probes/netns.py), and a map
  (namespace, ifindex) -> zone the programs attribute by; the programs attached in a
  namespace are an instance of their own, its inode number patched in (bpf/net.c);
- says which zone's traffic it cannot see, and why (blind_spots());
- ends flows idle for `idle_timeout_s` (flow_end records made here, `idle` set);
- reads the per-zone counters and the flow table in `collect()`.

DNS questions are parsed here (probes/dns.py), in Python, from the bytes the kernel copied.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import struct
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from zonewatch.errors import EnvironmentProblem
from zonewatch.model import NetEvent, NetNs, Zone, ZoneRef, ZoneStats
from zonewatch.probes import tc
from zonewatch.probes.base import LeavingZones, sum_percpu
from zonewatch.probes.dns import DnsQuestion, escape_label, parse_dns_query
from zonewatch.probes.loader import import_bcc, load_program, unload_program
from zonewatch.probes.maps import MapReader, RecordRingReader
from zonewatch.probes.net_addresses import ZoneAddresses
from zonewatch.probes.netns import Namespace, own_inode
from zonewatch.probes.records import (
    NET_DECODERS,
    NETNS_UNPATCHED,
    CountLostSource,
    FlowKey,
    FlowTotals,
    NetDir,
    NetOp,
    NetRecord,
    flow_key,
    flow_totals,
)

log = logging.getLogger(__name__)

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
NET_OPS = {NetOp.FLOW_START: "flow_start", NetOp.FLOW_END: "flow_end", NetOp.DNS: "dns"}
# For the per-record path: NetOp.X is a metaclass lookup each time (~0.25 us).
_DNS, _FLOW_END, _EGRESS = NetOp.DNS, NetOp.FLOW_END, NetDir.EGRESS
TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")

# Small bounded caches on the per-record path: a host's flows name few distinct addresses
# and taps, and a zone asks the same names over and over. Emptied when full (a guest
# choosing endless new values costs a refill, never memory).
CACHE_MAX = 4096
_ip_texts: dict[bytes, str] = {}
# (zone key, tap ifindex) -> tap name, as the probe found it in the zone's namespace: the
# host's if_indextoname() would name another device (every Kata pod's tap has ifindex 3).
_zone_taps: dict[tuple[int, int], str] = {}
_dns_questions: dict[bytes, DnsQuestion] = {}


def ip_text(raw: bytes) -> str:
    text = _ip_texts.get(raw)
    if text is None:
        text = str(ipaddress.ip_address(raw)) if len(raw) in (4, 16) else ""
        if len(_ip_texts) >= CACHE_MAX:
            _ip_texts.clear()
        _ip_texts[raw] = text
    return text


def proto_name(proto: int) -> str:
    return PROTO_NAMES.get(proto, str(proto))


def tcp_flag_names(flags: int) -> list[str]:
    return [name for bit, name in enumerate(TCP_FLAG_NAMES) if flags & (1 << bit)]


# Every combination of the eight named flags, as NetEvent.tcp_flags holds it.
_TCP_FLAGS = tuple(tuple(tcp_flag_names(bits)) for bits in range(256))


def remember_tap(zone_key: int, ifindex: int, name: str) -> None:
    """The zone's tap at `ifindex` is `name` (zone keys are never reused: no entry goes
    stale; the table is emptied when full)."""
    if len(_zone_taps) >= CACHE_MAX:
        _zone_taps.clear()
    _zone_taps[(zone_key, ifindex)] = name


def _tap_name(zone_key: int, ifindex: int) -> str:
    return _zone_taps.get((zone_key, ifindex), "")


def _dns_question(msg: bytes) -> DnsQuestion:
    """parse_dns_query(msg), remembered by everything after the message id (the rest of
    the header and the question decide the result)."""
    key = msg[2:]
    question = _dns_questions.get(key)
    if question is None:
        question = parse_dns_query(msg)
        if len(_dns_questions) >= CACHE_MAX:
            _dns_questions.clear()
        _dns_questions[key] = question
    return question


def net_event(rec: NetRecord, zone: Zone, wall_ns: int, ref: ZoneRef | None = None) -> NetEvent:
    """A net record as the `net` event of its zone (wall_ns: the record's time; ref: the
    zone's ZoneRef when the caller has it)."""
    key, flow = rec.key, rec.flow
    # Flows are told from their initiator's side, a DNS query from its packet's.
    outward = (rec.dir if rec.op == _DNS else flow.initiator) == _EGRESS
    local = (ip_text(key.local_ip), key.local_port)
    remote = (ip_text(key.remote_ip), key.remote_port)
    (src_ip, src_port), (dst_ip, dst_port) = (local, remote) if outward else (remote, local)
    event = NetEvent(
        ts_ns=wall_ns,
        zone=zone.ref if ref is None else ref,
        op=NET_OPS[rec.op],
        direction="egress" if outward else "ingress",
        proto=proto_name(key.proto),
        src_ip=src_ip,
        dst_ip=dst_ip,
        src_port=src_port,
        dst_port=dst_port,
        bytes=flow.tx_bytes + flow.rx_bytes,
        packets=flow.tx_packets + flow.rx_packets,
        tx_bytes=flow.tx_bytes,
        rx_bytes=flow.rx_bytes,
        tx_packets=flow.tx_packets,
        rx_packets=flow.rx_packets,
        tx_payload=flow.tx_payload,
        rx_payload=flow.rx_payload,
        tcp_flags=_TCP_FLAGS[flow.tcp_flags & 0xFF],
        tap=_tap_name(rec.zone_key, flow.ifindex),
    )
    if rec.op == _FLOW_END:
        event.end_reason = "idle" if rec.idle else ("rst" if flow.tcp_flags & 0x04 else "fin")
        event.duration_s = max(flow.last_mono_ns - flow.first_mono_ns, 0) / 1e9
    elif rec.op == _DNS:
        question = _dns_question(rec.dns)
        event.dns_qname = question.qname
        event.dns_qtype = question.qtype_name
        event.dns_error = question.error
    return event


# ---- counters and the flow table ----------------------------------------------------------


@dataclass(slots=True)
class ZoneNet:
    """One zone's packet counters (tx: the zone sent; rx: it was sent), cumulative as read,
    or a window after since()."""

    tx_bytes: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    rx_packets: int = 0
    new_flows: int = 0
    dns_queries: int = 0
    malformed: int = 0
    truncated: int = 0
    fragments: int = 0
    other: int = 0

    @property
    def bad(self) -> int:
        """Frames whose headers did not parse: malformed or truncated."""
        return self.malformed + self.truncated

    def since(self, earlier: ZoneNet) -> ZoneNet:
        names = ZoneNet.__slots__
        now = [getattr(self, n) for n in names]
        before = [getattr(earlier, n) for n in names]
        if any(a < b for a, b in zip(now, before, strict=True)):  # reset: counts from zero
            return ZoneNet(*now)
        return ZoneNet(*(a - b for a, b in zip(now, before, strict=True)))

    def to_json(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in ZoneNet.__slots__}


@dataclass(slots=True)
class NetSnapshot:
    """Every zone's counters and the flow table at one moment (CLOCK_MONOTONIC ns)."""

    ts_mono_ns: int
    zones: dict[int, ZoneNet] = field(default_factory=dict)
    flows: list[tuple[FlowKey, FlowTotals]] = field(default_factory=list)

    def zone(self, key: int) -> ZoneNet:
        return self.zones.get(key) or ZoneNet()

    def since(self, earlier: NetSnapshot) -> NetSnapshot:
        return NetSnapshot(
            ts_mono_ns=self.ts_mono_ns,
            zones={k: z.since(earlier.zone(k)) for k, z in self.zones.items()},
            flows=self.flows,
        )


def fill_net(stats: ZoneStats, window: ZoneNet, seconds: float) -> None:
    """A zone's net window as rates (ZoneStats' rx/tx are from the zone's point of view)."""
    stats.rx_bytes_per_s = window.rx_bytes / seconds
    stats.tx_bytes_per_s = window.tx_bytes / seconds
    stats.rx_packets_per_s = window.rx_packets / seconds
    stats.tx_packets_per_s = window.tx_packets / seconds
    stats.new_flows_per_s = window.new_flows / seconds
    stats.malformed_per_s = window.bad / seconds


def _sum_counters(value: Any) -> ZoneNet:
    """A per-CPU counters value (one struct per CPU) summed into a ZoneNet."""
    z = ZoneNet()
    for c in value:
        z.tx_bytes += c.bytes[0]
        z.rx_bytes += c.bytes[1]
        z.tx_packets += c.packets[0]
        z.rx_packets += c.packets[1]
        z.new_flows += c.new_flows
        z.dns_queries += c.dns_queries
        z.malformed += c.malformed
        z.truncated += c.truncated
        z.fragments += c.fragments
        z.other += c.other
    return z


# ---- the probe --------------------------------------------------------------------------

# Zones with a slot in bpf/net.c's `counters` array at once (ZW_MAX_ZONE_IFS).
MAX_ZONES = 4096


class CounterSlots:
    """Which zone owns which index of the per-CPU `counters` array.

    A zone keeps its slot while any of its taps comes and goes (its counters live on), and
    gives it back once collect() has reported it gone; a slot is zeroed before reuse."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._by_zone: dict[int, int] = {}
        self._free: list[int] = []
        self._next = 0

    def get(self, zone_key: int) -> int | None:
        return self._by_zone.get(zone_key)

    def items(self) -> list[tuple[int, int]]:
        return list(self._by_zone.items())

    def assign(self, zone_key: int) -> int | None:
        """A free slot for the zone, or None when all are taken."""
        if self._free:
            slot = self._free.pop()
        elif self._next < self._capacity:
            slot, self._next = self._next, self._next + 1
        else:
            return None
        self._by_zone[zone_key] = slot
        return slot

    def release(self, zone_key: int) -> None:
        slot = self._by_zone.pop(zone_key, None)
        if slot is not None:
            self._free.append(slot)


_SCHED_CLS = 3  # BPF_PROG_TYPE_SCHED_CLS
_LD_IMM64 = 0x18


def placeholder_offsets(insns: bytes | bytearray) -> list[int]:
    """Offsets of the ld_imm64 instructions loading ZW_NETNS_UNPATCHED (netns_id())."""
    low, high = NETNS_UNPATCHED & 0xFFFFFFFF, NETNS_UNPATCHED >> 32
    return [
        at
        for at in range(0, len(insns) - 15, 8)
        if insns[at] == _LD_IMM64
        and struct.unpack_from("<I", insns, at + 4)[0] == low
        and struct.unpack_from("<I", insns, at + 12)[0] == high
    ]


# A namespace other than the agent's is entered (a fork in pyroute2: 11-15 ms) only when the
# taps wanted there changed, or, while one of them could not be watched, at most this often.
RETRY_S = 5.0


@dataclass(slots=True, frozen=True)
class TapRef:
    """A tap as the inventory names it: its network namespace (inode) and its name."""

    netns: int
    name: str


@dataclass(slots=True)
class Watched:
    """A tap our filters are on, and the devices (by ifindex) zone_ifs names for its zone:
    the tap, and the device whose filters redirect to it when the tap has no egress hook."""

    zone_key: int
    ifindex: int
    devices: tuple[int, ...]
    placed: list[tc.Placed]
    created_clsact: int | None


@dataclass(slots=True)
class Space:
    """A network namespace with taps we watch or want to (held open while we do)."""

    ns: Namespace
    netns_id: int = NETNS_UNPATCHED  # what our programs attached here take it for
    fds: dict[str, int] = field(default_factory=dict)  # their instances: program name -> fd
    entered: bool = False  # programs loaded and a dead agent's leftovers cleared
    taps: dict[str, Watched] = field(default_factory=dict)
    dirty: bool = True  # the taps wanted here changed since the last visit
    retry_at: float = 0.0


class NetProbe:
    """Loads bpf/net.c and keeps its tc filters on the zones' taps."""

    name = "net"

    def __init__(
        self,
        *,
        ringbuf_pages: int = 64,
        max_flows: int = 65536,
        idle_timeout_s: float = 30.0,
        ended_linger_s: float = 5.0,
        sweep_interval_s: float = 1.0,
        max_zones: int = MAX_ZONES,
        per_netns_programs: bool = True,
    ) -> None:
        self._ringbuf_pages = ringbuf_pages
        self._max_zones = max_zones
        self._max_flows = max_flows
        self.idle_timeout_s = idle_timeout_s
        self.ended_linger_s = ended_linger_s  # an ended TCP flow's trailing ACKs count here
        self.sweep_interval_s = sweep_interval_s
        # False: one program for every namespace, as where instances cannot be patched (tests)
        self._want_instances = per_netns_programs
        self.per_netns_programs = False  # whether namespaces are told apart (attach() says)
        self._shared_fds: dict[str, int] = {}  # the programs as bcc loaded them (unpatched)
        self._bpf: Any = None
        self._tc: tc.TcFilters | None = None
        self._reader: RecordRingReader[NetRecord] | None = None
        self._maps = MapReader()
        self._own = own_inode()
        self._wanted: dict[TapRef, int] = {}  # tap -> zone key, as the inventory says
        self._paths: dict[int, NetNs] = {}  # namespace inode -> where to enter it
        self._spaces: dict[int, Space] = {}  # namespace inode -> our state there
        self._devices: dict[tuple[int, int], int] = {}  # zone_ifs keys we set -> zone key
        self._slots = CounterSlots(max_zones)  # zone key -> its index in `counters`
        self._blind: dict[TapRef, tuple[int, str, str]] = {}  # -> (zone key, cause, why)
        self._zone_keys: set[int] = set()
        self._leaving = LeavingZones()  # zones gone: their slots go after a last collect()
        self._ended_zones: set[int] = set()  # zones gone whose flows the next sweep ends
        self._next_sweep = 0.0
        self.addresses = ZoneAddresses()
        self.attach_errors = 0  # taps found unwatchable (each cause once while it lasts)
        self.blind_counts: Counter[str] = Counter()  # the same, by cause
        self.leftovers_removed = 0
        self.netns_entries = 0  # visits of namespaces other than the agent's (each a fork)

    @property
    def bpf(self) -> Any:
        return self._bpf

    @property
    def attached_taps(self) -> dict[str, int]:
        """Tap name -> ifindex of every tap in the agent's namespace our filters are on."""
        space = self._spaces.get(self._own)
        return {name: w.ifindex for name, w in space.taps.items()} if space else {}

    def watched(self) -> dict[TapRef, int]:
        """Every tap our filters are on -> its zone key."""
        return {
            TapRef(inode, name): w.zone_key
            for inode, space in self._spaces.items()
            for name, w in space.taps.items()
        }

    def blind_spots(self) -> dict[int, str]:
        """Zone key -> why the net channel does not (fully) see that zone's traffic; zones
        seen fully are absent."""
        out: dict[int, list[str]] = {}
        for ref, (key, _cause, why) in sorted(self._blind.items(), key=lambda kv: kv[0].name):
            out.setdefault(key, []).append(f"{self._where(ref)}: {why}")
        return {key: "; ".join(reasons) for key, reasons in out.items()}

    def blind_causes(self) -> dict[int, dict[str, str]]:
        """Zone key -> cause (one of BLIND_CAUSES) -> why, for each zone the net channel
        does not (fully) see; the causes are a fixed set (bounded metric labels)."""
        out: dict[int, dict[str, list[str]]] = {}
        for ref, (key, cause, why) in sorted(self._blind.items(), key=lambda kv: kv[0].name):
            out.setdefault(key, {}).setdefault(cause, []).append(f"{self._where(ref)}: {why}")
        return {
            key: {cause: "; ".join(whys) for cause, whys in causes.items()}
            for key, causes in out.items()
        }

    def attach(self) -> None:
        bcc = import_bcc()
        cflags = [
            f"-DZW_RINGBUF_PAGES={self._ringbuf_pages}",
            f"-DZW_MAX_FLOWS={self._max_flows}",
            f"-DZW_MAX_ZONE_IFS={self._max_zones}",
        ]
        self._bpf = load_program("net.c", cflags)
        try:
            self._shared_fds = {
                name: self._bpf.load_func(name.encode(), bcc.BPF.SCHED_CLS).fd
                for name in (tc.TX_PROGRAM, tc.RX_PROGRAM)
            }
        except Exception as exc:  # bcc raises bare Exception when the verifier refuses
            self.detach()
            raise EnvironmentProblem("bpf/net.c", f"tc programs not loaded: {exc}") from exc
        self.per_netns_programs = self._want_instances and all(
            len(placeholder_offsets(self._bpf.dump_func(n.encode()))) == 1 for n in self._shared_fds
        )
        if self._want_instances and not self.per_netns_programs:
            # A compiler that folded netns_id(): one program everywhere, one zone per ifindex.
            log.warning(
                "net probe: cannot patch bpf/net.c per namespace; taps sharing an ifindex in "
                "different namespaces are watched for one zone only"
            )
            self.blind_counts["unpatchable_program"] += 1
        self._tc = tc.TcFilters()
        self._reader = RecordRingReader(self._bpf, "events", NET_DECODERS)
        own = Namespace.own()
        space = self._spaces[self._own] = Space(own)
        with own.route() as ipr:
            self._enter(space, ipr)

    def _instance(self, name: str, netns: int) -> int:
        """A fd of program `name` whose netns_id() returns `netns`."""
        from bcc.libbcc import lib

        insns = bytearray(self._bpf.dump_func(name.encode()))
        (at,) = placeholder_offsets(insns)
        struct.pack_into("<I", insns, at + 4, netns & 0xFFFFFFFF)  # ld_imm64: low half...
        struct.pack_into("<I", insns, at + 12, netns >> 32)  # ...in the next slot's imm
        buf = ctypes.create_string_buffer(bytes(insns), len(insns))
        module = self._bpf.module
        fd = lib.bcc_func_load(
            module, _SCHED_CLS, name.encode(), buf, len(insns), lib.bpf_module_license(module),
            lib.bpf_module_kern_version(module), 0, None, 0, None, -1,
        )  # fmt: skip
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"{name} for namespace {netns} not loaded")
        return int(fd)

    def _enter(self, space: Space, ipr: Any) -> None:
        """First visit of a namespace: our programs' instance for it, and a dead agent's
        filters cleared."""
        if self.per_netns_programs:
            space.netns_id = space.ns.inode
            space.fds = {name: self._instance(name, space.netns_id) for name in self._shared_fds}
        else:
            space.fds = dict(self._shared_fds)
        removed = tc.clear_leftovers(ipr)
        if removed:
            log.info(
                "net probe: removed %d tc filter(s) a dead agent left in %s",
                removed,
                space.ns.where,
            )
        self.leftovers_removed += removed
        space.entered = True

    def _close(self, space: Space) -> None:
        """Forget a namespace: our program instances for it, and the fd that holds it."""
        if self.per_netns_programs:
            for fd in space.fds.values():
                os.close(fd)
        space.fds = {}
        space.ns.close()

    def set_zones(self, zones: Sequence[Zone]) -> None:
        self.addresses.set_zones(zones)
        taps: dict[TapRef, int] = {}
        self._paths = {}
        for z in zones:
            inode = z.netns.inode if z.netns else self._own
            if z.netns and inode != self._own:
                self._paths.setdefault(inode, z.netns)
            for name in z.taps:
                taps.setdefault(TapRef(inode, name), z.key)
        self._want(taps)
        keys = {z.key for z in zones}
        self._ended_zones |= self._zone_keys - keys
        self._leaving.follow(self._zone_keys, keys)
        self._zone_keys = keys

    def set_taps(self, taps: Mapping[str, int]) -> None:
        """Watch exactly these taps of the agent's own namespace (name -> zone key); the
        rest lose our filters."""
        self._want({TapRef(self._own, name): key for name, key in taps.items()})

    def _want(self, taps: dict[TapRef, int]) -> None:
        changed = {ref.netns for ref, _key in taps.items() ^ self._wanted.items()}
        for inode in changed:
            if inode in self._spaces:
                self._spaces[inode].dirty = True
        self._wanted = taps
        self._sync()

    def _sync(self) -> None:
        """Bring filters and zone_ifs in line with the wanted taps as they exist now (a tap
        may appear after its zone, or be made anew with another ifindex). The agent's own
        namespace is looked at every time; others when something changed there."""
        assert self._bpf is not None, "attach() first"
        now = time.monotonic()
        groups: dict[int, dict[str, int]] = {}
        for ref, key in self._wanted.items():
            groups.setdefault(ref.netns, {})[ref.name] = key
        for ref in self._blind.keys() - self._wanted.keys():
            del self._blind[ref]
        for inode in sorted(groups.keys() | self._spaces.keys()):
            wanted = groups.get(inode, {})
            space = self._spaces.get(inode)
            if space is None:
                if not wanted:
                    continue
                space = self._open(inode, wanted)
                if space is None:
                    continue
            elif inode != self._own and not space.dirty and now < space.retry_at:
                continue
            self._visit(space, wanted, now)
            if inode != self._own and not wanted and not space.taps:
                self._close(space)
                del self._spaces[inode]

    def _open(self, inode: int, wanted: dict[str, int]) -> Space | None:
        netns = self._paths.get(inode)
        try:
            if netns is None:
                raise OSError(f"no process known to be in network namespace {inode}")
            space = self._spaces[inode] = Space(Namespace.open(netns))
        except OSError as exc:
            for name, key in wanted.items():
                self._note_blind(TapRef(inode, name), key, "netns", f"cannot enter it: {exc}")
            return None
        return space

    def _visit(self, space: Space, wanted: dict[str, int], now: float) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        if space.ns.fd is not None:
            self.netns_entries += 1
        try:
            with space.ns.route() as ipr:
                if not space.entered:
                    self._enter(space, ipr)
                self._sync_taps(space, ipr, wanted)
        except (OSError, NetlinkError) as exc:  # TimeoutError (entering) is an OSError
            for name, key in wanted.items():
                if name not in space.taps:
                    self._note_blind(
                        TapRef(space.ns.inode, name), key, "netns", f"cannot enter it: {exc}"
                    )
        pending = any(
            TapRef(space.ns.inode, n) in self._blind for n in wanted if n not in space.taps
        )
        space.dirty = False
        space.retry_at = now + RETRY_S if pending else float("inf")

    def _sync_taps(self, space: Space, ipr: Any, wanted: dict[str, int]) -> None:
        links = {str(link.get_attr("IFLA_IFNAME")): int(link["index"]) for link in ipr.get_links()}
        for name, watched in list(space.taps.items()):
            if name not in wanted or links.get(name) != watched.ifindex:
                self._unwatch(space, ipr, name)
        for name, key in wanted.items():
            ref = TapRef(space.ns.inode, name)
            index = links.get(name)
            if index is None:
                self._note_blind(ref, key, "tap_missing", "no such device there")
                continue
            w = space.taps.get(name)
            if w is None:
                self._watch(space, ipr, ref, index, key)
            elif w.zone_key != key:  # the same tap, now another zone's: no tc change
                slot = self._slot_for(ref, key)
                if slot is None:
                    self._unwatch(space, ipr, name)
                    continue
                self._map_devices(space.netns_id, w.devices, key, slot, index)
                w.zone_key = key
                remember_tap(key, index, name)

    def _slot_for(self, ref: TapRef, key: int) -> int | None:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots.assign(key)
            if slot is None:
                self._note_blind(
                    ref, key, "slots_full", f"all {self._max_zones} zone slots are taken"
                )
                return None
            del self._bpf[b"counters"][slot]  # zeroes it (an array keeps its entries)
        return slot

    def _map_devices(
        self, netns: int, devices: tuple[int, ...], key: int, slot: int, tap: int
    ) -> None:
        zone_ifs = self._bpf[b"zone_ifs"]
        for d in devices:
            zone_ifs[zone_ifs.Key(netns, d)] = zone_ifs.Leaf(key, slot, tap)
            self._devices[(netns, d)] = key

    def _unmap_devices(self, netns: int, devices: tuple[int, ...]) -> None:
        zone_ifs = self._bpf[b"zone_ifs"]
        for d in devices:
            self._devices.pop((netns, d), None)
            with contextlib.suppress(KeyError):
                del zone_ifs[zone_ifs.Key(netns, d)]

    def _watch(self, space: Space, ipr: Any, ref: TapRef, index: int, key: int) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        assert self._tc is not None
        try:
            plan = tc.plan(ipr, index)
        except (tc.Unwatchable, NetlinkError) as exc:
            self._note_blind(ref, key, "tc_refused", str(exc))
            return
        devices = tuple(dict.fromkeys(h.ifindex for h in plan.hooks))
        for d in devices:
            owner = self._devices.get((space.netns_id, d))
            if owner is not None and owner != key:
                why = f"ifindex {d} there is already watched for zone {owner}"
                if not self.per_netns_programs:
                    why += " (our programs cannot tell network namespaces apart here)"
                self._note_blind(ref, key, "ifindex_clash", why)
                return
        slot = self._slot_for(ref, key)
        if slot is None:
            return
        self._map_devices(space.netns_id, devices, key, slot, index)
        try:
            placed = self._tc.add(ipr, plan, space.fds)
        except (NetlinkError, tc.Unwatchable) as exc:
            self._unmap_devices(space.netns_id, devices)
            self._note_blind(ref, key, "tc_refused", str(exc))
            return
        created = index if plan.create_clsact else None
        space.taps[ref.name] = Watched(key, index, devices, placed, created)
        remember_tap(key, index, ref.name)
        self._blind.pop(ref, None)
        if plan.rx is None:
            self._note_blind(
                ref, key, "no_rx_hook", f"frames to the zone are unseen: {plan.rx_missing}"
            )
        seen_on = (
            f", frames to it on ifindex {plan.rx.ifindex}"
            if plan.rx and plan.rx.ifindex != index
            else ""
        )
        log.info("net probe: watching %s (ifindex %d%s)", self._where(ref), index, seen_on)

    def _unwatch(self, space: Space, ipr: Any, name: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        assert self._tc is not None
        w = space.taps.pop(name)
        self._unmap_devices(space.netns_id, w.devices)
        ref = TapRef(space.ns.inode, name)
        try:
            self._tc.remove(ipr, w.placed, w.created_clsact)
        except NetlinkError as exc:
            log.warning("net probe: cannot remove our filters from %s: %s", self._where(ref), exc)
        if self._blind.get(ref, (0, "", ""))[0] == w.zone_key:
            del self._blind[ref]
        log.info("net probe: stopped watching %s", self._where(ref))

    def _where(self, ref: TapRef) -> str:
        return ref.name if ref.netns == self._own else f"{ref.name} (netns {ref.netns})"

    def _note_blind(self, ref: TapRef, key: int, cause: str, why: str) -> None:
        """A tap we can't (fully) watch now: tried again later, but counted and logged
        once for as long as the reason stays the same (a full host would log it every
        second)."""
        if self._blind.get(ref) != (key, cause, why):
            self._blind[ref] = (key, cause, why)
            self.attach_errors += 1
            self.blind_counts[cause] += 1
            log.warning("net probe: cannot watch %s: %s", self._where(ref), why)

    def ring_fds(self) -> list[int]:
        return [self._reader.fd] if self._reader else []

    def poll(self, timeout_ms: int) -> list[NetRecord]:
        assert self._reader is not None, "attach() first"
        records = self._reader.poll(timeout_ms)
        for rec in records:
            if rec.dir == _EGRESS:  # the guest sent it: its source is the zone's
                self.addresses.learn(rec.key.zone_key, rec.key.local_ip)
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.sweep_interval_s
            self._sync()
            records += self.sweep()
        return records

    def sweep(self, now_mono_ns: int | None = None) -> list[NetRecord]:
        """End idle flows (and every flow of a zone that is gone): a flow_end record for
        each not yet ended; ended TCP flows are dropped once they linger past
        `ended_linger_s` (their trailing ACKs count until then)."""
        assert self._bpf is not None, "attach() first"
        now = time.monotonic_ns() if now_mono_ns is None else now_mono_ns
        idle_ns = int(self.idle_timeout_s * 1e9)
        linger_ns = int(self.ended_linger_s * 1e9)
        gone_zones, self._ended_zones = self._ended_zones, set()
        flows = self._bpf[b"flows"]
        ended: list[NetRecord] = []
        stale: list[Any] = []
        for raw_key, raw in self._maps.items(flows):
            age = now - raw.last_ns
            done = bool(raw.state & 4)
            if raw_key.zone_key in gone_zones or age >= (linger_ns if done else idle_ns):
                stale.append(raw_key)
                if done:
                    continue
                try:
                    totals = flow_totals(raw)
                except ValueError:
                    continue  # an initiator this build does not know: nothing to report
                ended.append(
                    NetRecord(
                        zone_key=raw_key.zone_key,
                        ts_mono_ns=now,
                        op=NetOp.FLOW_END,
                        dir=totals.initiator,
                        key=flow_key(raw_key),
                        flow=totals,
                        idle=True,
                    )
                )
        self._maps.delete(flows, stale)
        return ended

    def collect(self) -> NetSnapshot:
        """Every zone's cumulative counters and the flow table as it is now.

        Zones that left the inventory since the last call appear one last time, then their
        counters are deleted."""
        assert self._bpf is not None, "attach() first"
        ts = time.monotonic_ns()
        # A slot is zeroed before its next zone gets it, so no second purge is needed.
        retired, _ = self._leaving.next_collect()
        counters = self._bpf[b"counters"]
        zones = {
            zone_key: _sum_counters(counters.getvalue(counters.Key(slot)))
            for zone_key, slot in self._slots.items()
        }
        for zone_key in retired:
            self._slots.release(zone_key)
        flows: list[tuple[FlowKey, FlowTotals]] = []
        for raw_key, raw in self._maps.items(self._bpf[b"flows"]):
            with contextlib.suppress(ValueError):
                flows.append((flow_key(raw_key), flow_totals(raw)))
        for key, totals in flows:  # flows older than the agent teach addresses too
            if totals.tx_packets:
                self.addresses.learn(key.zone_key, key.local_ip)
        return NetSnapshot(ts_mono_ns=ts, zones=zones, flows=flows)

    def zone_addresses(self) -> Mapping[str, ZoneRef]:
        """Every zone's learned addresses -> its zone (the rules' RuleContext)."""
        return self.addresses.view

    def lost(self) -> dict[str, int]:
        if self._bpf is None or self._reader is None:
            return {}
        table = self._bpf[b"lost"]
        return {
            "net.ringbuf": sum_percpu(table, CountLostSource.RINGBUF),
            "net.map_full": sum_percpu(table, CountLostSource.MAP_FULL),
            "net.decode": self._reader.errors.total,
        }

    def detach(self) -> None:
        """Remove our filters from every tap (in every namespace), then unload the programs."""
        from pyroute2.netlink.exceptions import NetlinkError

        for space in self._spaces.values():
            if self._tc is not None and space.taps:
                try:
                    with space.ns.route() as ipr:
                        for name in list(space.taps):
                            self._unwatch(space, ipr, name)
                except (OSError, NetlinkError) as exc:
                    log.warning("net probe: cannot detach in %s: %s", space.ns.where, exc)
            self._close(space)
        self._spaces = {}
        self._devices = {}
        self._blind = {}
        self._tc = None
        if self._bpf is not None:
            unload_program(self._bpf)
            self._bpf = None
            self._reader = None
        self._zone_keys = set()
        self._leaving.clear()
        self._slots = CounterSlots(self._max_zones)


__all__ = [
    "DnsQuestion",
    "NetDir",
    "NetProbe",
    "NetSnapshot",
    "TapRef",
    "ZoneAddresses",
    "ZoneNet",
    "escape_label",
    "fill_net",
    "parse_dns_query",
]
