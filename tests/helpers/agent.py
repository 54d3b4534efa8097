"""The real agent as a subprocess (`zonewatch run`), its JSON lines read from a file."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

Line = dict[str, Any]


class AgentProcess:
    def __init__(self, workdir: Path, *args: str) -> None:
        self.jsonl = workdir / "agent.jsonl"
        self.log = workdir / "agent.log"
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zonewatch", "-v", "run", "--jsonl", str(self.jsonl), *args],
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
        )
        self._offset = 0
        self.lines: list[Line] = []
        self.wait_log("attached", timeout=90)

    def wait_log(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"agent never logged {needle!r}:\n{self.log.read_text()}")
            time.sleep(0.05)

    def read(self) -> list[Line]:
        """Lines written since the last read (only whole lines)."""
        if self.jsonl.exists():
            with self.jsonl.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            self._offset += end
            self.lines += [orjson.loads(line) for line in data[:end].splitlines()]
        return self.lines

    def wait_for(self, predicate: Callable[[list[Line]], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.read()):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"agent exited while waiting for {what}:\n{self.log.read_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got {len(self.lines)} lines")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        rc = self.proc.wait()
        self._log_file.close()
        return rc

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
