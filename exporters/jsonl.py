"""JSON lines to a file or stdout, one object per line (shared/design.md)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import BinaryIO

import orjson

from zonewatch.exporters.base import JsonRecord

log = logging.getLogger(__name__)


class JsonlSink:
    """Writes each record as one line. A dead reader (closed pipe) or a failing disk costs
    a counter and one log line; it never stops the agent."""

    name = "jsonl"

    def __init__(self, target: str) -> None:
        self.target = target
        self._out: BinaryIO = sys.stdout.buffer if target == "-" else open(target, "ab")  # noqa: SIM115
        self.written = 0
        self.failed = 0
        self._broken = False

    def export(self, records: Sequence[JsonRecord]) -> None:
        if not records:
            return
        if self._broken:
            self.failed += len(records)
            return
        data = b"".join(orjson.dumps(r.to_json()) + b"\n" for r in records)
        try:
            self._out.write(data)
            self._out.flush()
        except BrokenPipeError:
            self._broken = True
            self.failed += len(records)
            log.error(
                "jsonl %s: the reader went away; further lines are counted, not written",
                self.target,
            )
        except OSError as exc:
            self.failed += len(records)
            log.error("jsonl %s: write failed: %s", self.target, exc)
        else:
            self.written += len(records)

    def flush(self) -> None:
        if not self._broken:
            try:
                self._out.flush()
            except OSError:
                self._broken = True

    def shutdown(self) -> None:
        self.flush()
        if self._out is not sys.stdout.buffer:
            self._out.close()
