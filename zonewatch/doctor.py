"""`zonewatch doctor`: what will and won't attach on this host, and why."""

from __future__ import annotations

import gzip
import os
import shutil
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
    return out


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
    return 0 if all(c.ok for c in results if c.essential) else 1
