"""Record decoding (struct over the ctypes mirrors) gives exactly what reading the ctypes
mirrors field by field gives, for any bytes; batches count what they drop."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zonewatch.probes.maps import RecordRingReader
from zonewatch.probes.records import (
    DECODERS,
    KVM_DECODERS,
    MIRRORS,
    NET_DECODERS,
    PROC_DECODERS,
    ZW_ARGS_MAX,
    ZW_DNS_MAX,
    DecodeErrors,
    FileOp,
    FileRecord,
    FlowKey,
    FlowTotals,
    KvmOp,
    KvmRecord,
    NetDir,
    NetOp,
    NetRecord,
    ProcOp,
    ProcRecord,
    RecordType,
    ZwFileEvent,
    ZwKvmEvent,
    ZwNetEvent,
    ZwProcEvent,
    c_string,
    decode_all,
    decode_file,
    decode_kvm,
    decode_net,
    decode_proc,
    decode_with,
    struct_layout,
)

# ---- the ctypes readings the struct decoders replaced (the reference) ---------------------


def ref_file(data: bytes) -> FileRecord:
    rec = ZwFileEvent.from_buffer_copy(data)
    return FileRecord(
        rec.hdr.zone_key, rec.hdr.ts_ns, rec.hdr.pid, rec.hdr.tid, c_string(bytes(rec.hdr.comm)),
        FileOp(rec.op), rec.dirfd, rec.dirfd2, rec.mode, rec.ret, rec.flags, rec.bytes_read,
        rec.bytes_written, c_string(bytes(rec.path)), c_string(bytes(rec.path2)),
    )  # fmt: skip


def ref_kvm(data: bytes) -> KvmRecord:
    rec = ZwKvmEvent.from_buffer_copy(data)
    return KvmRecord(
        rec.hdr.zone_key, rec.hdr.ts_ns, rec.hdr.pid, rec.hdr.tid, c_string(bytes(rec.hdr.comm)),
        KvmOp(rec.op), rec.flags, rec.code, tuple(rec.args),
    )  # fmt: skip


def ref_net(data: bytes) -> NetRecord:
    rec = ZwNetEvent.from_buffer_copy(data)
    k, f = rec.key, rec.flow
    width = 4 if k.family == 4 else 16
    return NetRecord(
        rec.hdr.zone_key, rec.hdr.ts_ns, NetOp(rec.op), NetDir(rec.dir),
        FlowKey(k.zone_key, k.family, k.proto, bytes(k.local_ip)[:width], k.local_port,
                bytes(k.remote_ip)[:width], k.remote_port),
        FlowTotals(f.first_ns, f.last_ns, f.bytes[0], f.bytes[1], f.packets[0], f.packets[1],
                   f.payload[0], f.payload[1], f.ifindex, NetDir(f.initiator), f.tcp_flags,
                   f.state),
        bytes(rec.dns)[: min(rec.dns_len, ZW_DNS_MAX)],
    )  # fmt: skip


def ref_proc(data: bytes) -> ProcRecord:
    rec = ZwProcEvent.from_buffer_copy(data)
    return ProcRecord(
        rec.hdr.zone_key, rec.hdr.ts_ns, rec.hdr.pid, rec.hdr.tid, c_string(bytes(rec.hdr.comm)),
        ProcOp(rec.op), rec.flags, rec.ret, rec.ppid, rec.target_pid,
        (rec.arg[0], rec.arg[1], rec.arg[2]), bytes(rec.addr), c_string(bytes(rec.pcomm)),
        bytes(rec.path), c_string(bytes(rec.path2)),
        bytes(rec.args)[: min(rec.args_len, ZW_ARGS_MAX)],
    )  # fmt: skip


# struct, its record type, the op field's offset, valid ops, the struct decoder, the reference
KINDS: dict[str, tuple[Any, int, list[int], Callable[[bytes], Any], Callable[[bytes], Any]]] = {
    "file": (ZwFileEvent, RecordType.FILE, [int(o) for o in FileOp], decode_file, ref_file),
    "kvm": (ZwKvmEvent, RecordType.KVM, [int(o) for o in KvmOp], decode_kvm, ref_kvm),
    "net": (ZwNetEvent, RecordType.NET, [int(o) for o in NetOp], decode_net, ref_net),
    "proc": (ZwProcEvent, RecordType.PROC, [int(o) for o in ProcOp], decode_proc, ref_proc),
}


def outcome(fn: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return fn(data)
    except ValueError:
        return ValueError


@st.composite
def records(draw: st.DrawFn, kind: str) -> bytes:
    cls, rtype, ops, _, _ = KINDS[kind]
    raw = bytearray(draw(st.binary(min_size=ctypes.sizeof(cls), max_size=ctypes.sizeof(cls))))
    struct.pack_into("=H", raw, 0, rtype)
    if draw(st.booleans()):  # mostly known op codes (and directions, for net)
        struct.pack_into("=I", raw, cls.op.offset, draw(st.sampled_from(ops)))
        if kind == "net":
            struct.pack_into("=H", raw, cls.dir.offset, draw(st.sampled_from([1, 2])))
            init = cls.flow.offset + ZwNetEvent._fields_[6][1].initiator.offset
            struct.pack_into("=I", raw, init, draw(st.sampled_from([1, 2])))
            if draw(st.booleans()):
                struct.pack_into("=B", raw, cls.key.offset + 4, 4)  # IPv4
    if draw(st.booleans()):  # short strings: the NUL-terminated fields end early
        for name in ("path", "path2", "pcomm", "dns", "args"):
            if hasattr(cls, name):
                at = getattr(cls, name).offset + draw(st.integers(0, 40))
                raw[at] = 0
    return bytes(raw)


@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_struct_decoders_equal_the_ctypes_reading(kind: str, data: st.DataObject) -> None:
    _, _, _, fast, ref = KINDS[kind]
    raw = data.draw(records(kind))
    assert outcome(fast, raw) == outcome(ref, raw)


def test_every_mirror_has_a_struct_layout_of_its_size() -> None:
    for name, cls in MIRRORS.items():
        fmt, _ = struct_layout(cls)
        assert struct.calcsize("=" + fmt) == ctypes.sizeof(cls), name


def test_decode_all_counts_what_decode_with_counts() -> None:
    registry = {**DECODERS, **NET_DECODERS, **PROC_DECODERS, **KVM_DECODERS}
    good = ZwFileEvent()
    good.hdr.type, good.op, good.path = RecordType.FILE, FileOp.OPEN, b"/a"
    bad_op = ZwFileEvent()
    bad_op.hdr.type, bad_op.op = RecordType.FILE, 99
    unknown = ZwFileEvent()
    unknown.hdr.type = 42
    batch = [bytes(good), b"\x01\x00", bytes(good)[:100], bytes(bad_op), bytes(unknown)]
    batch += [bytes(good) + b"\0" * 8]  # ring records may carry padding: read as the struct
    one_by_one = DecodeErrors()
    expected = [r for d in batch if (r := decode_with(registry, d, one_by_one)) is not None]
    errors = DecodeErrors()
    assert decode_all(registry, batch, errors) == expected
    assert len(expected) == 2 and expected[0].path == b"/a"
    assert errors == one_by_one
    counted = (errors.short, errors.bad_value, errors.unknown_type, errors.by_type)
    assert counted == (2, 1, 1, {42: 1})


class FakeRing:
    """A bcc BPF object with one ring buffer whose memory is reused after each callback."""

    def __init__(self) -> None:
        self.map_fd = 7
        self.callback: Any = None
        self.pending: list[bytes] = []

    def __getitem__(self, _name: bytes) -> FakeRing:
        return self

    def open_ring_buffer(self, callback: Any) -> None:
        self.callback = callback

    def ring_buffer_poll(self, _timeout: int) -> None:
        self.ring_buffer_consume()

    def ring_buffer_consume(self) -> None:
        slot = ctypes.create_string_buffer(2048)
        for data in self.pending:
            ctypes.memmove(slot, data, len(data))
            self.callback(None, ctypes.addressof(slot), len(data))
            ctypes.memset(slot, 0xFF, len(slot))  # the ring reuses the space
        self.pending = []


def test_ring_reader_copies_each_record_before_the_ring_reuses_it() -> None:
    ring = FakeRing()
    reader = RecordRingReader(ring, "events", DECODERS)
    recs = []
    for i in range(3):
        e = ZwFileEvent()
        e.hdr.type, e.hdr.pid, e.op, e.path = RecordType.FILE, 100 + i, FileOp.OPEN, b"f%d" % i
        recs.append(bytes(e))
    ring.pending = [*recs, b"short"]
    got = reader.poll(0)
    assert [(r.pid, r.path) for r in got] == [(100, b"f0"), (101, b"f1"), (102, b"f2")]
    assert got == [decode_file(r) for r in recs]
    assert reader.errors.short == 1
    assert reader.poll(0) == []
