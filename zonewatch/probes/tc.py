"""The net channel's tc filters: where a tap's traffic can be seen, and ours placed there.

A device's ingress slot (qdisc parent ffff:fff1) holds nothing, `clsact` or `ingress`:
- nothing: we add `clsact` and remove it again when ours were its only filters;
- `clsact` (ours or another owner's): the zone's sends are seen on its ingress hook
  (ffff:fff2), what it is sent on its egress hook (ffff:fff3);
- `ingress` (Kata's "tcfilter" model: a u32 filter on the tap redirecting every frame to the
  pod's eth0, and one on eth0 redirecting back): the zone's sends are seen on it (parent
  ffff:). It has no egress hook: what the zone is sent is seen on the ingress of the device
  whose filters redirect to the tap (eth0), before the redirect, and so counted once.
Our filters go at a priority before the owner's first one and return TC_ACT_UNSPEC: the
owner's filters still run after ours and decide every frame's fate, as without us. We never
replace or delete a qdisc or filter we did not create.

Ours are recognised by name: `zw_net_zone_tx:<pid>:<start time>` (and `_rx`). Filters whose
owner is no longer running (an agent killed with SIGKILL leaves them) are removed by
clear_leftovers(), in each namespace the probe enters.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zonewatch.inventory import procfs

INGRESS_SLOT = 0xFFFFFFF1  # TC_H_INGRESS: where `ingress` and `clsact` qdiscs sit
CLSACT_INGRESS = 0xFFFFFFF2  # clsact's hooks: what the device receives...
CLSACT_EGRESS = 0xFFFFFFF3  # ...and what it sends
INGRESS_QDISC = 0xFFFF0000  # an `ingress` qdisc's only hook (handle ffff:)
ETH_P_ALL = 0x0003
FILTER_PRIO = 0x5A57  # "ZW": our priority where no owner's filter comes before it
FILTER_PREFIX = "zw_net_"
TX_PROGRAM, RX_PROGRAM = "zw_net_zone_tx", "zw_net_zone_rx"
# tc_mirred eaction: the frame leaves by the target's egress (redirected, or a copy).
MIRRED_TO_EGRESS = (1, 2)  # TCA_EGRESS_REDIR, TCA_EGRESS_MIRROR
_NLA_DEPTH_MAX = 8  # filter messages nest actions a few levels deep; never follow further


class Unwatchable(Exception):
    """tc offers no place to watch this device without getting in the owner's way."""


@dataclass(slots=True, frozen=True)
class Hook:
    """One of our filters: the device, the tc parent it hangs from, and which program."""

    ifindex: int
    parent: int
    program: str


@dataclass(slots=True, frozen=True)
class Placed:
    hook: Hook
    prio: int


@dataclass(slots=True, frozen=True)
class Plan:
    """Where a tap's traffic is seen. `rx` is None when nothing shows what the zone is
    sent (`rx_missing` says why)."""

    tx: Hook
    rx: Hook | None
    create_clsact: bool = False
    rx_missing: str = ""

    @property
    def hooks(self) -> tuple[Hook, ...]:
        return (self.tx,) if self.rx is None else (self.tx, self.rx)


def slot_kind(ipr: Any, index: int) -> str | None:
    """The kind of qdisc in the device's ingress slot (None when it is free)."""
    for q in ipr.get_qdiscs(index=index):
        if q["index"] == index and q["parent"] == INGRESS_SLOT:
            return str(q.get_attr("TCA_KIND"))
    return None


def receive_hook(kind: str | None) -> int | None:
    """The parent of the hook that sees what a device receives, for a slot of this kind."""
    return {"clsact": CLSACT_INGRESS, "ingress": INGRESS_QDISC}.get(kind or "")


def filters(ipr: Any, index: int, parent: int) -> Iterator[Any]:
    """Every filter on the hook (not the chain heads each filter kind also reports)."""
    for msg in ipr.get_filters(index=index, parent=parent):
        if msg["handle"]:
            yield msg


def filter_name(msg: Any) -> str:
    options = msg.get_attr("TCA_OPTIONS")
    if msg.get_attr("TCA_KIND") != "bpf" or not options:
        return ""
    return str(options.get_attr("TCA_BPF_NAME") or "")


def is_zonewatch(msg: Any) -> bool:
    """A filter of a zonewatch agent (this one, another live one, or a dead one's)."""
    return filter_name(msg).startswith(FILTER_PREFIX)


def _nested(nla: Any, name: str, depth: int = 0) -> Iterator[Any]:
    """Values of every attribute called `name` at any depth of a netlink message."""
    if depth > _NLA_DEPTH_MAX or not hasattr(nla, "get"):
        return
    for attr in nla.get("attrs") or ():
        key, value = attr[0], attr[1]
        if key == name:
            yield value
        else:
            yield from _nested(value, name, depth + 1)


def mirred_targets(msg: Any) -> set[int]:
    """Devices a filter's mirred actions send frames out of."""
    return {
        int(parms["ifindex"])
        for parms in _nested(msg, "TCA_MIRRED_PARMS")
        if parms["eaction"] in MIRRED_TO_EGRESS
    }


def redirecting_device(ipr: Any, tap: int) -> int | None:
    """The device whose received frames the owner's filters send out of the tap (a Kata
    pod's eth0): what it receives there is what the zone is sent."""
    for q in ipr.get_qdiscs():
        index, parent = int(q["index"]), receive_hook(str(q.get_attr("TCA_KIND")))
        if index == tap or q["parent"] != INGRESS_SLOT or parent is None:
            continue
        if any(tap in mirred_targets(msg) for msg in filters(ipr, index, parent)):
            return index
    return None


def plan(ipr: Any, tap: int) -> Plan:
    """Where to watch the tap, from the qdisc its owner left in its ingress slot."""
    kind = slot_kind(ipr, tap)
    if kind is None or kind == "clsact":
        return Plan(
            Hook(tap, CLSACT_INGRESS, TX_PROGRAM),
            Hook(tap, CLSACT_EGRESS, RX_PROGRAM),
            create_clsact=kind is None,
        )
    if kind != "ingress":
        raise Unwatchable(f"its ingress slot holds a {kind!r} qdisc")
    tx = Hook(tap, INGRESS_QDISC, TX_PROGRAM)
    peer = redirecting_device(ipr, tap)
    if peer is None:
        why = "the tap has an `ingress` qdisc (no egress hook) and no device redirects to it"
        return Plan(tx, None, rx_missing=why)
    parent = receive_hook(slot_kind(ipr, peer))
    assert parent is not None  # redirecting_device only looks at devices with a hook
    return Plan(tx, Hook(peer, parent, RX_PROGRAM))


def prio_before_owners(ipr: Any, hook: Hook) -> int:
    """Our priority on the hook: FILTER_PRIO, or just before the owner's first filter (a
    filter that ends classification would otherwise keep ours from ever running)."""
    owners = [
        m["info"] >> 16 for m in filters(ipr, hook.ifindex, hook.parent) if not is_zonewatch(m)
    ]
    first = min(owners, default=FILTER_PRIO + 1)
    if first > FILTER_PRIO:
        return FILTER_PRIO
    if first <= 1:
        raise Unwatchable(f"the owner's first filter on ifindex {hook.ifindex} has priority 1")
    return int(first) - 1


def _owner_tag(pid: int) -> str:
    stat = procfs.read_stat(Path("/proc"), pid)
    return f"{pid}:{stat.start_time if stat else 0}"


def _owner_alive(tag: str) -> bool:
    pid_text, _, start_text = tag.partition(":")
    if not pid_text.isdigit():
        return False
    stat = procfs.read_stat(Path("/proc"), int(pid_text))
    return stat is not None and str(stat.start_time) == start_text


def gone(exc: Exception) -> bool:
    """The device or filter is already gone (a tap deleted with its zone)."""
    return getattr(exc, "code", None) in (errno.ENODEV, errno.ENOENT, errno.EINVAL)


class TcFilters:
    """Our bpf filters: placed on hooks, and removed exactly (by handle and priority)."""

    def __init__(self) -> None:
        self._tag = _owner_tag(os.getpid())
        # Two agents (or a test's probe beside an agent) may watch the same host: each
        # gets its own handle.
        self.handle = 1 + os.getpid() % 0xFFFE

    def name(self, program: str) -> str:
        return f"{program}:{self._tag}"

    def add(self, ipr: Any, plan: Plan, fds: dict[str, int]) -> list[Placed]:
        """Our filters (program name -> fd) on the plan's hooks (and clsact where the slot is
        free); all or none."""
        from pyroute2.netlink.exceptions import NetlinkError

        if plan.create_clsact:
            ipr.tc("add", "clsact", plan.tx.ifindex)
        placed: list[Placed] = []
        try:
            for hook in plan.hooks:
                prio = prio_before_owners(ipr, hook)
                ipr.tc(
                    "add-filter", "bpf", hook.ifindex, self.handle, fd=fds[hook.program],
                    name=self.name(hook.program), parent=hook.parent, classid=1,
                    direct_action=True, prio=prio, protocol=ETH_P_ALL,
                )  # fmt: skip
                placed.append(Placed(hook, prio))
        except (NetlinkError, Unwatchable):
            with contextlib.suppress(NetlinkError):
                self.remove(ipr, placed, plan.tx.ifindex if plan.create_clsact else None)
            raise
        return placed

    def remove(self, ipr: Any, placed: list[Placed], created_clsact: int | None) -> None:
        """Remove our filters, and the clsact we added when nobody else's filter is on it."""
        from pyroute2.netlink.exceptions import NetlinkError

        for p in placed:
            try:
                ipr.tc(
                    "del-filter", "bpf", p.hook.ifindex, self.handle, parent=p.hook.parent,
                    prio=p.prio, protocol=ETH_P_ALL,
                )  # fmt: skip
            except NetlinkError as exc:
                if not gone(exc):
                    raise
        if created_clsact is not None:
            with contextlib.suppress(NetlinkError):
                hooks = (CLSACT_INGRESS, CLSACT_EGRESS)
                if not any(True for h in hooks for _ in filters(ipr, created_clsact, h)):
                    ipr.tc("del", "clsact", created_clsact)


def clear_leftovers(ipr: Any) -> int:
    """Remove filters of ours whose owning process is gone, on every device of the
    namespace; returns how many. Filters of other owners, and of live agents, stay."""
    from pyroute2.netlink.exceptions import NetlinkError

    removed = 0
    hooks = {"clsact": (CLSACT_INGRESS, CLSACT_EGRESS), "ingress": (INGRESS_QDISC,)}
    for q in ipr.get_qdiscs():
        if q["parent"] != INGRESS_SLOT:
            continue
        index = int(q["index"])
        for parent in hooks.get(str(q.get_attr("TCA_KIND")), ()):
            try:
                found = [m for m in filters(ipr, index, parent) if is_zonewatch(m)]
            except NetlinkError:
                continue  # the device went away meanwhile
            for msg in found:
                if _owner_alive(filter_name(msg).partition(":")[2]):
                    continue
                try:
                    ipr.tc(
                        "del-filter", "bpf", index, msg["handle"], parent=parent,
                        prio=msg["info"] >> 16, protocol=ETH_P_ALL,
                    )  # fmt: skip
                    removed += 1
                except NetlinkError as exc:
                    if not gone(exc):
                        raise
    return removed
