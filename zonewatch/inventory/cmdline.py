"""Recognise a VMM from its argv and read what its command line says about the zone.

Pure functions over an argv (a list of strings, as `/proc/PID/cmdline` gives it): no /proc
access here. The inventory classifies every process with these, so they are written for
hostile input: an argv is attacker-influenced in theory (a tenant may choose a VM name, a
disk path, a tap name), huge, or plain garbage. Nothing here raises on any argv; a
malformed option is skipped, an out-of-bounds one ignored, and the whole is bounded by
`MAX_ARGS`, `MAX_ARG_LEN` and `MAX_TOTAL_CHARS`.

What each VMM's command line looks like, as its project or Kata generates it:

- QEMU (`qemu-system-*`, `qemu-kvm`): QemuOpts values (`key=val,key=val`, a leading bare
  value is the option's implied key, `,,` is a literal comma); libvirt passes `-device`,
  `-netdev`, `-object` and `-blockdev` as JSON objects instead. Shares are joined across
  options: `-fsdev local,id=X,path=P` + `-device virtio-9p-pci,fsdev=X,mount_tag=T` (9p),
  `-chardev socket,id=C,path=S` + `-device vhost-user-fs-pci,chardev=C,tag=T` (virtio-fs).
  Libvirt and Kata pass taps as file descriptors (`fd=`, `fds=`): no names then.
- Kata's QEMU: `-name sandbox-<id>` (Go runtime and runtime-rs), binaries under
  /opt/kata; sockets under /run/vc/vm/<id>/ (Go) or /run/kata/<id>/ (runtime-rs).
- Firecracker: `--id`, `--api-sock`, `--config-file` (JSON with `drives[].path_on_host`
  and `network-interfaces[].host_dev_name`); under the jailer, argv[0] is `/firecracker`
  and the paths are relative to the jail's root.
- Cloud Hypervisor: `--disk`, `--net`, `--fs`, `--pmem` each take one *or more* values
  (`--disk path=a path=b`); values split on commas outside `[...]` and `"..."`. Kata starts
  it with only `--api-socket /run/vc/vm/<id>/clh-api.sock` and configures it over the API.
- crosvm: `crosvm [global options] run [options] KERNEL`; `--shared-dir PATH:TAG[:type=fs]`,
  `--disk/--rwdisk/--root/--rwroot/--block`, `--tap-name`, `--net tap-name=`, `--socket`.
- The lab's micro-VMM: `python3 -m zonewatch.lab.microvm --name NAME ...`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

from zonewatch.model import Share, Vmm, utf8_text, visible_char

__all__ = [
    "LABEL_CH_API_SOCKET",
    "LABEL_CROSVM_SOCKET",
    "LABEL_FC_API_SOCK",
    "LABEL_FC_CONFIG_FILE",
    "LABEL_FC_ID",
    "LABEL_KATA_SANDBOX",
    "LABEL_QEMU_QMP",
    "LABEL_QEMU_UUID",
    "MAX_ARGS",
    "MAX_ARG_LEN",
    "MAX_CONFIG_BYTES",
    "MAX_ITEMS",
    "MAX_NAME_LEN",
    "MAX_TOTAL_CHARS",
    "VCPU_THREAD_PATTERN",
    "VirtiofsdSpec",
    "VmmSpec",
    "kata_sandbox_id",
    "parse_virtiofsd_cmdline",
    "parse_vmm_cmdline",
    "utf8_text",
    "vcpu_index",
]

# Label keys a VmmSpec may carry.
LABEL_KATA_SANDBOX: Final = "kata.sandbox"
LABEL_FC_ID: Final = "firecracker.id"
LABEL_FC_API_SOCK: Final = "firecracker.api_sock"
LABEL_FC_CONFIG_FILE: Final = "firecracker.config_file"
LABEL_CH_API_SOCKET: Final = "cloud_hypervisor.api_socket"
LABEL_CROSVM_SOCKET: Final = "crosvm.socket"
LABEL_QEMU_QMP: Final = "qemu.qmp"
LABEL_QEMU_UUID: Final = "qemu.uuid"

# Bounds on what is examined; beyond them input is ignored, never an error.
MAX_ARGS: Final = 16384  # argv elements looked at
MAX_ARG_LEN: Final = 131072  # the kernel's MAX_ARG_STRLEN: a longer element is skipped
MAX_TOTAL_CHARS: Final = 8 * 1024 * 1024  # the rest of a larger argv is ignored
MAX_ITEMS: Final = 1024  # shares, disks, taps, sockets kept per VMM
MAX_NAME_LEN: Final = 256  # zone names and label values (after escaping) are cut here
MAX_CONFIG_BYTES: Final = 1024 * 1024  # a larger Firecracker config file is not parsed
_MAX_PATH_LEN: Final = 4096  # PATH_MAX
_MAX_TAG_LEN: Final = 255
_MAX_FD_DIGITS: Final = 7  # a descriptor number (the kernel's limit, fs.nr_open, is 2^20)
_MAX_JSON_DEPTH: Final = 16

# The comm (/proc/PID/task/TID/comm, without its newline) of a vCPU thread:
#   QEMU with `-name ...,debug-threads=on`: "CPU <n>/KVM", "CPU <n>/TCG" (MTTCG) and
#     "ALL CPUs/TCG" (single-threaded TCG); without debug-threads every thread keeps the
#     process comm and vCPUs cannot be told apart by name.
#   Firecracker: "fc_vcpu <n>"; Cloud Hypervisor: "vcpu<n>"; crosvm: "crosvm_vcpu<n>";
#   the lab's micro-VMM: "zw-vcpu<n>".
# "vcpu<n>" is generic: apply the pattern only to threads of a recognised VMM process.
VCPU_THREAD_PATTERN: Final[re.Pattern[str]] = re.compile(
    r"\A(?:"
    r"CPU (?P<qemu>[0-9]{1,5})/(?:KVM|TCG)"
    r"|ALL CPUs/TCG"
    r"|fc_vcpu (?P<firecracker>[0-9]{1,5})"
    r"|vcpu(?P<cloud_hypervisor>[0-9]{1,5})"
    r"|crosvm_vcpu(?P<crosvm>[0-9]{1,4})"
    r"|zw-vcpu(?P<microvm>[0-9]{1,8})"
    r")\Z"
)


def vcpu_index(comm: str) -> int | None:
    """The vCPU number in a vCPU thread's comm; None if it is no vCPU or names none."""
    m = VCPU_THREAD_PATTERN.match(comm)
    if m is None:
        return None
    for value in m.groupdict().values():
        if value is not None:
            return int(value)
    return None  # "ALL CPUs/TCG"


@dataclass(slots=True, frozen=True)
class VmmSpec:
    """What a VMM's command line says about its zone."""

    vmm: Vmm
    name: str  # zone name from the command line; "" if none
    # 9p: host path known; virtio-fs over vhost-user: host_path "" (virtiofsd knows it),
    # backend "virtiofs"; crosvm's built-in virtio-fs: host path known.
    shares: tuple[Share, ...]
    disks: tuple[str, ...]  # disk image paths, as the VMM names them
    tap_names: tuple[str, ...]  # tap ifnames named on the command line (none when fds are passed)
    vhost_user_sockets: tuple[str, ...]  # vhost-user-fs sockets (to match virtiofsd helpers)
    labels: dict[str, str]  # see the LABEL_* keys


@dataclass(slots=True, frozen=True)
class VirtiofsdSpec:
    """A virtiofsd process: the vhost-user socket it serves and the directory it shares."""

    socket_path: str  # "" when the socket is passed as a file descriptor (--fd, as Kata does)
    shared_dir: str  # "" if not given
    tag: str  # "" if not given
    socket_fd: int = -1  # --fd=N: the inherited listening socket's descriptor; -1 if none


# --------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------
def parse_vmm_cmdline(
    argv: Sequence[str], read_file: Callable[[str], bytes] | None = None
) -> VmmSpec | None:
    """Recognise a VMM by its executable's basename and parse its argv; None otherwise.

    `read_file(path)` reads a file named on the command line (Firecracker's
    `--config-file`); the path is passed as written there, so a caller should resolve it
    against the process (/proc/PID/root, /proc/PID/cwd). Any exception it raises, or a
    malformed file, just means no disks or taps from it.
    """
    args = _normalize(argv)
    if args is None:
        return None
    base = _basename(args[0])
    if _PYTHON_RE.match(base):
        return _parse_microvm(args)
    if _QEMU_RE.match(base):
        return _parse_qemu(args)
    if _FIRECRACKER_RE.match(base):
        return _parse_firecracker(args, read_file)
    if _CLOUD_HYPERVISOR_RE.match(base):
        return _parse_cloud_hypervisor(args)
    if base == "crosvm":
        return _parse_crosvm(args)
    return None


def parse_virtiofsd_cmdline(argv: Sequence[str]) -> VirtiofsdSpec | None:
    """Recognise a virtiofsd (the Rust one or QEMU's older C one) and read its argv.

    None when it is no virtiofsd or names neither a socket nor a shared directory
    (`--print-capabilities`, `--help`).
    """
    args = _normalize(argv)
    if args is None or not _VIRTIOFSD_RE.match(_basename(args[0])):
        return None
    socket = shared = tag = ""
    socket_fd = -1
    n = len(args)
    i = 1
    while i < n:
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if key not in ("socket-path", "socket", "shared-dir", "tag", "fd"):
                continue
            if not eq:
                if i >= n or args[i].startswith("-"):
                    continue
                value = args[i]
                i += 1
            if key in ("socket-path", "socket"):
                socket = value if _path_ok(value) else ""
            elif key == "shared-dir":
                shared = value if _path_ok(value) else ""
            elif key == "tag":
                tag = value if _tag_ok(value) else ""
            elif value.isascii() and value.isdigit() and len(value) <= _MAX_FD_DIGITS:
                # --fd: the socket is inherited, its path is not on the command line
                socket, socket_fd = "", int(value)
        elif arg.startswith("-o"):  # C virtiofsd, and the Rust one's compat options
            value = arg[2:]
            if not value:
                if i >= n:
                    break
                value = args[i]
                i += 1
            for opt in _split_fuse_opts(value):
                key, _, val = opt.partition("=")
                if key == "source" and _path_ok(val):
                    shared = val
                elif key == "vhost_user_socket" and _path_ok(val):
                    socket = val
    if not socket and not shared and socket_fd < 0:
        return None
    return VirtiofsdSpec(socket_path=socket, shared_dir=shared, tag=tag, socket_fd=socket_fd)


_KATA_PATH_RE = re.compile(
    r"/run/(?:vc/vm|vc/sbs|vc/firecracker|kata(?:/firecracker)?|kata-containers/shared/sandboxes)"
    r"/([A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:/|\Z)"
)


def kata_sandbox_id(path: str) -> str:
    """The Kata sandbox id in a path Kata creates for it; "" if there is none.

    /run/vc/vm/<id>/ (Go runtime), /run/kata/<id>/ (runtime-rs),
    /run/vc/firecracker/<id>/ (jails), /run/kata-containers/shared/sandboxes/<id>/ (the
    directory virtiofsd shares, so a virtiofsd started with --fd can be matched too).
    """
    if not isinstance(path, str) or len(path) > _MAX_PATH_LEN:
        return ""
    m = _KATA_PATH_RE.search(path)
    return m.group(1) if m else ""


# --------------------------------------------------------------------------------------
# Shared helpers.
# --------------------------------------------------------------------------------------
_QEMU_RE = re.compile(r"\A(?:qemu-system-[A-Za-z0-9_.+-]+|qemu-kvm(?:-[A-Za-z0-9_.+-]+)?)\Z")
_FIRECRACKER_RE = re.compile(r"\Afirecracker(?:-v?[0-9][A-Za-z0-9_.+-]*)?\Z")
_CLOUD_HYPERVISOR_RE = re.compile(r"\Acloud-hypervisor(?:-[A-Za-z0-9_.+-]+)?\Z")
_PYTHON_RE = re.compile(r"\Apython(?:[0-9]+(?:\.[0-9]+)*)?\Z")
_VIRTIOFSD_RE = re.compile(r"\Avirtiofsd(?:-rs)?\Z")
_PROTOCOL_RE = re.compile(r"\A[A-Za-z][A-Za-z0-9+.-]*:")
_SANDBOX_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
# Bytes the kernel refuses in an interface name (dev_valid_name: '/', ':', isspace()).
_IFNAME_BAD_BYTES: Final = frozenset(b"/: \t\n\v\f\r\xa0\x00%")


def _normalize(argv: object) -> list[str] | None:
    """argv as a bounded list of strings; oversized or non-string elements become ""."""
    if isinstance(argv, str | bytes | bytearray) or not isinstance(argv, Sequence):
        return None
    out: list[str] = []
    budget = MAX_TOTAL_CHARS
    try:
        for index, item in enumerate(argv):
            if index >= MAX_ARGS:
                break
            if not isinstance(item, str) or len(item) > MAX_ARG_LEN or "\x00" in item:
                out.append("")
                continue
            budget -= len(item)
            if budget < 0:
                break
            out.append(item)
    except Exception:  # a hostile Sequence's iterator: not a VMM we can read
        return None
    return out if out and out[0] else None


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _path_ok(path: object) -> TypeGuard[str]:
    return isinstance(path, str) and 0 < len(path) <= _MAX_PATH_LEN and "\x00" not in path


def _tag_ok(tag: str) -> bool:
    return 0 < len(tag) <= _MAX_TAG_LEN and "\x00" not in tag


def _ifname_ok(name: str) -> bool:
    """A name the kernel accepts for an interface (at most 15 bytes, no '/', ':', space)."""
    raw = name.encode("utf-8", "surrogateescape")
    return (
        0 < len(raw) <= 15
        and name not in (".", "..")
        and not any(b in _IFNAME_BAD_BYTES for b in raw)
    )


def _clean_text(text: str, limit: int = MAX_NAME_LEN) -> str:
    """Text fit for names and labels: non-printable characters (escape sequences, newlines,
    bidi controls) become visible escapes, and the result is bounded."""
    text = text[: limit * 4]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else visible_char(c) for c in text)
    return text[:limit]


_GENERIC_SOCKET_STEMS: Final = frozenset(
    {"", "api", "api-sock", "ch", "clh-api", "cloud-hypervisor", "control", "crosvm", "fc",
     "firecracker", "monitor", "qmp", "sock", "socket", "vm"}
)  # fmt: skip
_GENERIC_DIRS: Final = frozenset({"", "root", "run", "tmp", "var", "sockets", "sock"})


def _name_from_socket(path: str) -> str:
    """A zone name from an API/control socket path: its file name without .sock/.socket, or
    the directory's name when the file name is generic (clh-api.sock, crosvm.sock)."""
    parts = path.rstrip("/").split("/")
    stem = parts[-1]
    for suffix in (".sock", ".socket"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if stem.lower() not in _GENERIC_SOCKET_STEMS:
        return _clean_text(stem)
    parent = parts[-2] if len(parts) > 1 else ""
    return "" if parent.lower() in _GENERIC_DIRS else _clean_text(parent)


def _split_fuse_opts(value: str) -> list[str]:
    """`-o a=b,c` as libfuse splits it: commas separate, a backslash escapes."""
    if "\\" not in value:
        return value.split(",")
    out: list[str] = []
    cur: list[str] = []
    escaped = False
    for c in value:
        if escaped:
            cur.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    out.append("".join(cur))
    return out


def _split_bracketed(value: str) -> list[str] | None:
    """Commas separate, except inside [...] or "..." (quotes are dropped); None when the
    brackets or quotes do not balance. Cloud Hypervisor's and crosvm's value syntax."""
    if "[" not in value and '"' not in value and "]" not in value:
        return value.split(",")
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    quoted = False
    for c in value:
        if c == '"':
            quoted = not quoted
        elif quoted:
            cur.append(c)
        elif c == "[":
            depth += 1
            cur.append(c)
        elif c == "]":
            depth -= 1
            if depth < 0:
                return None
            cur.append(c)
        elif c == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if depth or quoted:
        return None
    out.append("".join(cur))
    return out


def _keyvals(parts: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if eq:
            out[key.strip()] = value
    return out


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _flatten(obj: dict[str, Any], out: dict[str, str], prefix: str = "", depth: int = 0) -> None:
    """A JSON object as QEMU's dotted keys: {"file": {"filename": x}} -> file.filename=x."""
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if depth < _MAX_JSON_DEPTH:
                _flatten(value, out, f"{name}.", depth + 1)
        elif isinstance(value, bool):
            out[name] = "on" if value else "off"
        elif isinstance(value, str | int | float):
            out[name] = str(value)


class _Found:
    """What a parser collects, deduplicated in order and bounded."""

    __slots__ = ("disks", "labels", "shares", "sockets", "taps")

    def __init__(self) -> None:
        self.shares: dict[tuple[str, str, str], Share] = {}
        self.disks: dict[str, None] = {}
        self.taps: dict[str, None] = {}
        self.sockets: dict[str, None] = {}
        self.labels: dict[str, str] = {}

    def disk(self, path: str | None) -> None:
        if _path_ok(path) and len(self.disks) < MAX_ITEMS:
            self.disks[path] = None

    def tap(self, name: str | None) -> None:
        if name and _ifname_ok(name) and len(self.taps) < MAX_ITEMS:
            self.taps[name] = None

    def socket(self, path: str | None) -> None:
        if _path_ok(path) and len(self.sockets) < MAX_ITEMS:
            self.sockets[path] = None

    def share(self, tag: str | None, host_path: str, backend: str) -> None:
        if not tag or not _tag_ok(tag) or (host_path and not _path_ok(host_path)):
            return
        if len(self.shares) < MAX_ITEMS:
            self.shares.setdefault((tag, host_path, backend), Share(tag, host_path, backend))

    def label(self, key: str, value: str | None) -> None:
        if value:
            self.labels[key] = _clean_text(value)

    def kata_id(self, *extra: str) -> str:
        """The Kata sandbox id named by any path collected so far (or in `extra`)."""
        candidates = [*extra, *self.sockets, *self.disks]
        candidates += [s.host_path for s in self.shares.values()]
        for path in candidates:
            sandbox = kata_sandbox_id(path)
            if sandbox:
                return sandbox
        return ""

    def spec(self, vmm: Vmm, name: str) -> VmmSpec:
        return VmmSpec(
            vmm=vmm,
            name=name,
            shares=tuple(self.shares.values()),
            disks=tuple(self.disks),
            tap_names=tuple(self.taps),
            vhost_user_sockets=tuple(self.sockets),
            labels=self.labels,
        )


def _long_options(
    args: Sequence[str], start: int, wanted: dict[str, str], multi: frozenset[str] = frozenset()
) -> Iterable[tuple[str, str]]:
    """(canonical name, value) for each wanted option in `--opt value` / `--opt=value` form.

    `wanted` maps spellings (with dashes, e.g. "--disk", "-d") to a canonical name. Options
    in `multi` take every following value up to the next option (Cloud Hypervisor). Other
    tokens are stepped over one at a time, so an unknown option never swallows a known
    one. A value may not start with "-". Scanning stops at "--".
    """
    n = len(args)
    i = start
    while i < n:
        arg = args[i]
        i += 1
        if arg == "--":
            return
        if not arg.startswith("-"):
            continue
        spelling, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        canonical = wanted.get(spelling)
        if canonical is None:
            continue
        if eq:
            yield canonical, value
        elif i < n and not args[i].startswith("-"):
            yield canonical, args[i]
            i += 1
        else:
            continue
        if canonical in multi:
            while i < n and not args[i].startswith("-"):
                yield canonical, args[i]
                i += 1


# --------------------------------------------------------------------------------------
# QEMU (and Kata's QEMU).
# --------------------------------------------------------------------------------------
# Options whose values we read -> the key a leading bare value stands for.
_QEMU_OPTIONS: Final[dict[str, str | None]] = {
    "name": "guest",
    "uuid": None,
    "netdev": "type",
    "nic": "type",
    "net": "type",
    "fsdev": "fsdriver",
    "virtfs": "fsdriver",
    "device": "driver",
    "chardev": "backend",
    "mon": "chardev",
    "qmp": None,
    "object": "qom-type",
    "drive": None,
    "blockdev": None,
    "hda": None,
    "hdb": None,
    "hdc": None,
    "hdd": None,
}
_QEMU_JSON_OPTIONS: Final = frozenset({"device", "netdev", "object", "blockdev"})
# Options known to take a value we do not read: the value is stepped over whatever it
# holds (`-append "-name x"` names nothing). Any other unknown token is stepped over alone.
_QEMU_OTHER_VALUE_OPTIONS: Final = frozenset(
    {"accel", "acpitable", "add-fd", "append", "audiodev", "bios", "boot", "cdrom", "chroot",
     "cpu", "D", "d", "debugcon", "display", "dtb", "fda", "fdb", "fw_cfg", "global",
     "icount", "incoming", "initrd", "iscsi", "k", "kernel", "L", "loadvm", "M", "m",
     "machine", "mem-path", "monitor", "msg", "numa", "option-rom", "overcommit",
     "parallel", "pflash", "pidfile", "readconfig", "rtc", "run-with", "runas", "sandbox",
     "serial", "smbios", "smp", "spice", "tpmdev", "trace", "vga", "vnc"}
)  # fmt: skip


def _qemu_opts(value: str, implied: str | None, json_ok: bool) -> dict[str, str]:
    """A QemuOpts value (`a=b,c=d`, `,,` a literal comma) or, where QEMU accepts one, a
    JSON object, as a flat dict of strings."""
    out: dict[str, str] = {}
    if json_ok and value.startswith("{"):
        obj = _json_object(value)
        if obj is not None:
            _flatten(obj, out)
        return out
    # argv elements hold no NUL (see _normalize): it can stand in for an escaped comma.
    for index, raw in enumerate(value.replace(",,", "\x00").split(",")):
        part = raw.replace("\x00", ",")
        if not part:
            continue
        key, eq, val = part.partition("=")
        if eq:
            out[key] = val
        elif index == 0 and implied:
            out[implied] = part
        else:
            out[part] = "on"
    return out


def _local_image(value: str | None) -> str | None:
    """A disk image path, or None for a network protocol (nbd:, rbd:, json:, ...)."""
    if not value:
        return None
    if value.startswith("file:"):
        return value[5:]
    if not value.startswith("/") and _PROTOCOL_RE.match(value):
        return None
    return value


def _qemu_options(args: list[str]) -> Iterable[tuple[str, str]]:
    """(option, value) for the options QEMU reads that we care about; `--opt` == `-opt`."""
    n = len(args)
    i = 1
    while i < n:
        arg = args[i]
        i += 1
        if len(arg) < 2 or arg[0] != "-":
            continue
        opt = arg[2:] if arg.startswith("--") else arg[1:]
        if opt in _QEMU_OPTIONS and i < n:
            yield opt, args[i]
            i += 1
        elif opt in _QEMU_OTHER_VALUE_OPTIONS:
            i += 1


def _parse_qemu(args: list[str]) -> VmmSpec:  # noqa: PLR0915 (one pass over many options)
    found = _Found()
    guest = ""
    fsdevs: dict[str, str] = {}  # -fsdev local id -> host path
    chardevs: dict[str, str] = {}  # -chardev socket id -> path
    mem_files: dict[str, str] = {}  # memory-backend-file id -> mem-path
    p9_devices: list[tuple[str, str]] = []  # (fsdev id, mount tag)
    fs_devices: list[tuple[str, str]] = []  # (chardev id, tag)
    nvdimm_memdevs: list[str] = []
    monitor_chardev = ""
    qmp_path = ""

    for opt, value in _qemu_options(args):
        kv = _qemu_opts(value, _QEMU_OPTIONS[opt], opt in _QEMU_JSON_OPTIONS)
        if opt == "name":
            guest = kv.get("guest", "")
        elif opt == "uuid":
            found.label(LABEL_QEMU_UUID, value)
        elif opt in ("netdev", "nic", "net"):
            if kv.get("type") == "tap":
                found.tap(kv.get("ifname"))
        elif opt == "fsdev":
            if kv.get("fsdriver") == "local" and kv.get("id") and _path_ok(kv.get("path")):
                fsdevs[kv["id"]] = kv["path"]
        elif opt == "virtfs":
            if kv.get("fsdriver") == "local" and _path_ok(kv.get("path")):
                found.share(kv.get("mount_tag"), kv["path"], "9p")
        elif opt == "chardev":
            if kv.get("backend") == "socket" and kv.get("id") and _path_ok(kv.get("path")):
                chardevs[kv["id"]] = kv["path"]
        elif opt == "device":
            driver = kv.get("driver", "")
            if driver.startswith("virtio-9p-"):
                p9_devices.append((kv.get("fsdev", ""), kv.get("mount_tag", "")))
            elif driver.startswith("vhost-user-fs-"):
                fs_devices.append((kv.get("chardev", ""), kv.get("tag", "")))
            elif driver == "nvdimm" and kv.get("memdev"):
                nvdimm_memdevs.append(kv["memdev"])
        elif opt == "object":
            if kv.get("qom-type") == "memory-backend-file" and kv.get("id"):
                mem_files[kv["id"]] = kv.get("mem-path", "")
        elif opt == "drive":
            if kv.get("if") != "pflash":  # firmware, not a disk
                found.disk(_local_image(kv.get("file") or kv.get("file.filename")))
        elif opt == "blockdev":
            for key, val in kv.items():
                if key == "filename" or key.endswith(".filename"):
                    found.disk(_local_image(val))
        elif opt in ("hda", "hdb", "hdc", "hdd"):
            found.disk(_local_image(value))
        elif opt == "mon":
            if kv.get("mode") == "control" and not monitor_chardev:
                monitor_chardev = kv.get("chardev", "")
        elif opt == "qmp" and not qmp_path:
            qmp_path = _qmp_unix_path(value)

    for fsdev, tag in p9_devices:
        if fsdev in fsdevs:
            found.share(tag, fsdevs[fsdev], "9p")
    for chardev, tag in fs_devices:
        socket = chardevs.get(chardev)
        found.share(tag, "", "virtiofs")
        found.socket(socket)
    for memdev in nvdimm_memdevs:  # Kata maps its guest image as an nvdimm
        found.disk(mem_files.get(memdev))
    qmp_path = qmp_path or chardevs.get(monitor_chardev, "")
    if _path_ok(qmp_path):
        found.label(LABEL_QEMU_QMP, qmp_path)

    name = _clean_text(guest)
    sandbox = ""
    if guest.startswith("sandbox-") and _SANDBOX_ID_RE.match(guest[len("sandbox-") :]):
        sandbox = guest[len("sandbox-") :]
    kata = bool(sandbox) or "kata" in args[0].lower()
    if kata and not sandbox:
        sandbox = found.kata_id(qmp_path)
    if not kata:
        return found.spec(Vmm.QEMU, name)
    if sandbox:
        found.label(LABEL_KATA_SANDBOX, sandbox)
        name = sandbox
    return found.spec(Vmm.KATA, name)


def _qmp_unix_path(value: str) -> str:
    """The path in `-qmp unix:PATH,server=on,wait=off`; "" for fd=, tcp: and the rest."""
    first = value.replace(",,", "\x00").split(",", 1)[0].replace("\x00", ",")
    if not first.startswith("unix:"):
        return ""
    path = first[len("unix:") :]
    if path.startswith("path="):
        path = path[len("path=") :]
    return "" if path.startswith("fd=") else path


# --------------------------------------------------------------------------------------
# Firecracker.
# --------------------------------------------------------------------------------------
_FC_OPTIONS: Final = {"--id": "id", "--api-sock": "api-sock", "--config-file": "config-file"}


def _parse_firecracker(args: list[str], read_file: Callable[[str], bytes] | None) -> VmmSpec:
    found = _Found()
    values: dict[str, str] = {}
    for key, value in _long_options(args, 1, _FC_OPTIONS):
        values.setdefault(key, value)  # Firecracker refuses a repeated option
    fc_id = values.get("id", "")
    api_sock = values.get("api-sock", "")
    config = values.get("config-file", "")
    found.label(LABEL_FC_ID, fc_id)
    if _path_ok(api_sock):
        found.label(LABEL_FC_API_SOCK, api_sock)
    if _path_ok(config):
        found.label(LABEL_FC_CONFIG_FILE, config)
        if read_file is not None:
            _read_firecracker_config(config, read_file, found)
    name = _clean_text(fc_id) or (_name_from_socket(api_sock) if _path_ok(api_sock) else "")
    sandbox = found.kata_id(api_sock, config)
    if sandbox:
        found.label(LABEL_KATA_SANDBOX, sandbox)
        name = sandbox
    return found.spec(Vmm.FIRECRACKER, name)


def _read_firecracker_config(path: str, read_file: Callable[[str], bytes], found: _Found) -> None:
    try:
        raw = read_file(path)
    except Exception:  # the caller's reader: a vanished or unreadable file is no error
        return
    if not isinstance(raw, bytes | bytearray) or len(raw) > MAX_CONFIG_BYTES:
        return
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        return
    if not isinstance(config, dict):
        return
    for section, key in (("drives", "path_on_host"), ("pmem", "path_on_host")):
        for item in _dict_items(config.get(section)):
            path_on_host = item.get(key)
            if isinstance(path_on_host, str):
                found.disk(path_on_host)
    for item in _dict_items(config.get("network-interfaces")):
        dev = item.get("host_dev_name")
        if isinstance(dev, str):
            found.tap(dev)


def _dict_items(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [item for item in value[:MAX_ITEMS] if isinstance(item, dict)]


# --------------------------------------------------------------------------------------
# Cloud Hypervisor.
# --------------------------------------------------------------------------------------
_CH_OPTIONS: Final = {
    "--api-socket": "api-socket",
    "--disk": "disk",
    "--net": "net",
    "--fs": "fs",
    "--pmem": "pmem",
}
_CH_MULTI: Final = frozenset({"disk", "net", "fs", "pmem"})


def _parse_cloud_hypervisor(args: list[str]) -> VmmSpec:
    found = _Found()
    api_socket = ""
    for key, value in _long_options(args, 1, _CH_OPTIONS, _CH_MULTI):
        parts = _split_bracketed(value)
        if parts is None:
            continue
        kv = _keyvals(parts)
        if key == "api-socket":
            # "path=/x" or "fd=3"; releases before 0.x also took a bare path.
            path = kv.get("path", "") if kv else value
            if not api_socket and _path_ok(path):
                api_socket = path
        elif key == "disk":
            found.disk(kv.get("path"))
        elif key == "pmem":
            found.disk(kv.get("file"))
        elif key == "net":
            if kv.get("vhost_user", "off").lower() not in ("on", "true"):
                found.tap(kv.get("tap"))
        elif key == "fs":
            found.share(kv.get("tag"), "", "virtiofs")
            found.socket(kv.get("socket"))
    name = ""
    if api_socket:
        found.label(LABEL_CH_API_SOCKET, api_socket)
        name = _name_from_socket(api_socket)
    sandbox = found.kata_id(api_socket)
    if sandbox:
        found.label(LABEL_KATA_SANDBOX, sandbox)
        name = sandbox
    return found.spec(Vmm.CLOUD_HYPERVISOR, name)


# --------------------------------------------------------------------------------------
# crosvm.
# --------------------------------------------------------------------------------------
_CROSVM_GLOBAL_VALUE_OPTIONS: Final = frozenset({"--log-level", "--syslog-tag"})
_CROSVM_OPTIONS: Final = {
    "--disk": "disk",
    "-d": "disk",
    "--rwdisk": "disk",
    "--root": "disk",
    "-r": "disk",
    "--rwroot": "disk",
    "--block": "disk",
    "-b": "disk",
    "--pmem-device": "disk",
    "--rw-pmem-device": "disk",
    "--pmem": "disk",
    "--shared-dir": "shared-dir",
    "--tap-name": "tap-name",
    "--net": "net",
    "--socket": "socket",
    "-s": "socket",
    "--vhost-user-fs": "vhost-user-fs",
    "--vhost-user": "vhost-user",
}


def _crosvm_run_index(args: list[str]) -> int | None:
    """Index just past the `run` subcommand, or None when this is another subcommand
    (`crosvm stop SOCKET`, `crosvm device fs ...`): those are no VMs."""
    i = 1
    n = len(args)
    while i < n:
        arg = args[i]
        if arg in _CROSVM_GLOBAL_VALUE_OPTIONS:
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            return i + 1 if arg == "run" else None
    return None


def _parse_crosvm(args: list[str]) -> VmmSpec | None:
    start = _crosvm_run_index(args)
    if start is None:
        return None
    found = _Found()
    socket = ""
    for key, value in _long_options(args, start, _CROSVM_OPTIONS):
        if key == "shared-dir":
            _crosvm_shared_dir(value, found)
            continue
        if key == "tap-name":
            found.tap(value)
            continue
        if key == "socket":
            socket = socket or value
            continue
        parts = _split_bracketed(value)
        if parts is None:
            continue
        kv = _keyvals(parts)
        if key == "disk":
            # PATH[,key=value...] or path=PATH,...
            found.disk(kv.get("path") or (parts[0] if "=" not in parts[0] else None))
        elif key == "net":
            found.tap(kv.get("tap-name") or kv.get("tap_name"))
        elif key == "vhost-user-fs":
            if kv:  # socket=PATH,tag=TAG
                socket_path = kv.get("socket") or kv.get("socket-path") or kv.get("socket_path")
                tag = kv.get("tag")
            elif ":" in value:  # the older PATH:TAG
                socket_path, _, tag = value.rpartition(":")
            else:
                continue
            found.share(tag, "", "virtiofs")
            found.socket(socket_path)
        elif key == "vhost-user" and (kv.get("type") == "fs" or parts[0] == "fs"):
            found.socket(kv.get("socket"))
    name = ""
    if _path_ok(socket):
        found.label(LABEL_CROSVM_SOCKET, socket)
        name = _name_from_socket(socket)
    return found.spec(Vmm.CROSVM, name)


def _crosvm_shared_dir(value: str, found: _Found) -> None:
    """PATH:TAG[:type=p9|fs:key=value...]: 9p by default; type=fs is crosvm's own
    virtio-fs device, which serves PATH itself (so the host path is known)."""
    fields = value.split(":")
    if len(fields) < 2:
        return
    path, tag = fields[0], fields[1]
    backend = "9p"
    for opt in fields[2:]:
        for kv in opt.split(","):
            key, _, val = kv.partition("=")
            if key == "type":
                backend = "virtiofs" if val == "fs" else "9p"
    if _path_ok(path):
        found.share(tag, path, backend)


# --------------------------------------------------------------------------------------
# The lab's micro-VMM.
# --------------------------------------------------------------------------------------
_MICROVM_MODULE: Final = "zonewatch.lab.microvm"


def _python_module(args: list[str]) -> tuple[str, int] | None:
    """(module, index of its first argument) for `python [options] -m MODULE ...`."""
    n = len(args)
    i = 1
    while i < n:
        arg = args[i]
        i += 1
        if arg == "--check-hash-based-pycs":
            i += 1
        elif arg in {"--", "-"} or not arg.startswith("-"):
            return None  # a script or stdin comes next: no -m
        elif arg.startswith("--"):
            continue  # --version, --help, ...: flags without values
        else:
            # A cluster of short options, as CPython's getopt reads it: -Im mod, -Wignore.
            for j in range(1, len(arg)):
                flag = arg[j]
                if flag not in "cmXW":
                    continue
                value = arg[j + 1 :]
                if not value:
                    if i >= n:
                        return None
                    value = args[i]
                    i += 1
                if flag == "m":
                    return value, i
                if flag == "c":
                    return None
                break  # -X/-W took the rest of the cluster as their value
    return None


def _parse_microvm(args: list[str]) -> VmmSpec | None:
    module = _python_module(args)
    if module is None or module[0] != _MICROVM_MODULE:
        return None
    name = ""
    # argparse: --name X, --name=X, and unambiguous prefixes (--n, --na, --nam).
    spellings = {"--name": "name", "--nam": "name", "--na": "name", "--n": "name"}
    for _key, value in _long_options(args, module[1], spellings):
        name = value
        break
    return _Found().spec(Vmm.MICROVM, _clean_text(name))
