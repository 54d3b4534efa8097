"""The net channel's probe: bpf/net.c as tc clsact programs on every zone's tap.

The programs count each zone's frames and keep a flow table in the kernel; the ring buffer
carries only new flows, TCP ends (FIN both ways, RST) and DNS queries. User space:
- keeps one pair of tc filters (ingress: the zone's sends, egress: what it is sent) on
  each tap the inventory names, and a map tap ifindex -> zone key the programs attribute by;
- ends flows idle for `idle_timeout_s` (flow_end records made here, `idle` set);
- reads the per-zone counters and the flow table in `collect()`.

Our tc filters are recognised by name: `zw_net_zone_tx:<pid>:<start time>` (and `_rx`), at
a priority of our own. Other filters on a device are never touched; filters whose owner is
no longer running (an agent killed with SIGKILL leaves them) are removed at `attach()`.

DNS questions are parsed here, in Python, from the bytes the kernel copied: the guest
chose every one of them, so parsing is bounded by the buffer and never trusts a length.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zonewatch.errors import EnvironmentProblem
from zonewatch.inventory import procfs
from zonewatch.model import NetEvent, Zone, ZoneRef, ZoneStats
from zonewatch.probes.base import LeavingZones, sum_percpu
from zonewatch.probes.loader import import_bcc, load_program, unload_program
from zonewatch.probes.maps import MapReader, RecordRingReader
from zonewatch.probes.records import (
    NET_DECODERS,
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

# tc clsact parents: ingress sees what the guest sent, egress what is sent to it.
TC_INGRESS = 0xFFFFFFF2
TC_EGRESS = 0xFFFFFFF3
ETH_P_ALL = 0x0003
FILTER_PRIO = 0x5A57  # "ZW": a priority of our own, so ours are told apart at a glance
FILTER_PREFIX = "zw_net_"
PROGRAMS = {TC_INGRESS: "zw_net_zone_tx", TC_EGRESS: "zw_net_zone_rx"}
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
NET_OPS = {NetOp.FLOW_START: "flow_start", NetOp.FLOW_END: "flow_end", NetOp.DNS: "dns"}
# For the per-record path: NetOp.X is a metaclass lookup each time (~0.25 us).
_DNS, _FLOW_END, _EGRESS = NetOp.DNS, NetOp.FLOW_END, NetDir.EGRESS
TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")
DNS_HEADER_LEN = 12
DNS_NAME_MAX = 255  # wire bytes of a name, its final zero included (RFC 1035 2.3.4)
DNS_QTYPES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 10: "NULL", 12: "PTR", 13: "HINFO", 15: "MX",
    16: "TXT", 28: "AAAA", 33: "SRV", 35: "NAPTR", 43: "DS", 46: "RRSIG", 48: "DNSKEY",
    64: "SVCB", 65: "HTTPS", 99: "SPF", 251: "IXFR", 252: "AXFR", 255: "ANY", 257: "CAA",
}  # fmt: skip


# ---- guest-chosen bytes -------------------------------------------------------------------


def escape_label(label: bytes) -> str:
    """A DNS label as text: printable ASCII kept, `.` and `\\` escaped, any other byte as
    `\\DDD` (the master-file notation of RFC 1035 5.1, as dig prints it)."""
    out: list[str] = []
    for b in label:
        if b in (0x2E, 0x5C):
            out.append("\\" + chr(b))
        elif 0x21 <= b <= 0x7E:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


@dataclass(slots=True, frozen=True)
class DnsQuestion:
    """The first question of a DNS query. `error` says why parsing stopped ("" when it did
    not); `qname` then holds the labels read so far."""

    qname: str
    qtype: int
    error: str = ""

    @property
    def qtype_name(self) -> str:
        if self.error:
            return ""
        return DNS_QTYPES.get(self.qtype, f"TYPE{self.qtype}")  # RFC 3597 for the unknown


def parse_dns_query(msg: bytes) -> DnsQuestion:
    """The first question of a DNS message, read strictly within `msg`."""
    if len(msg) < DNS_HEADER_LEN:
        return DnsQuestion("", 0, "short header")
    if int.from_bytes(msg[4:6], "big") == 0:
        return DnsQuestion("", 0, "no question")
    labels: list[bytes] = []

    def name() -> str:
        return ".".join(escape_label(x) for x in labels) or "."

    pos = DNS_HEADER_LEN
    wire = 1  # the final zero
    while True:
        if pos >= len(msg):
            return DnsQuestion(name(), 0, "truncated")
        length = msg[pos]
        pos += 1
        if length == 0:
            break
        if length & 0xC0:
            # A pointer (or a reserved label type) has nothing to point back to in a
            # query's first name: refuse it rather than follow it.
            return DnsQuestion(name(), 0, "compressed or reserved label")
        wire += length + 1
        if wire > DNS_NAME_MAX:
            return DnsQuestion(name(), 0, "name longer than 255 bytes")
        if pos + length > len(msg):
            labels.append(msg[pos:])
            return DnsQuestion(name(), 0, "truncated")
        labels.append(msg[pos : pos + length])
        pos += length
    if pos + 4 > len(msg):
        return DnsQuestion(name(), 0, "truncated")
    return DnsQuestion(name(), int.from_bytes(msg[pos : pos + 2], "big"))


# Small bounded caches on the per-record path: a host's flows name few distinct addresses
# and taps, and a zone asks the same names over and over. Emptied when full (a guest
# choosing endless new values costs a refill, never memory).
CACHE_MAX = 4096
TAP_NAME_TTL_S = 1.0  # an ifindex's name is asked of the kernel again after this long
_ip_texts: dict[bytes, str] = {}
_tap_names: dict[int, tuple[str, float]] = {}
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


def _tap_name(ifindex: int) -> str:
    if not ifindex:
        return ""
    now = time.monotonic()
    known = _tap_names.get(ifindex)
    if known is not None and now - known[1] < TAP_NAME_TTL_S:
        return known[0]
    try:
        name = socket.if_indextoname(ifindex)
    except OSError:  # the tap is gone already
        name = ""
    if len(_tap_names) >= CACHE_MAX:
        _tap_names.clear()
    _tap_names[ifindex] = (name, now)
    return name


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
        tap=_tap_name(flow.ifindex),
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


# ---- tc ---------------------------------------------------------------------------------


def _owner_tag(pid: int) -> str:
    stat = procfs.read_stat(Path("/proc"), pid)
    return f"{pid}:{stat.start_time if stat else 0}"


def _owner_alive(tag: str) -> bool:
    pid_text, _, start_text = tag.partition(":")
    if not pid_text.isdigit():
        return False
    stat = procfs.read_stat(Path("/proc"), int(pid_text))
    return stat is not None and str(stat.start_time) == start_text


def _filter_name(msg: Any) -> str:
    options = msg.get_attr("TCA_OPTIONS")
    if msg.get_attr("TCA_KIND") != "bpf" or not options:
        return ""
    return str(options.get_attr("TCA_BPF_NAME") or "")


def _gone(exc: Exception) -> bool:
    """The device or filter is already gone (a tap deleted with its zone)."""
    return getattr(exc, "code", None) in (errno.ENODEV, errno.ENOENT, errno.EINVAL)


class TcFilters:
    """Our pair of bpf filters on each tap: added, listed and removed by name and handle."""

    def __init__(self, fds: Mapping[int, int]) -> None:
        self._fds = dict(fds)  # tc parent -> program fd
        self._tag = _owner_tag(os.getpid())
        # Two agents (or a test's probe beside an agent) may watch the same host: each
        # gets its own handle within our priority.
        self.handle = 1 + os.getpid() % 0xFFFE
        self.created_qdisc: set[int] = set()

    def name(self, parent: int) -> str:
        return f"{PROGRAMS[parent]}:{self._tag}"

    def add(self, ipr: Any, index: int) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            ipr.tc("add", "clsact", index)
            self.created_qdisc.add(index)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        for parent, fd in self._fds.items():
            ipr.tc(
                "add-filter", "bpf", index, self.handle, fd=fd, name=self.name(parent),
                parent=parent, classid=1, direct_action=True, prio=FILTER_PRIO,
                protocol=ETH_P_ALL,
            )  # fmt: skip

    def remove(self, ipr: Any, index: int) -> None:
        """Remove our filters (and the clsact qdisc, if we added it and it is empty now)."""
        from pyroute2.netlink.exceptions import NetlinkError

        for parent in self._fds:
            try:
                ipr.tc(
                    "del-filter", "bpf", index, self.handle, parent=parent, prio=FILTER_PRIO,
                    protocol=ETH_P_ALL,
                )  # fmt: skip
            except NetlinkError as exc:
                if not _gone(exc):
                    raise
        if index in self.created_qdisc:
            self.created_qdisc.discard(index)
            with contextlib.suppress(NetlinkError):
                if not any(True for _ in self.filters(ipr, index)):
                    ipr.tc("del", "clsact", index)

    @staticmethod
    def filters(ipr: Any, index: int) -> Iterator[tuple[int, Any]]:
        """(parent, filter message) of every filter on the device's clsact hooks."""
        for parent in (TC_INGRESS, TC_EGRESS):
            for msg in ipr.get_filters(index=index, parent=parent):
                if msg["handle"]:  # handle 0 is the chain head each filter kind reports
                    yield parent, msg


def clear_leftovers(ipr: Any) -> int:
    """Remove filters of ours whose owning process is gone, on every device; returns how
    many. Filters of other owners, and of live agents, stay."""
    from pyroute2.netlink.exceptions import NetlinkError

    removed = 0
    indexes = {int(q["index"]) for q in ipr.get_qdiscs() if q.get_attr("TCA_KIND") == "clsact"}
    for index in sorted(indexes):
        try:
            found = list(TcFilters.filters(ipr, index))
        except NetlinkError:
            continue  # the device went away meanwhile
        for parent, msg in found:
            name = _filter_name(msg)
            if not name.startswith(FILTER_PREFIX) or (msg["info"] >> 16) != FILTER_PRIO:
                continue
            if _owner_alive(name.partition(":")[2]):
                continue
            try:
                ipr.tc(
                    "del-filter", "bpf", index, msg["handle"], parent=parent,
                    prio=FILTER_PRIO, protocol=ETH_P_ALL,
                )  # fmt: skip
                removed += 1
            except NetlinkError as exc:
                if not _gone(exc):
                    raise
    return removed


# ---- zone addresses ---------------------------------------------------------------------

MAX_ADDRESSES_PER_ZONE = 16


def _reachable(raw_ip: bytes) -> str:
    """An address as text, or "" when no other zone could reach this one at it."""
    if len(raw_ip) not in (4, 16):
        return ""
    ip = ipaddress.ip_address(raw_ip)
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.is_loopback:
        return ""
    if ip.is_reserved:  # 255.255.255.255 among them
        return ""
    return str(ip)


class ZoneAddresses:
    """Each zone's IP addresses, learned from its tap: the source of what the guest sent.

    What rules read as net.dst_zone / net.dst_tenant / net.dst_other_tenant. Bounded per
    zone (the least recently seen goes first) and dropped with the zone. The first zone to
    use an address keeps it while it lives: a guest spoofing another zone's source address
    cannot take that address over (nor pass its own traffic off as the other tenant's).
    """

    def __init__(self, per_zone: int = MAX_ADDRESSES_PER_ZONE) -> None:
        self._per_zone = per_zone
        self._refs: dict[int, ZoneRef] = {}
        self._by_zone: dict[int, dict[str, None]] = {}  # insertion order = recency
        self._owner: dict[str, int] = {}
        self.view: dict[str, ZoneRef] = {}  # ip -> zone: handed to the rules as is
        self._usable: dict[bytes, str] = {}  # raw address -> _reachable(raw)

    def set_zones(self, zones: Sequence[Zone]) -> None:
        self._refs = {z.key: z.ref for z in zones}
        for key in self._by_zone.keys() - self._refs.keys():
            for ip in self._by_zone.pop(key):
                del self._owner[ip]
                del self.view[ip]
        for ip, key in self._owner.items():  # a zone's name or tenant may have changed
            self.view[ip] = self._refs[key]

    def learn(self, zone_key: int, raw_ip: bytes) -> None:
        ref = self._refs.get(zone_key)
        if ref is None:
            return
        text = self._usable.get(raw_ip)
        if text is None:
            if len(self._usable) >= CACHE_MAX:
                self._usable.clear()
            text = self._usable[raw_ip] = _reachable(raw_ip)
        if not text:
            return  # not an address another zone could reach this one at
        owner = self._owner.get(text)
        if owner is not None and owner != zone_key:
            return
        mine = self._by_zone.setdefault(zone_key, {})
        mine.pop(text, None)
        mine[text] = None
        self._owner[text] = zone_key
        self.view[text] = ref
        if len(mine) > self._per_zone:
            oldest = next(iter(mine))
            del mine[oldest]
            del self._owner[oldest]
            del self.view[oldest]


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
    ) -> None:
        self._ringbuf_pages = ringbuf_pages
        self._max_zones = max_zones
        self._max_flows = max_flows
        self.idle_timeout_s = idle_timeout_s
        self.ended_linger_s = ended_linger_s  # an ended TCP flow's trailing ACKs count here
        self.sweep_interval_s = sweep_interval_s
        self._bpf: Any = None
        self._tc: TcFilters | None = None
        self._reader: RecordRingReader[NetRecord] | None = None
        self._maps = MapReader()
        self._wanted: dict[str, int] = {}  # tap name -> zone key, as the inventory says
        self._attached: dict[int, tuple[str, int]] = {}  # ifindex -> (tap, zone key)
        self._slots = CounterSlots(max_zones)  # zone key -> its index in `counters`
        self._refused: dict[str, str] = {}  # tap name -> why we can't watch it (logged once)
        self._zone_keys: set[int] = set()
        self._leaving = LeavingZones()  # zones gone: their slots go after a last collect()
        self._ended_zones: set[int] = set()  # zones gone whose flows the next sweep ends
        self._next_sweep = 0.0
        self.addresses = ZoneAddresses()
        self.attach_errors = 0
        self.leftovers_removed = 0

    @property
    def bpf(self) -> Any:
        return self._bpf

    @property
    def attached_taps(self) -> dict[str, int]:
        """Tap name -> ifindex of every tap our filters are on now."""
        return {name: index for index, (name, _key) in self._attached.items()}

    def attach(self) -> None:
        bcc = import_bcc()
        cflags = [
            f"-DZW_RINGBUF_PAGES={self._ringbuf_pages}",
            f"-DZW_MAX_FLOWS={self._max_flows}",
            f"-DZW_MAX_ZONE_IFS={self._max_zones}",
        ]
        self._bpf = load_program("net.c", cflags)
        try:
            fds = {
                parent: self._bpf.load_func(name.encode(), bcc.BPF.SCHED_CLS).fd
                for parent, name in PROGRAMS.items()
            }
        except Exception as exc:  # bcc raises bare Exception when the verifier refuses
            self.detach()
            raise EnvironmentProblem("bpf/net.c", f"tc programs not loaded: {exc}") from exc
        self._tc = TcFilters(fds)
        self._reader = RecordRingReader(self._bpf, "events", NET_DECODERS)
        with self._ipr() as ipr:
            self.leftovers_removed = clear_leftovers(ipr)
        if self.leftovers_removed:
            log.info("net probe: removed %d tc filter(s) a dead agent left", self.leftovers_removed)

    @staticmethod
    def _ipr() -> Any:
        from pyroute2 import IPRoute

        try:
            return IPRoute()
        except OSError as exc:
            raise EnvironmentProblem("netlink", f"cannot open a route socket: {exc}") from exc

    def set_zones(self, zones: Sequence[Zone]) -> None:
        self.addresses.set_zones(zones)
        self.set_taps({tap: z.key for z in zones for tap in z.taps})
        keys = {z.key for z in zones}
        self._ended_zones |= self._zone_keys - keys
        self._leaving.follow(self._zone_keys, keys)
        self._zone_keys = keys

    def set_taps(self, taps: Mapping[str, int]) -> None:
        """Watch exactly these taps (name -> zone key); the rest lose our filters."""
        self._wanted = dict(taps)
        self._sync()

    def _sync(self) -> None:
        """Bring filters and the ifindex map in line with the wanted taps as they exist now
        (a tap may appear after its zone, or be made anew with another ifindex)."""
        assert self._bpf is not None, "attach() first"
        assert self._tc is not None
        from pyroute2.netlink.exceptions import NetlinkError

        zone_ifs = self._bpf[b"zone_ifs"]
        with self._ipr() as ipr:
            links = {
                str(link.get_attr("IFLA_IFNAME")): int(link["index"]) for link in ipr.get_links()
            }
            wanted = {
                links[name]: (name, key) for name, key in self._wanted.items() if name in links
            }
            for name in self._refused.keys() - self._wanted.keys():
                del self._refused[name]
            for index in self._attached.keys() - wanted.keys():
                name, _key = self._attached.pop(index)
                with contextlib.suppress(KeyError):
                    del zone_ifs[zone_ifs.Key(index)]
                if index in links.values():
                    self._tc.remove(ipr, index)
                log.info("net probe: stopped watching %s", name)
            for index, (name, key) in wanted.items():
                known = self._attached.get(index)
                if known == (name, key):
                    continue
                slot = self._slots.get(key)
                if slot is None:
                    slot = self._slots.assign(key)
                    if slot is None:
                        self._refuse(name, f"all {self._max_zones} zone slots are taken")
                        continue
                    del self._bpf[b"counters"][slot]  # zeroes it (an array keeps its entries)
                zone_ifs[zone_ifs.Key(index)] = zone_ifs.Leaf(key, slot)
                if known is None:
                    try:
                        self._tc.add(ipr, index)
                    except NetlinkError as exc:
                        del zone_ifs[zone_ifs.Key(index)]
                        self._refuse(name, str(exc))
                        continue
                    log.info("net probe: watching %s (ifindex %d)", name, index)
                self._attached[index] = (name, key)
                self._refused.pop(name, None)

    def _refuse(self, tap: str, reason: str) -> None:
        """A tap we can't watch now: tried again at each sync, but counted and logged once
        for as long as the reason stays the same (a full host would log it every second)."""
        if self._refused.get(tap) != reason:
            self._refused[tap] = reason
            self.attach_errors += 1
            log.warning("net probe: cannot watch %s: %s", tap, reason)

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
        """Remove our filters from every tap, then unload the programs."""
        if self._tc is not None and self._attached:
            from pyroute2.netlink.exceptions import NetlinkError

            with self._ipr() as ipr:
                for index, (name, _key) in list(self._attached.items()):
                    try:
                        self._tc.remove(ipr, index)
                    except NetlinkError as exc:
                        log.warning("net probe: cannot detach from %s: %s", name, exc)
        self._attached = {}
        self._tc = None
        if self._bpf is not None:
            unload_program(self._bpf)
            self._bpf = None
            self._reader = None
        self._zone_keys = set()
        self._leaving.clear()
        self._slots = CounterSlots(self._max_zones)
        self._refused = {}


__all__ = [
    "DnsQuestion",
    "NetDir",
    "NetProbe",
    "NetSnapshot",
    "ZoneAddresses",
    "ZoneNet",
    "clear_leftovers",
    "escape_label",
    "fill_net",
    "parse_dns_query",
]
