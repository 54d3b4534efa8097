"""One lab zone: a QEMU guest (TCG here) with a tap and a share, watched through its console.

    spec = ZoneSpec("zone-a", "acme", "echo hi > /mnt/share/hi", index=0)
    with QemuZone(spec) as zone:          # start(): boots in the background
        zone.wait_ready(30)
        zone.wait_for_console(r"ZW-WORKLOAD-EXIT (\\d+)", 30)

Two layouts (`ZoneSpec.layout`):

- "plain": tap zwtap<index> in the host namespace, a 9p share, `-name <name>,debug-threads=on`;
- "kata": laid out as Kata Containers' runtime lays out a pod (see kata.py): QEMU inside the
  pod's network namespace on tap0_kata, `-name sandbox-<id>`, a virtiofs share served by
  virtiofsd, the sandbox's OCI bundle with the CRI annotations.

The guest runs `/workload.sh` once, after eth0 (ZW_GUEST_IP/30) and /mnt/share are up,
prints `ZW-WORKLOAD-EXIT <rc>`, then stays up (or powers off with `poweroff_after`).
The workload sees ZW_NAME, ZW_TENANT, ZW_INDEX, ZW_HOST_IP, ZW_GUEST_IP, ZW_SHARE, on
either layout.

An attached zone (the default) dies with the thread that started it (PR_SET_PDEATHSIG):
start zones from a thread that outlives them, such as the main thread. A detached zone
(`detach=True`, used by `lab up`) is started with QEMU's -daemonize: its own session, no
child of the starting process, which may exit and leave it running.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from zonewatch.errors import ConfigError, EnvironmentProblem
from zonewatch.lab import kata, taps
from zonewatch.lab.assets import (
    ERROR_MARKER,
    EXIT_MARKER,
    GUEST_SHARE,
    READY_MARKER,
    SHARE_TAG,
    GuestAssets,
    ensure_assets,
    zone_archive,
)
from zonewatch.lab.state import (
    LAYOUTS,
    LabError,
    Layout,
    ZoneRecord,
    kill_process,
    pdeathsig_preexec,
    pid_alive,
    proc_start_time,
    read_records,
    reap,
    state_root,
    virtiofsd_processes,
    write_record,
)

Accel = Literal["auto", "tcg", "kvm"]
ACCEL_ENV = "ZONEWATCH_LAB_ACCEL"
QEMU_BINARY = "qemu-system-x86_64"
KERNEL_APPEND = "console=ttyS0 panic=-1 quiet"
EXIT_PATTERN = re.compile(rf"{EXIT_MARKER} (\d+)")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(slots=True, frozen=True)
class ZoneSpec:
    """What to boot: a named zone of a tenant running `workload` (sh script text)."""

    name: str
    tenant: str
    workload: str
    index: int  # plain: tap zwtap<index>, 10.213.<index>.0/30; kata: see kata.pod_addressing
    poweroff_after: bool = False
    memory_mb: int = 256
    layout: Layout = "plain"

    def __post_init__(self) -> None:
        for what, value in (("zone name", self.name), ("tenant", self.tenant)):
            if not _NAME_RE.match(value):
                raise ConfigError(what, f"{value!r} must be 1-63 of [A-Za-z0-9_.-]")
        if self.layout not in LAYOUTS:
            raise ConfigError("layout", f"{self.layout!r} is not one of {', '.join(LAYOUTS)}")
        taps.addressing(self.index)  # validates the range
        if not 64 <= self.memory_mb <= 16384:
            raise ConfigError("memory_mb", f"{self.memory_mb} is outside 64..16384")


def resolve_accel(accel: Accel = "auto") -> Literal["tcg", "kvm"]:
    """auto means TCG (QEMU with KVM cannot boot Linux under PVM) unless
    $ZONEWATCH_LAB_ACCEL says kvm."""
    if accel == "auto":
        env = os.environ.get(ACCEL_ENV, "").strip().lower()
        if env in ("", "auto", "tcg"):
            return "tcg"
        if env == "kvm":
            return "kvm"
        raise ConfigError(ACCEL_ENV, f"{env!r} is not one of auto, tcg, kvm")
    if accel in ("tcg", "kvm"):
        return accel
    raise ConfigError("accel", f"{accel!r} is not one of auto, tcg, kvm")


def qemu_binary() -> str:
    found = shutil.which(QEMU_BINARY)
    if found is None:
        raise EnvironmentProblem(QEMU_BINARY, "not found (install Debian's qemu-system-x86)")
    return found


def _opt(value: str | Path) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return str(value).replace(",", ",,")


def remove_kata_leftovers(zone_dir: Path) -> None:
    """What the kata zone recorded in `zone_dir` left (virtiofsd, network, folders), if it
    was one."""
    sandbox = kata.read_sandbox_file(zone_dir)
    if sandbox is not None:
        kata.remove_sandbox(sandbox)


def zone_addressing(spec: ZoneSpec) -> taps.TapAddressing | kata.PodAddressing:
    """The zone's names and addresses on its layout."""
    if spec.layout == "kata":
        return kata.pod_addressing(spec.index)
    return taps.addressing(spec.index)


def zone_env(spec: ZoneSpec) -> str:
    """The guest's /zone.env (sourced by /init; exported so the workload sees it)."""
    net = zone_addressing(spec)
    kata_layout = spec.layout == "kata"
    values = {
        "ZW_NAME": spec.name,
        "ZW_TENANT": spec.tenant,
        "ZW_INDEX": str(spec.index),
        "ZW_GUEST_IP": net.guest_ip,
        "ZW_HOST_IP": net.host_ip,
        "ZW_PREFIX": str(net.prefixlen),
        "ZW_SHARE": GUEST_SHARE,
        "ZW_SHARE_FS": "virtiofs" if kata_layout else "9p",
        "ZW_SHARE_TAG": kata.SHARE_TAG if kata_layout else SHARE_TAG,
        "ZW_POWEROFF": "1" if spec.poweroff_after else "0",
    }
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())


class QemuZone:
    """A lab zone backed by one QEMU process; see the module doc."""

    __slots__ = (
        "_accel",
        "_assets",
        "_net",
        "_proc",
        "_record",
        "_root",
        "_sandbox",
        "_started_at",
        "_stopped",
        "_virtiofsd",
        "detach",
        "spec",
    )

    def __init__(
        self,
        spec: ZoneSpec,
        *,
        assets: GuestAssets | None = None,
        state_dir: Path | None = None,
        accel: Accel = "auto",
        detach: bool = False,
    ) -> None:
        self.spec = spec
        self.detach = detach
        self._assets = assets
        self._root = state_root(state_dir)
        self._accel = resolve_accel(accel)
        self._net = zone_addressing(spec)
        self._sandbox = (
            kata.Sandbox.new(spec.name, spec.tenant, spec.index) if spec.layout == "kata" else None
        )
        self._virtiofsd: subprocess.Popen[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._record: ZoneRecord | None = None
        self._started_at = 0.0
        self._stopped = False

    # --- where things are ------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tenant(self) -> str:
        return self.spec.tenant

    @property
    def zone_dir(self) -> Path:
        return self._root / self.spec.name

    @property
    def layout(self) -> Layout:
        return self.spec.layout

    @property
    def share_dir(self) -> Path:
        """The host folder the guest mounts at /mnt/share (kata: the one virtiofsd serves)."""
        if self._sandbox is not None:
            return self._sandbox.share_dir
        return self.zone_dir / "share"

    @property
    def console_path(self) -> Path:
        return self.zone_dir / "console.log"

    @property
    def qemu_log_path(self) -> Path:
        return self.zone_dir / "qemu.log"

    @property
    def initrd_path(self) -> Path:
        return self.zone_dir / "initrd.img"

    @property
    def tap(self) -> str:
        """The tap QEMU uses: zwtap<index> (plain, host namespace), tap0_kata (kata, the
        pod's namespace)."""
        return self._net.tap

    @property
    def host_link(self) -> str:
        """The host namespace's end of the zone's network: the tap (plain), the veth (kata)."""
        if isinstance(self._net, kata.PodAddressing):
            return self._net.host_link
        return self._net.tap

    @property
    def host_ip(self) -> str:
        return self._net.host_ip

    @property
    def guest_ip(self) -> str:
        """The guest's address (kata: the pod IP, eth0's in the pod's namespace)."""
        return self._net.guest_ip

    # --- a kata zone's sandbox (LabError on a plain zone) ------------------------------------

    @property
    def sandbox(self) -> kata.Sandbox:
        if self._sandbox is None:
            raise LabError(self.name, "is not a kata zone")
        return self._sandbox

    @property
    def sandbox_id(self) -> str:
        return self.sandbox.sandbox_id

    @property
    def netns(self) -> str:
        """The pod's network namespace, by its `ip netns` name."""
        return self.sandbox.net.netns

    @property
    def netns_path(self) -> Path:
        return Path(self.sandbox.net.netns_path)

    @property
    def bundle_config(self) -> Path:
        """The sandbox's OCI config.json, where containerd keeps it."""
        return self.sandbox.config_path

    @property
    def qmp_socket(self) -> Path:
        return self.sandbox.qmp_socket

    @property
    def virtiofsd_pids(self) -> list[int]:
        """The virtiofsd processes serving the share now: the one started, and the one it
        forked into its own namespaces once QEMU connected."""
        return [pid for pid, _ in virtiofsd_processes(str(self.sandbox.share_dir))]

    @property
    def accel(self) -> str:
        return self._accel

    @property
    def pid(self) -> int:
        if self._record is None:
            raise LabError(self.name, "zone is not started")
        return self._record.pid

    @property
    def record(self) -> ZoneRecord:
        if self._record is None:
            raise LabError(self.name, "zone is not started")
        return self._record

    @property
    def started_at(self) -> float:
        """time.monotonic() when QEMU was spawned."""
        return self._started_at

    @property
    def alive(self) -> bool:
        if self._record is None or self._stopped:
            return False
        if self._proc is not None:
            return self._proc.poll() is None
        return pid_alive(self._record.pid, self._record.start_time)

    # --- life cycle -------------------------------------------------------------------------

    def command(self, assets: GuestAssets) -> list[str]:
        """The QEMU command line for this zone."""
        spec = self.spec
        guest_name = f"{_opt(spec.name)},debug-threads=on"
        if self._sandbox is not None:
            guest_name = f"sandbox-{self._sandbox.sandbox_id}"  # threads keep QEMU's name
        argv = [
            qemu_binary(),
            "-name", guest_name,
            "-accel", self._accel,
            "-m", str(spec.memory_mb),
            "-smp", "1",
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-serial", f"file:{self.console_path}",
            "-no-reboot",
            "-kernel", str(assets.kernel),
            "-initrd", str(self.initrd_path),
            "-append", KERNEL_APPEND,
            *self._device_args(),
        ]  # fmt: skip
        if self._accel == "kvm":
            argv[5:5] = ["-cpu", "host"]
        return argv

    def _device_args(self) -> list[str]:
        """Network and share: a tap and 9p (plain); as Kata: QMP, shared guest memory for
        vhost-user, tap0_kata and virtiofs (kata)."""
        sandbox = self._sandbox
        if sandbox is None:
            return [
                "-netdev", f"tap,id=net0,ifname={self.tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=net0,mac={self._net.mac}",
                "-fsdev", f"local,id=fs0,path={_opt(self.share_dir)},security_model=mapped-xattr",
                "-device", f"virtio-9p-pci,fsdev=fs0,mount_tag={SHARE_TAG}",
            ]  # fmt: skip
        return [
            "-qmp", f"unix:{_opt(sandbox.qmp_socket)},server=on,wait=off",
            "-object", f"memory-backend-memfd,id=mem,size={self.spec.memory_mb}M,share=on",
            "-numa", "node,memdev=mem",
            "-netdev", f"tap,id=network-0,ifname={kata.KATA_TAP},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=network-0,mac={self._net.mac}",
            "-chardev", f"socket,id=char-virtiofs,path={_opt(sandbox.virtiofsd_socket)}",
            "-device", f"vhost-user-fs-pci,chardev=char-virtiofs,tag={kata.SHARE_TAG}",
        ]  # fmt: skip

    def start(self) -> QemuZone:
        """Spawn QEMU and return at once; `wait_ready()` waits for the boot."""
        if self._record is not None:
            raise LabError(self.name, "zone already started")
        if os.geteuid() != 0:
            raise EnvironmentProblem("lab", "zones need root (taps, QEMU on /dev/net/tun)")
        qemu_binary()  # fail before touching anything if QEMU (or virtiofsd) is missing
        if self._sandbox is not None:
            kata.virtiofsd_binary()
        assets = self._assets or ensure_assets()
        self._clear_stale()
        try:
            self.zone_dir.mkdir(parents=True)
            if self._sandbox is None:
                self.share_dir.mkdir()
            else:
                self._make_sandbox(self._sandbox)
            zone_cpio = zone_archive(
                {
                    "zone.env": (zone_env(self.spec).encode(), 0o644),
                    "workload.sh": (self.spec.workload.encode(), 0o755),
                }
            )
            with self.initrd_path.open("wb") as out:
                with assets.initrd.open("rb") as base:
                    shutil.copyfileobj(base, out)
                out.write(zone_cpio)
            if self._sandbox is None:
                taps.create_tap(self.tap, self.host_ip, self._net.prefixlen)
            pid = self._spawn(self.command(assets))
            start_time = proc_start_time(pid)
            if start_time is None:
                if self._proc is not None:
                    self._proc.wait()
                raise LabError(self.name, f"QEMU exited at once: {self._qemu_log_tail()}")
            self._record = ZoneRecord(
                name=self.name,
                tenant=self.tenant,
                index=self.spec.index,
                pid=pid,
                start_time=start_time,
                tap=self.tap,
                host_ip=self.host_ip,
                guest_ip=self.guest_ip,
                share=str(self.share_dir),
                console=str(self.console_path),
                zone_dir=str(self.zone_dir),
                detached=self.detach,
                layout=self.layout,
                host_link=self.host_link,
                **self._sandbox_record_fields(),
            )
            write_record(self._record)
        except BaseException:
            self._teardown()
            raise
        return self

    def _make_sandbox(self, sandbox: kata.Sandbox) -> None:
        """A kata zone's host side, recorded first (so that whatever a killed run made is
        found again): the pod network, the sandbox's folders, its bundle, virtiofsd."""
        kata.write_sandbox_file(sandbox, self.zone_dir)
        kata.create_pod_network(sandbox.net)
        kata.make_sandbox_dirs(sandbox)
        kata.write_bundle(sandbox, self._root)
        self._virtiofsd = kata.spawn_virtiofsd(
            sandbox, self.zone_dir / "virtiofsd.log", detach=self.detach
        )

    def _sandbox_record_fields(self) -> dict[str, str]:
        sandbox = self._sandbox
        if sandbox is None:
            return {}
        return {
            "sandbox_id": sandbox.sandbox_id,
            "netns": sandbox.net.netns,
            "bundle": str(sandbox.config_path),
            "qmp": str(sandbox.qmp_socket),
        }

    def _spawn(self, argv: list[str]) -> int:
        """Start QEMU (a kata zone's inside its pod's network namespace); returns its pid."""
        if self._sandbox is None:
            return self._spawn_qemu(argv, None if self.detach else pdeathsig_preexec())
        with kata.netns_preexec(self.netns, die_with_parent=not self.detach) as enter_netns:
            return self._spawn_qemu(argv, enter_netns)

    def _spawn_qemu(self, argv: list[str], preexec: Callable[[], None] | None) -> int:
        """Attached: QEMU is our child, killed with the spawning thread (`preexec` says so).
        Detached: QEMU daemonizes itself (own session, reparented to init), so the starting
        process may exit and leaves no child behind."""
        with self.qemu_log_path.open("wb") as log:
            self._started_at = time.monotonic()
            if not self.detach:
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                    preexec_fn=preexec,  # noqa: PLW1509
                )  # fmt: skip
                return self._proc.pid
            pidfile = self.zone_dir / "qemu.pid"
            try:
                rc = subprocess.run(
                    [*argv, "-daemonize", "-pidfile", str(pidfile)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                    timeout=60, check=False, preexec_fn=preexec,
                ).returncode  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                raise LabError(self.name, "QEMU did not daemonize within 60 s") from exc
        if rc != 0:
            raise LabError(self.name, f"QEMU failed to start (rc={rc}): {self._qemu_log_tail()}")
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError) as exc:
            raise LabError(str(pidfile), f"QEMU wrote no usable pid file: {exc}") from exc

    def _clear_stale(self) -> None:
        """Remove what a dead earlier zone of this name or index left; refuse live ones."""
        for record in read_records(self._root):
            if record.name != self.name and record.index != self.spec.index:
                continue
            if record.alive():
                what = "name" if record.name == self.name else f"index {record.index}"
                raise LabError(self.name, f"a running lab zone ({record.name}) has this {what}")
            reap(record.pid)
            remove_kata_leftovers(Path(record.zone_dir))
            shutil.rmtree(record.zone_dir, ignore_errors=True)
        if self.zone_dir.exists():
            remove_kata_leftovers(self.zone_dir)
            shutil.rmtree(self.zone_dir)
        if isinstance(self._net, kata.PodAddressing):
            kata.delete_pod_network(self._net)
        elif taps.tap_exists(self.tap):
            taps.delete_tap(self.tap)

    def stop(self, timeout: float = 5.0) -> None:
        """Kill QEMU (SIGTERM, SIGKILL after `timeout`), wait, delete the tap and state."""
        if self._stopped:
            return
        self._teardown(timeout)

    def _teardown(self, timeout: float = 5.0) -> None:
        self._stopped = True
        proc, record = self._proc, self._record
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        elif record is not None:
            kill_process(record.pid, record.start_time, timeout)
        try:
            if self._sandbox is not None:
                kata.remove_sandbox(self._sandbox)  # virtiofsd lingers after QEMU: stopped
            else:
                with contextlib.suppress(LabError):
                    taps.delete_tap(self.tap)
        finally:
            if self._virtiofsd is not None:
                self._virtiofsd.poll()  # reaped by remove_sandbox; no zombie either way
            shutil.rmtree(self.zone_dir, ignore_errors=True)

    def __enter__(self) -> QemuZone:
        if self._record is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- watching the console ---------------------------------------------------------------

    def console_text(self) -> str:
        try:
            return self.console_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _qemu_log_tail(self, lines: int = 5) -> str:
        try:
            text = self.qemu_log_path.read_text(errors="replace").strip()
        except OSError:
            return "(no qemu.log)"
        return " | ".join(text.splitlines()[-lines:]) or "(qemu.log empty)"

    def console_tail(self, lines: int = 20) -> str:
        return "\n".join(self.console_text().rstrip().splitlines()[-lines:])

    def wait_for_console(
        self, pattern: str | re.Pattern[str], timeout: float = 30.0, interval: float = 0.05
    ) -> re.Match[str]:
        """Poll the console until `pattern` (re.search) matches; return the match.

        Raises LabError with the console's tail if QEMU dies first or on timeout."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            alive = self.alive
            match = regex.search(self.console_text())
            if match is not None:
                return match
            if not alive:
                rc = self._proc.returncode if self._proc is not None else None
                raise LabError(
                    self.name,
                    f"QEMU exited (rc={rc}) before the console showed {regex.pattern!r}; "
                    f"qemu.log: {self._qemu_log_tail()}\n--- console tail ---\n"
                    f"{self.console_tail()}",
                )
            if time.monotonic() >= deadline:
                raise LabError(
                    self.name,
                    f"the console did not show {regex.pattern!r} within {timeout:.1f} s"
                    f"\n--- console tail ---\n{self.console_tail()}",
                )
            time.sleep(interval)

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Wait for the guest's ready marker; returns seconds since QEMU was spawned."""
        self.wait_for_console(re.compile(rf"^{READY_MARKER}\b", re.MULTILINE), timeout)
        elapsed = time.monotonic() - self._started_at
        errors = re.findall(rf"^{ERROR_MARKER} .*$", self.console_text(), re.MULTILINE)
        if errors:
            raise LabError(self.name, f"the guest failed to set up: {'; '.join(errors)}")
        return elapsed

    def wait_workload_exit(self, timeout: float = 30.0) -> int:
        """Wait until the workload finished; returns its exit status."""
        return int(self.wait_for_console(EXIT_PATTERN, timeout).group(1))
