from __future__ import annotations

import os
from pathlib import Path

import pytest

from zonewatch.inventory import procfs


def fake_proc(tmp_path: Path, pid: int, stat: bytes, cmdline: bytes = b"") -> Path:
    d = tmp_path / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_bytes(stat)
    (d / "cmdline").write_bytes(cmdline)
    return tmp_path


def test_stat_comm_with_spaces_and_parentheses(tmp_path: Path) -> None:
    rest = b" S 1 " + b" ".join(b"0" for _ in range(17)) + b" 424242 0 0"
    proc = fake_proc(tmp_path, 7, b"7 (CPU 0/KVM) x)" + rest)
    stat = procfs.read_stat(proc, 7)
    assert stat is not None
    assert stat.comm == "CPU 0/KVM) x"
    assert stat.ppid == 1
    assert stat.start_time == 424242


def test_stat_of_a_vanished_or_garbled_process_is_none(tmp_path: Path) -> None:
    assert procfs.read_stat(tmp_path, 9) is None
    proc = fake_proc(tmp_path, 8, b"garbage")
    assert procfs.read_stat(proc, 8) is None


def test_cmdline_keeps_invalid_utf8_roundtrippable(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 3, b"3 (x) S 1", b"qemu\0-name\0\xffbad\0")
    argv = procfs.read_cmdline(proc, 3)
    assert argv[:2] == ["qemu", "-name"]
    assert os.fsencode(argv[2]) == b"\xffbad"


def test_real_proc_self() -> None:
    stat = procfs.read_stat(Path("/proc"), os.getpid())
    assert stat is not None and stat.start_time > 0
    assert os.getpid() in procfs.list_pids(Path("/proc"))
    assert os.getpid() in procfs.thread_comms(Path("/proc"), os.getpid())
    assert procfs.tap_names(Path("/proc"), os.getpid()) == []


def test_unix_socket_path_of_a_real_listener_and_the_connection_it_accepted(
    tmp_path: Path,
) -> None:
    """As virtiofsd holds it: the inherited listener, then the accepted connection; both
    carry the bound path in this namespace's /proc/PID/net/unix."""
    import socket

    proc = Path("/proc")
    path = str(tmp_path / "vhost-fs.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        inode = os.fstat(listener.fileno()).st_ino
        assert procfs.socket_inodes(proc, os.getpid(), first=listener.fileno())[0] == inode
        assert procfs.unix_socket_paths(proc, os.getpid(), [inode]) == {inode: path}
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            accepted, _ = listener.accept()
            with accepted:
                accepted_inode = os.fstat(accepted.fileno()).st_ino
                client_inode = os.fstat(client.fileno()).st_ino
                held = procfs.socket_inodes(proc, os.getpid(), first=accepted.fileno())
                assert held[0] == accepted_inode and {inode, client_inode} <= set(held)
                # The accepted connection carries the listener's path; the client, unbound,
                # has none.
                assert procfs.unix_socket_paths(
                    proc, os.getpid(), [accepted_inode, client_inode]
                ) == {accepted_inode: path}
    r, w = os.pipe()
    try:
        assert os.fstat(r).st_ino not in procfs.socket_inodes(proc, os.getpid(), first=r)
    finally:
        os.close(r)
        os.close(w)


def make_jail(tmp_path: Path) -> tuple[Path, Path]:
    """A fake /proc whose process 5 is chrooted into `jail`."""
    jail = tmp_path / "jail"
    (jail / "etc" / "fc").mkdir(parents=True)
    (jail / "etc" / "fc" / "config.json").write_bytes(b"inside")
    (jail / "rel-link").symlink_to("etc/fc/config.json")
    (jail / "abs-link").symlink_to("/etc/fc/config.json")
    (jail / "escape").symlink_to("../../outside")
    (tmp_path / "outside").write_bytes(b"host secret")
    (tmp_path / "etc" / "fc").mkdir(parents=True)
    (tmp_path / "etc" / "fc" / "config.json").write_bytes(b"host file")
    proc = tmp_path / "proc"
    (proc / "5").mkdir(parents=True)
    (proc / "5" / "root").symlink_to(jail)
    (proc / "5" / "cwd").symlink_to(jail / "etc")
    return proc, jail


def test_read_file_in_root_stays_in_the_processes_root(tmp_path: Path) -> None:
    proc, _jail = make_jail(tmp_path)
    assert procfs.read_file_in_root(proc, 5, "/etc/fc/config.json", 100) == b"inside"
    assert procfs.read_file_in_root(proc, 5, "fc/config.json", 100) == b"inside"  # from cwd
    assert procfs.read_file_in_root(proc, 5, "/rel-link", 100) == b"inside"
    assert procfs.read_file_in_root(proc, 5, "/abs-link", 100) == b"inside"  # jail's /etc
    assert procfs.read_file_in_root(proc, 5, "/etc/fc/config.json", 3) == b"insi"  # limit+1
    for escaping in ("/escape", "/../outside", "/../../outside", "../../outside"):
        with pytest.raises(OSError):
            procfs.read_file_in_root(proc, 5, escaping, 100)
    with pytest.raises(OSError):
        procfs.read_file_in_root(proc, 5, "/etc", 100)  # a directory
    with pytest.raises(OSError):
        procfs.read_file_in_root(proc, 6, "/etc/fc/config.json", 100)  # no such process


def test_without_openat2_no_link_or_dotdot_is_followed(tmp_path: Path) -> None:
    """The fallback for kernels before 5.6: stricter (links refused), never out of root."""
    _proc, jail = make_jail(tmp_path)
    dirfd = os.open(jail, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = procfs._open_beneath_without_links(dirfd, "etc/fc/config.json")
        assert os.read(fd, 100) == b"inside"
        os.close(fd)
        for refused in ("rel-link", "abs-link", "escape", "../outside", "etc/../../outside", ""):
            with pytest.raises(OSError):
                procfs._open_beneath_without_links(dirfd, refused)
    finally:
        os.close(dirfd)


def pivoted(tmp_path: Path, their_root: str, ours: list[str]) -> Path:
    """A fake /proc: process 7 in a mount namespace of its own whose / is `their_root` of
    device 254:0; the reader ("self") with the mounts `ours` (root, mount point) of 254:0."""
    proc = tmp_path / "proc"
    for pid, ns in (("7", "mnt:[4026532174]"), ("self", "mnt:[4026531832]")):
        (proc / pid / "ns").mkdir(parents=True)
        (proc / pid / "ns" / "mnt").symlink_to(ns)
    (proc / "7" / "root").symlink_to("/")
    (proc / "7" / "mountinfo").write_text(
        f"76 49 254:0 {their_root} / rw,relatime - ext4 /dev/vda rw\n"
    )
    lines = [f"{27 + i} 1 254:0 {root} {point} rw - ext4 /dev/vda rw" for i, (root, point)
             in enumerate(r.split(" ") for r in ours)]  # fmt: skip
    lines.append("99 1 0:5 / /proc rw - proc proc rw")
    (proc / "self" / "mountinfo").write_text("\n".join(lines) + "\n")
    return proc


def test_root_of_a_process_pivoted_in_its_own_mount_namespace(tmp_path: Path) -> None:
    proc = pivoted(tmp_path / "a", "/run/kata/shared", ["/ /"])
    assert procfs.root_on_host(proc, 7) == "/run/kata/shared"
    # The reader sees that filesystem mounted elsewhere, from a subfolder.
    proc = pivoted(tmp_path / "b", "/data/pods/x", ["/data /srv/data"])
    assert procfs.root_on_host(proc, 7) == "/srv/data/pods/x"
    # Octal escapes of mountinfo (a space in the folder's name).
    proc = pivoted(tmp_path / "c", "/run/my\\040share", ["/ /"])
    assert procfs.root_on_host(proc, 7) == "/run/my share"
    # A folder the reader cannot reach: unknown, never a guess.
    proc = pivoted(tmp_path / "d", "/x", ["/other /mnt"])
    assert procfs.root_on_host(proc, 7) is None
    # Another namespace, same root as ours: nothing to translate.
    proc = pivoted(tmp_path / "e", "/", ["/ /"])
    assert procfs.root_on_host(proc, 7) is None


def test_root_of_a_chroot_and_of_a_plain_process(tmp_path: Path) -> None:
    proc, jail = make_jail(tmp_path)
    assert procfs.root_on_host(proc, 5) == str(jail)
    assert procfs.root_on_host(Path("/proc"), os.getpid()) is None
    assert procfs.root_on_host(proc, 99) is None  # gone
