"""Cost of watching a busy zone: exits/s of a flat-out micro-VMM under each condition.

One micro-VMM runs flat out (rate 0) for the whole benchmark. Conditions take turns on it,
round after round, in a rotating order (A B C D E, B C D E A, ...) so that drift spreads over
all of them; each turn sets its condition up, measures the VMM's own exit count over
WINDOW_S seconds between two of its stats writes, and tears the condition down:
  none      nothing attached: the baseline
  agent     KvmProbe + SchedProbe as `zonewatch run` attaches them (without the detail
            tracepoints), the VMM in their zone maps, maps collected every second
  detail    `zonewatch run --kvm-detail`: also kvm_emulate_insn and kvm_fpu, which fire
            per emulated guest instruction and per KVM_RUN here
  nonzone   the same probes attached, the VMM NOT a zone: what any other KVM user pays
  bpftrace  bpftrace counting the same tracepoints for the VMM's pid (the peer)
A ratio is the median over rounds of (condition / none of the same round); the value and
baseline are the medians of the exits/s themselves. One VMM rather than one per turn: a
fresh process's rate varied by +-8% on the project's machines, more than what is measured.

The vCPU thread is pinned to one core and everything else (the VMM's main thread, this
process, bpftrace) to the other, so the measured core runs the vCPU alone.

Environment: ZW_BENCH_ROUNDS (default 12), ZW_BENCH_SECONDS (default 4).
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import Metric, metric
from zonewatch.lab.microvm import MicroVmProcess
from zonewatch.model import Vmm, Zone
from zonewatch.probes.kvm import KVM_TRACEPOINTS, LEAN_TRACEPOINTS, KvmProbe
from zonewatch.probes.loader import tracepoint_exists
from zonewatch.probes.sched import SchedProbe

log = logging.getLogger(__name__)

ROUNDS = int(os.environ.get("ZW_BENCH_ROUNDS", "12"))
WINDOW_S = float(os.environ.get("ZW_BENCH_SECONDS", "4"))
CONDITIONS = ("none", "agent", "detail", "nonzone", "bpftrace")
ZONE_KEY = 1

# Setting a condition up: yields once it is in force; its clean-up runs after the window.
Setup = Callable[[MicroVmProcess, int], contextlib.AbstractContextManager[Callable[[], None]]]


def _noop() -> None:
    return None


@contextlib.contextmanager
def _nothing(_vm: MicroVmProcess, _tid: int) -> Iterator[Callable[[], None]]:
    yield _noop


def _probes(as_zone: bool, tracepoints: Sequence[str] = KVM_TRACEPOINTS) -> Setup:
    @contextlib.contextmanager
    def setup(vm: MicroVmProcess, tid: int) -> Iterator[Callable[[], None]]:
        kvm, sched = KvmProbe(tracepoints=tracepoints), SchedProbe()
        kvm.attach()
        sched.attach()
        try:
            zone = Zone(id="bench", key=ZONE_KEY, name="bench", tenant="t", vmm=Vmm.MICROVM,
                        pid=vm.pid, start_time=0, vcpu_tids=(tid,))  # fmt: skip
            zones = [zone] if as_zone else []
            kvm.set_zones(zones)
            sched.set_zones(zones)

            def tick() -> None:  # what the agent does each interval
                kvm.collect()
                sched.collect()
                kvm.poll(0)
                kvm.vcpu_threads()  # each rescan: threads seen running KVM_RUN

            yield tick
            if as_zone:  # sanity: the probes did see the VMM
                assert kvm.collect().zone(ZONE_KEY).userspace_exits_total > 0
        finally:
            kvm.detach()
            sched.detach()

    return setup


GPA_PAGE = "args->gpa & 0xfffffffffffff000"

# The peer's program: (tracepoint, predicate, action); {pid} and {tid} are the VMM's.
PEER: list[tuple[str, str, str]] = [
    ("kvm:kvm_exit", "pid == {pid}",
     "@exits[args->vcpu_id, args->exit_reason, args->isa] = count(); @exit_ts[tid] = nsecs;"),
    ("kvm:kvm_entry", "@exit_ts[tid]",
     "@exit_ns = hist(nsecs - @exit_ts[tid]); delete(@exit_ts[tid]);"),
    ("kvm:kvm_userspace_exit", "pid == {pid}",
     "@uexits[args->reason, args->errno] = count(); @uexit_ts[tid] = nsecs;"),
    ("kvm:kvm_fpu", "args->load && @uexit_ts[tid]",
     "@user_ns = hist(nsecs - @uexit_ts[tid]); delete(@uexit_ts[tid]);"),
    ("kvm:kvm_pio", "pid == {pid}",
     "@pio[args->port, args->rw] = count();"
     " @pio_bytes[args->port, args->rw] = sum(args->size * args->count);"),
    ("kvm:kvm_mmio", "pid == {pid}",
     f"@mmio[{GPA_PAGE}, args->type] = count(); @mmio_bytes[{GPA_PAGE}, args->type] ="
     " sum(args->len);"),
    ("kvm:kvm_fast_mmio", "pid == {pid}", f"@fast[{GPA_PAGE}] = count();"),
    ("kvm:kvm_emulate_insn", "pid == {pid}", "@emul[args->flags, args->failed] = count();"),
    ("kvm:kvm_cpuid", "pid == {pid}", "@cpuid[args->function] = count();"),
    ("kvm:kvm_msr", "pid == {pid}", "@msr[args->write, args->ecx] = count();"),
    ("kvm:kvm_hypercall", "pid == {pid}", "@hc[args->nr] = count();"),
    ("kvm:kvm_hv_hypercall", "pid == {pid}", "@hv[args->code] = count();"),
    ("kvm:kvm_xen_hypercall", "pid == {pid}", "@xen[args->nr] = count();"),
    # The sched side: the vCPU thread's run delay and the VMM's CPU time.
    ("sched:sched_wakeup", "args->pid == {tid}", "@wait[args->pid] = nsecs;"),
    ("sched:sched_wakeup_new", "args->pid == {tid}", "@wait[args->pid] = nsecs;"),
    ("sched:sched_switch", "pid == {pid}", "@oncpu = count();"),
    ("sched:sched_switch", "args->prev_pid == {tid} && (args->prev_state & 0xff) == 0",
     "@wait[args->prev_pid] = nsecs;"),
    ("sched:sched_switch", "@wait[args->next_pid]",
     "@run_delay = hist(nsecs - @wait[args->next_pid]); delete(@wait[args->next_pid]);"),
]  # fmt: skip


def bpftrace_script(pid: int, tid: int) -> str:
    """The peer: the tracepoints the agent attaches here, counted in bpftrace maps."""
    lines = []
    for tp, pred, action in PEER:
        category, event = tp.split(":")
        if tracepoint_exists(category, event):
            where = pred.format(pid=pid, tid=tid)
            lines.append(f"tracepoint:{tp} /{where}/ {{ {action} }}")
    # interval probes fire only once everything is attached: the readiness signal.
    lines.append('interval:s:1 { printf("tick\\n"); }')
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _bpftrace(vm: MicroVmProcess, tid: int) -> Iterator[Callable[[], None]]:
    with tempfile.NamedTemporaryFile("w", suffix=".bt", delete=False) as f:
        f.write(bpftrace_script(vm.pid, tid))
    proc = subprocess.Popen(
        ["bpftrace", f.name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        # interval:s:1 fires only once every probe is attached and running.
        for line in proc.stdout:
            if line.strip() == "tick":
                break
        else:
            raise RuntimeError(f"bpftrace exited with {proc.wait()} before attaching")
        yield _noop
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(f.name)


SETUPS: dict[str, Setup] = {
    "none": _nothing,
    "agent": _probes(as_zone=True, tracepoints=LEAN_TRACEPOINTS),
    "detail": _probes(as_zone=True),
    "nonzone": _probes(as_zone=False, tracepoints=LEAN_TRACEPOINTS),
    "bpftrace": _bpftrace,
}


def next_stats(vm: MicroVmProcess, after: dict[str, Any]) -> dict[str, Any]:
    """The VMM's next stats document after `after` (written every 0.5 s)."""
    elapsed = after["elapsed_s"]
    return vm.wait_stats(lambda s: s["elapsed_s"] > elapsed, 30, poll=0.01)


def measure(vm: MicroVmProcess, tid: int, condition: str) -> float:
    """Exits/s of the VMM over WINDOW_S seconds with `condition` set up."""
    with SETUPS[condition](vm, tid) as tick:
        start = next_stats(vm, vm.wait_stats(lambda s: True, 10))
        next_tick = time.monotonic() + 1.0
        end = start
        while end["elapsed_s"] < start["elapsed_s"] + WINDOW_S:
            end = next_stats(vm, end)
            if time.monotonic() >= next_tick:
                tick()
                next_tick += 1.0
    exits = end["userspace_exits"] - start["userspace_exits"]
    return float(exits / (end["elapsed_s"] - start["elapsed_s"]))


def run() -> dict[str, Metric]:
    mine = os.sched_getaffinity(0)
    cores = sorted(mine)
    vcpu_core, rest = cores[-1], set(cores[:-1]) or set(cores)
    rates: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    ratios: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    try:
        os.sched_setaffinity(0, rest)  # this process (and bpftrace, its child) off the core
        with tempfile.TemporaryDirectory(prefix="zw-bench-") as tmp:
            vm = MicroVmProcess("bench", rate=0, stats=Path(tmp) / "bench.json")
            with vm:
                stats = vm.wait_stats(lambda s: s["vcpu_tid"] and s["iterations"] > 0, 30)
                tid = stats["vcpu_tid"]
                for task in Path(f"/proc/{vm.pid}/task").iterdir():
                    thread = int(task.name)
                    os.sched_setaffinity(thread, {vcpu_core} if thread == tid else rest)
                measure(vm, tid, "none")  # warm-up turn, not counted
                for r in range(ROUNDS):
                    k = r % len(CONDITIONS)
                    this_round: dict[str, float] = {}
                    for condition in CONDITIONS[k:] + CONDITIONS[:k]:
                        this_round[condition] = rate = measure(vm, tid, condition)
                        rates[condition].append(rate)
                        print(
                            f"  {r + 1}/{ROUNDS} {condition:<9} {rate:>10.0f} exits/s", flush=True
                        )
                    for condition, rate in this_round.items():
                        ratios[condition].append(rate / this_round["none"])
    finally:
        os.sched_setaffinity(0, mine)
    med = {c: statistics.median(v) for c, v in rates.items()}
    for c, v in rates.items():
        runs = ", ".join(f"{x:.0f}" for x in v)
        ratio = statistics.median(ratios[c])
        print(f"  {c:<9} median {med[c]:>8.0f} exits/s, ratio {ratio:.3f}  ({runs})")

    def entry(condition: str) -> Metric:
        m = metric(med[condition], "exits/s", med["none"])
        m["ratio"] = round(statistics.median(ratios[condition]), 4)
        return m

    return {
        "kvm_exits_per_s_agent_ratio": entry("agent"),
        "kvm_exits_per_s_agent_detail_ratio": entry("detail"),
        "kvm_exits_per_s_nonzone_ratio": entry("nonzone"),
        "kvm_exits_per_s_bpftrace_ratio": entry("bpftrace"),
    }
