"""Which channels see each zone (zonewatch.coverage): verdicts from what the probes report,
and the standalone net check of `zonewatch zones`, run for real against this process's own
network namespace (entering another one is tested live in tests/e2e/test_visibility.py)."""

from __future__ import annotations

from zonewatch import coverage
from zonewatch.coverage import REASONS, State, Verdict
from zonewatch.model import NetNs, Share, Vmm, Zone
from zonewatch.probes.netns import own_inode

ALL = {"kvm", "net", "file", "proc", "sched"}


def zone(**kw: object) -> Zone:
    base: dict[str, object] = {
        "id": "qemu-10-1", "key": 1, "name": "zone-a", "tenant": "acme", "vmm": Vmm.QEMU,
        "pid": 10, "start_time": 1, "vcpu_tids": (11,), "taps": ("zwtap0",),
    }  # fmt: skip
    base.update(kw)
    return Zone(**base)  # type: ignore[arg-type]


def verdicts(c: coverage.ZoneCoverage) -> dict[str, tuple[str, str]]:
    return {v.channel: (str(v.state), v.reason) for v in c.verdicts}


def test_a_zone_every_attached_probe_sees() -> None:
    (c,) = coverage.from_probes([zone(shares=(Share("s", "/srv", "9p"),))], ALL, {})
    assert verdicts(c) == dict.fromkeys(coverage.CHANNELS, ("seen", ""))
    assert c.blind() == []


def test_nothing_to_see_is_not_a_blind_spot() -> None:
    (c,) = coverage.from_probes([zone(taps=())], ALL - {"net"}, {})
    assert verdicts(c)["net"] == ("none", "")
    assert verdicts(c)["file"] == ("none", "")
    assert c.to_json()["net"] == {"state": "none", "detail": "no tap"}


def test_the_net_probes_causes_become_the_zones_reason() -> None:
    why = "tap0_kata (netns 4026532000): cannot enter it: [Errno 1] failed to open netns"
    (a, b) = coverage.from_probes([zone(), zone(key=2, name="zone-b")], ALL, {1: {"netns": why}})
    assert verdicts(a)["net"] == ("blind", "netns")
    assert a.to_json()["net"] == {"state": "blind", "reason": "netns", "detail": why}
    assert verdicts(b)["net"] == ("seen", "")


def test_an_unknown_cause_keeps_the_labels_bounded() -> None:
    (c,) = coverage.from_probes([zone()], ALL, {1: {"a_new_cause": "x"}})
    assert verdicts(c)["net"] == ("blind", "other")
    assert {v.reason for v in c.blind()} <= REASONS.keys()


def test_a_channel_whose_probe_did_not_attach_is_blind_to_every_zone() -> None:
    (c,) = coverage.from_probes([zone()], ALL - {"kvm", "net"}, {})
    assert verdicts(c)["kvm"] == ("blind", "not_attached")
    assert verdicts(c)["net"] == ("blind", "not_attached")
    assert coverage.blind_keys([c]) == {("kvm", "not_attached"), ("net", "not_attached")}


def test_no_vcpu_seen_yet_and_a_virtiofs_share_without_its_backend() -> None:
    unserved = Share("kataShared", "", "virtiofs")  # as the command line names it
    served = Share("kataShared", "/run/kata-containers/shared/sandboxes/x/shared", "virtiofs")
    orphan = zone(vcpu_tids=(), shares=(unserved,), vmm=Vmm.KATA)
    found = zone(key=2, shares=(served,), helper_pids=(99,), vmm=Vmm.KATA)
    crosvm = zone(key=3, shares=(Share("fs", "/srv", "virtiofs"),), vmm=Vmm.CROSVM)
    a, b, c = coverage.from_probes([orphan, found, crosvm], ALL, {})
    assert verdicts(c)["file"] == ("seen", "")  # crosvm serves its virtio-fs itself
    assert verdicts(a)["sched"] == ("blind", "no_vcpu")
    assert verdicts(a)["file"] == ("blind", "no_backend")
    assert "kataShared" in a.to_json()["file"]["detail"]
    assert verdicts(b)["file"] == ("seen", "")
    assert verdicts(b)["sched"] == ("seen", "")


def test_standalone_finds_a_tap_in_its_own_namespace_for_real() -> None:
    """links_in lists this namespace's devices through pyroute2 (lo is always there)."""
    assert "lo" in coverage.links_in(None)
    seen = coverage.standalone_net(zone(taps=("lo",)))
    assert (seen.state, seen.reason) == (State.SEEN, "")
    missing = coverage.standalone_net(zone(taps=("zw-no-such-tap",)))
    assert (missing.state, missing.reason) == (State.BLIND, "tap_missing")
    assert missing.detail == "zw-no-such-tap not in the host's network namespace"


def test_standalone_says_why_a_namespace_cannot_be_entered() -> None:
    gone = zone(netns=NetNs(own_inode() + 1, "/proc/999999999/ns/net"))
    v = coverage.standalone_net(gone)
    assert (v.state, v.reason) == (State.BLIND, "netns")
    assert v.detail.startswith(f"netns {own_inode() + 1}: cannot enter it: [Errno 2]")
    reused = zone(netns=NetNs(own_inode() + 1, "/proc/self/ns/net"))  # pid reused elsewhere
    v = coverage.standalone_net(reused)
    assert v.reason == "netns" and f"is now namespace {own_inode()}" in v.detail


def test_standalone_channels_without_probes() -> None:
    def no_links(_ns: NetNs | None) -> set[str]:
        return set()

    (c,) = coverage.standalone([zone(vcpu_tids=())], no_links)
    assert verdicts(c) == {
        "kvm": ("seen", ""),
        "net": ("blind", "tap_missing"),
        "file": ("none", ""),
        "proc": ("seen", ""),
        "sched": ("blind", "no_vcpu"),
    }
    assert isinstance(c.verdicts[0], Verdict)
