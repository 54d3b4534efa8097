"""bpf/proc.c loaded and attached for real: a stand-in VMM (tests/helpers/standin.py; the
inventory takes it for a QEMU zone, and its zone's pids go into the probe's filter as the
agent puts them) spawns a shell, traces, mounts, changes credentials, calls bpf(), runs code
from a memfd, opens sockets, and makes each escape-indicator call (namespaces, roots, file
handles, other processes' memory and fds, io_uring, userfaultfd, kexec, perf events). Each
call arrives attributed to the zone as the proc event the rules expect, and the default
rules fire on it through the engine. Processes it spawns are followed by the kernel;
others produce nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.standin import StandInVmm
from zonewatch.inventory import Inventory
from zonewatch.model import Alert, FileEvent, ProcEvent, Zone, ZoneRef
from zonewatch.pipeline import Attribution
from zonewatch.probes.proc import ProcProbe, outside_share_event
from zonewatch.probes.records import ProcOp, ProcRecord
from zonewatch.rules.engine import RuleEngine

RULES = Path(__file__).resolve().parents[2] / "rules"


@pytest.fixture(scope="module")
def probe() -> Iterator[ProcProbe]:
    p = ProcProbe()
    p.attach()
    try:
        yield p
    finally:
        p.detach()


class ZoneVmm:
    """A stand-in VMM found by the real inventory, its zone's pids in the probe's filter."""

    def __init__(self, probe: ProcProbe, standin: StandInVmm) -> None:
        self.probe = probe
        self.standin = standin
        self.inventory = Inventory()
        self.inventory.refresh()
        zones = [z for z in self.inventory.zones.values() if z.pid == standin.pid]
        assert len(zones) == 1, "the inventory does not take the stand-in for a zone"
        self.zone: Zone = zones[0]
        probe.set_zone_pids(
            {pid: key for pid, key in self.inventory.zone_pids().items() if key == self.zone.key}
        )

    @property
    def pid(self) -> int:
        return self.standin.pid

    def do(self, command: str) -> str:
        return self.standin.do(command)

    def events(self, records: list[ProcRecord]) -> list[ProcEvent]:
        """The records as the agent's attribution makes them (zone from the kernel's key)."""
        events = Attribution(self.inventory.by_key).process(records)
        assert all(isinstance(e, ProcEvent) for e in events)
        return [e for e in events if isinstance(e, ProcEvent)]

    def alerts(self, records: list[ProcRecord]) -> list[Alert]:
        """The default rules run over the attributed records, as the agent runs them."""
        engine = RuleEngine.load([RULES])
        return engine.process(self.events(records)) + engine.flush()


@pytest.fixture
def vmm(probe: ProcProbe) -> Iterator[ZoneVmm]:
    with StandInVmm(f"zw-standin-{os.getpid()}") as standin:
        try:
            yield ZoneVmm(probe, standin)
        finally:
            probe.set_zone_pids({})


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


def has(op: ProcOp, pid: int | None = None) -> Callable[[list[ProcRecord]], bool]:
    return lambda rs: any(r.op == op and (pid is None or r.pid == pid) for r in rs)


def rule_summaries(alerts: list[Alert]) -> dict[str, str]:
    """Rule name -> its alerts' summaries, joined (for `in` checks)."""
    out: dict[str, str] = {}
    for alert in alerts:
        out[alert.rule] = out.get(alert.rule, "") + alert.summary + "\n"
    return out


def test_spawned_shell_and_its_child_are_followed(probe: ProcProbe, vmm: ZoneVmm) -> None:
    assert vmm.do("spawn") == "3"
    records = drain_until(
        probe, lambda rs: sum(r.op == ProcOp.EXIT for r in rs) >= 2 and has(ProcOp.FORK)(rs)
    )
    evs = vmm.events(records)
    assert {r.zone_key for r in records} == {vmm.zone.key}
    assert {e.zone.name for e in evs} == {vmm.zone.name}
    fork = next(e for e in evs if e.op == "fork" and e.ppid == vmm.pid)
    shell = fork.pid
    assert (fork.exe, fork.pcomm, fork.spawned) == (
        os.path.realpath(sys.executable),
        "qemu-system-x86",
        True,
    )
    execs = {e.pid: e for e in evs if e.op == "exec"}
    sh = execs[shell]
    assert (sh.exe, sh.args) == ("/bin/sh", "/bin/sh -c /bin/true; exit 3")
    assert (sh.ppid, sh.spawned) == (vmm.pid, True)
    assert sh.pcomm == "qemu-system-x86"  # the stand-in, named as QEMU
    # The shell's own child was never in the inventory: the kernel followed it.
    true = next(e for p, e in execs.items() if p != shell)
    assert (true.exe, true.ppid, true.pcomm, true.spawned) == ("/bin/true", shell, "sh", True)
    exits = {e.pid: e.ret for e in evs if e.op == "exit"}
    assert exits[shell] == 3 and exits[true.pid] == 0
    # Exited processes left the filter (in the kernel): a reused pid inherits nothing.
    table = probe.bpf[b"zone_pids"]
    assert table.Key(shell) not in table and table.Key(true.pid) not in table
    assert shell not in probe.followed()


def test_an_effective_id_switch_is_told_from_a_credential_change(
    probe: ProcProbe, vmm: ZoneVmm
) -> None:
    """setresuid(-1, id, -1), as virtiofsd does per request, is recorded as effective-only,
    and the default credentials rule does not fire on it; setuid(0) does."""
    vmm.do("switch-effective")
    vmm.do("setids")
    records = drain_until(probe, lambda rs: sum(r.op == ProcOp.SETGID for r in rs) >= 2)
    ids = [(e.op, e.target, e.effective_only) for e in vmm.events(records) if e.pid == vmm.pid]
    assert ids == [
        ("setgid", "0", True),
        ("setuid", "0", True),
        ("setuid", "0", False),
        ("setgid", "0", False),
    ]
    changed = [a for a in vmm.alerts(records) if a.rule == "Zone VMM changed its credentials"]
    # One alert for each real change (setuid(0), setgid(0)); the two effective-only
    # switches before them, to the same ids, would have folded into these as count 2.
    assert [a.count for a in changed] == [1, 1]
    assert {op for a in changed for op in ("setuid", "setgid") if f") {op} to 0" in a.summary} == {
        "setuid",
        "setgid",
    }


def test_ptrace_mount_credentials_capset_bpf(
    probe: ProcProbe, vmm: ZoneVmm, tmp_path: Path
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
    evs = {e.op: e for e in vmm.events(records) if e.pid == vmm.pid}
    traced = [(e.target, e.args, e.ret) for e in vmm.events(records) if e.op == "ptrace"]
    target = f"{sleeper} (sleep)"
    assert traced == [(target, "PTRACE_ATTACH", 0), (target, "PTRACE_DETACH", 0)]
    assert (evs["mount"].target, evs["mount"].ret) == (str(mnt), 0)
    assert evs["mount"].args == "source=zw-test type=tmpfs flags=0x0"
    assert (evs["setuid"].target, evs["setuid"].ret) == ("0", 0)
    assert (evs["setgid"].target, evs["setgid"].ret) == ("0", 0)
    assert not evs["setuid"].effective_only and not evs["setgid"].effective_only
    assert evs["capset"].target.startswith(f"eff={caps} ")
    assert (evs["bpf"].target, evs["bpf"].ret) == ("BPF_MAP_CREATE", -22)  # EINVAL
    # The sleeper the stand-in started is followed too.
    assert probe.followed().get(sleeper) == vmm.pid
    # Root's full set made effective again: CAP_SYS_ADMIN and company, by name.
    assert "CAP_SYS_ADMIN" in evs["capset"].caps.split(",")
    fired = rule_summaries(vmm.alerts(records))
    assert (
        f"{vmm.zone.name} (tenant default): qemu-system-x86 (pid {vmm.pid}) set "
        in (fired["Zone VMM set escape-grade capabilities"])
    )


def test_code_run_from_a_memfd(probe: ProcProbe, vmm: ZoneVmm) -> None:
    child = int(vmm.do("memfd-exec"))
    records = drain_until(probe, has(ProcOp.EXEC, child))
    evs = vmm.events(records)
    memfd = next(e for e in evs if e.op == "memfd_create")
    assert (memfd.target, memfd.pid) == ("zw-anon", vmm.pid)
    assert memfd.ret >= 0
    run = next(e for e in evs if e.op == "exec" and e.pid == child)
    assert run.exe.startswith("/dev/fd/"), run
    assert run.target == "/memfd:zw-anon (deleted)"
    assert run.args == "zw-anon 60"
    assert run.spawned
    fired = rule_summaries(vmm.alerts(records))
    assert "ran /dev/fd/" in fired["Zone process ran code from memory"]
    assert "(/memfd:zw-anon (deleted)) [zw-anon 60]" in fired["Zone process ran code from memory"]


def test_a_spawned_process_makes_a_memfd(probe: ProcProbe, vmm: ZoneVmm) -> None:
    assert vmm.do("spawned-memfd") == "0"
    records = drain_until(probe, has(ProcOp.MEMFD))
    memfd = next(e for e in vmm.events(records) if e.op == "memfd_create")
    assert (memfd.target, memfd.spawned, memfd.ppid) == ("zw-staged", True, vmm.pid)
    fired = rule_summaries(vmm.alerts(records))
    assert (
        "created memfd zw-staged ret=" in fired["Zone process spawned by the VMM created a memfd"]
    )


def test_connect_and_bind(probe: ProcProbe, vmm: ZoneVmm) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        local = int(vmm.do(f"sockets {port}"))
    records = drain_until(probe, has(ProcOp.CONNECT))
    evs = {e.op: e for e in vmm.events(records)}
    assert (evs["bind"].target, evs["bind"].ret) == ("127.0.0.1:0", 0)
    assert (evs["connect"].target, evs["connect"].ret) == (f"127.0.0.1:{port}", 0)
    assert (evs["connect"].sock_addr, evs["connect"].sock_port) == ("127.0.0.1", port)
    assert (evs["bind"].sock_addr, evs["bind"].sock_port) == ("127.0.0.1", 0)
    assert local > 0


def test_module_load(probe: ProcProbe, vmm: ZoneVmm) -> None:
    if "finit_module" in probe.missing:
        pytest.skip("this kernel has no module support (no init_module tracepoints)")
    raise AssertionError("a kernel with modules: add a stand-in finit_module here")


def test_process_outside_the_filter_produces_nothing(probe: ProcProbe, vmm: ZoneVmm) -> None:
    with StandInVmm("zw-standin-other") as other:
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
        with StandInVmm(f"zw-standin-{os.getpid()}") as vmm:
            lean.set_zone_pids({vmm.pid: 51})
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


# ---- escape indicators: one test per family; each records the attempt with its return ----

ENOENT, EFAULT, EINVAL, ENOSYS = 2, 14, 22, 38


def test_namespaces_left_and_joined(probe: ProcProbe, vmm: ZoneVmm) -> None:
    child = int(vmm.do("namespaces"))
    records = drain_until(probe, has(ProcOp.SETNS))
    evs = vmm.events(records)
    unshare = next(e for e in evs if e.op == "unshare")
    setns = next(e for e in evs if e.op == "setns")
    assert unshare.pid == setns.pid == child  # the child the stand-in forked
    assert (unshare.namespaces, unshare.ret, unshare.spawned) == ("mnt,uts", 0, True)
    assert (setns.namespaces, setns.flags, setns.ret) == ("uts", 0x04000000, 0)
    uts = os.readlink(f"/proc/{vmm.pid}/ns/uts")
    assert setns.target == uts  # the namespace joined, named as /proc names it
    fired = rule_summaries(vmm.alerts(records))
    assert f"entered namespace {uts} (uts) ret=0" in fired["Zone VMM entered another namespace"]
    assert "unshare into new namespaces mnt,uts ret=0" in fired["Zone VMM created namespaces"]


def test_clone_into_new_namespaces(probe: ProcProbe, vmm: ZoneVmm) -> None:
    child = int(vmm.do("clone-namespaces"))
    records = drain_until(probe, has(ProcOp.EXIT, child))
    fork = next(e for e in vmm.events(records) if e.op == "fork" and e.pid == child)
    # CLONE_NEWUTS | CLONE_NEWNS (the kernel keeps the exit signal apart from the flags)
    assert (fork.namespaces, fork.flags, fork.ppid) == ("mnt,uts", 0x04020000, vmm.pid)
    fired = rule_summaries(vmm.alerts(records))["Zone VMM created namespaces"]
    assert f"qemu-system-x86 (pid {child}) fork into new namespaces mnt,uts ret=0" in fired


def test_root_changes(probe: ProcProbe, vmm: ZoneVmm, tmp_path: Path) -> None:
    assert vmm.do(f"roots {tmp_path}") == "0"
    records = drain_until(probe, has(ProcOp.PIVOT_ROOT))
    evs = {e.op: e for e in vmm.events(records)}
    assert (evs["chroot"].target, evs["chroot"].ret) == (str(tmp_path), 0)
    pivot = evs["pivot_root"]
    assert (pivot.target, pivot.args, pivot.ret) == ("/zw-missing", "put_old=/zw-missing", -ENOENT)
    fired = rule_summaries(vmm.alerts(records))["Zone VMM changed its root directory"]
    assert f"chroot to {tmp_path} ret=0" in fired
    assert f"pivot_root to /zw-missing ret=-{ENOENT}" in fired


def test_open_by_handle(probe: ProcProbe, vmm: ZoneVmm, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    fd, handle_type = map(int, vmm.do(f"by-handle {secret}").split())
    assert fd >= 0  # root, on this machine's ext4
    records = drain_until(probe, has(ProcOp.OPEN_BY_HANDLE))
    opened = next(e for e in vmm.events(records) if e.op == "open_by_handle_at")
    assert (opened.target, opened.ret, opened.flags) == (str(tmp_path), fd, os.O_RDONLY)
    assert opened.args == f"handle_type={handle_type} handle_bytes=8"  # ext4: ino32 + gen
    fired = rule_summaries(vmm.alerts(records))["Zone VMM opened a file by handle"]
    assert f"opened a file by handle on {tmp_path} handle_type={handle_type}" in fired


def test_other_processes_memory_and_fds(probe: ProcProbe, vmm: ZoneVmm) -> None:
    sleeper = int(vmm.do("sleeper"))
    assert vmm.do(f"process-vm {sleeper}") == f"-{EFAULT} -{EFAULT}"
    pidfd, fd = map(int, vmm.do(f"pidfd-getfd {sleeper}").split())
    assert pidfd >= 0 and fd >= 0
    records = drain_until(probe, has(ProcOp.PIDFD_GETFD))
    evs = {e.op: e for e in vmm.events(records) if e.pid == vmm.pid}
    target = f"{sleeper} (sleep)"
    for op in ("process_vm_readv", "process_vm_writev"):
        assert (evs[op].target_pid, evs[op].target, evs[op].ret) == (sleeper, target, -EFAULT)
        assert evs[op].args == "local_iov=1 remote_iov=1"
    got = evs["pidfd_getfd"]
    assert (got.target_pid, got.target, got.ret) == (sleeper, f"{target} fd 0", fd)
    fired = rule_summaries(vmm.alerts(records))
    assert (
        f"read the memory of {target} ret=-{EFAULT}"
        in (fired["Zone VMM read another process's memory"])
    )
    assert (
        f"wrote the memory of {target} ret=-{EFAULT}"
        in (fired["Zone VMM wrote another process's memory"])
    )
    assert (
        f"took {target} fd 0 ret={fd}"
        in (fired["Zone VMM took a file descriptor from another process"])
    )


def test_io_uring_userfaultfd_perf_event(probe: ProcProbe, vmm: ZoneVmm) -> None:
    uring, ufd, perf = (int(vmm.do(c)) for c in ("io-uring", "userfaultfd", "perf-event"))
    records = drain_until(probe, has(ProcOp.PERF_EVENT_OPEN))
    evs = {e.op: e for e in vmm.events(records)}
    ring = evs["io_uring_setup"]
    assert (ring.args, ring.flags, ring.ret) == ("entries=4 flags=0x2 (SQPOLL)", 2, uring)
    assert evs["userfaultfd"].ret == ufd
    assert evs["userfaultfd"].flags == os.O_CLOEXEC | os.O_NONBLOCK
    event = evs["perf_event_open"]
    assert (event.target, event.target_pid, event.ret) == ("software", vmm.pid, perf)
    assert event.args == "type=1 config=0x0 pid=0"
    fired = rule_summaries(vmm.alerts(records))
    # A QEMU zone's io_uring is its own business, unless it asks for a kernel SQ thread.
    assert (
        "set up an io_uring entries=4 flags=0x2 (SQPOLL)"
        in (fired["Zone process set up an io_uring"])
    )
    assert (
        f"created a userfaultfd flags={os.O_CLOEXEC | os.O_NONBLOCK} ret={ufd}"
        in (fired["Zone VMM created a userfaultfd"])
    )
    assert (
        f"opened a software perf event type=1 config=0x0 pid=0 ret={perf}"
        in (fired["Zone VMM opened a perf event"])
    )


def test_kexec_load(probe: ProcProbe, vmm: ZoneVmm) -> None:
    if "kexec_load" in probe.missing:
        assert int(vmm.do("kexec")) == -ENOSYS  # and nothing to see: the kernel has no kexec
        pytest.skip("this kernel has no kexec support (no kexec_load tracepoints)")
    assert int(vmm.do("kexec")) in (-EINVAL, -1)
    records = drain_until(probe, has(ProcOp.KEXEC_LOAD))
    load = next(e for e in vmm.events(records) if e.op == "kexec_load")
    assert (load.flags, load.target) == (40 << 16, "0 segments, entry 0x0")
    assert "Zone VMM loaded a kernel to execute" in rule_summaries(vmm.alerts(records))
