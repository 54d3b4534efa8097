"""The net channel's Python side: records decoded from kernel bytes, DNS questions parsed from
bytes a hostile guest chose, and flows turned into `net` events."""

from __future__ import annotations

import ctypes
import struct

import orjson
from hypothesis import given
from hypothesis import strategies as st

from zonewatch.lab.tapfd import dns_query
from zonewatch.model import Vmm, Zone
from zonewatch.probes.dns import DNS_NAME_MAX, escape_label, parse_dns_query
from zonewatch.probes.net import NetSnapshot, ZoneNet, fill_net, net_event
from zonewatch.probes.records import (
    NET_DECODERS,
    DecodeErrors,
    NetDir,
    NetOp,
    RecordType,
    ZwNetEvent,
    decode_with,
)

ZONE = Zone(id="z1", key=5, name="web-1", tenant="acme", vmm=Vmm.QEMU, pid=1, start_time=0)


def raw_event(op: int = NetOp.FLOW_END, dns: bytes = b"", **flow: int) -> bytes:
    e = ZwNetEvent()
    e.hdr.type = RecordType.NET
    e.hdr.size = ctypes.sizeof(e)
    e.hdr.zone_key = 5
    e.hdr.ts_ns = 1_000
    e.op = op
    e.dir = NetDir.EGRESS
    e.key.zone_key = 5
    e.key.family = 4
    e.key.proto = 6
    e.key.local_port = 40000
    e.key.remote_port = 443
    e.key.local_ip[:4] = [10, 213, 1, 2]
    e.key.remote_ip[:4] = [10, 213, 1, 1]
    e.flow.initiator = flow.get("initiator", NetDir.EGRESS)
    e.flow.first_ns = 1_000
    e.flow.last_ns = 2_500_001_000
    e.flow.bytes[0], e.flow.bytes[1] = 600, 4000
    e.flow.packets[0], e.flow.packets[1] = 5, 6
    e.flow.payload[0], e.flow.payload[1] = 340, 3700
    e.flow.tcp_flags = flow.get("tcp_flags", 0x13)  # FIN SYN ACK
    e.dns_len = len(dns)
    e.dns[: len(dns)] = list(dns)
    return bytes(e)


def test_flow_end_from_the_zone_becomes_an_egress_event() -> None:
    rec = decode_with(NET_DECODERS, raw_event(), DecodeErrors())
    assert rec is not None
    event = net_event(rec, ZONE, 1_700_000_000_000_000_000)
    line = orjson.loads(orjson.dumps(event.to_json()))
    assert line["channel"] == "net"
    assert line["op"] == "flow_end"
    assert line["zone"]["tenant"] == "acme"
    net = line["net"]
    assert (net["src_ip"], net["src_port"]) == ("10.213.1.2", 40000)
    assert (net["dst_ip"], net["dst_port"]) == ("10.213.1.1", 443)
    assert (net["proto"], net["direction"], net["end_reason"]) == ("tcp", "egress", "fin")
    assert (net["bytes"], net["packets"]) == (4600, 11)
    assert (net["tx_payload"], net["rx_payload"]) == (340, 3700)
    assert net["tcp_flags"] == ["FIN", "SYN", "ACK"]
    assert net["duration_s"] == 2.5


def test_a_flow_opened_towards_the_zone_is_ingress_with_the_zone_as_destination() -> None:
    rec = decode_with(
        NET_DECODERS, raw_event(initiator=NetDir.INGRESS, tcp_flags=0x14), DecodeErrors()
    )
    assert rec is not None
    net = net_event(rec, ZONE, 0).to_json()["net"]
    assert net["direction"] == "ingress"
    assert (net["dst_ip"], net["dst_port"]) == ("10.213.1.2", 40000)
    assert net["end_reason"] == "rst"


def test_short_unknown_and_bad_records_are_counted_not_raised() -> None:
    errors = DecodeErrors()
    assert decode_with(NET_DECODERS, raw_event()[:100], errors) is None
    bad_op = bytearray(raw_event())
    bad_op[40:44] = struct.pack("<I", 99)
    assert decode_with(NET_DECODERS, bytes(bad_op), errors) is None
    bad_dir = bytearray(raw_event())
    bad_dir[44:46] = struct.pack("<H", 7)
    assert decode_with(NET_DECODERS, bytes(bad_dir), errors) is None
    assert (errors.short, errors.bad_value) == (1, 2)


def test_dns_event_carries_the_question() -> None:
    rec = decode_with(
        NET_DECODERS, raw_event(NetOp.DNS, dns_query(b"api.example.org", 28)), DecodeErrors()
    )
    assert rec is not None
    net = net_event(rec, ZONE, 0).to_json()["net"]
    assert (net["dns_qname"], net["dns_qtype"]) == ("api.example.org", "AAAA")
    assert "dns_error" not in net


def test_dns_parsing_stops_at_every_lie() -> None:
    header = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0)
    assert parse_dns_query(b"\x00" * 11).error == "short header"
    assert parse_dns_query(struct.pack("!HHHHHH", 1, 0x0100, 0, 0, 0, 0)).error == "no question"
    assert parse_dns_query(header + b"\x05ab").error == "truncated"
    assert parse_dns_query(header + b"\x03abc\x00\x00").error == "truncated"  # no qtype/class
    assert parse_dns_query(header + b"\xc0\x0c\x00\x01\x00\x01").error.startswith("compressed")
    assert parse_dns_query(header + b"\x41" + b"a" * 65).error.startswith("compressed")
    long = dns_query([b"x" * 63] * 4)  # 4 * 64 + 1 = 257 wire bytes
    assert parse_dns_query(long).error == "name longer than 255 bytes"
    ok = dns_query([b"x" * 63] * 3 + [b"y" * 61])  # exactly 255
    assert parse_dns_query(ok).error == ""
    assert parse_dns_query(dns_query(b"")).qname == "."


def test_labels_are_escaped_like_dig() -> None:
    assert escape_label(b"a.b\\c") == "a\\.b\\\\c"
    assert escape_label(b"\x00 \x7f\xff") == "\\000\\032\\127\\255"
    assert escape_label("é".encode()) == "\\195\\169"


@given(st.binary(max_size=600))
def test_any_bytes_parse_to_a_bounded_printable_question(data: bytes) -> None:
    q = parse_dns_query(data)
    assert q.qname.isascii() and q.qname.isprintable()
    assert len(q.qname) <= 4 * DNS_NAME_MAX
    if not q.error:
        assert 0 <= q.qtype <= 0xFFFF


@given(st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=8), st.integers(0, 65535))
def test_well_formed_names_round_trip_through_the_escapes(labels: list[bytes], qtype: int) -> None:
    q = parse_dns_query(dns_query(labels, qtype))
    wire = sum(len(x) + 1 for x in labels) + 1
    if wire > DNS_NAME_MAX:
        assert q.error == "name longer than 255 bytes"
        return
    assert q.error == ""
    assert q.qtype == qtype
    assert q.qname == ".".join(escape_label(x) for x in labels)


@given(st.binary(max_size=800))
def test_any_record_bytes_decode_or_count(data: bytes) -> None:
    errors = DecodeErrors()
    rec = decode_with(NET_DECODERS, data, errors)
    assert rec is not None or errors.total == 1


def test_counters_window_and_rates() -> None:
    earlier = NetSnapshot(0, {5: ZoneNet(tx_bytes=100, rx_packets=2, malformed=1)})
    now = NetSnapshot(
        2_000_000_000,
        {5: ZoneNet(tx_bytes=300, rx_packets=6, malformed=3, truncated=1, new_flows=4)},
    )
    window = now.since(earlier).zone(5)
    assert (window.tx_bytes, window.rx_packets, window.bad) == (200, 4, 3)
    from zonewatch.model import ZoneStats

    stats = ZoneStats(ts_ns=0, zone=ZONE.ref, interval_s=2.0)
    fill_net(stats, window, 2.0)
    assert (stats.tx_bytes_per_s, stats.rx_packets_per_s) == (100.0, 2.0)
    assert (stats.new_flows_per_s, stats.malformed_per_s) == (2.0, 1.5)
    # A reset (fewer than before) counts from zero, never negative.
    assert now.since(NetSnapshot(0, {5: ZoneNet(tx_bytes=10**9)})).zone(5).tx_bytes == 300
