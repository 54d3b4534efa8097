"""The agent's report of blind spots: each cause (channel, reason) logged once while some
zone has it, again only after it cleared for every zone, and the verdicts kept for
/metrics. Zones from recorded /proc trees; the probes are real but not attached (coverage
reads only their names and the net probe's blind spots)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.unit.test_inventory import QEMU_ARGV, FakeProc
from zonewatch.agent import Agent
from zonewatch.inventory.inventory import Inventory
from zonewatch.probes.file import FileProbe
from zonewatch.probes.kvm import KvmProbe
from zonewatch.probes.net import NetProbe
from zonewatch.probes.proc import ProcProbe
from zonewatch.probes.sched import SchedProbe


def said(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_each_blind_cause_is_logged_once_while_it_lasts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="zonewatch.agent")
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(100, QEMU_ARGV)  # no vCPU thread named: the sched channel can't time it
    probes = [FileProbe(), KvmProbe(), SchedProbe(), NetProbe(), ProcProbe()]
    agent = Agent(Inventory(proc=proc.root), probes, [])

    def rescan() -> None:  # what Agent._rescan does after a change (minus the kvm probe's part)
        agent.inventory.refresh()
        agent._check_coverage()

    rescan()
    assert said(caplog, "blind to") == [
        "sched channel blind to 1 zone(s) (no_vcpu), e.g. "
        f"{agent.coverage[0].zone.name}: no vCPU thread of the zone seen yet"
    ]
    assert [(v.channel, v.reason) for c in agent.coverage for v in c.blind()] == [
        ("sched", "no_vcpu")
    ]
    proc.spawn(200, QEMU_ARGV)  # a second zone with the same cause: nothing new to say
    rescan()
    assert len(said(caplog, "blind to")) == 1
    assert len(agent.coverage) == 2
    proc.kill(100)
    proc.kill(200)
    rescan()
    assert said(caplog, "no zone blind by no_vcpu any more") == [
        "sched channel: no zone blind by no_vcpu any more"
    ]
    assert agent.coverage == []
    proc.spawn(300, QEMU_ARGV)  # the cause back: said again
    rescan()
    assert len(said(caplog, "sched channel blind to 1 zone(s) (no_vcpu)")) == 2


def test_a_channel_not_attached_is_blind_to_every_zone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(100, QEMU_ARGV, threads={100: "qemu-system-x86", 101: "CPU 0/KVM"})
    agent = Agent(Inventory(proc=proc.root), [FileProbe(), KvmProbe(), ProcProbe()], [])
    agent.inventory.refresh()
    agent._check_coverage()
    (c,) = agent.coverage
    assert {(v.channel, v.reason) for v in c.blind()} == {
        ("net", "not_attached"),
        ("sched", "not_attached"),
    }
    assert len(said(caplog, "net channel blind to 1 zone(s) (not_attached)")) == 1
