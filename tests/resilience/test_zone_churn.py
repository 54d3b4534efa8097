"""Zone churn: 100 micro-VMM zones, ten at a time, each holding one of ten persistent taps
(as QEMU's `-netdev tap` does), start and stop under a running agent. Afterwards: no BPF map
entries left for the gone zones, no tc filter or clsact qdisc left on the taps, no zone left
in ListZones or /metrics, and the agent's fds and RSS back within a small bound."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.resilience.support import Agent
from zonewatch.lab import taps
from zonewatch.lab.microvm import MicroVmProcess

ROUNDS = int(os.environ.get("ZW_CHURN_ROUNDS", "10"))
PER_ROUND = 10
TAP = "zwrchurn{}"  # not the lab's zwtap prefix: lab tests may run beside this one
HOST_IP = "10.239.{}.1"  # lab: 10.213/16; other benches: 10.215/16
RSS_SLACK_MIB = 16.0
HASH_MAPS = {"hash", "lru_hash", "percpu_hash", "lru_percpu_hash"}


@pytest.fixture
def tap_names() -> Iterator[list[str]]:
    names = [TAP.format(i) for i in range(PER_ROUND)]
    for name in names:  # a killed earlier run may have left them
        taps.delete_tap(name)
    try:
        for i, name in enumerate(names):
            taps.create_tap(name, HOST_IP.format(i))
        yield names
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                taps.delete_tap(name)


@pytest.fixture
def agent(tmp_path: Path, tokens_file: Path) -> Iterator[Agent]:
    a = Agent(tmp_path, tokens_file, "--no-stats")
    try:
        yield a
    finally:
        a.stop()


def agent_maps(pid: int) -> dict[str, int]:
    """The process's hash-type BPF maps: name#id -> id."""
    ids: set[int] = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            for line in info.read_text().splitlines():
                if line.startswith("map_id:"):
                    ids.add(int(line.split()[1]))
    out: dict[str, int] = {}
    for map_id in sorted(ids):
        meta = bpftool("map", "show", "id", str(map_id))
        if meta["type"] in HASH_MAPS:
            out[f"{meta.get('name', '?')}#{map_id}"] = map_id
    return out


def dump(map_id: int) -> list[Any]:
    """A map's entries as bpftool formats them from BTF: {"key": ..., "value": ...}."""
    return [e["formatted"] for e in bpftool("map", "dump", "id", str(map_id))]


def map_entries(pid: int) -> dict[str, int]:
    return {name: len(dump(i)) for name, i in agent_maps(pid).items()}


ZONE_VALUED = ("zone_pids", "zone_tids")  # id -> zone key (zone_ifs' struct: see walk)
PID_KEYED = ("zone_pids", "spawned", "exit_status")  # tgid -> ...
ZONE_KEYED = ("budget", "zone_keys", "counters")  # zone key -> (kvm's counters: struct key)


def mentions(map_name: str, entry: Any, keys: set[int], pids: set[int]) -> bool:
    """Whether a map entry belongs to one of the zones (by key) or their processes."""
    base = map_name.split("#", maxsplit=1)[0]
    key, value = entry["key"], entry.get("value", entry.get("values"))  # per-CPU: values
    if base in ZONE_VALUED and isinstance(value, int) and value in keys:
        return True
    if base in PID_KEYED and key in pids:
        return True
    if base in ZONE_KEYED and isinstance(key, int) and key in keys:
        return True

    def walk(node: Any, field: str) -> bool:
        if isinstance(node, dict):
            return any(walk(v, k) for k, v in node.items())
        if isinstance(node, list):
            return any(walk(v, field) for v in node)
        if field == "zone_key":
            return node in keys
        return field in ("pid", "tgid") and node in pids

    return walk(key, "") or walk(value, "")


def zone_keys_of(agent_pid: int, pids: set[int]) -> set[int]:
    """The zone keys the agent gave these processes (its zone_pids maps say)."""
    keys: set[int] = set()
    for name, map_id in agent_maps(agent_pid).items():
        if name.startswith("zone_pids#"):
            keys |= {e["value"] for e in dump(map_id) if e["key"] in pids}
    return keys


def leftovers(agent_pid: int, keys: set[int], pids: set[int]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for name, map_id in agent_maps(agent_pid).items():
        found = [e for e in dump(map_id) if mentions(name, e, keys, pids)]
        if found:
            out[name] = found
    return out


def bpftool(*args: str) -> Any:
    out = subprocess.run(["bpftool", "--json", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def tc(*args: str) -> list[Any]:
    out = subprocess.run(["tc", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")  # type: ignore[no-any-return]


def bpf_filters(tap: str) -> list[str]:
    """The names of the bpf filters on the tap's clsact hooks (zonewatch names its filters
    <program>:<agent pid>:<agent start time>)."""
    return [
        f["options"].get("bpf_name", "?")
        for hook in ("ingress", "egress")
        for f in tc("filter", "show", "dev", tap, hook)
        if "options" in f
    ]


def clsact(tap: str) -> int:
    return sum(1 for q in tc("qdisc", "show", "dev", tap) if q.get("kind") == "clsact")


def churn_zones(agent: Agent) -> list[str]:
    """The churned zones the agent lists (other tests' zones may share this host)."""
    _dt, names = agent.timed_list_zones()
    return [n for n in names if n.startswith("churn-")]


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # the agent's own cadence (rescans every 0.5 s): nothing to await


def churn_round(
    agent: Agent, names: list[str], round_no: int, tmp: Path, seen: dict[str, set[Any]]
) -> None:
    """Ten zones up (each on one of the taps), seen with their taps and our filters on
    them, then stopped."""
    ours = f":{agent.proc.pid}:"
    zones = [
        MicroVmProcess(
            f"churn-{round_no}-{i}", rate=50, tap=tap, stats=tmp / f"{round_no}-{i}.json"
        )
        for i, tap in enumerate(names)
    ]
    try:
        for vm in zones:
            vm.start()
        wanted = {vm.config.name for vm in zones}

        def all_up() -> bool:
            listed = {z.ref.name: z for z in agent.client.list_zones(timeout=30)}
            return all(n in listed and listed[n].taps for n in wanted)

        def filtered() -> bool:
            on = [bpf_filters(t) for t in names]
            # Other agents on this host (other test runs) watch these zones too.
            seen["foreign"].update(f for fs in on for f in fs if ours not in f)
            return all(any(ours in f for f in fs) for fs in on)

        wait(all_up, 30, f"round {round_no}'s zones with their taps")
        wait(filtered, 10, "our filters on the taps")
        pids = {vm.pid for vm in zones}
        seen["pids"] |= pids
        keys = zone_keys_of(agent.proc.pid, pids)
        seen["keys"] |= keys
        if round_no == 0:  # the leak check below finds live zones' entries
            assert leftovers(agent.proc.pid, keys, pids)
    finally:
        for vm in zones:
            vm.close()


def test_100_zones_churn_leaves_no_maps_filters_taps_fds_or_memory(
    agent: Agent, tap_names: list[str], tmp_path: Path
) -> None:
    seen: dict[str, set[Any]] = {"foreign": set(), "pids": set(), "keys": set()}
    ours = f":{agent.proc.pid}:"

    def no_filters_of_ours() -> bool:
        return not [f for t in tap_names for f in bpf_filters(t) if ours in f]

    churn_round(agent, tap_names, 0, tmp_path, seen)  # warm-up: lazy state in the baseline
    wait(lambda: not churn_zones(agent), 15, "warm-up zones gone")
    wait(no_filters_of_ours, 10, "warm-up filters gone")
    before = {"fds": agent.fds(), "rss": agent.rss_mib(), "maps": map_entries(agent.proc.pid)}
    started = time.monotonic()
    for r in range(1, ROUNDS + 1):
        churn_round(agent, tap_names, r, tmp_path, seen)
    churn_s = time.monotonic() - started
    assert len(seen["keys"]) == (ROUNDS + 1) * PER_ROUND  # every zone was in the filters
    wait(lambda: not churn_zones(agent), 15, "every churned zone gone")
    wait(no_filters_of_ours, 10, "our filters removed from the taps")
    if not seen["foreign"]:  # the clsact qdiscs the agent made go too (unless shared)
        assert [t for t in tap_names if clsact(t)] == []
    left: dict[str, list[Any]] = {}

    def maps_clean() -> bool:  # gone zones' counters are read once more, then deleted
        left.clear()
        left.update(leftovers(agent.proc.pid, seen["keys"], seen["pids"]))
        return not left

    with contextlib.suppress(AssertionError):
        wait(maps_clean, 10, "the gone zones' map entries deleted")
    assert left == {}, "BPF map entries left for gone zones"
    after = {"fds": agent.fds(), "rss": agent.rss_mib(), "maps": map_entries(agent.proc.pid)}
    assert after["fds"] <= before["fds"], (before["fds"], after["fds"])
    assert after["rss"] <= before["rss"] + RSS_SLACK_MIB, (before["rss"], after["rss"])
    scraped = agent.scrape()
    assert not [k for k in scraped if "churn-" in k], "series left for gone zones"
    assert all(taps.tap_exists(t) for t in tap_names)  # ours to remove (the fixture does)
    assert agent.proc.poll() is None
    print(
        f"{ROUNDS * PER_ROUND} zones in {churn_s:.1f} s; agent fds {before['fds']} -> "
        f"{after['fds']}, RSS {before['rss']:.1f} -> {after['rss']:.1f} MiB; map entries "
        f"{sum(before['maps'].values())} -> {sum(after['maps'].values())} "
        f"in {len(after['maps'])} hash maps; other agents' filters seen: {len(seen['foreign'])}"
    )
