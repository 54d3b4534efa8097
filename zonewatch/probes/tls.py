"""Where a hooked process's errno is, so that a uretprobe can report -errno as a syscall
tracepoint does (a failed libc call returns -1 and leaves the error in errno).

errno is thread-local: at the thread pointer (the FS base on x86-64) plus a per-process
offset the dynamic linker chose, which glibc's own code reads from a GOT slot (its
R_X86_64_TPOFF64 relocation). The kernel keeps each thread's FS base in task_struct
(thread.fsbase); its offset is read from the running kernel's BTF, never from headers
(their layout differs from this kernel's). Both are looked up once: the offset into
task_struct per agent, the TLS offset per hooked process. Whatever cannot be found leaves
`ret` at -1.
"""

from __future__ import annotations

import logging
import struct
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

_BTF_STRUCT = 4
_BTF_QUALIFIERS = {8, 9, 10, 11, 18}  # typedef, volatile, const, restrict, type_tag
# Bytes after the 12-byte btf_type, by kind (x vlen where the kind has members).
_BTF_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}
_BTF_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}


def btf_member_offset(btf: bytes, path: tuple[tuple[str, str], ...]) -> int | None:
    """Byte offset of a nested member, e.g. (("task_struct", "thread"), ("thread_struct",
    "fsbase")): each step a struct name and one of its members."""
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", btf, 0)
    if magic != 0xEB9F:
        return None
    type_off, type_len, str_off, _str_len = struct.unpack_from("<IIII", btf, 8)
    strings = hdr_len + str_off

    def name(off: int) -> bytes:
        start = strings + off
        return btf[start : btf.index(b"\0", start)]

    structs: dict[bytes, list[tuple[bytes, int, int]]] = {}
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    while pos < end:
        name_off, info, _size = struct.unpack_from("<III", btf, pos)
        vlen, kind, kflag = info & 0xFFFF, (info >> 24) & 0x1F, info >> 31
        pos += 12
        if kind == _BTF_STRUCT and name_off:
            members = []
            for i in range(vlen):
                m_name, m_type, m_off = struct.unpack_from("<III", btf, pos + 12 * i)
                bits = m_off & 0xFFFFFF if kflag else m_off
                members.append((name(m_name), m_type, bits))
            structs.setdefault(name(name_off), members)
        pos += _BTF_FIXED.get(kind, 0) + _BTF_PER_VLEN.get(kind, 0) * vlen
    offset = 0
    for struct_name, member in path:
        found = [
            bits for m, _t, bits in structs.get(struct_name.encode(), []) if m == member.encode()
        ]
        if not found or found[0] % 8:
            return None
        offset += found[0] // 8
    return offset


@cache
def task_fsbase_offset() -> int | None:
    """Offset of thread.fsbase in this kernel's task_struct (x86-64), or None."""
    try:
        btf = VMLINUX_BTF.read_bytes()
        return btf_member_offset(btf, (("task_struct", "thread"), ("thread_struct", "fsbase")))
    except (OSError, struct.error, ValueError) as exc:
        log.info("file uprobes: no FS base offset from BTF (%s): failed calls give ret -1", exc)
        return None


def _sections(elf: bytes) -> list[tuple[int, int, int, int, int, int]]:
    """(type, addr, offset, size, link, entsize) of each section header of an ELF64 file."""
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    out = []
    for i in range(shnum):
        (_n, sh_type, _f, addr, offset, size, link, _info, _a, entsize) = struct.unpack_from(
            "<IIQQQQIIQQ", elf, shoff + i * shentsize
        )
        out.append((sh_type, addr, offset, size, link, entsize))
    return out


@cache
def errno_got_slot(libc: Path) -> int | None:
    """The address (in the file's terms) of the GOT slot holding errno's TLS offset."""
    try:
        elf = libc.read_bytes()
        if elf[:5] != b"\x7fELF\x02":
            return None
        sections = _sections(elf)
        dynsym = next(s for s in sections if s[0] == 11)  # SHT_DYNSYM
        strtab = sections[dynsym[4]]
        symbols: list[tuple[bytes, int, int]] = []  # (name, type, value)
        for off in range(dynsym[2], dynsym[2] + dynsym[3], 24):
            st_name, st_info, _o, _shndx, st_value, _size = struct.unpack_from("<IBBHQQ", elf, off)
            start = strtab[2] + st_name
            symbols.append((elf[start : elf.index(b"\0", start)], st_info & 0xF, st_value))
        errno = next(v for n, t, v in symbols if n == b"errno" and t == 6)  # STT_TLS
        for sh_type, _addr, offset, size, _link, _entsize in sections:
            if sh_type != 4:  # SHT_RELA
                continue
            for rel in range(offset, offset + size, 24):
                r_offset, r_info, r_addend = struct.unpack_from("<QQq", elf, rel)
                if r_info & 0xFFFFFFFF != 18:  # R_X86_64_TPOFF64
                    continue
                sym = r_info >> 32
                if (symbols[sym][2] if sym else 0) + r_addend == errno:
                    return int(r_offset)
    except (OSError, StopIteration, IndexError, ValueError, struct.error) as exc:
        log.info("file uprobes: no errno GOT slot in %s (%s)", libc, exc)
    return None


def errno_tls_offset(pid: int, libc: str) -> int | None:
    """errno's offset from the thread pointer in process `pid` (the same for all of its
    threads), read from the GOT slot the dynamic linker filled; None when not found."""
    slot = errno_got_slot(Path(libc))
    if slot is None:
        return None
    base = None
    try:
        real = Path(libc).resolve()
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and int(parts[2], 16) == 0:
                mapped = f"/proc/{pid}/root{parts[5]}" if libc.startswith("/proc/") else parts[5]
                if Path(mapped).resolve() == real:
                    base = int(parts[0].split("-")[0], 16)
                    break
        if base is None:
            return None
        with open(f"/proc/{pid}/mem", "rb") as mem:
            mem.seek(base + slot)
            (tpoff,) = struct.unpack("<q", mem.read(8))
    except (OSError, ValueError, struct.error) as exc:
        log.debug("file uprobes: errno offset of pid %d: %s", pid, exc)
        return None
    return int(tpoff)
