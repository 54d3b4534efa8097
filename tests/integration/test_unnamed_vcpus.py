"""vCPU threads found by what they do: a micro-VMM whose threads all keep the process comm,
as Kata's QEMU runs without debug-threads.

bpf/kvm.c gives every zone thread that returns from KVM_RUN a state; the kvm probe reports
those threads, the inventory merges them into the zone's vCPU threads, and the sched probe
then times them like named ones. Checked live: the unnamed vCPU is learned within two
seconds, a hog on its core shows as run delay in the zone's stats, its tid leaves every map
when the VMM exits; a named micro-VMM beside it is known by name from the first scan, as
before. Through the agent (`zonewatch run`), an unnamed zone's stats lines carry its vCPU
and nonzero sched numbers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

from tests.helpers.agent import AgentProcess, Line
from tests.helpers.cpu import hog_on, vcpu_alone_on_a_core
from tests.helpers.microvms import MicroVmFactory
from zonewatch.aggregate import Aggregator
from zonewatch.inventory import Inventory
from zonewatch.lab import microvm as mv
from zonewatch.lab.microvm import MicroVmProcess
from zonewatch.model import Zone, ZoneStats
from zonewatch.probes.kvm import LEAN_TRACEPOINTS, KvmProbe
from zonewatch.probes.sched import NO_VCPU_SEEN, SchedProbe

pytestmark = pytest.mark.skipif(
    not os.access(mv.KVM_DEVICE, os.R_OK | os.W_OK) or len(os.sched_getaffinity(0)) < 2,
    reason="needs read-write /dev/kvm and two CPUs",
)

LEARN_S = 2.0  # an unnamed vCPU is known this soon after its VMM became a zone
WINDOW_S = 2.0


@pytest.fixture(scope="module")
def probes() -> Iterator[tuple[KvmProbe, SchedProbe]]:
    kvm, sched = KvmProbe(tracepoints=LEAN_TRACEPOINTS), SchedProbe()
    kvm.attach()
    try:
        sched.attach()
        try:
            yield kvm, sched
        finally:
            sched.detach()
    finally:
        kvm.detach()


class Scan:
    """What the agent does at each rescan, for this test's own VMMs only (the host may run
    other zones): the threads the kvm probe saw run KVM_RUN go to the inventory, the
    inventory's zones to both probes."""

    def __init__(self, kvm: KvmProbe, sched: SchedProbe, pids: Collection[int]) -> None:
        self.kvm, self.sched, self.pids = kvm, sched, set(pids)
        self.inventory = Inventory()

    def __call__(self) -> dict[int, Zone]:
        """The test's zones by VMM pid, after one rescan."""
        self.inventory.observe_vcpu_threads(self.kvm.vcpu_threads())
        self.inventory.refresh()
        zones = [z for z in self.inventory.zones.values() if z.pid in self.pids]
        self.kvm.set_zones(zones)
        self.sched.set_zones(zones)
        return {z.pid: z for z in zones}

    def clear(self) -> None:
        self.kvm.set_zones([])
        self.sched.set_zones([])


def map_tids(probe: KvmProbe | SchedProbe, name: str) -> set[int]:
    table = probe.bpf[name.encode()]
    return {k if isinstance(k, int) else k.value for k in table}


def test_an_unnamed_vcpu_is_learned_timed_and_forgotten(
    probes: tuple[KvmProbe, SchedProbe], microvm: MicroVmFactory
) -> None:
    kvm, sched = probes
    unnamed = microvm("unnamed", rate=0, unnamed_threads=True)
    named = microvm("named", rate=500)
    tid = unnamed.wait_stats(lambda s: s["vcpu_tid"] and s["iterations"] > 0, 20)["vcpu_tid"]
    named_tid = named.wait_stats(lambda s: s["vcpu_tid"] and s["iterations"] > 0, 20)["vcpu_tid"]
    scan = Scan(kvm, sched, {unnamed.pid, named.pid})
    try:
        with vcpu_alone_on_a_core(unnamed.pid, tid) as core:
            # The first scan: the named vCPU is known by its name, the unnamed one not yet.
            became_zone = time.monotonic()
            zones = scan()
            assert zones[named.pid].vcpu_tids == (named_tid,)
            assert zones[unnamed.pid].vcpu_tids == ()
            key = zones[unnamed.pid].key
            assert sched.blind_spots() == {key: NO_VCPU_SEEN}

            # Rescans (the agent's come every 0.5 s) until the kvm probe has seen it run.
            while (zones := scan())[unnamed.pid].vcpu_tids != (tid,):
                assert time.monotonic() - became_zone < LEARN_S, zones[unnamed.pid]
                time.sleep(0.05)
            learned_s = time.monotonic() - became_zone
            assert kvm.vcpu_threads()[tid] == key
            assert zones[named.pid].vcpu_tids == (named_tid,)  # seen too, still one vCPU
            assert sched.blind_spots() == {}
            assert tid in map_tids(sched, "zone_tids")

            # A hog on the vCPU's core: the zone's stats show the vCPU waiting for it.
            with hog_on(core):
                stats = window_stats(kvm, sched, unnamed, list(zones.values()))
    finally:
        scan.clear()

    mine, theirs = stats[unnamed.pid], stats[named.pid]
    report = (
        f"learned in {learned_s:.2f} s; unnamed: vcpus {mine.vcpus}, run delay p50 "
        f"{mine.run_delay_p50_us:.0f} us p99 {mine.run_delay_p99_us:.0f} us, waiting "
        f"{mine.run_delay_pct:.1f}%, cpu {mine.cpu_pct:.0f}%; named: vcpus {theirs.vcpus}, "
        f"{sum(theirs.run_delay_hist_ns.values())} waits"
    )
    print(report)
    assert mine.vcpus == 1 and theirs.vcpus == 1, report
    assert sum(mine.run_delay_hist_ns.values()) >= 50, report  # preempted again and again
    assert mine.run_delay_p99_us >= 1000, report  # waits of a scheduler slice
    assert mine.run_delay_pct >= 10, report  # the hog took a real share of its core
    assert mine.userspace_exits_per_s > 1000, report
    assert sum(theirs.run_delay_hist_ns.values()) > 0, report  # paced: woken at each pause

    # The VMM exits: its vCPU's state, and so its tid, leave the kernel's maps and the zone.
    unnamed.stop()
    assert tid not in kvm.vcpu_threads()
    zones = scan()
    try:
        assert unnamed.pid not in zones
        assert zones[named.pid].vcpu_tids == (named_tid,)
        for probe in (kvm, sched):
            assert tid not in map_tids(probe, "zone_tids")
    finally:
        scan.clear()


def window_stats(
    kvm: KvmProbe, sched: SchedProbe, vm: MicroVmProcess, zones: list[Zone]
) -> dict[int, ZoneStats]:
    """Each zone's stats (as the agent's stats lines hold them) over WINDOW_S seconds of the
    VMM's run, measured on its own clock."""
    aggregator = Aggregator([kvm, sched])
    start = vm.wait_stats(lambda s: True, 10)
    vm.wait_stats(lambda s: s["elapsed_s"] >= start["elapsed_s"] + WINDOW_S, 30)
    pids = {z.id: z.pid for z in zones}
    return {pids[s.zone.id]: s for s in aggregator.snapshot(zones)}


def stats_of(lines: list[Line], zone: str) -> list[Line]:
    return [x for x in lines if x["type"] == "stats" and x["zone"]["name"] == zone]


def test_the_agent_reports_an_unnamed_zones_vcpu_and_its_run_delay(tmp_path: Path) -> None:
    with MicroVmProcess("kata-like", rate=2000, unnamed_threads=True,
                        stats=tmp_path / "vm.json") as vm:  # fmt: skip
        tid = vm.wait_stats(lambda s: s["vcpu_tid"] and s["iterations"] > 0, 20)["vcpu_tid"]
        assert Path(f"/proc/{vm.pid}/task/{tid}/comm").read_text().strip() == mv.PROCESS_COMM
        with AgentProcess(tmp_path, "--stats-interval", "1") as agent:

            def known(lines: list[Line]) -> bool:
                return any(s["kvm"]["vcpus"] == 1 for s in stats_of(lines, "kata-like"))

            agent.wait_for(known, 30, "the unnamed zone's vCPU")
            seen = stats_of(agent.lines, "kata-like")
            # Known from the first line or soon after (a rescan every 0.5 s).
            assert [s["kvm"]["vcpus"] for s in seen].index(1) <= 2, seen
            # Then every line carries it, and whole intervals of run delay.
            agent.wait_for(lambda ls: len(stats_of(ls, "kata-like")) >= len(seen) + 3, 30,
                           "three more stats lines")  # fmt: skip
            later = stats_of(agent.lines, "kata-like")[len(seen) :]
    report = "; ".join(
        f"vcpus {s['kvm']['vcpus']}, exits/s {s['kvm']['userspace_exits_per_s']:.0f}, "
        f"run delay p50 {s['sched']['run_delay_p50_us']} us, waits "
        f"{sum(s['sched']['run_delay_hist_ns'].values())}, cpu {s['sched']['cpu_pct']}%"
        for s in later
    )
    print(report)
    for s in later:
        assert s["kvm"]["vcpus"] == 1, report
        assert s["kvm"]["userspace_exits_per_s"] > 1000, report
        # Paced at 2000 iterations/s, the vCPU sleeps and is woken thousands of times a
        # second: each wake-up is a wait timed, none of which the agent saw before.
        assert sum(s["sched"]["run_delay_hist_ns"].values()) > 100, report
        assert s["sched"]["run_delay_p50_us"] > 0, report
        assert s["sched"]["cpu_pct"] > 0, report
