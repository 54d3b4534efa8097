"""A stand-in backend process: performs file operations when told, so a test can put its pid
in a probe's filter first and then await exactly the events it caused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import TracebackType

SCRIPT = r"""
import os, sys, threading
root = sys.argv[1]
dfd = os.open(root, os.O_DIRECTORY | os.O_RDONLY)
print("ready", flush=True)


def run(cmd, rest):
    if cmd == "create":
        fd = os.open(rest[0], os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd)
        os.write(fd, b"x" * int(rest[1]))
        os.write(fd, b"y" * int(rest[1]))
        os.close(fd)
    elif cmd == "read":
        fd = os.open(rest[0], os.O_RDONLY, dir_fd=dfd)
        while os.read(fd, 4096):
            pass
        os.close(fd)
    elif cmd == "pcreate":  # as create, with positional writes (what 9p backends use)
        fd = os.open(rest[0], os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd)
        os.pwrite(fd, b"x" * int(rest[1]), 0)
        os.pwrite(fd, b"y" * int(rest[1]), int(rest[1]))
        os.close(fd)
    elif cmd == "pread":
        fd = os.open(rest[0], os.O_RDONLY, dir_fd=dfd)
        offset = 0
        while data := os.pread(fd, 4096, offset):
            offset += len(data)
        os.close(fd)
    elif cmd == "rename":
        os.rename(rest[0], rest[1], src_dir_fd=dfd, dst_dir_fd=dfd)
    elif cmd == "mkdir":
        os.mkdir(rest[0], dir_fd=dfd)
    elif cmd == "chmod":
        os.chmod(rest[0], 0o600, dir_fd=dfd)
    elif cmd == "unlink":
        os.unlink(rest[0], dir_fd=dfd)
    elif cmd == "rmdir":
        os.rmdir(rest[0], dir_fd=dfd)
    elif cmd == "open-missing":  # a failing open: the error is the record's return
        try:
            os.open(rest[0], os.O_RDONLY, dir_fd=dfd)
        except FileNotFoundError:
            pass
    elif cmd == "thread":  # the rest of the line, in a thread started now
        t = threading.Thread(target=run, args=(rest[0], rest[1:]))
        t.start()
        t.join()


for line in sys.stdin:
    cmd, *rest = line.split()
    if cmd == "quit":
        break
    run(cmd, rest)
    print("done", flush=True)
"""


class StandIn:
    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        assert self.proc.stdout.readline().strip() == "ready"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def do(self, *commands: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        for command in commands:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            assert self.proc.stdout.readline().strip() == "done", command

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
