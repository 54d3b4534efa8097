"""Stand-in processes a test controls: a backend that performs file operations when told, and
a VMM (StandInVmm) that the inventory takes for a QEMU zone and that makes the proc
channel's calls when told. A test puts the pid in a probe's filter first and then awaits
exactly the events it caused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

SCRIPT = r"""
import os, sys, threading
root = sys.argv[1]
dfd = os.open(root, os.O_DIRECTORY | os.O_RDONLY)
print("ready", flush=True)


def run(cmd, rest):
    if cmd == "create":
        fd = os.open(rest[0], os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd)
        os.write(fd, b"x" * int(rest[1]))
        os.write(fd, b"y" * int(rest[1]))
        os.close(fd)
    elif cmd == "read":
        fd = os.open(rest[0], os.O_RDONLY, dir_fd=dfd)
        while os.read(fd, 4096):
            pass
        os.close(fd)
    elif cmd == "pcreate":  # as create, with positional writes (what 9p backends use)
        fd = os.open(rest[0], os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd)
        os.pwrite(fd, b"x" * int(rest[1]), 0)
        os.pwrite(fd, b"y" * int(rest[1]), int(rest[1]))
        os.close(fd)
    elif cmd == "pread":
        fd = os.open(rest[0], os.O_RDONLY, dir_fd=dfd)
        offset = 0
        while data := os.pread(fd, 4096, offset):
            offset += len(data)
        os.close(fd)
    elif cmd == "rename":
        os.rename(rest[0], rest[1], src_dir_fd=dfd, dst_dir_fd=dfd)
    elif cmd == "mkdir":
        os.mkdir(rest[0], dir_fd=dfd)
    elif cmd == "chmod":
        os.chmod(rest[0], 0o600, dir_fd=dfd)
    elif cmd == "unlink":
        os.unlink(rest[0], dir_fd=dfd)
    elif cmd == "rmdir":
        os.rmdir(rest[0], dir_fd=dfd)
    elif cmd == "open-missing":  # a failing open: the error is the record's return
        try:
            os.open(rest[0], os.O_RDONLY, dir_fd=dfd)
        except FileNotFoundError:
            pass
    elif cmd == "thread":  # the rest of the line, in a thread started now
        t = threading.Thread(target=run, args=(rest[0], rest[1:]))
        t.start()
        t.join()


for line in sys.stdin:
    cmd, *rest = line.split()
    if cmd == "quit":
        break
    run(cmd, rest)
    print("done", flush=True)
"""


class StandIn:
    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        assert self.proc.stdout.readline().strip() == "ready"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def do(self, *commands: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        for command in commands:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            assert self.proc.stdout.readline().strip() == "done", command

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


# A stand-in VMM: looks like a QEMU zone to the inventory (its argv[0] is a symlink named
# qemu-system-x86_64 to this Python, its comm `qemu-system-x86`, `-name` names the zone) and
# makes one proc-channel call per command, answering "done <detail>". Every call that could
# change the host is made so that it cannot: namespaces and roots change only in a child it
# forks for the purpose, the other process's memory is addressed where nothing is mapped
# (EFAULT), kexec_load names a foreign architecture (EINVAL before anything is loaded).
VMM_SCRIPT = r"""
import ctypes, os, signal, socket, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
children, held = [], []


def syscall(nr, *args):
    rc = libc.syscall(nr, *args)
    return rc if rc >= 0 else -ctypes.get_errno()


def in_child(body):
    # Runs body() in a forked child (followed by the kernel as spawned); its exit status.
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def namespaces():
    # A child leaves the stand-in's uts and mount namespaces, joins the uts one back and
    # stays (as nsenter's shell would, its namespace fd open) until `reap`; its pid.
    parent = os.getpid()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            assert libc.unshare(CLONE_NEWUTS | CLONE_NEWNS) == 0, ctypes.get_errno()
            fd = os.open(f"/proc/{parent}/ns/uts", os.O_RDONLY)
            assert libc.setns(fd, CLONE_NEWUTS) == 0, ctypes.get_errno()
            os.write(ready_w, b"x")
            signal.pause()
        finally:
            os._exit(1)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)
    children.append(pid)
    return pid


def clone_into_namespaces():
    # clone(2) with CLONE_NEW* (fork's raw form plus namespaces): the child exits at once.
    pid = syscall(56, CLONE_NEWUTS | CLONE_NEWNS | signal.SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)
    assert pid > 0, pid
    os.waitpid(pid, 0)
    return pid


def roots(path):
    # A child in its own mount namespace: chroot into path; pivot_root to a missing dir.
    def body():
        assert libc.unshare(CLONE_NEWNS) == 0, ctypes.get_errno()
        assert libc.chroot(path.encode()) == 0, ctypes.get_errno()
        libc.pivot_root(b"/zw-missing", b"/zw-missing")
    return in_child(body)


def by_handle(path):
    # name_to_handle_at then open_by_handle_at (the "Shocker" pair) on a file of the test's.
    handle = ctypes.create_string_buffer(8 + 128)
    ctypes.c_uint32.from_buffer(handle).value = 128
    mount_id = ctypes.c_int()
    assert syscall(303, -100, path.encode(), handle, ctypes.byref(mount_id), 0) == 0
    mount_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    fd = syscall(304, mount_fd, handle, os.O_RDONLY)
    held.append(mount_fd)
    if fd >= 0:
        os.close(fd)
    return f"{fd} {ctypes.c_int32.from_buffer(handle, 4).value}"


def process_vm(pid):
    # Read and write pid's memory at an address nothing maps: each call fails with EFAULT.
    buf = ctypes.create_string_buffer(16)
    local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 16)
    remote = (ctypes.c_void_p * 2)(0x10, 16)
    read = syscall(310, pid, local, 1, remote, 1, 0)
    return f"{read} {syscall(311, pid, local, 1, remote, 1, 0)}"


def pidfd_getfd(pid):
    # A copy of pid's stdin; the pidfd stays open until `reap` (as an attacker keeps it).
    pidfd = syscall(434, pid, 0)
    assert pidfd >= 0, pidfd
    held.append(pidfd)
    fd = syscall(438, pidfd, 0, 0)
    if fd >= 0:
        os.close(fd)
    return f"{pidfd} {fd}"


def io_uring():
    params = ctypes.create_string_buffer(120)
    ctypes.c_uint32.from_buffer(params, 8).value = 2  # IORING_SETUP_SQPOLL
    fd = syscall(425, 4, params)
    if fd >= 0:
        os.close(fd)
    return str(fd)


def userfaultfd():
    fd = syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd >= 0:
        os.close(fd)
    return str(fd)


def kexec():
    # KEXEC_ARCH_ARM (40 << 16) on x86: EINVAL before any segment is looked at (or ENOSYS).
    return str(syscall(246, 0, 0, None, 40 << 16))


def perf_event():
    attr = ctypes.create_string_buffer(128)  # PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK
    ctypes.c_uint32.from_buffer(attr, 0).value = 1
    ctypes.c_uint32.from_buffer(attr, 4).value = 128
    fd = syscall(298, attr, 0, -1, -1, 0)
    if fd >= 0:
        os.close(fd)
    return str(fd)


def run(cmd, rest):
    if cmd == "spawn":  # a shell that runs a program, then exits 3
        return str(subprocess.run(["/bin/sh", "-c", "/bin/true; exit 3"]).returncode)
    if cmd == "sleeper":
        p = subprocess.Popen(["sleep", "60"], stdin=subprocess.PIPE)
        children.append(p.pid)
        return str(p.pid)
    if cmd == "ptrace":  # attach to our own sleeper, then let it go
        pid = int(rest[0])
        assert libc.ptrace(16, pid, None, None) == 0, ctypes.get_errno()
        os.waitpid(pid, 0)
        libc.ptrace(17, pid, None, None)
        return ""
    if cmd == "mount":
        rc = libc.mount(b"zw-test", rest[0].encode(), b"tmpfs", 0, None)
        assert rc == 0, ctypes.get_errno()
        libc.umount2(rest[0].encode(), 0)
        return ""
    if cmd == "setids":
        os.setuid(0)
        os.setgid(0)
        return ""
    if cmd == "switch-effective":  # as virtiofsd does per request: effective ids only
        os.setresgid(-1, 0, -1)
        os.setresuid(-1, 0, -1)
        return ""
    if cmd == "capset":  # set the capabilities we have (v3 header, two data halves)
        hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        assert libc.syscall(125, hdr, data) == 0, ctypes.get_errno()
        assert libc.syscall(126, hdr, data) == 0, ctypes.get_errno()
        return f"{data[0] | data[3] << 32:#x}"
    if cmd == "bpf":  # BPF_MAP_CREATE with an empty attribute: EINVAL, still a call
        attr = ctypes.create_string_buffer(128)
        return str(libc.syscall(321, 0, attr, 128))
    if cmd == "memfd-exec":  # /bin/sleep copied into a memfd and run from there
        fd = os.memfd_create("zw-anon", 0)
        with open("/bin/sleep", "rb") as f:
            os.write(fd, f.read())
        pid = os.fork()
        if pid == 0:
            os.execve(fd, ["zw-anon", "60"], {})
        os.close(fd)
        children.append(pid)
        return str(pid)
    if cmd == "spawned-memfd":  # a child the kernel follows makes a memfd
        return str(in_child(lambda: os.memfd_create("zw-staged", 0)))
    if cmd == "sockets":
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.connect(("127.0.0.1", int(rest[0])))
        out = str(s.getsockname()[1])
        s.close()
        return out
    if cmd == "namespaces":
        return str(namespaces())
    if cmd == "clone-namespaces":
        return str(clone_into_namespaces())
    if cmd == "roots":
        return str(roots(rest[0]))
    if cmd == "by-handle":
        return by_handle(rest[0])
    if cmd == "process-vm":
        return process_vm(int(rest[0]))
    if cmd == "pidfd-getfd":
        return pidfd_getfd(int(rest[0]))
    if cmd == "io-uring":
        return io_uring()
    if cmd == "userfaultfd":
        return userfaultfd()
    if cmd == "kexec":
        return kexec()
    if cmd == "perf-event":
        return perf_event()
    if cmd == "reap":
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for fd in held:
            os.close(fd)
        children.clear()
        held.clear()
        return ""
    raise SystemExit(f"unknown command {cmd}")


print("ready", flush=True)
for line in sys.stdin:
    cmd, *rest = line.split()
    print("done " + run(cmd, rest), flush=True)
"""

VMM_ARGV0 = "qemu-system-x86_64"


class StandInVmm:
    """The stand-in VMM above, as a QEMU zone named `name` to the inventory."""

    def __init__(self, name: str) -> None:
        self._bin = Path(tempfile.mkdtemp(prefix="zw-standin-"))
        argv0 = self._bin / VMM_ARGV0
        # The real interpreter (not the venv's symlink): Python finds its stdlib from it.
        argv0.symlink_to(os.path.realpath(sys.executable))
        self.proc = subprocess.Popen(
            [str(argv0), "-c", VMM_SCRIPT, "-name", name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.read() == "ready"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def do(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.read()
        assert answer.startswith("done"), (command, answer)
        return answer[5:]

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.do("reap")
                self.proc.kill()
        finally:
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream:
                    stream.close()
            shutil.rmtree(self._bin, ignore_errors=True)

    def __enter__(self) -> StandInVmm:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
