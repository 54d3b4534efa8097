"""The proc channel's escape-indicator records as events: what each field says, read from a
recorded /proc tree; the code tables checked against the kernel's own UAPI headers (never a
positional table); hostile bytes and out-of-range values never crash or mislead."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zonewatch.model import Vmm, Zone
from zonewatch.probes.proc import (
    CAPABILITIES,
    IORING_SETUP_FLAGS,
    NAMESPACE_FLAGS,
    PERF_TYPES,
    _perf_type,
    proc_event,
)
from zonewatch.probes.records import ProcOp, ProcRecord

UAPI = Path("/usr/include/linux")
ZONE = Zone(id="z", key=5, name="z", tenant="t", vmm=Vmm.QEMU, pid=42, start_time=0)
PID, CHILD, OTHER = 42, 900, 733


def record(op: ProcOp, **kw: object) -> ProcRecord:
    fields: dict[str, object] = {
        "zone_key": 5, "ts_mono_ns": 1, "pid": PID, "tid": PID, "comm": b"qemu-system-x86",
        "op": op, "flags": 0, "ret": 0, "ppid": 0, "target_pid": 0, "arg": (0, 0, 0),
        "addr": bytes(16), "pcomm": b"", "path": b"", "path2": b"", "args": b"",
    }  # fmt: skip
    fields.update(kw)
    return ProcRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """A recorded /proc: the VMM holds a uts namespace fd (3), a pidfd of OTHER (5) and a
    directory fd (7); OTHER is sshd; CHILD runs a memfd."""
    root = tmp_path / "proc"
    fd, fdinfo = root / str(PID) / "fd", root / str(PID) / "fdinfo"
    fd.mkdir(parents=True)
    fdinfo.mkdir()
    (fd / "3").symlink_to("uts:[4026531838]")
    (fd / "5").symlink_to("anon_inode:[pidfd]")
    (fdinfo / "5").write_bytes(b"pos:\t0\nflags:\t02000002\nmnt_id:\t15\nPid:\t733\nNSpid:\t733\n")
    (fd / "7").symlink_to("/srv")
    (root / str(OTHER)).mkdir()
    (root / str(OTHER) / "comm").write_bytes(b"sshd\n")
    (root / str(CHILD)).mkdir()
    (root / str(CHILD) / "exe").symlink_to("/memfd:x (deleted)")
    return root


def header_defines(name: str, prefix: str) -> dict[str, int]:
    text = (UAPI / name).read_text()
    found = re.findall(
        rf"#define\s+{prefix}(\w+)\s+\(?(0x[0-9a-fA-F]+|\d+)(?:U\s*<<\s*(\d+))?", text
    )
    return {n: int(v, 0) << int(shift or 0) for n, v, shift in found}


def test_capabilities_are_the_kernel_header_s() -> None:
    defined = {f"CAP_{n}": v for n, v in header_defines("capability.h", "CAP_").items()}
    named = {v: n for n, v in defined.items() if v <= 63}
    assert len(named) >= 40
    # Every capability the header knows, under the same number (ours may know newer ones).
    assert {b: CAPABILITIES.get(b) for b in named} == named


def test_namespace_flags_are_the_kernel_header_s() -> None:
    defined = header_defines("sched.h", "CLONE_NEW")
    aliases = {"NS": "mnt", "CGROUP": "cgroup", "UTS": "uts", "IPC": "ipc", "USER": "user",
               "PID": "pid", "NET": "net", "TIME": "time"}  # fmt: skip
    assert {defined[k]: v for k, v in aliases.items()} == NAMESPACE_FLAGS


def test_io_uring_and_perf_codes_are_the_kernel_header_s() -> None:
    defined = header_defines("io_uring.h", "IORING_SETUP_")
    for bit, name in IORING_SETUP_FLAGS.items():
        assert defined.get(name, bit) == bit, name  # flags newer than this header: not checked
    text = (UAPI / "perf_event.h").read_text()
    types = {int(v): n.lower() for n, v in re.findall(r"PERF_TYPE_(\w+)\s*=\s*(\d+),", text)}
    assert types == PERF_TYPES


def test_setns_names_the_namespace_joined(proc: Path) -> None:
    e = proc_event(record(ProcOp.SETNS, arg=(0, 3, 0)), ZONE, 1, proc)
    assert (e.op, e.target, e.namespaces, e.flags) == ("setns", "uts:[4026531838]", "uts", 0)
    # Through a pidfd, several at once: the flags say which.
    e = proc_event(record(ProcOp.SETNS, arg=(0x60020000, 5, 0)), ZONE, 1, proc)
    assert (e.target, e.namespaces) == ("anon_inode:[pidfd]", "mnt,pid,net")
    # Closed before the agent looked: named by number, never a wrong namespace.
    e = proc_event(record(ProcOp.SETNS, arg=(0, 9, 0), ret=-9), ZONE, 1, proc)
    assert (e.target, e.namespaces, e.ret) == ("fd 9", "", -9)


def test_unshare_and_fork_into_new_namespaces(proc: Path) -> None:
    e = proc_event(record(ProcOp.UNSHARE, arg=(0x10020000, 0, 0)), ZONE, 1, proc)
    assert (e.namespaces, e.flags) == ("mnt,user", 0x10020000)
    e = proc_event(record(ProcOp.UNSHARE, arg=(0x200, 0, 0)), ZONE, 1, proc)  # CLONE_FS
    assert (e.namespaces, e.flags) == ("", 0x200)
    fork = record(ProcOp.FORK, target_pid=CHILD, arg=(0x30000011, 0, 0))
    e = proc_event(fork, ZONE, 1, proc)
    assert (e.pid, e.namespaces, e.flags) == (CHILD, "user,pid", 0x30000011)
    plain = proc_event(record(ProcOp.FORK, target_pid=CHILD, arg=(0x11, 0, 0)), ZONE, 1, proc)
    assert (plain.namespaces, plain.flags) == ("", 0)  # JSON lines stay as before


def test_roots_and_file_handles(proc: Path) -> None:
    e = proc_event(record(ProcOp.CHROOT, path=b"/proc/1/root\xff" + bytes(10)), ZONE, 1, proc)
    assert e.target == "/proc/1/root\\xff"  # hostile bytes escaped
    pivot = record(ProcOp.PIVOT_ROOT, path=b"/new\0", path2=b"/new/old")
    e = proc_event(pivot, ZONE, 1, proc)
    assert (e.target, e.args) == ("/new", "put_old=/new/old")
    handle = record(ProcOp.OPEN_BY_HANDLE, arg=(0, 7, 0xFFFFFFFF << 32 | 8), ret=4)
    e = proc_event(handle, ZONE, 1, proc)
    assert (e.target, e.args, e.ret) == ("/srv", "handle_type=-1 handle_bytes=8", 4)
    gone = record(ProcOp.OPEN_BY_HANDLE, arg=(0, 0xFFFFFF9C, 1 << 32 | 8))  # AT_FDCWD
    assert proc_event(gone, ZONE, 1, proc).target == "fd -100"


def test_other_processes(proc: Path) -> None:
    for op in (ProcOp.PROCESS_VM_READV, ProcOp.PROCESS_VM_WRITEV):
        e = proc_event(record(op, target_pid=OTHER, arg=(1, 2, 0), ret=-14), ZONE, 1, proc)
        assert (e.target_pid, e.target, e.args) == (OTHER, "733 (sshd)", "local_iov=1 remote_iov=2")
    e = proc_event(record(ProcOp.PIDFD_GETFD, arg=(5, 0, 0), ret=8), ZONE, 1, proc)
    assert (e.target_pid, e.target, e.args) == (OTHER, "733 (sshd) fd 0", "pidfd=5 fd=0")
    e = proc_event(record(ProcOp.PIDFD_GETFD, arg=(6, 2, 0)), ZONE, 1, proc)  # pidfd gone
    assert (e.target_pid, e.target) == (0, "pidfd 6 fd 2")


def test_kernel_interfaces(proc: Path, tmp_path: Path) -> None:
    ring = record(ProcOp.IO_URING_SETUP, arg=(64, 0x2 | 0x4 | 1 << 40, 0), ret=3)
    e = proc_event(ring, ZONE, 1, proc)
    assert e.args == f"entries=64 flags={0x6 | 1 << 40:#x} (SQPOLL,SQ_AFF)"
    e = proc_event(record(ProcOp.USERFAULTFD, arg=(0o2004000, 0, 0)), ZONE, 1, proc)
    assert e.flags == 0o2004000
    kexec = record(ProcOp.KEXEC_LOAD, arg=(40 << 16, 2, 0x100000), ret=-22)
    assert proc_event(kexec, ZONE, 1, proc).target == "2 segments, entry 0x100000"
    from_file = record(ProcOp.KEXEC_FILE_LOAD, arg=(0, 7, 0), path2=b"console=ttyS0")
    e = proc_event(from_file, ZONE, 1, proc)
    assert (e.op, e.target, e.args) == ("kexec_load", "/srv", "console=ttyS0")
    no_cmdline = record(ProcOp.KEXEC_FILE_LOAD, arg=(4, 9, 0))  # KEXEC_FILE_NO_INITRAMFS
    assert proc_event(no_cmdline, ZONE, 1, proc).target == "fd 9"
    anyone = record(ProcOp.PERF_EVENT_OPEN, target_pid=0xFFFFFFFF, arg=(2, 0x1F, 8))
    e = proc_event(anyone, ZONE, 1, proc)
    assert (e.target, e.target_pid, e.flags) == ("tracepoint", -1, 8)
    assert e.args == "type=2 config=0x1f pid=-1"
    own = proc_event(record(ProcOp.PERF_EVENT_OPEN, arg=(1, 0, 0)), ZONE, 1, proc)
    assert (own.target, own.target_pid) == ("software", PID)
    sources = tmp_path / "event_source"
    (sources / "kprobe").mkdir(parents=True)
    (sources / "kprobe" / "type").write_text("6\n")
    (sources / "broken").mkdir()
    assert (_perf_type(6, sources), _perf_type(99, sources)) == ("kprobe", "type 99")


def test_capset_names_the_effective_set_and_fd_exec_names_the_code(proc: Path) -> None:
    caps = record(ProcOp.CAPSET, arg=(1 << 21 | 1 << 19 | 1 << 63, 1 << 21, 0))
    assert proc_event(caps, ZONE, 1, proc).caps == "CAP_SYS_PTRACE,CAP_SYS_ADMIN"
    run = record(ProcOp.EXEC, pid=CHILD, tid=CHILD, path=b"/proc/self/fd/4", args=b"x\0")
    e = proc_event(run, ZONE, 1, proc)
    assert (e.exe, e.target) == ("/proc/self/fd/4", "/memfd:x (deleted)")
    normal = record(ProcOp.EXEC, pid=CHILD, tid=CHILD, path=b"/proc/fd", args=b"x\0")
    assert proc_event(normal, ZONE, 1, proc).target == ""


def test_new_fields_round_trip_through_json_lines(proc: Path) -> None:
    from zonewatch.model import record_from_json

    e = proc_event(record(ProcOp.SETNS, arg=(0x40000000, 3, 0)), ZONE, 1, proc)
    e.caps = "CAP_BPF"
    e.target_pid = -1
    back = record_from_json(e.to_json())
    assert back == e
    # Fields a call does not set stay out of the line, as before.
    plain = proc_event(record(ProcOp.BPF, arg=(5, 0, 0)), ZONE, 1, proc)
    assert set(plain.to_json()["proc"]) == {
        "pid", "tid", "ppid", "comm", "pcomm", "exe", "args", "target", "ret", "spawned",
    }  # fmt: skip
