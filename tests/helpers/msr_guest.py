"""A micro-VM whose guest writes an MSR every iteration: a controllable source of kvm_msr.

The lab's MicroVm with its guest program replaced before the first KVM_RUN:

    mov ecx, MSR ; mov eax, VALUE ; xor edx, edx ; wrmsr ; hlt ; jmp start

MSR 0x174 (IA32_SYSENTER_CS) is one KVM accepts from any guest without CPUID set-up, and
real mode at CPL 0 may execute wrmsr. Paced by --rate on the hlt exits, like the lab VMM.

    python -m tests.helpers.msr_guest --rate 200 --duration 2 --stats /tmp/msr.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

from zonewatch.lab import microvm as mv

MSR_SYSENTER_CS = 0x174


def guest_code(msr: int, value: int) -> bytes:
    code = bytearray()
    code += b"\x66\xb9" + struct.pack("<I", msr)  # mov ecx, msr (32-bit operand prefix)
    code += b"\x66\xb8" + struct.pack("<I", value & 0xFFFFFFFF)  # mov eax, value
    code += b"\x66\x31\xd2"  # xor edx, edx
    code += b"\x0f\x30"  # wrmsr
    code += b"\xf4"  # hlt -> KVM_EXIT_HLT
    code += bytes((0xEB, (-(len(code) + 2)) & 0xFF))  # jmp short start
    return bytes(code)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=1.0)
    p.add_argument("--msr", type=lambda s: int(s, 0), default=MSR_SYSENTER_CS)
    p.add_argument("--value", type=lambda s: int(s, 0), default=0x10)
    p.add_argument("--stats", type=Path, required=True)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: None)  # stop at the end of the duration only
    vm = mv.MicroVm(mv.MicroVmConfig(name="msr", rate=args.rate, pio_per_iter=0, mmio_per_iter=0))
    assert vm._mem is not None  # the guest's memory, mapped until close()
    code = guest_code(args.msr, args.value)
    vm._mem[mv.GUEST_CODE_ADDR : mv.GUEST_CODE_ADDR + len(code)] = code
    stop = threading.Event()
    thread = threading.Thread(target=vm.run_vcpu, args=(stop,), name="zw-vcpu0")
    thread.start()
    stop.wait(args.duration)
    stop.set()
    thread.join()
    doc = vm.snapshot(running=False) | {"pid": os.getpid(), "msr": args.msr, "value": args.value}
    vm.close()
    tmp = args.stats.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, args.stats)
    return 0 if doc["error"] is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
