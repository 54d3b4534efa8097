"""Small, failure-tolerant readers of /proc. A process may vanish between any two reads:
every reader returns None (or empty) then, never raises."""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from zonewatch.model import NetNs

TUN_DEVICE = "/dev/net/tun"


@dataclass(slots=True, frozen=True)
class ProcStat:
    comm: str
    ppid: int
    start_time: int  # clock ticks since boot: a pid plus this names one process incarnation


def list_pids(proc: Path) -> list[int]:
    try:
        return [int(name) for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return []


def read_stat(proc: Path, pid: int) -> ProcStat | None:
    try:
        raw = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # comm may hold spaces and parentheses: it runs from the first "(" to the last ")".
    open_paren, close_paren = raw.find(b"("), raw.rfind(b")")
    if open_paren < 0 or close_paren < open_paren:
        return None
    fields = raw[close_paren + 2 :].split()
    try:
        return ProcStat(
            comm=raw[open_paren + 1 : close_paren].decode("utf-8", "backslashreplace"),
            ppid=int(fields[1]),
            start_time=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def read_cmdline(proc: Path, pid: int) -> list[str]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(arg) for arg in raw.rstrip(b"\0").split(b"\0")] if raw else []


def thread_comms(proc: Path, pid: int) -> dict[int, str]:
    comms: dict[int, str] = {}
    try:
        tids = os.listdir(proc / str(pid) / "task")
    except OSError:
        return comms
    for tid in tids:
        try:
            comm = (proc / str(pid) / "task" / tid / "comm").read_bytes()
        except OSError:
            continue
        comms[int(tid)] = comm.rstrip(b"\n").decode("utf-8", "backslashreplace")
    return comms


def fd_target(proc: Path, pid: int, fd: int) -> str | None:
    try:
        return os.fsdecode(os.readlink(os.fsencode(proc / str(pid) / "fd" / str(fd))))
    except OSError:
        return None


def net_ns(proc: Path, pid: int) -> NetNs | None:
    """The process's network namespace: its identity, and the path that enters it."""
    path = proc / str(pid) / "ns" / "net"
    try:
        return NetNs(os.stat(path).st_ino, str(path))
    except OSError:
        return None


def tap_names(proc: Path, pid: int) -> list[str]:
    """Interfaces attached through /dev/net/tun fds, from each fd's `iff:` fdinfo line."""
    names: list[str] = []
    fd_dir = proc / str(pid) / "fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return names
    for fd in fds:
        try:
            if os.readlink(fd_dir / fd) != TUN_DEVICE:
                continue
            info = (proc / str(pid) / "fdinfo" / fd).read_text(errors="replace")
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("iff:"):
                names.append(line.split(":", 1)[1].strip())
    return sorted(set(names))


def root_dir(proc: Path, pid: int) -> str | None:
    """The process's root directory (`readlink /proc/PID/root`): "/" unless chrooted."""
    try:
        return os.fsdecode(os.readlink(proc / str(pid) / "root"))
    except OSError:
        return None


MAX_MOUNTINFO_BYTES = 8 * 1024 * 1024  # ~150 bytes a mount; a larger table is not read


Mount = tuple[str, str, str]  # (major:minor, root within the filesystem, mount point)


@dataclass(slots=True, frozen=True)
class RootMount:
    """What a process's root directory is, as far as its own view tells: the directory a
    chroot names (`link`), or, for a process pivoted in a mount namespace of its own, the
    device and folder of the mount on its "/". Cheap to read each scan; compare to notice a
    change, then place it on the host with `host_dir`."""

    link: str  # readlink /proc/PID/root ("/" when pivoted: the kernel cannot name it)
    device: str = ""  # major:minor of its "/" mount, when pivoted
    folder: str = ""  # the folder of that filesystem its "/" is


def root_mount(proc: Path, pid: int) -> RootMount | None:
    """The process's root, when it is not the reader's own root; None when it is, or when
    the process is gone."""
    root = root_dir(proc, pid)
    if root is None:
        return None
    if root != "/":
        return RootMount(root)
    try:
        if os.readlink(proc / str(pid) / "ns" / "mnt") == os.readlink(proc / "self" / "ns" / "mnt"):
            return None
    except OSError:
        return None
    theirs = [m for m in mounts(proc / str(pid) / "mountinfo") if m[2] == "/"]
    if not theirs:
        return None
    device, folder, _ = theirs[-1]  # the last mount on / is the one in use
    return RootMount(root, device, folder)


def host_dir(root: RootMount, reader_mounts: list[Mount]) -> str | None:
    """Where a process's root directory is, as a path the reader (the agent) can use: a
    chroot's as the kernel names it; a pivoted one's through the reader's mount of the same
    device whose root holds that folder (the longest such root). None when it is the
    reader's root, or cannot be placed (never a guess)."""
    if not root.device:
        return root.link
    best: tuple[str, str] | None = None
    for device, mount_root, mount_point in reader_mounts:
        inside = mount_root in ("/", root.folder) or root.folder.startswith(mount_root + "/")
        if device == root.device and inside and (best is None or len(mount_root) > len(best[0])):
            best = (mount_root, mount_point)
    if best is None:
        return None
    mount_root, mount_point = best
    rest = root.folder[len(mount_root) :] if mount_root != "/" else root.folder
    host = posixpath.normpath(f"{mount_point.rstrip('/')}/{rest.lstrip('/')}")
    return None if host == "/" else host


def root_on_host(proc: Path, pid: int) -> str | None:
    """The process's root directory on the host (see root_mount and host_dir), when it is
    not the reader's own: its paths (fd links, absolute names) are relative to it. QEMU's C
    virtiofsd pivots into the folder it shares; a jailed Firecracker is chrooted."""
    root = root_mount(proc, pid)
    if root is None:
        return None
    return host_dir(root, mounts(proc / "self" / "mountinfo") if root.device else [])


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def mounts(path: Path) -> list[Mount]:
    """(major:minor, root, mount point) of each line of a mountinfo table; [] if unreadable
    or too large. Paths there escape space, tab, newline and backslash as octal."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MOUNTINFO_BYTES + 1)
    except OSError:
        return []
    if len(data) > MAX_MOUNTINFO_BYTES:
        return []
    table: list[Mount] = []
    for line in data.splitlines():
        fields = line.split(b" ", 5)
        if len(fields) < 6:
            continue
        root, point = (
            os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), raw))
            for raw in (fields[3], fields[4])
        )
        table.append((fields[2].decode("ascii", "replace"), root, point))
    return table


MAX_SOCKET_FDS = 64  # a backend's sockets looked at (virtiofsd holds a handful)


def socket_inodes(proc: Path, pid: int, first: int = -1) -> list[int]:
    """The inodes of the sockets the process holds, the one at fd `first` (if it is a
    socket) first; at most MAX_SOCKET_FDS."""
    fd_dir = proc / str(pid) / "fd"
    try:
        fds = sorted(int(fd) for fd in os.listdir(fd_dir) if fd.isdigit())
    except OSError:
        return []
    if first in fds:
        fds.remove(first)
        fds.insert(0, first)
    inodes: list[int] = []
    for fd in fds:
        target = fd_target(proc, pid, fd)
        if target is None or not target.startswith("socket:[") or not target.endswith("]"):
            continue
        number = target[len("socket:[") : -1]
        if number.isascii() and number.isdigit() and int(number) not in inodes:
            inodes.append(int(number))
            if len(inodes) >= MAX_SOCKET_FDS:
                break
    return inodes


# /proc/PID/net/unix has a line of ~100 bytes per socket of the namespace; past this much
# a table is not read further (the answer is then "not found", never a wrong path).
MAX_UNIX_TABLE_BYTES = 32 * 1024 * 1024


def unix_socket_paths(proc: Path, pid: int, inodes: Iterable[int]) -> dict[int, str]:
    """The paths these unix sockets are bound to (a listening socket, or a connection it
    accepted, which carries the listener's address), from /proc/PID/net/unix: the table of
    PID's network namespace, where a socket must have been made to be listed. A socket
    that is not there, unbound, abstract, or listed twice is left out (a bound path may
    hold a newline: a second line with its inode is a forgery, and no answer is better
    than a wrong one)."""
    wanted = {str(inode).encode(): inode for inode in inodes}
    found: dict[int, list[bytes]] = {}
    budget = MAX_UNIX_TABLE_BYTES
    try:
        with open(proc / str(pid) / "net" / "unix", "rb") as table:
            for line in table:
                budget -= len(line)
                if budget < 0:
                    return {}
                # Num RefCount Protocol Flags Type St Inode [Path]
                fields = line.rstrip(b"\n").split(None, 7)
                if len(fields) >= 7 and fields[6] in wanted:
                    path = fields[7] if len(fields) == 8 else b""
                    found.setdefault(wanted[fields[6]], []).append(path)
    except OSError:
        return {}
    return {
        inode: os.fsdecode(paths[0])
        for inode, paths in found.items()
        if len(paths) == 1 and paths[0].startswith(b"/")
    }


def read_file_in_root(proc: Path, pid: int, path: str, limit: int) -> bytes:
    """A regular file a process names (a VMM's config file), read as that process sees it:
    an absolute path inside its root (/proc/PID/root: a jail's chroot), a relative one
    below its working directory; links are never followed out of that root (openat2
    RESOLVE_IN_ROOT, or, on kernels without it, no link or `..` at all). At most
    `limit` + 1 bytes are read, so a caller can tell a file that is too large. Raises
    OSError (a FIFO, a device or a directory is refused without blocking)."""
    base = proc / str(pid) / ("root" if path.startswith("/") else "cwd")
    relative = path.lstrip("/") or "."
    dirfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _open_in_root(dirfd, relative)
    finally:
        os.close(dirfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 16))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


_SYS_OPENAT2 = 437  # the same number on every architecture (added after the table merge)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


_libc: ctypes.CDLL | None = None


def _openat2_in_root(dirfd: int, path: str) -> int:
    """openat2(dirfd, path, RESOLVE_IN_ROOT): `..` and absolute links stop at dirfd."""
    global _libc  # noqa: PLW0603 (loaded once, on first use)
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    how = _OpenHow(_READ_FLAGS, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd: int = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def _open_beneath_without_links(dirfd: int, path: str) -> int:
    """The fallback without openat2: one component at a time, refusing `..` and every
    symbolic link, so nothing leads out of dirfd."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise OSError(errno.EXDEV, "path leaves the process's root", path)
    current = dirfd
    try:
        for part in parts[:-1]:
            step = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=current)
            if current != dirfd:
                os.close(current)
            current = step
        return os.open(parts[-1], _READ_FLAGS | os.O_NOFOLLOW, dir_fd=current)
    finally:
        if current != dirfd:
            os.close(current)


def _open_in_root(dirfd: int, path: str) -> int:
    try:
        return _openat2_in_root(dirfd, path)
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter
            raise
    return _open_beneath_without_links(dirfd, path)
