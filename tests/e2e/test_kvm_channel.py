"""The kvm and sched channels end to end: micro-VMM zones found by the inventory, counted by
bpf/kvm.c and bpf/sched.c, reported by `zonewatch run` as per-zone `stats` lines.

A busy zone (port writes and MMIO at a high rate), an idle zone, and a stranger: the same
micro-VMM started so the inventory does not take it for a zone. The busy zone's rates agree
with what its own VMM counted, on the right port and page; the idle zone stays near zero;
the stranger appears nowhere.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess, Line
from zonewatch.lab import microvm as mv
from zonewatch.lab.microvm import MicroVmProcess

pytestmark = pytest.mark.skipif(
    not os.access(mv.KVM_DEVICE, os.R_OK | os.W_OK), reason="needs read-write /dev/kvm"
)

BUSY_RATE, PIO_PER_ITER, MMIO_PER_ITER = 2500.0, 2, 2
BUSY_PORT, BUSY_MMIO = 0x510, 0xFEB01234
STRANGER_PORT = 0x3F8
WINDOW_LINES = 4  # stats intervals compared (1 s each)


class StrangerVm(MicroVmProcess):
    """The micro-VMM run through `python -c`: real KVM work the inventory can't attribute."""

    def command(self) -> list[str]:
        argv = super().command()[3:]  # drop python -m PROG
        code = f"import sys; from {mv.PROG} import main; sys.exit(main({argv!r}))"
        return [self.python, "-c", code]


def stats_of(lines: list[Line], zone: str) -> list[Line]:
    return [x for x in lines if x["type"] == "stats" and x["zone"]["name"] == zone]


def vmm_rate(first: dict[str, Any], last: dict[str, Any], what: str) -> float:
    """A rate from the VMM's own counts between two of its stats files."""

    def count(s: dict[str, Any]) -> int:
        return int(s["userspace_exits"] if what == "userspace" else s["exits"][what])

    return (count(last) - count(first)) / (last["elapsed_s"] - first["elapsed_s"])


def test_busy_idle_and_a_stranger(tmp_path: Path) -> None:
    with ExitStack() as stack:
        busy = stack.enter_context(
            MicroVmProcess(
                "kvm-busy", rate=BUSY_RATE, pio_per_iter=PIO_PER_ITER,
                mmio_per_iter=MMIO_PER_ITER, port=BUSY_PORT, mmio_addr=BUSY_MMIO,
                stats=tmp_path / "busy.json",
            )
        )  # fmt: skip
        idle = stack.enter_context(
            MicroVmProcess("kvm-idle", rate=1.0, stats=tmp_path / "idle.json")
        )
        stranger = stack.enter_context(
            StrangerVm("kvm-stranger", rate=1000.0, port=STRANGER_PORT, python=sys.executable,
                       stats=tmp_path / "stranger.json")
        )  # fmt: skip
        for vm in (busy, idle, stranger):
            vm.wait_stats(lambda s: s["iterations"] > 0, 30)
        agent = stack.enter_context(AgentProcess(tmp_path, "--stats-interval", "1"))

        agent.wait_for(lambda ls: len(stats_of(ls, "kvm-busy")) >= 2, 30, "busy zone stats")
        start = busy.read_stats()
        seen = len(stats_of(agent.lines, "kvm-busy"))
        agent.wait_for(
            lambda ls: len(stats_of(ls, "kvm-busy")) >= seen + WINDOW_LINES, 30, "a window"
        )
        end = busy.read_stats()
        assert start is not None and end is not None
        window = stats_of(agent.lines, "kvm-busy")[seen : seen + WINDOW_LINES]
        idle_lines = stats_of(agent.read(), "kvm-idle")

    seconds = sum(x["interval_s"] for x in window)

    def agent_rate(field: str) -> float:
        return sum(x["kvm"][field] * x["interval_s"] for x in window) / seconds

    report = {
        "agent": {f: agent_rate(f) for f in ("pio_per_s", "mmio_per_s", "userspace_exits_per_s")},
        "vmm": {w: vmm_rate(start, end, w) for w in ("io", "mmio", "userspace")},
    }
    print(report)
    assert agent_rate("pio_per_s") == pytest.approx(vmm_rate(start, end, "io"), rel=0.05), report
    assert agent_rate("mmio_per_s") == pytest.approx(vmm_rate(start, end, "mmio"), rel=0.05), report
    assert agent_rate("userspace_exits_per_s") == pytest.approx(
        vmm_rate(start, end, "userspace"), rel=0.05
    ), report
    # The right port and page, and only those.
    ports = {p for x in window for p in x["kvm"]["pio_ports"]}
    pages = {p for x in window for p in x["kvm"]["mmio_pages"]}
    assert ports == {f"{BUSY_PORT:#x}/out"}, ports
    assert pages == {f"{BUSY_MMIO & ~0xFFF:#x}/write"}, pages
    # Latency histograms ride along: the interval's vCPU waits by log2 bucket (ns), and
    # the p99 falls in their range. (VMM time per exit needs kvm_entry or --kvm-detail.)
    for x in window:
        waits = {int(low): n for low, n in x["sched"]["run_delay_hist_ns"].items()}
        assert waits and all(n > 0 for n in waits.values()), x["sched"]
        p99_ns = x["sched"]["run_delay_p99_us"] * 1000
        assert min(waits) <= p99_ns <= 2 * max(waits) + 1, x["sched"]
        assert isinstance(x["kvm"]["vmm_latency_hist_ns"], dict)
    # The idle zone: its one iteration a second, nothing like the busy one.
    assert idle_lines, "the idle zone is inventoried too"
    assert max(x["kvm"]["userspace_exits_per_s"] for x in idle_lines) < 10
    # The stranger is no zone, and none of its port writes landed in a zone.
    names = {x["zone"]["name"] for x in agent.lines if "zone" in x}
    assert "kvm-stranger" not in names
    assert not any(
        p.startswith(f"{STRANGER_PORT:#x}/")
        for x in agent.lines
        if x["type"] == "stats"
        for p in x["kvm"]["pio_ports"]
    )
    assert stranger.final_stats is not None and stranger.final_stats["iterations"] > 0
    # The isolation audit runs in the agent too: a root VMM with every capability is raised
    # once, as an alert.
    audits = [
        x for x in agent.lines
        if x["type"] == "alert" and x["rule"] == "audit.vmm-privileges"
        and x["zone"]["name"] == "kvm-busy"
    ]  # fmt: skip
    assert len(audits) == 1, audits
    assert audits[0]["severity"] == "high"
