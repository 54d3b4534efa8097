"""Attribution and path resolution, on synthetic kernel records."""

from __future__ import annotations

from pathlib import Path

from zonewatch.model import Share, Vmm, Zone
from zonewatch.pipeline import (
    AT_REMOVEDIR,
    O_CREAT,
    O_DIRECTORY,
    Attribution,
    FdTable,
    FileEventBuilder,
    guest_view,
    text,
)
from zonewatch.probes.records import FileOp, FileRecord

SHARE = "/srv/zones/a/share"


def zone(key: int = 3, pid: int = 100) -> Zone:
    return Zone(
        id=f"qemu-{pid}-1",
        key=key,
        name="zone-a",
        tenant="acme",
        vmm=Vmm.QEMU,
        pid=pid,
        start_time=1,
        shares=(Share("share", SHARE, "9p", "/mnt/share"),),
    )


def rec(
    op: FileOp,
    path: bytes = b"",
    dirfd: int = -100,
    ret: int = 0,
    flags: int = 0,
    path2: bytes = b"",
    dirfd2: int = -1,
    pid: int = 100,
    **kw: int,
) -> FileRecord:
    return FileRecord(
        zone_key=3,
        ts_mono_ns=1_000,
        pid=pid,
        tid=pid + 1,
        comm=b"qemu-system-x86",
        op=op,
        dirfd=dirfd,
        dirfd2=dirfd2,
        mode=kw.get("mode", 0),
        ret=ret,
        flags=flags,
        bytes_read=kw.get("bytes_read", 0),
        bytes_written=kw.get("bytes_written", 0),
        path=path,
        path2=path2,
    )


def builder(tmp_path: Path) -> FileEventBuilder:
    # An empty proc root: nothing falls back to the real /proc.
    return FileEventBuilder(proc=tmp_path)


def test_guest_view_maps_share_paths_and_rejects_prefix_lookalikes() -> None:
    z = zone()
    assert guest_view(z, SHARE + "/etc/shadow") == ("share", "/mnt/share/etc/shadow")
    assert guest_view(z, SHARE) == ("share", "/mnt/share")
    assert guest_view(z, SHARE + "-other/x") == ("", "")
    assert guest_view(z, "/etc/shadow") == ("", "")


def test_relative_ops_resolve_through_fds_seen_opening(tmp_path: Path) -> None:
    b = builder(tmp_path)
    z = zone()
    # A 9p walk: open the share root, then a directory relative to it (state only).
    assert b.build(rec(FileOp.OPEN, SHARE.encode(), ret=10, flags=O_DIRECTORY), z) is None
    assert b.build(rec(FileOp.OPEN, b"etc", dirfd=10, ret=11, flags=O_DIRECTORY), z) is None
    created = b.build(rec(FileOp.OPEN, b"shadow", dirfd=11, ret=12, flags=O_CREAT | 1), z)
    assert created is not None
    assert (created.op, created.path, created.share) == ("create", "/mnt/share/etc/shadow", "share")
    assert created.host_path == SHARE + "/etc/shadow"
    write = b.build(rec(FileOp.WRITE, dirfd=12, ret=512), z)
    assert write is not None
    assert (write.op, write.path, write.bytes_written) == ("write", "/mnt/share/etc/shadow", 512)
    close = b.build(rec(FileOp.CLOSE, dirfd=12, bytes_written=4096), z)
    assert close is not None
    assert (close.op, close.path, close.bytes_written) == ("close", "/mnt/share/etc/shadow", 4096)
    assert b.stats.internal == 2


def test_rename_unlink_rmdir_and_virtfs_xattrs(tmp_path: Path) -> None:
    b = builder(tmp_path)
    z = zone()
    b.build(rec(FileOp.OPEN, SHARE.encode(), ret=10, flags=O_DIRECTORY), z)
    rename = b.build(rec(FileOp.RENAME, b"a", dirfd=10, path2=b"b", dirfd2=10), z)
    assert rename is not None
    assert (rename.path, rename.new_path) == ("/mnt/share/a", "/mnt/share/b")
    rmdir = b.build(rec(FileOp.UNLINK, b"d", dirfd=10, flags=AT_REMOVEDIR), z)
    assert rmdir is not None and rmdir.op == "rmdir"
    unlink = b.build(rec(FileOp.UNLINK, b"f", dirfd=10, ret=-2), z)
    assert unlink is not None and (unlink.op, unlink.ret) == ("unlink", -2)
    chmod = b.build(rec(FileOp.SETXATTR, b"/proc/self/fd/10/f", path2=b"user.virtfs.mode"), z)
    assert chmod is not None and (chmod.op, chmod.path) == ("chmod", "/mnt/share/f")
    other = b.build(rec(FileOp.SETXATTR, b"/proc/self/fd/10/f", path2=b"user.foo"), z)
    assert other is not None and other.op == "setxattr"


def test_open_outside_the_share_is_reported_with_host_path_only(tmp_path: Path) -> None:
    b = builder(tmp_path)
    event = b.build(rec(FileOp.OPEN, b"/etc/passwd", ret=5, flags=O_DIRECTORY), zone())
    assert event is not None  # a directory open outside the shares is not a 9p walk step
    assert (event.path, event.share, event.host_path) == ("", "", "/etc/passwd")


def test_hostile_names_are_escaped_not_fatal(tmp_path: Path) -> None:
    b = builder(tmp_path)
    z = zone()
    b.build(rec(FileOp.OPEN, SHARE.encode(), ret=10, flags=O_DIRECTORY), z)
    event = b.build(rec(FileOp.MKDIR, b"\x1b[2J\xff\xfe..", dirfd=10), z)
    assert event is not None
    assert event.path == "/mnt/share/\x1b[2J\\xff\\xfe.."
    event.to_json()  # serialisable
    assert text(b"\xc3\x28") == "\\xc3("


def test_dotdot_cannot_make_a_path_look_inside_the_share(tmp_path: Path) -> None:
    b = builder(tmp_path)
    z = zone()
    b.build(rec(FileOp.OPEN, SHARE.encode(), ret=10, flags=O_DIRECTORY), z)
    event = b.build(rec(FileOp.OPEN, b"../../../../etc/shadow", dirfd=10, ret=11), z)
    assert event is not None
    assert (event.host_path, event.share, event.path) == ("/etc/shadow", "", "")


def test_fd_table_is_bounded_and_forgets_per_pid(tmp_path: Path) -> None:
    fds = FdTable(tmp_path, limit=3)
    for fd in range(5):
        fds.remember(1, fd, f"/p{fd}")
    assert fds.lookup(1, 0) == ""  # evicted, and no /proc fallback here
    assert fds.lookup(1, 4) == "/p4"
    fds.remember(2, 1, "/q")
    fds.forget_pid(1)
    assert fds.lookup(1, 4) == ""
    assert fds.lookup(2, 1) == "/q"


def test_attribution_counts_records_of_unknown_zones(tmp_path: Path) -> None:
    z = zone()
    attribution = Attribution({3: z}.get, proc=tmp_path)
    events = attribution.process([rec(FileOp.MKDIR, b"/x"), rec(FileOp.MKDIR, b"/y")])
    assert len(events) == 2
    stray = rec(FileOp.MKDIR, b"/z")
    stray.zone_key = 99
    assert attribution.process([stray]) == []
    assert attribution.stats.unattributed == 1


def test_a_backend_pivoted_into_its_share_gets_host_paths(tmp_path: Path) -> None:
    """QEMU's C virtiofsd works in a mount namespace of its own whose "/" is the shared
    folder: its fd links read "/f.txt" and it names paths from that root. With the root
    the inventory found (Zone.process_roots), every path is a host path again, inside the
    share, and `..` stays below the root as it does for the process."""
    import dataclasses
    import os

    worker = 200
    z = dataclasses.replace(zone(), helper_pids=(worker,), process_roots={worker: SHARE})
    fd_dir = tmp_path / str(worker) / "fd"
    fd_dir.mkdir(parents=True)
    os.symlink("/", fd_dir / "5")  # the share's root, as the worker's link reads
    os.symlink("/sub/g.txt", fd_dir / "7")
    b = builder(tmp_path)
    created = b.build(rec(FileOp.OPEN, b"f.txt", dirfd=5, ret=9, flags=O_CREAT | 1, pid=worker), z)
    assert created is not None
    assert (created.host_path, created.path) == (SHARE + "/f.txt", "/mnt/share/f.txt")
    read = b.build(rec(FileOp.READ, dirfd=7, ret=10, pid=worker), z)
    assert read is not None and (read.host_path, read.path) == (
        SHARE + "/sub/g.txt", "/mnt/share/sub/g.txt"
    )  # fmt: skip
    for name in (b"/../../etc/shadow", b"/etc/shadow"):
        inside = b.build(rec(FileOp.OPEN, name, ret=11, pid=worker), z)
        assert inside is not None and inside.host_path == SHARE + "/etc/shadow"
    # The VMM itself is at the host's root: its paths stay as they are.
    vmm = b.build(rec(FileOp.OPEN, b"/etc/shadow", ret=12), z)
    assert vmm is not None and (vmm.host_path, vmm.share) == ("/etc/shadow", "")
    # A zone without the root (the worker gone): no translation is left behind.
    b.fds.forget_pid(worker)
    assert worker not in b.fds.roots
