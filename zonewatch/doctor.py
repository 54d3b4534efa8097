"""`zonewatch doctor`: what will and won't attach on this host, and why."""

from __future__ import annotations

import ctypes
import errno
import gzip
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zonewatch.errors import ZonewatchError
from zonewatch.probes import loader


@dataclass(slots=True, frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    essential: bool = True


def kernel_config() -> dict[str, str]:
    try:
        raw = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in raw.splitlines() if "=" in line)


def checks() -> list[Check]:
    out = [
        Check(
            "root",
            os.geteuid() == 0,
            "running as root"
            if os.geteuid() == 0
            else "the agent needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)",
        )
    ]
    try:
        tfs = loader.tracefs()
        out.append(Check("tracefs", True, str(tfs)))
    except ZonewatchError as exc:
        out.append(Check("tracefs", False, exc.message))
        tfs = None
    try:
        bcc = loader.import_bcc()
        out.append(Check("bcc", True, f"bcc at {Path(bcc.__file__).parent}"))
    except ZonewatchError as exc:
        out.append(Check("bcc", False, exc.message))
    build = Path(f"/lib/modules/{os.uname().release}/build")
    out.append(
        Check(
            "kernel headers",
            build.exists(),
            f"{build} -> {os.path.realpath(build)}"
            if build.exists()
            else f"{build} missing: run `make setup`",
        )
    )
    cfg = kernel_config()
    if tfs is not None:
        for channel, (cat, event) in {
            "file (syscall tracepoints)": ("syscalls", "sys_enter_openat"),
            "proc (sched tracepoints)": ("sched", "sched_process_exec"),
            "kvm (kvm tracepoints)": ("kvm", "kvm_userspace_exit"),
            "kvm exits (kvm_exit)": ("kvm", "kvm_exit"),
        }.items():
            exists = (tfs / "events" / cat / event).is_dir()
            out.append(
                Check(
                    channel,
                    exists,
                    f"{cat}:{event} " + ("present" if exists else "absent"),
                    essential=cat == "syscalls",
                )
            )
    out.append(uprobe_check(tfs, cfg))
    kprobes = cfg.get("CONFIG_KPROBES") == "y"
    out.append(
        Check(
            "kprobes",
            kprobes,
            "available" if kprobes else "CONFIG_KPROBES is not set: tracepoints only",
            essential=False,
        )
    )
    kvm = Path("/dev/kvm").exists()
    out.append(
        Check(
            "KVM",
            kvm,
            "/dev/kvm present" if kvm else "no /dev/kvm: no micro-VMM zones",
            essential=False,
        )
    )
    qemu = shutil.which("qemu-system-x86_64")
    out.append(
        Check("QEMU", qemu is not None, qemu or "qemu-system-x86 not installed", essential=False)
    )
    out.append(tc_check())
    out.append(netns_entry_check())
    return out


CAP_NET_ADMIN = 12
TC = "net (tc on taps)"
NETNS = "pod network namespaces"
SYSCALLS = "file (syscall tracepoints)"
SCHED = "proc (sched tracepoints)"
KVM = "kvm (kvm tracepoints)"

# Layout -> channel -> the checks above it needs (None: the layout has nothing there), as
# docs/layouts.md explains. Taps in a namespace of their own need NETNS; vCPU threads left
# unnamed (Kata's QEMU, Firecracker, Cloud Hypervisor) are found by KVM_RUN, through KVM.
LAYOUTS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "QEMU (plain)": {
        "kvm": (KVM,), "net": (TC,), "file": (SYSCALLS,), "proc": (SCHED,), "sched": (SCHED,),
    },
    "Kata with QEMU": {
        "kvm": (KVM,), "net": (TC, NETNS), "file": (SYSCALLS,), "proc": (SCHED,),
        "sched": (SCHED, KVM),
    },
    "Firecracker with jailer": {
        "kvm": (KVM,), "net": (TC, NETNS), "file": None, "proc": (SCHED,), "sched": (SCHED, KVM),
    },
    "Cloud Hypervisor": {
        "kvm": (KVM,), "net": (TC,), "file": (SYSCALLS,), "proc": (SCHED,), "sched": (SCHED, KVM),
    },
    "crosvm": {
        "kvm": (KVM,), "net": (TC,), "file": (SYSCALLS,), "proc": (SCHED,), "sched": (SCHED, KVM),
    },
}  # fmt: skip


@dataclass(slots=True, frozen=True)
class LayoutVerdict:
    layout: str
    watched: tuple[str, ...]  # channels this host can watch on it
    unwatched: dict[str, tuple[str, ...]]  # channel -> the failed checks it needs
    absent: tuple[str, ...]  # channels the layout has nothing on (Firecracker: file)


def layouts(results: list[Check]) -> list[LayoutVerdict]:
    """Each production layout's channels this host can watch, from the checks' results."""
    ok = {c.name for c in results if c.ok}
    out = []
    for layout, channels in LAYOUTS.items():
        watched, absent, unwatched = [], [], {}
        for channel, needs in channels.items():
            if needs is None:
                absent.append(channel)
            elif missing := tuple(n for n in needs if n not in ok):
                unwatched[channel] = missing
            else:
                watched.append(channel)
        out.append(LayoutVerdict(layout, tuple(watched), unwatched, tuple(absent)))
    return out


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def tc_check() -> Check:
    """The net channel adds tc filters (and a clsact qdisc) on each tap: CAP_NET_ADMIN."""
    if _effective_caps() & (1 << CAP_NET_ADMIN):
        return Check(TC, True, "CAP_NET_ADMIN: tc filters on taps", essential=False)
    return Check(TC, False, "no CAP_NET_ADMIN: the net channel sees nothing", essential=False)


CLONE_NEWNET = 0x40000000


def _in_child(body: Callable[[], int]) -> int:
    """Run `body` in a forked child; returns its result (an errno, 0 for success), so what it
    does to namespaces stays in the child."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 255
        try:
            code = body()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _libc_call(name: str, *args: int) -> int:
    """0, or the errno of libc's `name(*args)`."""
    libc = ctypes.CDLL(None, use_errno=True)
    return 0 if getattr(libc, name)(*args) == 0 else ctypes.get_errno()


def netns_entry_check() -> Check:
    """Kata pods and jailed microVMs keep their taps in network namespaces of their own: the
    net probe enters a VMM's namespace (setns, which needs CAP_SYS_ADMIN) to find its tap and
    put its tc filters there. Tried for real: a child makes a namespace, another enters it."""
    name = NETNS
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()

    def hold_a_namespace() -> int:
        os.close(ready_r)
        os.close(hold_w)
        err = _libc_call("unshare", CLONE_NEWNET)
        os.write(ready_w, bytes([err]))
        os.read(hold_r, 1)  # until the parent is done
        return 0

    holder = os.fork()
    if holder == 0:  # pragma: no cover (the child)
        code = 255
        try:
            code = hold_a_namespace()
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(hold_r)
    try:
        made = os.read(ready_r, 1)
        err = made[0] if made else errno.ECHILD
        if not err:

            def enter() -> int:
                fd = os.open(f"/proc/{holder}/ns/net", os.O_RDONLY)
                return _libc_call("setns", fd, CLONE_NEWNET)

            err = _in_child(enter)
    finally:
        os.close(hold_w)
        os.close(ready_r)
        os.waitpid(holder, 0)
    if err:
        detail = (
            f"cannot enter one ({os.strerror(err)}; needs CAP_SYS_ADMIN): taps in Kata pods "
            "and Firecracker jails go unwatched"
        )
        return Check(name, False, detail, essential=False)
    return Check(name, True, "can enter a VMM's network namespace (taps in pods, jails)", False)


def uprobe_check(tfs: Path | None, cfg: dict[str, str]) -> Check:
    """`--file-hooks uprobes` makes uprobe trace events in tracefs's uprobe_events."""
    name = "file (uprobes, low-overhead)"
    if cfg and cfg.get("CONFIG_UPROBE_EVENTS") != "y":
        return Check(name, False, "CONFIG_UPROBE_EVENTS is not set", essential=False)
    events = tfs / "uprobe_events" if tfs is not None else None
    if events is None or not events.exists():
        return Check(name, False, "no uprobe_events in tracefs", essential=False)
    if not os.access(events, os.W_OK):
        return Check(name, False, f"{events} is not writable (read-only mount?)", essential=False)
    return Check(name, True, f"--file-hooks uprobes can use {events}", essential=False)


def run_doctor() -> int:
    results = checks()
    for c in results:
        mark = "ok  " if c.ok else ("FAIL" if c.essential else "warn")
        print(f"{mark} {c.name:<28} {c.detail}"[:200])
    print("layouts (docs/layouts.md): the channels this host can watch on each")
    for v in layouts(results):
        mark = "warn" if v.unwatched else "ok  "
        text = f"{mark} {v.layout:<28} {' '.join(v.watched) or 'nothing'}"
        for channel, missing in v.unwatched.items():
            text += f"; not {channel} (needs: {', '.join(missing)})"
        if v.absent:
            text += f"; no {' '.join(v.absent)} on this layout"
        print(text)
    return 0 if all(c.ok for c in results if c.essential) else 1
