"""The lab's state on disk, shared by every process that starts, lists or stops lab zones.

Layout under the state root (`/run/zonewatch/lab`, or `$ZONEWATCH_LAB_STATE`)::

    <root>/<zone name>/zone.json     the record below, written once QEMU runs
    <root>/<zone name>/share/        the host folder the guest mounts at /mnt/share (plain)
    <root>/<zone name>/console.log   the guest's serial console
    <root>/<zone name>/qemu.log      QEMU's own stderr
    <root>/<zone name>/initrd.img    base initramfs + the zone's own small cpio
    <root>/<zone name>/sandbox.json  a kata zone's sandbox (see kata.py), written before
                                     anything of it is made, so a killed run is cleaned up
    <root>/<zone name>/virtiofsd.log a kata zone's virtiofsd output

A record names the QEMU pid together with its start time (/proc/PID/stat field 22), so a
recycled pid is never taken for the zone's QEMU.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from zonewatch.errors import ZonewatchError

# How a zone is laid out on the host (see qemu.py): a plain QEMU zone, or a Kata pod's.
Layout = Literal["plain", "kata"]
LAYOUTS: tuple[Layout, ...] = ("plain", "kata")
DEFAULT_STATE = Path("/run/zonewatch/lab")
STATE_ENV = "ZONEWATCH_LAB_STATE"
RECORD_NAME = "zone.json"
NETNS_DIR = "/run/netns"  # where `ip netns add` mounts a named network namespace
VIRTIOFSD_NAME = "virtiofsd"
_PR_SET_PDEATHSIG = 1


class LabError(ZonewatchError):
    """A lab zone could not be built, started, reached or stopped."""


def state_root(state_dir: Path | None = None) -> Path:
    """The lab's state folder: the argument, else $ZONEWATCH_LAB_STATE, else /run/...."""
    if state_dir is not None:
        return state_dir
    env = os.environ.get(STATE_ENV)
    return Path(env) if env else DEFAULT_STATE


@dataclass(slots=True, frozen=True)
class ZoneRecord:
    """What the lab remembers about one running zone (the JSON in <root>/<name>/zone.json)."""

    name: str
    tenant: str
    index: int
    pid: int
    start_time: int
    tap: str
    host_ip: str
    guest_ip: str
    share: str
    console: str
    zone_dir: str
    detached: bool
    layout: Layout = "plain"
    host_link: str = ""  # the host namespace's end: the tap (plain), the veth (kata)
    sandbox_id: str = ""  # kata: the sandbox id (QEMU's -name sandbox-<id>)
    netns: str = ""  # kata: the pod's network namespace (ip netns name)
    bundle: str = ""  # kata: the sandbox's OCI bundle config.json
    qmp: str = ""  # kata: QEMU's QMP socket

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ZoneRecord:
        return cls(
            name=str(data["name"]),
            tenant=str(data["tenant"]),
            index=int(data["index"]),
            pid=int(data["pid"]),
            start_time=int(data["start_time"]),
            tap=str(data["tap"]),
            host_ip=str(data["host_ip"]),
            guest_ip=str(data["guest_ip"]),
            share=str(data["share"]),
            console=str(data["console"]),
            zone_dir=str(data["zone_dir"]),
            detached=bool(data["detached"]),
            layout="kata" if data.get("layout") == "kata" else "plain",
            host_link=str(data.get("host_link", data["tap"])),
            sandbox_id=str(data.get("sandbox_id", "")),
            netns=str(data.get("netns", "")),
            bundle=str(data.get("bundle", "")),
            qmp=str(data.get("qmp", "")),
        )

    def alive(self) -> bool:
        return pid_alive(self.pid, self.start_time)

    def known_names(self) -> tuple[str, ...]:
        """The names the agent may know the zone by: its lab name and, for a kata zone, its
        sandbox id (what Kata's QEMU command line names it by). The tenants file has both."""
        return (self.name, self.sandbox_id) if self.sandbox_id else (self.name,)

    def status(self) -> dict[str, Any]:
        """The shape `lab status` prints for a zone; a kata zone adds its sandbox's places
        and the pids of its virtiofsd processes (found now)."""
        status: dict[str, Any] = {
            "name": self.name,
            "tenant": self.tenant,
            "index": self.index,
            "pid": self.pid,
            "alive": self.alive(),
            "layout": self.layout,
            "tap": self.tap,
            "host_link": self.host_link,
            "host_ip": self.host_ip,
            "guest_ip": self.guest_ip,
            "share": self.share,
            "console": self.console,
        }
        if self.layout == "kata":
            status |= {
                "sandbox_id": self.sandbox_id,
                "netns": self.netns,
                "netns_path": f"{NETNS_DIR}/{self.netns}",
                "pod_ip": self.guest_ip,
                "bundle": self.bundle,
                "qmp": self.qmp,
                "virtiofsd_pids": [pid for pid, _ in virtiofsd_processes(self.share)],
            }
        return status


def write_record(record: ZoneRecord) -> Path:
    """Write the record atomically (temp file + rename) into its zone folder."""
    path = Path(record.zone_dir) / RECORD_NAME
    tmp = path.with_name(f".{RECORD_NAME}.{os.getpid()}")
    tmp.write_text(json.dumps(record.to_json(), indent=2) + "\n")
    tmp.replace(path)
    return path


def read_records(state_dir: Path | None = None) -> list[ZoneRecord]:
    """Every zone record under the state root, sorted by index; unreadable ones are skipped."""
    root = state_root(state_dir)
    records: list[ZoneRecord] = []
    if not root.is_dir():
        return records
    for path in sorted(root.glob(f"*/{RECORD_NAME}")):
        try:
            records.append(ZoneRecord.from_json(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    records.sort(key=lambda r: (r.index, r.name))
    return records


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, start = fields[0], fields[19]
    if state in ("Z", "X"):
        return None
    return int(start)


def pid_alive(pid: int, start_time: int) -> bool:
    """True while `pid` still is the process that started at `start_time`."""
    return pid > 0 and proc_start_time(pid) == start_time


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def find_processes(match: Callable[[list[str]], bool]) -> list[tuple[int, int]]:
    """(pid, start time) of the live processes whose command line `match`es, by pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        argv = proc_cmdline(pid)
        if argv and match(argv):
            start = proc_start_time(pid)
            if start is not None:
                found.append((pid, start))
    return sorted(found)


def virtiofsd_processes(share: str) -> list[tuple[int, int]]:
    """(pid, start time) of the virtiofsd processes serving `share`: the one started and
    the one it forks into its own namespaces."""
    source = f"source={share}"
    return find_processes(lambda argv: Path(argv[0]).name == VIRTIOFSD_NAME and source in argv)


def reap(pid: int) -> None:
    """Collect the exit status if `pid` is our child (no zombie left); harmless otherwise."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def kill_process(pid: int, start_time: int, term_timeout: float = 3.0) -> bool:
    """SIGTERM, then SIGKILL after `term_timeout`; wait until gone. False if already gone."""
    if not pid_alive(pid, start_time):
        reap(pid)
        return False
    for sig, timeout in ((signal.SIGTERM, term_timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid, start_time):
                reap(pid)
                return True
            time.sleep(0.02)
    if pid_alive(pid, start_time):
        raise LabError(f"pid {pid}", "does not die even after SIGKILL")
    return True


_LIBC: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library, loaded once (call it in the parent: no dlopen after fork)."""
    global _LIBC  # noqa: PLW0603
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def pdeathsig_preexec() -> Callable[[], None]:
    """A preexec_fn that makes the child get SIGKILL when the spawning thread dies."""
    prctl = libc().prctl
    parent = os.getpid()

    def apply() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return apply
