"""Recorded kvm tracepoint text through the same builder and decoding as the live probe.

Fixtures (tests/fixtures/kvm, provenance in each file's header):
- vmx_trace_pipe_6.1.txt   VT-x host, tracefs trace_pipe, Linux 6.1 formats
- svm_perf_script_6.18.txt AMD host, `perf script --ns` with pid/tid, Linux 6.18 formats
- vmx_trace_pipe_4.19.txt  VT-x host, the older formats (no vCPU in kvm_exit)
- pvm_microvm_trace.txt    captured on a project machine from two lab micro-VMMs
"""

from __future__ import annotations

from pathlib import Path

import pytest

from zonewatch.model import Vmm, Zone
from zonewatch.probes.hist import log2_slot
from zonewatch.probes.kvm_reasons import KvmIsa
from zonewatch.probes.kvm_replay import KvmTraceReplay, parse_line, replay_kvm_trace
from zonewatch.probes.kvm_stats import (
    OTHER,
    ExitKey,
    IoCount,
    KvmSnapshotBuilder,
    MmioKey,
    PioKey,
    UserspaceExitKey,
)
from zonewatch.probes.records import KvmCounter, MmioAccess

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kvm"
ZONE = 7


def replay(name: str, tids: dict[int, int], pids: dict[int, int] | None = None) -> KvmTraceReplay:
    r = KvmTraceReplay(tids, pids)
    r.feed_file(FIXTURES / name)
    return r


def slots(*ns: int) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in ns:
        out[log2_slot(v)] = out.get(log2_slot(v), 0) + 1
    return out


# ---- line formats --------------------------------------------------------------------


def test_parse_trace_pipe_line_with_spaces_and_dashes_in_comm() -> None:
    line = (
        "       CPU 0/KVM-2211    [002] d..1. 81234.500100: kvm_exit: vcpu 0 reason HLT "
        "rip 0xffffffff81c0e1fe info1 0x0"
    )
    rec = parse_line(line)
    assert rec is not None
    assert (rec.comm, rec.tid, rec.tgid, rec.cpu) == ("CPU 0/KVM", 2211, None, 2)
    assert rec.ts_ns == 81234_500100_000
    assert rec.event == "kvm_exit"
    assert rec.body.startswith("vcpu 0 reason HLT")
    rec = parse_line("qemu-system-x86-1060614 [036] 2316032.840657: kvm_exit: reason HLT rip 0x1")
    assert rec is not None
    assert (rec.comm, rec.tid) == ("qemu-system-x86", 1060614)


def test_parse_trace_line_with_tgid_column() -> None:
    line = "  zw-vcpu0-16312   (  16308) [000] .....  8312.331000: kvm_fpu: load"
    rec = parse_line(line)
    assert rec is not None
    assert (rec.comm, rec.tid, rec.tgid) == ("zw-vcpu0", 16312, 16308)


def test_parse_perf_script_line_with_pid_tid_and_ns() -> None:
    line = (
        "       CPU 0/KVM  4711/4720  [005] 91823.100003120:                kvm:kvm_entry: "
        "vcpu 0, rip 0xffffffff8107c3d7 intr_info 0x00000000 error_code 0x00000000"
    )
    rec = parse_line(line)
    assert rec is not None
    assert (rec.comm, rec.tid, rec.tgid, rec.cpu) == ("CPU 0/KVM", 4720, 4711, 5)
    assert rec.ts_ns == 91823_100003120
    assert rec.event == "kvm_entry"
    rec = parse_line("qemu-kvm  8713 [003] 1286011.962451:  kvm:kvm_exit: reason HLT rip 0x1")
    assert rec is not None
    assert (rec.tid, rec.tgid) == (8713, None)


@pytest.mark.parametrize("line", ["", "# tracer: nop", "#   TASK-PID   CPU#", "   "])
def test_headers_are_not_records(line: str) -> None:
    assert parse_line(line) is None


def test_garbage_is_counted_not_raised() -> None:
    r = KvmTraceReplay({1: ZONE})
    r.feed(
        [
            "this is not a trace line\n",
            "  t-1 [000] .... 1.000001: kvm_exit: vcpu 0 reason\n",  # truncated body
            "  t-1 [000] .... 1.000002: kvm_pio: pio_sideways at 0x1\n",
            "  t-1 [000] .... 1.000003: kvm_exit: vcpu 0 reason NO_SUCH_REASON rip 0x0\n",
            "  t-1 [000] .... 1.000004: sched_switch: prev_comm=a ==> next_comm=b\n",
        ]
    )
    assert r.errors.malformed == 1
    assert r.errors.bad_body == 3
    assert r.errors.by_event == {"kvm_exit": 2, "kvm_pio": 1}
    assert r.skipped == {"sched_switch": 1}
    assert r.snapshot().zone(ZONE).exits == {}


# ---- VT-x, trace_pipe, 6.1 -----------------------------------------------------------


def test_vmx_exits_per_vcpu_and_reason() -> None:
    r = replay("vmx_trace_pipe_6.1.txt", {2211: ZONE, 2212: ZONE})
    assert r.isa == KvmIsa.VMX
    assert r.errors.total == 0
    snap = r.snapshot()
    assert set(snap.zones) == {ZONE}, "the other VM's thread 3301 counted"
    z = snap.zone(ZONE)
    vmx = KvmIsa.VMX
    assert z.exits == {
        ExitKey(0, vmx, 1): 1,  # EXTERNAL_INTERRUPT
        ExitKey(0, vmx, 32): 1,  # MSR_WRITE
        ExitKey(0, vmx, 49): 1,  # EPT_MISCONFIG
        ExitKey(0, vmx, 30): 2,  # IO_INSTRUCTION
        ExitKey(0, vmx, 12): 1,  # HLT
        ExitKey(1, vmx, 48): 1,  # EPT_VIOLATION
        ExitKey(1, vmx, 40): 1,  # PAUSE_INSTRUCTION
        ExitKey(1, vmx, 12): 1,  # HLT (its entry is after the end of the recording)
    }
    assert z.exits_by_reason() == {
        "EXTERNAL_INTERRUPT": 1,
        "MSR_WRITE": 1,
        "EPT_MISCONFIG": 1,
        "IO_INSTRUCTION": 2,
        "HLT": 2,
        "EPT_VIOLATION": 1,
        "PAUSE_INSTRUCTION": 1,
    }
    assert z.exits_total == 9


def test_vmx_exit_to_entry_latency_and_userspace_time() -> None:
    z = replay("vmx_trace_pipe_6.1.txt", {2211: ZONE, 2212: ZONE}).snapshot().zone(ZONE)
    us = 1000
    # vCPU 0: 2, 2, 4, 31 (via QEMU), 22 (via QEMU), 2150 (HLT) us; vCPU 1: 7, 1 us.
    assert z.exit_latency.buckets == slots(2 * us, 2 * us, 4 * us, 31 * us, 22 * us,
                                           2150 * us, 7 * us, 1 * us)  # fmt: skip
    # Time in QEMU: userspace exit -> next entry (no kvm_fpu in this recording).
    assert z.userspace_latency.buckets == slots(26 * us, 18 * us)
    p99 = z.exit_latency.p99()
    assert p99 is not None and 2**21 <= p99 < 2**22  # the HLT's 2.15 ms slot
    assert z.userspace_exits == {UserspaceExitKey(2, 0): 2}
    assert z.pio == {PioKey(0x70, 1): IoCount(1, 1), PioKey(0x71, 0): IoCount(1, 1)}


def test_other_vm_alone() -> None:
    z = replay("vmx_trace_pipe_6.1.txt", {3301: 9}).snapshot().zone(9)
    assert z.exits_by_reason() == {"HLT": 1, "EPT_VIOLATION": 1, "IO_INSTRUCTION": 1}
    assert z.pio_ports() == {0x3F8: 1}


# ---- AMD, perf script, 6.18 ----------------------------------------------------------


def test_svm_perf_script_by_tgid() -> None:
    # perf script carries pid/tid: the zone is found through its QEMU pid, as the kernel
    # filter does for vCPU threads the inventory has not named yet.
    r = replay("svm_perf_script_6.18.txt", {}, {4711: ZONE})
    assert r.isa == KvmIsa.SVM
    assert r.errors.total == 0
    snap = r.snapshot()
    assert set(snap.zones) == {ZONE}
    z = snap.zone(ZONE)
    svm = KvmIsa.SVM
    assert z.exits == {
        ExitKey(0, svm, 0x400): 1,
        ExitKey(0, svm, 0x07C): 1,
        ExitKey(0, svm, 0x081): 1,
        ExitKey(0, svm, 0x078): 1,
        ExitKey(1, svm, 0x060): 1,
        ExitKey(1, svm, 0x064): 1,
        ExitKey(1, svm, 0x07B): 1,
        ExitKey(1, svm, 0x072): 1,
    }
    assert z.exits_by_reason() == {
        "NPF": 1,
        "MSR": 1,
        "VMMCALL": 1,
        "HLT": 1,
        "INTR": 1,
        "VINTR": 1,
        "IOIO": 1,
        "CPUID": 1,
    }
    assert z.exit_latency.buckets == slots(3120, 1450, 1700, 1_000_000, 650, 400, 2000, 300)
    assert z.counter(KvmCounter.MSR_WRITE) == {0x6E0: 1}
    assert z.counter(KvmCounter.HYPERCALL) == {5: 1}


def test_svm_by_vcpu_tid() -> None:
    snap = replay("svm_perf_script_6.18.txt", {4721: ZONE}).snapshot()
    assert snap.zone(ZONE).exits_by_reason() == {"INTR": 1, "VINTR": 1, "IOIO": 1, "CPUID": 1}


# ---- VT-x, the older formats ---------------------------------------------------------


def test_old_format_without_vcpu_counts_vcpu_zero() -> None:
    z = replay("vmx_trace_pipe_4.19.txt", {1301: ZONE}).snapshot().zone(ZONE)
    vmx = KvmIsa.VMX
    assert z.exits == {ExitKey(0, vmx, 1): 1, ExitKey(0, vmx, 28): 1, ExitKey(0, vmx, 48): 1}
    assert z.exit_latency.buckets == slots(3000, 2000, 9000)


# ---- captured here: the micro-VMM's own counts ---------------------------------------


def test_pvm_capture_agrees_with_the_vmm_counts() -> None:
    zone = Zone(
        id="z", key=ZONE, name="zone", tenant="t", vmm=Vmm.MICROVM, pid=16308,
        start_time=0, vcpu_tids=(16312,),
    )  # fmt: skip
    r = KvmTraceReplay.for_zones([zone])
    r.feed_file(FIXTURES / "pvm_microvm_trace.txt")
    assert r.errors.total == 0
    snap = r.snapshot()
    assert set(snap.zones) == {ZONE}, "the other micro-VMM (pid 16309) counted"
    z = snap.zone(ZONE)
    # Its stats file said: io 7, mmio 7, hlt 7, ports {0x510: 7}, pages {0xfeb01000: 7}.
    assert z.userspace_exits_by_reason() == {"IO": 7, "MMIO": 7, "HLT": 7}
    assert z.pio == {PioKey(0x510, 1): IoCount(7, 7)}
    assert z.mmio == {MmioKey(0xFEB01000, MmioAccess.WRITE): IoCount(7, 7)}
    assert z.mmio_pages(MmioAccess.WRITE) == {0xFEB01000: 7}
    assert z.exits == {}  # kvm_exit never fires under PVM
    # Every exit but the last was followed by a KVM_RUN (kvm_fpu load).
    assert z.userspace_latency.count == 20
    # The guest runs in the emulator (real mode under PVM): 100 kvm_emulate_insn lines, of
    # which the 7 before the vCPU's first exit are not counted, as in bpf/kvm.c (a thread
    # gets its state, where emulations are counted, at its first exit).
    assert z.emulated_total == 93
    assert z.counter(KvmCounter.EMULATE) == {0: 93}


# ---- snapshots: windows and JSON -----------------------------------------------------


def test_windows_between_replayed_snapshots() -> None:
    r = KvmTraceReplay({2211: ZONE, 2212: ZONE})
    lines = (FIXTURES / "vmx_trace_pipe_6.1.txt").read_text().splitlines()
    half = len(lines) // 2
    r.feed(lines[:half])
    first = r.snapshot()
    first_copy = replay_kvm_trace(lines[:half], {2211: ZONE, 2212: ZONE})
    r.feed(lines[half:])
    whole = r.snapshot()
    window = whole.since(first_copy).zone(ZONE)
    assert first.zone(ZONE).exits_total + window.exits_total == 9
    assert window.exit_latency.count + first_copy.zone(ZONE).exit_latency.count == 8


def test_snapshot_json_uses_names() -> None:
    z = replay("vmx_trace_pipe_6.1.txt", {2211: ZONE}).snapshot().zone(ZONE)
    doc = z.to_json()
    assert doc["exits"]["IO_INSTRUCTION"] == 2
    assert doc["userspace_exits"] == {"IO": 2}
    assert doc["pio"] == {"0x70/out": 1, "0x71/in": 1}
    assert doc["exit_latency_ns"]["count"] == 6


def test_hex_reason_before_the_isa_is_known_is_resolved_later() -> None:
    lines = [
        "  t-1 [000] .... 1.000001: kvm_exit: vcpu 0 reason 0x4e rip 0x0 info1 0x0\n",
        "  t-1 [000] .... 1.000002: kvm_exit: vcpu 0 reason npf rip 0x0 info1 0x0\n",
    ]
    z = replay_kvm_trace(lines, {1: ZONE}).zone(ZONE)
    assert z.exits_by_reason() == {"EXCP_PF": 1, "NPF": 1}
    # Told the ISA up front, the same text decodes the same way.
    z = replay_kvm_trace(lines[:1], {1: ZONE}, isa=KvmIsa.SVM).zone(ZONE)
    assert z.exits_by_reason() == {"EXCP_PF": 1}


def test_failed_vmentry_and_restart() -> None:
    lines = [
        "  t-1 [000] .... 1.000001: kvm_exit: vcpu 0 reason INVALID_STATE FAILED_VMENTRY"
        " rip 0xfff0 info1 0x0\n",
        "  t-1 [000] .... 1.000002: kvm_userspace_exit: reason restart (4)\n",
        "  t-1 [000] .... 1.000003: kvm_userspace_exit: reason error (14)\n",
    ]
    z = replay_kvm_trace(lines, {1: ZONE}).zone(ZONE)
    assert z.exits == {ExitKey(0, KvmIsa.VMX, 0x80000021): 1}
    assert z.exits_by_reason() == {"INVALID_STATE FAILED_VMENTRY": 1}
    assert z.userspace_exits_by_reason() == {"INTR (EINTR)": 1, "UNKNOWN (EFAULT)": 1}


# ---- keys the guest picks: capped per zone, as bpf/kvm.c caps them -------------------
def test_a_zones_keys_past_its_budget_are_counted_as_other() -> None:
    b = KvmSnapshotBuilder(keys_per_zone=2)
    for port in (0x80, 0x81, 0x82, 0x83, 0x80):
        b.pio(ZONE, port, 1, 1, 1)
    b.pio(ZONE + 1, 0x82, 1, 1, 1)  # another zone has its own budget
    for page in (0x1000, 0x2000, 0x3000):
        b.mmio(ZONE, page + 4, MmioAccess.WRITE, 1, 1)
    for msr in (0x10, 0x11, 0x12):
        b.counter(ZONE, KvmCounter.MSR_WRITE, msr)
    b.counter(ZONE, KvmCounter.EMULATE, 0, 5)  # code 0 is never "other"
    snap = b.build(0)
    z = snap.zone(ZONE)
    assert z.pio_ports() == {0x80: 2, 0x81: 1, OTHER: 2}
    assert z.pio_total == 5  # the totals stay exact
    assert snap.zone(ZONE + 1).pio_ports() == {0x82: 1}
    assert z.mmio_pages() == {0x1000: 1, 0x2000: 1, OTHER: 1}
    assert z.counter(KvmCounter.MSR_WRITE) == {0x10: 1, 0x11: 1, OTHER: 1}
    assert z.counter(KvmCounter.EMULATE) == {0: 5}
    doc = z.to_json()
    assert doc["pio"] == {"other/out": 2, "0x80/out": 2, "0x81/out": 1}
    assert doc["mmio"]["other/write"] == 1
    assert doc["msr_writes"] == {"0x10": 1, "0x11": 1, "other": 1}


def test_the_live_probes_keys_arrive_capped_already() -> None:
    b = KvmSnapshotBuilder()  # what KvmProbe.collect uses: the kernel did the capping
    for port in range(300):
        b.pio(ZONE, port, 0)
    b.pio(ZONE, OTHER, 0, 7, 7)
    ports = b.build(0).zone(ZONE).pio_ports()
    assert len(ports) == 301
    assert ports[OTHER] == 7
