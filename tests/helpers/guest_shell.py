"""Commands run inside a lab zone on demand, through its share, and QEMU's QMP from the host.

A zone started with `RUNNER_WORKLOAD` polls its share for `cmd<N>.sh` (N = 0, 1, ...), runs
each once in order with busybox sh, and leaves its output in `cmd<N>.out` and its exit status
in `cmd<N>.rc`. The host writes a command under a temporary name and renames it, so the guest
never runs half a script. Works on both layouts (9p or virtiofs share at $ZW_SHARE).
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zonewatch.lab.qemu import QemuZone

RUNNER_WORKLOAD = """\
n=0
while :; do
  if [ -e "$ZW_SHARE/cmd$n.sh" ]; then
    sh "$ZW_SHARE/cmd$n.sh" > "$ZW_SHARE/cmd$n.out" 2>&1
    echo $? > "$ZW_SHARE/cmd$n.rc"
    n=$((n+1))
  fi
  sleep 0.2
done
"""


@dataclass(slots=True)
class GuestShell:
    """Sends commands to one zone running RUNNER_WORKLOAD."""

    zone: QemuZone
    sent: int = 0

    def send(self, script: str) -> int:
        """Hand the guest a script; returns its number (for `result`)."""
        number = self.sent
        share = self.zone.share_dir
        staged = share / f".cmd{number}.tmp"
        staged.write_text(script)
        staged.rename(share / f"cmd{number}.sh")
        self.sent += 1
        return number

    def result(self, number: int, timeout: float) -> tuple[int, str]:
        """(exit status, output) of script `number`, once the guest has run it."""
        rc_file = self.zone.share_dir / f"cmd{number}.rc"
        deadline = time.monotonic() + timeout
        while not (rc_file.exists() and rc_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.zone.name}: command {number} not done in {timeout} s:\n"
                    f"{self.zone.console_tail()}"
                )
            time.sleep(0.05)
        output = (self.zone.share_dir / f"cmd{number}.out").read_text()
        return int(rc_file.read_text()), output

    def run(self, script: str, timeout: float) -> tuple[int, str]:
        return self.result(self.send(script), timeout)


def qmp_execute(qmp_socket: Path, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One QMP command on a fresh connection; returns QEMU's reply (raises on an error)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(qmp_socket))
        stream = sock.makefile("rwb")
        json.loads(stream.readline())  # the greeting
        for request in ({"execute": "qmp_capabilities"},
                        {"execute": command, "arguments": arguments}):  # fmt: skip
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            while True:  # asynchronous events may come first
                reply: dict[str, Any] = json.loads(stream.readline())
                if "return" in reply or "error" in reply:
                    break
            if "error" in reply:
                raise AssertionError(f"QMP {request['execute']} at {qmp_socket}: {reply}")
        return reply
