"""The host side of a lab zone's network: one persistent tap per zone, with a /30.

Zone index i (0..255) owns 10.213.i.0/30: the host end (the tap) is 10.213.i.1, the guest
10.213.i.2. The guest has no default route and the host routes nothing anywhere else for
these addresses: lab traffic never leaves the tap it was sent on. Every lab tap is named
`zwtap<i>`, so leftovers of a killed run are found by that prefix.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from zonewatch.errors import ConfigError, EnvironmentProblem
from zonewatch.lab.state import LabError

TAP_PREFIX = "zwtap"
LAB_NETWORK = ipaddress.IPv4Network("10.213.0.0/16")
ZONE_PREFIXLEN = 30
MAX_INDEX = 255
_TUNTAP_FLAGS = {"no_pi": True, "one_queue": False, "vnet_hdr": False, "multi_queue": False}


@dataclass(slots=True, frozen=True)
class TapAddressing:
    """The names and addresses zone `index` uses."""

    index: int
    tap: str
    host_ip: str
    guest_ip: str
    prefixlen: int
    network: str

    @property
    def mac(self) -> str:
        """The guest NIC's MAC (locally administered, QEMU's 52:54:00 range)."""
        return f"52:54:00:5a:57:{self.index:02x}"


def addressing(index: int) -> TapAddressing:
    if not 0 <= index <= MAX_INDEX:
        raise ConfigError("zone index", f"{index} is outside 0..{MAX_INDEX}")
    base = int(LAB_NETWORK.network_address) + (index << 8)
    network = ipaddress.IPv4Network((base, ZONE_PREFIXLEN))
    return TapAddressing(
        index=index,
        tap=f"{TAP_PREFIX}{index}",
        host_ip=str(network.network_address + 1),
        guest_ip=str(network.network_address + 2),
        prefixlen=ZONE_PREFIXLEN,
        network=str(network),
    )


def _ipr() -> IPRoute:
    try:
        return IPRoute()
    except OSError as exc:
        raise EnvironmentProblem("netlink", f"cannot open a route socket: {exc}") from exc


def _lookup(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def tap_exists(name: str) -> bool:
    with _ipr() as ipr:
        return _lookup(ipr, name) is not None


def check_addresses_free(name: str, host_ip: str, prefixlen: int = ZONE_PREFIXLEN) -> None:
    """Refuse to use a /30 that an interface other than our tap already has an address in."""
    net = ipaddress.IPv4Network(f"{host_ip}/{prefixlen}", strict=False)
    with _ipr() as ipr:
        names = {int(link["index"]): str(link.get("ifname")) for link in ipr.get_links()}
        for addr in ipr.get_addr(family=2):
            owner = names.get(int(addr["index"]), "?")
            ip = ipaddress.IPv4Address(str(addr.get("address")))
            if ip in net and owner != name:
                raise EnvironmentProblem(
                    owner, f"already holds {ip}, inside the lab subnet {net}; pick another index"
                )


def disable_ipv6(name: str) -> None:
    """Switch IPv6 off on host interface `name` (no solicitations or DAD towards a guest)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1\n")


def create_tap(name: str, host_ip: str, prefixlen: int = ZONE_PREFIXLEN) -> int:
    """Create persistent tap `name` (mode tap), give it `host_ip/prefixlen`, bring it up.

    IPv6 is switched off on it so that the host sends no solicitations to the guest.
    Returns the interface index; raises LabError if the tap already exists."""
    if len(name) > 15:
        raise ConfigError("tap name", f"{name!r} is longer than 15 characters")
    check_addresses_free(name, host_ip, prefixlen)
    with _ipr() as ipr:
        if _lookup(ipr, name) is not None:
            raise LabError(name, "tap already exists")
        try:
            ipr.link("add", ifname=name, kind="tuntap", mode="tap", ifr=dict(_TUNTAP_FLAGS))
        except (NetlinkError, OSError) as exc:
            raise EnvironmentProblem(name, f"cannot create the tap: {exc}") from exc
        index = _lookup(ipr, name)
        if index is None:
            raise LabError(name, "tap vanished right after creation")
        try:
            disable_ipv6(name)
            ipr.addr("add", index=index, address=host_ip, prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")
        except (NetlinkError, OSError) as exc:
            with contextlib.suppress(NetlinkError, OSError):
                ipr.link("del", index=index)
            raise LabError(name, f"cannot configure the tap: {exc}") from exc
        return index


def delete_tap(name: str) -> bool:
    """Delete the tap; False if there was none."""
    with _ipr() as ipr:
        try:
            ipr.link("del", ifname=name)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise LabError(name, f"cannot delete the tap: {exc}") from exc
    return True


def list_taps(prefix: str = TAP_PREFIX) -> list[str]:
    """Names of the host's interfaces that start with `prefix` (the lab's taps)."""
    with _ipr() as ipr:
        names = [str(link.get("ifname")) for link in ipr.get_links()]
    return sorted(n for n in names if n.startswith(prefix))


def delete_taps(prefix: str = TAP_PREFIX) -> list[str]:
    """Delete every interface named `prefix*`; returns the names deleted."""
    return [name for name in list_taps(prefix) if delete_tap(name)]


def tap_addresses(name: str) -> list[str]:
    """The tap's IPv4 addresses as `ip/prefixlen` (empty if the tap does not exist)."""
    with _ipr() as ipr:
        index = _lookup(ipr, name)
        if index is None:
            return []
        return [
            f"{addr.get('address')}/{addr['prefixlen']}"
            for addr in ipr.get_addr(family=2, index=index)
        ]
