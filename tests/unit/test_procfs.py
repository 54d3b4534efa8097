from __future__ import annotations

import os
from pathlib import Path

from zonewatch.inventory import procfs


def fake_proc(tmp_path: Path, pid: int, stat: bytes, cmdline: bytes = b"") -> Path:
    d = tmp_path / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_bytes(stat)
    (d / "cmdline").write_bytes(cmdline)
    return tmp_path


def test_stat_comm_with_spaces_and_parentheses(tmp_path: Path) -> None:
    rest = b" S 1 " + b" ".join(b"0" for _ in range(17)) + b" 424242 0 0"
    proc = fake_proc(tmp_path, 7, b"7 (CPU 0/KVM) x)" + rest)
    stat = procfs.read_stat(proc, 7)
    assert stat is not None
    assert stat.comm == "CPU 0/KVM) x"
    assert stat.ppid == 1
    assert stat.start_time == 424242


def test_stat_of_a_vanished_or_garbled_process_is_none(tmp_path: Path) -> None:
    assert procfs.read_stat(tmp_path, 9) is None
    proc = fake_proc(tmp_path, 8, b"garbage")
    assert procfs.read_stat(proc, 8) is None


def test_cmdline_keeps_invalid_utf8_roundtrippable(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 3, b"3 (x) S 1", b"qemu\0-name\0\xffbad\0")
    argv = procfs.read_cmdline(proc, 3)
    assert argv[:2] == ["qemu", "-name"]
    assert os.fsencode(argv[2]) == b"\xffbad"


def test_real_proc_self() -> None:
    stat = procfs.read_stat(Path("/proc"), os.getpid())
    assert stat is not None and stat.start_time > 0
    assert os.getpid() in procfs.list_pids(Path("/proc"))
    assert os.getpid() in procfs.thread_comms(Path("/proc"), os.getpid())
    assert procfs.tap_names(Path("/proc"), os.getpid()) == []
