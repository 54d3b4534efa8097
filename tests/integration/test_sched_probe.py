"""bpf/sched.c loaded for real: a CPU hog on a zone's vCPU core raises its run delay.

One micro-VMM runs flat out with its vCPU thread pinned to one core. First an unloaded
window, then the same window with a busy loop pinned to that core: the zone's run-delay
p99 must rise clearly (the vCPU now waits for the hog's slices), and its vCPU CPU time
must fall. Windows are measured on the VMM's own clock (its stats file), not slept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.cpu import hog_on, vcpu_alone_on_a_core
from zonewatch.lab import microvm as mv
from zonewatch.lab.microvm import MicroVmProcess
from zonewatch.model import Vmm, Zone
from zonewatch.probes.sched import SchedProbe, SchedSnapshot, ZoneSched

pytestmark = pytest.mark.skipif(
    not os.access(mv.KVM_DEVICE, os.R_OK | os.W_OK) or len(os.sched_getaffinity(0)) < 2,
    reason="needs read-write /dev/kvm and two CPUs",
)

ZONE = 61
WINDOW_S = 2.0


@pytest.fixture(scope="module")
def probe() -> Iterator[SchedProbe]:
    p = SchedProbe()
    p.attach()
    try:
        yield p
    finally:
        p.detach()


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[MicroVmProcess]:
    proc = MicroVmProcess("sched", rate=0, pio_per_iter=1, mmio_per_iter=1,
                          stats=tmp_path / "sched.json")  # fmt: skip
    try:
        yield proc.start()
    finally:
        proc.close()


def window(probe: SchedProbe, vm: MicroVmProcess) -> tuple[ZoneSched, float]:
    """The zone's scheduling over WINDOW_S seconds of the VMM's run, and its length."""
    start = vm.wait_stats(lambda s: True, 10)
    s0: SchedSnapshot = probe.collect()
    end = vm.wait_stats(lambda s: s["elapsed_s"] >= start["elapsed_s"] + WINDOW_S, 30)
    s1 = probe.collect()
    return s1.since(s0).zone(ZONE), end["elapsed_s"] - start["elapsed_s"]


def describe(name: str, z: ZoneSched, seconds: float) -> str:
    p50, p99 = z.run_delay_p50_ns(), z.run_delay_p99_ns()
    return (
        f"{name}: {z.run_delay.count} waits, p50 {p50 or 0:.0f} ns, p99 {p99 or 0:.0f} ns, "
        f"waiting {z.run_delay_total.ns / 1e9 / seconds:.1%}, "
        f"vCPU on CPU {z.vcpu_oncpu.ns / 1e9 / seconds:.0%}"
    )


def test_a_hog_on_the_vcpu_core_raises_run_delay(probe: SchedProbe, vm: MicroVmProcess) -> None:
    stats: dict[str, Any] = vm.wait_stats(lambda s: s["vcpu_tid"] and s["iterations"] > 0, 20)
    tid = stats["vcpu_tid"]
    try:
        with vcpu_alone_on_a_core(vm.pid, tid) as core:
            zone = Zone(id="s", key=ZONE, name="sched", tenant="t", vmm=Vmm.MICROVM,
                        pid=vm.pid, start_time=0, vcpu_tids=(tid,))  # fmt: skip
            probe.set_zones([zone])
            quiet, quiet_s = window(probe, vm)
            with hog_on(core):
                loaded, loaded_s = window(probe, vm)
    finally:
        probe.set_zones([])

    report = describe("unloaded", quiet, quiet_s) + "; " + describe("loaded", loaded, loaded_s)
    print(report)
    loaded_p99 = loaded.run_delay_p99_ns()
    assert loaded_p99 is not None, report
    assert loaded.run_delay.count >= 50, report  # the hog preempted the vCPU again and again
    assert loaded_p99 >= 1_000_000, report  # waits of a scheduler slice: milliseconds
    # The noisy-neighbour signal: the share of time the vCPU spent runnable but waiting.
    # (p99 of single waits alone is a poor baseline here: a flat-out vCPU waits only when
    # something preempts it, so an unloaded window holds a few dozen waits and its p99 is
    # the one worst preemption by whatever else the machine runs.)
    quiet_steal = quiet.run_delay_total.ns / quiet_s
    loaded_steal = loaded.run_delay_total.ns / loaded_s
    assert loaded_steal >= 4 * quiet_steal, report
    assert loaded_p99 >= 20 * (quiet.run_delay_p50_ns() or 0.0), report
    # The hog took about half of the core from the vCPU.
    assert loaded.vcpu_oncpu.ns / loaded_s < 0.75 * quiet.vcpu_oncpu.ns / quiet_s, report
    # The counters add up: the histogram holds every wait the totals counted. (The two maps
    # are read one after the other while the vCPU runs on: a wait or two can land between.)
    assert abs(loaded.run_delay.count - loaded.run_delay_total.count) <= 2, report


def test_non_zone_threads_are_not_counted(probe: SchedProbe, vm: MicroVmProcess) -> None:
    vm.wait_stats(lambda s: s["vcpu_tid"], 20)
    probe.set_zones([])
    before = probe.collect()
    vm.wait_stats(lambda s: s["elapsed_s"] >= 1.0, 20)
    assert probe.collect().since(before).zones == {}
