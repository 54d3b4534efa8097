"""The kata layout: a lab zone laid out on the host the way Kata Containers' runtime lays
out a pod's sandbox (under containerd's CRI), so that the agent meets production's shapes.

Zone index i (0..255) owns:

- the network namespace `zw-kata-<i>` (/run/netns/zw-kata-<i>), holding `eth0` (one end of
  a veth) with the pod IP 10.216.i.2/30 and the tap `tap0_kata`; an `ingress` qdisc on
  each of the two with a `u32 match u32 0 0 action mirred egress redirect` filter to the
  other (Kata's default "tcfilter" model: whatever enters one leaves by the other);
- the veth's other end `zwkata<i>` in the host namespace with 10.216.i.1/30. Nothing is
  routed past it: the guest has no default route and lab traffic stays on this machine.

The guest's NIC gets eth0's MAC and the pod IP, as Kata gives the guest the pod's address,
so the guest reaches the host end through the two mirred redirects. Every pod's tap has the
same name and, in its fresh namespace, the same ifindex (3): as in production.

A random 64-hex sandbox id names everything else, at Kata's and containerd's own paths:

- /run/vc/vm/<id>/qmp.sock (QEMU's QMP) and /run/vc/vm/<id>/vhost-fs.sock (virtiofsd's
  socket: bound and listening before virtiofsd starts, handed to it as fd 3);
- /run/kata-containers/shared/sandboxes/<id>/shared, the folder virtiofsd serves (tag
  kataShared), mounted by the guest where plain zones mount their 9p share;
- /run/containerd/io.containerd.runtime.v2.task/k8s.io/<id>/config.json, the sandbox's
  OCI bundle config with the CRI annotations (pod name = zone name, Kubernetes namespace =
  tenant, a random pod uid) and one of the lab's own naming the state root that made it.

QEMU runs inside the namespace (setns before exec) as `-name sandbox-<id>` without
debug-threads; virtiofsd (/usr/lib/qemu/virtiofsd, from Debian's qemu-system-common)
unshares its own namespaces and forks, and is stopped deliberately with its zone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zonewatch.errors import ConfigError, EnvironmentProblem
from zonewatch.lab import taps
from zonewatch.lab.state import (
    NETNS_DIR,
    LabError,
    kill_process,
    libc,
    pdeathsig_preexec,
    virtiofsd_processes,
)

NETNS_PREFIX = "zw-kata-"
HOST_LINK_PREFIX = "zwkata"
KATA_TAP = "tap0_kata"
POD_IFNAME = "eth0"
KATA_NETWORK = ipaddress.IPv4Network("10.216.0.0/16")
ZONE_PREFIXLEN = 30
SHARE_TAG = "kataShared"
VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
VM_ROOT = Path("/run/vc/vm")
SHARED_ROOT = Path("/run/kata-containers/shared/sandboxes")
BUNDLE_ROOT = Path("/run/containerd/io.containerd.runtime.v2.task/k8s.io")
SANDBOX_FILE = "sandbox.json"
_RUN = Path("/run")  # the sandbox folders' empty parents are removed up to here
# The lab's own annotation: which lab state root made the sandbox (what lab_down recognises).
STATE_ANNOTATION = "io.zonewatch.lab.state-dir"
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
CRI_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
CRI_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
CRI_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
CRI_SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
OCI_VERSION = "1.1.0"
_CLONE_NEWNET = 0x40000000
_VIRTIOFSD_FD = 3


@dataclass(slots=True, frozen=True)
class PodAddressing:
    """The names and addresses kata zone `index` uses."""

    index: int
    netns: str
    host_link: str  # the veth's end in the host namespace
    host_ip: str
    guest_ip: str  # the pod IP: eth0's, and the guest's
    prefixlen: int
    network: str
    tap: str = KATA_TAP

    @property
    def mac(self) -> str:
        """eth0's MAC, which the guest's NIC takes too (locally administered)."""
        return f"52:54:00:5a:4b:{self.index:02x}"

    @property
    def netns_path(self) -> str:
        return f"{NETNS_DIR}/{self.netns}"


def pod_addressing(index: int) -> PodAddressing:
    if not 0 <= index <= taps.MAX_INDEX:
        raise ConfigError("zone index", f"{index} is outside 0..{taps.MAX_INDEX}")
    base = int(KATA_NETWORK.network_address) + (index << 8)
    network = ipaddress.IPv4Network((base, ZONE_PREFIXLEN))
    return PodAddressing(
        index=index,
        netns=f"{NETNS_PREFIX}{index}",
        host_link=f"{HOST_LINK_PREFIX}{index}",
        host_ip=str(network.network_address + 1),
        guest_ip=str(network.network_address + 2),
        prefixlen=ZONE_PREFIXLEN,
        network=str(network),
    )


def new_sandbox_id() -> str:
    """A sandbox id as containerd makes them: 64 random hex digits."""
    return secrets.token_hex(32)


@dataclass(slots=True, frozen=True)
class Sandbox:
    """One kata zone's sandbox: its id, pod identity and network; every path follows."""

    sandbox_id: str
    pod_name: str  # the zone's name
    pod_namespace: str  # the zone's tenant
    pod_uid: str
    net: PodAddressing

    @classmethod
    def new(cls, pod_name: str, pod_namespace: str, index: int) -> Sandbox:
        return cls(new_sandbox_id(), pod_name, pod_namespace, str(uuid.uuid4()),
                   pod_addressing(index))  # fmt: skip

    @property
    def vm_dir(self) -> Path:
        return VM_ROOT / self.sandbox_id

    @property
    def qmp_socket(self) -> Path:
        return self.vm_dir / "qmp.sock"

    @property
    def virtiofsd_socket(self) -> Path:
        return self.vm_dir / "vhost-fs.sock"

    @property
    def shared_root(self) -> Path:
        return SHARED_ROOT / self.sandbox_id

    @property
    def share_dir(self) -> Path:
        return self.shared_root / "shared"

    @property
    def bundle_dir(self) -> Path:
        return BUNDLE_ROOT / self.sandbox_id

    @property
    def config_path(self) -> Path:
        return self.bundle_dir / "config.json"

    def to_json(self) -> dict[str, Any]:
        return {
            "sandbox_id": self.sandbox_id,
            "pod_name": self.pod_name,
            "pod_namespace": self.pod_namespace,
            "pod_uid": self.pod_uid,
            "index": self.net.index,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sandbox:
        sandbox_id = str(data["sandbox_id"])
        if not is_sandbox_id(sandbox_id):
            raise ValueError(f"{sandbox_id!r} is not a sandbox id")
        return cls(sandbox_id, str(data["pod_name"]), str(data["pod_namespace"]),
                   str(data["pod_uid"]), pod_addressing(int(data["index"])))  # fmt: skip


def is_sandbox_id(text: str) -> bool:
    """True for 64 lower-case hex digits (what the lab makes; never a path)."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


# --- the OCI bundle ---------------------------------------------------------------------------


def bundle_config(sandbox: Sandbox, state_dir: Path) -> dict[str, Any]:
    """The sandbox (pause) container's OCI config, as containerd's CRI plugin writes it for
    a pod: the CRI annotations name the pod, its namespace and uid; the network namespace
    is the pod's."""
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 65535, "gid": 65535},
            "args": ["/pause"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": sandbox.pod_name,
        "annotations": {
            CRI_CONTAINER_TYPE: "sandbox",
            CRI_SANDBOX_ID: sandbox.sandbox_id,
            CRI_SANDBOX_NAMESPACE: sandbox.pod_namespace,
            CRI_SANDBOX_NAME: sandbox.pod_name,
            CRI_SANDBOX_UID: sandbox.pod_uid,
            STATE_ANNOTATION: str(state_dir),
        },
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": sandbox.net.netns_path},
            ],
        },
    }


def write_bundle(sandbox: Sandbox, state_dir: Path) -> Path:
    sandbox.bundle_dir.mkdir(parents=True, exist_ok=True)
    tmp = sandbox.config_path.with_name(f".config.json.{os.getpid()}")
    tmp.write_text(json.dumps(bundle_config(sandbox, state_dir), indent=2) + "\n")
    tmp.replace(sandbox.config_path)
    return sandbox.config_path


def bundles_of(state_dir: Path, bundle_root: Path = BUNDLE_ROOT) -> list[str]:
    """Sandbox ids of the bundles that the lab with this state root made (by the lab's
    annotation); other bundles, and unreadable ones, are not the lab's."""
    found: list[str] = []
    if not bundle_root.is_dir():
        return found
    for config in sorted(bundle_root.glob("*/config.json")):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            annotations = json.loads(config.read_text()).get("annotations", {})
            if annotations.get(STATE_ANNOTATION) == str(state_dir) and is_sandbox_id(
                config.parent.name
            ):
                found.append(config.parent.name)
    return found


# --- the pod's network --------------------------------------------------------------------


def _run(argv: list[str], where: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError as exc:
        raise EnvironmentProblem(argv[0], "not found (install Debian's iproute2)") from exc
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        why = lines[-1] if lines else f"exit {proc.returncode}"
        raise LabError(where, f"`{' '.join(argv)}` failed: {why}")
    return proc.stdout


def netns_exists(netns: str) -> bool:
    return Path(NETNS_DIR, netns).exists()


def pod_network_commands(net: PodAddressing) -> list[list[str]]:
    """The ip and tc commands that build a pod's namespace, veth and tap, in order (lo,
    then eth0 = ifindex 2, tap0_kata = 3 in the fresh namespace)."""
    ns = net.netns
    mirred = ["u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev"]
    return [
        ["ip", "netns", "add", ns],
        # IPv4 only, as on plain zones' taps: no solicitations or DAD chatter to the guest.
        ["ip", "netns", "exec", ns, "sh", "-c", "for f in all default; do echo 1 > "
         "/proc/sys/net/ipv6/conf/$f/disable_ipv6; done 2>/dev/null; true"],
        ["ip", "link", "add", net.host_link, "type", "veth", "peer", "name", POD_IFNAME,
         "netns", ns],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "-n", ns, "link", "set", POD_IFNAME, "address", net.mac],
        ["ip", "-n", ns, "addr", "add", f"{net.guest_ip}/{net.prefixlen}", "dev", POD_IFNAME],
        ["ip", "-n", ns, "link", "set", POD_IFNAME, "up"],
        ["ip", "-n", ns, "tuntap", "add", "dev", KATA_TAP, "mode", "tap"],
        ["ip", "-n", ns, "link", "set", KATA_TAP, "up"],
        ["tc", "-n", ns, "qdisc", "add", "dev", POD_IFNAME, "ingress"],
        ["tc", "-n", ns, "qdisc", "add", "dev", KATA_TAP, "ingress"],
        ["tc", "-n", ns, "filter", "add", "dev", POD_IFNAME, "parent", "ffff:", "protocol",
         "all", *mirred, KATA_TAP],
        ["tc", "-n", ns, "filter", "add", "dev", KATA_TAP, "parent", "ffff:", "protocol",
         "all", *mirred, POD_IFNAME],
    ]  # fmt: skip


def host_end_commands(net: PodAddressing) -> list[list[str]]:
    """The commands that give the veth's host end its address and bring it up."""
    return [
        ["ip", "addr", "add", f"{net.host_ip}/{net.prefixlen}", "dev", net.host_link],
        ["ip", "link", "set", net.host_link, "up"],
    ]


def create_pod_network(net: PodAddressing) -> None:
    """Build the pod's namespace, veth, tap and mirred filters; undone on failure."""
    if netns_exists(net.netns):
        raise LabError(net.netns, "network namespace already exists")
    taps.check_addresses_free(net.host_link, net.host_ip, net.prefixlen)
    try:
        for argv in pod_network_commands(net):
            _run(argv, net.netns)
        taps.disable_ipv6(net.host_link)
        for argv in host_end_commands(net):
            _run(argv, net.host_link)
    except BaseException:
        delete_pod_network(net)
        raise


def delete_pod_network(net: PodAddressing) -> None:
    """Delete the host end of the veth (its peer eth0 goes with it), the tap and the
    namespace. Harmless for parts already gone."""
    if taps.tap_exists(net.host_link):
        taps.delete_tap(net.host_link)
    if netns_exists(net.netns):
        _delete_netns(net.netns)


def _delete_netns(netns: str) -> None:
    """Delete the pod's tap, then the namespace (its name; the namespace itself goes with
    the last process in it, which is why QEMU is stopped first)."""
    with contextlib.suppress(LabError):  # already gone with its namespace
        _run(["ip", "-n", netns, "link", "del", KATA_TAP], netns)
    _run(["ip", "netns", "del", netns], netns)


def lab_netns_names() -> list[str]:
    """Every network namespace named like a lab pod's."""
    folder = Path(NETNS_DIR)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(NETNS_PREFIX))


def delete_lab_networks() -> None:
    """Delete every lab pod's veth and namespace (what `lab down` sweeps, by name)."""
    taps.delete_taps(HOST_LINK_PREFIX)
    for netns in lab_netns_names():
        _delete_netns(netns)


# --- processes ------------------------------------------------------------------------------


@contextlib.contextmanager
def netns_preexec(netns: str, *, die_with_parent: bool) -> Iterator[Callable[[], None]]:
    """A preexec_fn that moves the child into network namespace `netns` (and, with
    `die_with_parent`, kills it with the spawning thread). Valid inside the `with`."""
    setns = libc().setns
    pdeathsig = pdeathsig_preexec() if die_with_parent else None
    try:
        fd = os.open(Path(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LabError(netns, f"cannot open the network namespace: {exc.strerror}") from exc

    def apply() -> None:
        if pdeathsig is not None:
            pdeathsig()
        if setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)}")

    try:
        yield apply
    finally:
        os.close(fd)


def virtiofsd_binary() -> Path:
    if not os.access(VIRTIOFSD, os.X_OK):
        raise EnvironmentProblem(str(VIRTIOFSD), "not found (install Debian's qemu-system-common)")
    return VIRTIOFSD


def virtiofsd_command(sandbox: Sandbox) -> list[str]:
    """virtiofsd as Kata starts it: the listening socket inherited as fd 3."""
    return [str(virtiofsd_binary()), f"--fd={_VIRTIOFSD_FD}",
            "-o", f"source={sandbox.share_dir}", "-o", "cache=auto", "-o", "no_posix_lock",
            "-f"]  # fmt: skip


def listen_unix(path: Path) -> socket.socket:
    """A unix stream socket bound at `path` and listening (a stale file is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise LabError(str(path), f"cannot listen: {exc.strerror}") from exc
    return sock


def spawn_virtiofsd(sandbox: Sandbox, log: Path, *, detach: bool) -> subprocess.Popen[bytes]:
    """Start virtiofsd for the sandbox's share on its socket (made here, passed as fd 3).
    Attached, it dies with the spawning thread; detached, it has its own session."""
    argv = virtiofsd_command(sandbox)
    listener = listen_unix(sandbox.virtiofsd_socket)
    pdeathsig = None if detach else pdeathsig_preexec()
    fd = listener.fileno()

    def apply() -> None:
        if pdeathsig is not None:
            pdeathsig()
        if fd == _VIRTIOFSD_FD:
            os.set_inheritable(fd, True)
        else:
            os.dup2(fd, _VIRTIOFSD_FD)  # inheritable

    try:
        with log.open("wb") as out:
            # close_fds=False: it would close fd 3 after preexec_fn; every other fd Python
            # opened is close-on-exec anyway.
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                close_fds=False, start_new_session=detach, preexec_fn=apply,  # noqa: PLW1509
            )  # fmt: skip
    finally:
        listener.close()


def stop_virtiofsd(share: Path, timeout: float = 3.0) -> int:
    """Stop every virtiofsd serving `share` (SIGTERM, then SIGKILL); returns how many."""
    stopped = 0
    for pid, start in virtiofsd_processes(str(share)):
        if kill_process(pid, start, timeout):
            stopped += 1
    return stopped


# --- the whole sandbox ----------------------------------------------------------------------


def write_sandbox_file(sandbox: Sandbox, zone_dir: Path) -> Path:
    path = zone_dir / SANDBOX_FILE
    tmp = path.with_name(f".{SANDBOX_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(sandbox.to_json(), indent=2) + "\n")
    tmp.replace(path)
    return path


def read_sandbox_file(zone_dir: Path) -> Sandbox | None:
    """The sandbox a zone folder records; None if it has none (or it is unreadable)."""
    try:
        return Sandbox.from_json(json.loads((zone_dir / SANDBOX_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def make_sandbox_dirs(sandbox: Sandbox) -> None:
    sandbox.vm_dir.mkdir(parents=True, exist_ok=True)
    sandbox.share_dir.mkdir(parents=True, exist_ok=True)


def remove_sandbox_files(sandbox_id: str) -> None:
    """The sandbox's folders under /run/vc/vm, the shared sandboxes and the bundles."""
    if not is_sandbox_id(sandbox_id):  # never a path from a file into rmtree
        raise LabError(sandbox_id, "is not a sandbox id")
    for root in (VM_ROOT, SHARED_ROOT, BUNDLE_ROOT):
        shutil.rmtree(root / sandbox_id, ignore_errors=True)
    remove_empty_roots()


def remove_sandbox(sandbox: Sandbox) -> None:
    """Everything a kata zone made besides QEMU (stopped first by the caller): virtiofsd,
    the pod network, the sandbox's folders."""
    stop_virtiofsd(sandbox.share_dir)
    delete_pod_network(sandbox.net)
    remove_sandbox_files(sandbox.sandbox_id)


def remove_sandboxes_by_id(sandbox_ids: list[str]) -> None:
    """What a killed run left of sandboxes known only by id: virtiofsd and folders."""
    for sandbox_id in sandbox_ids:
        stop_virtiofsd(SHARED_ROOT / sandbox_id / "shared")
        remove_sandbox_files(sandbox_id)


def remove_empty_roots() -> None:
    """The folders above the sandboxes' (up to /run), where the lab left them empty: a real
    Kata's or containerd's are never empty, and rmdir leaves non-empty ones alone."""
    for root in (VM_ROOT, SHARED_ROOT, BUNDLE_ROOT):
        for folder in (root, *root.parents):
            if folder == _RUN:
                break
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY):
                    break
                raise
