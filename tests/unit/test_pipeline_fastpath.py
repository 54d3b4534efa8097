"""The per-record shortcuts of attribution (a view per Zone object, small caches) give
exactly what the plain functions give."""

from __future__ import annotations

import dataclasses
import ipaddress
import posixpath
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from zonewatch.model import Share, Vmm, Zone
from zonewatch.pipeline import O_CREAT, Attribution, FdTable, ZoneView, guest_view, join_normal
from zonewatch.probes import net
from zonewatch.probes.net import ip_text, parse_dns_query
from zonewatch.probes.records import FileOp, FileRecord

segments = st.sampled_from(["", "/", "a", "ab", "srv", "share", "..", ".", "x/y", "share-2"])
paths = st.lists(segments, max_size=6).map("/".join)


def zone_with(shares: list[tuple[str, str]], name: str = "z") -> Zone:
    return Zone(
        id="qemu-1-1", key=1, name=name, tenant="t", vmm=Vmm.QEMU, pid=100, start_time=1,
        shares=tuple(Share(f"tag{i}", host, "9p", guest) for i, (host, guest) in enumerate(shares)),
    )  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(
    shares=st.lists(st.tuples(paths, st.sampled_from(["/", "", "/mnt/share", "/m/"])), max_size=3),
    host_path=paths,
)
def test_zone_view_maps_paths_as_guest_view_does(
    shares: list[tuple[str, str]], host_path: str
) -> None:
    z = zone_with(shares)
    assert ZoneView(z).guest_view(host_path) == guest_view(z, host_path)


def rec(path: bytes, fd: int) -> FileRecord:
    return FileRecord(3, 1_000, 100, 101, b"qemu", FileOp.OPEN, -100, -1, 0, fd, O_CREAT, 0, 0,
                      path, b"")  # fmt: skip


def test_a_replaced_zone_is_seen_anew(tmp_path: Path) -> None:
    first = zone_with([("/srv/a", "/mnt")], name="before")
    current = {3: dataclasses.replace(first, key=3)}
    attribution = Attribution(current.get, proc=tmp_path)
    [a] = attribution.process([rec(b"/srv/a/f", 5)])
    assert (a.zone.name, a.path) == ("before", "/mnt/f")
    # The inventory replaces a zone whose name, tenant or shares changed.
    current[3] = dataclasses.replace(current[3], name="after", shares=(Share("s", "/srv/b", "9p"),))
    [b] = attribution.process([rec(b"/srv/b/g", 6)])
    assert (b.zone.name, b.path, b.share) == ("after", "/g", "s")
    [c] = attribution.process([rec(b"/srv/b/h", 7)])
    assert c.zone is b.zone  # one ZoneRef per Zone object


def test_ip_text_and_dns_caches_answer_as_the_parsers_do() -> None:
    for raw in (b"\x0a\x00\x00\x01", bytes(16), bytes(range(16)), bytes(10) + b"\xff\xff\1\2\3\4"):
        assert ip_text(raw) == ip_text(raw) == str(ipaddress.ip_address(raw))
    assert ip_text(b"\xc0\xa8\x00\x01") == "192.168.0.1"
    assert ip_text(b"\x01\x02") == ""
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03abc\x00\x00\x01\x00\x01"
    other_id = b"\x99\x99" + query[2:]
    no_question = query[:4] + b"\x00\x00" + query[6:]
    for msg in (query, other_id, no_question, query[:14], query + b"junk"):
        assert net._dns_question(msg) == parse_dns_query(msg)
        assert net._dns_question(msg) == parse_dns_query(msg)  # the cached answer


def test_tcp_flag_table_equals_the_names() -> None:
    for bits in (0, 0x02, 0x12, 0x1B, 0xFF, 0x1FF, 1 << 40 | 0x04):
        assert net._TCP_FLAGS[bits & 0xFF] == tuple(net.tcp_flag_names(bits))


parts = st.sampled_from(["", "/", "//", ".", "..", "a", ".a", "a.", "b c", "x/./y", "..b", "\\"])
raw_paths = st.lists(parts, max_size=7).map("".join)


@settings(max_examples=2000, deadline=None)
@given(base=raw_paths, name=raw_paths)
def test_join_normal_is_normpath_of_join(base: str, name: str) -> None:
    assert join_normal(base, name) == posixpath.normpath(posixpath.join(base, name))


@settings(max_examples=1000, deadline=None)
@given(base=raw_paths, name=raw_paths, absolute=st.booleans())
def test_resolve_is_normpath_of_join(base: str, name: str,
                                     absolute: bool) -> None:  # fmt: skip
    fds = FdTable(Path("/nonexistent-proc"))
    fds.remember(1, 5, base)
    path = ("/" + name) if absolute else name
    got = fds.resolve(1, 5, path.encode())
    if path.startswith("/proc/self/fd/"):
        return
    if path.startswith("/"):
        assert got == posixpath.normpath(path)
    elif not base:
        assert got == path
    else:
        assert got == (posixpath.normpath(posixpath.join(base, path)) if path else base)
