"""Zone addresses learned from taps (net.ZoneAddresses) and handed to the rules by the agent:
bounded per zone, first claim kept, dropped with the zone."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from zonewatch.agent import Agent
from zonewatch.inventory import Inventory
from zonewatch.model import Vmm, Zone, ZoneRef
from zonewatch.probes.net import ZoneAddresses


def zone(key: int, tenant: str) -> Zone:
    return Zone(id=f"z{key}", key=key, name=f"zone-{key}", tenant=tenant, vmm=Vmm.QEMU,
                pid=1000 + key, start_time=0)  # fmt: skip


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def test_learned_addresses_map_to_their_zone_and_go_with_it() -> None:
    a, b = zone(1, "acme"), zone(2, "globex")
    addrs = ZoneAddresses()
    addrs.set_zones([a, b])
    addrs.learn(1, ip("10.213.60.2"))
    addrs.learn(2, ip("10.213.61.2"))
    addrs.learn(2, ip("fd00::2"))
    assert addrs.view == {"10.213.60.2": a.ref, "10.213.61.2": b.ref, "fd00::2": b.ref}
    addrs.set_zones([a])
    assert addrs.view == {"10.213.60.2": a.ref}


def test_addresses_no_zone_can_be_reached_at_are_not_learned() -> None:
    addrs = ZoneAddresses()
    addrs.set_zones([zone(1, "acme")])
    for text in ("0.0.0.0", "255.255.255.255", "224.0.0.1", "169.254.1.1", "127.0.0.1",
                 "fe80::1", "::"):  # fmt: skip
        addrs.learn(1, ip(text))
    addrs.learn(9, ip("10.0.0.9"))  # a zone key the inventory does not know
    assert addrs.view == {}


def test_first_claim_wins_over_a_spoofing_zone() -> None:
    a, b = zone(1, "acme"), zone(2, "globex")
    addrs = ZoneAddresses()
    addrs.set_zones([a, b])
    addrs.learn(1, ip("10.0.0.2"))
    addrs.learn(2, ip("10.0.0.2"))  # b sends with a's source address
    assert addrs.view["10.0.0.2"] == a.ref
    addrs.set_zones([b])  # a is gone: the address is free again
    addrs.learn(2, ip("10.0.0.2"))
    assert addrs.view["10.0.0.2"] == b.ref


def test_each_zone_keeps_its_most_recent_addresses() -> None:
    addrs = ZoneAddresses(per_zone=3)
    addrs.set_zones([zone(1, "acme")])
    for last in (1, 2, 3, 1, 4):  # .1 seen again before .4 arrives: .2 is the oldest
        addrs.learn(1, ip(f"10.0.0.{last}"))
    assert sorted(addrs.view) == ["10.0.0.1", "10.0.0.3", "10.0.0.4"]


def test_a_renamed_or_retenanted_zone_updates_its_addresses() -> None:
    addrs = ZoneAddresses()
    addrs.set_zones([zone(1, "acme")])
    addrs.learn(1, ip("10.0.0.2"))
    addrs.set_zones([zone(1, "globex")])
    assert addrs.view["10.0.0.2"] == ZoneRef("z1", "zone-1", "globex", "qemu")


def test_agent_gives_the_rules_its_net_probe_addresses() -> None:
    from zonewatch.probes.net import NetProbe
    from zonewatch.rules.engine import RuleSet

    net = NetProbe()
    a = zone(1, "acme")
    net.addresses.set_zones([a])
    net.addresses.learn(1, ip("10.213.60.2"))
    rules = RuleSet([Path(__file__).resolve().parents[2] / "rules"])
    agent = Agent(Inventory(), [net], [], rules=rules)
    assert agent.zone_addresses() == {"10.213.60.2": a.ref}
    assert rules.context.zone_addresses() == {"10.213.60.2": a.ref}
    assert rules.engine.context.zone_addresses() == {"10.213.60.2": a.ref}
