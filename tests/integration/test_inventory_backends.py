"""Live: a real virtiofsd started as Kata starts it (its socket inherited as fd 3) is tied,
with the child it forks, to the zone of a real QEMU laid out as Kata's; and the tenants
file of a running agent is followed."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess
from tests.helpers.microvms import MicroVmFactory
from zonewatch.inventory import Inventory
from zonewatch.inventory.platform import CriBundles
from zonewatch.inventory.procfs import read_stat
from zonewatch.model import Vmm, Zone
from zonewatch.probes.uprobes import libc_path

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
PROC = Path("/proc")

needs_virtiofsd = pytest.mark.skipif(
    not (os.access(VIRTIOFSD, os.X_OK) and os.access(QEMU, os.X_OK)),
    reason="needs QEMU's virtiofsd and qemu-system-x86_64 (make setup installs them)",
)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def children(pid: int) -> list[int]:
    out = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = read_stat(PROC, int(entry.name))
            if stat is not None and stat.ppid == pid:
                out.append(int(entry.name))
    return out


class KataLikePod:
    """A virtiofsd handed its listening socket as fd 3, and a QEMU (-S: devices realized,
    no guest run) named and wired as Kata's: `-name sandbox-<id>`, a vhost-user-fs device
    on that socket. Everything is stopped however the test ends."""

    def __init__(self, tmp_path: Path, sandbox: str, source: Path) -> None:
        self.sandbox = sandbox
        self.source = source
        self.socket_path = str(tmp_path / "vhost-fs.sock")
        self.procs: list[subprocess.Popen[bytes]] = []
        virtiofsd = [VIRTIOFSD, "--fd=3", "-o", f"source={source}", "-o", "cache=auto",
                     "-o", "no_posix_lock", "-f"]  # fmt: skip
        qemu = [QEMU, "-S", "-nographic", "-nodefaults", "-accel", "tcg", "-m", "64",
                "-name", f"sandbox-{sandbox}",
                "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
                "-numa", "node,memdev=mem",
                "-chardev", f"socket,id=char-vfs,path={self.socket_path}",
                "-device", "vhost-user-fs-pci,chardev=char-vfs,tag=kataShared"]  # fmt: skip
        self._qemu_argv = qemu
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
            listener.listen(1)
            self.virtiofsd = self._spawn(virtiofsd, listener.fileno())
        finally:
            listener.close()

    def start_vmm(self) -> None:
        """Start QEMU, which connects to the virtiofsd (as Kata does, right after it)."""
        self.qemu = self._spawn(self._qemu_argv)

    def _spawn(self, argv: list[str], fd3: int | None = None) -> subprocess.Popen[bytes]:
        def hand_over() -> None:  # the listening socket becomes the child's fd 3
            if fd3 is not None:
                os.dup2(fd3, 3)
                os.set_inheritable(3, True)

        # pass_fds would close fd 3 after preexec_fn made it; our fds are close-on-exec.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=hand_over,  # noqa: PLW1509 (dup2 only, in the forked child)
            close_fds=fd3 is None,
        )
        self.procs.append(proc)
        return proc

    def virtiofsd_child(self, timeout: float) -> int:
        """The process the virtiofsd forks once QEMU connected (it does the file work)."""
        deadline = time.monotonic() + timeout
        while not (found := children(self.virtiofsd.pid)):
            assert self.virtiofsd.poll() is None, "virtiofsd exited"
            assert time.monotonic() < deadline, "virtiofsd never forked its worker"
            time.sleep(0.02)
        return found[0]

    def close(self) -> None:
        worker = children(self.virtiofsd.pid)
        for proc in reversed(self.procs):
            stop(proc)
        for pid in worker:  # exits with its parent; make sure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


PodFactory = Callable[[str, Path], KataLikePod]


@pytest.fixture
def kata_pod(tmp_path: Path) -> Iterator[PodFactory]:
    pods: list[KataLikePod] = []

    def start(sandbox: str, source: Path) -> KataLikePod:
        source.mkdir(parents=True, exist_ok=True)
        pods.append(KataLikePod(tmp_path, sandbox, source))
        return pods[-1]

    try:
        yield start
    finally:
        for pod in pods:
            pod.close()


def wait_zone(inventory: Inventory, pid: int, helpers: int, timeout: float) -> Zone:
    deadline = time.monotonic() + timeout
    while True:
        inventory.refresh()
        zone = next((z for z in inventory.zones.values() if z.pid == pid), None)
        if zone is not None and len(zone.helper_pids) >= helpers:
            return zone
        assert time.monotonic() < deadline, f"zone of {pid} with {helpers} helpers: {zone}"
        time.sleep(0.05)


@needs_virtiofsd
@pytest.mark.parametrize("layout", ["plain source", "kata source"])
def test_real_virtiofsd_with_inherited_socket_and_its_worker_are_the_zones(
    tmp_path: Path, kata_pod: PodFactory, layout: str
) -> None:
    """ "plain source": the shared dir names no sandbox, so only the inherited socket (its
    bound path, read from the namespace's net/unix) ties the parent, and parentage the
    worker it forked into namespaces of its own. "kata source": Kata's shared dir, whose
    sandbox id ties both by itself."""
    sandbox = secrets.token_hex(32)
    if layout == "plain source":
        source = tmp_path / "share"
    else:
        source = tmp_path / f"run/kata-containers/shared/sandboxes/{sandbox}/shared"
    inventory = Inventory(proc=PROC, platform=CriBundles(tmp_path / "bundles"))
    pod = kata_pod(sandbox, source)
    # The agent sees the virtiofsd before the VMM connects (listening, at the host's root).
    assert not inventory.refresh().added
    pod.start_vmm()
    worker = pod.virtiofsd_child(timeout=10)
    assert os.readlink(f"/proc/{worker}/ns/net") != os.readlink("/proc/self/ns/net")
    zone = wait_zone(inventory, pod.qemu.pid, helpers=2, timeout=10)
    assert zone.vmm == Vmm.KATA
    assert zone.labels["kata.sandbox"] == pod.sandbox
    assert zone.helper_pids == tuple(sorted((pod.virtiofsd.pid, worker)))
    assert [(s.tag, s.host_path, s.backend) for s in zone.shares] == [
        ("kataShared", str(source), "virtiofs")
    ]
    # Both pivoted into the shared folder once QEMU connected (the parent too: they share
    # the mount namespace it made): their paths are relative to it.
    assert os.readlink(f"/proc/{worker}/root") == "/"
    deadline = time.monotonic() + 5
    while len(zone.process_roots) < 2:
        assert time.monotonic() < deadline, zone.process_roots
        time.sleep(0.05)
        inventory.refresh()
        zone = inventory.zones[zone.id]
    assert zone.process_roots == {pod.virtiofsd.pid: str(source), worker: str(source)}
    # The file channel's uprobes mode hooks the libc the worker maps, by a path its new
    # root no longer holds.
    maps = Path(f"/proc/{worker}/maps").read_text().splitlines()
    libc_range = next(m.split()[0] for m in maps if "libc" in m and "x" in m.split()[1])
    libc = libc_path(worker)
    assert libc is not None
    assert os.path.samefile(libc, f"/proc/{worker}/map_files/{libc_range}")
    assert inventory.zone_pids() == {
        pod.qemu.pid: zone.key,
        pod.virtiofsd.pid: zone.key,
        worker: zone.key,
    }
    # QEMU gone: the zone goes, and with it every helper from the kernel filter.
    stop(pod.qemu)
    deadline = time.monotonic() + 10
    while inventory.zones:
        assert time.monotonic() < deadline, inventory.zones
        inventory.refresh()
        time.sleep(0.05)
    assert inventory.zone_pids() == {}


def wait_log_count(agent: AgentProcess, needle: str, count: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while (text := agent.log.read_text()).count(needle) < count:
        assert agent.proc.poll() is None, f"agent exited:\n{text}"
        assert time.monotonic() < deadline, f"{needle!r} not logged {count}x:\n{text}"
        time.sleep(0.05)
    return text


def test_a_running_agent_follows_its_tenants_file(tmp_path: Path, microvm: MicroVmFactory) -> None:
    """Edits move the zone to another tenant in the agent's output without a restart; a
    bad edit keeps the running tenants and says where; SIGHUP re-reads the file."""
    microvm("reload-z", rate=50)
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("version: 1\ntenants:\n  - name: acme\n    zones: ['reload-*']\n")

    def tenant_seen(tenant: str) -> Callable[[list[dict[str, Any]]], bool]:
        def seen(lines: list[dict[str, Any]]) -> bool:
            return any(
                line["type"] == "stats"
                and line["zone"]["name"] == "reload-z"
                and line["zone"]["tenant"] == tenant
                for line in lines
            )

        return seen

    with AgentProcess(tmp_path, "--tenants", str(tenants)) as agent:
        agent.wait_for(tenant_seen("acme"), timeout=30, what="stats of reload-z as acme")
        started = agent.proc.pid

        tenants.write_text("version: 1\ntenants:\n  - name: globex\n    zones: ['reload-*']\n")
        agent.wait_log("zone reload-z is now tenant globex", timeout=10)
        agent.lines.clear()
        agent.wait_for(tenant_seen("globex"), timeout=10, what="stats of reload-z as globex")

        tenants.write_text("version: 1\ntenants:\n  - name: initech\n    zonez: ['reload-*']\n")
        text = wait_log_count(agent, "tenants not reloaded", 1, timeout=10)
        assert f"{tenants}:4:5: tenant entry: unknown key 'zonez'" in text
        agent.lines.clear()
        agent.wait_for(tenant_seen("globex"), timeout=10, what="reload-z still globex")

        tenants.write_text("version: 1\ntenants:\n  - name: globex\n    zones: ['reload-*']\n")
        wait_log_count(agent, "tenants reloaded", 1, timeout=10)
        os.kill(agent.proc.pid, signal.SIGHUP)
        wait_log_count(agent, "tenants reloaded", 2, timeout=10)
        assert agent.proc.poll() is None and agent.proc.pid == started
        assert "is now tenant" not in agent.log.read_text().split("tenants reloaded")[-1]
