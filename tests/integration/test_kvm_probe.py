"""bpf/kvm.c loaded for real, against lab micro-VMMs whose own exit counts are the truth.

Two zones (one busy with port writes and MMIO at a high rate, one idle) and a third
micro-VMM that is not a zone: the busy zone's PIO, MMIO and userspace-exit counts agree
with what its VMM counted, on the right port and page; the idle zone stays near zero; the
stranger contributes nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.microvms import MicroVmFactory
from zonewatch.lab import microvm as mv
from zonewatch.lab.microvm import MicroVmProcess
from zonewatch.model import Vmm, Zone
from zonewatch.probes.kvm import OTHER, KvmProbe, PioKey
from zonewatch.probes.kvm_reasons import KVM_EXIT_REASONS, SVM_TRACE_NAMES, VMX_EXIT_REASONS
from zonewatch.probes.kvm_replay import KvmTraceReplay
from zonewatch.probes.loader import tracefs
from zonewatch.probes.records import KvmCounter, KvmOp, KvmRecord, MmioAccess

pytestmark = pytest.mark.skipif(
    not os.access(mv.KVM_DEVICE, os.R_OK | os.W_OK), reason="needs read-write /dev/kvm"
)

REPO = Path(__file__).resolve().parents[2]
BUSY, IDLE, MSR_ZONE = 31, 32, 33
BUSY_PORT, BUSY_MMIO = 0x510, 0xFEB01234
STRANGER_PORT, STRANGER_MMIO = 0x3F8, 0xE0000000
WINDOW_S = 3.0


# The tracepoints that fire per exit attach raw where their formats are the expected ones
# (this kernel's are); the classic attachment is the fallback for other kernels. Both run.
PER_EXIT = {"kvm_userspace_exit", "kvm_pio", "kvm_mmio", "kvm_fast_mmio", "kvm_msr"}


@pytest.fixture(scope="module", params=["raw", "classic"])
def probe(request: pytest.FixtureRequest) -> Iterator[KvmProbe]:
    p = KvmProbe(raw=request.param == "raw")
    p.attach()
    try:
        if request.param == "raw":
            assert PER_EXIT & set(p.attached) <= set(p.raw)
        else:
            assert p.raw == []
        yield p
    finally:
        p.detach()


def zone_of(vm: MicroVmProcess, key: int, vcpu_tid: int | None = None) -> Zone:
    return Zone(
        id=f"microvm-{vm.pid}",
        key=key,
        name=vm.config.name,
        tenant="t",
        vmm=Vmm.MICROVM,
        pid=vm.pid,
        start_time=0,
        vcpu_tids=(vcpu_tid,) if vcpu_tid else (),
    )


def fresh_stats(vm: MicroVmProcess, after: float, timeout: float = 20) -> dict[str, Any]:
    """The first stats document written after `after` seconds of the VMM's run.

    Polled at 5 ms so the kernel snapshot taken right after is within a few ms of it.
    """
    return vm.wait_stats(lambda s: s["elapsed_s"] > after, timeout, poll=0.005)


def within(ours: int, theirs: int, rel: float = 0.05) -> bool:
    return abs(ours - theirs) <= rel * max(theirs, 1)


def test_busy_idle_and_a_stranger(probe: KvmProbe, microvm: MicroVmFactory) -> None:
    busy = microvm("busy", rate=4000, pio_per_iter=2, mmio_per_iter=2, port=BUSY_PORT,
                   mmio_addr=BUSY_MMIO)  # fmt: skip
    idle = microvm("idle", rate=2, pio_per_iter=0, mmio_per_iter=0)
    stranger = microvm("stranger", rate=2000, pio_per_iter=1, mmio_per_iter=1,
                       port=STRANGER_PORT, mmio_addr=STRANGER_MMIO)  # fmt: skip
    # Attributed by VMM pid from the start (before the children have even imported KVM
    # code), then by vCPU tid once known, as the inventory will do.
    probe.set_zones([zone_of(busy, BUSY), zone_of(idle, IDLE)])
    busy_tid = busy.wait_stats(lambda s: s["vcpu_tid"], 20)["vcpu_tid"]
    idle_tid = idle.wait_stats(lambda s: s["vcpu_tid"], 20)["vcpu_tid"]
    stranger.wait_stats(lambda s: s["iterations"] > 0, 20)
    probe.set_zones([zone_of(busy, BUSY, busy_tid), zone_of(idle, IDLE, idle_tid)])
    assert probe.bpf[b"zone_tids"][probe.bpf[b"zone_tids"].Key(busy_tid)].value == BUSY

    # ---- a window: the VMM's counts between two of its stats writes vs the kernel's ----
    a0 = fresh_stats(busy, after=1.0)
    k0 = probe.collect()
    a1 = fresh_stats(busy, after=a0["elapsed_s"] + WINDOW_S)
    k1 = probe.collect()
    window = k1.since(k0)
    w = window.zone(BUSY)
    vmm_io = a1["exits"]["io"] - a0["exits"]["io"]
    vmm_mmio = a1["exits"]["mmio"] - a0["exits"]["mmio"]
    vmm_uexits = a1["userspace_exits"] - a0["userspace_exits"]
    assert vmm_uexits > 20_000, "the busy zone was not busy"
    report = (
        f"window {a1['elapsed_s'] - a0['elapsed_s']:.2f}s: PIO {w.pio_total}/{vmm_io}, "
        f"MMIO {w.mmio_total}/{vmm_mmio}, uexits {w.userspace_exits_total}/{vmm_uexits}"
    )
    print(report)
    assert within(w.pio_total, vmm_io), report
    assert within(w.mmio_total, vmm_mmio), report
    assert within(w.userspace_exits_total, vmm_uexits), report
    # Rates agree too (each over its own clock).
    kernel_s = (k1.ts_mono_ns - k0.ts_mono_ns) / 1e9
    vmm_s = a1["elapsed_s"] - a0["elapsed_s"]
    assert w.userspace_exits_total / kernel_s == pytest.approx(vmm_uexits / vmm_s, rel=0.05)

    # ---- the idle zone stays near zero ----
    i = window.zone(IDLE)
    assert i.pio_total == 0
    assert i.mmio_total == 0
    assert i.userspace_exits_total <= 2 * 2 * (WINDOW_S + 1) + 5  # its hlt-only pace

    # ---- the whole run: from set_zones to the VMM's end, exactly what it counted ----
    final = busy.stop()
    final_idle = idle.stop()
    final_stranger = stranger.stop()
    assert final is not None and final_idle is not None and final_stranger is not None
    k2 = probe.collect()
    z = k2.zone(BUSY)
    assert z.pio_ports() == {BUSY_PORT: final["exits"]["io"]}
    assert z.pio == {PioKey(BUSY_PORT, 1): z.pio[PioKey(BUSY_PORT, 1)]}  # writes only
    assert z.mmio_pages(MmioAccess.WRITE) == {BUSY_MMIO & ~0xFFF: final["exits"]["mmio"]}
    assert z.mmio_pages() == z.mmio_pages(MmioAccess.WRITE)
    assert z.userspace_exits_by_reason() == {
        "IO": final["exits"]["io"],
        "MMIO": final["exits"]["mmio"],
        "HLT": final["exits"]["hlt"],
    }
    assert z.pio[PioKey(BUSY_PORT, 1)].bytes == final["exits"]["io"]  # 1-byte outs
    assert z.emulated_total > 0  # under PVM the real-mode guest runs in the emulator
    assert z.exits == {}, "kvm_exit does not fire on this machine"
    # Every exit but the last was followed by the VMM re-entering KVM_RUN.
    assert z.userspace_latency.count >= final["userspace_exits"] - 1
    p50 = z.userspace_latency.p50()
    assert p50 is not None and 500 < p50 < 10_000_000
    assert k2.zone(IDLE).userspace_exits_by_reason() == {"HLT": final_idle["exits"]["hlt"]}

    # ---- the stranger: nothing anywhere ----
    assert set(k2.zones) <= {BUSY, IDLE}
    assert final_stranger["exits"]["io"] > 1000, "the stranger did no KVM work"
    for zone in k2.zones.values():
        assert STRANGER_PORT not in zone.pio_ports()
        assert STRANGER_MMIO & ~0xFFF not in zone.mmio_pages()
    lost = probe.lost()
    assert lost["kvm.map_full"] == 0
    assert lost["kvm.state_full"] == 0
    probe.set_zones([])


def test_a_guest_sweeping_ports_and_pages_is_capped_and_spares_other_zones(
    microvm: MicroVmFactory,
) -> None:
    """Ports and MMIO pages are the guest's to pick. A zone sweeping them keeps its first
    `keys` of each and one "other" key for the rest (its totals exact), so it cannot fill
    the shared maps: a zone that starts after the sweep still has every key counted."""
    keys = 8
    capped = KvmProbe(keys_per_zone=keys, max_counters=64)  # 64: a sweep would fill it
    capped.attach()
    try:
        sweeper = microvm("sweeper", rate=1000, pio_per_iter=4, mmio_per_iter=4, sweep=True)
        capped.set_zones([zone_of(sweeper, 51)])
        sweeper.wait_stats(lambda s: len(s["ports"]) >= 400 and len(s["mmio_pages"]) == 16, 20)
        steady = microvm("steady", rate=500, pio_per_iter=1, mmio_per_iter=1, port=BUSY_PORT,
                         mmio_addr=BUSY_MMIO)  # fmt: skip
        capped.set_zones([zone_of(sweeper, 51), zone_of(steady, 52)])
        steady.wait_stats(lambda s: s["iterations"] >= 100, 20)
        swept, held = sweeper.stop(), steady.stop()
        assert swept is not None and held is not None
        k = capped.collect()

        s = k.zone(51)
        first_pages = {mv.DEFAULT_MMIO_ADDR + i * 0x1000 for i in range(keys)}
        assert set(s.pio_ports()) == set(range(0x80, 0x80 + keys)) | {OTHER}  # the first ones
        assert s.pio_total == swept["exits"]["io"]
        assert set(s.mmio_pages()) == first_pages | {OTHER}
        assert s.mmio_total == swept["exits"]["mmio"]
        assert s.to_json()["pio"]["other/out"] > 0

        t = k.zone(52)
        assert t.pio_ports() == {BUSY_PORT: held["exits"]["io"]}
        assert t.mmio_pages() == {BUSY_MMIO & ~0xFFF: held["exits"]["mmio"]}
        assert capped.lost()["kvm.map_full"] == 0
    finally:
        capped.set_zones([])
        capped.detach()


def test_a_zone_that_leaves_is_reported_once_then_purged(
    probe: KvmProbe, microvm: MicroVmFactory
) -> None:
    # Flat out: the vCPU exits while collect() deletes the zone's entries (it made some
    # again, between two maps' deletions, before the states went first).
    vm = microvm("leaver", rate=0, pio_per_iter=1, mmio_per_iter=0)
    probe.set_zones([zone_of(vm, 41)])
    vm.wait_stats(lambda s: s["iterations"] >= 200, 20)
    probe.set_zones([])  # the inventory lost it
    last = probe.collect()
    assert last.zone(41).pio_total >= 200  # its final counts, once
    after = probe.collect()
    assert 41 not in after.zones
    vcpus = probe.bpf[b"vcpus"]
    assert all(st.zone_key != 41 for st in vcpus.values())
    # The VMM keeps running outside the inventory: nothing more is counted for it.
    now = vm.wait_stats(lambda s: True, 5)
    vm.wait_stats(lambda s: s["iterations"] >= now["iterations"] + 100, 20)
    assert 41 not in probe.collect().zones


def test_msr_writes_are_sampled_within_the_zone_budget(probe: KvmProbe, tmp_path: Path) -> None:
    stats = tmp_path / "msr.json"
    budget = 64  # KvmProbe's default samples per zone and second
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.msr_guest", "--rate", "300", "--duration",
         "1.5", "--stats", str(stats)],
        cwd=REPO,
    )  # fmt: skip
    try:
        probe.set_zones([Zone(id="m", key=MSR_ZONE, name="msr", tenant="t", vmm=Vmm.MICROVM,
                              pid=proc.pid, start_time=0)])  # fmt: skip
        lost_before = probe.lost()["kvm.rate_limited"]
        records: list[KvmRecord] = []
        while proc.poll() is None:
            records += probe.poll(50)
        records += probe.poll(50)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    doc = json.loads(stats.read_text())
    writes = doc["exits"]["hlt"]  # one wrmsr per iteration
    assert writes > 2 * budget
    assert records, "no sampled MSR write"
    assert {(r.op, r.code, r.args[0], r.zone_key, r.pid) for r in records} == {
        (KvmOp.MSR_WRITE, 0x174, 0x10, MSR_ZONE, proc.pid)
    }
    assert {r.comm for r in records} == {b"zw-vcpu0"}
    assert not any(r.faulted for r in records)
    # At most the budget per one-second window: 1.5 s spans at most 2 windows (+ races).
    assert len(records) <= 2 * budget + 2
    snap = probe.collect()
    assert snap.zone(MSR_ZONE).counter(KvmCounter.MSR_WRITE) == {0x174: writes}
    suppressed = probe.lost()["kvm.rate_limited"] - lost_before
    assert suppressed + len(records) == writes
    assert probe.lost()["kvm.ringbuf"] == 0
    probe.set_zones([])


def test_live_and_replayed_counts_are_the_same(probe: KvmProbe, microvm: MicroVmFactory) -> None:
    """The same workload through both paths: tracefs text replayed == kernel maps read."""
    inst = tracefs() / "instances" / "zw-test-replay"
    events = ("kvm_userspace_exit", "kvm_pio", "kvm_mmio", "kvm_fpu", "kvm_emulate_insn")
    inst.mkdir()
    try:
        (inst / "buffer_size_kb").write_text("8192")
        (inst / "options" / "record-tgid").write_text("1")  # attribution by VMM pid
        for ev in events:
            (inst / "events" / "kvm" / ev / "enable").write_text("1")
        vm = microvm("twin", rate=200, pio_per_iter=2, mmio_per_iter=1, port=0x61,
                     mmio_addr=0xFED00000, duration=1.0)  # fmt: skip
        zone = zone_of(vm, 51)
        probe.set_zones([zone])
        before = probe.collect()
        final = vm.wait_stats(lambda s: s["running"] is False, 20)
        assert vm.proc is not None
        vm.proc.wait(10)
        live = probe.collect().since(before).zone(51)
        (inst / "tracing_on").write_text("0")
        text = (inst / "trace").read_text()
    finally:
        for ev in events:
            (inst / "events" / "kvm" / ev / "enable").write_text("0")
        inst.rmdir()
    replay = KvmTraceReplay({}, {vm.pid: 51})
    replay.feed(text.splitlines())
    replayed = replay.snapshot().zone(51)
    assert replay.errors.total == 0
    assert final["userspace_exits"] > 500
    assert live.userspace_exits == replayed.userspace_exits
    assert live.pio == replayed.pio
    assert live.mmio == replayed.mmio
    assert live.counters == replayed.counters
    assert live.userspace_latency.count == replayed.userspace_latency.count
    # The two clocks round differently (tracefs prints us), so slots may move by one.
    assert abs(live.userspace_latency.p50() or 0) > 0
    probe.set_zones([])


def _symbolic_table(fmt: str, at: int) -> dict[int, str]:
    """The { value, "name" } pairs of the __print_symbolic(...) call starting at `at`."""
    opening = fmt.index("(", at)
    depth = 0
    for end in range(opening, len(fmt)):
        depth += {"(": 1, ")": -1}.get(fmt[end], 0)
        if depth == 0:
            break
    out: dict[int, str] = {}
    for value, names in re.findall(
        r"\{\s*([^,{}]+?)\s*,\s*((?:\"[^\"]*\"\s*)+)\}", fmt[opening:end]
    ):
        label = "".join(re.findall(r"\"([^\"]*)\"", names))
        code = sum(int(term.strip(), 0) for term in value.split("+"))
        out[code & 0xFFFFFFFF] = label
    return out


def test_reason_tables_match_the_running_kernel() -> None:
    """The running kernel's own kvm_exit/kvm_userspace_exit print tables, which know codes
    newer than any installed header."""
    events = tracefs() / "events" / "kvm"
    exit_fmt = (events / "kvm_exit" / "format").read_text()
    vmx_at = exit_fmt.index("__print_symbolic(REC->exit_reason & 0xffff")
    svm_at = exit_fmt.index("__print_symbolic(REC->exit_reason,")
    vmx = _symbolic_table(exit_fmt, vmx_at)
    svm = _symbolic_table(exit_fmt, svm_at)
    assert vmx, "no VMX table in kvm_exit's format"
    assert {c: VMX_EXIT_REASONS.get(c) for c in vmx} == vmx
    assert {c: SVM_TRACE_NAMES.get(c) for c in svm} == svm
    uexit_fmt = (events / "kvm_userspace_exit" / "format").read_text()
    kvm = _symbolic_table(uexit_fmt, uexit_fmt.index("__print_symbolic(REC->reason"))
    assert {c: "KVM_EXIT_" + KVM_EXIT_REASONS[c] for c in kvm} == kvm
