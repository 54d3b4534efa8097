"""A tiny VMM in pure Python on the raw KVM ioctls: a controllable source of VM exits.

One VM, one memory slot, one vCPU running a few bytes of hand-assembled 16-bit real-mode
code. Each guest iteration does `--pio-per-iter` `out` writes to `--port` (KVM_EXIT_IO),
`--mmio-per-iter` byte writes to the unmapped guest-physical `--mmio-addr` (KVM_EXIT_MMIO)
and one `hlt` (KVM_EXIT_HLT: there is no in-kernel irqchip), then loops. Every exit comes
back to this process, which counts it and paces iterations to `--rate` by sleeping after the
HLT exit against a time.monotonic() schedule. The counts are written as JSON to `--stats`
(atomically, about every 0.5 s and at exit) so tests can compare what the agent's probes
see with what really happened.

Two optional devices make it a zone like the others: `--tap NAME` holds an existing tap
open as QEMU's `-netdev tap` does (the inventory finds it in /proc/PID/fdinfo), and
`--file-dir DIR` is a toy file backend: for every port write the guest makes, the VMM
writes one byte to each of `--file-ops` files DIR/blk-<n % 64> through a directory fd
(open, write, close), as QEMU's 9p server acts on a guest's behalf: a guest-driven source of
file-channel records (3 per file: open, first write, close).

    python -m zonewatch.lab.microvm --name demo --rate 2000 --stats /tmp/demo.json

How others find it: the command line contains "zonewatch.lab.microvm", the main thread's
comm is "zw-microvm" and the thread that calls KVM_RUN is named "zw-vcpu0". With
`--unnamed-threads` the vCPU thread keeps the process comm too, as QEMU's threads do
without `debug-threads=on` (Kata's): only what the thread does (KVM_RUN) tells it apart.

Deliberately absent: `vmcall` (it spins in real mode under the nested PVM of our test
machines) and any third-party package (fcntl.ioctl + mmap + ctypes only).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from zonewatch.errors import ConfigError, EnvironmentProblem, ZonewatchError

PROG = "zonewatch.lab.microvm"
PROCESS_COMM = "zw-microvm"
VCPU_COMM_FORMAT = "zw-vcpu{index}"  # inventories match r"zw-vcpu\d+"
KVM_DEVICE = "/dev/kvm"

# --------------------------------------------------------------------------------------
# ioctl numbers: the kernel's asm-generic/ioctl.h arithmetic.
#   bits 0-7 nr, 8-15 type, 16-29 size, 30-31 direction (x86: none=0, write=1, read=2).
# --------------------------------------------------------------------------------------
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, type_, nr, size)


# --------------------------------------------------------------------------------------
# UAPI structs (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h).
# --------------------------------------------------------------------------------------
class KvmUserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region (32 bytes)."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),  # bytes
        ("userspace_addr", ctypes.c_uint64),  # start of the user-space allocation
    )


class KvmRegs(ctypes.Structure):
    """struct kvm_regs (x86, 144 bytes)."""

    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    )  # fmt: skip


class KvmSegment(ctypes.Structure):
    """struct kvm_segment (24 bytes): the hidden (cached) part of a segment register."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    )


class KvmDtable(ctypes.Structure):
    """struct kvm_dtable (16 bytes)."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    )


KVM_NR_INTERRUPTS = 256


class KvmSregs(ctypes.Structure):
    """struct kvm_sregs (x86, 312 bytes)."""

    _fields_ = (
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    )


KVMIO = 0xAE
KVM_API_VERSION = 12  # the only version there has ever been

KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _IOW(KVMIO, 0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _IOR(KVMIO, 0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _IOW(KVMIO, 0x84, ctypes.sizeof(KvmSregs))

KVM_CAP_USER_MEMORY = 3

# enum of kvm_run.exit_reason (uapi/linux/kvm.h), the ones this VMM can meet.
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17

EXIT_REASON_NAMES: dict[int, str] = {
    KVM_EXIT_UNKNOWN: "UNKNOWN",
    KVM_EXIT_EXCEPTION: "EXCEPTION",
    KVM_EXIT_IO: "IO",
    KVM_EXIT_HYPERCALL: "HYPERCALL",
    KVM_EXIT_DEBUG: "DEBUG",
    KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO",
    KVM_EXIT_IRQ_WINDOW_OPEN: "IRQ_WINDOW_OPEN",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
}
# Exits after which the guest cannot go on: the VMM stops and reports the error.
FATAL_EXITS = frozenset(
    {KVM_EXIT_UNKNOWN, KVM_EXIT_EXCEPTION, KVM_EXIT_SHUTDOWN, KVM_EXIT_FAIL_ENTRY,
     KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_DEBUG}
)  # fmt: skip

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# struct kvm_run, the page shared with the kernel (mmap of the vCPU fd), x86 layout:
#   0  __u8  request_interrupt_window
#   1  __u8  immediate_exit
#   2  __u8  padding1[6]
#   8  __u32 exit_reason
#  12  __u8  ready_for_interrupt_injection
#  13  __u8  if_flag
#  14  __u16 flags
#  16  __u64 cr8
#  24  __u64 apic_base
#  32  union { ... } (the exit-specific part), of which:
#      KVM_EXIT_IO:   32 __u8 direction (0 in, 1 out), 33 __u8 size (1/2/4 bytes),
#                     34 __u16 port, 36 __u32 count, 40 __u64 data_offset (the data lives
#                     at kvm_run + data_offset, size * count bytes)
#      KVM_EXIT_MMIO: 32 __u64 phys_addr, 40 __u8 data[8], 48 __u32 len, 52 __u8 is_write
RUN_EXIT_REASON_OFFSET = 8
RUN_UNION_OFFSET = 32
RUN_MMIO_DATA_OFFSET = 40
_EXIT_REASON = struct.Struct("<I")
_EXIT_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_EXIT_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write

# --------------------------------------------------------------------------------------
# Guest layout (guest-physical addresses).
# --------------------------------------------------------------------------------------
GUEST_MEM_SIZE = 0x10000  # one 64 KiB slot at guest-physical 0
GUEST_CODE_ADDR = 0x1000  # real mode, CS base 0: IP = 0x1000
GUEST_STACK_TOP = 0x8000  # unused by the code, set for sanity
TSS_ADDR = 0xFFFBD000  # 3 pages KVM needs below 4 GiB on VMX hosts without unrestricted guest
PAGE_MASK = ~0xFFF
X86_RFLAGS_RESERVED = 0x2  # bit 1 is always set; IF=0 so `hlt` is never woken in-kernel

DEFAULT_PORT = 0x80
DEFAULT_MMIO_ADDR = 0xD0000000
DEFAULT_RATE = 1000.0
STATS_INTERVAL_S = 0.5
MAX_LAG_S = 1.0  # further behind the schedule than this: restart it instead of bursting


def assemble_guest(
    port: int, mmio_offset: int, pio_per_iter: int, mmio_per_iter: int, sweep: bool = False
) -> bytes:
    """The guest program, 16-bit real mode, assembled by hand.

    ES is pointed (through KVM_SET_SREGS) at the 64 KiB-aligned block holding the MMIO
    address, so `mmio_offset` is the address's low 16 bits. BL is a counter whose low byte
    is the value written, so successive writes differ. With `sweep`, each `out` goes to
    the next port (all 65536 in turn) and each MMIO write to the next page of the block
    (16 in turn): a guest choosing as many keys as it can.
    """

    def imm16(value: int) -> tuple[int, int]:
        return value & 0xFF, (value >> 8) & 0xFF

    code = bytearray()

    def rel8(target: int) -> int:
        """Displacement from the end of a 2-byte short jump being emitted now to target."""
        disp = target - (len(code) + 2)
        if not -128 <= disp <= 127:
            raise AssertionError(f"short jump out of range: {disp}")
        return disp & 0xFF

    def patch_rel8(at: int, target: int) -> None:
        """Fix the displacement byte at `at` (last byte of a short jump) to reach target."""
        disp = target - (at + 1)
        if not -128 <= disp <= 127:
            raise AssertionError(f"short jump out of range: {disp}")
        code[at] = disp & 0xFF

    code += bytes((0xBA, *imm16(port)))  # mov dx, port
    code += bytes((0xBF, *imm16(mmio_offset)))  # mov di, mmio_offset
    code += bytes((0x31, 0xDB))  # xor bx, bx            ; value counter
    top = len(code)
    code += bytes((0xB9, *imm16(pio_per_iter)))  # mov cx, pio_per_iter
    code += bytes((0xE3, 0x00))  # jcxz mmio_part         ; N == 0: no port I/O
    skip_pio = len(code) - 1
    pio_loop = len(code)
    code += bytes((0x88, 0xD8))  # mov al, bl             ; 88 /r, modrm 11 011 000
    code += bytes((0xEE,))  # out dx, al                   ; -> KVM_EXIT_IO
    if sweep:
        code += bytes((0x42,))  # inc dx                   ; the next port
    code += bytes((0x43,))  # inc bx
    code += bytes((0xE2, rel8(pio_loop)))  # loop pio_loop ; --cx, jump while cx != 0
    mmio_part = len(code)
    patch_rel8(skip_pio, mmio_part)
    code += bytes((0xB9, *imm16(mmio_per_iter)))  # mov cx, mmio_per_iter
    code += bytes((0xE3, 0x00))  # jcxz halt              ; M == 0: no MMIO
    skip_mmio = len(code) - 1
    mmio_loop = len(code)
    code += bytes((0x88, 0xD8))  # mov al, bl
    code += bytes((0x26, 0x88, 0x05))  # mov es:[di], al ; 26 = ES override, modrm 00 000 101
    #                                                    ; -> KVM_EXIT_MMIO (unmapped)
    if sweep:
        code += bytes((0x81, 0xC7, *imm16(0x1000)))  # add di, 0x1000 ; the next page
    code += bytes((0x43,))  # inc bx
    code += bytes((0xE2, rel8(mmio_loop)))  # loop mmio_loop
    halt = len(code)
    patch_rel8(skip_mmio, halt)
    code += bytes((0xF4,))  # hlt                          ; -> KVM_EXIT_HLT (no irqchip)
    code += bytes((0xEB, rel8(top)))  # jmp short top
    return bytes(code)


# --------------------------------------------------------------------------------------
# Configuration, counters.
# --------------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class MicroVmConfig:
    name: str
    rate: float = DEFAULT_RATE  # guest iterations per second; 0 = as fast as possible
    pio_per_iter: int = 1
    mmio_per_iter: int = 1
    port: int = DEFAULT_PORT
    mmio_addr: int = DEFAULT_MMIO_ADDR
    duration: float = 0.0  # seconds; 0 = until SIGTERM/SIGINT
    stats: Path | None = None
    tap: str = ""  # an existing tap held open while the VM runs
    file_dir: Path | None = None  # the toy file backend's folder (see the module doc)
    file_ops: int = 1  # files the backend writes per port write
    sweep: bool = False  # each write to the next port / MMIO page (see assemble_guest)
    unnamed_threads: bool = False  # the vCPU thread keeps the process comm (Kata's QEMU)

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("--name", "must not be empty")
        if self.rate < 0:
            raise ConfigError("--rate", f"must be >= 0, got {self.rate}")
        if self.duration < 0:
            raise ConfigError("--duration", f"must be >= 0, got {self.duration}")
        for opt, value in (
            ("--pio-per-iter", self.pio_per_iter),
            ("--mmio-per-iter", self.mmio_per_iter),
        ):
            if not 0 <= value <= 0xFFFF:
                raise ConfigError(opt, f"must be in 0..65535, got {value}")
        if not 0 <= self.port <= 0xFFFF:
            raise ConfigError("--port", f"must be in 0x0..0xffff, got {self.port:#x}")
        if not GUEST_MEM_SIZE <= self.mmio_addr <= 0xFFFFFFFF:
            raise ConfigError(
                "--mmio-addr",
                f"must be in {GUEST_MEM_SIZE:#x}..0xffffffff (outside guest RAM), "
                f"got {self.mmio_addr:#x}",
            )
        if TSS_ADDR <= self.mmio_addr < TSS_ADDR + 3 * 0x1000:
            raise ConfigError("--mmio-addr", f"overlaps the TSS pages at {TSS_ADDR:#x}")
        if not 1 <= self.file_ops <= 4096:
            raise ConfigError("--file-ops", f"must be in 1..4096, got {self.file_ops}")
        if len(self.tap.encode(errors="surrogateescape")) > 15:
            raise ConfigError("--tap", f"{self.tap!r} is longer than 15 bytes")


@dataclass(slots=True)
class ExitCounts:
    """Exits seen by the vCPU thread; mutated under MicroVm's lock."""

    iterations: int = 0
    io: int = 0
    mmio: int = 0
    hlt: int = 0
    other: int = 0
    ports: dict[int, int] = field(default_factory=dict)
    mmio_pages: dict[int, int] = field(default_factory=dict)
    other_reasons: dict[int, int] = field(default_factory=dict)

    @property
    def userspace_exits(self) -> int:
        return self.io + self.mmio + self.hlt + self.other


# --------------------------------------------------------------------------------------
# Small libc helpers.
# --------------------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg2: int | bytes) -> None:
    global _libc  # noqa: PLW0603 (lazily loaded once)
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    arg: ctypes.c_ulong | ctypes.c_char_p = (
        ctypes.c_char_p(arg2) if isinstance(arg2, bytes) else ctypes.c_ulong(arg2)
    )
    if _libc.prctl(option, arg, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def _ioctl_ulong(fd: int, request: int, value: int) -> int:
    """ioctl(fd, request, (unsigned long)value), for arguments above INT_MAX."""
    global _libc  # noqa: PLW0603
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    ret: int = _libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(value))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioctl({request:#x}): {os.strerror(err)}")
    return ret


def set_comm(name: str) -> None:
    """Name the calling thread (its /proc/.../comm; the kernel keeps 15 bytes)."""
    _prctl(PR_SET_NAME, name.encode()[:15])


# --------------------------------------------------------------------------------------
# The VMM.
# --------------------------------------------------------------------------------------
class MicroVm:
    """One VM with one vCPU running the exit-loop guest; `run_vcpu` is the KVM_RUN loop.

    Not thread-safe except for `snapshot()`, which any thread may call while `run_vcpu`
    runs in another.
    """

    def __init__(self, config: MicroVmConfig) -> None:
        config.validate()
        self.config = config
        self.counts = ExitCounts()
        self.vcpu_tid: int | None = None
        self.error: str | None = None
        self._lock = threading.Lock()
        self._started: float | None = None
        self._stopped: float | None = None
        self._kvm_fd = -1
        self._vm_fd = -1
        self._vcpu_fd = -1
        self._mem: mmap.mmap | None = None
        self._run: mmap.mmap | None = None
        self._file_dir_fd = -1
        try:
            self._setup()
            if config.file_dir is not None:
                self._open_file_dir(config.file_dir)
        except BaseException:
            self.close()
            raise

    # ---- setup ----
    def _setup(self) -> None:
        try:
            self._kvm_fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise EnvironmentProblem(KVM_DEVICE, "not found: this host offers no KVM") from None
        except PermissionError:
            raise EnvironmentProblem(
                KVM_DEVICE, "permission denied (run as root or join the kvm group)"
            ) from None
        except OSError as exc:
            raise EnvironmentProblem(KVM_DEVICE, f"cannot open: {exc.strerror}") from None

        version = fcntl.ioctl(self._kvm_fd, KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            raise EnvironmentProblem(KVM_DEVICE, f"KVM API version {version}, need 12")
        if fcntl.ioctl(self._kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY) <= 0:
            raise EnvironmentProblem(KVM_DEVICE, "KVM_CAP_USER_MEMORY missing")
        try:
            self._vm_fd = fcntl.ioctl(self._kvm_fd, KVM_CREATE_VM, 0)
        except OSError as exc:
            raise EnvironmentProblem(KVM_DEVICE, f"KVM_CREATE_VM failed: {exc.strerror}") from None
        os.set_inheritable(self._vm_fd, False)

        # Needed by VMX hosts without unrestricted guest for real mode; harmless elsewhere,
        # and some KVM flavours (PVM) may refuse it, which is fine for this guest.
        # fcntl.ioctl passes a C int, which cannot hold this address: go through libc.
        with contextlib.suppress(OSError):
            _ioctl_ulong(self._vm_fd, KVM_SET_TSS_ADDR, TSS_ADDR)

        cfg = self.config
        self._mem = mmap.mmap(-1, GUEST_MEM_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        code = assemble_guest(
            cfg.port, cfg.mmio_addr & 0xFFFF, cfg.pio_per_iter, cfg.mmio_per_iter, cfg.sweep
        )
        self._mem[GUEST_CODE_ADDR : GUEST_CODE_ADDR + len(code)] = code
        mem_buf = (ctypes.c_ubyte * GUEST_MEM_SIZE).from_buffer(self._mem)
        region = KvmUserspaceMemoryRegion(
            slot=0,
            flags=0,
            guest_phys_addr=0,
            memory_size=GUEST_MEM_SIZE,
            userspace_addr=ctypes.addressof(mem_buf),
        )
        del mem_buf  # the address stays valid as long as self._mem is mapped
        fcntl.ioctl(self._vm_fd, KVM_SET_USER_MEMORY_REGION, region)

        self._vcpu_fd = fcntl.ioctl(self._vm_fd, KVM_CREATE_VCPU, 0)
        os.set_inheritable(self._vcpu_fd, False)
        run_size = fcntl.ioctl(self._kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0)
        self._run = mmap.mmap(
            self._vcpu_fd, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )

        sregs = KvmSregs()
        fcntl.ioctl(self._vcpu_fd, KVM_GET_SREGS, sregs)
        # Real mode, flat at 0: CS/DS/SS base 0, selector 0, 64 KiB limits (the reset
        # state has CS base 0xffff0000; we start in low memory instead).
        for seg in (sregs.cs, sregs.ds, sregs.ss, sregs.fs, sregs.gs):
            seg.base = 0
            seg.selector = 0
        # ES: the hidden base points at the 64 KiB block holding the MMIO address, which a
        # real-mode selector (base = selector * 16) could not reach above 1 MiB.
        sregs.es.base = cfg.mmio_addr & ~0xFFFF
        sregs.es.selector = 0
        sregs.es.limit = 0xFFFF
        fcntl.ioctl(self._vcpu_fd, KVM_SET_SREGS, sregs)

        regs = KvmRegs()
        regs.rip = GUEST_CODE_ADDR
        regs.rsp = GUEST_STACK_TOP
        regs.rflags = X86_RFLAGS_RESERVED
        fcntl.ioctl(self._vcpu_fd, KVM_SET_REGS, regs)

    def _open_file_dir(self, path: Path) -> None:
        try:
            self._file_dir_fd = os.open(path, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError("--file-dir", f"{path}: {exc.strerror}") from None

    def backend_write(self, n: int, data: int) -> None:
        """The toy file backend: one byte to each of file_ops files blk-<i % 64> (open,
        write, close)."""
        byte = bytes((data & 0xFF,))
        flags = os.O_WRONLY | os.O_CREAT
        first = n * self.config.file_ops
        for i in range(first, first + self.config.file_ops):
            fd = os.open(f"blk-{i % 64}", flags, 0o600, dir_fd=self._file_dir_fd)
            try:
                os.write(fd, byte)
            finally:
                os.close(fd)

    def close(self) -> None:
        if self._run is not None:
            self._run.close()
            self._run = None
        for attr in ("_vcpu_fd", "_vm_fd", "_kvm_fd", "_file_dir_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
        if self._mem is not None:
            self._mem.close()
            self._mem = None

    # ---- the vCPU loop ----
    def run_vcpu(self, stop: threading.Event, vcpu_index: int = 0) -> None:
        """KVM_RUN until `stop` is set or the guest dies; call it in the vCPU thread.

        Names the calling thread (unless config.unnamed_threads), blocks SIGTERM/SIGINT in
        it (they belong to the main thread; KVM_RUN then never sees them) and records a
        fatal problem in `error`.
        """
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        if not self.config.unnamed_threads:
            set_comm(VCPU_COMM_FORMAT.format(index=vcpu_index))
        self.vcpu_tid = threading.get_native_id()
        try:
            self._loop(stop)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._stopped = time.monotonic()
            stop.set()

    def _loop(self, stop: threading.Event) -> None:  # noqa: PLR0915 (one hot loop)
        run = self._run
        if run is None:
            raise RuntimeError("MicroVm is closed")
        fd = self._vcpu_fd
        ioctl = fcntl.ioctl
        reason_unpack = _EXIT_REASON.unpack_from
        io_unpack = _EXIT_IO.unpack_from
        mmio_unpack = _EXIT_MMIO.unpack_from
        lock = self._lock
        counts = self.counts
        ports = counts.ports
        pages = counts.mmio_pages
        monotonic = time.monotonic
        interval = 1.0 / self.config.rate if self.config.rate > 0 else 0.0
        backend = self.backend_write if self._file_dir_fd >= 0 else None

        start = monotonic()
        with lock:
            self._started = start
        deadline = start
        while not stop.is_set():
            try:
                ioctl(fd, KVM_RUN, 0)
            except InterruptedError:
                with lock:
                    counts.other += 1
                    counts.other_reasons[KVM_EXIT_INTR] = (
                        counts.other_reasons.get(KVM_EXIT_INTR, 0) + 1
                    )
                continue
            reason = reason_unpack(run, RUN_EXIT_REASON_OFFSET)[0]
            if reason == KVM_EXIT_IO:
                direction, size, port, count, data_offset = io_unpack(run, RUN_UNION_OFFSET)
                if direction == KVM_EXIT_IO_IN:  # the guest never reads; answer zeros
                    run[data_offset : data_offset + size * count] = bytes(size * count)
                with lock:
                    counts.io += 1
                    ports[port] = ports.get(port, 0) + 1
                if backend is not None:
                    backend(counts.io, run[data_offset])
            elif reason == KVM_EXIT_MMIO:
                phys_addr, _data, length, is_write = mmio_unpack(run, RUN_UNION_OFFSET)
                if not is_write:  # a read of nothing: zeros
                    run[RUN_MMIO_DATA_OFFSET : RUN_MMIO_DATA_OFFSET + length] = bytes(length)
                page = phys_addr & PAGE_MASK
                with lock:
                    counts.mmio += 1
                    pages[page] = pages.get(page, 0) + 1
            elif reason == KVM_EXIT_HLT:
                with lock:
                    counts.hlt += 1
                    counts.iterations += 1
                if interval:
                    deadline += interval
                    delay = deadline - monotonic()
                    if delay > 0:
                        stop.wait(delay)
                    elif delay < -MAX_LAG_S:
                        deadline = monotonic()  # far behind: do not burst to catch up
            else:
                with lock:
                    counts.other += 1
                    counts.other_reasons[reason] = counts.other_reasons.get(reason, 0) + 1
                if reason in FATAL_EXITS:
                    regs = KvmRegs()
                    ioctl(fd, KVM_GET_REGS, regs)
                    name = EXIT_REASON_NAMES.get(reason, str(reason))
                    self.error = f"guest stopped: KVM_EXIT_{name} at rip={regs.rip:#x}"
                    return

    # ---- reporting ----
    def snapshot(self, *, running: bool) -> dict[str, Any]:
        """The stats document (the --stats JSON), consistent across its counters."""
        with self._lock:
            c = self.counts
            if self._started is None:
                elapsed = 0.0
            else:
                end = self._stopped if self._stopped is not None else time.monotonic()
                elapsed = end - self._started
            doc: dict[str, Any] = {
                "name": self.config.name,
                "pid": os.getpid(),
                "vcpu_tid": self.vcpu_tid,
                "iterations": c.iterations,
                "exits": {"io": c.io, "mmio": c.mmio, "hlt": c.hlt, "other": c.other},
                "userspace_exits": c.userspace_exits,
                "ports": {f"{p:#x}": n for p, n in sorted(c.ports.items())},
                "mmio_pages": {f"{p:#x}": n for p, n in sorted(c.mmio_pages.items())},
                "other_reasons": {
                    EXIT_REASON_NAMES.get(r, str(r)): n for r, n in c.other_reasons.items()
                },
                "running": running,
                "elapsed_s": round(elapsed, 6),
                "config": {
                    "rate": self.config.rate,
                    "pio_per_iter": self.config.pio_per_iter,
                    "mmio_per_iter": self.config.mmio_per_iter,
                    "port": f"{self.config.port:#x}",
                    "mmio_addr": f"{self.config.mmio_addr:#x}",
                },
                "error": self.error,
            }
        return doc


def write_stats(path: Path, doc: dict[str, Any]) -> None:
    """Replace `path` atomically: readers see the old or the new document, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def _open_tap(name: str) -> Any:
    """Attach to tap `name` (it must exist, as QEMU's script=no taps do); held until exit."""
    from zonewatch.lab.tapfd import TapFd

    try:
        return TapFd(name)
    except OSError as exc:
        raise EnvironmentProblem(f"tap {name}", f"cannot attach: {exc.strerror}") from None


def serve(config: MicroVmConfig) -> int:
    """Run the micro-VM in this process until duration, a signal, or a guest error."""
    set_comm(PROCESS_COMM)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    tap = _open_tap(config.tap) if config.tap else None
    vm = MicroVm(config)
    thread = threading.Thread(target=vm.run_vcpu, args=(stop,), name="zw-vcpu0", daemon=True)
    try:
        thread.start()
        end = time.monotonic() + config.duration if config.duration > 0 else None
        while True:
            timeout = STATS_INTERVAL_S
            if end is not None:
                timeout = max(0.0, min(timeout, end - time.monotonic()))
            if stop.wait(timeout):
                break
            if end is not None and time.monotonic() >= end:
                break
            if config.stats is not None:
                write_stats(config.stats, vm.snapshot(running=True))
    finally:
        stop.set()
        thread.join(timeout=5.0)
        final = vm.snapshot(running=False)
        if config.stats is not None:
            write_stats(config.stats, final)
        else:
            print(json.dumps(final), flush=True)
        if not thread.is_alive():  # never pull the memory from under a running vCPU
            vm.close()
        if tap is not None:
            tap.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if vm.error is not None:
        print(f"{PROG}: {config.name}: {vm.error}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------
def _int_auto(text: str) -> int:
    return int(text, 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="A tiny pure-Python VMM whose guest loops on port I/O, MMIO and hlt.",
    )
    p.add_argument("--name", required=True, help="zone name reported in the stats")
    p.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        help="guest iterations per second, 0 = as fast as possible",
    )
    p.add_argument("--pio-per-iter", type=int, default=1, help="`out` writes per iteration")
    p.add_argument("--mmio-per-iter", type=int, default=1, help="MMIO writes per iteration")
    p.add_argument("--port", type=_int_auto, default=DEFAULT_PORT, help="I/O port (0x80)")
    p.add_argument(
        "--mmio-addr",
        type=_int_auto,
        default=DEFAULT_MMIO_ADDR,
        help="unmapped guest-physical address written to (0xd0000000)",
    )
    p.add_argument(
        "--duration", type=float, default=0.0, help="seconds to run, 0 = until SIGTERM/SIGINT"
    )
    p.add_argument(
        "--stats",
        type=Path,
        default=None,
        help="JSON stats file, rewritten every 0.5 s (default: print at exit)",
    )
    p.add_argument("--tap", default="", help="hold this existing tap open, as QEMU does")
    p.add_argument(
        "--file-dir",
        type=Path,
        default=None,
        help="toy file backend: each port write writes a byte to --file-ops files in DIR",
    )
    p.add_argument("--file-ops", type=int, default=1, help="files per port write (1)")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="each port write to the next port, each MMIO write to the next page",
    )
    p.add_argument(
        "--unnamed-threads",
        action="store_true",
        help=f"leave the vCPU thread named {PROCESS_COMM!r}, as Kata's QEMU leaves its threads",
    )
    p.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="die with this process (PR_SET_PDEATHSIG); used by MicroVmProcess",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.parent_pid is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != args.parent_pid:  # the parent died before prctl took effect
                return 1
        config = MicroVmConfig(
            name=args.name,
            rate=args.rate,
            pio_per_iter=args.pio_per_iter,
            mmio_per_iter=args.mmio_per_iter,
            port=args.port,
            mmio_addr=args.mmio_addr,
            duration=args.duration,
            stats=args.stats,
            tap=args.tap,
            file_dir=args.file_dir,
            file_ops=args.file_ops,
            sweep=args.sweep,
            unnamed_threads=args.unnamed_threads,
        )
        return serve(config)
    except ZonewatchError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


# --------------------------------------------------------------------------------------
# Driving it from tests and the lab: a child process.
# --------------------------------------------------------------------------------------
class MicroVmProcess:
    """`python -m zonewatch.lab.microvm` as a child process, stopped on exit of the block.

    The child dies with the thread that started it (PR_SET_PDEATHSIG via --parent-pid), so
    an aborted test leaves no VM behind.
    """

    def __init__(
        self,
        name: str,
        *,
        rate: float = DEFAULT_RATE,
        pio_per_iter: int = 1,
        mmio_per_iter: int = 1,
        port: int = DEFAULT_PORT,
        mmio_addr: int = DEFAULT_MMIO_ADDR,
        duration: float = 0.0,
        stats: Path | None = None,
        tap: str = "",
        file_dir: Path | None = None,
        file_ops: int = 1,
        sweep: bool = False,
        unnamed_threads: bool = False,
        python: str = sys.executable,
    ) -> None:
        self.config = MicroVmConfig(
            name=name,
            rate=rate,
            pio_per_iter=pio_per_iter,
            mmio_per_iter=mmio_per_iter,
            port=port,
            mmio_addr=mmio_addr,
            duration=duration,
            stats=stats,
            tap=tap,
            file_dir=file_dir,
            file_ops=file_ops,
            sweep=sweep,
            unnamed_threads=unnamed_threads,
        )
        self.config.validate()
        self.python = python
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if stats is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="zw-microvm-")
            stats = Path(self._tmpdir.name) / f"{name}.json"
        self.stats_path: Path = stats
        self.proc: subprocess.Popen[bytes] | None = None
        self.final_stats: dict[str, Any] | None = None

    def command(self) -> list[str]:
        c = self.config
        return [
            self.python, "-m", PROG,
            "--name", c.name,
            "--rate", repr(c.rate),
            "--pio-per-iter", str(c.pio_per_iter),
            "--mmio-per-iter", str(c.mmio_per_iter),
            "--port", f"{c.port:#x}",
            "--mmio-addr", f"{c.mmio_addr:#x}",
            "--duration", repr(c.duration),
            "--stats", str(self.stats_path),
            "--parent-pid", str(os.getpid()),
            *(("--tap", c.tap) if c.tap else ()),
            *(("--file-dir", str(c.file_dir), "--file-ops", str(c.file_ops))
              if c.file_dir is not None else ()),
            *(("--sweep",) if c.sweep else ()),
            *(("--unnamed-threads",) if c.unnamed_threads else ()),
        ]  # fmt: skip

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("MicroVmProcess not started")
        return self.proc.pid

    def start(self) -> Self:
        if self.proc is not None:
            raise RuntimeError("MicroVmProcess already started")
        with contextlib.suppress(FileNotFoundError):
            self.stats_path.unlink()
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            self.command(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        return self

    def read_stats(self) -> dict[str, Any] | None:
        """The latest stats document, or None before the first one is written."""
        try:
            doc: dict[str, Any] = json.loads(self.stats_path.read_text())
        except FileNotFoundError:
            return None
        return doc

    def wait_stats(
        self,
        pred: Callable[[dict[str, Any]], bool],
        timeout: float,
        poll: float = 0.05,
    ) -> dict[str, Any]:
        """Poll the stats file until `pred(stats)` holds; TimeoutError otherwise.

        Raises RuntimeError at once if the child exits first (with its stderr).
        """
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while True:
            last = self.read_stats()
            if last is not None and pred(last):
                return last
            if self.proc is not None and self.proc.poll() is not None:
                last = self.read_stats()
                if last is not None and pred(last):
                    return last
                raise RuntimeError(
                    f"microvm {self.config.name} exited with {self.proc.returncode}: "
                    f"{self._stderr()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(f"microvm {self.config.name}: condition not met; last={last}")
            time.sleep(poll)

    def _stderr(self) -> str:
        if self.proc is None or self.proc.stderr is None or self.proc.poll() is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace").strip()

    def stop(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the final stats (None if none)."""
        proc = self.proc
        if proc is None:
            return self.final_stats
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        self.final_stats = self.read_stats()
        return self.final_stats

    def close(self) -> None:
        self.stop()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
