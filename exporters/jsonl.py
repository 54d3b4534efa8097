"""JSON lines to a file or stdout, one object per line (shared/design.md)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import BinaryIO

import orjson

from zonewatch.errors import ConfigError
from zonewatch.exporters.base import JsonRecord
from zonewatch.model import json_bytes

log = logging.getLogger(__name__)


def _open_for_append(target: str) -> BinaryIO:
    """`target` opened to append; a path that cannot be (a directory, a read-only file
    system, no such folder) is a ConfigError naming it, raised before anything runs."""
    try:
        return open(target, "ab")
    except OSError as exc:
        raise ConfigError(target, f"cannot write: {exc.strerror or exc}") from None


class JsonlSink:
    """Writes each record as one line. A dead reader (closed pipe) or a failing disk costs
    a counter and one log line; it never stops the agent."""

    name = "jsonl"

    def __init__(self, target: str, max_bytes: int = 0, backups: int = 5) -> None:
        self.target = target
        self._out: BinaryIO = sys.stdout.buffer if target == "-" else _open_for_append(target)
        self.written = 0
        self.failed = 0
        self._broken = False
        # Rotation (files only): past max_bytes, FILE -> FILE.1 -> ... -> FILE.<backups>.
        self.max_bytes = max_bytes if target != "-" else 0
        self.backups = backups
        self.rotations = 0
        self._size = self._out.tell() if self.max_bytes else 0
        self._closed = False

    def _rotate(self) -> None:
        self._out.close()
        for i in range(self.backups - 1, 0, -1):
            src = f"{self.target}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.target}.{i + 1}")
        if self.backups > 0:
            os.replace(self.target, f"{self.target}.1")
        else:
            os.unlink(self.target)
        self._out = open(self.target, "ab")  # noqa: SIM115
        self._size = 0
        self.rotations += 1

    def export(self, records: Sequence[JsonRecord]) -> None:
        if not records:
            return
        if self._broken:
            self.failed += len(records)
            return
        data = b"".join(json_bytes(r.to_json(), orjson.OPT_APPEND_NEWLINE) for r in records)
        try:
            if self.max_bytes and self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._out.write(data)
            self._out.flush()
            self._size += len(data)
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
        if not self._broken and not self._closed:
            try:
                self._out.flush()
            except OSError:
                self._broken = True

    def shutdown(self) -> None:
        if self._closed:  # shared by the agent and delivery: the first shutdown closes it
            return
        self.flush()
        self._closed = True
        if self._out is not sys.stdout.buffer:
            self._out.close()
