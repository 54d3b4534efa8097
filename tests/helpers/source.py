"""tests/helpers/alert_source.py (the real delivery stack fed with made alerts) as a process."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[2]


class SourceProcess:
    def __init__(self, journal: Path, tokens: Path, address: str, log: Path, *extra: str) -> None:
        self.log_path = log
        self._log = log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.alert_source", "--journal", str(journal),
             "--tokens", str(tokens), "--grpc", address, *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until it listens (or dies)
        if not line.startswith("ready "):
            self.stop()
            raise AssertionError(f"source did not start: {log.read_text()}")
        self.address = line.split()[1]

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        rc = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return rc

    def __enter__(self) -> SourceProcess:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
