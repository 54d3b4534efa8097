"""Each zone's IP addresses, learned by the net channel from what its guest sent."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from zonewatch.model import Zone, ZoneRef

CACHE_MAX = 4096  # distinct raw addresses remembered; emptied when full

MAX_ADDRESSES_PER_ZONE = 16


def _reachable(raw_ip: bytes) -> str:
    """An address as text, or "" when no other zone could reach this one at it."""
    if len(raw_ip) not in (4, 16):
        return ""
    ip = ipaddress.ip_address(raw_ip)
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.is_loopback:
        return ""
    if ip.is_reserved:  # 255.255.255.255 among them
        return ""
    return str(ip)


class ZoneAddresses:
    """Each zone's IP addresses, learned from its tap: the source of what the guest sent.

    What rules read as net.dst_zone / net.dst_tenant / net.dst_other_tenant. Bounded per
    zone (the least recently seen goes first) and dropped with the zone. The first zone to
    use an address keeps it while it lives: a guest spoofing another zone's source address
    cannot take that address over (nor pass its own traffic off as the other tenant's).
    """

    def __init__(self, per_zone: int = MAX_ADDRESSES_PER_ZONE) -> None:
        self._per_zone = per_zone
        self._refs: dict[int, ZoneRef] = {}
        self._by_zone: dict[int, dict[str, None]] = {}  # insertion order = recency
        self._owner: dict[str, int] = {}
        self.view: dict[str, ZoneRef] = {}  # ip -> zone: handed to the rules as is
        self._usable: dict[bytes, str] = {}  # raw address -> _reachable(raw)

    def set_zones(self, zones: Sequence[Zone]) -> None:
        self._refs = {z.key: z.ref for z in zones}
        for key in self._by_zone.keys() - self._refs.keys():
            for ip in self._by_zone.pop(key):
                del self._owner[ip]
                del self.view[ip]
        for ip, key in self._owner.items():  # a zone's name or tenant may have changed
            self.view[ip] = self._refs[key]

    def learn(self, zone_key: int, raw_ip: bytes) -> None:
        ref = self._refs.get(zone_key)
        if ref is None:
            return
        text = self._usable.get(raw_ip)
        if text is None:
            if len(self._usable) >= CACHE_MAX:
                self._usable.clear()
            text = self._usable[raw_ip] = _reachable(raw_ip)
        if not text:
            return  # not an address another zone could reach this one at
        owner = self._owner.get(text)
        if owner is not None and owner != zone_key:
            return
        mine = self._by_zone.setdefault(zone_key, {})
        mine.pop(text, None)
        mine[text] = None
        self._owner[text] = zone_key
        self.view[text] = ref
        if len(mine) > self._per_zone:
            oldest = next(iter(mine))
            del mine[oldest]
            del self._owner[oldest]
            del self.view[oldest]
