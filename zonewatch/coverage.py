"""Which channels see each zone, and why a channel doesn't: no silent blind spots.

One verdict per (zone, channel): `seen`, `none` (the zone has nothing there: no tap, no
share) or `blind` with a reason code from the fixed set REASONS (bounded metric labels)
and a text saying what exactly. The agent builds it from what its probes report
(`from_probes`); `zonewatch zones`, which runs no probe, checks what it can from here
(`standalone`): it enters each zone's network namespace as the net probe would and looks
for the tap there.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from zonewatch.model import NetNs, Zone, ZoneRef
from zonewatch.probes.netns import Namespace, own_inode

CHANNELS = ("kvm", "net", "file", "proc", "sched")


class State(enum.StrEnum):
    SEEN = "seen"
    NONE = "none"  # nothing of the zone's on this channel to see
    BLIND = "blind"


# Reason code -> what it means. The net probe's causes keep their names.
REASONS: dict[str, str] = {
    "not_attached": "the channel's probe is not attached on this host (zonewatch doctor)",
    "netns": "the tap's network namespace cannot be entered",
    "tap_missing": "no such tap in the zone's network namespace",
    "tc_refused": "tc refused the filters on the tap",
    "slots_full": "every zone slot of the net probe is taken",
    "ifindex_clash": "another zone's device at the same (namespace, ifindex)",
    "no_rx_hook": "frames to the zone are unseen (no device redirects to its tap)",
    "no_vcpu": "no vCPU thread of the zone seen yet",
    "no_backend": "a virtio-fs share whose virtiofsd was not found",
    "other": "a cause this version does not name",
}


@dataclass(slots=True, frozen=True)
class Verdict:
    channel: str
    state: State
    reason: str = ""  # a key of REASONS when blind
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        out = {"state": str(self.state)}
        if self.reason:
            out["reason"] = self.reason
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(slots=True, frozen=True)
class ZoneCoverage:
    zone: ZoneRef
    verdicts: tuple[Verdict, ...]

    def blind(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.state is State.BLIND]

    def to_json(self) -> dict[str, dict[str, str]]:
        return {v.channel: v.to_json() for v in self.verdicts}


def reason_code(cause: str) -> str:
    """A probe's cause as a code of REASONS (anything else is `other`: labels stay bounded)."""
    return cause if cause in REASONS else "other"


def _file(zone: Zone) -> Verdict:
    """9p (and crosvm's own virtio-fs) is served by the VMM; a vhost-user virtio-fs share by
    a virtiofsd, whose folder the inventory fills in once it finds it: until then the
    share's host path is empty and its file operations are nobody's."""
    if not zone.shares:
        return Verdict("file", State.NONE, detail="no shares")
    orphans = [s.tag for s in zone.shares if s.backend == "virtiofs" and not s.host_path]
    if orphans:
        return Verdict("file", State.BLIND, "no_backend", f"no virtiofsd for {', '.join(orphans)}")
    return Verdict("file", State.SEEN)


def _sched(zone: Zone) -> Verdict:
    if not zone.vcpu_tids:
        return Verdict("sched", State.BLIND, "no_vcpu", REASONS["no_vcpu"])
    return Verdict("sched", State.SEEN)


def _net(zone: Zone, net_causes: Mapping[str, str] | None) -> Verdict:
    if not zone.taps:
        return Verdict("net", State.NONE, detail="no tap")
    if net_causes:
        cause = min(net_causes)  # one reason per zone and channel; detail says all
        detail = "; ".join(net_causes[c] for c in sorted(net_causes))
        return Verdict("net", State.BLIND, reason_code(cause), detail)
    return Verdict("net", State.SEEN)


def _channels(zone: Zone, net: Verdict, attached: Collection[str] | None) -> ZoneCoverage:
    by_channel = {
        "kvm": Verdict("kvm", State.SEEN),  # the VMM's pid, known from /proc
        "net": net,
        "file": _file(zone),
        "proc": Verdict("proc", State.SEEN),
        "sched": _sched(zone),
    }
    verdicts = []
    for channel in CHANNELS:
        v = by_channel[channel]
        if attached is not None and channel not in attached and v.state is not State.NONE:
            v = Verdict(channel, State.BLIND, "not_attached", REASONS["not_attached"])
        verdicts.append(v)
    return ZoneCoverage(zone.ref, tuple(verdicts))


def from_probes(
    zones: Sequence[Zone],
    attached: Collection[str],
    net_causes: Mapping[int, Mapping[str, str]],
) -> list[ZoneCoverage]:
    """Coverage as the running agent has it: probes attached (by name) and the net probe's
    blind spots (zone key -> cause -> why, NetProbe.blind_causes())."""
    return [_channels(z, _net(z, net_causes.get(z.key)), attached) for z in zones]


TapLookup = Callable[[NetNs | None], set[str]]


def links_in(netns: NetNs | None) -> set[str]:
    """The device names in a namespace (None: the caller's own), entered as the net probe
    enters it (Namespace: by the VMM's /proc/PID/ns/net, never creating one). Raises
    OSError when it cannot be entered."""
    from pyroute2.netlink.exceptions import NetlinkError

    ns = Namespace.own() if netns is None or netns.inode == own_inode() else Namespace.open(netns)
    try:
        with ns.route() as ipr:
            return {str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
    except NetlinkError as exc:
        raise OSError(exc.code, str(exc)) from exc
    finally:
        ns.close()


def standalone_net(zone: Zone, lookup: TapLookup = links_in) -> Verdict:
    """What `zonewatch zones` can tell of the net channel without the probe: whether the
    zone's namespace can be entered and its taps are there."""
    if not zone.taps:
        return Verdict("net", State.NONE, detail="no tap")
    where = f"netns {zone.netns.inode}" if zone.netns else "the host's network namespace"
    try:
        links = lookup(zone.netns)
    except OSError as exc:  # pyroute2's failed setns, a VMM gone: one line, with errno
        return Verdict("net", State.BLIND, "netns", f"{where}: cannot enter it: {exc}")
    missing = [t for t in zone.taps if t not in links]
    if missing:
        return Verdict("net", State.BLIND, "tap_missing", f"{', '.join(missing)} not in {where}")
    return Verdict("net", State.SEEN, detail=f"{', '.join(zone.taps)} in {where}")


def standalone(zones: Sequence[Zone], lookup: TapLookup = links_in) -> list[ZoneCoverage]:
    """Coverage as far as it can be told without loading probes (`zonewatch zones`)."""
    return [_channels(z, standalone_net(z, lookup), None) for z in zones]


def blind_keys(coverage: Sequence[ZoneCoverage]) -> set[tuple[str, str]]:
    """The (channel, reason) causes some zone is blind by."""
    return {(v.channel, v.reason) for c in coverage for v in c.blind()}
