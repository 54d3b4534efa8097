"""`--file-hooks`: the option, the uprobe hook table against bpf/file.c, finding a process's
libc, and the clean-up of trace events a killed agent left (no BPF needed here)."""

from __future__ import annotations

import ctypes
import os
import re
import struct
from pathlib import Path

import pytest

from zonewatch.cli import build_parser
from zonewatch.probes.file import FileProbe
from zonewatch.probes.tls import btf_member_offset, errno_tls_offset
from zonewatch.probes.uprobes import LIBC_HOOKS, STREAM_IO_HOOKS, libc_path, remove_stale_events

FILE_C = Path(__file__).resolve().parents[2] / "bpf" / "file.c"


def test_file_hooks_option_defaults_to_tracepoints() -> None:
    parser = build_parser()
    assert parser.parse_args(["run"]).file_hooks == "tracepoints"
    assert parser.parse_args(["run", "--file-hooks", "uprobes"]).file_hooks == "uprobes"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--file-hooks", "kprobes"])


def test_unknown_hooks_are_refused() -> None:
    with pytest.raises(ValueError, match="none of tracepoints, uprobes"):
        FileProbe(hooks="kprobes")  # type: ignore[arg-type]


def test_every_hooked_program_is_in_the_uprobe_build_of_file_c() -> None:
    source = FILE_C.read_text()
    uprobe_part = source[
        source.index("#ifdef ZW_FILE_UPROBES") : source.index("#else /* syscall tracepoints */")
    ]
    defined = set(re.findall(r"^int (zw_\w+)\(struct pt_regs \*ctx\)", uprobe_part, re.M))
    named = {h.entry for h in LIBC_HOOKS + STREAM_IO_HOOKS}
    named |= {h.ret for h in LIBC_HOOKS + STREAM_IO_HOOKS if h.ret is not None}
    assert named == defined


def test_aliases_are_listed_once() -> None:
    symbols = [s for h in LIBC_HOOKS + STREAM_IO_HOOKS for s in h.symbols]
    assert len(symbols) == len(set(symbols))
    assert not {"read", "write", "readv", "writev"} & {s for h in LIBC_HOOKS for s in h.symbols}


def test_libc_of_a_live_process() -> None:
    path = libc_path(os.getpid())
    assert path is not None and re.search(r"/libc(-[\d.]+)?\.so", path), path
    assert libc_path(2**22 + 1) is None  # no such pid


def test_stale_trace_events_of_dead_agents_are_removed(tmp_path: Path) -> None:
    dead = 2**22 + 1  # above pid_max: never a live process
    (tmp_path / "uprobe_events").write_text(
        f"p:zw{dead}_1/p_52db4_f8150 /usr/lib/x86_64-linux-gnu/libc.so.6:0x00000000000f8150\n"
        f"r:zw{dead}_1/r_52db4_f8150 /usr/lib/x86_64-linux-gnu/libc.so.6:0x00000000000f8150\n"
        f"p:zw{os.getpid()}_2/p_52db4_f8150 /usr/lib/x86_64-linux-gnu/libc.so.6:0x0f8150\n"
        "p:uprobes/someone_else /bin/true:0x1000\n"
    )
    remove_stale_events(tmp_path)
    appended = (tmp_path / "uprobe_events").read_text().splitlines()[4:]
    assert appended == [f"-:zw{dead}_1/p_52db4_f8150", f"-:zw{dead}_1/r_52db4_f8150"]


def test_doctor_says_whether_uprobe_mode_can_work(tmp_path: Path) -> None:
    from zonewatch.doctor import uprobe_check

    assert not uprobe_check(tmp_path, {}).ok  # no uprobe_events
    (tmp_path / "uprobe_events").write_text("")
    check = uprobe_check(tmp_path, {"CONFIG_UPROBE_EVENTS": "y"})
    assert check.ok and not check.essential
    assert not uprobe_check(tmp_path, {"CONFIG_KPROBES": "y"}).ok  # uprobe events not built
    assert not uprobe_check(None, {}).ok  # no tracefs


def test_errno_is_found_through_the_thread_pointer() -> None:
    """This process's own errno: the TLS offset read from its GOT, added to the thread
    pointer, is where __errno_location() says errno is (and the thread pointer points at
    itself, as glibc's TCB does)."""
    libc = libc_path(os.getpid())
    assert libc is not None
    tpoff = errno_tls_offset(os.getpid(), libc)
    assert tpoff is not None and tpoff < 0
    lib = ctypes.CDLL(None)
    lib.__errno_location.restype = ctypes.c_void_p
    errno_addr = lib.__errno_location()
    thread_pointer = errno_addr - tpoff
    assert ctypes.c_uint64.from_address(thread_pointer).value == thread_pointer


def test_btf_member_offsets_of_a_made_up_type() -> None:
    strings = b"\0a\0x\0y\0b\0in\0"
    # struct a { int x; struct b y; } with struct b { int in; } at byte 8: BTF ids 1, 2, 3.
    types = b"".join(
        [
            struct.pack("<III", 0, 1 << 24, 4) + struct.pack("<I", 32),  # [1] INT
            struct.pack("<III", 1, (4 << 24) | 2, 16)
            + struct.pack("<III", 3, 1, 0)
            + struct.pack("<III", 5, 3, 64),  # [2] struct a
            struct.pack("<III", 7, (4 << 24) | 1, 4) + struct.pack("<III", 9, 1, 0),  # [3] b
        ]
    )
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    btf = header + types + strings
    assert btf_member_offset(btf, (("a", "y"), ("b", "in"))) == 8
    assert btf_member_offset(btf, (("a", "x"),)) == 0
    assert btf_member_offset(btf, (("a", "z"),)) is None
