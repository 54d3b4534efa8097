"""The lab's pure-Python micro-VMM: real KVM exits, counted and paced as asked."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.microvms import MicroVmFactory
from zonewatch.inventory.cmdline import VCPU_THREAD_PATTERN
from zonewatch.lab import microvm as mv

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]

requires_kvm = pytest.mark.skipif(
    not os.access(mv.KVM_DEVICE, os.R_OK | os.W_OK), reason="needs read-write /dev/kvm"
)


def thread_comms(pid: int) -> dict[int, str]:
    comms = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comms[int(task.name)] = (task / "comm").read_text().strip()
        except FileNotFoundError:
            continue
    return comms


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def assert_consistent(stats: dict[str, Any], pio: int, mmio: int) -> None:
    """The counters of one snapshot agree with the guest program, within one iteration."""
    n = stats["iterations"]
    exits = stats["exits"]
    assert exits["hlt"] == n
    assert n * pio <= exits["io"] <= (n + 1) * pio
    assert n * mmio <= exits["mmio"] <= (n + 1) * mmio
    assert exits["other"] == 0, stats
    assert stats["userspace_exits"] == sum(exits.values())
    assert stats["error"] is None


# ---- the ABI mirror against the kernel's own headers ----------------------------------

ABI_PROBE_C = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/kvm.h>
#define P(x) printf(#x " %llu\n", (unsigned long long)(x))
int main(void) {
    P(KVM_GET_API_VERSION); P(KVM_CREATE_VM); P(KVM_CHECK_EXTENSION);
    P(KVM_GET_VCPU_MMAP_SIZE); P(KVM_CREATE_VCPU); P(KVM_SET_USER_MEMORY_REGION);
    P(KVM_SET_TSS_ADDR); P(KVM_RUN); P(KVM_GET_REGS); P(KVM_SET_REGS);
    P(KVM_GET_SREGS); P(KVM_SET_SREGS); P(KVM_API_VERSION); P(KVM_CAP_USER_MEMORY);
    P(KVM_EXIT_UNKNOWN); P(KVM_EXIT_EXCEPTION); P(KVM_EXIT_IO); P(KVM_EXIT_HYPERCALL);
    P(KVM_EXIT_DEBUG); P(KVM_EXIT_HLT); P(KVM_EXIT_MMIO); P(KVM_EXIT_IRQ_WINDOW_OPEN);
    P(KVM_EXIT_SHUTDOWN); P(KVM_EXIT_FAIL_ENTRY); P(KVM_EXIT_INTR);
    P(KVM_EXIT_INTERNAL_ERROR); P(KVM_EXIT_IO_IN); P(KVM_EXIT_IO_OUT);
    P(sizeof(struct kvm_userspace_memory_region)); P(sizeof(struct kvm_regs));
    P(sizeof(struct kvm_sregs)); P(sizeof(struct kvm_segment));
    P(sizeof(struct kvm_dtable)); P(offsetof(struct kvm_regs, rip));
    P(offsetof(struct kvm_sregs, es)); P(offsetof(struct kvm_sregs, cr0));
    P(offsetof(struct kvm_sregs, interrupt_bitmap));
    P(offsetof(struct kvm_segment, selector)); P(offsetof(struct kvm_segment, unusable));
    P(offsetof(struct kvm_run, exit_reason)); P(offsetof(struct kvm_run, io));
    P(offsetof(struct kvm_run, io.direction)); P(offsetof(struct kvm_run, io.size));
    P(offsetof(struct kvm_run, io.port)); P(offsetof(struct kvm_run, io.count));
    P(offsetof(struct kvm_run, io.data_offset)); P(offsetof(struct kvm_run, mmio.phys_addr));
    P(offsetof(struct kvm_run, mmio.data)); P(offsetof(struct kvm_run, mmio.len));
    P(offsetof(struct kvm_run, mmio.is_write));
    return 0;
}
"""


def test_abi_mirror_matches_kernel_headers(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("needs a C compiler and linux/kvm.h")
    src = tmp_path / "abi.c"
    src.write_text(ABI_PROBE_C)
    exe = tmp_path / "abi"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    kernel = {name: int(value) for name, value in (ln.rsplit(" ", 1) for ln in out.splitlines())}

    def off(struct: type[ctypes.Structure], name: str) -> int:
        return int(getattr(struct, name).offset)

    ours = {
        name: getattr(mv, name) for name in kernel if name.startswith("KVM_") and hasattr(mv, name)
    }
    ours |= {
        "sizeof(struct kvm_userspace_memory_region)": ctypes.sizeof(mv.KvmUserspaceMemoryRegion),
        "sizeof(struct kvm_regs)": ctypes.sizeof(mv.KvmRegs),
        "sizeof(struct kvm_sregs)": ctypes.sizeof(mv.KvmSregs),
        "sizeof(struct kvm_segment)": ctypes.sizeof(mv.KvmSegment),
        "sizeof(struct kvm_dtable)": ctypes.sizeof(mv.KvmDtable),
        "offsetof(struct kvm_regs, rip)": off(mv.KvmRegs, "rip"),
        "offsetof(struct kvm_sregs, es)": off(mv.KvmSregs, "es"),
        "offsetof(struct kvm_sregs, cr0)": off(mv.KvmSregs, "cr0"),
        "offsetof(struct kvm_sregs, interrupt_bitmap)": off(mv.KvmSregs, "interrupt_bitmap"),
        "offsetof(struct kvm_segment, selector)": off(mv.KvmSegment, "selector"),
        "offsetof(struct kvm_segment, unusable)": off(mv.KvmSegment, "unusable"),
        "offsetof(struct kvm_run, exit_reason)": mv.RUN_EXIT_REASON_OFFSET,
        "offsetof(struct kvm_run, io)": mv.RUN_UNION_OFFSET,
        "offsetof(struct kvm_run, io.direction)": mv.RUN_UNION_OFFSET + 0,
        "offsetof(struct kvm_run, io.size)": mv.RUN_UNION_OFFSET + 1,
        "offsetof(struct kvm_run, io.port)": mv.RUN_UNION_OFFSET + 2,
        "offsetof(struct kvm_run, io.count)": mv.RUN_UNION_OFFSET + 4,
        "offsetof(struct kvm_run, io.data_offset)": mv.RUN_UNION_OFFSET + 8,
        "offsetof(struct kvm_run, mmio.phys_addr)": mv.RUN_UNION_OFFSET + 0,
        "offsetof(struct kvm_run, mmio.data)": mv.RUN_MMIO_DATA_OFFSET,
        "offsetof(struct kvm_run, mmio.len)": mv.RUN_UNION_OFFSET + 16,
        "offsetof(struct kvm_run, mmio.is_write)": mv.RUN_UNION_OFFSET + 20,
    }
    assert set(ours) == set(kernel)
    assert ours == kernel
    # the struct formats used on the kvm_run page agree with those offsets
    assert mv._EXIT_IO.size == 16
    assert mv._EXIT_MMIO.size == 21
    for code, name in mv.EXIT_REASON_NAMES.items():
        assert kernel[f"KVM_EXIT_{name}"] == code


def test_guest_program_disassembles_as_documented(tmp_path: Path) -> None:
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("needs objdump")
    guest = tmp_path / "guest.bin"
    guest.write_bytes(mv.assemble_guest(0x3F8, 0x1234, 3, 2))
    out = subprocess.run(
        [objdump, "-D", "-b", "binary", "-mi8086", str(guest)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    insns = [line.split("\t")[-1].split()[0] for line in out.splitlines() if "\t" in line]
    assert insns == [
        "mov", "mov", "xor",  # dx = port, di = offset, bx = 0
        "mov", "jcxz", "mov", "out", "inc", "loop",  # port I/O loop
        "mov", "jcxz", "mov", "mov", "inc", "loop",  # MMIO loop
        "hlt", "jmp",
    ]  # fmt: skip
    assert "out    %al,(%dx)" in out
    assert "mov    %al,%es:(%di)" in out
    assert "$0x3f8,%dx" in out
    assert "$0x1234,%di" in out
    assert "vmcall" not in out


# ---- live runs ------------------------------------------------------------------------


@requires_kvm
def test_paced_exits_are_counted_and_rate_held(microvm: MicroVmFactory) -> None:
    rate, pio, mmio = 2000.0, 3, 2
    port, mmio_addr = 0x3F8, 0xFEBC1234
    vm = microvm("paced", rate=rate, pio_per_iter=pio, mmio_per_iter=mmio, port=port,
                 mmio_addr=mmio_addr)  # fmt: skip

    first = vm.wait_stats(lambda s: s["elapsed_s"] >= 0.5 and s["vcpu_tid"], timeout=15)
    assert first["running"] is True
    assert first["name"] == "paced"
    assert first["pid"] == vm.pid
    assert_consistent(first, pio, mmio)

    # who it is, as an inventory sees it
    assert "zonewatch.lab.microvm" in cmdline(vm.pid)
    comms = thread_comms(vm.pid)
    assert comms[vm.pid] == "zw-microvm"
    assert comms[first["vcpu_tid"]] == "zw-vcpu0"
    assert sorted(c for c in comms.values() if c.startswith("zw-vcpu")) == ["zw-vcpu0"]

    second = vm.wait_stats(lambda s: s["elapsed_s"] >= first["elapsed_s"] + 2.0, timeout=15)
    assert_consistent(second, pio, mmio)
    observed = (second["iterations"] - first["iterations"]) / (
        second["elapsed_s"] - first["elapsed_s"]
    )
    assert observed == pytest.approx(rate, rel=0.10)

    final = vm.stop()
    assert vm.proc is not None
    assert vm.proc.returncode == 0
    assert final is not None
    assert final["running"] is False
    assert_consistent(final, pio, mmio)
    assert final["iterations"] / final["elapsed_s"] == pytest.approx(rate, rel=0.10)
    assert final["ports"] == {"0x3f8": final["exits"]["io"]}
    assert final["mmio_pages"] == {"0xfebc1000": final["exits"]["mmio"]}
    assert final["config"]["rate"] == rate


@requires_kvm
def test_unnamed_threads_all_keep_the_process_comm(microvm: MicroVmFactory) -> None:
    """As Kata's QEMU without debug-threads: no thread name tells the vCPU apart."""
    vm = microvm("kata-like", rate=500, unnamed_threads=True)
    stats = vm.wait_stats(lambda s: s["vcpu_tid"] and s["iterations"] > 0, timeout=15)
    assert "--unnamed-threads" in cmdline(vm.pid)
    comms = thread_comms(vm.pid)
    assert stats["vcpu_tid"] != vm.pid
    assert comms[stats["vcpu_tid"]] == comms[vm.pid] == mv.PROCESS_COMM
    # Every thread the VMM made keeps its comm. (KVM adds a kernel worker of its own to
    # the VM's process on this kernel, "kvm-nx-lpage-recovery": named, but no vCPU.)
    assert not [c for c in comms.values() if VCPU_THREAD_PATTERN.match(c)], comms
    assert set(comms.values()) - {mv.PROCESS_COMM} <= {"kvm-nx-lpage-re"}, comms
    assert_consistent(stats, 1, 1)


@requires_kvm
def test_rate_zero_runs_flat_out(microvm: MicroVmFactory) -> None:
    vm = microvm("flat", rate=0, pio_per_iter=1, mmio_per_iter=1)
    stats = vm.wait_stats(lambda s: s["elapsed_s"] >= 1.0, timeout=15)
    assert_consistent(stats, 1, 1)
    assert stats["iterations"] / stats["elapsed_s"] > 5000
    assert stats["ports"] == {"0x80": stats["exits"]["io"]}
    assert stats["mmio_pages"] == {"0xd0000000": stats["exits"]["mmio"]}


@requires_kvm
def test_only_hlt_when_asked_for_no_io(microvm: MicroVmFactory) -> None:
    vm = microvm("quiet", rate=500, pio_per_iter=0, mmio_per_iter=0)
    stats = vm.wait_stats(lambda s: s["iterations"] >= 100, timeout=15)
    assert stats["exits"] == {"io": 0, "mmio": 0, "hlt": stats["iterations"], "other": 0}
    assert stats["ports"] == {}
    assert stats["mmio_pages"] == {}


@requires_kvm
def test_duration_ends_the_run_with_final_stats(microvm: MicroVmFactory) -> None:
    vm = microvm("short", rate=1000, duration=0.6)
    final = vm.wait_stats(lambda s: s["running"] is False, timeout=15)
    assert vm.proc is not None
    assert vm.proc.wait(timeout=10) == 0
    assert 0.5 <= final["elapsed_s"] <= 1.5
    assert_consistent(final, 1, 1)
    assert final["iterations"] == pytest.approx(final["elapsed_s"] * 1000, rel=0.10)


def test_bad_option_is_one_line_and_exit_2() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "zonewatch.lab.microvm", "--name", "x", "--mmio-addr", "0x100"],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=30,
    )
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1
    assert "--mmio-addr" in res.stderr
    assert "Traceback" not in res.stderr


@requires_kvm
def test_child_dies_with_its_parent(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a crashed test process leaves no micro-VM behind."""
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from zonewatch.lab.microvm import MicroVmProcess
        vm = MicroVmProcess("orphan", rate=100, stats=Path({str(tmp_path / "o.json")!r}))
        vm.start()
        vm.wait_stats(lambda s: s["iterations"] > 0, timeout=15)
        print(vm.pid, flush=True)
        os._exit(0)
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    child = int(res.stdout.strip())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    pytest.fail(f"micro-VM {child} outlived its parent")
