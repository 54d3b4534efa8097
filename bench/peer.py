"""bpftrace as the peer of a benchmark: a script run for one turn, its maps read at the end.

    with bpftrace(script) as peer:      # returns once every probe is attached
        ...                             # the measured window
    peer.maps["@frames"]                # {key text: value} printed when it stopped

The script gets an `interval:s:1` probe that prints "tick": interval probes start only once
every other probe is attached, so the first tick says the peer is in force. bpftrace runs
with this process's CPU affinity (it is a child), off the measured core.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

READY = 'interval:s:1 { printf("tick\\n"); }\n'
# "@name[key, ...]: value" or "@name: value" as bpftrace prints its maps on exit.
_MAP_LINE = re.compile(r"^(@\w+)(?:\[(.*)\])?: (-?\d+)$")


@dataclass(slots=True)
class Peer:
    output: str = ""
    maps: dict[str, dict[str, int]] = field(default_factory=dict)


def parse_maps(output: str) -> dict[str, dict[str, int]]:
    maps: dict[str, dict[str, int]] = {}
    for line in output.splitlines():
        m = _MAP_LINE.match(line.strip())
        if m:
            maps.setdefault(m.group(1), {})[m.group(2) or ""] = int(m.group(3))
    return maps


@contextlib.contextmanager
def bpftrace(script: str, attach_timeout: float = 60.0) -> Iterator[Peer]:
    """Runs `script` (plus the readiness tick) until the block ends; then stops it with
    SIGINT, as a user would, and fills the Peer with what it printed."""
    fd, path = tempfile.mkstemp(prefix="zw-bench-", suffix=".bt")
    with os.fdopen(fd, "w") as f:
        f.write(script.rstrip("\n") + "\n" + READY)
    peer = Peer()
    proc = subprocess.Popen(
        ["bpftrace", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        for line in proc.stdout:
            if line.strip() == "tick":
                break
            seen.append(line)
        else:
            raise RuntimeError(
                f"bpftrace exited with {proc.wait()} before attaching:\n{''.join(seen)}"
            )
        yield peer
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        os.unlink(path)
        peer.output = out or ""
        peer.maps = parse_maps(peer.output)
