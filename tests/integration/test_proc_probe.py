"""bpf/proc.c loaded and attached for real: a stand-in VMM (its pid put in the probe's zone
filter, as the inventory would) spawns a shell, traces, mounts, changes credentials, calls
bpf(), runs code from a memfd and opens sockets; each call arrives as the proc event the
rules expect. Processes it spawns are followed by the kernel; others produce nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import pytest

from zonewatch.model import FileEvent, ProcEvent, Vmm, Zone, ZoneRef
from zonewatch.probes.proc import ProcProbe, outside_share_event, proc_event
from zonewatch.probes.records import ProcOp, ProcRecord

ZONE_KEY = 51

# The stand-in VMM: does one thing per command, answers "done <detail>".
SCRIPT = r"""
import ctypes, os, signal, socket, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
children = []
print("ready", flush=True)
for line in sys.stdin:
    cmd, *rest = line.split()
    out = ""
    if cmd == "spawn":  # a shell that runs a program, then exits 3
        out = str(subprocess.run(["/bin/sh", "-c", "/bin/true; exit 3"]).returncode)
    elif cmd == "sleeper":
        p = subprocess.Popen(["sleep", "60"])
        children.append(p.pid)
        out = str(p.pid)
    elif cmd == "ptrace":  # attach to our own sleeper, then let it go
        pid = int(rest[0])
        assert libc.ptrace(16, pid, None, None) == 0, ctypes.get_errno()
        os.waitpid(pid, 0)
        libc.ptrace(17, pid, None, None)
    elif cmd == "mount":
        rc = libc.mount(b"zw-test", rest[0].encode(), b"tmpfs", 0, None)
        assert rc == 0, ctypes.get_errno()
        libc.umount2(rest[0].encode(), 0)
    elif cmd == "setids":
        os.setuid(0)
        os.setgid(0)
    elif cmd == "capset":  # set the capabilities we have (v3 header, two data halves)
        hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        assert libc.syscall(125, hdr, data) == 0, ctypes.get_errno()
        assert libc.syscall(126, hdr, data) == 0, ctypes.get_errno()
        out = f"{data[0] | data[3] << 32:#x}"
    elif cmd == "bpf":  # BPF_MAP_CREATE with an empty attribute: EINVAL, still a call
        attr = ctypes.create_string_buffer(128)
        out = str(libc.syscall(321, 0, attr, 128))
    elif cmd == "memfd-exec":  # /bin/sleep copied into a memfd and run from there
        fd = os.memfd_create("zw-anon", 0)
        with open("/bin/sleep", "rb") as f:
            os.write(fd, f.read())
        pid = os.fork()
        if pid == 0:
            os.execve(fd, ["zw-anon", "60"], {})
        os.close(fd)
        children.append(pid)
        out = str(pid)
    elif cmd == "sockets":
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.connect(("127.0.0.1", int(rest[0])))
        out = str(s.getsockname()[1])
        s.close()
    elif cmd == "reap":
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        children.clear()
    print("done " + out, flush=True)
"""


class StandInVmm:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
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
        if self.proc.poll() is None:
            self.do("reap")
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()

    def __enter__(self) -> StandInVmm:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


@pytest.fixture(scope="module")
def probe() -> Iterator[ProcProbe]:
    p = ProcProbe()
    p.attach()
    try:
        yield p
    finally:
        p.detach()


@pytest.fixture
def vmm(probe: ProcProbe) -> Iterator[StandInVmm]:
    with StandInVmm() as standin:
        probe.set_zone_pids({standin.pid: ZONE_KEY})
        try:
            yield standin
        finally:
            probe.set_zone_pids({})


def zone_for(pid: int) -> Zone:
    return Zone(id="z", key=ZONE_KEY, name="z", tenant="t", vmm=Vmm.QEMU, pid=pid, start_time=0)


def drain_until(
    probe: ProcProbe, done: Callable[[list[ProcRecord]], bool], timeout: float = 5.0
) -> list[ProcRecord]:
    """Poll the ring buffer until `done(records)` holds (events are awaited, not slept on)."""
    records: list[ProcRecord] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records += probe.poll(50)
        if done(records):
            return records
    raise AssertionError(f"condition not met; got {[(r.op.name, r.pid) for r in records]}")


def events(records: list[ProcRecord], pid: int) -> list[ProcEvent]:
    zone = zone_for(pid)
    return [proc_event(r, zone, r.ts_mono_ns) for r in records]


def has(op: ProcOp, pid: int | None = None) -> Callable[[list[ProcRecord]], bool]:
    return lambda rs: any(r.op == op and (pid is None or r.pid == pid) for r in rs)


def test_spawned_shell_and_its_child_are_followed(probe: ProcProbe, vmm: StandInVmm) -> None:
    assert vmm.do("spawn") == "3"
    records = drain_until(
        probe, lambda rs: sum(r.op == ProcOp.EXIT for r in rs) >= 2 and has(ProcOp.FORK)(rs)
    )
    evs = events(records, vmm.pid)
    assert {r.zone_key for r in records} == {ZONE_KEY}
    fork = next(e for e in evs if e.op == "fork" and e.ppid == vmm.pid)
    shell = fork.pid
    assert (fork.exe, fork.pcomm, fork.spawned) == (
        os.path.realpath(sys.executable),
        "python",
        True,
    )
    execs = {e.pid: e for e in evs if e.op == "exec"}
    sh = execs[shell]
    assert (sh.exe, sh.args) == ("/bin/sh", "/bin/sh -c /bin/true; exit 3")
    assert (sh.ppid, sh.spawned) == (vmm.pid, True)
    assert sh.pcomm == "python"  # the stand-in (run as .venv/bin/python)
    # The shell's own child was never in the inventory: the kernel followed it.
    true = next(e for p, e in execs.items() if p != shell)
    assert (true.exe, true.ppid, true.pcomm, true.spawned) == ("/bin/true", shell, "sh", True)
    exits = {e.pid: e.ret for e in evs if e.op == "exit"}
    assert exits[shell] == 3 and exits[true.pid] == 0
    # Exited processes left the filter (in the kernel): a reused pid inherits nothing.
    table = probe.bpf[b"zone_pids"]
    assert table.Key(shell) not in table and table.Key(true.pid) not in table
    assert shell not in probe.followed()


def test_ptrace_mount_credentials_capset_bpf(
    probe: ProcProbe, vmm: StandInVmm, tmp_path: Path
) -> None:
    sleeper = int(vmm.do("sleeper"))
    vmm.do(f"ptrace {sleeper}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        vmm.do(f"mount {mnt}")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
    vmm.do("setids")
    caps = vmm.do("capset")
    assert int(vmm.do("bpf")) == -1
    records = drain_until(probe, has(ProcOp.BPF))
    evs = {e.op: e for e in events(records, vmm.pid) if e.pid == vmm.pid}
    traced = [(e.target, e.args, e.ret) for e in events(records, vmm.pid) if e.op == "ptrace"]
    target = f"{sleeper} (sleep)"
    assert traced == [(target, "PTRACE_ATTACH", 0), (target, "PTRACE_DETACH", 0)]
    assert (evs["mount"].target, evs["mount"].ret) == (str(mnt), 0)
    assert evs["mount"].args == "source=zw-test type=tmpfs flags=0x0"
    assert (evs["setuid"].target, evs["setuid"].ret) == ("0", 0)
    assert (evs["setgid"].target, evs["setgid"].ret) == ("0", 0)
    assert evs["capset"].target.startswith(f"eff={caps} ")
    assert (evs["bpf"].target, evs["bpf"].ret) == ("BPF_MAP_CREATE", -22)  # EINVAL
    # The sleeper the stand-in started is followed too.
    assert probe.followed().get(sleeper) == vmm.pid


def test_code_run_from_a_memfd(probe: ProcProbe, vmm: StandInVmm) -> None:
    child = int(vmm.do("memfd-exec"))
    records = drain_until(probe, has(ProcOp.EXEC, child))
    evs = events(records, vmm.pid)
    memfd = next(e for e in evs if e.op == "memfd_create")
    assert (memfd.target, memfd.pid) == ("zw-anon", vmm.pid)
    assert memfd.ret >= 0
    run = next(e for e in evs if e.op == "exec" and e.pid == child)
    assert run.exe.startswith("/dev/fd/"), run
    assert run.target == "/memfd:zw-anon (deleted)"
    assert run.args == "zw-anon 60"
    assert run.spawned


def test_connect_and_bind(probe: ProcProbe, vmm: StandInVmm) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        local = int(vmm.do(f"sockets {port}"))
    records = drain_until(probe, has(ProcOp.CONNECT))
    evs = {e.op: e for e in events(records, vmm.pid)}
    assert (evs["bind"].target, evs["bind"].ret) == ("127.0.0.1:0", 0)
    assert (evs["connect"].target, evs["connect"].ret) == (f"127.0.0.1:{port}", 0)
    assert (evs["connect"].sock_addr, evs["connect"].sock_port) == ("127.0.0.1", port)
    assert (evs["bind"].sock_addr, evs["bind"].sock_port) == ("127.0.0.1", 0)
    assert local > 0


def test_module_load(probe: ProcProbe, vmm: StandInVmm) -> None:
    if "finit_module" in probe.missing:
        pytest.skip("this kernel has no module support (no init_module tracepoints)")
    raise AssertionError("a kernel with modules: add a stand-in finit_module here")


def test_process_outside_the_filter_produces_nothing(probe: ProcProbe, vmm: StandInVmm) -> None:
    with StandInVmm() as other:
        other.do("spawn")
        other.do("setids")
        vmm.do("setids")
        records = drain_until(probe, has(ProcOp.SETGID, vmm.pid))
    assert not [r for r in records if r.pid == other.pid or r.ppid == other.pid]


def test_exec_fork_exit_only_without_syscall_tracepoints(tmp_path: Path) -> None:
    lean = ProcProbe(syscalls=False)
    lean.attach()
    try:
        assert b"sched:sched_process_exec" in lean.bpf.tracepoint_fds
        # Nothing of the syscall half is attached: non-zone syscalls stay on the fast path.
        assert not [tp for tp in lean.bpf.tracepoint_fds if tp.startswith(b"syscalls:")]
        with StandInVmm() as vmm:
            lean.set_zone_pids({vmm.pid: ZONE_KEY})
            vmm.do("setids")
            assert vmm.do("spawn") == "3"
            records = drain_until(lean, lambda rs: sum(r.op == ProcOp.EXIT for r in rs) >= 2)
            lean.set_zone_pids({})
        ops = {r.op for r in records}
        assert {ProcOp.FORK, ProcOp.EXEC, ProcOp.EXIT} <= ops
        assert ProcOp.SETUID not in ops
    finally:
        lean.detach()


def test_open_outside_share_comes_from_the_file_channel() -> None:
    ref = ZoneRef("z", "z", "t", "qemu")

    def opened(path: str, share: str, op: str = "open") -> FileEvent:
        return FileEvent(1, ref, op, "", path, pid=7, tid=7, comm="qemu", ret=3, share=share)

    escape = outside_share_event(opened("/etc/shadow", ""))
    assert escape is not None
    assert (escape.op, escape.target, escape.ret, escape.pid) == (
        "open_outside_share",
        "/etc/shadow",
        3,
        7,
    )
    assert outside_share_event(opened("/srv/share/a", "share")) is None
    assert outside_share_event(opened("/etc/shadow", "", op="write")) is None
